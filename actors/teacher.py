"""TeacherActor: the teacher's per-token distributions (the action values AMMD and the KL family
consume), and teacher-generated responses for off-policy data."""
from __future__ import annotations

import time

import torch

from rlkd.batch import SequenceBatch, TeacherScores, pick


def topk_with_tail(logp: torch.Tensor, k: int) -> TeacherScores:
    """Top-k log-probs + log of the remaining mass, computed exactly (logsumexp of the rest)."""
    values, index = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, index, float("-inf"))
    return TeacherScores(values, index, torch.logsumexp(rest, -1))


def scores_from_logits(logits: torch.Tensor, responses: torch.Tensor, temperature: float, topk: int,
                       rows_per_chunk: int = 4, dtype: torch.dtype = torch.float32) -> TeacherScores:
    """TeacherScores of (B, R, V) logits, computed on the logits' device a few rows at a time so that
    no full-vocabulary fp32 copy of the whole batch exists; only the results move to the host, as
    `dtype` values (bf16 on GPU) and int32 ids. `topk` 0 (or >= V) keeps the full distribution."""
    parts: list[TeacherScores] = []
    for i in range(0, logits.shape[0], rows_per_chunk):
        logp = torch.log_softmax(logits[i:i + rows_per_chunk].float() / temperature, -1)
        token = pick(logp, responses[i:i + rows_per_chunk].to(logp.device)).cpu()
        if topk and topk < logp.shape[-1]:
            top = topk_with_tail(logp, topk)
            parts.append(TeacherScores(top.logp.to(dtype).cpu(), top.index.int().cpu(), top.tail.cpu(), token))
        else:
            parts.append(TeacherScores(logp.to(dtype).cpu(), token_logp=token))
    cat = lambda name: (None if getattr(parts[0], name) is None  # noqa: E731
                        else torch.cat([getattr(x, name) for x in parts]))
    return TeacherScores(cat("logp"), cat("index"), cat("tail"), cat("token_logp"))


class TeacherActor:
    def __init__(self, model_dir: str, vocab_size: int, pad_id: int, eos_id: int, topk: int = 0,
                 temperature: float = 1.0, trust_remote_code: bool = False):
        from rlkd.models import load_model, use_allotted_threads

        use_allotted_threads()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = load_model(model_dir, trust_remote_code, dtype=dtype).to(self.device).eval()
        self.vocab_size, self.pad_id, self.eos_id = vocab_size, pad_id, eos_id
        self.topk, self.temperature = topk, temperature

    def ready(self) -> bool:
        return True

    @torch.no_grad()
    def score(self, batch: SequenceBatch, with_hidden: bool = False) -> TeacherScores:
        """Teacher log-probs at every response position (teacher temperature applied in rlkd), the
        log-prob of each response token, and optionally the last hidden state (AMMD teacher critic)."""
        from rlkd.forward import response_forward

        logits, hidden = response_forward(self.model, batch.to(self.device), self.vocab_size, with_hidden, fp32=False)
        scores = scores_from_logits(logits, batch.responses, self.temperature, self.topk,
                                    dtype=torch.bfloat16 if self.device == "cuda" else torch.float32)
        scores.hidden = hidden.to(scores.logp.dtype).cpu() if with_hidden else None
        return scores

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, no_repeat_ngram_size: int = 0) -> dict:
        """Teacher responses for off-policy data and evaluation (same contract as RolloutActor)."""
        from rlkd.sampling import hf_generate

        t0 = time.perf_counter()
        responses, logprobs = hf_generate(self.model, prompts, self.pad_id, self.eos_id, max_new_tokens,
                                          temperature, top_p, seed, no_repeat_ngram_size, vocab_size=self.vocab_size)
        return {"responses": responses, "logprobs": logprobs, "seconds": time.perf_counter() - t0}

