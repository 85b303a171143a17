"""Scores of generated answers: ROUGE-L as in MiniLLM/DistiLLM (docs/algorithms.md#metrics: rouge_score rougeL
F-measure, stemmed, max over references, mean x 100), exact match against any reference, per-family
means, answer diversity, and their mean ± std over sampling seeds."""
from __future__ import annotations

import statistics
from functools import lru_cache


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
