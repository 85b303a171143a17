"""Methods: which sequences each one trains on, and the objectives the learners run.

An objective is `fn(fwd, ctx, **hparams) -> (loss, metrics)` where `fwd` maps a batch name
("gold", "on", "off") to the `StudentForward` the learner computed for it. Objectives only compose
the pure functions of `rlkd.losses` / `rlkd.advantages`. Every returned number is normalised by
the *global* token count (ctx.n_tokens), so summing it over learner ranks gives the global value.
The learner never names a method: the controller hands it these callables.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch

from rlkd import losses
from rlkd.advantages import AllReduce, future_returns, whiten
from rlkd.batch import StudentForward, TeacherScores

Objective = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]

# where the sequences of a named batch come from
ROLLOUT, TEACHER_GEN, GOLD = "rollout", "teacher_generated", "gold"


@dataclass
class ObjectiveContext:
    n_tokens: dict[str, float]  # global response-token count of each named batch
    all_reduce: Optional[AllReduce] = None  # sums a tensor over learner ranks


@dataclass(frozen=True)
class Method:
    name: str
    sources: dict[str, str]  # batch name -> ROLLOUT | TEACHER_GEN | GOLD
    policy_objective: Objective
    critic_objective: Optional[Objective] = None
    critic_heads: tuple[str, ...] = ()  # one critic head per named batch it scores
    needs_teacher_scores: bool = True
    label: str = ""  # shown in outputs, e.g. "ammd (gold off-policy data)"
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# baselines


def sft_objective(fwd: dict[str, StudentForward], ctx: ObjectiveContext):
    f = fwd["gold"]
    loss = losses.sft(f.token_logp, f.mask, ctx.n_tokens["gold"])
    return loss, {"loss/sft": loss.detach()}


def _divergence_objective(fwd: dict[str, StudentForward], ctx: ObjectiveContext, divergence, name: str):
    f = fwd["gold"]
    s, t = losses.on_support(f.logp, f.teacher)
    loss = divergence(s, t, f.mask, ctx.n_tokens["gold"])
    return loss, {f"loss/{name}": loss.detach()}


fkl_objective = partial(_divergence_objective, divergence=losses.forward_kl, name="fkl")
rkl_objective = partial(_divergence_objective, divergence=losses.reverse_kl, name="rkl")


# ---------------------------------------------------------------------------------------------
# AMMD (ALGORITHMS.md §1.3, all [R]): min_θ max_f  β·d_off(θ, f_off) + (1−β)·d_on(θ, f_on)


def _critic_on_support(critic: torch.Tensor, teacher: TeacherScores) -> torch.Tensor:
    return critic if teacher.index is None else critic.gather(-1, teacher.index)


def ammd_gaps(f: StudentForward) -> torch.Tensor:
    """Per-token δ_t = Σ_a (p* − q)(a)·f(a) on the teacher's support (top-k: no tail bin, since
    the critic has no value for 'every other token') -> (B, R)."""
    s, t = losses.on_support(f.logp, f.teacher, with_tail=False)
    return losses.moment_gap(s, t, _critic_on_support(f.critic, f.teacher))


def _weighted_distances(fwd, ctx, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    total, metrics = torch.zeros(()), {}
    for name, weight in (("off", beta), ("on", 1.0 - beta)):
        if weight == 0:
            continue
        d = losses.token_mean(ammd_gaps(fwd[name]), fwd[name].mask, ctx.n_tokens[name])
        total = total + weight * d
        metrics[f"ammd/d_{name}"] = d.detach()
    return total, metrics


def ammd_critic_objective(fwd, ctx: ObjectiveContext, beta: float):
    """Critic (moment estimator) ascent on the weighted distance: loss = −(β d_off + (1−β) d_on)."""
    total, _ = _weighted_distances(fwd, ctx, beta)  # the distances are reported by the policy step
    return -total, {"loss/critic": -total.detach()}


def ammd_policy_objective(fwd, ctx: ObjectiveContext, beta: float, pg_coef: float, whiten_returns: bool):
    """Student descent on β d_off + (1−β)(d_on + pg_coef·PG).

    The off-policy states are data, so d_off's gradient is exact through q. The on-policy states
    depend on θ: the long-term part is REINFORCE with reward −δ_t' summed over t' > t, divided by
    the number of summed tokens and whitened over the global batch (MiniLLM's variance reduction).
    """
    total, metrics = _weighted_distances(fwd, ctx, beta)
    if beta < 1 and pg_coef > 0:
        on = fwd["on"]
        returns = future_returns(-ammd_gaps(on).detach(), on.mask)
        if whiten_returns:
            returns = whiten(returns, on.mask, ctx.all_reduce)
        pg = losses.policy_gradient(on.token_logp, returns, on.mask, ctx.n_tokens["on"])
        total = total + (1 - beta) * pg_coef * pg
        metrics["loss/pg"] = pg.detach()
    metrics["loss/policy"] = total.detach()
    return total, metrics


# ---------------------------------------------------------------------------------------------
# registry


def build_method(name: str, beta: float = 0.5, pg_coef: float = 1.0, whiten_returns: bool = True,
                 off_policy: str = "teacher") -> Method:
    """The Method for `name`, with its hyperparameters bound into the objectives."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {sorted(METHODS)}")
    if name == "ammd":
        off_source = TEACHER_GEN if off_policy == "teacher" else GOLD
        sources = {k: v for k, v, w in (("off", off_source, beta), ("on", ROLLOUT, 1 - beta)) if w > 0}
        label = "ammd" if off_policy == "teacher" or beta == 0 else "ammd (gold off-policy data)"
        return Method(name, sources,
                      policy_objective=partial(ammd_policy_objective, beta=beta, pg_coef=pg_coef,
                                               whiten_returns=whiten_returns),
                      critic_objective=partial(ammd_critic_objective, beta=beta),
                      critic_heads=tuple(sources), label=label)
    return METHODS[name]


METHODS: dict[str, Optional[Method]] = {
    "sft": Method("sft", {"gold": GOLD}, sft_objective, needs_teacher_scores=False, label="sft"),
    "fkl": Method("fkl", {"gold": GOLD}, fkl_objective, label="fkl"),
    "rkl": Method("rkl", {"gold": GOLD}, rkl_objective, label="rkl"),
    "ammd": None,  # built by build_method: its sources depend on beta and off_policy
}
