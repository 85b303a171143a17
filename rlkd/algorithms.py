"""Methods: which sequences each one trains on (a schedule) and the objectives the learners run.

A `Method` is everything the controller and launcher need to know about a method; the learners
only ever see its objective callables. `build_method(cfg.algo, ...)` binds the config's
hyperparameters. Every method runs through the same actors, learners, data and outputs.
"""
from __future__ import annotations

from collections.abc import Callable
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
    critic_network: str = "linear"  # the critic head: 'linear' | 'mlp' | 'logratio'
    critic_bound: float = 1.0  # |f| <= critic_bound
    needs_teacher_scores: bool = True
    policy_epochs: int = 1  # student updates per batch (PPO epochs)
    snapshot_old_logp: bool = False  # learners record log q_old before the first update (PPO)
    train_targets: tuple[str, ...] = ("student",)  # OKD: ('student', 'teacher')
    adapted_teacher: OKDConfig | None = None  # OKD: the learners hold the teacher with a LoRA
    rollout_temperature: float | None = None  # overrides rollout.temperature (GKD: 0.9)
    mix_alpha: float = 0.0  # MiniLLM teacher-mixed sampling
    validate_every: int = 0  # DistiLLM: steps between validation-CE checks (0: never)
    signals: tuple[str, ...] = ("full", "topk")  # teacher signals it can use, the one 'auto' picks first

    @property
    def uses_rollouts(self) -> bool:
        return bool(self.schedule.uses & {ROLLOUT, MIXED})

    @property
    def uses_gold(self) -> bool:
        """Whether it trains on the data's answers (then data.labelled_rows limits its prompts)."""
        return GOLD in self.schedule.uses

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
                  critic_steps=x.critic_steps, critic_warmup_steps=x.critic_warmup_steps, critic_input=x.critic_input,
                  critic_network=x.critic_network, critic_bound=x.critic_bound)


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
                  partial(obj.okd_objective, alpha=x.alpha, student_loss=x.student_loss, jsd_beta=x.jsd_beta,
                          trust_kl=x.trust_kl),
                  needs_teacher_scores=False, train_targets=("student", "teacher"), adapted_teacher=x)


def _gkd(a, seed: int, **_) -> Method:
    x = a.gkd
    return Method("gkd", "gkd" + (" (seq_kd)" if x.seq_kd else ""),
                  OnPolicyMix(x.lmbda, TEACHER_GEN if x.seq_kd else GOLD, seed),
                  partial(obj.divergence_objective, divergence="gjsd", beta=x.beta), rollout_temperature=x.temperature)


def _opd(a, seed: int, **_) -> Method:
    x = a.opd  # samples at T = 1: the sampler's log-probs are then the student's own (docs/algorithms.md#opd)
    return Method("opd", "opd", Fixed({"on": ROLLOUT}),
                  partial(obj.opd_objective, discount=x.discount, is_cap=x.is_cap), rollout_temperature=1.0,
                  signals=("token", "topk", "full"))  # only the sampled token's log-prob is read


def _seqkd(a, seed: int, **_) -> Method:
    return Method("seqkd", "seqkd", Fixed({"train": TEACHER_GEN}), obj.sft_objective, needs_teacher_scores=False)


def _imitkd(a, seed: int, **_) -> Method:
    return Method("imitkd", "imitkd", OnPolicyMix(1.0, GOLD, seed, a.imitkd.capacity),
                  partial(obj.divergence_objective, divergence="fkl"))


@dataclass(frozen=True)
class MethodSpec:
    blurb: str  # one line, shown by validation errors and `--help-config` (the README has the full table)
    descended: str | None  # the metric the method descends, for tests and benchmarks (None: see below)
    build: Callable[..., Method]  # (cfg.algo, seed, total_steps, steps_per_epoch) -> a fresh Method


