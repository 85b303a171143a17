"""The single controller: one training step, read top to bottom.

    prompts -> rollout (student) / teacher generation -> teacher scoring -> K critic updates
            -> one student update -> weight sync

It only holds handles (duck-typed: lists of actor handles with `.remote` methods, and a
LearnerGroup-like object), so it never imports actors/ or learners/.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import ray

from rlkd.algorithms import GOLD, ROLLOUT, TEACHER_GEN, Method
from rlkd.batch import SequenceBatch, shard_named
from rlkd.data import PromptSampler, TokenizedExample


@dataclass(frozen=True)
class StepSettings:
    batch_size: int  # global prompts per step
    critic_steps: int  # K
    critic_warmup_steps: int  # first steps that train only the critic
    max_new_tokens: int
    temperature: float
    top_p: float
    sync_every: int
    sync_check_tol: float
    pad_id: int
    seed: int


class Controller:
    def __init__(self, method: Method, settings: StepSettings, sampler: PromptSampler, learners,
                 rollout_actors: list, teacher_actors: list):
        self.method, self.s, self.sampler = method, settings, sampler
        self.learners, self.rollouts, self.teachers = learners, rollout_actors, teacher_actors
        self.teacher_cache: dict[int, list[int]] = {}  # uid -> teacher-generated response (off-policy data)
        self.synced = True  # rollout actors start from the learners' initial weights

    # ---- phases -------------------------------------------------------------------------------

    def _generate(self, actors: list, prompts: list[list[int]], seed: int) -> dict:
        """Split prompts over actors, generate in parallel, concatenate in order."""
        n = len(actors)
        chunks = [prompts[i * len(prompts) // n:(i + 1) * len(prompts) // n] for i in range(n)]
        outs = ray.get([a.generate.remote(c, self.s.max_new_tokens, self.s.temperature, self.s.top_p, seed + i * 7919)
                        for i, (a, c) in enumerate(zip(actors, chunks)) if c])
        return {"responses": [r for o in outs for r in o["responses"]],
                "logprobs": [lp for o in outs for lp in o["logprobs"]]}

    def _rollout(self, rows: list[TokenizedExample], step: int) -> SequenceBatch:
        prompts = [r.prompt_ids for r in rows]
        out = self._generate(self.rollouts, prompts, self.s.seed + 1_000_003 * step)
        return SequenceBatch.collate(prompts, out["responses"], self.s.pad_id, out["logprobs"])

    def _teacher_generated(self, rows: list[TokenizedExample], step: int) -> SequenceBatch:
        """Teacher responses, sampled once per prompt and cached (ALGORITHMS.md §5.2)."""
        todo = [r for r in rows if r.uid not in self.teacher_cache]
        if todo:
            out = self._generate(self.teachers, [r.prompt_ids for r in todo], self.s.seed + 7 * step + 1)
            self.teacher_cache.update({r.uid: resp for r, resp in zip(todo, out["responses"])})
        return SequenceBatch.collate([r.prompt_ids for r in rows], [self.teacher_cache[r.uid] for r in rows],
                                     self.s.pad_id)

    def _score(self, shards: list[dict[str, SequenceBatch]]) -> list[dict]:
        """Teacher scores per learner shard, as ObjectRefs that go straight to the learners."""
        if not self.method.needs_teacher_scores:
            return [{} for _ in shards]
        refs, i = [], 0
        for shard in shards:
            row = {}
            for name, batch in shard.items():
                row[name] = self.teachers[i % len(self.teachers)].score.remote(batch)
                i += 1
            refs.append(row)
        ray.wait([r for row in refs for r in row.values()], num_returns=i)
        return refs

    def _sync(self) -> None:
        ref = self.learners.student_weights_ref()
        ray.get([a.update_weights.remote(ref) for a in self.rollouts])

    # ---- one step -----------------------------------------------------------------------------

    def step(self, step: int) -> dict[str, float]:
        """Run training step `step` (1-based); returns its metrics, including timing/<phase>."""
        timings, metrics = {}, {}

        @contextmanager
        def phase(name: str):
            t0 = time.perf_counter()
            yield
            timings[f"timing/{name}"] = timings.get(f"timing/{name}", 0.0) + time.perf_counter() - t0

        t_start = time.perf_counter()
        rows = self.sampler.next(self.s.batch_size)
        batches: dict[str, SequenceBatch] = {}
        for name, source in self.method.sources.items():
            if source == ROLLOUT:
                with phase("rollout"):
                    batches[name] = self._rollout(rows, step)
            elif source == TEACHER_GEN:
                with phase("teacher_gen"):
                    batches[name] = self._teacher_generated(rows, step)
            elif source == GOLD:
                batches[name] = SequenceBatch.collate([r.prompt_ids for r in rows], [r.response_ids for r in rows],
                                                      self.s.pad_id)
        shards = shard_named(batches, self.learners.size)
        n_tokens = {name: float(b.num_tokens()) for name, b in batches.items()}
        with phase("score"):
            teacher_refs = self._score(shards)
            self.learners.load_batch(shards, teacher_refs, n_tokens)
        check = self.synced and any(s == ROLLOUT for s in self.method.sources.values())
        if self.method.critic_objective is not None:
            with phase("critic"):
                for k in range(self.s.critic_steps):
                    metrics.update(self.learners.train(self.method.critic_objective, "critic", check and k == 0))
                    check = check and k > 0
        if self.method.critic_objective is not None and step <= self.s.critic_warmup_steps:
            return self._finish(step, metrics, timings, n_tokens, t_start)  # student frozen: nothing to sync
        with phase("policy"):
            metrics.update(self.learners.train(self.method.policy_objective, "student", check))
        self.synced = False
        if self.rollouts and step % self.s.sync_every == 0:
            with phase("sync"):
                self._sync()
            self.synced = True
        return self._finish(step, metrics, timings, n_tokens, t_start)

    def _finish(self, step: int, metrics: dict, timings: dict, n_tokens: dict, t_start: float) -> dict:
        self._check_sync(metrics, step)
        elapsed = time.perf_counter() - t_start
        trained = sum(n_tokens.values())
        metrics.update(timings)
        metrics.update({"step": step, "timing/step": elapsed, "tokens/trained": trained,
                        "throughput/tokens_per_s": trained / elapsed, "data/position": self.sampler.position})
        if "timing/rollout" in timings:
            metrics["throughput/rollout_tokens_per_s"] = n_tokens.get("on", 0.0) / timings["timing/rollout"]
        return metrics

    def _check_sync(self, metrics: dict, step: int) -> None:
        """Fail loudly if the rollout engine does not hold the learner's weights."""
        for key, gap in metrics.items():
            if key.startswith("sync/logprob_gap") and gap > self.s.sync_check_tol:
                raise RuntimeError(f"step {step}: weight sync check failed: {key}={gap:.4f} > "
                                   f"rollout.sync_check_tol={self.s.sync_check_tol} (the rollout engine's "
                                   "log-probs do not match the learner's)")
