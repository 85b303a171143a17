"""Every evaluation metric, as pure functions (docs/algorithms.md#metrics).

Generated answers: ROUGE-L as in MiniLLM/distillm (rouge_score rougeL F-measure, stemmed, max over
references, mean x 100), exact match against any reference, per-family means, answer diversity, and
their mean ± std over sampling seeds.

Teacher-forced metrics, on log-prob tensors: TOP-1 agreement, UNC, ExAccErr and the collapse detectors.
Shapes: log-probs (B, R, V) over the full vocabulary at each response position, targets and masks
(B, R). OKD does not say how it aggregates over sequences [NF]; every mean here is over all masked
tokens of the set (the same token mean the training losses use) [R].
"""
from __future__ import annotations

import statistics
from functools import lru_cache

import torch

from rlkd.batch import pick


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(predictions: list[str], references: list[list[str]]) -> float:
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as reference lists, got {len(predictions)} and {len(references)}")
    scorer = _scorer()
    per_example = [max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs)
                   for pred, refs in zip(predictions, references)]
    return 100.0 * sum(per_example) / len(per_example)


def decode(tokenizer, responses: list[list[int]]) -> list[str]:
    """skip_special_tokens, '<n>' -> newline, strip (minillm evaluate_main.py)."""
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return [t.replace("<n>", "\n").strip() for t in texts]


def exact_match(predictions: list[str], references: list[list[str]]) -> list[float]:
    """Per example: 100 if the stripped prediction equals any reference exactly, else 0."""
    if len(predictions) != len(references):
        raise ValueError(f"need as many predictions as reference lists, got {len(predictions)} and {len(references)}")
    return [100.0 * any(p.strip() == r.strip() for r in refs) for p, refs in zip(predictions, references)]


def by_family(values: list[float], families: list[str | None]) -> dict[str, float]:
    """Mean of per-example values for each family (rows without one are left out)."""
    groups: dict[str, list[float]] = {}
    for v, f in zip(values, families):
        if f is not None:
            groups.setdefault(f, []).append(v)
    return {f: sum(vs) / len(vs) for f, vs in sorted(groups.items())}


def distinct_valid(samples_per_seed: list[list[str]], references: list[list[str]]) -> list[int]:
    """Per prompt: how many distinct *valid* answers it got across the eval seeds."""
    return [len({s[i].strip() for s in samples_per_seed} & {r.strip() for r in refs})
            for i, refs in enumerate(references)]


def answer_diversity(samples_per_seed: list[list[str]], references: list[list[str]]) -> float:
    """Mean over prompts of the number of distinct valid answers given across the eval seeds."""
    counts = distinct_valid(samples_per_seed, references)
    return sum(counts) / len(counts) if counts else 0.0


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def sample_scores(texts: list[str], responses: list[list[int]], refs, families, eos_id: int) -> dict:
    """One seed's scores: ROUGE-L, exact match (overall and per family), answer length and EOS rate."""
    em = exact_match(texts, refs)
    return {"rougeL": rouge_l(texts, refs), "exact_match": statistics.mean(em),
            "exact_match_family": by_family(em, families),
            "length": statistics.mean(len(r) for r in responses),
            "eos_rate": 100.0 * statistics.mean(bool(r) and r[-1] == eos_id for r in responses)}


def summarize(per_seed: list[dict], texts_per_seed: list[list[str]], refs, families) -> dict:
    """Mean ± std over seeds of every score, and answer diversity on rows with several valid answers."""
    out = {"per_seed": per_seed}
    for key in ("rougeL", "exact_match", "length", "eos_rate"):
        out[f"{key}_mean"], out[f"{key}_std"] = mean_std([s[key] for s in per_seed])
    fams = sorted(per_seed[0]["exact_match_family"])
    out["exact_match_family"] = {f: dict(zip(("mean", "std"), mean_std([s["exact_match_family"][f] for s in per_seed])))
                                 for f in fams}
    open_rows = [i for i, r in enumerate(refs) if len(r) > 1]
    if open_rows:  # diversity where several answers are valid: overall and per family
        counts = distinct_valid([[t[i] for i in open_rows] for t in texts_per_seed], [refs[i] for i in open_rows])
        out["answer_diversity"] = sum(counts) / len(counts)
        out["answer_diversity_family"] = by_family(counts, [families[i] for i in open_rows])
    return out


