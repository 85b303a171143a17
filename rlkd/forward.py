"""The one forward pass every component shares: logits (and hidden states) at response positions."""
from __future__ import annotations

import torch

from rlkd.batch import SequenceBatch, pick


def response_forward(model, batch: SequenceBatch, vocab_size: int, with_hidden: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a causal LM over prompt+response; return the logits that predict each response token.

    Returns (logits (B, R, vocab_size), last hidden state (B, R, H) or None). Logits are sliced to
    the tokenizer's vocabulary, so embedding rows added as padding never receive probability.
    """
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, output_hidden_states=with_hidden, use_cache=False)
    p, r = batch.prompt_width, batch.responses.shape[1]
    logits = out.logits[:, p - 1:p - 1 + r, :vocab_size].float()
    hidden = out.hidden_states[-1][:, p - 1:p - 1 + r] if with_hidden else None
    return logits, hidden


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] -> (B, R)."""
    return pick(torch.log_softmax(logits.float(), -1), targets)
