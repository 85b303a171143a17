"""RolloutActor: samples the student's on-policy trajectories with an engine of actors/engines.py (vLLM or HF)
and takes new weights from the learners.

Wrap with `ray.remote(...)` at the call site (rlkd.launch) so resources stay a launch decision.
"""
from __future__ import annotations

import time

from actors.engines import ENGINES, EngineSpec


class RolloutActor:
    """Holds a copy of the student for generation; receives new weights from the learners."""

    def __init__(self, spec: EngineSpec, backend: str = "hf", mix_teacher_dir: str | None = None):
        """`spec`: the student's engine (actors.engines); `mix_teacher_dir`: MiniLLM's teacher-mixed sampling."""
        from rlkd.models import use_allotted_threads

        use_allotted_threads()
        if backend not in ENGINES:
            raise ValueError(f"rollout.backend={backend!r}: expected one of {sorted(ENGINES)}")
        self.engine, self.backend = ENGINES[backend](spec), backend
        self.version = 0  # weights version (0: model_dir's); the controller checks it on every batch
        self.mix_teacher = None
        if mix_teacher_dir is not None:  # MiniLLM teacher-mixed sampling: both models in one token loop
            if backend != "hf":
                raise ValueError("teacher-mixed sampling needs rollout.backend='hf' (vLLM runs one model per engine)")
            from rlkd.models import load_model

            self.mix_teacher = load_model(mix_teacher_dir, spec.trust_remote_code).eval()
            self.mix_teacher.to(self.engine.device)  # the student's device (GPU if any)
            self.pad_id, self.eos_id = spec.pad_id, spec.eos_id

    def ready(self) -> str:
        return self.backend

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, no_repeat_ngram_size: int = 0) -> dict:
        """-> {'responses': token ids (EOS kept), 'logprobs': raw log-probs of them, 'seconds', 'version'}."""
        t0 = time.perf_counter()
        responses, logprobs = self.engine.generate(prompts, max_new_tokens, temperature, top_p, seed,
                                                   no_repeat_ngram_size)
        return {"responses": responses, "logprobs": logprobs, "seconds": time.perf_counter() - t0,
                "version": self.version}

    def generate_mixed(self, prompts: list[list[int]], max_new_tokens: int, alpha: float, vocab_size: int,
                       temperature: float = 1.0, seed: int = 0) -> dict:
        """Tokens drawn from alpha*teacher + (1-alpha)*student; also returns 'behavior_logprobs', the
        log-probs of the chosen tokens under that mixture (for the importance weights)."""
        from actors.mixed_generate import mixed_generate

        if self.mix_teacher is None:
            raise RuntimeError("this rollout actor was started without mix_teacher_dir")
        t0 = time.perf_counter()
        responses, logprobs, behavior = mixed_generate(self.engine.model, self.mix_teacher, prompts, self.pad_id,
                                                       self.eos_id, vocab_size, max_new_tokens, alpha, temperature,
                                                       seed)
        return {"responses": responses, "logprobs": logprobs, "behavior_logprobs": behavior,
                "seconds": time.perf_counter() - t0, "version": self.version}

    def weight_dtype(self) -> str:
        """The engine's parameter dtype: what a collective sync sends."""
        return self.engine.dtype()

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int) -> None:
        """Join the learners' collective sync group as `rank` (rlkd.weight_sync; blocks until all have)."""
        self.engine.join(host, port, rank, world_size)

    def receive_weights(self, layout, version: int) -> float:
        """Receive the student over the sync group (rank 0 broadcasts); returns the seconds it took."""
        t0 = time.perf_counter()
        self.engine.receive(layout)
        self.version = version
        return time.perf_counter() - t0

    def update_weights(self, blob: bytes, version: int = 0) -> dict:
        """Load the learner's student weights (safetensors bytes); returns the seconds it took and the bytes."""
        t0 = time.perf_counter()
        self.engine.load_weights(blob)
        self.version = version
        return {"seconds": time.perf_counter() - t0, "bytes": len(blob)}
