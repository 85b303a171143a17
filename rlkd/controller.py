"""The single controller: one training step, read top to bottom in `step`.

    prompts -> plan (the method's schedule names each batch's source) -> produce the sequences (gold /
    cached teacher generations / student rollouts / teacher-mixed rollouts) -> settle (replay buffers)
    -> teacher scores -> K critic updates -> student update(s) -> weight sync -> (validation)

With rollout.max_staleness = 1, the next step's prompts, plan and rollouts are submitted as soon as this
step's sequences exist, so the rollout actors generate step t+1 while the teacher scores and the learners
update step t; once the student update is submitted, the driver collects those rollouts and starts their
teacher scoring too (`score_prefetched`). Step t+1 then trains on samples one student update old (metric
rollout/version_lag), and the sync check runs only on batches sampled with the learners' current weights.

It holds groups, not actors: `ActorGroup`s of teacher and rollout actors (rlkd.cluster) and a
LearnerGroup-like object, so it never imports actors/ or learners/, and tests can hand it fakes.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

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
class Prefetch:
    """Step `step`'s prompts and plan, drawn early, and its rollouts, submitted to the rollout actors."""
    step: int
    rows: list[TokenizedExample]
    plan: dict[str, str]
    pending: dict  # batch name -> rlkd.cluster.Pending
    state: dict  # the controller's state before these rows were drawn: a checkpoint taken now replays them
    policy_version: int  # student updates in the weights the rollout actors held at submission
    schedule_metrics: dict  # the schedule's metrics of the step before (planning this step changes them)
    teacher_gen: tuple | None = None  # (rows, Pending) of the teacher generations it needs, if not cached
    collected: dict = field(default_factory=dict)  # batch name -> Rollout, once score_prefetched has it
    scores: dict = field(default_factory=dict)  # batch name -> its score ObjectRefs, submitted early


@dataclass
class Rollout:
    """One rollout call's outputs, the student updates in the weights that sampled them, and the actors' time."""
    out: dict
    policy_version: int
    seconds: float


