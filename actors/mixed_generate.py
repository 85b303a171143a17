"""MiniLLM's teacher-mixed sampling: each token is drawn from α·p_teacher + (1−α)·q_student.

Both models must advance in one token loop, so this is a plain PyTorch loop over two HF models with
KV caches. vLLM cannot do it: an engine runs one model, and its logits processors see only that
model's logits, so there is no per-token hook to mix in a second model's distribution.
"""
from __future__ import annotations

import torch

from rlkd.batch import SequenceBatch, pick
from rlkd.sampling import cut_at_eos


def _step(model, ids, attn, pos, past, vocab: int, temperature: float):
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=past, use_cache=True)
    raw = out.logits[:, -1, :vocab].float()
    return raw.log_softmax(-1), (raw / temperature).log_softmax(-1), out.past_key_values


@torch.no_grad()
def mixed_generate(student, teacher, prompts: list[list[int]], pad_id: int, eos_id: int, vocab: int,
                   max_new_tokens: int, alpha: float, temperature: float = 1.0, seed: int = 0
                   ) -> tuple[list[list[int]], list[list[float]], list[list[float]]]:
    """Sample one response per prompt from the mixture; EOS is kept and ends a row.

    Returns (responses, student raw log-probs of the chosen tokens, log-probs of the chosen tokens under
    the mixture they were drawn from). MiniLLM's importance weight is exp(student − mixture).
    """
    device = next(student.parameters()).device  # both models and every tensor of the loop live here
    g = torch.Generator(device=device).manual_seed(seed)
    packed = SequenceBatch.collate(prompts, [[] for _ in prompts], pad_id).to(device)
    width = packed.prompt_width
    attn = packed.attention_mask[:, :width]
    ids, pos = packed.input_ids[:, :width], packed.position_ids[:, :width]
    past_s = past_t = None
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    tokens, s_lp, mix_lp = [], [], []
    for _ in range(max_new_tokens):
        s_raw, s_log, past_s = _step(student, ids, attn, pos, past_s, vocab, temperature)
        _, t_log, past_t = _step(teacher, ids, attn, pos, past_t, vocab, temperature)
        mix = torch.logaddexp(t_log + torch.log(torch.tensor(alpha, device=device)),
                              s_log + torch.log1p(torch.tensor(-alpha, device=device)))
        nxt = torch.multinomial(mix.exp(), 1, generator=g).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens.append(nxt)
        s_lp.append(pick(s_raw, nxt))
        mix_lp.append(pick(mix, nxt))
        done = done | (nxt == eos_id)
        if done.all():
            break
        ids, pos = nxt[:, None], pos[:, -1:] + 1
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], -1)
    return cut_at_eos(torch.stack(tokens, 1), eos_id, torch.stack(s_lp, 1), torch.stack(mix_lp, 1))
