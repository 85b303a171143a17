"""Resumable runs and actor faults, on the real pipeline (Ray actors, DeepSpeed learner, tiny models):
6 steps straight == 3 steps, an interruption, and `--resume` for 3 more (metrics and parameters);
a crash while a checkpoint is written leaves the previous one usable; killed rollout and teacher
actors are restarted by Ray and the run completes."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlkd import checkpoint
from rlkd.config import load_config
from rlkd.launch import run
from rlkd.models import load_model
from rlkd.outputs import COMPLETED

VOLATILE = ("timing/", "throughput/", "train/wall_seconds", "checkpoint/seconds", "eval/seconds", "memory/")


class Interrupted(Exception):
    pass


def _cfg(root, name, *overrides):
    return load_config("configs/smoke.yaml", [f"run.output_dir={root}", f"run.name={name}",
                                              f"model.cache_dir={root / 'cache'}", "train.steps=6",
                                              "train.checkpoint_every=3", "algo.ammd.critic_warmup_steps=2",
                                              "eval.num_examples=0", *overrides])


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _stop_after(step):
    def hook(metrics, ckpt):
        if metrics["step"] == step:
            assert ckpt is not None and ckpt.name == f"step_{step:06d}"
            raise Interrupted
    return hook


@pytest.mark.parametrize("method", ["ammd", "okd"])
def test_resume_equals_straight_run(ray_cluster, tmp_path, method):
    extra = [f"algo.method={method}"]
    straight = run(_cfg(tmp_path, "straight", *extra))
    with pytest.raises(Interrupted):
        run(_cfg(tmp_path, "resumed", *extra), on_step=_stop_after(3))
    resumed_dir = tmp_path / "resumed"
    assert not (resumed_dir / COMPLETED).exists() and checkpoint.latest(resumed_dir).name == "step_000003"
    (resumed_dir / "checkpoints" / ".tmp-step_000006").mkdir()  # debris of a crash while writing: ignored
    run(load_config(str(resumed_dir / "config.yaml")), resume=resumed_dir)

    a, b = _rows(straight), _rows(resumed_dir)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            if not k.startswith(VOLATILE):
                assert math.isclose(v, rb[k], rel_tol=1e-5, abs_tol=1e-7), (ra["step"], k, v, rb[k])
    sa, sb = load_model(straight / "student").state_dict(), load_model(resumed_dir / "student").state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-7)
    last_a, last_b = checkpoint.latest(straight), checkpoint.latest(resumed_dir)
    assert last_a.name == last_b.name == "step_000006"
    extra_state = {"ammd": "critic.safetensors", "okd": "teacher_adapter/adapter_model.safetensors"}[method]
    ca, cb = load_file(str(last_a / extra_state)), load_file(str(last_b / extra_state))
    for k in ca:
        torch.testing.assert_close(ca[k], cb[k], rtol=1e-5, atol=1e-7)


class _Writes:
    def save_checkpoint(self, out_dir):
        (Path(out_dir) / "weights").write_text("ok")


class _CrashesMidway:
    def save_checkpoint(self, out_dir):
        (Path(out_dir) / "weights").write_text("half")
        raise OSError("disk full")


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path):
    checkpoint.save(tmp_path, 3, _Writes(), {"controller": {}})
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, 6, _CrashesMidway(), {"controller": {}})
    last = checkpoint.latest(tmp_path)
    assert last.name == "step_000003" and (last / "weights").read_text() == "ok"
    assert checkpoint.load_state(last)["step"] == 3
    (tmp_path / "checkpoints" / "latest").write_text("step_000099")  # a pointer to nothing: fall back
    assert checkpoint.latest(tmp_path).name == "step_000003"


def test_resume_errors_are_one_line(tmp_path):
    from rlkd.main import main

    assert main(["--resume", str(tmp_path / "nope")]) == 2
    (tmp_path / "config.yaml").write_text("{}")
    assert main(["--resume", str(tmp_path)]) == 2  # no checkpoint yet


def test_killed_actors_are_restarted_and_the_run_completes(ray_cluster, tmp_path):
    cfg = _cfg(tmp_path, "kill", "train.steps=5", "train.checkpoint_every=0")

    def kill(metrics, ckpt):
        if metrics["step"] == 3:  # after a policy update and sync: a restarted rollout actor is stale
            for role in ("rollout", "teacher"):
                ray_cluster.kill(ray_cluster.get_actor(f"rlkd:kill:{role}:0"), no_restart=False)

    run_dir = run(cfg, on_step=kill)
    rows = _rows(run_dir)
    assert (run_dir / COMPLETED).exists() and [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["actors/restarts"] >= 1  # the restarted rollout actor was detected and resynced
    assert all(math.isfinite(v) for r in rows for v in r.values())


def test_a_killed_learner_stops_with_the_resume_command_and_the_resume_completes(ray_cluster, tmp_path):
    """kill -9 of a learner rank (Ray does not restart learners): one line with the last step, the checkpoint
    and the resume command, exit 1; the resume continues from that checkpoint to the end."""
    import os
    import signal

    import psutil

    from rlkd.loop import Stopped

    def kill_learner(metrics, ckpt):
        if metrics["step"] == 3:
            for p in psutil.Process().children(recursive=True):  # this test's cluster only
                if any("LearnerWorker" in part for part in p.cmdline()):
                    os.kill(p.pid, signal.SIGKILL)

    with pytest.raises(Stopped) as stopped:
        run(_cfg(tmp_path, "learner", "train.steps=6", "train.checkpoint_every=2"), on_step=kill_learner)
    message = str(stopped.value)
    assert stopped.value.exit_code == 1 and "\n" not in message
    assert "after step 3; checkpoint step_000002 will be used; continue with: python -m rlkd.main --resume" in message
    run_dir = tmp_path / "learner"
    run(load_config(str(run_dir / "config.yaml")), resume=run_dir)
    assert (run_dir / COMPLETED).exists() and [r["step"] for r in _rows(run_dir)] == list(range(1, 7))


def test_sigterm_stops_with_the_resume_command(tmp_path):
    """What `ray job stop` sends: the run stops within seconds, says where it stopped and how to resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "rlkd.main", "--config", "configs/smoke.yaml", f"run.output_dir={tmp_path}",
           "run.name=term", "train.steps=500", "train.checkpoint_every=2", f"model.cache_dir={tmp_path / 'cache'}"]
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "RAY_ADDRESS": "local"}  # its own cluster, never one found here
    proc = subprocess.Popen(cmd, cwd=root, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    _, err = proc.communicate(timeout=120)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 143, err[-2000:]
    assert last.startswith("rlkd: stopped by SIGTERM after step") and f"--resume {tmp_path / 'term'}" in last
    assert time.time() - t0 < 60 and not (tmp_path / "term" / "COMPLETED").exists()
