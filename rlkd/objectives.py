"""Objectives the learners run: `fn(fwd, ctx, **hparams) -> (loss, metrics)`.

`fwd` maps a batch name ('train', 'on', 'off') to the `StudentForward` the learner computed for it.
Objectives only compose the pure functions of `rlkd.losses` / `rlkd.advantages`. Every number is
normalised by the *global* response-token count of its batch (ctx.n_tokens): one token mean over
the batch for every method (docs/algorithms.md#conventions), and summing over learner ranks gives the global
value. `loss` may be a dict {target: loss} when one forward pass trains two models (OKD).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlkd import losses
from rlkd.advantages import AllReduce, future_returns, whiten
from rlkd.batch import StudentForward, TeacherScores, pick

Objective = Callable[..., tuple]


@dataclass
class ObjectiveContext:
    n_tokens: dict[str, float]  # global response-token count of each named batch
    all_reduce: AllReduce | None = None  # sums a tensor over learner ranks


# ---------------------------------------------------------------------------------------------
# token-level baselines on one batch named 'train'

def sft_objective(fwd: dict[str, StudentForward], ctx: ObjectiveContext):
    """CE of the batch's response tokens (SFT on gold; SeqKD on teacher generations)."""
    f = fwd["train"]
    loss = losses.sft(f.token_logp, f.mask, ctx.n_tokens["train"])
    return loss, {"loss/sft": loss.detach()}


DIVERGENCES = {"fkl": losses.forward_kl, "rkl": losses.reverse_kl, "tvd": losses.total_variation,
               "jsd": losses.js_distance, "gjsd": losses.generalized_jsd,
               "sfkl": losses.skew_forward_kl, "srkl": losses.skew_reverse_kl}


def divergence_objective(fwd: dict[str, StudentForward], ctx: ObjectiveContext, divergence: str, **kw):
    """Token-mean divergence between the teacher and the student on the 'train' batch.

    `divergence` names a function of rlkd.losses (DIVERGENCES); `kw` are its hyperparameters
    (jsd: lam, gjsd: beta, sfkl/srkl: lam). Top-k teacher scores compare over the top-k + tail bins.
    """
    f = fwd["train"]
    s, t = losses.on_support(f.support_logp(), f.teacher, gathered=True)
    loss = DIVERGENCES[divergence](s, t, f.mask, n_tokens=ctx.n_tokens["train"], **kw)
    return loss, {f"loss/{divergence}": loss.detach()}


# ---------------------------------------------------------------------------------------------
# OKD (docs/algorithms.md#okd): one forward, two losses, two optimizer steps

def okd_objective(fwd: dict[str, StudentForward], ctx: ObjectiveContext, alpha: float, student_loss: str = "fkl",
                  jsd_beta: float = 0.5, trust_kl: float = 0.0):
    """Teacher (LoRA): α·KL(p_s ‖ p_ta) + (1−α)·CE(gold) [+ trust_kl·KL(p_ta ‖ p_frozen)], p_s detached.
    Student: KL(p_ta ‖ p_s) with p_ta detached ('rkl': KL(p_s ‖ p_ta); 'jsd': generalized JSD(β)). Both from
    the same, pre-update forward pass; the two graphs touch disjoint parameters, so each loss steps only its
    model. Reports the adapted teacher's drift from the frozen one (KL and TOP-1 agreement) when the
    learner computed the frozen log-probs."""
    f, n = fwd["train"], ctx.n_tokens["train"]
    ta, s = f.adapted_logp, f.logp
    kl_t = losses.forward_kl(ta, s.detach(), f.mask, n)  # forward_kl(x, y) = KL(y ‖ x)
    ce_t = losses.sft(pick(ta, f.targets), f.mask, n)
    teacher = alpha * kl_t + (1 - alpha) * ce_t
    metrics = {"okd/teacher_kl": kl_t.detach(), "okd/teacher_ce": ce_t.detach()}
    if f.frozen_logp is not None:
        drift = losses.reverse_kl(ta, f.frozen_logp, f.mask, n)  # KL(p_ta ‖ p_frozen), through p_ta only
        agree = (ta.detach().argmax(-1) == f.frozen_logp.argmax(-1)).float()
        metrics.update({"okd/teacher_drift_kl": drift.detach(),
                        "okd/teacher_top1_agree": losses.token_mean(agree, f.mask, n)})
        if trust_kl > 0:
            teacher = teacher + trust_kl * drift
    if student_loss == "fkl":
        student = losses.forward_kl(s, ta.detach(), f.mask, n)
    elif student_loss == "rkl":
        student = losses.reverse_kl(s, ta.detach(), f.mask, n)
    else:
        student = losses.generalized_jsd(s, ta.detach(), f.mask, jsd_beta, n)
    metrics.update({"loss/student": student.detach(), "loss/teacher": teacher.detach()})
    return {"student": student, "teacher": teacher}, metrics


