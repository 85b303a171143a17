"""AMMD on the skills suite stays a game: the old defaults collapse, the new ones keep the student's context.

The old defaults (critic on the student's own hidden state, critic and student at equal learning rates,
a random-init student, no norm control) are reproduced explicitly; the collapse detectors must fire on
them and must not fire on today's defaults. Both runs use the real pipeline (Ray actors, DeepSpeed
learner, HF rollouts) and the shipped skills teacher.
"""
import json
import statistics

import pytest

from rlkd.config import load_config
from rlkd.launch import run

OLD_DEFAULTS = ["algo.ammd.critic_input=student", "learner.critic_lr=1e-3", "learner.student_lr=1e-3",
                "model.tiny.student_sft_steps=0", "algo.ammd.critic_l2=0.0"]
SHORT = ["train.steps=40", "train.batch_size=16", "eval.num_examples=0", "train.log_every=40"]


def _late_means(run_dir, keys) -> dict[str, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    late = [r for r in rows if all(k in r for k in keys)][-10:]
    return {k: statistics.mean(r[k] for r in late) for k in keys}


KEYS = ["collapse/student_context_tv_on", "collapse/teacher_context_tv_on", "collapse/student_distinct_argmax_on",
        "collapse/teacher_distinct_argmax_on", "invariant/student_keeps_context"]


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("ammd_game")
    out = {}
    for name, extra in (("old", OLD_DEFAULTS), ("new", [])):
        cfg = load_config(None, [f"run.output_dir={root}", f"model.cache_dir={root / 'cache'}", f"run.name={name}",
                                 *SHORT, *extra])
        out[name] = _late_means(run(cfg), KEYS)
    return out


def _collapsed(m: dict) -> bool:
    return (m["collapse/student_context_tv_on"] < 0.25 * m["collapse/teacher_context_tv_on"]
            or m["collapse/student_distinct_argmax_on"] < 0.1 * m["collapse/teacher_distinct_argmax_on"])


def test_old_defaults_collapse(runs):
    """The detectors fire on the configuration the issue measured (so they can fail)."""
    assert _collapsed(runs["old"]), runs["old"]
    assert runs["old"]["invariant/student_keeps_context"] < 1.0


def test_new_defaults_keep_the_context(runs):
    print("collapse detectors, last 10 steps:", runs)
    assert not _collapsed(runs["new"]), runs["new"]
