"""The single controller: one training step, read top to bottom.

    prompts -> the method's schedule picks the sequences (gold / cached teacher generations /
    student rollouts / teacher-mixed rollouts) -> teacher scoring -> K critic updates
    -> student update(s) -> weight sync -> (validation)

It only holds handles (duck-typed: lists of actor handles with `.remote` methods, and a
LearnerGroup-like object), so it never imports actors/ or learners/.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import ray

from rlkd.algorithms import Method
from rlkd.batch import SequenceBatch, shard_named
from rlkd.data import PromptSampler, TokenizedExample
from rlkd.objectives import sft_objective
from rlkd.schedules import GOLD, MIXED, ROLLOUT, TEACHER_GEN


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
    max_retries: int = 3  # generation calls retried after an actor restart


class Controller:
    def __init__(self, method: Method, settings: StepSettings, sampler: PromptSampler, learners,
                 rollout_actors: list, teacher_actors: list, teacher_cache: dict | None = None,
                 val_rows: list[TokenizedExample] = ()):
        self.method, self.s, self.sampler = method, settings, sampler
        self.learners, self.rollouts, self.teachers = learners, rollout_actors, teacher_actors
        # uid -> teacher-generated response (AMMD off-policy data, SeqKD, GKD seq_kd); launch persists it
        self.teacher_cache: dict = {} if teacher_cache is None else teacher_cache
        self.val_rows = list(val_rows)
        self.synced = True  # rollout actors start from the learners' initial weights
        self.timings: dict[str, float] = {}
        self.generated_tokens = 0  # student tokens sampled this step (fresh rollouts, replayed or not)
        self.version = 0  # weights version the rollout actors should hold (0 = the initial student)
        self.restarts = 0  # actor failures recovered from (metric actors/restarts)

    @property
    def pad_id(self) -> int:
        return self.s.pad_id

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        yield
        self.timings[f"timing/{name}"] = self.timings.get(f"timing/{name}", 0.0) + time.perf_counter() - t0

    def get(self, source: str, rows: list[TokenizedExample], step: int) -> SequenceBatch:
        """The schedule's data sources (rlkd.schedules.Sources)."""
        if source == GOLD:
            return SequenceBatch.collate([r.prompt_ids for r in rows], [r.response_ids for r in rows], self.pad_id)
        if source == TEACHER_GEN:
            return self._teacher_generated(rows, step)
        if source in (ROLLOUT, MIXED):
            with self.phase("rollout"):
                return self._rollout(rows, step, mixed=source == MIXED)
        raise ValueError(f"unknown data source {source!r}")

    # ---- phases -------------------------------------------------------------------------------

    def _generate(self, actors: list, prompts: list[list[int]], seed: int, temperature: float,
                  mix_alpha: float = 0.0) -> dict:
        """Split prompts over actors, generate in parallel, concatenate in order.

        A rollout actor that died is restarted by Ray (run.max_actor_restarts) with its initial
        weights; the call is then retried after a weight sync, so no step trains on stale samples.
        """
        n, s = len(actors), self.s
        chunks = [prompts[i * len(prompts) // n:(i + 1) * len(prompts) // n] for i in range(n)]
        for attempt in range(s.max_retries + 1):
            calls = [a.generate_mixed.remote(c, s.max_new_tokens, mix_alpha, s.vocab_size, temperature,
                                             seed + i * 7919)
                     if mix_alpha else a.generate.remote(c, s.max_new_tokens, temperature, s.top_p, seed + i * 7919)
                     for i, (a, c) in enumerate(zip(actors, chunks)) if c]
            try:
                outs = ray.get(calls)
            except ray.exceptions.RayActorError as e:
                if attempt == s.max_retries:
                    raise
                self._recover(actors, f"an actor died ({type(e).__name__})")
                continue
            stale = actors is self.rollouts and any(o.get("version", self.version) != self.version for o in outs)
            if not stale:
                return {k: [x for o in outs for x in o[k]] for k in outs[0] if k not in ("seconds", "version")}
            self._recover(actors, "a restarted rollout actor generated with its initial weights")
        raise RuntimeError(f"generation failed {s.max_retries + 1} times in a row (see the log above)")

    def _recover(self, actors: list, why: str) -> None:
        """Wait until Ray has restarted the actors (raises once restarts are exhausted), then resync."""
        self.restarts += 1
        print(f"rlkd: warning: {why}; waiting for the restart and retrying the call", flush=True)
        ray.get([a.ready.remote() for a in actors])
        if actors is self.rollouts:
            self._sync()

    def _rollout(self, rows: list[TokenizedExample], step: int, mixed: bool = False) -> SequenceBatch:
        prompts = [r.prompt_ids for r in rows]
        temperature = self.method.rollout_temperature or self.s.temperature
        out = self._generate(self.rollouts, prompts, self.s.seed + 1_000_003 * step, temperature,
                             self.method.mix_alpha if mixed else 0.0)
        self.generated_tokens += sum(len(r) for r in out["responses"])
        return SequenceBatch.collate(prompts, out["responses"], self.s.pad_id, out["logprobs"],
                                     out.get("behavior_logprobs"))

    def _teacher_generated(self, rows: list[TokenizedExample], step: int) -> SequenceBatch:
        """Teacher responses, sampled once per prompt and cached (docs/algorithms.md#conventions)."""
        todo = [r for r in rows if r.uid not in self.teacher_cache]
        if todo:  # timed only when the teacher actually samples (cache hits cost nothing)
            with self.phase("teacher_gen"):
                out = self._generate(self.teachers, [r.prompt_ids for r in todo], self.s.seed + 7 * step + 1,
                                     self.s.temperature)
            self.teacher_cache.update({r.uid: resp for r, resp in zip(todo, out["responses"])})
        return SequenceBatch.collate([r.prompt_ids for r in rows], [self.teacher_cache[r.uid] for r in rows],
                                     self.s.pad_id)

    def _score(self, shards: list[dict[str, SequenceBatch]]) -> list[dict]:
        """Teacher scores per learner shard, as ObjectRefs that go straight to the learners."""
        if not self.method.needs_teacher_scores:
            return [{} for _ in shards]
        refs, i = [], 0
        hidden = self.method.critic_input == "teacher"
        for shard in shards:
            row = {}
            for name, batch in shard.items():
                row[name] = self.teachers[i % len(self.teachers)].score.remote(
                    batch, hidden and name in self.method.critic_heads)
                i += 1
            refs.append(row)
        ray.wait([r for row in refs for r in row.values()], num_returns=i)
        return refs

    def _sync(self) -> None:
        ref = self.learners.student_weights_ref()
        self.version += 1
        ray.get([a.update_weights.remote(ref, self.version) for a in self.rollouts])
        self.synced = True

    def sync_now(self) -> None:
        """Bring the rollout actors up to the learners' weights (before a checkpoint, after a resume)."""
        if self.rollouts and not self.synced:
            self._sync()

    # ---- checkpoint state ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Data position and sampler RNG, and the schedule's RNGs and replay buffers (JSON-able)."""
        return {"sampler": self.sampler.state_dict(), "schedule": self.method.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.method.schedule.load_state_dict(state["schedule"])
        self.synced = False  # the learners were restored from the checkpoint; the rollout actors were not

    # ---- one step -----------------------------------------------------------------------------

    def step(self, step: int) -> dict[str, float]:
        """Run training step `step` (1-based); returns its metrics, including timing/<phase>."""
        m, metrics, self.timings, self.generated_tokens = self.method, {}, {}, 0
        t_start = time.perf_counter()
        rows = self.sampler.next(self.s.batch_size)
        batches = m.schedule.batches(step, rows, self)
        shards = shard_named(batches, self.learners.size)
        n_tokens = {name: float(b.num_tokens()) for name, b in batches.items()}
        with self.phase("score"):
            self.learners.load_batch(shards, self._score(shards), n_tokens, m.snapshot_old_logp)
        # sync check: fresh rollout log-probs must equal the learner's (replayed batches carry none)
        check = self.synced and any(b.rollout_logprobs is not None for b in batches.values())
        if m.critic_objective is not None:
            with self.phase("critic"):
                for k in range(m.critic_steps):
                    metrics.update(self.learners.train(m.critic_objective, "critic", check and k == 0))
            check = False
        if m.critic_objective is None or step > m.critic_warmup_steps:  # warm-up: only the critic trains
            with self.phase("policy"):  # PPO: several epochs on the batch; report the first (pre-update) one
                epochs = [self.learners.train(m.policy_objective, m.train_targets, check and e == 0,
                                              collapse=e == 0)
                          for e in range(m.policy_epochs)]
            metrics.update(epochs[0])
            if len(epochs) > 1:
                metrics.update({f"{k}_last_epoch": v for k, v in epochs[-1].items() if k.startswith("loss/")})
            self.synced = False
            if self.rollouts and step % self.s.sync_every == 0:
                with self.phase("sync"):
                    self._sync()
        if m.validate_every and step % m.validate_every == 0:
            with self.phase("validate"):
                metrics["val/ce"] = self.validation_ce()
            m.schedule.on_validation(metrics["val/ce"])
        metrics.update(m.schedule.metrics())
        return self._finish(step, metrics, n_tokens, t_start)

    def validation_ce(self) -> float:
        """Token-mean CE of the gold validation responses under the current student."""
        n = self.learners.size
        rows = self.val_rows[:len(self.val_rows) // n * n]
        val = SequenceBatch.collate([r.prompt_ids for r in rows], [r.response_ids for r in rows], self.pad_id)
        self.learners.load_batch(shard_named({"train": val}, n), [{} for _ in range(n)],
                                 {"train": float(val.num_tokens())})
        return self.learners.evaluate(sft_objective)["loss/sft"]

    def _finish(self, step: int, metrics: dict, n_tokens: dict, t_start: float) -> dict:
        self._check_sync(metrics, step)
        elapsed = time.perf_counter() - t_start
        trained = sum(n_tokens.values())
        metrics.update(self.timings)
        metrics.update({"step": step, "timing/step": elapsed, "tokens/trained": trained,
                        "tokens/generated": float(self.generated_tokens),
                        "throughput/tokens_per_s": trained / elapsed, "data/position": self.sampler.position,
                        "actors/restarts": float(self.restarts)})
        if "timing/rollout" in self.timings:
            metrics["throughput/rollout_tokens_per_s"] = self.generated_tokens / self.timings["timing/rollout"]
        return metrics

    def _check_sync(self, metrics: dict, step: int) -> None:
        """Fail loudly if the rollout engine does not hold the learner's weights."""
        for key, gap in metrics.items():
            if key.startswith("sync/logprob_gap") and gap > self.s.sync_check_tol:
                raise RuntimeError(f"step {step}: weight sync check failed: {key}={gap:.4f} > "
                                   f"rollout.sync_check_tol={self.s.sync_check_tol} (the rollout engine's "
                                   "log-probs do not match the learner's)")
