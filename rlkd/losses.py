"""Pure distillation losses: functions of tensors only, no models, no distributed state.

Conventions:
- `student_logp`, `teacher_logp` are log-probabilities over the *same support* on the last axis:
  the full vocabulary, or the teacher's top-k (+ optional tail bin), see `on_support`.
- `mask` is (B, R) over response tokens. Every loss is a token mean over the response tokens of
  the batch: sum(per_token * mask) / n_tokens. Pass `n_tokens` = the *global* token count so that
  sharded learners reproduce the single-rank loss exactly; it defaults to mask.sum().
"""
from __future__ import annotations

from typing import Optional

import torch

from rlkd.batch import TeacherScores


def token_mean(per_token: torch.Tensor, mask: torch.Tensor, n_tokens: Optional[float] = None) -> torch.Tensor:
    """Σ per_token·mask / n_tokens (n_tokens defaults to the mask's own count)."""
    denom = mask.sum() if n_tokens is None else torch.as_tensor(n_tokens, dtype=per_token.dtype)
    return (per_token * mask).sum() / denom.clamp(min=1)


def _p_log_ratio(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """Σ_a p_a (log p_a − log p_b) over the last axis, with 0·log 0 = 0."""
    p = logp_a.exp()
    return torch.where(p > 0, p * (logp_a - logp_b), torch.zeros_like(p)).sum(-1)


def _log1mexp_sum(logp: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ_a exp(logp_a)) over the last axis: the log mass outside the given entries."""
    return torch.log((1 - logp.exp().sum(-1)).clamp(min=1e-12))


def on_support(student_logp: torch.Tensor, teacher: TeacherScores, with_tail: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs over the teacher's support.

    Full teacher: both (B, R, V). Top-k teacher: the student is gathered at the teacher's top-k
    ids; with `with_tail` both get one more bin holding the remaining mass, so a divergence over
    the k+1 bins is the exact divergence of the two distributions coarsened to those bins.
    """
    if teacher.index is None:
        return student_logp, teacher.logp
    s = student_logp.gather(-1, teacher.index)
    if not with_tail:
        return s, teacher.logp
    s_tail = _log1mexp_sum(s).unsqueeze(-1)
    return torch.cat([s, s_tail], -1), torch.cat([teacher.logp, teacher.tail.unsqueeze(-1)], -1)


def sft(token_logp: torch.Tensor, mask: torch.Tensor, n_tokens: Optional[float] = None) -> torch.Tensor:
    """Cross-entropy of the response tokens: mean −log q(y_t)."""
    return token_mean(-token_logp, mask, n_tokens)


def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
               n_tokens: Optional[float] = None) -> torch.Tensor:
    """Token-mean KL(p ‖ q) = Σ_a p(a) (log p(a) − log q(a)); p = teacher, q = student."""
    return token_mean(_p_log_ratio(teacher_logp, student_logp), mask, n_tokens)


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
               n_tokens: Optional[float] = None) -> torch.Tensor:
    """Token-mean KL(q ‖ p) = Σ_a q(a) (log q(a) − log p(a)); gradient flows through both q's."""
    return token_mean(_p_log_ratio(student_logp, teacher_logp), mask, n_tokens)


def total_variation(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
                    n_tokens: Optional[float] = None) -> torch.Tensor:
    """Token-mean TV(p, q) = ½ Σ_a |p(a) − q(a)|."""
    per_token = 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)
    return token_mean(per_token, mask, n_tokens)


def moment_gap(student_logp: torch.Tensor, teacher_logp: torch.Tensor, critic: torch.Tensor) -> torch.Tensor:
    """Per-token action-value moment gap δ_t = Σ_a (p* − q_θ)(a|s_t) · f(s_t, a)  -> (B, R).

    This is the AMMD summand (ALGORITHMS.md §1.3): the teacher's expected critic value minus
    the student's, taken exactly over the given support (full vocabulary or teacher top-k).
    """
    return ((teacher_logp.exp() - student_logp.exp()) * critic).sum(-1)


def moment_distance(student_logp: torch.Tensor, teacher_logp: torch.Tensor, critic: torch.Tensor,
                    mask: torch.Tensor, n_tokens: Optional[float] = None) -> torch.Tensor:
    """d_MM estimate under a fixed critic: token mean of δ_t."""
    return token_mean(moment_gap(student_logp, teacher_logp, critic), mask, n_tokens)


def policy_gradient(token_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    n_tokens: Optional[float] = None) -> torch.Tensor:
    """REINFORCE surrogate: token mean of −A_t · log q(y_t), advantages treated as constants."""
    return token_mean(-advantages.detach() * token_logp, mask, n_tokens)
