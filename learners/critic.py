"""AMMD critics (moment estimators): bounded parametric heads over the vocabulary.

f(s, ·) = c · tanh(head(h(s))) ∈ [−c, c]^|V|, with h(s) a detached last hidden state: the teacher's
(`algo.ammd.critic_input: teacher`, the default, shipped with its scores) or the student's own.
With `critic_network: logratio` the critic also sees the log-ratio of the two models:
f(s, a) = c · tanh(head(h(s))_a + w · (log p*(a|s) − log q(a|s))), w a learned scalar per head, so
its function class holds the log-ratio moments (Jeffreys/KL-shaped signals), not only smooth functions of h.
The bound keeps the sup in the moment-matching distance finite; a shared parametric head (not a
per-state table) is what separates AMMD from plain TVD (docs/algorithms.md#ammd) [R].
"""
from __future__ import annotations

import torch
from torch import nn


def _head(hidden: int, vocab: int, network: str) -> nn.Module:
    if network in ("linear", "logratio"):
        layer = nn.Linear(hidden, vocab)
    elif network == "mlp":  # the "separate small network" option: one hidden layer of its own
        layer = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, vocab))
    else:
        raise ValueError(f"algo.ammd.critic_network={network!r}: expected 'linear', 'mlp' or 'logratio'")
    last = layer if isinstance(layer, nn.Linear) else layer[-1]
    nn.init.normal_(last.weight, std=0.02)
    nn.init.zeros_(last.bias)
    return layer


class CriticHeads(nn.Module):
    """One head per named batch it scores (AMMD: 'on' -> f_on, 'off' -> f_off)."""

    def __init__(self, hidden: int, vocab: int, names: tuple[str, ...], network: str = "linear", bound: float = 1.0):
        super().__init__()
        self.heads = nn.ModuleDict({n: _head(hidden, vocab, network) for n in names})
        self.bound = bound
        self.log_ratio = network == "logratio"  # the learner passes log p* - log q on the support
        if self.log_ratio:  # w starts at 0, the linear critic; 1-d since DeepSpeed cannot broadcast a 0-d one
            self.ratio_weight = nn.ParameterDict({n: nn.Parameter(torch.zeros(1)) for n in names})

    def forward(self, name: str, hidden: torch.Tensor, index: torch.Tensor | None = None,
                log_ratio: torch.Tensor | None = None) -> torch.Tensor:
        """(B, R, H) -> f over the vocabulary (B, R, V), or only at `index` (B, R, k): a top-k teacher's
        ids, by gathering those rows of the output layer, so no (B, R, V) tensor is made. `log_ratio`
        (same shape as f, no gradient): log p* − log q on the same support, for the 'logratio' critic."""
        head, h = self.heads[name], hidden.float()
        if index is None:
            out = head(h)
        else:
            if isinstance(head, nn.Sequential):  # mlp: the hidden layer, then the output rows at `index`
                h, head = head[1](head[0](h)), head[2]
            out = torch.einsum("brh,brkh->brk", h, head.weight[index]) + head.bias[index]
        if self.log_ratio:
            out = out + self.ratio_weight[name] * log_ratio.clamp(-20, 20)  # -inf on masked rows: no NaN
        return self.bound * torch.tanh(out)
