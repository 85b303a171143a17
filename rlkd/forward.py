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
