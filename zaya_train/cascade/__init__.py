"""The ZAYA1 RL cascade: its stages as recipes (zaya1_rl_stage1_warmup ... zaya1_rl_stage4_behavioral) and
`recipe=nano_cascade`, which runs every stage back to back on a CPU at toy size.

    zaya-train recipe=nano_cascade                                      # pretrain a toy model, then stages 1-4
    zaya-train recipe=nano_cascade trainer.resume=auto run_dir=runs/nano_cascade/<time>   # continue after a stop
"""
