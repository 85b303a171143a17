"""A run leaves nothing behind (issue 24 item 6): after its driver is killed with SIGKILL no process of its
cluster (agents, workers, actors) remains after a bounded time and the session directory goes too
(rlkd.reaper); an interrupted model build is removed at the next. A clean end removes the session directory
as well: tests/test_concurrent.py checks it on its two runs."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from rlkd.reaper import alive

ROOT = Path(__file__).resolve().parents[1]
BOUND_S = 60  # the reaper's grace (10 s) and kill, with room for a loaded machine


def _cmd(tmp_path, name, *overrides):
    return [sys.executable, "-m", "rlkd.main", "--config", "configs/smoke.yaml", f"run.output_dir={tmp_path}",
            f"run.name={name}", f"model.cache_dir={tmp_path / 'cache'}", "eval.num_examples=0", "eval.baselines=false",
            *overrides]


def _env():
    return {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}


def _session(out: str) -> Path:
    found = re.search(r"started a private local cluster \(.*session (\S+)\)", out)
    assert found, out[-3000:]
    return Path(found.group(1))


def test_a_killed_driver_leaves_no_ray_process_or_session_directory(tmp_path):
    log, cluster = tmp_path / "driver.log", []
    with open(log, "w") as f:
        proc = subprocess.Popen(_cmd(tmp_path, "killed", "train.steps=200", "algo.method=fkl"), cwd=ROOT, env=_env(), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    metrics, deadline = tmp_path / "killed" / "metrics.jsonl", time.time() + 600
    try:
        while not (metrics.is_file() and metrics.read_text().strip()):  # training has started: actors are up
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        cluster = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "rlkd.reaper" not in " ".join(p.cmdline())]
        session = _session(log.read_text())
        assert len(cluster) >= 5 and session.is_dir()  # gcs, raylet, agents, the learner, the actors
        proc.send_signal(signal.SIGKILL)  # the driver only, as the OOM killer would
        proc.wait()
        gone = time.time() + BOUND_S
        while time.time() < gone and (any(alive(p) for p in cluster) or session.exists()):
            time.sleep(1)
        left = [f"{p.pid} {p.name()}" for p in cluster if alive(p)]
        assert not left and not session.exists(), (left, session.exists())
    finally:  # if the test failed: stop what it started, by its own handles
        if proc.poll() is None:
            proc.kill()
        for p in cluster:
            try:
                p.kill()
            except psutil.Error:
                pass


def test_an_interrupted_build_is_removed_at_the_next_one(tmp_path):
    """A build killed half way leaves .building-PID-*; the next build removes it once PID is gone, and leaves
    a build still running in another process alone."""
    from rlkd.models import build_cached

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".building-{dead.pid}-abc").mkdir()
    (tmp_path / f".building-{os.getpid()}-def").mkdir()  # a live process's build
    (tmp_path / ".building-old123").mkdir()  # the old naming, without a pid
    build_cached(tmp_path / "model", lambda d: (d / "w").write_text("x"), log=lambda *a: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".building-{os.getpid()}-def", "model"]


def test_a_private_cluster_listens_on_loopback_only(tmp_path):
    """The cluster rlkd starts for a run: every listening socket of its processes is on 127.0.0.1."""
    code = ("import json, os, psutil\n"
            "from rlkd.cluster import connect_ray, shutdown_ray\n"
            "started = connect_ray(2, log=lambda *a: None)\n"
            "import ray\n"
            "ray.get(ray.remote(lambda: 1).remote())\n"
            "pids = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}\n"
            "found = sorted({c.laddr.ip for c in psutil.net_connections('tcp') if c.status == 'LISTEN' and c.pid in pids})\n"
            "shutdown_ray(started)\n"
            "print('LISTEN', json.dumps(found))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300)
    found = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("LISTEN "))[7:])
    assert found and set(found) <= {"127.0.0.1", "::ffff:127.0.0.1"}, found