class Controller:
    def __init__(self, method: Method, settings: StepSettings, sampler: PromptSampler, learners, rollouts=None,
                 teachers=None, teacher_cache: dict | None = None, val_rows: list[TokenizedExample] = ()):
        self.method, self.s, self.sampler = method, settings, sampler
        self.learners, self.rollouts, self.teachers = learners, rollouts, teachers  # ActorGroup | None
        # uid -> teacher-generated response (AMMD off-policy data, SeqKD, GKD seq_kd); launch persists it
        self.teacher_cache: dict = {} if teacher_cache is None else teacher_cache
        self.val_rows = list(val_rows)
        self.synced = True  # rollout actors start from the learners' initial weights
        self.timings: dict[str, float] = {}
        self.generated_tokens = 0  # student tokens sampled this step (fresh rollouts, replayed or not)
        self.policy_version = 0  # student updates so far
        self.actor_version = 0  # student updates in the weights the rollout actors hold
        self.lags: list[int] = []  # this step's rollout batches: student updates between sampling and training
        self.prefetched: Prefetch | None = None
        self.early: dict[str, list] = {}  # batch name -> score ObjectRefs per learner shard, submitted in produce

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        yield
        self.timings[f"timing/{name}"] = self.timings.get(f"timing/{name}", 0.0) + time.perf_counter() - t0

    # ---- one step -----------------------------------------------------------------------------

    def step(self, step: int) -> dict[str, float]:
        """Run training step `step` (1-based); returns its metrics, including timing/<phase>."""
        m, metrics, self.timings, self.generated_tokens, self.lags, self.early = self.method, {}, {}, 0, [], {}
        t_start = time.perf_counter()
        pre, self.prefetched = self.prefetched, None
        if pre is not None and pre.step == step:
            rows, plan = pre.rows, pre.plan
        else:
            pre, rows, plan = None, self.sampler.next(self.s.batch_size), m.schedule.plan(step)
        batches = m.schedule.settle(self.produce(plan, rows, step, pre), len(rows), self.s.pad_id)
        if self.s.max_staleness > 0 and self.rollouts:
            self.prefetch(step + 1)  # the rollout actors generate step + 1 while this step is scored and trained
        shards = shard_named(batches, self.learners.size)
        n_tokens = {name: float(b.num_tokens()) for name, b in batches.items()}
        with self.phase("score"):
            self.learners.load_batch(shards, self.score(batches), n_tokens, m.snapshot_old_logp)
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
        metrics.update(self.prefetched.schedule_metrics if self.prefetched else m.schedule.metrics())
        if self.lags:
            metrics["rollout/version_lag"] = float(max(self.lags))
        if self.s.max_staleness > 0:
            ahead = self.prefetched  # step + 1, prefetched during this step
            metrics["rollout/queue_depth"] = float(ahead is not None and len(ahead.pending) + len(ahead.collected))
        return self._finish(step, metrics, n_tokens, t_start)

    def prefetch(self, step: int) -> None:
        """Draw step `step`'s prompts and plan now, and submit its rollouts and any teacher samples it needs
        without waiting for them."""
        state, schedule_metrics = self.state_dict(), self.method.schedule.metrics()
        rows, plan = self.sampler.next(self.s.batch_size), self.method.schedule.plan(step)
        pending = {name: self._submit_rollout(rows, step, source == MIXED) for name, source in plan.items()
                   if source in (ROLLOUT, MIXED)}
        teacher_gen = self._submit_teacher_gen(rows, step) if TEACHER_GEN in plan.values() else None
        self.prefetched = Prefetch(step, rows, plan, pending, state, self.actor_version, schedule_metrics, teacher_gen)

    def score_prefetched(self) -> None:
        """Collect the prefetched step's rollouts and teacher samples and submit the scoring of every batch
        that needs no replay buffer, while the learners update: step t+1 then starts with its scores on the way."""
        pre, prompts = self.prefetched, [r.prompt_ids for r in self.prefetched.rows]
        ready = {}
        for name in list(pre.pending):
            pre.collected[name] = self._gather_rollout(pre.pending.pop(name), pre.policy_version)
            ready[name] = SequenceBatch.collate(prompts, pre.collected[name].out["responses"], self.s.pad_id)
        if pre.teacher_gen is not None:
            self._cache_teacher_gen(*pre.teacher_gen)
            pre.teacher_gen = None
        for name, source in pre.plan.items():  # the batches that need no rollout are ready too
            if source == GOLD:
                ready[name] = self._gold(pre.rows)
            elif source == TEACHER_GEN:
                ready[name] = self._teacher_generated(pre.rows, pre.step)
        for name, batch in ready.items():
            if self.method.needs_teacher_scores and self.method.schedule.keeps(name):
                pre.scores[name] = self._submit_scores(name, batch)

    # ---- phases -------------------------------------------------------------------------------

    def produce(self, plan: dict[str, str], rows: list[TokenizedExample], step: int, pre: Prefetch | None = None
                ) -> dict[str, SequenceBatch]:
        """The planned sequences for the step's prompts (REPLAY batches come from the schedule's buffer).
        Rollouts are submitted first (unless `prefetch` already did), so the rollout actors generate while
        the teacher actors sample teacher generations."""
        pending = dict(pre.pending) if pre is not None else {}
        version = {name: pre.policy_version for name in pending}
        collected = pre.collected if pre is not None else {}  # Rollouts score_prefetched already waited for
        self.early = dict(pre.scores) if pre is not None else {}
        for name, source in plan.items():
            if source in (ROLLOUT, MIXED) and name not in pending and name not in collected:
                pending[name], version[name] = self._submit_rollout(rows, step, source == MIXED), self.actor_version
        out = {}
        for name, source in sorted(plan.items(), key=lambda kv: kv[1] in (ROLLOUT, MIXED)):  # ready ones first
            if source == GOLD:
                out[name] = self._gold(rows)
            elif source == TEACHER_GEN:
                if pre is not None and pre.teacher_gen is not None:  # prefetched, not collected yet
                    with self.phase("teacher_gen"):
                        self._cache_teacher_gen(*pre.teacher_gen)
                    pre.teacher_gen = None
                out[name] = self._teacher_generated(rows, step)
            elif source in (ROLLOUT, MIXED):
                with self.phase("rollout"):  # the wait for the rollout actors (none if score_prefetched waited)
                    got = collected.get(name) or self._gather_rollout(pending[name], version[name])
                out[name] = self._rollout_batch(rows, got)
            elif source != REPLAY:
                raise ValueError(f"unknown data source {source!r}")
            if name in out and name not in self.early and self.method.needs_teacher_scores \
                    and self.method.schedule.keeps(name):
                self.early[name] = self._submit_scores(name, out[name])  # the teacher starts on it now
        return {name: out[name] for name in plan if name in out}

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

    def _teacher_generated(self, rows: list[TokenizedExample], step: int) -> SequenceBatch:
        """Teacher responses, sampled once per prompt and cached (docs/algorithms.md#conventions)."""
        submitted = self._submit_teacher_gen(rows, step)
        if submitted is not None:  # timed only when the teacher actually samples (cache hits cost nothing)
            with self.phase("teacher_gen"):
                self._cache_teacher_gen(*submitted)
        return SequenceBatch.collate([r.prompt_ids for r in rows], [self.teacher_cache[r.uid] for r in rows],
                                     self.s.pad_id)

    def _submit_teacher_gen(self, rows: list[TokenizedExample], step: int) -> tuple | None:
        """(the rows not in the cache, the Pending teacher generation of them), or None if all are cached."""
        todo = [r for r in rows if r.uid not in self.teacher_cache]
        if not todo:
            return None
        return todo, self.teachers.submit("generate", [r.prompt_ids for r in todo], self.s.seed + 7 * step + 1,
                                          max_new_tokens=self.s.max_new_tokens, temperature=self.s.temperature)

    def _cache_teacher_gen(self, todo: list[TokenizedExample], pending) -> None:
        out = self.teachers.collect(pending)
        self.teacher_cache.update({r.uid: resp for r, resp in zip(todo, out["responses"])})

    def _submit_scores(self, name: str, batch: SequenceBatch) -> list:
        """Score ObjectRefs of batch `name`, one per learner shard, submitted without waiting."""
        hidden = self.method.critic_input == "teacher" and name in self.method.critic_heads
        return self.teachers.spread("score", [(shard, hidden) for shard in batch.shard(self.learners.size)],
                                    wait=False)

    def score(self, batches: dict[str, SequenceBatch]) -> list[dict]:
        """Teacher scores per learner shard, as ObjectRefs that go straight to the learners. Batches that
        `produce` already submitted (self.early) are not scored again."""
        n = self.learners.size
        if not self.method.needs_teacher_scores:
            return [{} for _ in range(n)]
        for name, batch in batches.items():
            if name not in self.early:
                self.early[name] = self._submit_scores(name, batch)
        self.teachers.wait([r for refs in self.early.values() for r in refs])
        return [{name: self.early[name][i] for name in batches} for i in range(n)]

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
            if e == 0 and self.prefetched is not None:
                with self.phase("prefetch"):  # the driver's wait for the next rollouts; the learners update
                    self.score_prefetched()
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
        were before a prefetch, so a resumed run draws the prefetched step again."""
        if self.prefetched is not None:
            return self.prefetched.state
        return {"sampler": self.sampler.state_dict(), "schedule": self.method.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.prefetched = None
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
