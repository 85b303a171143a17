"""The one forward pass every component shares: logits (and hidden states) at response positions."""
from __future__ import annotations

import torch

from rlkd.batch import SequenceBatch, pick


def response_forward(model, batch: SequenceBatch, vocab_size: int, with_hidden: bool = False, fp32: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a causal LM over prompt+response; return the logits that predict each response token.

    Returns (logits (B, R, vocab_size), last hidden state (B, R, H) or None). Only the last R + 1
    positions go through the LM head (`logits_to_keep`; the prompt's logits are never made). Logits
    are sliced to the tokenizer's vocabulary, so embedding rows added as padding never receive
    probability. `fp32=False` keeps the model's dtype (the teacher converts a few rows at a time).
    """
    r = batch.responses.shape[1]
    keep = {"logits_to_keep": r + 1} if _keeps_logits(model) else {}
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, output_hidden_states=with_hidden, use_cache=False, **keep)
    start = out.logits.shape[1] - (r + 1)  # column P - 1 of the full sequence
    logits = out.logits[:, start:start + r, :vocab_size]
    p = batch.prompt_width
    hidden = out.hidden_states[-1][:, p - 1:p - 1 + r] if with_hidden else None
    return (logits.float() if fp32 else logits), hidden


def _keeps_logits(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (Llama, Qwen2 and most HF causal LMs do)."""
    import inspect

    base = getattr(model, "module", model)  # DeepSpeed engines wrap the model
    fn = getattr(base, "forward", None)
    try:
        return fn is not None and "logits_to_keep" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] -> (B, R)."""
    return pick(torch.log_softmax(logits.float(), -1), targets)


LSE_ROWS = 256  # positions per chunk of the chunked logsumexp: bounds its fp32 temporaries to 256 x V


class _LogSumExp(torch.autograd.Function):
    """logsumexp over the vocabulary in fp32, LSE_ROWS positions at a time. Neither direction keeps an
    fp32 copy of the (B, R, V) logits: the backward rebuilds softmax chunk by chunk from the logits
    (already alive for the LM head) and the saved (B, R) result. The logits are usually a strided view
    (sliced to the tokenizer's vocabulary), so chunks are taken per row, never by a reshape (a copy)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        out = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
        for b, r in _chunks(logits):
            out[b, r] = torch.logsumexp(logits[b, r].float(), -1)
        ctx.save_for_backward(logits, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        logits, lse = ctx.saved_tensors
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for b, r in _chunks(logits):
            out[b, r] = (torch.exp(logits[b, r].float() - lse[b, r].unsqueeze(-1)) * grad[b, r].unsqueeze(-1)
                         ).to(out.dtype)
        return out


def _chunks(logits: torch.Tensor):
    """(row, slice of positions) covering a (B, R, V) tensor, LSE_ROWS positions per chunk."""
    for b in range(logits.shape[0]):
        for i in range(0, logits.shape[1], LSE_ROWS):
            yield b, slice(i, i + LSE_ROWS)


def logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """(B, R, V) logits of any dtype -> (B, R) fp32 log-normalisers, differentiable, in bounded memory."""
    return _LogSumExp.apply(logits)
