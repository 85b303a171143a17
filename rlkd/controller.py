"""The single controller: one training step, read top to bottom in `step`.

    take the step's inputs (prompts -> plan -> sequences -> teacher scores submitted) -> (submit the next
    step's inputs) -> load -> K critic updates -> student update(s) -> weight sync -> (validation)

A step's inputs are an `Inputs` future: `submit_inputs` draws the prompts and the method's plan and
submits the rollouts and teacher generations; `collect_inputs` waits for what is ready and submits the
teacher scoring of every batch as soon as it exists. With rollout.max_staleness = 1 the same two functions
make the next step's inputs: submitted once this step's sequences exist, collected (and scored) while the
learners update this step. Step t+1 then trains on samples one student update old (metric
rollout/version_lag), and the sync check runs only on batches sampled with the learners' current weights.

It holds groups, not actors: `ActorGroup`s of teacher and rollout actors (rlkd.cluster) and a
LearnerGroup-like object, so it never imports actors/ or learners/, and tests can hand it fakes.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import ray

from rlkd import teacher_routing as routing
from rlkd.algorithms import Method
from rlkd.batch import SequenceBatch, shard_named
from rlkd.data import PromptSampler, TokenizedExample
from rlkd.objectives import sft_objective
from rlkd.schedules import GOLD, MIXED, REPLAY, ROLLOUT, TEACHER_GEN


@dataclass(frozen=True)
class StepSettings:
    batch_size: int  # global prompts per step
    max_new_tokens: int
    temperature: float
    top_p: float
    sync_every: int
    sync_check_tol: float
    pad_id: int
    seed: int
    vocab_size: int = 0  # for teacher-mixed sampling
    max_staleness: int = 0  # 1: generate step t+1 during step t's updates


@dataclass
class Inputs:
    """One step's inputs, in flight: its prompts and plan, the calls submitted for them, and what has come
    back. `submit_inputs` makes it; `collect_inputs` advances it (as often as called; it never repeats work)."""
    step: int
    rows: list[TokenizedExample]
    plan: dict[str, str]  # batch name -> source (rlkd.schedules)
    state: dict  # the controller's state before these rows were drawn: a checkpoint taken now replays them
    schedule_metrics: dict  # the schedule's metrics before this plan (planning changes them)
    policy_version: int  # student updates in the weights the rollout actors held at submission
    pending: dict = field(default_factory=dict)  # batch name -> rlkd.cluster.Pending rollout
    teacher_gen: tuple | None = None  # (rows, Pending) of the teacher generations not in the cache
    rollouts: dict = field(default_factory=dict)  # batch name -> Rollout, once collected
    ready: dict = field(default_factory=dict)  # batch name -> SequenceBatch (gold, teacher-generated, rollout)
    scores: dict = field(default_factory=dict)  # batch name -> score ObjectRefs per learner shard
    teacher_stats: list = field(default_factory=list)  # a teacher per row: per-teacher stats ObjectRefs


@dataclass
class Rollout:
    """One rollout call's outputs, the student updates in the weights that sampled them, and the actors' time."""
    out: dict
    policy_version: int
    seconds: float


@contextmanager
def _untimed(name: str):
    yield


class Controller:
    def __init__(self, method: Method, settings: StepSettings, sampler: PromptSampler, learners, rollouts=None,
                 teachers=None, teacher_cache: dict | None = None, val_rows: list[TokenizedExample] = (),
                 row_teachers: dict | None = None):
        self.method, self.s, self.sampler = method, settings, sampler
        self.learners, self.rollouts, self.teachers = learners, rollouts, teachers  # ActorGroup | None
        # a teacher per row (model.teachers): name -> ActorGroup, '' the default teacher; empty: one teacher
        self.row_teachers = {routing.DEFAULT: teachers, **row_teachers} if row_teachers else {}
        # uid -> teacher-generated response (AMMD off-policy data, SeqKD, GKD seq_kd); launch persists it
        self.teacher_cache: dict = {} if teacher_cache is None else teacher_cache
        self.val_rows = list(val_rows)
        self.synced = True  # rollout actors start from the learners' initial weights
        self.timings: dict[str, float] = {}
        self.generated_tokens = 0  # student tokens sampled this step (fresh rollouts, replayed or not)
        self.policy_version = 0  # student updates so far
        self.actor_version = 0  # student updates in the weights the rollout actors hold
        self.lags: list[int] = []  # this step's rollout batches: student updates between sampling and training
        self.ahead: Inputs | None = None  # the next step's inputs, in flight (rollout.max_staleness = 1)

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        yield
        self.timings[f"timing/{name}"] = self.timings.get(f"timing/{name}", 0.0) + time.perf_counter() - t0

    # ---- one step -----------------------------------------------------------------------------

    def step(self, step: int) -> dict[str, float]:
        """Run training step `step` (1-based); returns its metrics, including timing/<phase>."""
        m, metrics, self.timings, self.generated_tokens, self.lags = self.method, {}, {}, 0, []
        t_start = time.perf_counter()
        inputs, self.ahead = self.ahead, None
        if inputs is None or inputs.step != step:
            inputs = self.submit_inputs(step)
        self.collect_inputs(inputs)
        batches = m.schedule.settle(self._training_batches(inputs), len(inputs.rows), self.s.pad_id)
        if self.s.max_staleness > 0 and self.rollouts:
            self.ahead = self.submit_inputs(step + 1, ahead=True)  # generated while this step trains
        shards = shard_named(batches, self.learners.size)
        n_tokens = {name: float(b.num_tokens()) for name, b in batches.items()}
        with self.phase("score"):
            self.learners.load_batch(shards, self.score(batches, inputs.scores), n_tokens, m.snapshot_old_logp)
        # sync check: fresh rollout log-probs must equal the learner's (replayed or stale batches carry none)
        check = self.synced and not any(self.lags) and any(b.rollout_logprobs is not None for b in batches.values())
        if m.critic_objective is not None:
            metrics.update(self.critic_updates(check))
            check = False
        if m.critic_objective is None or step > m.critic_warmup_steps:  # warm-up: only the critic trains
            metrics.update(self.policy_updates(check))
            if self.rollouts and step % self.s.sync_every == 0:
                self.sync()
        if m.validate_every and step % m.validate_every == 0:
            metrics["val/ce"] = self.validation_ce()
            m.schedule.on_validation(metrics["val/ce"])
        metrics.update(self.ahead.schedule_metrics if self.ahead else m.schedule.metrics())
        if inputs.teacher_stats:  # tiny dicts: the scores themselves never pass through the driver
            metrics.update(routing.metrics(ray.get(inputs.teacher_stats)))
        if self.lags:
            metrics["rollout/version_lag"] = float(max(self.lags))
        if self.s.max_staleness > 0:
            ahead = self.ahead
            metrics["rollout/queue_depth"] = float(ahead is not None and len(ahead.pending) + len(ahead.rollouts))
        return self._finish(step, metrics, n_tokens, t_start)

    # ---- a step's inputs: submitted, then collected (this step's, or the next one's ahead) ----------

    def submit_inputs(self, step: int, ahead: bool = False) -> Inputs:
        """Draw step `step`'s prompts and plan, and submit its rollouts, then the teacher generations it needs
        (so the rollout actors generate while the teacher samples), without waiting. `ahead`: drawn before
        the current step ends, so keep the state a checkpoint taken now must replay from."""
        state = self.state_dict() if ahead else {}
        schedule_metrics = self.method.schedule.metrics() if ahead else {}
        rows, plan = self.sampler.next(self.s.batch_size), self.method.schedule.plan(step)
        inp = Inputs(step, rows, plan, state, schedule_metrics, self.actor_version)
        inp.pending = {name: self._submit_rollout(rows, step, source == MIXED) for name, source in plan.items()
                       if source in (ROLLOUT, MIXED)}
        if TEACHER_GEN in plan.values():
            inp.teacher_gen = self._submit_teacher_gen(rows, step)
        return inp

    def collect_inputs(self, inp: Inputs, timed: bool = True) -> None:
        """Make every batch of `inp` that can be made, the ready sources first (REPLAY batches come from the
        schedule's buffer in `settle`), and submit each one's teacher scoring as soon as it exists. Work done
        by an earlier call is not repeated. timed=False: the caller times the whole call."""
        phase = self.phase if timed else _untimed
        prompts = [r.prompt_ids for r in inp.rows]
        for name, source in sorted(inp.plan.items(), key=lambda kv: kv[1] in (ROLLOUT, MIXED)):
            if name in inp.ready or source == REPLAY:
                continue
            if source == GOLD:
                inp.ready[name] = self._gold(inp.rows)
            elif source == TEACHER_GEN:
                if inp.teacher_gen is not None:  # timed only when the teacher actually samples
                    with phase("teacher_gen"):
                        self._cache_teacher_gen(*inp.teacher_gen)
                    inp.teacher_gen = None
                responses = [self.teacher_cache[r.uid] for r in inp.rows]
                inp.ready[name] = SequenceBatch.collate(prompts, responses, self.s.pad_id)
            elif source in (ROLLOUT, MIXED):
                with phase("rollout"):  # the driver's wait for the rollout actors
                    inp.rollouts[name] = self._gather_rollout(inp.pending.pop(name), inp.policy_version)
                inp.ready[name] = SequenceBatch.collate(prompts, inp.rollouts[name].out["responses"], self.s.pad_id)
            else:
                raise ValueError(f"unknown data source {source!r}")
            if self.method.needs_teacher_scores and self.method.schedule.keeps(name):
                inp.scores[name] = self._submit_scores(name, inp.ready[name], inp)  # the teacher starts on it now

    def _training_batches(self, inp: Inputs) -> dict[str, SequenceBatch]:
        """The collected batches in plan order; rollouts carry their log-probs and, if stale, the lag
        correction (known only now, at training time)."""
        out = {}
        for name in inp.plan:
            if name in inp.rollouts:
                self.timings.setdefault("timing/rollout", 0.0)  # collected while the last step trained
                out[name] = self._rollout_batch(inp.rows, inp.rollouts[name])
            elif name in inp.ready:
                out[name] = inp.ready[name]
        return out

    def _submit_rollout(self, rows: list[TokenizedExample], step: int, mixed: bool):
        prompts, s = [r.prompt_ids for r in rows], self.s
        temperature = self.method.rollout_temperature or s.temperature
        seed = s.seed + 1_000_003 * step
        if mixed:
            return self.rollouts.submit("generate_mixed", prompts, seed, max_new_tokens=s.max_new_tokens,
                                        alpha=self.method.mix_alpha, vocab_size=s.vocab_size, temperature=temperature)
        return self.rollouts.submit("generate", prompts, seed, max_new_tokens=s.max_new_tokens,
                                    temperature=temperature, top_p=s.top_p)

    def _gather_rollout(self, pending, policy_version: int) -> Rollout:
        """Wait for a submitted rollout call; `policy_version`: the student updates in the weights it was
        submitted with."""
        sent = pending.version
        out = self.rollouts.collect(pending)
        if pending.version != sent:  # recovered and regenerated with the current weights
            policy_version = self.actor_version
        return Rollout(out, policy_version, self.rollouts.seconds)

    def _rollout_batch(self, rows: list[TokenizedExample], got: Rollout) -> SequenceBatch:
        """A rollout as this step's batch. A stale one (sampled before the student's last update) carries
        its sampling log-probs as behaviour log-probs too: the PPO ratio and AMMD's policy gradient then
        correct for the lag (docs/algorithms.md#staleness)."""
        out, lag = got.out, self.policy_version - got.policy_version
        self.lags.append(lag)
        self.timings["timing/rollout_actor"] = got.seconds
        self.generated_tokens += sum(len(r) for r in out["responses"])
        behavior = out.get("behavior_logprobs") or (out["logprobs"] if lag > 0 else None)
        return SequenceBatch.collate([r.prompt_ids for r in rows], out["responses"], self.s.pad_id, out["logprobs"],
                                     behavior)

    def _gold(self, rows: list[TokenizedExample]) -> SequenceBatch:
        return SequenceBatch.collate([r.prompt_ids for r in rows], [r.response_ids for r in rows], self.s.pad_id)

    def _submit_teacher_gen(self, rows: list[TokenizedExample], step: int) -> tuple | None:
        """(the rows not in the cache, the Pending teacher generation of them), or None if all are cached."""
        todo = [r for r in rows if r.uid not in self.teacher_cache]
        if not todo:
            return None
        seed, kw = self.s.seed + 7 * step + 1, {"max_new_tokens": self.s.max_new_tokens,
                                                "temperature": self.s.temperature}
        if self.row_teachers:  # each row answered by its own teacher
            return (routing.submit_generations(self.row_teachers, todo, seed, **kw),)
        return todo, self.teachers.submit("generate", [r.prompt_ids for r in todo], seed, **kw)

    def _cache_teacher_gen(self, todo, pending=None) -> None:
        """Collect teacher generations into the cache: `todo` rows and their Pending call, or, with a teacher
        per row, `todo` alone, a list of (rows of one teacher, its Pending call)."""
        for rows, call in ([(todo, pending)] if pending is not None else todo):
            group = self.teachers if pending is not None else self.row_teachers[rows[0].teacher or routing.DEFAULT]
            out = group.collect(call)
            self.teacher_cache.update({r.uid: resp for r, resp in zip(rows, out["responses"])})

    def _submit_scores(self, name: str, batch: SequenceBatch, inp: Inputs | None = None) -> list:
        """Score ObjectRefs of batch `name`, one per learner shard, submitted without waiting. With a teacher
        per row, each row goes to its teacher (the batch's rows are `inp.rows`, in order)."""
        hidden = self.method.critic_input == "teacher" and name in self.method.critic_heads
        if self.row_teachers:
            if inp is None:
                raise RuntimeError(f"batch {name!r} has no rows to route to their teachers")
            refs, stats = routing.submit_scores(self.row_teachers, batch, [r.teacher for r in inp.rows],
                                                self.learners.size, hidden)
            inp.teacher_stats += stats
            return refs
        return self.teachers.spread("score", [(shard, hidden) for shard in batch.shard(self.learners.size)],
                                    wait=False)

    def score(self, batches: dict[str, SequenceBatch], submitted: dict[str, list]) -> list[dict]:
        """Teacher scores per learner shard, as ObjectRefs that go straight to the learners. Batches whose
        scoring `collect_inputs` already submitted are not scored again."""
        n = self.learners.size
        if not self.method.needs_teacher_scores:
            return [{} for _ in range(n)]
        refs = {name: submitted.get(name) or self._submit_scores(name, b) for name, b in batches.items()}
        self.teachers.wait([r for shard_refs in refs.values() for r in shard_refs])
        return [{name: refs[name][i] for name in batches} for i in range(n)]

    def critic_updates(self, check_sync: bool) -> dict[str, float]:
        """K critic (moment estimator) updates on the loaded batch; the student does not move."""
        metrics = {}
        with self.phase("critic"):
            for k in range(self.method.critic_steps):
                metrics.update(self.learners.train(self.method.critic_objective, "critic", check_sync and k == 0))
        return metrics

    def policy_updates(self, check_sync: bool) -> dict[str, float]:
        """The student's update(s); PPO runs several epochs and reports the first (pre-update) one."""
        m, epochs = self.method, []
        for e in range(m.policy_epochs):
            refs = self.learners.submit_train(m.policy_objective, m.train_targets, check_sync and e == 0, e == 0)
            if e == 0 and self.ahead is not None:
                with self.phase("prefetch"):  # the driver's wait for the next rollouts; the learners update
                    self.collect_inputs(self.ahead, timed=False)
            with self.phase("policy"):  # the rest of the update
                epochs.append(self.learners.result(refs))
        self.synced = False
        self.policy_version += 1
        metrics = dict(epochs[0])
        if len(epochs) > 1:
            metrics.update({f"{k}_last_epoch": v for k, v in epochs[-1].items() if k.startswith("loss/")})
        return metrics

    def sync(self) -> None:
        """Load the learners' student into the rollout actors."""
        with self.phase("sync"):
            self.rollouts.update_weights()
        self.synced, self.actor_version = True, self.policy_version
        self.timings["sync/bytes"] = float(self.rollouts.sync_bytes)

    def sync_now(self) -> None:
        """Bring the rollout actors up to the learners' weights (before a checkpoint, after a resume)."""
        if self.rollouts and not self.synced:
            self.sync()

    def validation_ce(self) -> float:
        """Token-mean CE of the gold validation responses under the current student (learner slot 'val',
        so the step's own batch stays loaded)."""
        n = self.learners.size
        rows = self.val_rows[:len(self.val_rows) // n * n]
        val = SequenceBatch.collate([r.prompt_ids for r in rows], [r.response_ids for r in rows], self.s.pad_id)
        with self.phase("validate"):
            self.learners.load_batch(shard_named({"train": val}, n), [{} for _ in range(n)],
                                     {"train": float(val.num_tokens())}, slot="val")
            return self.learners.evaluate(sft_objective, slot="val")["loss/sft"]

    # ---- checkpoint state ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Data position and sampler RNG, and the schedule's RNGs and replay buffers (JSON-able); as they
        were before the next step's inputs were drawn ahead, so a resumed run draws that step again."""
        if self.ahead is not None:
            return self.ahead.state
        return {"sampler": self.sampler.state_dict(), "schedule": self.method.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.ahead = None
        self.sampler.load_state_dict(state["sampler"])
        self.method.schedule.load_state_dict(state["schedule"])
        self.synced = False  # the learners were restored from the checkpoint; the rollout actors were not

    def _finish(self, step: int, metrics: dict, n_tokens: dict, t_start: float) -> dict:
        self._check_sync(metrics, step)
        elapsed = time.perf_counter() - t_start
        trained = sum(n_tokens.values())
        metrics.update(self.timings)
        metrics.update({"step": step, "timing/step": elapsed, "tokens/trained": trained,
                        "tokens/generated": float(self.generated_tokens),
                        "throughput/tokens_per_s": trained / elapsed, "data/position": self.sampler.position,
                        "actors/restarts": float(sum(g.restarts for g in (self.rollouts, self.teachers) if g))})
        if self.timings.get("timing/rollout_actor"):  # the rollout engine's own speed (its time, not the wait)
            metrics["throughput/rollout_tokens_per_s"] = self.generated_tokens / self.timings["timing/rollout_actor"]
        return metrics

    def _check_sync(self, metrics: dict, step: int) -> None:
        """Fail loudly if the rollout engine does not hold the learner's weights."""
        for key, gap in metrics.items():
            if key.startswith("sync/logprob_gap") and gap > self.s.sync_check_tol:
                raise RuntimeError(f"step {step}: weight sync check failed: {key}={gap:.4f} > "
                                   f"rollout.sync_check_tol={self.s.sync_check_tol} (the rollout engine's "
                                   "log-probs do not match the learner's)")
