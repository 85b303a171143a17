"""Ray Jobs: a private head (`ray start --head --block`, its own temporary directory and free ports), then
`ray job submit` a smoke run and the 2-trial Tune sweep smoke (configs/sweeps/smoke.yaml), each to
SUCCEEDED. The head is stopped through its own process group: never `ray stop`, which would stop every
Ray cluster on the machine, a developer's own included."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_tune import check_finished

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
pytestmark = pytest.mark.skipif(shutil.which("ray") is None, reason="ray CLI not on PATH")
PORTS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
         "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port", "node-manager-port",
         "object-manager-port")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM the head's process group (ray start and every process it spawned), SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(proc.pid, 0)  # anyone left in the group?
            except ProcessLookupError:
                return
            time.sleep(0.5)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    ray = shutil.which("ray")
    temp_dir = tmp_path_factory.mktemp("ray")  # its own session files, and its own ray_current_cluster
    ports = dict(zip(PORTS, _free_ports(len(PORTS))))
    args = [ray, "start", "--head", "--block", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--num-cpus=10",
            *(f"--{k}={v}" for k, v in ports.items())]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own process group: stopped by its own handle
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        _wait_for_dashboard(address, proc)
        yield ray, address
    finally:
        stop_group(proc)


def _client(address: str):
    """A JobSubmissionClient of `address` itself: Ray lets RAY_ADDRESS (conftest sets it to 'local') override
    the address given, which would talk to whatever cluster `ray start` recorded on this machine."""
    from ray.job_submission import JobSubmissionClient

    saved = os.environ.pop("RAY_ADDRESS", None)
    try:
        return JobSubmissionClient(address)
    finally:
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


def _wait_for_dashboard(address: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"ray start exited with {proc.returncode}"
        try:
            _client(address).list_jobs()
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(1)
    raise TimeoutError(f"the test's Ray head did not answer at {address} in {timeout:.0f} s")


def _submit(head, job_id, args):
    from ray.job_submission import JobStatus

    ray, address = head
    cmd = [ray, "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait", "--",
           sys.executable, "-m", "rlkd.main", *args]
    deadline = time.time() + 120  # the head's job agent may come up after its dashboard answers (seen under load)
    while True:
        done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
        if done.returncode == 0 or time.time() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0, f"ray job submit failed: {(done.stdout + done.stderr)[-2000:]}"
    client, deadline, status = _client(address), time.time() + 900, None
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
