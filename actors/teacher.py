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

        logits, hidden = response_forward(self.model, _to(batch, self.device), self.vocab_size, with_hidden)
        logp = torch.log_softmax(logits.float() / self.temperature, -1).cpu()
        token_logp = pick(logp, batch.responses)
        hidden = hidden.float().cpu() if with_hidden else None
        if self.topk and self.topk < self.vocab_size:
            top = topk_with_tail(logp, self.topk)
            return TeacherScores(top.logp, top.index, top.tail, token_logp, hidden)
        return TeacherScores(logp, token_logp=token_logp, hidden=hidden)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, no_repeat_ngram_size: int = 0) -> dict:
        """Teacher responses for off-policy data and evaluation (same contract as RolloutActor)."""
        from rlkd.sampling import hf_generate

        t0 = time.perf_counter()
        responses, logprobs = hf_generate(self.model, prompts, self.pad_id, self.eos_id, max_new_tokens,
                                          temperature, top_p, seed, no_repeat_ngram_size)
        return {"responses": responses, "logprobs": logprobs, "seconds": time.perf_counter() - t0}


def _to(batch: SequenceBatch, device: str) -> SequenceBatch:
    if device == "cpu":
        return batch
    return SequenceBatch(batch.input_ids.to(device), batch.attention_mask.to(device),
                         batch.response_mask.to(device), batch.prompt_width)