# ---- teacher-forced -------------------------------------------------------------------------

def top1_hits(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """1 where argmax p = argmax q (OKD eq. 3) -> (B, R) float."""
    return (teacher_logp.argmax(-1) == student_logp.argmax(-1)).float()


def unc(teacher_logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """UNC = 1 − p(gold token) under the teacher (OKD eq. 4; whose logits is unstated, the teacher's
    as in ATKD re-implementations [R]) -> (B, R)."""
    return 1 - pick(teacher_logp, targets).exp()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1))


def easy_hard_agreement(hits: torch.Tensor, uncertainty: torch.Tensor, mask: torch.Tensor
                        ) -> tuple[float, float, float]:
    """TOP-1 agreement on easy (UNC ≤ median) and hard (UNC > median) tokens, and the median.

    OKD does not give its threshold [NF]; the median of the evaluated tokens splits them in two
    halves [R]."""
    values = uncertainty[mask.bool()]
    threshold = float(values.median()) if values.numel() else 0.0
    easy = mask * (uncertainty <= threshold).float()
    hard = mask * (uncertainty > threshold).float()
    return masked_mean(hits, easy), masked_mean(hits, hard), threshold


def exacc_err(kl_on_student: torch.Tensor, mask_student: torch.Tensor, kl_on_teacher: torch.Tensor,
              mask_teacher: torch.Tensor, length: int) -> float:
    """ExAccErr(l) in % (OKD eqs. 5-7, `minillm/evaluate_exposure_bias.py`).

    KL(p ‖ q) at each position of student-generated (R) and teacher-generated (ε) responses is summed
    per sequence over its first l positions (none after its EOS), then averaged over sequences:
    ExAccErr = (R(l) − ε_cum(l)) / ε_cum(l) × 100, ε_cum(l) = l·ε(l).
    """
    def cumulative(kl, mask):
        return float((kl * mask)[:, :length].sum(1).mean())

    r, e = cumulative(kl_on_student, mask_student), cumulative(kl_on_teacher, mask_teacher)
    return (r - e) / e * 100 if e > 0 else float("nan")


def collapse_stats(logp: torch.Tensor, mask: torch.Tensor, all_reduce=lambda t: t) -> dict[str, float]:
    """Collapse detectors on one batch of next-token distributions (B, R, V), global over ranks.

    context_tv: mean over masked positions of TV(p_t, p̄), p̄ the batch-mean distribution; near 0 when
    the model's prediction no longer depends on its context. distinct_argmax: how many different
    tokens are argmax somewhere. entropy: mean next-token entropy (nats). `all_reduce` sums a tensor
    over ranks (identity on one rank)."""
    with torch.no_grad():
        p, m = logp.float().exp(), mask.float()
        n = all_reduce(m.sum()).clamp(min=1)
        mean_p = all_reduce((p * m.unsqueeze(-1)).sum((0, 1))) / n
        tv = 0.5 * (p - mean_p).abs().sum(-1)
        entropy = -(torch.where(p > 0, p * logp.float(), torch.zeros_like(p))).sum(-1)
        argmax = logp.argmax(-1)[m.bool()]
        hits = all_reduce(torch.bincount(argmax, minlength=logp.shape[-1]).float())
        sums = all_reduce(torch.stack([(tv * m).sum(), (entropy * m).sum()]))
        return {"context_tv": float(sums[0] / n), "entropy": float(sums[1] / n),
                "distinct_argmax": float((hits > 0).sum())}
