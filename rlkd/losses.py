"""Pure distillation losses: functions of tensors only, no models, no distributed state.

Conventions:
- `student_logp`, `teacher_logp` are log-probabilities over the *same support* on the last axis:
  the full vocabulary, or the teacher's top-k (+ optional tail bin), see `on_support`.
- `mask` is (B, R) over response tokens. Every loss is a token mean over the response tokens of
  the batch: sum(per_token * mask) / n_tokens. Pass `n_tokens` = the *global* token count so that
  sharded learners reproduce the single-rank loss exactly; it defaults to mask.sum().
"""
from __future__ import annotations

import math

import torch

from rlkd.batch import TeacherScores


def token_mean(per_token: torch.Tensor, mask: torch.Tensor, n_tokens: float | None = None) -> torch.Tensor:
    """Σ per_token·mask / n_tokens (n_tokens defaults to the mask's own count)."""
    denom = mask.sum() if n_tokens is None else torch.as_tensor(n_tokens, dtype=per_token.dtype)
    return (per_token * mask).sum() / denom.clamp(min=1)


def per_token_kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) = Σ_x a(x) (log a(x) − log b(x)) over the last axis, with 0·log 0 = 0 -> (B, R)."""
    p = logp_a.exp()
    return torch.where(p > 0, p * (logp_a - logp_b), torch.zeros_like(p)).sum(-1)


def _log1mexp_sum(logp: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ_a exp(logp_a)) over the last axis: the log mass outside the given entries."""
    return torch.log((1 - logp.exp().sum(-1)).clamp(min=1e-12))


def on_support(student_logp: torch.Tensor, teacher: TeacherScores, with_tail: bool = True, gathered: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs over the teacher's support.

    Full teacher: both (B, R, V). Top-k teacher: the student is gathered at the teacher's top-k
    ids (`gathered`: it already was, (B, R, k)); with `with_tail` both get one more bin holding the
    remaining mass, so a divergence over the k+1 bins is the exact divergence of the two
    distributions coarsened to those bins.
    """
    if teacher.index is None:
        return student_logp, teacher.logp
    s = student_logp if gathered else student_logp.gather(-1, teacher.index)
    if not with_tail:
        return s, teacher.logp
    s_tail = _log1mexp_sum(s).unsqueeze(-1)
    return torch.cat([s, s_tail], -1), torch.cat([teacher.logp, teacher.tail.unsqueeze(-1)], -1)


def sft(token_logp: torch.Tensor, mask: torch.Tensor, n_tokens: float | None = None) -> torch.Tensor:
    """Cross-entropy of the response tokens: mean −log q(y_t)."""
    return token_mean(-token_logp, mask, n_tokens)


def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
               n_tokens: float | None = None) -> torch.Tensor:
    """Token-mean KL(p ‖ q) = Σ_a p(a) (log p(a) − log q(a)); p = teacher, q = student."""
    return token_mean(per_token_kl(teacher_logp, student_logp), mask, n_tokens)


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
               n_tokens: float | None = None) -> torch.Tensor:
    """Token-mean KL(q ‖ p) = Σ_a q(a) (log q(a) − log p(a)); gradient flows through both q's."""
    return token_mean(per_token_kl(student_logp, teacher_logp), mask, n_tokens)


def total_variation(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
                    n_tokens: float | None = None) -> torch.Tensor:
    """Token-mean TV(p, q) = ½ Σ_a |p(a) − q(a)|."""
    per_token = 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)
    return token_mean(per_token, mask, n_tokens)


def _log_mix(logp_a: torch.Tensor, logp_b: torch.Tensor, w_a: float) -> torch.Tensor:
    """log(w_a·a + (1 − w_a)·b), computed stably from log-probs (0 < w_a < 1)."""
    return torch.logaddexp(logp_a + math.log(w_a), logp_b + math.log1p(-w_a))


def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
                    beta: float = 0.5, n_tokens: float | None = None) -> torch.Tensor:
    """GKD's generalized JSD(β), TRL convention (`generalized_jsd_loss`), token mean.

    m = β·p + (1−β)·q; loss = β·KL(p ‖ m) + (1−β)·KL(q ‖ m). As in TRL, the endpoints are special
    cases (the mixture formula vanishes there): β = 0 is KL(p ‖ q) (forward), β = 1 is KL(q ‖ p).
    """
    if beta == 0:
        return forward_kl(student_logp, teacher_logp, mask, n_tokens)
    if beta == 1:
        return reverse_kl(student_logp, teacher_logp, mask, n_tokens)
    m = _log_mix(teacher_logp, student_logp, beta)
    per_token = beta * per_token_kl(teacher_logp, m) + (1 - beta) * per_token_kl(student_logp, m)
    return token_mean(per_token, mask, n_tokens)


