"""Training invariants checked every step: a metric `invariant/<name>` (1 holds, 0 broken) for
metrics.jsonl, TensorBoard and the Prometheus gauges, and one warning line when an invariant stays
broken for `patience` steps in a row, naming what broke and the config fields to look at.

Each check reads the step's metrics and returns None when its inputs are absent (e.g. no critic
step yet, or a method without a critic), so the same watch serves every method.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Invariant:
    name: str
    check: Callable[[dict], bool | None]
    advice: str


def _distances_nonnegative(m: dict, tol: float = 0.02) -> bool | None:
    d = [v for k, v in m.items() if k.startswith("ammd/d_")]
    return None if not d else min(d) >= -tol


def _critic_unsaturated(m: dict, limit: float = 0.5) -> bool | None:
    s = [v for k, v in m.items() if k.startswith("ammd/critic_saturated_")]
    return None if not s else max(s) <= limit


def _student_keeps_context(m: dict, ratio: float = 0.25) -> bool | None:
    """Student context TV at least `ratio` of the teacher's on the same batch (full-vocabulary teacher)."""
    pairs = [(v, m.get(k.replace("student_", "teacher_"))) for k, v in m.items()
             if k.startswith("collapse/student_context_tv_")]
    pairs = [(s, t) for s, t in pairs if t is not None]
    return None if not pairs else all(s >= ratio * t for s, t in pairs)


def _okd_teacher_stays_close(m: dict, agreement: float = 0.8) -> bool | None:
    """OKD: the adapted teacher's argmax agrees with the frozen teacher's on at least `agreement` of tokens."""
    a = m.get("okd/teacher_top1_agree")
    return None if a is None else a >= agreement


INVARIANTS = (
    Invariant("critic_keeps_up", _distances_nonnegative,
              "the estimated AMMD distances are negative after the critic steps (a zero critic would score 0): "
              "the critic falls behind the student; raise learner.critic_lr or algo.ammd.critic_steps, or lower "
              "learner.student_lr"),
    Invariant("critic_unsaturated", _critic_unsaturated,
              "over half of the critic's outputs sit on tanh's flat tails (|f| >= 0.99 c): raise "
              "algo.ammd.critic_l2 or lower learner.critic_lr"),
    Invariant("student_keeps_context", _student_keeps_context,
              "the student's next-token distribution barely depends on its context (context TV < 1/4 of the "
              "teacher's): a collapse; look at learner.student_lr, algo.ammd.critic_input, algo.ammd.pg_coef"),
    Invariant("okd_teacher_stays_close", _okd_teacher_stays_close,
              "OKD's adapted teacher has drifted from the teacher (its top-1 token differs on over 20% of tokens): "
              "it is collapsing onto the student; lower algo.okd.teacher_lr or algo.okd.alpha, or set "
              "algo.okd.trust_kl"),
)


class InvariantWatch:
    def __init__(self, log: Callable[[str], None], patience: int = 3, invariants=INVARIANTS):
        self.log, self.patience, self.invariants = log, patience, invariants
        self.broken_for = {i.name: 0 for i in invariants}

    def update(self, step: int, metrics: dict) -> dict[str, float]:
        """The step's `invariant/<name>` metrics; warns once per streak of `patience` broken steps."""
        out = {}
        for inv in self.invariants:
            ok = inv.check(metrics)
            if ok is None:
                continue
            out[f"invariant/{inv.name}"] = float(ok)
            self.broken_for[inv.name] = 0 if ok else self.broken_for[inv.name] + 1
            if self.broken_for[inv.name] == self.patience:
                self.log(f"WARNING step {step}: invariant {inv.name} broken for {self.patience} steps: {inv.advice}")
        return out
