"""The Ray side of a run: joining a cluster, the one placement layout, and groups of actors that act as one.

Nothing here names a method or imports actors/ or learners/: the composition root (rlkd.launch) starts
the actors, and wraps each role's handles in an `ActorGroup` that the controller calls.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import ray


def connect_ray(num_cpus: int = 0, log: Callable = print, address: str | None = None) -> bool:
    """Join a cluster only when asked: `address` (run.ray_address), RAY_ADDRESS (set under `ray job
    submit`), or the cluster `ray start` recorded on this machine. 'local' in either (as for ray.init)
    asks for a private cluster whatever else runs here; the tests set RAY_ADDRESS=local. Otherwise start a
    private local cluster with `num_cpus` (0 = all) logical CPUs, which no other run joins (rlkd never uses
    address='auto', which would join any Ray instance on the machine, another run's included). Returns True if we
    started it (the caller then shuts it down)."""
    if ray.is_initialized():
        return False
    target, source = address or os.environ.get("RAY_ADDRESS") or None, "run.ray_address" if address else "RAY_ADDRESS"
    if target == "local":
        target = None
    elif target is None:
        target, source = _ray_start_address(), "`ray start`"
    if target is not None:
        try:
            ray.init(address=target)
            log(f"ray: joined the cluster at {target} ({source})")
            return False
        except ConnectionError:
            if source != "`ray start`":
                raise
            log(f"ray: the cluster `ray start` recorded ({target}) does not answer; starting a private one")
    num_cpus = num_cpus or os.cpu_count()
    # small CPU boxes: actors reserve ~1 CPU each and mostly wait on one another, so oversubscribe
    init_on_loopback(max(num_cpus, 4))
    session = _session_dir()
    log(f"ray: started a private local cluster ({max(num_cpus, 4)} logical CPUs, session {session})")
    if session:
        from rlkd import reaper

        reaper.start(session)  # a SIGKILL'd driver leaves no Ray process or session directory behind
    return True


def init_on_loopback(num_cpus: int, **kwargs) -> None:
    """Start a private cluster whose processes listen on 127.0.0.1 only. ray.init replaces a loopback
    _node_ip_address with the machine's IP (services.resolve_ip_for_localhost) unless Ray's multi-node support is
    off, as it is on macOS and Windows; it is switched off for this call only, so the GCS, raylet, agents and
    workers all bind loopback (measured: they bound every interface before)."""
    from ray._private import ray_constants

    multi_node = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = multi_node


def shutdown_ray(started: bool) -> None:
    """Stop the cluster connect_ray started (a joined one is left alone) and remove its session directory."""
    if not started:
        return
    session = _session_dir()
    ray.shutdown()
    if session:
        from rlkd.reaper import remove_session

        remove_session(session)


def _session_dir() -> str | None:
    node = getattr(getattr(ray, "_private", None) and ray._private.worker, "_global_node", None)
    return node.get_session_dir_path() if node is not None else None


def check_reachable(address: str | None = None, timeout: float = 5.0) -> None:
    """A one-line ConfigError within `timeout` seconds when the cluster a run would join (run.ray_address,
    else RAY_ADDRESS) has nothing listening: ray.init would retry for minutes. Called before the run
    directory exists. 'local', 'auto' and ray:// client addresses are left to Ray."""
    import socket

    from rlkd.checks import ConfigError

    target = address or os.environ.get("RAY_ADDRESS") or ""
    field = "run.ray_address" if address else "RAY_ADDRESS"
    host, sep, port = target.rpartition(":")
    if not sep or target in ("local", "auto") or "://" in target or not port.isdigit():
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"{field}={target!r}: no Ray cluster answers there ({e.strerror or e}); start it, "
                          f"fix the address, or unset {field} to start a private cluster") from None


def _ray_start_address() -> str | None:
    """The address `ray start` wrote down on this machine (ray.init() with no address joins the same), if any."""
    try:
        from ray._private.services import find_bootstrap_address

        return find_bootstrap_address(None)
    except Exception:  # noqa: BLE001 - a Ray without this helper: only explicit addresses are joined
        return None


def wait_placed(refs: list, timeout: float, what: str) -> list:
    """ray.get that fails in `timeout` seconds with one line (the resources asked for, what is free)
    instead of waiting forever for actors the cluster cannot place."""
    from rlkd.checks import ConfigError

    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise ConfigError(unplaced(what, timeout)) from None


