"""Per-method hyperparameters: one frozen section per method under `algo.` (e.g. `algo.gkd.beta`).

Each section validates itself (`validate(cfg)`, called for the selected method only).
Defaults are the published ones (their sources are in docs/algorithms.md, by method); [R] marks a value the papers
left open and rlkd chose. Only the section of `algo.method` is read by a run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rlkd.checks import check, one_of, positive, unit


@dataclass(frozen=True)
class AMMDConfig:
    beta: float = 0.5
    """Off-/on-policy mix: loss = beta*off + (1-beta)*on; 0 = on-policy only, 1 = off-policy only [R]."""
    critic_steps: int = 4
    """Critic (moment estimator) updates per student update (K) [R]."""
    critic_warmup_steps: int = 5
    """First steps that update only the critic (K times each), so the moment estimator nears its sup
    before the student moves (like OpenRLHF's critic-first freezing_steps); they count in train.steps."""
    critic_network: str = "linear"
    """Critic head: 'linear' (tanh-bounded linear head), 'mlp' (one hidden layer of its own) [R], or 'logratio'
    (the linear head plus a learned multiple of log p*(a) - log q(a) inside the tanh: log-ratio moments)."""
    critic_input: str = "teacher"
    """Hidden state the critic head reads: 'teacher' (shipped by the teacher actor with its scores) or
    'student' (the learner's forward; the student can collapse it to one constant vector) [R]."""
    critic_bound: float = 1.0
    """Critic output bound c: f = c*tanh(...) keeps the sup finite [R]."""
    critic_l2: float = 0.1
    """Norm control: penalty critic_l2 * E_t sum_a f(s_t, a)^2 on the critic's outputs; the optimal critic
    becomes (p* - q)/(2*critic_l2) instead of +-c, so it stays off tanh's flat tails [R]."""
    anchor_fkl: float = 0.0
    """Optional anchor: weight of forward KL(p* || q) on the off-policy batch in the student loss. Off by
    default; any value > 0 changes the method (a behaviour-cloning term, like pillbox's BC loss)."""
    off_policy: str = "teacher"
    """Off-policy sequences: 'teacher' (teacher-generated, as in the paper) or 'gold' (labelled)."""
    pg_coef: float = 0.0
    """Weight of the on-policy policy-gradient (long-term) part [R]; 0 by default: on the skills suite the
    whitened REINFORCE term made the student worse (README, AMMD ablations)."""
    whiten: bool = True
    """Whiten (zero mean, unit variance over the global batch) the on-policy returns [R, MiniLLM's trick]."""

    def validate(self, cfg) -> None:
        unit(self.beta, "algo.ammd.beta")
        positive(self, "algo.ammd", ["critic_steps", "critic_bound"])
        positive(self, "algo.ammd", ["pg_coef", "critic_warmup_steps", "critic_l2", "anchor_fkl"], allow_zero=True)
        check(self.critic_warmup_steps < cfg.train.steps, "algo.ammd.critic_warmup_steps", self.critic_warmup_steps,
              f"< train.steps={cfg.train.steps}")
        one_of(self.critic_network, "algo.ammd.critic_network", ["linear", "mlp", "logratio"])
        one_of(self.critic_input, "algo.ammd.critic_input", ["student", "teacher"])
        one_of(self.off_policy, "algo.ammd.off_policy", ["gold", "teacher"])


@dataclass(frozen=True)
class OKDConfig:
    alpha: float = 0.5
    """Teacher loss alpha*KL(p_s || p_ta) + (1-alpha)*CE(gold) (eq. 16); unreported, [R] from {0.5, 0.9}."""
    lora_rank: int = 32
    """Rank r of the teacher's LoRA (Section V-E chose 32)."""
    lora_scale: float = 4.0
    """LoRA scale s >= 1 (eq. 15; PEFT lora_alpha = s*r); unreported, [R] distillm's 64/16 = 4."""
    lora_targets: str = "q_proj,v_proj"
    """Comma-separated module names that get the LoRA: the query and value projections (Llama/Qwen names)."""
    student_loss: str = "fkl"
    """Student loss toward the adapted teacher: 'fkl' KL(p_ta || p_s) (eq. 17), or 'rkl' / 'jsd' (Table V)."""
    jsd_beta: float = 0.5
    """beta of the 'jsd' student loss, GKD/TRL convention (OKD does not give it: [R] TRL's default)."""
    teacher_lr: float = 1e-5
    """Learning rate of the teacher LoRA; 0 uses learner.student_lr (Algorithm 1: one shared eta). 1e-5 by
    measurement (docs/algorithms.md#okd): at the shared rate the teacher collapses onto the student [R]."""
    trust_kl: float = 0.0
    """Weight of a trust region on the teacher LoRA: + trust_kl * KL(p_ta || p_frozen) in its loss (0: off,
    the paper's loss). The drift itself is logged every step (okd/teacher_drift_kl, okd/teacher_top1_agree)."""

    def validate(self, cfg) -> None:
        unit(self.alpha, "algo.okd.alpha")
        positive(self, "algo.okd", ["lora_rank"])
        check(self.lora_scale >= 1, "algo.okd.lora_scale", self.lora_scale, ">= 1 (OKD eq. 15)")
        check(bool(self.lora_targets.strip()), "algo.okd.lora_targets", self.lora_targets,
              "comma-separated module names")
        one_of(self.student_loss, "algo.okd.student_loss", ["fkl", "jsd", "rkl"])
        unit(self.jsd_beta, "algo.okd.jsd_beta")
        positive(self, "algo.okd", ["teacher_lr", "trust_kl"], allow_zero=True)


@dataclass(frozen=True)
class GKDConfig:
    lmbda: float = 0.5
    """Probability that a step trains on fresh student generations (TRL `lmbda`)."""
    beta: float = 0.5
    """Generalized JSD(beta), TRL convention: 0 = forward KL(p || q), 1 = reverse KL(q || p)."""
    seq_kd: bool = False
    """Off-policy steps train on teacher generations (cached) instead of the gold responses."""
    temperature: float = 0.9
    """Sampling temperature of GKD's student generations (TRL default)."""

    def validate(self, cfg) -> None:
        unit(self.lmbda, "algo.gkd.lmbda")
        unit(self.beta, "algo.gkd.beta")
        positive(self, "algo.gkd", ["temperature"])


@dataclass(frozen=True)
class MiniLLMConfig:
    gamma: float = 0.95
    """Discount of the per-token rewards log p - log q in the long-term returns."""
    ppo_epochs: int = 4
    """PPO epochs (full-batch student updates) per generated batch."""
    clip: float = 0.2
    """PPO clip range of the importance ratio."""
    single_step_reg: bool = True
    """Add the exact single-step term KL(q_t || p_t) over the vocabulary."""
    teacher_mix_alpha: float = 0.2
    """Sample from alpha*p + (1-alpha)*q (teacher-mixed sampling, importance-weighted); 0 = pure student
    sampling. Needs rollout.backend=hf: both models must sit in one sampling loop."""
    length_norm: bool = True
    """Divide each return by the number of remaining response tokens (current one included)."""
    whiten: bool = True
    """Whiten the returns over the global batch."""
    reward_clip: float = 100.0
    """Clip each per-token reward to +-this (MiniLLM --cliprange-reward)."""

    def validate(self, cfg) -> None:
        unit(self.gamma, "algo.minillm.gamma")
        positive(self, "algo.minillm", ["ppo_epochs", "clip", "reward_clip"])
        unit(self.teacher_mix_alpha, "algo.minillm.teacher_mix_alpha", high_open=True)
        check(self.teacher_mix_alpha == 0 or cfg.rollout.backend == "hf", "algo.minillm.teacher_mix_alpha",
              self.teacher_mix_alpha, "0 with rollout.backend='vllm' (teacher-mixed sampling needs both models in "
              "one sampling loop, which only the 'hf' backend has)")


@dataclass(frozen=True)
class DistiLLMConfig:
    loss: str = "srkl"
    """'sfkl' = KL(p || lam*p + (1-lam)*q) or 'srkl' = KL(q || (1-lam)*p + lam*q)."""
    skew_lambda: float = 0.1
    """Skew lam of both losses (--skew-alpha)."""
    init_threshold: float = 0.0
    """Initial adaptive SGO threshold (GPT-2 scripts: 0.0; OpenLLaMA: 0.2)."""
    loss_eps: float = 0.1
    """Raise the threshold by 0.1 when the validation CE rises by at least this much (--loss-eps)."""
    capacity: int = 1000
    """Replay buffer capacity in sequences (FIFO)."""
    eval_every: int = 0
    """Steps between validation-loss checks; 0 = once per pass over the training data (distillm: per epoch)."""

    def validate(self, cfg) -> None:
        one_of(self.loss, "algo.distillm.loss", ["sfkl", "srkl"])
        unit(self.skew_lambda, "algo.distillm.skew_lambda", low_open=True, high_open=True)
        unit(self.init_threshold, "algo.distillm.init_threshold")
        positive(self, "algo.distillm", ["loss_eps", "capacity"])
        positive(self, "algo.distillm", ["eval_every"], allow_zero=True)
        check(self.capacity >= cfg.train.batch_size, "algo.distillm.capacity", self.capacity,
              f">= train.batch_size={cfg.train.batch_size}")


@dataclass(frozen=True)
class JSDConfig:
    lam: float = 0.9
    """distillm `js_distance` convention: m = (1-lam)*p + lam*q, loss = lam*KL(q||m) + (1-lam)*KL(p||m).
    lam = 0.9 equals GKD's beta = 0.1."""

    def validate(self, cfg) -> None:
        unit(self.lam, "algo.jsd.lam", low_open=True, high_open=True)


@dataclass(frozen=True)
class ImitKDConfig:
    capacity: int = 1000
    """Replay buffer (sequences): every step adds fresh student generations and trains on a random
    batch of the buffer, as distillm's `mixed-fkl --mixed-alpha 1.0` runs ImitKD."""

    def validate(self, cfg) -> None:
        check(self.capacity >= cfg.train.batch_size, "algo.imitkd.capacity", self.capacity,
              f">= train.batch_size={cfg.train.batch_size}")


@dataclass(frozen=True)
class OPDConfig:
    discount: float = 0.0
    """Discount γ of the per-token rewards log p(y_t) − log q_sampler(y_t) in the advantage; 0 (the Tinker
    cookbook's default): each token's advantage is its own reward."""
    is_cap: float = 2.0
    """Truncation cap of the importance ratio q_θ/q_sampler (it exceeds 1 only on stale samples)."""

    def validate(self, cfg) -> None:
        unit(self.discount, "algo.opd.discount")
        check(self.is_cap >= 1, "algo.opd.is_cap", self.is_cap, ">= 1 (on-policy ratios are 1)")
        check(cfg.rollout.top_p == 1, "rollout.top_p", cfg.rollout.top_p,
              "1 with algo.method=opd (its importance ratio needs the sampler's untruncated log-probs)")


@dataclass(frozen=True)
class AlgoConfig:
    method: str = "ammd"
    """Distillation method: one of rlkd.algorithms.METHODS (see the README's method table)."""
    ammd: AMMDConfig = field(default_factory=AMMDConfig)
    """AMMD: adversarial moment matching (the headline method)."""
    okd: OKDConfig = field(default_factory=OKDConfig)
    """OKD: online KD with a LoRA-adapted teacher trained in the learner group."""
    gkd: GKDConfig = field(default_factory=GKDConfig)
    """GKD: generalized JSD with an on-policy fraction."""
    minillm: MiniLLMConfig = field(default_factory=MiniLLMConfig)
    """MiniLLM: sequence-level reverse KL by PPO."""
    distillm: DistiLLMConfig = field(default_factory=DistiLLMConfig)
    """DistiLLM: skew KL with adaptive off-policy student generations."""
    jsd: JSDConfig = field(default_factory=JSDConfig)
    """JSD baseline on gold responses (distillm convention)."""
    imitkd: ImitKDConfig = field(default_factory=ImitKDConfig)
    """ImitKD: forward KL on replayed student generations."""
    opd: OPDConfig = field(default_factory=OPDConfig)
    """OPD: on-policy distillation with the teacher's log-prob of each sampled token as its reward."""
