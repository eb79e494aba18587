"""The main job (`zaya-train`, recipe=nano): does training inside Markovian RSA make a model use RSA better?

    zaya-train                                   # pretrain, warm start, plain and co-design RL, evaluate, report
    zaya-train stages=[eval] run_dir=runs/nano/<time>

- `config`: the `experiment.*` budgets, `stages` and `seeds`.
- `pipeline`: the stages as recipe runs in one process, resumable, recorded in run_dir/stages.json.
- `collect`: reads what the stages wrote, exports the co-design model; `report`: results.json, the paired
  statistics, the verdict, report.md and rsa_scaling.png.

Tests: `pytest tests/experiment`.
"""
