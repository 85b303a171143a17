"""RolloutActor: samples the student's on-policy trajectories with vLLM or HF generate.

Wrap with `ray.remote(...)` at the call site (rlkd.launch) so resources stay a launch decision.
Heavy imports (vllm, transformers) happen in the constructors, so this module imports anywhere.
"""
from __future__ import annotations

import os
import time


class _HFEngine:
    def __init__(self, model_dir: str, pad_id: int, eos_id: int, trust_remote_code: bool, vocab_size: int | None):
        import torch

        from rlkd.models import load_model

        self.model = load_model(model_dir, trust_remote_code).eval()
        if torch.cuda.is_available():
            self.model.cuda()
        self.pad_id, self.eos_id, self.vocab_size = pad_id, eos_id, vocab_size

    def generate(self, prompts, max_new_tokens, temperature, top_p, seed, no_repeat_ngram_size):
        from rlkd.sampling import hf_generate

        return hf_generate(self.model, prompts, self.pad_id, self.eos_id, max_new_tokens, temperature,
                           top_p, seed, no_repeat_ngram_size, vocab_size=self.vocab_size)

    def load_weights(self, blob: bytes) -> None:
        from safetensors.torch import load

        missing, unexpected = self.model.load_state_dict(load(blob), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"weight sync: missing {missing[:3]}, unexpected {unexpected[:3]}")

    def dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def join(self, host: str, port: int, rank: int, world_size: int) -> None:
        from rlkd import weight_sync

        self.group = weight_sync.join(host, port, rank, world_size, next(self.model.parameters()).device)

    def receive(self, layout) -> None:
        import torch

        from rlkd import weight_sync

        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in weight_sync.receive(self.group, layout, next(self.model.parameters()).device):
                params[name].copy_(t)


class _VLLMEngine:
    def __init__(self, model_dir: str, seed: int, memory_fraction: float, cpu_kv_cache_gib: float,
                 max_model_len: int, trust_remote_code: bool, vocab_size: int | None, enforce_eager: bool):
        # one process: the engine core runs inside this actor (no extra spawned engine process)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import torch
        from vllm import LLM

        gpu = torch.cuda.is_available()
        memory = {"gpu_memory_utilization": memory_fraction} if gpu else {
            "kv_cache_memory_bytes": int(cpu_kv_cache_gib * 2**30)}
        # CPU: always eager; GPU: CUDA graphs unless rollout.vllm_enforce_eager
        self.llm = LLM(model=model_dir, dtype="auto" if gpu else "float32", enforce_eager=enforce_eager or not gpu,
                       seed=seed, **memory, max_model_len=max_model_len, trust_remote_code=trust_remote_code,
                       worker_extension_cls="actors.vllm_worker.RlkdWorkerExtension")
        rows = self.llm.llm_engine.model_config.get_vocab_size()
        # padding rows past the tokenizer: a -100 bias (vLLM's limit) puts them ~e^-100 below any real token;
        # an allowed_token_ids list of ~150k ids per request would cost more than the sampling
        self.bias = {i: -100.0 for i in range(vocab_size, rows)} if vocab_size and vocab_size < rows else None

    def generate(self, prompts, max_new_tokens, temperature, top_p, seed, no_repeat_ngram_size):
        from vllm import SamplingParams

        if no_repeat_ngram_size:
            raise ValueError("rollout.backend='vllm' does not support no_repeat_ngram_size; use backend 'hf'")
        params = [SamplingParams(temperature=temperature, top_p=top_p, top_k=0, max_tokens=max_new_tokens,
                                 seed=seed + i, logprobs=0, logit_bias=self.bias) for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        responses, logprobs = [], []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            responses.append(ids)
            logprobs.append([step[t].logprob for t, step in zip(ids, c.logprobs)])
        return responses, logprobs

    def load_weights(self, blob: bytes) -> None:
        self.llm.collective_rpc("rlkd_load_weights", args=(blob,))
        self.llm.reset_prefix_cache()  # cached KV of shared prefixes was computed with the old weights

    def dtype(self) -> str:
        return str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")

    def join(self, host: str, port: int, rank: int, world_size: int) -> None:
        self.llm.collective_rpc("rlkd_join_weight_group", args=(host, port, rank, world_size))

    def receive(self, layout) -> None:
        from dataclasses import asdict

        self.llm.collective_rpc("rlkd_receive_weights", args=(asdict(layout),))
        self.llm.reset_prefix_cache()


class RolloutActor:
    """Holds a copy of the student for generation; receives new weights from the learners."""

    def __init__(self, model_dir: str, backend: str, pad_id: int, eos_id: int, seed: int = 0,
                 vllm_memory_fraction: float = 0.5, vllm_cpu_kv_cache_gib: float = 0.25, max_model_len: int = 512,
                 trust_remote_code: bool = False, mix_teacher_dir: str | None = None, vocab_size: int | None = None,
                 vllm_enforce_eager: bool = False):
        """`vocab_size`: the tokenizer's length; sampling never returns an id at or above it."""
        from rlkd.models import use_allotted_threads

        use_allotted_threads()
        if backend == "hf":
            self.engine = _HFEngine(model_dir, pad_id, eos_id, trust_remote_code, vocab_size)
        elif backend == "vllm":
            self.engine = _VLLMEngine(model_dir, seed, vllm_memory_fraction, vllm_cpu_kv_cache_gib, max_model_len,
                                      trust_remote_code, vocab_size, vllm_enforce_eager)
        else:
            raise ValueError(f"rollout.backend={backend!r}: expected 'hf' or 'vllm'")
        self.backend = backend
        self.version = 0  # weights version (0: model_dir's); the controller checks it on every batch
        self.mix_teacher = None
        if mix_teacher_dir is not None:  # MiniLLM teacher-mixed sampling: both models in one token loop
            if backend != "hf":
                raise ValueError("teacher-mixed sampling needs rollout.backend='hf' (vLLM runs one model per engine)")
            from rlkd.models import load_model

            self.mix_teacher = load_model(mix_teacher_dir, trust_remote_code).eval()
            self.mix_teacher.to(next(self.engine.model.parameters()).device)  # the student's device (GPU if any)
            self.pad_id, self.eos_id = pad_id, eos_id

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
