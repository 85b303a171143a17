"""Teacher-forced agreement metrics (docs/algorithms.md#metrics): pure functions of log-prob tensors.

Shapes: log-probs (B, R, V) over the full vocabulary at each response position, targets and masks
(B, R). Aggregation over sequences is not stated in OKD [NF]; every mean here is over all masked
tokens of the set (the same token mean the training losses use) [R].
"""
from __future__ import annotations

import torch

from rlkd.batch import pick


def top1_hits(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """1 where argmax p = argmax q (OKD eq. 3) -> (B, R) float."""
    return (teacher_logp.argmax(-1) == student_logp.argmax(-1)).float()


def unc(teacher_logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """UNC = 1 − p(gold token) under the teacher (OKD eq. 4; whose logits is unstated, the teacher's
    as in ATKD re-implementations [R]) -> (B, R)."""
    return 1 - pick(teacher_logp, targets).exp()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1))


def easy_hard_agreement(hits: torch.Tensor, uncertainty: torch.Tensor, mask: torch.Tensor
                        ) -> tuple[float, float, float]:
    """TOP-1 agreement on easy (UNC ≤ median) and hard (UNC > median) tokens, and the median.

    OKD does not give its threshold [NF]; the median of the evaluated tokens splits them in two
    halves [R]."""
    values = uncertainty[mask.bool()]
    threshold = float(values.median()) if values.numel() else 0.0
    easy = mask * (uncertainty <= threshold).float()
    hard = mask * (uncertainty > threshold).float()
    return masked_mean(hits, easy), masked_mean(hits, hard), threshold


def exacc_err(kl_on_student: torch.Tensor, mask_student: torch.Tensor, kl_on_teacher: torch.Tensor,
              mask_teacher: torch.Tensor, length: int) -> float:
    """ExAccErr(l) in % (OKD eqs. 5-7, `minillm/evaluate_exposure_bias.py`).

    KL(p ‖ q) at each position of student-generated (R) and teacher-generated (ε) responses is summed
    per sequence over its first l positions (none after its EOS), then averaged over sequences:
    ExAccErr = (R(l) − ε_cum(l)) / ε_cum(l) × 100, ε_cum(l) = l·ε(l).
    """
    def cumulative(kl, mask):
        return float((kl * mask)[:, :length].sum(1).mean())

    r, e = cumulative(kl_on_student, mask_student), cumulative(kl_on_teacher, mask_teacher)
    return (r - e) / e * 100 if e > 0 else float("nan")


def collapse_stats(logp: torch.Tensor, mask: torch.Tensor, all_reduce=lambda t: t) -> dict[str, float]:
    """Collapse detectors on one batch of next-token distributions (B, R, V), global over ranks.

    context_tv: mean over masked positions of TV(p_t, p̄), p̄ the batch-mean distribution; near 0 when
    the model's prediction no longer depends on its context. distinct_argmax: how many different
    tokens are argmax somewhere. entropy: mean next-token entropy (nats). `all_reduce` sums a tensor
    over ranks (identity on one rank)."""
    with torch.no_grad():
        p, m = logp.float().exp(), mask.float()
        n = all_reduce(m.sum()).clamp(min=1)
        mean_p = all_reduce((p * m.unsqueeze(-1)).sum((0, 1))) / n
        tv = 0.5 * (p - mean_p).abs().sum(-1)
        entropy = -(torch.where(p > 0, p * logp.float(), torch.zeros_like(p))).sum(-1)
        argmax = logp.argmax(-1)[m.bool()]
        hits = all_reduce(torch.bincount(argmax, minlength=logp.shape[-1]).float())
        sums = all_reduce(torch.stack([(tv * m).sum(), (entropy * m).sum()]))
        return {"context_tv": float(sums[0] / n), "entropy": float(sums[1] / n),
                "distinct_argmax": float((hits > 0).sum())}
