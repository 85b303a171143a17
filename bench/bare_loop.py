"""Reference (a) of bench/throughput.py: rlkd's AMMD / GKD step as one plain PyTorch process.

No Ray, no DeepSpeed, no object store: the same models, the same sampling (`hf_generate`), the same
objectives from `rlkd.objectives`, torch AdamW with the same learning rates and clipping, and the
same phases in the same order (rollout, teacher generation, scoring, K critic steps, student step,
weight copy into the generation model). Each phase runs on one thread, like each rlkd actor does.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager

import torch

from learners.critic import CriticHeads
from rlkd.batch import SequenceBatch, StudentForward, TeacherScores
from rlkd.forward import response_forward
from rlkd.objectives import ObjectiveContext
from rlkd.sampling import hf_generate
from rlkd.schedules import GOLD, MIXED, ROLLOUT, TEACHER_GEN


class BareLoop:
    def __init__(self, method, student, teacher, pad_id: int, eos_id: int, vocab: int, student_lr: float,
                 critic_lr: float, max_new: int, temperature: float, seed: int):
        torch.manual_seed(seed)
        self.m, self.pad_id, self.eos_id, self.vocab = method, pad_id, eos_id, vocab
        self.student, self.teacher = student.train(), teacher.eval()
        self.generator = copy.deepcopy(student).eval()  # the rollout engine's copy
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=student_lr, weight_decay=0.0)
        self.critic = None
        if method.critic_heads:
            self.critic = CriticHeads(student.config.hidden_size, vocab, method.critic_heads)
            self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=critic_lr, weight_decay=0.0)
        self.max_new, self.temperature, self.seed = max_new, temperature, seed
        self.cache: dict[int, list[int]] = {}
        self.timings: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        yield
        self.timings[f"timing/{name}"] = self.timings.get(f"timing/{name}", 0.0) + time.perf_counter() - t0

    def _batch(self, source: str, rows, step: int) -> SequenceBatch:
        prompts = [r.prompt_ids for r in rows]
        if source == GOLD:
            return SequenceBatch.collate(prompts, [r.response_ids for r in rows], self.pad_id)
        if source == TEACHER_GEN:
            todo = [r for r in rows if r.uid not in self.cache]
            if todo:
                with self.phase("teacher_gen"):
                    out, _ = hf_generate(self.teacher, [r.prompt_ids for r in todo], self.pad_id, self.eos_id,
                                         self.max_new, 1.0, 1.0, self.seed + step)
                self.cache.update({r.uid: o for r, o in zip(todo, out)})
            return SequenceBatch.collate(prompts, [self.cache[r.uid] for r in rows], self.pad_id)
        assert source in (ROLLOUT, MIXED)
        with self.phase("rollout"):
            temperature = self.m.rollout_temperature or self.temperature
            out, lp = hf_generate(self.generator, prompts, self.pad_id, self.eos_id, self.max_new, temperature,
                                  1.0, self.seed + step)
        self.generated += sum(len(o) for o in out)
        return SequenceBatch.collate(prompts, out, self.pad_id, lp)

    def _forwards(self, batches, scores, train_student: bool, train_critic: bool):
        fwd = {}
        for name, b in batches.items():
            use_critic = self.critic is not None and name in self.critic.heads
            with torch.set_grad_enabled(train_student):
                logits, hidden = response_forward(self.student, b, self.vocab, with_hidden=use_critic)
            critic = None
            if use_critic:
                with torch.set_grad_enabled(train_critic):
                    critic = self.critic(name, hidden.detach())
            fwd[name] = StudentForward(logits.log_softmax(-1), b.responses, b.response_mask, scores[name], critic,
                                       b.rollout_logprobs)
        return fwd

    def _update(self, objective, batches, scores, ctx, opt, params, student: bool):
        loss, metrics = objective(self._forwards(batches, scores, student, not student), ctx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return metrics

    def step(self, step: int, rows) -> dict:
        """One step of the method; returns its timings and token counts (like Controller.step)."""
        self.timings, self.generated = {}, 0
        t0 = time.perf_counter()
        sources = getattr(self.m.schedule, "sources", {"train": ROLLOUT})  # GKD at lambda = 1: always on-policy
        batches = {name: self._batch(src, rows, step) for name, src in sources.items()}
        with self.phase("score"), torch.no_grad():
            scores = {}
            for name, b in batches.items():
                logits, _ = response_forward(self.teacher, b, self.vocab)
                scores[name] = TeacherScores(logits.log_softmax(-1))
        ctx = ObjectiveContext({n: float(b.num_tokens()) for n, b in batches.items()})
        if self.critic is not None:
            with self.phase("critic"):
                for _ in range(self.m.critic_steps):
                    self._update(self.m.critic_objective, batches, scores, ctx, self.critic_opt,
                                 list(self.critic.parameters()), student=False)
        with self.phase("policy"):
            self._update(self.m.policy_objective, batches, scores, ctx, self.opt, list(self.student.parameters()),
                         student=True)
        with self.phase("sync"), torch.no_grad():
            self.generator.load_state_dict(self.student.state_dict())
        elapsed = time.perf_counter() - t0
        trained = sum(ctx.n_tokens.values())
        return {**self.timings, "timing/step": elapsed, "tokens/trained": trained,
                "throughput/tokens_per_s": trained / elapsed, "tokens/generated": float(self.generated)}
