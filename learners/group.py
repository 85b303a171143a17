"""LearnerGroup: N LearnerWorker actors that form one torch.distributed group.

Rank 0 starts first and picks the rendezvous address and port; then every rank joins. Actors are
reserved in one placement group (PACK), so a busy cluster cannot half-start it; inside a Ray Tune
trial they take their bundles of the trial's own placement group instead.
"""
from __future__ import annotations

from collections.abc import Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from learners.worker import LearnerWorker
from rlkd.batch import SequenceBatch


class LearnerGroup:
    def __init__(self, num_ranks: int, num_cpus: float = 1.0, num_gpus: float = 0.0, placement: tuple | None = None,
                 placement_timeout: float | None = None, resources: dict | None = None, name: str = "",
                 **setup_kwargs):
        """placement: (an existing placement group, the bundle index of rank 0), e.g. a Tune trial's.
        placement_timeout: seconds to wait for the ranks' resources (None: forever). resources: custom Ray
        resources of each rank's bundle (e.g. a node label). name: ranks are named rlkd:<name>:learner:<i>."""
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {}), **(resources or {})}
        self.own_pg = placement is None
        self.pg, first = (placement_group([bundle] * num_ranks, strategy="PACK"), 0) if self.own_pg else placement
        if placement_timeout is None:
            ray.get(self.pg.ready())
        elif not self.pg.wait(timeout_seconds=placement_timeout):
            remove_placement_group(self.pg)
            raise TimeoutError(f"{num_ranks} learner rank(s) of {bundle} could not be placed in {placement_timeout}s")
        cls = ray.remote(LearnerWorker)
        self.workers = [
            cls.options(num_cpus=num_cpus, num_gpus=num_gpus,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                            self.pg, placement_group_bundle_index=first + i),
                        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(num_cpus)))}},
                        **({"name": f"rlkd:{name}:learner:{i}"} if name else {})).remote(i, num_ranks)
            for i in range(num_ranks)]
        self.num_params = self._setup(setup_kwargs)

    def _setup(self, setup_kwargs: dict, attempts: int = 3) -> int:
        """Join the ranks' process group at a port rank 0 picked. The port is free when picked but may be taken
        before the group binds it (another run's group, Ray's own sockets); a single rank then just picks
        again. Several ranks would wait for a master that never came, so they do not retry."""
        for attempt in range(attempts):
            addr, port = ray.get(self.workers[0].address.remote())
            try:
                return ray.get([w.setup.remote(addr, port, **setup_kwargs) for w in self.workers])[0]
            except ray.exceptions.RayTaskError as e:
                taken = "DistNetworkError" in type(e.cause).__name__ or "failed to listen" in str(e)
                if not taken or len(self.workers) > 1 or attempt == attempts - 1:
                    raise
                print(f"rlkd: warning: learner port {port} was taken before the group bound it; picking another",
                      flush=True)

    @property
    def size(self) -> int:
        return len(self.workers)

    def load_batch(self, shards: list[dict[str, SequenceBatch]], teacher_refs: list[dict],
                   n_tokens: dict[str, float], snapshot_old_logp: bool = False, slot: str = "step") -> None:
        """Give rank i its shard, kept under `slot`; teacher scores go as ObjectRefs straight from the
        teacher actors."""
        ray.get([w.load_batch.remote(s, t, n_tokens, snapshot_old_logp, slot)
                 for w, s, t in zip(self.workers, shards, teacher_refs)])

    def train(self, objective: Callable, targets: str | tuple[str, ...] = "student",
              check_sync: bool = False, collapse: bool = True, slot: str = "step") -> dict[str, float]:
        """One step of the target(s) on every rank, on the shard in `slot`; returns the global metrics
        (identical on all ranks)."""
        return self.result(self.submit_train(objective, targets, check_sync, collapse, slot))

    def submit_train(self, objective: Callable, targets: str | tuple[str, ...] = "student",
                     check_sync: bool = False, collapse: bool = True, slot: str = "step") -> list:
        """Start `train` without waiting; `result` waits for it."""
        return [w.train.remote(objective, targets, check_sync, collapse, slot) for w in self.workers]

    @staticmethod
    def result(refs: list) -> dict[str, float]:
        """The global metrics of a submitted `train` (identical on all ranks)."""
        return ray.get(refs)[0]

    def evaluate(self, objective: Callable, slot: str = "step") -> dict[str, float]:
        """The objective's global metrics on the shard in `slot`, no update."""
        return ray.get([w.evaluate.remote(objective, slot) for w in self.workers])[0]

    def student_weights_ref(self) -> ray.ObjectRef:
        """An object ref to rank 0's safetensors bytes of the full student."""
        refs = [w.student_weights.remote() for w in self.workers]
        ray.wait(refs, num_returns=len(refs), fetch_local=False)  # the rollout actors fetch it
        return refs[0]

    def connect_weight_sync(self, rollout_actors: list) -> tuple[Callable, object]:
        """Form the collective sync group of rank 0 and the rollout actors (rlkd.weight_sync); returns
        (a function that starts one sync on every rank and returns the ObjectRefs, the sync's Layout)."""
        dtype = ray.get(rollout_actors[0].weight_dtype.remote())
        layout = ray.get(self.workers[0].weight_layout.remote(dtype))
        host, port = ray.get(self.workers[0].address.remote())
        world = 1 + len(rollout_actors)
        ray.get([self.workers[0].join_weight_group.remote(host, port, world, layout)] +
                [a.join_weight_group.remote(host, port, 1 + i, world) for i, a in enumerate(rollout_actors)])
        return (lambda: [w.send_weights.remote() for w in self.workers]), layout

    def save_student(self, out_dir: str) -> None:
        ray.get([w.save_student.remote(out_dir) for w in self.workers])

    def save_adapted_teacher(self, out_dir: str) -> None:
        ray.get([w.save_adapted_teacher.remote(out_dir) for w in self.workers])

    def save_checkpoint(self, out_dir: str) -> None:
        ray.get([w.save_checkpoint.remote(out_dir) for w in self.workers])

    def load_checkpoint(self, in_dir: str) -> None:
        ray.get([w.load_checkpoint.remote(in_dir) for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        if self.own_pg:
            remove_placement_group(self.pg)
