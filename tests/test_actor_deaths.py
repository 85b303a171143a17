"""kill -9 of each kind of actor in the middle of a step, on the real pipeline (issue 24 item 4). The
driver's phase timer is the trigger: the actor is killed as the driver starts to wait on it (for its
rollouts, its scores, the weight sync, a policy update), so the actor dies with work in flight.
Between steps is tests/test_resume.py (rollout and teacher restarted, a learner ends the run); a death during
an object-store sync is tests/test_cluster.py."""
import json
import math
import os
import signal
from contextlib import contextmanager

import psutil
import pytest

from rlkd.config import load_config
from rlkd.controller import Controller
from rlkd.launch import run
from rlkd.loop import Stopped
from rlkd.outputs import COMPLETED


def _cfg(root, name, *overrides):
    return load_config("configs/smoke.yaml", [f"run.output_dir={root}", f"run.name={name}",
                                              f"model.cache_dir={root / 'cache'}", "train.steps=6",
                                              "train.checkpoint_every=2", "algo.ammd.critic_warmup_steps=1",
                                              "eval.num_examples=0", *overrides])


def _sigkill(actor_class: str) -> int:
    """SIGKILL this test's processes running an actor of `actor_class` (Ray titles them ray::<Class>...):
    only descendants of this process, so another run on the machine is never touched."""
    killed = 0
    for p in psutil.Process().children(recursive=True):
        try:
            if any(part.startswith(f"ray::{actor_class}") for part in p.cmdline()):
                os.kill(p.pid, signal.SIGKILL)
                killed += 1
        except psutil.Error:
            continue
    return killed


def _kill_when(monkeypatch, plan: dict[tuple[str, int], str]) -> list:
    """plan: {(phase, n-th time the driver enters it): actor class to kill then}. Returns what fired."""
    original, entered, fired = Controller.phase, {}, []

    @contextmanager
    def phase(self, name):
        entered[name] = entered.get(name, 0) + 1
        victim = plan.get((name, entered[name]))
        if victim:
            fired.append((name, entered[name], victim, _sigkill(victim)))
        with original(self, name):
            yield

    monkeypatch.setattr(Controller, "phase", phase)
    return fired


def test_rollout_and_teacher_killed_mid_step_are_survived(ray_cluster, tmp_path, monkeypatch):
    plan = {("rollout", 2): "RolloutActor",  # while it generates
            ("sync", 2): "RolloutActor",  # as the new weights are broadcast to it (gloo): the dead receiver
            # breaks the broadcast for the learner too; the group then moves weights by object store
            ("score", 3): "TeacherActor",  # while it scores
            ("teacher_gen", 2): "TeacherActor"}  # while it samples the off-policy sequences
    fired = _kill_when(monkeypatch, plan)
    run_dir = run(_cfg(tmp_path, "kills", "rollout.weight_sync=collective"))
    assert sorted((f[0], f[1]) for f in fired) == sorted(plan) and all(f[3] >= 1 for f in fired), fired
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert (run_dir / COMPLETED).exists() and [r["step"] for r in rows] == list(range(1, 7))
    assert rows[-1]["actors/restarts"] >= 2
    assert all(math.isfinite(v) for r in rows for v in r.values())


def test_a_learner_killed_during_an_update_ends_the_run_with_the_resume_command(ray_cluster, tmp_path, monkeypatch):
    fired = _kill_when(monkeypatch, {("critic", 4): "LearnerWorker"})
    with pytest.raises(Stopped) as stopped:
        run(_cfg(tmp_path, "learner"))
    assert fired and fired[0][3] >= 1
    message = str(stopped.value)
    assert stopped.value.exit_code == 1 and "\n" not in message
    assert "after step 3; checkpoint step_000002 will be used; continue with: python -m rlkd.main --resume" in message
