"""Sampling from a model directory inside a Ray task (evaluation)."""
from __future__ import annotations

from rlkd.sampling import hf_generate


def generate_from_dir(model_dir: str, prompts: list[list[int]], pad_id: int, eos_id: int, max_new_tokens: int,
                      seed: int, no_repeat_ngram_size: int = 0, trust_remote_code: bool = False,
                      vocab_size: int | None = None, temperature: float = 1.0) -> list[list[int]]:
    """Load a model directory and sample from it (evaluation: run as a Ray task, see rlkd.launch);
    temperature 0 decodes greedily."""
    from rlkd.models import load_model, use_allotted_threads

    use_allotted_threads()
    model = load_model(model_dir, trust_remote_code).eval()
    responses, _ = hf_generate(model, prompts, pad_id, eos_id, max_new_tokens, temperature, seed=seed,
                               no_repeat_ngram_size=no_repeat_ngram_size, vocab_size=vocab_size)
    return responses
