"""The one placement layout (what a run reserves, where each role's actors go), and how an actor group
recovers from an actor that dies."""
import pytest

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


def _flaky_class():
    """Defined in a function so that Ray ships it by value (the workers cannot import this test module)."""

    class _Flaky:
        """A Ray actor that dies in its first `generate` and restarts slowly, so the group's recovery meets it
        while Ray is still restarting it (the race that raised ActorUnavailableError from `ready`)."""

        def __init__(self, marker: str):
            import os
            import time

            import ray
            self.marker = marker
            if ray.get_runtime_context().was_current_actor_reconstructed:
                time.sleep(2)
            os.makedirs(os.path.dirname(marker), exist_ok=True)

        def ready(self):
            return True

        def update_weights(self, ref, version):
            import os
            if not os.path.exists(self.marker + ".sync"):  # dies in its first weight sync
                open(self.marker + ".sync", "w").close()
                os._exit(1)
            self.version = version
            return {"bytes": 1, "version": version}

        def held(self):
            return getattr(self, "version", 0)

        def generate(self, chunk, seed):
            import os
            if not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os._exit(1)
            return {"x": chunk, "version": 0}

    return _Flaky


def _flaky_group(ray, tmp_path, restarts):
    from rlkd.cluster import ActorGroup
    actors = [ray.remote(_flaky_class()).options(max_restarts=restarts).remote(str(tmp_path / f"m{i}" / "died"))
              for i in range(2)]
    ray.get([a.ready.remote() for a in actors])
    return ActorGroup(actors, max_retries=3)


def test_actor_group_recovers_an_actor_that_dies_and_restarts_slowly(ray_cluster, tmp_path):
    group = _flaky_group(ray_cluster, tmp_path, restarts=1)
    assert group.split("generate", [1, 2, 3, 4], seed=0) == {"x": [1, 2, 3, 4]}
    assert group.restarts >= 1


def test_actor_group_gives_up_with_the_ray_error_as_cause(ray_cluster, tmp_path):
    group = _flaky_group(ray_cluster, tmp_path, restarts=0)
    with pytest.raises(RuntimeError, match="generate failed 4 times in a row") as err:
        group.split("generate", [1, 2], seed=0)
    assert isinstance(err.value.__cause__, ray_cluster.exceptions.RayActorError)


def test_actor_group_survives_an_actor_that_dies_during_the_weight_sync(ray_cluster, tmp_path):
    """kill -9 during a sync (issue 24: an unguarded ray.get in update_weights ended the run): Ray restarts
    the actor, the group waits for it and syncs again, and every actor ends at the group's version."""
    from rlkd.cluster import ActorGroup

    actors = [ray_cluster.remote(_flaky_class()).options(max_restarts=1).remote(str(tmp_path / f"s{i}" / "died"))
              for i in range(2)]
    ray_cluster.get([a.ready.remote() for a in actors])
    group = ActorGroup(actors, max_retries=3, weights=lambda: ray_cluster.put(b"w"))
    group.update_weights()
    assert group.restarts >= 1 and ray_cluster.get([a.held.remote() for a in actors]) == [group.version] * 2
