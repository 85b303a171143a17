"""The teacher's start-up probe: before step 1, every teacher replica scores the same few gold rows.

- A teacher that knows nothing is an error: if its cross-entropy of the gold tokens is within
  `UNIFORM_MARGIN` of log V (what a uniform distribution over the vocabulary scores), its weights did not
  load or the checkpoint is not a teacher. Trainers downstream would still "converge" on such a signal.
- Replicas must agree: the largest difference of their token log-probs must stay within teacher.probe_tol
  (a replica that loaded other weights, or a broken shard, shows up here, not as a noisy loss later).

The gold tokens' log-probs are shipped under every teacher.signal, so the probe works for all of them.
"""
from __future__ import annotations

import math

import ray

from rlkd.batch import SequenceBatch
from rlkd.checks import ConfigError

UNIFORM_MARGIN = 0.05  # a teacher whose gold CE is above (1 - margin) * log V is as good as uniform
PROBE_ROWS = 8


def check_scores(token_logps: list, mask, vocab_size: int, tol: float) -> dict:
    """The probe's verdict on each replica's (B, R) token log-probs; raises ConfigError. Returns the
    measured values (gold cross-entropy per replica, largest disagreement)."""
    n = mask.sum().item()
    ce = [-(lp * mask).sum().item() / n for lp in token_logps]
    uniform = math.log(vocab_size)
    for i, c in enumerate(ce):
        if c > (1 - UNIFORM_MARGIN) * uniform:
            raise ConfigError(f"teacher replica {i} scores the probe's gold tokens at {c:.2f} nats, within "
                              f"{UNIFORM_MARGIN:.0%} of log V = {uniform:.2f} (a uniform distribution): its weights did "
                              "not load, or model.teacher is not a trained teacher")
    gap = max(((lp - token_logps[0]).abs() * mask).max().item() for lp in token_logps)
    if gap > tol:
        raise ConfigError(f"teacher replicas disagree on the probe: token log-probs differ by up to {gap:.3g} > "
                          f"teacher.probe_tol={tol:g}; a replica loaded other weights or a broken shard "
                          f"(gold cross-entropy per replica: {[round(c, 3) for c in ce]})")
    return {"teacher/probe_gold_ce": ce[0], "teacher/probe_replica_gap": gap}


def probe(teachers, rows, pad_id: int, vocab_size: int, tol: float) -> dict:
    """Score PROBE_ROWS gold rows on every replica (ActorGroup of teacher actors) and check them."""
    rows = rows[:PROBE_ROWS]
    batch = SequenceBatch.collate([r.prompt_ids for r in rows], [r.response_ids for r in rows], pad_id)
    scores = ray.get([a.score.remote(batch) for a in teachers.actors])
    return check_scores([s.token_logp.float() for s in scores], batch.response_mask, vocab_size, tol)
