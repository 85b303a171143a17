"""Teacher-forced agreement metrics (ALGORITHMS.md §4.2-4.4): pure functions of log-prob tensors.

Shapes: log-probs (B, R, V) over the full vocabulary at each response position, targets and masks
(B, R). Aggregation over sequences is not stated in OKD [NF]; every mean here is over all masked
tokens of the set (the same token mean the training losses use) [R].
"""
from __future__ import annotations

import torch


def per_token_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) at every position -> (B, R)."""
    p = teacher_logp.exp()
    return torch.where(p > 0, p * (teacher_logp - student_logp), torch.zeros_like(p)).sum(-1)


def top1_hits(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """1 where argmax p = argmax q (OKD eq. 3) -> (B, R) float."""
    return (teacher_logp.argmax(-1) == student_logp.argmax(-1)).float()


def unc(teacher_logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """UNC = 1 − p(gold token) under the teacher (OKD eq. 4; whose logits is unstated, the teacher's
    as in ATKD re-implementations [R]) -> (B, R)."""
    return 1 - teacher_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).exp()


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

    KL(p ‖ q) at each position of student-generated (R) and teacher-generated (ε) responses is
    averaged over the sequences that reach that position, summed over the first l positions, and
    ExAccErr = (R(l) − ε_cum(l)) / ε_cum(l) × 100, with ε_cum(l) = l·ε(l).
    """
    def cumulative(kl, mask):
        per_pos = (kl * mask).sum(0) / mask.sum(0).clamp(min=1)
        return float(per_pos[:length].sum())

    r, e = cumulative(kl_on_student, mask_student), cumulative(kl_on_teacher, mask_teacher)
    return (r - e) / e * 100 if e > 0 else float("nan")
