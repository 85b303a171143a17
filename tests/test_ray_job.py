"""Ray Jobs: `ray start --head`, then `ray job submit` a smoke run and the 2-trial Tune sweep smoke
(configs/sweeps/smoke.yaml), each to SUCCEEDED, then `ray stop`."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_tune import check_finished

ROOT = Path(__file__).resolve().parents[1]
GCS_PORT, DASHBOARD_PORT = 6391, 8276
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}
pytestmark = pytest.mark.skipif(shutil.which("ray") is None, reason="ray CLI not on PATH")


@pytest.fixture(scope="module")
def head():
    ray = shutil.which("ray")
    subprocess.run([ray, "start", "--head", f"--port={GCS_PORT}", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}",
                    "--num-cpus=10"], env=ENV, check=True, capture_output=True, timeout=120)
    try:
        yield ray, f"http://127.0.0.1:{DASHBOARD_PORT}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=ENV, capture_output=True, timeout=120)


def _submit(head, job_id, args):
    from ray.job_submission import JobStatus, JobSubmissionClient

    ray, address = head
    subprocess.run([ray, "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait", "--",
                    sys.executable, "-m", "rlkd.main", *args], env=ENV, check=True, capture_output=True, timeout=120)
    client, deadline, status = JobSubmissionClient(address), time.time() + 900, None
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    return logs


def test_ray_job_submit_smoke(head, tmp_path):
    logs = _submit(head, "rlkd-smoke", ["--config", str(ROOT / "configs" / "smoke.yaml"), f"run.output_dir={tmp_path}",
                                        "run.name=job", f"model.cache_dir={tmp_path / 'cache'}"])
    assert "joined" in logs  # the job's driver joined the running cluster
    run_dir = tmp_path / "job"
    for name in ("COMPLETED", "metrics.jsonl", "eval.json", "student/model.safetensors"):
        assert (run_dir / name).exists(), name


def test_ray_job_submit_sweep(head, tmp_path):
    logs = _submit(head, "rlkd-sweep", ["--config", str(ROOT / "configs" / "sweeps" / "smoke.yaml"),
                                        f"run.output_dir={tmp_path}", f"model.cache_dir={tmp_path / 'cache'}"])
    assert "joined" in logs and "best eval/rougeL=" in logs
    check_finished(tmp_path)  # the 2-trial sweep smoke test: trials, results table, best_config.yaml