def js_distance(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
                lam: float = 0.9, n_tokens: float | None = None) -> torch.Tensor:
    """DistiLLM's `js_distance(lam)` convention, token mean.

    m = (1−λ)·p + λ·q; loss = λ·KL(q ‖ m) + (1−λ)·KL(p ‖ m). It equals generalized_jsd with
    β = 1 − λ (distillm's λ = 0.9 is GKD's β = 0.1); gradient flows through q inside m too.
    """
    m = _log_mix(teacher_logp, student_logp, 1 - lam)
    per_token = lam * per_token_kl(student_logp, m) + (1 - lam) * per_token_kl(teacher_logp, m)
    return token_mean(per_token, mask, n_tokens)


def skew_forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
                    lam: float = 0.1, n_tokens: float | None = None) -> torch.Tensor:
    """DistiLLM skew KL: KL(p ‖ λp + (1−λ)q), token mean.

    distillm's `skewed_forward_kl` returns the cross-entropy −Σ p log m; this is that minus the
    constant Σ p log p, so the gradient is the same and the value is a true divergence (>= 0).
    """
    m = _log_mix(teacher_logp, student_logp, lam)
    return token_mean(per_token_kl(teacher_logp, m), mask, n_tokens)


def skew_reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
                    lam: float = 0.1, n_tokens: float | None = None) -> torch.Tensor:
    """DistiLLM skew reverse KL: KL(q ‖ (1−λ)p + λq), token mean (`skewed_reverse_kl`)."""
    m = _log_mix(teacher_logp, student_logp, 1 - lam)
    return token_mean(per_token_kl(student_logp, m), mask, n_tokens)


def moment_gap(student_logp: torch.Tensor, teacher_logp: torch.Tensor, critic: torch.Tensor) -> torch.Tensor:
    """Per-token action-value moment gap δ_t = Σ_a (p* − q_θ)(a|s_t) · f(s_t, a)  -> (B, R).

    This is the AMMD summand (docs/algorithms.md#ammd): the teacher's expected critic value minus
    the student's, taken exactly over the given support (full vocabulary or teacher top-k).
    """
    return ((teacher_logp.exp() - student_logp.exp()) * critic).sum(-1)


def policy_gradient(token_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    n_tokens: float | None = None, behavior_logp: torch.Tensor | None = None,
                    max_weight: float = 2.0) -> torch.Tensor:
    """REINFORCE surrogate: token mean of −w_t·A_t·log q(y_t), advantages treated as constants. Tokens
    sampled by another policy μ (`behavior_logp`, a stale rollout) get w_t = min(q(y_t)/μ(y_t), max_weight),
    detached (truncated per-token importance sampling); w = 1 otherwise."""
    weights = 1.0 if behavior_logp is None else (token_logp.detach() - behavior_logp).exp().clamp(max=max_weight)
    return token_mean(-weights * advantages.detach() * token_logp, mask, n_tokens)


def truncated_importance_sampling(token_logp: torch.Tensor, sampler_logp: torch.Tensor, advantages: torch.Tensor,
                                  mask: torch.Tensor, cap: float = 2.0, n_tokens: float | None = None) -> torch.Tensor:
    """Importance-sampling policy loss, token mean of −ρ_t·A_t with ρ_t = q_θ(y_t) / q_sampler(y_t) (Tinker's
    `importance_sampling` loss). Truncated: a token with ρ_t > cap (a stale sample) counts with weight cap,
    i.e. value −min(ρ, cap)·A and gradient −min(ρ, cap)·A·∇log q_θ. Advantages are constants."""
    ratio = (token_logp - sampler_logp.detach()).exp()
    scale = (ratio.clamp(max=cap) / ratio).detach()  # 1 below the cap; keeps the value and gradient truncated
    return token_mean(-scale * ratio * advantages.detach(), mask, n_tokens)


def ppo_clip(token_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
             clip: float = 0.2, weights: torch.Tensor | None = None,
             n_tokens: float | None = None) -> torch.Tensor:
    """PPO clipped surrogate, token mean (MiniLLM `_pg_loss`).

    ratio = exp(log q − log q_old)·w, where w is an importance weight for tokens sampled from another
    distribution (MiniLLM's teacher-mixed sampling; 1 otherwise). loss = max(−A·ratio, −A·clip(ratio)).
    """
    ratio = (token_logp - old_logp.detach()).exp()
    if weights is not None:
        ratio = ratio * weights.detach()
    a = advantages.detach()
    per_token = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip, 1 + clip))
    return token_mean(per_token, mask, n_tokens)
