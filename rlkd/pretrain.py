"""In-process SFT that pre-trains the built-in tiny models and the skills teacher (no Ray, no DeepSpeed)."""
from __future__ import annotations

import math
import random
import time

import torch

from rlkd import losses
from rlkd.batch import SequenceBatch
from rlkd.data import TokenizedExample
from rlkd.forward import response_forward, token_logprobs


def sft_train(model, data: list[TokenizedExample], pad_id: int, vocab_size: int, steps: int,
              batch_size: int, lr: float, seed: int, log=print, warmup: int = 0, log_every: int = 0,
              on_log=None, bf16: bool = False) -> dict:
    """AdamW, linear warm-up then cosine decay, on the gold responses; returns the first/last loss
    and the wall time. Logs every `log_every` steps (default: 5 times), then calls on_log(step).
    `bf16` runs the forward under CPU bf16 autocast (fp32 master weights): ~1.4x faster per step
    on CPUs with AVX512-BF16 (measured on this machine's EPYC)."""
    if steps == 0:
        return {"steps": 0}
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def schedule(s):
        return (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    log_every = log_every or max(1, steps // 5)
    model.train()
    t0, first, window = time.time(), None, []
    for step in range(steps):
        rows = rng.sample(data, min(batch_size, len(data)))
        batch = SequenceBatch.collate([r.prompt_ids for r in rows], [r.response_ids for r in rows], pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, _ = response_forward(model, batch, vocab_size)
        loss = losses.sft(token_logprobs(logits.float(), batch.responses), batch.response_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        first = loss.item() if first is None else first
        window = (window + [loss.item()])[-20:]
        if (step + 1) % log_every == 0:
            log(f"  sft step {step + 1}/{steps} loss {sum(window) / len(window):.3f} ({time.time() - t0:.0f}s)")
            if on_log is not None:
                on_log(step + 1)
                model.train()
    model.eval()
    return {"steps": steps, "first_loss": first, "last_loss": sum(window) / len(window),
            "seconds": time.time() - t0}
