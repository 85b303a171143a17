"""What a user types, or finds in an output directory, cannot run code, write outside run.output_dir or
destroy a live run (issue 24): a pickle planted in a checkpoint never runs, run.name is one safe directory
name, and `--resume` of a run that is still going is refused while the run completes untouched."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlkd import checkpoint
from rlkd.config import ConfigError, load_config
from rlkd.launch import run
from rlkd.outputs import COMPLETED

ROOT = Path(__file__).resolve().parents[1]


class _Planted:
    """Unpickling this runs a shell command: what an attacker would leave in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path: Path, marker: Path) -> None:
    torch.save({"module": _Planted(marker)}, str(path))


def test_planted_pickle_is_refused_by_the_learners_loader(tmp_path):
    from learners.safe_checkpoint import SafeCheckpointEngine

    planted, marker = tmp_path / "mp_rank_00_model_states.pt", tmp_path / "ran"
    _plant(planted, marker)
    with pytest.raises(RuntimeError, match="refusing to load"):
        SafeCheckpointEngine().load(str(planted))
    assert not marker.exists()
    assert "posix.system" in checkpoint._unsafe(planted)
    torch.load(str(planted), weights_only=False)  # the plant is real: DeepSpeed's own loader would run it
    assert marker.exists()


def _cfg(root, name, *overrides):
    return load_config("configs/smoke.yaml", [f"run.output_dir={root}", f"run.name={name}",
                                              f"model.cache_dir={root / 'cache'}", "eval.num_examples=0",
                                              "algo.ammd.critic_warmup_steps=1", *overrides])


class _Stop(Exception):
    pass


def test_resume_skips_a_planted_checkpoint_and_never_runs_it(ray_cluster, tmp_path):
    def stop(metrics, ckpt):
        if metrics["step"] == 4:
            raise _Stop

    with pytest.raises(_Stop):
        run(_cfg(tmp_path, "planted", "train.steps=6", "train.checkpoint_every=2"), on_step=stop)
    run_dir, marker = tmp_path / "planted", tmp_path / "ran"
    newest = checkpoint.latest(run_dir)
    assert newest.name == "step_000004"
    _plant(newest / "deepspeed" / "student" / "mp_rank_00_model_states.pt", marker)
    assert "refusing it" in checkpoint.damage(newest)
    logged = []
    run(load_config(str(run_dir / "config.yaml")), log=logged.append, resume=run_dir)
    assert (run_dir / COMPLETED).exists() and not marker.exists()
    assert any("resuming from the older intact checkpoint step_000002" in str(x) for x in logged)


@pytest.mark.parametrize("name", ["../x", "/abs/path", "a/b", "..", ".hidden", "模型-ü", "a b", "x" * 129])
def test_run_name_is_one_safe_directory_name(name, tmp_path):
    with pytest.raises(ConfigError, match="run.name=.*one directory name"):
        load_config(None, [f"run.output_dir={tmp_path}", f"run.name={name}"])
    assert list(tmp_path.iterdir()) == []


def test_resume_of_a_live_run_is_refused_and_the_run_completes_untouched(tmp_path, capsys):
    from rlkd.main import main

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "rlkd.main", "--config", "configs/smoke.yaml", f"run.output_dir={tmp_path}",
           "run.name=live", "train.steps=30", "train.checkpoint_every=2", f"model.cache_dir={tmp_path / 'cache'}",
           "eval.num_examples=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir, deadline = tmp_path / "live", time.time() + 300
    while time.time() < deadline and proc.poll() is None and checkpoint.latest(run_dir) is None:
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before its first checkpoint: make it longer"
    assert main(["--resume", str(run_dir)]) == 2
    assert "that run is still going" in capsys.readouterr().err
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:]
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert (run_dir / COMPLETED).exists() and steps == list(range(1, 31))


def test_a_planted_tuner_pkl_is_never_unpickled(tmp_path, capsys):
    """Re-running a sweep restores it with Tuner.restore, which unpickles <output_dir>/<tune.name>/tuner.pkl:
    only a directory whose files rlkd signed for this user is restored (rlkd.signing)."""
    import pickle

    from rlkd import signing
    from rlkd.main import main

    exp, marker = tmp_path / "smoke_sweep", tmp_path / "ran"  # tune.name of configs/sweeps/smoke.yaml
    exp.mkdir()
    (exp / "tuner.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    argv = ["--config", "configs/sweeps/smoke.yaml", f"run.output_dir={tmp_path}", f"model.cache_dir={tmp_path / 'c'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot vouch" in err and not marker.exists()
    signing.sign(tmp_path)  # this user now has a key, but the sweep directory is still unsigned
    assert main(argv) == 2 and "rlkd-signature.json is missing" in capsys.readouterr().err
    signing.sign(exp)  # signed, then changed: refused too
    (exp / "tuner.pkl").write_bytes(pickle.dumps(_Planted(marker)) + b" ")
    assert main(argv) == 2 and "tuner.pkl changed after rlkd signed it" in capsys.readouterr().err
    assert not marker.exists()
    signing.sign(exp)
    assert signing.problem(exp) is None
    (exp / "experiment_state-x.json").write_text("{}")  # a state file rlkd did not sign
    assert "experiment_state-x.json was not signed by rlkd" in signing.problem(exp)
