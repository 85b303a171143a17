"""Two runs on one machine, started 5 s apart: each keeps its own private Ray cluster, so neither joins,
starves or shuts down the other, and both complete with their own results, and remove their Ray session
directories at the end."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_two_runs_side_by_side(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env["RAY_ADDRESS"] = "local"  # a private cluster each, whatever cluster `ray start` left on this machine
    procs = []
    for name in ("a", "b"):
        cmd = [sys.executable, "-m", "rlkd.main", "--config", "configs/smoke.yaml", f"run.output_dir={tmp_path}",
               f"run.name={name}", f"model.cache_dir={tmp_path / 'cache'}", "eval.num_examples=0",
               "run.placement_timeout_s=120"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
        time.sleep(5)
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for name, p, out in zip("ab", procs, outs):
        assert p.returncode == 0, out[-3000:]
        assert "started a private local cluster" in out and "joined" not in out
        session = Path(re.search(r"private local cluster \(.*session (\S+)\)", out).group(1))
        assert session.name.startswith("session_") and not session.exists()  # a clean end removes it
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert (tmp_path / name / "COMPLETED").exists() and [r["step"] for r in rows] == list(range(1, len(rows) + 1))


def test_generated_run_names_never_collide(tmp_path, monkeypatch):
    """Runs started in the same second without run.name get <method>-<time>, then -2, -3; a chosen name
    that exists stays an error."""
    import pytest

    from rlkd import outputs
    from rlkd.checks import ConfigError

    monkeypatch.setattr(outputs.time, "strftime", lambda fmt: "20261124-120000")
    paths = [outputs.make_run_dir(str(tmp_path), "", "gkd") for _ in range(3)]
    assert [p.name for p in paths] == ["gkd-20261124-120000", "gkd-20261124-120000-2", "gkd-20261124-120000-3"]
    with pytest.raises(ConfigError, match="already exists"):
        outputs.make_run_dir(str(tmp_path), "gkd-20261124-120000", "gkd")
