"""`zaya-train` with a SIGTERM sent to itself once stage CASCADE_SIGTERM_STAGE logs step CASCADE_SIGTERM_STEP.

    CASCADE_SIGTERM_STAGE=stage2_rlve CASCADE_SIGTERM_STEP=1 python tests/cascade/sigterm_driver.py recipe=nano_cascade ...
"""

import os
import signal

from zaya_train import cli, metrics
from zaya_train.cascade import pipeline

target, at = os.environ["CASCADE_SIGTERM_STAGE"], int(os.environ["CASCADE_SIGTERM_STEP"])
current: dict[str, str] = {}
run_job, log = pipeline.run_job, metrics.MetricsSink.log


def run_job_noting_its_key(job):
    current["key"] = job.key
    return run_job(job)


def log_then_signal(self, step, loss, values=None):
    log(self, step, loss, values)
    if current.get("key") == target and step == at:
        os.kill(os.getpid(), signal.SIGTERM)


pipeline.run_job = run_job_noting_its_key
metrics.MetricsSink.log = log_then_signal
cli.main()
