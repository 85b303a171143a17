"""A teacher per data row (model.teachers): each row is scored, and answered, by its own teacher.

The rows of a learner shard are split by teacher, each part goes to its teacher's actors, and a small Ray task
puts the parts back in row order, so the merged scores still go from the teachers to the learners without
passing through the driver. The same task returns per-teacher statistics (the mean log-prob each teacher gives
the trained tokens, and its row count), which the step reports as teacher/<name>/*.
"""
from __future__ import annotations

from collections import defaultdict

import ray
import torch

from rlkd.batch import SequenceBatch, TeacherScores

DEFAULT = ""  # the group of model.teacher, for rows without a `teacher` field


def by_teacher(names: list[str | None]) -> dict[str, list[int]]:
    """Row indices per teacher name, in row order (None -> DEFAULT)."""
    out: dict[str, list[int]] = defaultdict(list)
    for i, name in enumerate(names):
        out[name or DEFAULT].append(i)
    return dict(out)


@ray.remote(num_cpus=0)
def merge(layout: list[tuple[str, list[int], torch.Tensor]], rows: int, *parts: TeacherScores):
    """(TeacherScores of all `rows` rows in order, {teacher: stats}) from the teachers' parts. layout[i] is
    (teacher name, the rows part i holds, their response mask)."""
    first = parts[0]
    merged = {}
    for name, value in vars(first).items():
        if isinstance(value, torch.Tensor):
            merged[name] = value.new_zeros((rows, *value.shape[1:]))
    for (_, index, _), part in zip(layout, parts):
        for name in merged:
            merged[name][torch.tensor(index)] = getattr(part, name)
    stats = {}
    for (teacher, _, mask), part in zip(layout, parts):
        s = stats.setdefault(teacher or "default", {"logp_sum": 0.0, "tokens": 0.0, "rows": 0.0})
        s["logp_sum"] += (part.token_logp.float() * mask).sum().item()
        s["tokens"] += mask.sum().item()
        s["rows"] += mask.shape[0]
    return TeacherScores(**{k: merged.get(k) for k in ("logp", "index", "tail", "token_logp", "hidden")}), stats


def submit_scores(groups: dict, batch: SequenceBatch, names: list[str | None], shards: int, hidden: bool):
    """Score `batch` (rows named by `names`) on each row's teacher group; returns (one ObjectRef of merged
    TeacherScores per learner shard, one ObjectRef of per-teacher stats per shard)."""
    scores, stats = [], []
    size = len(names) // shards
    for i, shard in enumerate(batch.shard(shards)):
        parts, layout = [], []
        for teacher, index in by_teacher(names[i * size:(i + 1) * size]).items():
            sub = shard.select(torch.tensor(index))
            parts += groups[teacher].spread("score", [(sub, hidden)], wait=False)
            layout.append((teacher, index, sub.response_mask))
        merged, stat = merge.options(num_returns=2).remote(layout, size, *parts)
        scores.append(merged)
        stats.append(stat)
    return scores, stats


def submit_generations(groups: dict, rows: list, seed: int, **kwargs) -> list[tuple[list, object]]:
    """Teacher generations of `rows`, each row by its teacher: [(the rows of one teacher, its Pending call)]."""
    out = []
    for teacher, index in by_teacher([r.teacher for r in rows]).items():
        part = [rows[i] for i in index]
        out.append((part, groups[teacher].submit("generate", [r.prompt_ids for r in part], seed, **kwargs)))
    return out


def metrics(stats: list[dict]) -> dict[str, float]:
    """teacher/<name>/token_logp (mean log-prob of the trained tokens under their teacher) and /rows."""
    total: dict[str, dict] = {}
    for shard in stats:
        for name, s in shard.items():
            t = total.setdefault(name, {"logp_sum": 0.0, "tokens": 0.0, "rows": 0.0})
            for k in t:
                t[k] += s[k]
    return {k: v for name, t in total.items() for k, v in
            ((f"teacher/{name}/token_logp", t["logp_sum"] / max(t["tokens"], 1.0)), (f"teacher/{name}/rows", t["rows"]))}