# ---------------------------------------------------------------------------------------------
# MiniLLM (docs/algorithms.md#minillm), without the OpenWebText term

def minillm_objective(fwd: dict[str, StudentForward], ctx: ObjectiveContext, gamma: float, clip: float,
                      single_step_reg: bool, length_norm: bool, whiten_returns: bool, reward_clip: float):
    """PPO on the reward r_t = log p(y_t) − log q_old(y_t) (+ the exact single-step KL(q_t ‖ p_t)).

    Returns R_t = Σ_{t'≥t} γ^{t'−t} r_t', divided by the remaining length and whitened globally.
    Tokens drawn from the teacher mixture carry w = q_old / (α p + (1−α) q_old) on the ratio.
    """
    f, n = fwd["on"], ctx.n_tokens["on"]
    rewards = (f.teacher.token_logp - f.old_logp).clamp(-reward_clip, reward_clip)
    returns = future_returns(rewards, f.mask, gamma, include_current=True, length_normalize=length_norm)
    if whiten_returns:
        returns = whiten(returns, f.mask, ctx.all_reduce)
    weights = None if f.behavior_logprobs is None else (f.old_logp - f.behavior_logprobs).exp()
    pg = losses.ppo_clip(f.token_logp, f.old_logp, returns, f.mask, clip, weights, n)
    s, t = losses.on_support(f.support_logp(), f.teacher, gathered=True)
    reg = losses.reverse_kl(s, t, f.mask, n)
    total = pg + reg if single_step_reg else pg
    return total, {"loss/pg": pg.detach(), "loss/reg": reg.detach(), "loss/policy": total.detach(),
                   "minillm/reward": losses.token_mean(rewards, f.mask, n).detach()}


# ---------------------------------------------------------------------------------------------
# OPD (docs/algorithms.md#opd): on-policy distillation, as the Tinker cookbook's train_on_policy.py

def opd_objective(fwd: dict[str, StudentForward], ctx: ObjectiveContext, discount: float = 0.0, is_cap: float = 2.0):
    """Per-token advantage A_t = Σ_{t'≥t} γ^{t'−t}·(log p(y_t') − log q_sampler(y_t')) on the student's own
    samples (γ = `discount`, 0: A_t is the token's own reward), and the truncated importance-sampling loss
    −min(q_θ/q_sampler, cap)·A_t. Needs only the teacher's log-prob of each sampled token. On-policy its
    expected gradient is ∇ Σ_t KL(q_θ(·|s_t) ‖ p(·|s_t)) at the sampled states (tests/test_losses.py)."""
    f, n = fwd["on"], ctx.n_tokens["on"]
    if f.rollout_logprobs is None:
        raise ValueError("OPD needs the sampler's log-probs of its rollouts (rollout_logprobs)")
    rewards = f.teacher.token_logp - f.rollout_logprobs
    advantages = rewards if discount == 0 else future_returns(rewards, f.mask, discount, include_current=True)
    loss = losses.truncated_importance_sampling(f.token_logp, f.rollout_logprobs, advantages, f.mask, is_cap, n)
    metrics = {"loss/opd": loss.detach(), "opd/reward": losses.token_mean(rewards, f.mask, n).detach()}
    if f.teacher.logp is not None:  # the exact per-state KL(q ‖ p), reported, when more than the token is shipped
        s, t = losses.on_support(f.support_logp().detach(), f.teacher, gathered=True)
        metrics["opd/reverse_kl"] = losses.reverse_kl(s, t, f.mask, n)
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# AMMD (docs/algorithms.md#ammd, all [R]): min_θ max_f  β·d_off(θ, f_off) + (1−β)·d_on(θ, f_on)

def _critic_on_support(critic: torch.Tensor, teacher: TeacherScores) -> torch.Tensor:
    """f on the teacher's support; learners already evaluate it only at the top-k ids (then k wide)."""
    if teacher.index is None or critic.shape[-1] == teacher.index.shape[-1]:
        return critic
    return critic.gather(-1, teacher.index)