def unplaced(what: str, timeout: float) -> str:
    free = {k: round(v, 2) for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
    return (f"{what} could not start within run.placement_timeout_s={timeout:g}s; the cluster has free {free}; "
            "lower the actors' num_cpus/num_gpus or start fewer runs at once")


# ---- the placement layout -------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """The bundles one run reserves, in order: the driver, evaluation tasks, the learner ranks, the teacher
    actors, the rollout actors. Ray Tune trials reserve exactly `bundles` (a PlacementGroupFactory), so
    trials never starve one another; `first(role)` is where a role's actors go inside such a group."""
    roles: tuple[tuple[str, dict], ...]  # (role, resources) per bundle

    @classmethod
    def of(cls, learners: tuple[int, dict], teachers: tuple[int, dict], rollouts: tuple[int, dict]) -> Layout:
        """Each role as (number of actors, resources of one)."""
        roles = [("driver", {"CPU": 1.0}), ("eval", {"CPU": 1.0})]
        for role, (n, res) in (("learner", learners), ("teacher", teachers), ("rollout", rollouts)):
            roles += [(role, res)] * n
        return cls(tuple(roles))

    @property
    def bundles(self) -> list[dict]:
        return [dict(res) for _, res in self.roles]

    def first(self, role: str) -> int:
        return next(i for i, (r, _) in enumerate(self.roles) if r == role)


def resources(cpus: float, gpus: float, custom: dict | None = None) -> dict:
    """One actor's bundle: CPUs, GPUs and custom resources (e.g. a node label: `<section>.resources`)."""
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **(custom or {})}


def placement(pg, index: int) -> dict:
    """Actor options that pin it to bundle `index` of a placement group (none when `pg` is None)."""
    if pg is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)}


def layout(cfg, method) -> Layout:
    """The bundles one run of `method` (an rlkd.algorithms.Method) reserves: Tune trials reserve them,
    rlkd.launch.start_groups fills them."""
    lc, t, r = cfg.learner, cfg.teacher, cfg.rollout
    return Layout.of(learners=(lc.num_ranks, resources(lc.num_cpus, lc.num_gpus, lc.resources)),
                     teachers=(t.num_actors if _may_need_teacher(method) else 0,
                               resources(t.num_cpus, t.num_gpus, t.resources)),
                     rollouts=(r.num_actors if method.uses_rollouts else 0, resources(r.num_cpus, r.num_gpus, r.resources)))


def _may_need_teacher(method) -> bool:
    """A teacher actor scores or samples for this method (start_groups may skip it when samples are cached)."""
    return method.needs_teacher_scores or method.uses_teacher_generations


# ---- actor groups ---------------------------------------------------------------------------

@dataclass
class Pending:
    """A submitted ActorGroup call: its arguments (to run it again) and the weights version it was sent at."""
    method: str
    items: list
    seed: int
    kwargs: dict
    refs: list
    version: int


