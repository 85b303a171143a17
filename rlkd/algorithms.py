"""Methods: which sequences each one trains on (a schedule) and the objectives the learners run.

A `Method` is everything the controller and launcher need to know about a method; the learners
only ever see its objective callables. `build_method(cfg.algo, ...)` binds the config's
hyperparameters. Every method runs through the same actors, learners, data and outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from rlkd import objectives as obj
from rlkd.method_config import OKDConfig
from rlkd.schedules import (
    GOLD,
    MIXED,
    ROLLOUT,
    TEACHER_GEN,
    AdaptiveSGO,
    Fixed,
    OnPolicyMix,
)

# name -> one line (shown by validation errors and `--help-config`; the README has the full table)
METHODS: dict[str, str] = {
    "sft": "cross-entropy on gold responses",
    "fkl": "forward KL(p || q) on gold responses ('KD')",
    "rkl": "reverse KL(q || p) on gold responses",
    "jsd": "JSD, distillm convention (lam), on gold responses",
    "tvd": "total variation on gold responses",
    "seqkd": "cross-entropy on cached teacher generations",
    "gkd": "generalized JSD(beta), TRL convention, on-policy with probability lmbda",
    "imitkd": "forward KL on replayed student generations",
    "distillm": "skew (reverse) KL with adaptive student-generated outputs",
    "minillm": "sequence-level reverse KL by PPO, teacher-mixed sampling",
    "okd": "forward KL to a LoRA-adapted teacher trained online",
    "ammd": "adversarial moment matching of action values, on- and off-policy",
}

# the metric each method descends, for tests and benchmarks. MiniLLM: its exact single-step reverse KL
# (the whitened PPO surrogate carries no level). AMMD has none of its own: β·ammd/d_off + (1−β)·ammd/d_on.
DESCENDED_LOSS: dict[str, str] = {
    "sft": "loss/sft", "fkl": "loss/fkl", "rkl": "loss/rkl", "jsd": "loss/jsd", "tvd": "loss/tvd",
    "seqkd": "loss/sft", "gkd": "loss/gjsd", "imitkd": "loss/fkl", "distillm": "loss/srkl",
    "minillm": "loss/reg", "okd": "loss/student"}


@dataclass
class Method:
    name: str
    label: str  # shown in outputs, e.g. "ammd (gold off-policy data)"
    schedule: object  # rlkd.schedules: Fixed | OnPolicyMix | AdaptiveSGO (stateful, one per run)
    policy_objective: obj.Objective
    critic_objective: obj.Objective | None = None
    critic_heads: tuple[str, ...] = ()  # one critic head per named batch it scores
    critic_steps: int = 0  # K critic updates per student update
    critic_warmup_steps: int = 0  # first steps that train only the critic
    critic_input: str = "teacher"  # hidden state the critic reads: 'student' | 'teacher'
    needs_teacher_scores: bool = True
    policy_epochs: int = 1  # student updates per batch (PPO epochs)
    snapshot_old_logp: bool = False  # learners record log q_old before the first update (PPO)
    train_targets: tuple[str, ...] = ("student",)  # OKD: ('student', 'teacher')
    adapted_teacher: OKDConfig | None = None  # OKD: the learners hold the teacher with a LoRA
    rollout_temperature: float | None = None  # overrides rollout.temperature (GKD: 0.9)
    mix_alpha: float = 0.0  # MiniLLM teacher-mixed sampling
    validate_every: int = 0  # DistiLLM: steps between validation-CE checks (0: never)

    @property
    def uses_rollouts(self) -> bool:
        return bool(self.schedule.uses & {ROLLOUT, MIXED})

    @property
    def uses_teacher_generations(self) -> bool:
        return TEACHER_GEN in self.schedule.uses


def _gold(policy, label, **kw) -> Method:
    return Method(label, label, Fixed({"train": GOLD}), policy, **kw)


def _ammd(a, seed: int, **_) -> Method:
    x = a.ammd
    off_source = TEACHER_GEN if x.off_policy == "teacher" else GOLD
    sources = {k: v for k, v, w in (("off", off_source, x.beta), ("on", ROLLOUT, 1 - x.beta)) if w > 0}
    label = "ammd" if x.off_policy == "teacher" or x.beta == 0 else "ammd (gold off-policy data)"
    return Method("ammd", label, Fixed(sources),
                  partial(obj.ammd_policy_objective, beta=x.beta, pg_coef=x.pg_coef, whiten_returns=x.whiten,
                          bound=x.critic_bound, anchor=x.anchor_fkl),
                  critic_objective=partial(obj.ammd_critic_objective, beta=x.beta, l2=x.critic_l2),
                  critic_heads=tuple(sources),
                  critic_steps=x.critic_steps, critic_warmup_steps=x.critic_warmup_steps, critic_input=x.critic_input)


def _distillm(a, seed: int, total_steps: int, steps_per_epoch: int) -> Method:
    x = a.distillm
    sched = AdaptiveSGO(x.init_threshold, x.loss_eps, x.capacity, total_steps, seed)
    return Method("distillm", f"distillm (adaptive {x.loss})", sched,
                  partial(obj.divergence_objective, divergence=x.loss, lam=x.skew_lambda),
                  validate_every=x.eval_every or steps_per_epoch)


def _minillm(a, seed: int, **_) -> Method:
    x = a.minillm
    source = MIXED if x.teacher_mix_alpha > 0 else ROLLOUT
    return Method("minillm", "minillm", Fixed({"on": source}),
                  partial(obj.minillm_objective, gamma=x.gamma, clip=x.clip, single_step_reg=x.single_step_reg,
                          length_norm=x.length_norm, whiten_returns=x.whiten, reward_clip=x.reward_clip),
                  policy_epochs=x.ppo_epochs, snapshot_old_logp=True, mix_alpha=x.teacher_mix_alpha)


def _okd(a, seed: int, **_) -> Method:
    x = a.okd
    return Method("okd", f"okd (student {x.student_loss})", Fixed({"train": GOLD}),
                  partial(obj.okd_objective, alpha=x.alpha, student_loss=x.student_loss, jsd_beta=x.jsd_beta),
                  needs_teacher_scores=False, train_targets=("student", "teacher"), adapted_teacher=x)


def _gkd(a, seed: int, **_) -> Method:
    x = a.gkd
    return Method("gkd", "gkd" + (" (seq_kd)" if x.seq_kd else ""),
                  OnPolicyMix(x.lmbda, TEACHER_GEN if x.seq_kd else GOLD, seed),
                  partial(obj.divergence_objective, divergence="gjsd", beta=x.beta), rollout_temperature=x.temperature)


_BUILDERS = {
    "sft": lambda a, seed, **_: _gold(obj.sft_objective, "sft", needs_teacher_scores=False),
    "fkl": lambda a, seed, **_: _gold(partial(obj.divergence_objective, divergence="fkl"), "fkl"),
    "rkl": lambda a, seed, **_: _gold(partial(obj.divergence_objective, divergence="rkl"), "rkl"),
    "tvd": lambda a, seed, **_: _gold(partial(obj.divergence_objective, divergence="tvd"), "tvd"),
    "jsd": lambda a, seed, **_: _gold(partial(obj.divergence_objective, divergence="jsd", lam=a.jsd.lam), "jsd"),
    "seqkd": lambda a, seed, **_: Method("seqkd", "seqkd", Fixed({"train": TEACHER_GEN}), obj.sft_objective,
                                         needs_teacher_scores=False),
    "imitkd": lambda a, seed, **_: Method("imitkd", "imitkd", OnPolicyMix(1.0, GOLD, seed, a.imitkd.capacity),
                                          partial(obj.divergence_objective, divergence="fkl")),
    "gkd": _gkd,
    "distillm": _distillm,
    "minillm": _minillm,
    "okd": _okd,
    "ammd": _ammd,
}
assert set(_BUILDERS) == set(METHODS)


def build_method(algo, seed: int = 0, total_steps: int = 1, steps_per_epoch: int = 1) -> Method:
    """A fresh Method (its schedule holds per-run state) for `algo.method`, hyperparameters bound."""
    if algo.method not in METHODS:
        raise ValueError(f"unknown method {algo.method!r}; valid methods: {sorted(METHODS)}")
    return _BUILDERS[algo.method](algo, seed=seed, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
