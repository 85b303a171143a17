"""TeacherActor: the teacher's signal at every response token (the action values AMMD and the KL family
consume: the full distribution, its top-k with the tail mass, or only the sampled token's log-prob), and
teacher-generated responses for off-policy data. A thin role over an engine of actors/engines.py."""
from __future__ import annotations

import time

from actors.engines import ENGINES, EngineSpec
from rlkd.batch import SequenceBatch, TeacherScores


class TeacherActor:
    def __init__(self, spec: EngineSpec, backend: str = "hf", topk: int = 0, temperature: float = 1.0,
                 signal: str = "full"):
        """`topk` 0 ships the full distribution (signal 'full'); `signal` 'token' ships only the response
        tokens' log-probs (OPD, MiniLLM's reward), 4 bytes per token."""
        from rlkd.models import use_allotted_threads

        use_allotted_threads()
        self.engine = ENGINES[backend](spec)
        self.topk, self.temperature, self.signal = topk, temperature, signal

    def ready(self) -> bool:
        return True

    def score(self, batch: SequenceBatch, with_hidden: bool = False) -> TeacherScores:
        """Teacher log-probs at every response position (teacher temperature applied), the log-prob of each
        response token, and optionally the last hidden state (AMMD's teacher critic; HF engine only)."""
        return self.engine.score(batch, self.signal, self.topk, self.temperature, with_hidden)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, no_repeat_ngram_size: int = 0) -> dict:
        """Teacher responses for off-policy data and evaluation (same contract as RolloutActor)."""
        t0 = time.perf_counter()
        responses, logprobs = self.engine.generate(prompts, max_new_tokens, temperature, top_p, seed,
                                                   no_repeat_ngram_size)
        return {"responses": responses, "logprobs": logprobs, "seconds": time.perf_counter() - t0}
