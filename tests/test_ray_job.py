"""Ray Jobs: `ray start --head`, `ray job submit` the smoke config, wait for SUCCEEDED, stop."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GCS_PORT, DASHBOARD_PORT = 6391, 8276


@pytest.mark.skipif(shutil.which("ray") is None, reason="ray CLI not on PATH")
def test_ray_job_submit_smoke(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    ray = shutil.which("ray")
    subprocess.run([ray, "start", "--head", f"--port={GCS_PORT}", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}",
                    "--num-cpus=4"], env=env, check=True, capture_output=True, timeout=120)
    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    try:
        entry = [sys.executable, "-m", "rlkd.main", "--config", str(ROOT / "configs" / "smoke.yaml"),
                 f"run.output_dir={tmp_path}", "run.name=job", f"model.cache_dir={tmp_path / 'cache'}"]
        subprocess.run([ray, "job", "submit", "--address", address, "--submission-id", "rlkd-smoke", "--no-wait",
                        "--", *entry], env=env, check=True, capture_output=True, timeout=120)
        from ray.job_submission import JobStatus, JobSubmissionClient

        client, deadline, status = JobSubmissionClient(address), time.time() + 600, None
        while time.time() < deadline:
            status = client.get_job_status("rlkd-smoke")
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            time.sleep(2)
        logs = client.get_job_logs("rlkd-smoke")
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
        assert "joined" in logs  # the job's driver joined the running cluster
        run_dir = tmp_path / "job"
        for name in ("COMPLETED", "metrics.jsonl", "eval.json", "student/model.safetensors"):
            assert (run_dir / name).exists(), name
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
