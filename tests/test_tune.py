"""Ray Tune sweeps through `python -m rlkd.main`: a sweep of two tiny AMMD trials side by side (each in
its own placement group, ASHA on held-out ROUGE-L) interrupted with Ctrl-C and restored by running the
same command again (Tuner.restore), its unfinished trials resuming from their checkpoints. The same
2-trial sweep, uninterrupted and under `ray job submit`, is tests/test_ray_job.py."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from rlkd.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "configs" / "sweeps" / "smoke.yaml"


def _cmd(tmp_path, *overrides):
    return [sys.executable, "-m", "rlkd.main", "--config", str(SWEEP), f"run.output_dir={tmp_path}",
            f"model.cache_dir={tmp_path / 'cache'}", *overrides]


# The interrupted sweep runs 12 steps, not 6: the Ctrl-C comes after the first checkpoint, and with 6 steps
# the trials sometimes finished before Tune acted on it (a full test run here saw it once).
LONG = ["train.steps=12"]


def _env():
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT),
            "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}


def check_finished(tmp_path, total: int = 6):
    """Both trials ran to the end (`total` steps, COMPLETED) or ASHA stopped one at a milestone (>= 3 steps)."""
    runs = sorted((tmp_path / "smoke_sweep-trials" / "runs").iterdir())
    assert len(runs) == 2
    for run_dir in runs:
        steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        done = (run_dir / "COMPLETED").exists()
        assert steps == list(range(1, total + 1 if done else len(steps) + 1)) and (done or len(steps) >= 3), steps
        assert (run_dir / "tensorboard").is_dir()
    assert any((d / "COMPLETED").exists() for d in runs)
    exp = tmp_path / "smoke_sweep"
    best = yaml.safe_load((exp / "best_config.yaml").read_text())
    assert "tune" not in best and 1e-3 <= best["learner"]["student_lr"] <= 1e-2
    load_config(str(exp / "best_config.yaml"))  # ready to run as a plain config
    table = (exp / "results.md").read_text()
    assert table.count("\n") == 4  # header, rule, two trials
    return runs


def _reported_a_checkpoint(runs) -> bool:
    """A trial wrote a checkpoint and went on past it, so Tune has registered that checkpoint (the
    report follows the checkpoint write; a Ctrl-C in between would leave Tune nothing to restore)."""
    for ckpt in runs.glob("*/checkpoints/step_*"):
        metrics = ckpt.parents[1] / "metrics.jsonl"
        steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()] if metrics.is_file() else []
        if steps and max(steps) > int(ckpt.name.split("_")[1]):
            return True
    return False


def test_interrupted_sweep_is_restored(tmp_path):
    proc = subprocess.Popen(_cmd(tmp_path, *LONG), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    runs = tmp_path / "smoke_sweep-trials" / "runs"
    deadline = time.time() + 600
    while time.time() < deadline and not _reported_a_checkpoint(runs):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment state and stops
    try:
        first_out = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    interrupted = [d for d in runs.iterdir() if not (d / "COMPLETED").exists()]
    assert interrupted, "the sweep finished before it was interrupted"

    out = subprocess.run(_cmd(tmp_path, *LONG), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, first_out[-2000:] + out.stdout[-3000:] + out.stderr[-3000:]
    assert "restoring the unfinished sweep" in out.stdout
    check_finished(tmp_path, total=12)
    assert "resumed from" in out.stdout + out.stderr  # a trial continued from its checkpoint


def test_ctrl_c_before_any_result_says_interrupted(tmp_path):
    """Ctrl-C in a terminal reaches the whole process group, trials included, before any trial reported:
    the sweep is 'interrupted' (exit 130, run it again), not a finished sweep of NaN rows (exit 1)."""
    proc = subprocess.Popen(_cmd(tmp_path, *LONG), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    runs = tmp_path / "smoke_sweep-trials" / "runs"
    deadline = time.time() + 600
    while time.time() < deadline and not (runs.is_dir() and any(runs.iterdir())):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not list(runs.glob("*/COMPLETED")), "a trial finished before the Ctrl-C"
    assert proc.returncode == 130, out[-3000:]
    assert "sweep interrupted" in out and "run the same command again" in out, out[-3000:]
    assert "no trial reported" not in out


def test_bad_sweeps_fail_with_one_line(tmp_path, capsys):
    from rlkd.main import main

    cases = [({"learner.no_such_field": {"uniform": [0, 1]}}, "unknown config field 'learner.no_such_field'"),
             ({"learner.student_lr": {"normal": [0, 1]}}, "tune.space['learner.student_lr']"),
             ({"learner.student_lr": {"uniform": [1e-3]}}, "[low, high]"),
             ({"train.batch_size": {"choice": ["big"]}}, "train.batch_size")]
    for space, expected in cases:
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump({"eval": {"every_steps": 2}, "tune": {"space": space}}))
        assert main(["--config", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("rlkd: error:") and expected in err and "\n" not in err, err
