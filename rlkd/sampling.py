"""Batched sampling with transformers `generate`, returning token ids and their log-probs.

In the core because in-process tools (the skills teacher builder) sample too; actors import it."""
from __future__ import annotations

import torch

from rlkd.batch import SequenceBatch, pick


class TokenizerVocabulary:
    """Logits processor that keeps sampling below `vocab_size`: models pad their embedding matrix past the
    tokenizer (Qwen2.5: 151,665 tokens, 151,936 rows), and an id from a padding row matches no token."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.vocab_size:] = float("-inf")
        return scores


@torch.no_grad()
def hf_generate(model, prompts: list[list[int]], pad_id: int, eos_id: int, max_new_tokens: int,
                temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, no_repeat_ngram_size: int = 0,
                batch_size: int = 64, vocab_size: int | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """Sample one response per prompt (cut after the first EOS, which is kept), only ids below
    `vocab_size` (the tokenizer's length; default: every row of the model).

    Log-probs are of the chosen tokens under the raw model (temperature 1, no processors) over the
    tokenizer's ids, the same quantity the learners compute. temperature 0: greedy decoding (argmax).
    """
    from transformers import LogitsProcessorList

    rows = model.get_output_embeddings().weight.shape[0]
    vocab = min(vocab_size or rows, rows)
    processors = LogitsProcessorList([TokenizerVocabulary(vocab)] if vocab < rows else [])
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    responses, logprobs = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        packed = SequenceBatch.collate(chunk, [[] for _ in chunk], pad_id)
        width = packed.prompt_width
        out = model.generate(
            input_ids=packed.input_ids[:, :width].to(device),
            attention_mask=packed.attention_mask[:, :width].to(device),
            **({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0
               else {"do_sample": False}), max_new_tokens=max_new_tokens,
            no_repeat_ngram_size=no_repeat_ngram_size or None, pad_token_id=pad_id, eos_token_id=eos_id,
            output_logits=True, return_dict_in_generate=True, logits_processor=processors)
        new = out.sequences[:, width:].cpu()
        raw = torch.stack(out.logits, 1)[..., :vocab].float().log_softmax(-1).cpu()  # (B, T, V)
        r, lp = cut_at_eos(new, eos_id, pick(raw, new))
        responses += r
        logprobs += lp
    return responses, logprobs


def cut_at_eos(tokens: torch.Tensor, eos_id: int, *per_token: torch.Tensor) -> tuple[list[list], ...]:
    """Rows of (B, T) tokens, and of each (B, T) per-token tensor, cut after the first EOS (kept)."""
    rows = tokens.tolist()
    keep = [row.index(eos_id) + 1 if eos_id in row else len(row) for row in rows]
    return tuple([r[:n] for r, n in zip(t, keep)] for t in (rows, *(v.tolist() for v in per_token)))
