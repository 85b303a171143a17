"""The one placement layout: what a run reserves, and where each role's actors go inside it."""
from rlkd.algorithms import build_method
from rlkd.cluster import Layout, layout
from rlkd.config import load_config
from rlkd.tune import trial_bundles


def _layout(*overrides):
    cfg = load_config(None, ["learner.num_ranks=2", "teacher.num_actors=2", "rollout.num_actors=3", *overrides])
    return cfg, layout(cfg, build_method(cfg.algo, 0))


def test_roles_in_order_and_first_bundles():
    cfg, lay = _layout("algo.method=ammd", "rollout.num_gpus=0.5")
    roles = [r for r, _ in lay.roles]
    assert roles == ["driver", "eval", "learner", "learner", "teacher", "teacher", "rollout", "rollout", "rollout"]
    assert (lay.first("learner"), lay.first("teacher"), lay.first("rollout")) == (2, 4, 6)
    assert lay.bundles[6] == {"CPU": cfg.rollout.num_cpus, "GPU": 0.5} and "GPU" not in lay.bundles[2]
    assert trial_bundles(cfg) == lay.bundles  # Tune reserves exactly what start_groups fills


def test_methods_reserve_only_the_actors_they_start():
    _, sft = _layout("algo.method=sft")  # no teacher scores, no rollouts
    _, fkl = _layout("algo.method=fkl")  # teacher scores only
    assert [r for r, _ in sft.roles] == ["driver", "eval", "learner", "learner"]
    assert [r for r, _ in fkl.roles][-2:] == ["teacher", "teacher"] and fkl.first("teacher") == 4


def test_layout_of_counts():
    lay = Layout.of(learners=(1, {"CPU": 2.0}), teachers=(0, {"CPU": 1.0}), rollouts=(1, {"CPU": 1.0, "GPU": 1.0}))
    assert lay.bundles == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 2.0}, {"CPU": 1.0, "GPU": 1.0}]
    assert lay.first("rollout") == 3