# Adding a method: one entry here, one section in rlkd/method_config.py (if it has hyperparameters; it
# validates itself) and one file in configs/methods/. MiniLLM descends its exact single-step reverse KL
# (the whitened PPO surrogate carries no level); AMMD has no loss of its own: β·ammd/d_off + (1−β)·ammd/d_on.
# OPD's exact reverse KL is reported only when the teacher ships more than the sampled token (its smoke config does).
METHODS: dict[str, MethodSpec] = {
    "sft": MethodSpec("cross-entropy on gold responses", "loss/sft",
                      lambda a, seed, **_: _gold(obj.sft_objective, "sft", needs_teacher_scores=False)),
    "fkl": MethodSpec("forward KL(p || q) on gold responses ('KD')", "loss/fkl",
                      lambda a, seed, **_: _gold(partial(obj.divergence_objective, divergence="fkl"), "fkl")),
    "rkl": MethodSpec("reverse KL(q || p) on gold responses", "loss/rkl",
                      lambda a, seed, **_: _gold(partial(obj.divergence_objective, divergence="rkl"), "rkl")),
    "jsd": MethodSpec("JSD, distillm convention (lam), on gold responses", "loss/jsd",
                      lambda a, seed, **_: _gold(partial(obj.divergence_objective, divergence="jsd", lam=a.jsd.lam),
                                                 "jsd")),
    "tvd": MethodSpec("total variation on gold responses", "loss/tvd",
                      lambda a, seed, **_: _gold(partial(obj.divergence_objective, divergence="tvd"), "tvd")),
    "seqkd": MethodSpec("cross-entropy on cached teacher generations", "loss/sft", _seqkd),
    "gkd": MethodSpec("generalized JSD(beta), TRL convention, on-policy with probability lmbda", "loss/gjsd", _gkd),
    "imitkd": MethodSpec("forward KL on replayed student generations", "loss/fkl", _imitkd),
    "distillm": MethodSpec("skew (reverse) KL with adaptive student-generated outputs", "loss/srkl", _distillm),
    "minillm": MethodSpec("sequence-level reverse KL by PPO, teacher-mixed sampling", "loss/reg", _minillm),
    "opd": MethodSpec("on-policy distillation: reward log p(y_t) - log q(y_t) per sampled token", "opd/reverse_kl",
                      _opd),
    "okd": MethodSpec("forward KL to a LoRA-adapted teacher trained online", "loss/student", _okd),
    "ammd": MethodSpec("adversarial moment matching of action values, on- and off-policy", None, _ammd),
}


def teacher_signal(teacher, method: Method, vocab_size: int) -> tuple[str, int]:
    """(signal, k) the teacher actors ship for `method` (teacher.signal 'auto' resolved; k = 0 unless 'topk').
    Raises ConfigError for a k the vocabulary cannot serve."""
    from rlkd.checks import check
    from rlkd.config import DEFAULT_LARGE_VOCAB_TOPK

    signal = teacher.signal
    if signal == "auto":
        signal = method.signals[0]
        if signal == "full" and (teacher.backend == "vllm" or teacher.topk_for(vocab_size)):
            signal = "topk"  # vLLM serves top-k only; HF past 32,768 tokens ships the top 64
    if signal != "topk":
        return signal, 0
    k = teacher.topk_for(vocab_size) or DEFAULT_LARGE_VOCAB_TOPK
    check(k <= vocab_size, "teacher.topk", k, f"<= the vocabulary's {vocab_size} tokens (teacher.signal='topk')")
    return signal, k


def build_method(algo, seed: int = 0, total_steps: int = 1, steps_per_epoch: int = 1) -> Method:
    """A fresh Method (its schedule holds per-run state) for `algo.method`, hyperparameters bound."""
    if algo.method not in METHODS:
        raise ValueError(f"unknown method {algo.method!r}; valid methods: {sorted(METHODS)}")
    return METHODS[algo.method].build(algo, seed=seed, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
