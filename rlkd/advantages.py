"""Pure return/advantage shaping for the policy-gradient (long-term) parts of the losses."""
from __future__ import annotations

from collections.abc import Callable

import torch

# sums a tensor over all learner ranks; identity on one rank
AllReduce = Callable[[torch.Tensor], torch.Tensor]


def future_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   include_current: bool = False, length_normalize: bool = True) -> torch.Tensor:
    """R_t = Σ_{t' ≥ t (or > t)} γ^{t'−t'₀} r_{t'} over masked response tokens -> (B, R).

    With `include_current=False` the sum starts at t+1 (AMMD [R]: δ_t depends on the state s_t
    only, so action y_t is credited with the gaps it causes later). `length_normalize` divides by
    the number of terms summed (MiniLLM's normalization by the remaining length), min 1.
    """
    r = rewards * mask
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    count = torch.zeros_like(r[:, 0])
    counts = torch.zeros_like(r)
    for t in range(r.shape[1] - 1, -1, -1):
        if include_current:
            running = r[:, t] + gamma * running
            count = mask[:, t] + count
            out[:, t], counts[:, t] = running, count
        else:
            out[:, t], counts[:, t] = running, count
            running = r[:, t] + gamma * running
            count = mask[:, t] + count
    if length_normalize:
        out = out / counts.clamp(min=1)
    return out * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce | None = None,
           eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked entries of the *global* batch (stats summed over ranks)."""
    stats = torch.stack([(values * mask).sum(), (values.square() * mask).sum(), mask.sum()])
    if all_reduce is not None:
        stats = all_reduce(stats)
    total, total_sq, n = stats[0], stats[1], stats[2].clamp(min=1)
    mean = total / n
    var = (total_sq / n - mean.square()).clamp(min=0)
    return (values - mean) * torch.rsqrt(var + eps) * mask
