"""ROUGE-L as in MiniLLM/DistiLLM (ALGORITHMS.md §4.1): rouge_score rougeL F-measure, stemmed,
max over references per example, mean x 100 over the corpus."""
from __future__ import annotations

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
