"""PairScorer: teacher and student in one process, for teacher-forced evaluation (rlkd.eval).

Agreement metrics need both models' full next-token distributions at every response position.
Shipping (B, R, V) tensors from two scoring actors through the object store cost more than the
forward passes, so one process holds both models and reduces to (B, R) per-token statistics.
A plain class: rlkd.eval uses it inside a Ray task, whose pooled worker keeps torch imported.
"""
from __future__ import annotations

import torch

from rlkd import metrics as M
from rlkd.batch import SequenceBatch, pick
from rlkd.losses import per_token_kl


class PairScorer:
    def __init__(self, teacher_dir: str, student_dir: str, vocab_size: int, pad_id: int, eos_id: int,
                 trust_remote_code: bool = False):
        from rlkd.models import load_model, use_allotted_threads

        use_allotted_threads()
        self.teacher = load_model(teacher_dir, trust_remote_code).eval()
        self.student = load_model(student_dir, trust_remote_code).eval()
        self.vocab_size, self.pad_id, self.eos_id = vocab_size, pad_id, eos_id

    @torch.no_grad()
    def stats(self, prompts: list[list[int]], responses: list[list[int]], batch_size: int = 16) -> dict:
        """Per response token: TOP-1 hit, teacher UNC, KL(p‖q), and the mask -> (N, L) tensors, 0-padded."""
        from rlkd.forward import response_forward

        parts = []
        for i in range(0, len(prompts), batch_size):
            batch = SequenceBatch.collate(prompts[i:i + batch_size], responses[i:i + batch_size], self.pad_id)
            t = torch.log_softmax(response_forward(self.teacher, batch, self.vocab_size)[0], -1)
            s = torch.log_softmax(response_forward(self.student, batch, self.vocab_size)[0], -1)
            parts.append({"hits": M.top1_hits(t, s), "unc": M.unc(t, batch.responses),
                          "kl": per_token_kl(t, s), "mask": batch.response_mask.float(),
                          "nll": -pick(s, batch.responses)})
        width = max(p["mask"].shape[1] for p in parts)
        return {k: torch.cat([torch.nn.functional.pad(p[k], (0, width - p[k].shape[1])) for p in parts])
                for k in parts[0]}

    def generate_teacher(self, prompts: list[list[int]], max_new_tokens: int, seed: int,
                         no_repeat_ngram_size: int = 0) -> list[list[int]]:
        """Teacher samples with the student's evaluation settings (the ε reference of ExAccErr)."""
        from rlkd.sampling import hf_generate

        return hf_generate(self.teacher, prompts, self.pad_id, self.eos_id, max_new_tokens, seed=seed,
                           no_repeat_ngram_size=no_repeat_ngram_size, vocab_size=self.vocab_size)[0]