def ammd_gaps(f: StudentForward) -> torch.Tensor:
    """Per-token δ_t = Σ_a (p* − q)(a)·f(a) on the teacher's support (top-k: no tail bin, since
    the critic has no value for 'every other token') -> (B, R)."""
    s, t = losses.on_support(f.support_logp(), f.teacher, with_tail=False, gathered=True)
    return losses.moment_gap(s, t, _critic_on_support(f.critic, f.teacher))


def _weighted_distances(fwd, ctx, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    total, metrics = torch.zeros(()), {}
    for name, weight in _ammd_batches(beta):
        d = losses.token_mean(ammd_gaps(fwd[name]), fwd[name].mask, ctx.n_tokens[name])
        total = total + weight * d
        metrics[f"ammd/d_{name}"] = d.detach()
    return total, metrics


def _ammd_batches(beta: float) -> list[tuple[str, float]]:
    return [(name, w) for name, w in (("off", beta), ("on", 1.0 - beta)) if w > 0]


def ammd_critic_objective(fwd, ctx: ObjectiveContext, beta: float, l2: float = 0.0):
    """Critic (moment estimator) ascent on the weighted distance, under an L2 penalty on its outputs:
    loss = −(β d_off + (1−β) d_on) + l2·Σ_batches w·E_t Σ_a f(s_t, a)².

    With the penalty the per-state optimum is f = (p* − q)/(2·l2), clipped by the bound, instead of
    ±c·sign(p* − q): the critic stays off tanh's flat tails and its values scale with the gap [R].
    """
    total, _ = _weighted_distances(fwd, ctx, beta)  # the distances are reported by the policy step
    loss, metrics = -total, {"loss/critic": -total.detach()}
    if l2 > 0:
        penalty = sum(w * losses.token_mean(fwd[n].critic.float().pow(2).sum(-1), fwd[n].mask, ctx.n_tokens[n])
                      for n, w in _ammd_batches(beta))
        loss = loss + l2 * penalty
        metrics["ammd/critic_l2"] = penalty.detach()
    return loss, metrics


def ammd_policy_objective(fwd, ctx: ObjectiveContext, beta: float, pg_coef: float, whiten_returns: bool,
                          bound: float = 1.0, anchor: float = 0.0):
    """Student descent on β d_off + (1−β)(d_on + pg_coef·PG) [+ anchor·KL(p* ‖ q) on the off batch].

    The off-policy states are data, so d_off's gradient is exact through q. The on-policy states
    depend on θ: the long-term part is REINFORCE with reward −δ_t' summed over t' > t, divided by
    the number of summed tokens and whitened over the global batch (MiniLLM's variance reduction).
    `anchor` > 0 adds forward KL to the teacher (on the off-policy batch, else the on-policy one):
    a behaviour-cloning term that changes the method, off by default. Also reports the fraction of
    critic outputs within 1% of the bound (saturated tanh units) per batch.
    """
    total, metrics = _weighted_distances(fwd, ctx, beta)
    if beta < 1 and pg_coef > 0:
        on = fwd["on"]
        returns = future_returns(-ammd_gaps(on).detach(), on.mask)
        if whiten_returns:
            returns = whiten(returns, on.mask, ctx.all_reduce)
        pg = losses.policy_gradient(on.token_logp, returns, on.mask, ctx.n_tokens["on"], on.behavior_logprobs)
        total = total + (1 - beta) * pg_coef * pg
        metrics["loss/pg"] = pg.detach()
    if anchor > 0:
        name = "off" if beta > 0 else "on"
        s, t = losses.on_support(fwd[name].support_logp(), fwd[name].teacher, gathered=True)
        kl = losses.forward_kl(s, t, fwd[name].mask, n_tokens=ctx.n_tokens[name])
        total = total + anchor * kl
        metrics["loss/anchor_fkl"] = kl.detach()
    for name, _ in _ammd_batches(beta):
        f = fwd[name]  # the true TV bounds the estimate: d <= 2·bound·TV; the ratio is the critic's efficiency
        s, t = losses.on_support(f.support_logp().detach(), f.teacher, gathered=True)
        metrics[f"ammd/tv_{name}"] = losses.total_variation(s, t, f.mask, n_tokens=ctx.n_tokens[name])
        saturated = (f.critic.detach().abs() >= 0.99 * bound).float().mean(-1)
        metrics[f"ammd/critic_saturated_{name}"] = losses.token_mean(saturated, f.mask, ctx.n_tokens[name])
    metrics["loss/policy"] = total.detach()
    return total, metrics