class ActorGroup:
    """Ray actors of one role that act as one: work is split over them in order and gathered back.

    Ray restarts a dead actor (run.max_actor_restarts); a call that met it waits for the restart and is
    retried. With `weights` (a callable returning an ObjectRef of the current student), the group keeps
    its actors at one weights version: a restarted actor, which comes back with its initial weights, is
    brought up to date before the retry, so no step trains on stale samples.
    """

    def __init__(self, actors: list, max_retries: int = 3, weights: Callable | None = None):
        self.actors, self.max_retries, self.weights = list(actors), max_retries, weights
        self.version = 0  # weights version the actors hold (0 = the model they were started from)
        self.restarts = 0  # failures recovered from (metric actors/restarts)
        self.seconds = 0.0  # the slowest actor's own time in the last call (its share of the wall time)
        self.sender: Callable | None = None  # collective sync: starts the learners' broadcast (use_collective)
        self.layout = None  # collective sync: the rlkd.weight_sync.Layout the actors receive
        self.sync_bytes = 0  # bytes the last sync moved to each actor

    def use_collective(self, sender: Callable, layout) -> None:
        """Sync over the collective group the actors joined: `sender()` starts the learners' broadcast."""
        self.sender, self.layout = sender, layout

    def __len__(self) -> int:
        return len(self.actors)

    def split(self, method: str, items: list, seed: int, **kwargs) -> dict[str, list]:
        """`method(chunk, seed=seed_i, **kwargs)` on each actor with its share of `items`; the outputs'
        lists are concatenated in the order of `items`."""
        return self.collect(self.submit(method, items, seed, **kwargs))

    def submit(self, method: str, items: list, seed: int, **kwargs) -> Pending:
        """Start `split` without waiting: the actors work while the caller does something else."""
        n = len(self.actors)
        chunks = [items[i * len(items) // n:(i + 1) * len(items) // n] for i in range(n)]
        refs = [getattr(a, method).remote(c, seed=seed + i * 7919, **kwargs)
                for i, (a, c) in enumerate(zip(self.actors, chunks)) if c]
        return Pending(method, items, seed, kwargs, refs, self.version)

    def collect(self, pending: Pending) -> dict[str, list]:
        """The outputs of a submitted call. The actors must still hold the weights version of the
        submission (pending.version); a call that met a dead or restarted actor is recovered and run
        again at the current version, which then becomes pending.version."""
        why, error = None, None
        for _ in range(self.max_retries + 1):
            try:
                if why is not None:  # inside the try: an actor may fail again while it is being recovered
                    self._recover(why)
                    pending = self._resubmit(pending)
                outs = ray.get(pending.refs)
            except ray.exceptions.RayActorError as e:
                why, error = f"an actor died or is restarting ({type(e).__name__})", e
                continue
            if all(o.get("version", pending.version) == pending.version for o in outs):
                self.seconds = max(o.get("seconds", 0.0) for o in outs)
                return {k: [x for o in outs for x in o[k]] for k in outs[0] if k not in ("seconds", "version")}
            why = "a restarted actor generated with its initial weights"
        raise RuntimeError(f"{pending.method} failed {self.max_retries + 1} times in a row; last: {why}") from error

    def _resubmit(self, pending: Pending) -> Pending:
        again = self.submit(pending.method, pending.items, pending.seed, **pending.kwargs)
        pending.refs, pending.version = again.refs, again.version
        return pending

    def spread(self, method: str, calls: list[tuple], wait: bool = True) -> list:
        """One call per argument tuple, round-robin over the actors; ObjectRefs, once all are ready (with
        `wait`; else at once, and `wait(refs)` later)."""
        refs = [getattr(self.actors[i % len(self.actors)], method).remote(*args) for i, args in enumerate(calls)]
        if wait:
            self.wait(refs)
        return refs

    @staticmethod
    def wait(refs: list) -> None:
        """Until every ref is ready, without fetching it: the learners fetch them, not the driver."""
        if refs:
            ray.wait(refs, num_returns=len(refs), fetch_local=False)

    def update_weights(self) -> None:
        """Load the learners' current student into every actor (a new weights version): over the collective
        group when one is set up, else as one safetensors blob through the object store. An actor that dies
        during the sync is waited for (Ray restarts it) and the sync is done again."""
        self.version += 1
        error = None
        for _ in range(self.max_retries + 1):
            try:
                self._push_weights()
                return
            except ray.exceptions.RayActorError as e:
                error = e
                self._wait_for_restart(f"an actor died during the weight sync ({type(e).__name__})")
        raise RuntimeError(f"the weight sync failed {self.max_retries + 1} times in a row") from error

    def _push_weights(self) -> None:
        if self.sender is not None:  # receivers and sender block in the same broadcasts: start them together
            receive = [a.receive_weights.remote(self.layout, self.version) for a in self.actors]
            sent = self.sender()
            try:
                ray.get(sent + receive)
            except ray.exceptions.RayTaskError:
                # a receiver that died broke the broadcast for every peer (gloo: 'Connection reset by peer' in
                # the learner); report the death, which update_weights survives, not the sender's error
                for ref in receive:
                    try:
                        ray.get(ref)
                    except ray.exceptions.RayTaskError:
                        continue
                raise
            self.sync_bytes = self.layout.nbytes
            return
        ref = self.weights()
        self.sync_bytes = ray.get([a.update_weights.remote(ref, self.version) for a in self.actors])[0]["bytes"]

    def _recover(self, why: str) -> None:
        """Wait until Ray has restarted the actors (raises once restarts are exhausted), then resync."""
        self._wait_for_restart(why)
        if self.weights is not None:
            self.update_weights()

    def _wait_for_restart(self, why: str) -> None:
        self.restarts += 1
        print(f"rlkd: warning: {why}; waiting for the restart and retrying the call", flush=True)
        if self.sender is not None:  # a restarted actor is outside the group: weights go by object store now
            print("rlkd: warning: weight sync falls back to the object store for the rest of the run", flush=True)
            self.sender = None
        # at-least-once: a call to an actor Ray is still restarting raises ActorUnavailableError otherwise
        ray.get([a.ready.options(max_task_retries=-1).remote() for a in self.actors])

    def kill(self) -> None:
        """Stop every actor and wait until it is dead (a resumed run reuses their names)."""
        for actor in self.actors:
            ray.kill(actor)
        for actor in self.actors:
            try:
                ray.get(actor.ready.options(max_task_retries=0).remote(), timeout=30)  # no retry, no warning
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
