"""Multi-node launches rehearsed on one machine (CPU, gloo): two `launch/torchrun.sh` "nodes" of one rank each meet
in a c10d rendezvous on loopback, train, and a second launch resumes from the checkpoint; and the Slurm script, run
under stand-ins for srun/scontrol, forwards the time-limit signal so the trainer checkpoints, requeues the job, and
the requeued job continues in the same run directory."""

import os
import re
import signal

from tests.launch.helpers import (
    FAKE_SLURM,
    NANO,
    SLURM_SBATCH,
    TORCHRUN_SH,
    free_port,
    script_env,
    step_rows,
    wait_until,
)

LAUNCH_TIMEOUT = 600  # seconds for one launch on 2 shared CPU cores (about 30 s when the machine is idle)


def two_nodes(processes, run_dir, name: str, *overrides: str) -> str:
    """Runs launch/torchrun.sh as node 0 and node 1 of a 2-node job, concurrently; returns both outputs."""
    env = script_env(NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RDZV_ID=name,
                     ZAYA_ENV="none")
    args = [str(TORCHRUN_SH), "1", *NANO, *overrides, f"run_dir={run_dir}"]
    nodes = [processes.start(args, {**env, "NODE_RANK": str(rank)}, f"{name}-node{rank}") for rank in (0, 1)]
    codes = [processes.wait(node, LAUNCH_TIMEOUT) for node in nodes]
    outputs = [processes.text(node) for node in nodes]
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    return "\n".join(outputs)


def test_two_nodes_on_one_machine_train_then_resume(tmp_path, processes):
    run_dir = tmp_path / "run"
    schedule = ["trainer.save_interval=3", "schedule.total_steps=10"]
    first = two_nodes(processes, run_dir, "first", *schedule, "trainer.max_steps=6")
    assert "stopped at step 6 (max_steps)" in first
    assert step_rows(run_dir) == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    state = (run_dir / "checkpoints" / "step_00000006" / "trainer_state.json").read_text()
    assert '"world_size": 2' in state, "both nodes' ranks joined one job"
    # Per-rank logs: one directory per node under run_dir/logs, one rank each, holding that rank's output.
    for node in (0, 1):
        logs = list((run_dir / "logs" / f"node{node}").glob("first_*/attempt_0/0/stderr.log"))
        assert len(logs) == 1, list((run_dir / "logs").rglob("*"))
    rank_logs = "".join(p.read_text() for p in (run_dir / "logs").glob("node*/first_*/attempt_0/0/std*.log"))
    assert "stopped at step 6 (max_steps)" in rank_logs

    second = two_nodes(processes, run_dir, "second", *schedule, "trainer.max_steps=10")
    assert re.search(r"resumed from \S*step_00000006 at step 6", second), second[-3000:]
    assert "stopped at step 10 (max_steps)" in second
    assert step_rows(run_dir) == list(range(1, 11)), "the second launch continued at step 7, it did not restart"
    assert processes.alive() == [], "a launch left processes behind"


def test_slurm_job_checkpoints_requeues_and_resumes(tmp_path, processes):
    """The sbatch script as Slurm would run it on 2 nodes (1 GPU each), with srun/scontrol stand-ins: SIGUSR1 to the
    batch shell reaches the trainers, which checkpoint and exit; the job requeues itself, and the requeued job
    (same job id, same command) resumes from that checkpoint in the run directory derived from the job id."""
    root = tmp_path / "checkout"  # what sbatch's submit directory would be: a checkout with launch/ in it
    root.mkdir()
    (root / "launch").symlink_to(TORCHRUN_SH.parent)
    slurm_log = tmp_path / "slurm.log"
    env = script_env(
        PATH=f"{FAKE_SLURM}{os.pathsep}{script_env()['PATH']}", FAKE_SLURM_LOG=str(slurm_log),
        SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1",
        SLURM_SUBMIT_DIR=str(root), MASTER_PORT=str(free_port()), GPUS_PER_NODE="1", ZAYA_ENV="none",
    )
    run_dir = root / "runs" / "slurm-4242"
    cmd = ["bash", str(SLURM_SBATCH), *NANO, "trainer.max_steps=1000", "trainer.save_interval=1000"]

    def run_until_signalled(name: str, attempt: int, after_steps: int) -> str:
        job = processes.start(cmd, {**env, "SLURM_RESTART_COUNT": str(attempt)}, name)
        wait_until(lambda: len(step_rows(run_dir)) >= after_steps, LAUNCH_TIMEOUT, [job], processes,
                   f"{after_steps} logged steps")
        os.kill(job.pid, signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@...` does ahead of the time limit
        assert processes.wait(job, LAUNCH_TIMEOUT) == 0, processes.text(job)[-4000:]
        return processes.text(job)

    first = run_until_signalled("attempt0", 0, after_steps=2)
    stopped = re.search(r"stopped at step (\d+) \(signal SIGUSR1\)", first)
    assert stopped, first[-4000:]
    k = int(stopped.group(1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{k:08d}"
    assert step_rows(run_dir) == list(range(1, k + 1))
    assert slurm_log.read_text().splitlines()[-1] == "scontrol requeue 4242"
    for node in (0, 1):
        assert list((run_dir / "logs" / f"node{node}").glob("4242_*/attempt_0/0/stdout.log")), "per-rank logs"

    second = run_until_signalled("attempt1", 1, after_steps=k + 2)
    assert re.search(rf"resumed from \S*slurm-4242/checkpoints/step_{k:08d} at step {k}", second), second[-4000:]
    rows = step_rows(run_dir)
    assert rows == list(range(1, len(rows) + 1)) and len(rows) >= k + 2, "the requeued job continued at step k+1"
    assert [line.split()[0] for line in slurm_log.read_text().splitlines()] == ["srun", "scontrol"] * 2
    assert processes.alive() == [], "the job left processes behind"
