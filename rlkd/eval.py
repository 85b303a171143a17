"""`python -m rlkd.eval`: ROUGE-L over seeds, and teacher agreement metrics, for any HF model directory.

    python -m rlkd.eval --model DIR [--teacher DIR] --data FILE.jsonl [--seeds 10,20,30]
                        [--max-examples N] --out DIR [--backend hf|vllm]

Generation follows MiniLLM's protocol (docs/algorithms.md#metrics) and runs in a rollout actor, batched.
With --teacher, teacher-forced metrics on the first reference.

Training's evaluations (teacher, student before and after, and the periodic validation score) use the
same scoring (`score_responses`) through `evaluate_model`. Like rlkd.launch, this is an entry point
(composition root), so it may import actors/.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from rlkd.config import Config, ConfigError
from rlkd.data import DataError, prompt_summary, read_examples, tokenize
from rlkd.metrics import decode, exact_match, sample_scores, summarize
from rlkd.models import check_model_dir, check_same_tokenizer, load_tokenizer
from rlkd.outputs import check_writable_dir


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m rlkd.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF causal-LM directory to evaluate")
    ap.add_argument("--teacher", help="HF directory of the teacher (adds agreement, KL, ExAccErr)")
    ap.add_argument("--data", required=True, help="JSONL: instruction, [input|context], output (str or list)")
    ap.add_argument("--seeds", default="10,20,30", help="comma-separated sampling seeds, one run each")
    ap.add_argument("--max-examples", type=int, default=0, help="evaluate the first N usable rows (0 = all)")
    ap.add_argument("--out", required=True, help="directory for eval.json and eval.md")
    ap.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="rollout actor engine")
    ap.add_argument("--max-prompt-tokens", type=int, default=256, help="longer prompts are cut in the middle to this")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="generation length limit")
    ap.add_argument("--no-repeat-ngram-size", type=int, default=6, help="MiniLLM default 6; 0 disables")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per teacher-forced scoring call")
    args = ap.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds={args.seeds!r} is invalid: comma-separated integers") from None
    if not args.seeds:
        raise ConfigError("--seeds is empty: give at least one integer seed")
    for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 1),
                             ("--max-prompt-tokens", args.max_prompt_tokens, 1), ("--batch-size", args.batch_size, 1),
                             ("--max-examples", args.max_examples, 0),
                             ("--no-repeat-ngram-size", args.no_repeat_ngram_size, 0)):
        if value < low:  # checked before any model is loaded or any generation runs
            raise ConfigError(f"{flag}={value} is invalid: an integer >= {low}")
    if args.backend == "vllm" and args.no_repeat_ngram_size:
        raise ConfigError("--backend=vllm is invalid with --no-repeat-ngram-size > 0 (vLLM has no n-gram "
                          "blocking); use --backend hf or --no-repeat-ngram-size 0")
    return args


def teacher_metrics(teacher_dir, model_dir, vocab, pad_id, eos_id, prompts, references, student_samples, max_new,
                    seed, batch_size, no_repeat_ngram_size=0) -> dict:
    """TOP-1 agreement (all / easy / hard by teacher UNC), token KL(p‖q), gold cross-entropy, and
    ExAccErr(16) and at full length, with teacher prefixes sampled under the student's settings.

    Runs where it is called; rlkd.eval runs it as a Ray task, so pooled workers keep their imports.
    """
    from actors.pair_scorer import PairScorer
    from rlkd import metrics as M

    scorer = PairScorer(str(teacher_dir), str(model_dir), vocab, pad_id, eos_id)
    gold = scorer.stats(prompts, references, batch_size)
    hits, mask = gold["hits"], gold["mask"]
    easy, hard, threshold = M.easy_hard_agreement(hits, gold["unc"], mask)
    on_s = scorer.stats(prompts, student_samples, batch_size)
    teacher_samples = scorer.generate_teacher(prompts, max_new, seed, no_repeat_ngram_size)
    on_t = scorer.stats(prompts, teacher_samples, batch_size)
    kl_s, m_s, kl_t, m_t = on_s["kl"], on_s["mask"], on_t["kl"], on_t["mask"]
    full = int(min(m_s.sum(1).max(), m_t.sum(1).max()))
    return {"top1_agreement": M.masked_mean(hits, mask), "top1_agreement_easy": easy, "top1_agreement_hard": hard,
            "unc_threshold": threshold, "token_kl_teacher_student": M.masked_mean(gold["kl"], mask),
            "gold_ce": M.masked_mean(gold["nll"], mask),
            "exacc_err_16": M.exacc_err(kl_s, m_s, kl_t, m_t, 16),
            f"exacc_err_full_{full}": M.exacc_err(kl_s, m_s, kl_t, m_t, full)}


def gold_agreement(teacher_dir, model_dir, vocab, pad_id, eos_id, prompts, references, batch_size: int = 32) -> dict:
    """Teacher-forced on the gold answers: TOP-1 agreement with the teacher (%) and the gold cross-entropy. They
    measure what a model knows, where a sampled score also rewards sharpness. Runs where it is called."""
    from actors.pair_scorer import PairScorer
    from rlkd import metrics as M

    gold = PairScorer(str(teacher_dir), str(model_dir), vocab, pad_id, eos_id).stats(prompts, references, batch_size)
    return {"top1_agreement": 100 * M.masked_mean(gold["hits"], gold["mask"]),
            "gold_ce": M.masked_mean(gold["nll"], gold["mask"])}


def run_cli(args, log=print) -> dict:
    """The CLI's work: read the data file, then `evaluate_examples`."""
    model_dir = check_model_dir(args.model, "--model")
    teacher_dir = check_model_dir(args.teacher, "--teacher") if args.teacher else None
    examples, report = read_examples(args.data, args.max_examples)
    log(report.summary())
    result = evaluate_examples(examples, model_dir, teacher_dir, args, log)
    result.update(data=str(args.data), malformed_rows=len(report.malformed))
    return result


def prompt_limit(model_dirs, max_prompt_tokens: int, max_new_tokens: int, log=print) -> int:
    """The prompt budget that keeps prompt + response inside every model's max_position_embeddings."""
    from transformers import AutoConfig

    positions = min(getattr(AutoConfig.from_pretrained(str(d)), "max_position_embeddings", 1 << 30) for d in model_dirs)
    if max_new_tokens >= positions:
        raise ConfigError(f"--max-new-tokens={max_new_tokens} is invalid: the models have {positions} positions; "
                          "leave room for the prompt")
    if max_prompt_tokens + max_new_tokens > positions:
        log(f"prompts limited to {positions - max_new_tokens} tokens (the models have {positions} positions)")
        return positions - max_new_tokens
    return max_prompt_tokens


def evaluate_examples(examples, model_dir: Path, teacher_dir: Path | None, args, log=print) -> dict:
    """ROUGE-L and exact match over args.seeds (and teacher metrics) for parsed examples."""
    import ray

    from actors.engines import EngineSpec
    from actors.rollout import RolloutActor
    from rlkd.cluster import connect_ray, shutdown_ray

    vocab = check_same_tokenizer(teacher_dir, model_dir) if teacher_dir else None
    tok = load_tokenizer(model_dir)
    limit = prompt_limit([model_dir] + ([teacher_dir] if teacher_dir else []), args.max_prompt_tokens,
                         args.max_new_tokens, log)
    rows = tokenize(examples, tok, limit, args.max_new_tokens)
    cut = sum(r.truncated for r in rows)
    if cut:
        log(f"{cut} of {len(rows)} prompts were longer than {limit} tokens and were cut in the middle")
    prompts = [r.prompt_ids for r in rows]
    started = connect_ray(log=lambda *a: None)
    try:
        spec = EngineSpec(str(Path(model_dir).resolve()), tok.pad_token_id, tok.eos_token_id, vocab_size=len(tok),
                          max_model_len=limit + args.max_new_tokens + 8)
        gen = ray.remote(RolloutActor).options(num_cpus=1).remote(spec, args.backend)
        responses = [ray.get(gen.generate.remote(prompts, args.max_new_tokens, 1.0, 1.0, seed,
                                                 args.no_repeat_ngram_size))["responses"] for seed in args.seeds]
        scores, texts = score_responses(tok, rows, responses)
        for seed, one in zip(args.seeds, scores["per_seed"]):
            log(f"seed {seed}: ROUGE-L {one['rougeL']:.2f}, exact match {one['exact_match']:.1f}")
        greedy = greedy_scores(tok, rows, ray.get(gen.generate.remote(prompts, args.max_new_tokens, 0.0, 1.0, 0,
                                                                      args.no_repeat_ngram_size))["responses"])
        log(f"greedy: ROUGE-L {greedy['rougeL']:.2f}, exact match {greedy['exact_match']:.1f}")
        result = {"model": str(model_dir), "num_examples": len(rows), "truncated_prompts": cut, "seeds": args.seeds,
                  **scores, "greedy": greedy,
                  "samples": [{"prompt": e.prompt, "references": e.references[:3], "answers": [t[i] for t in texts]}
                              for i, e in enumerate(examples[:3])]}
        if teacher_dir is not None:
            task = ray.remote(num_cpus=1)(teacher_metrics)
            result["teacher"] = str(teacher_dir)
            result.update(ray.get(task.remote(teacher_dir, model_dir, vocab, tok.pad_token_id, tok.eos_token_id,
                                              prompts, [r.response_ids for r in rows], responses[0],
                                              args.max_new_tokens, args.seeds[0], args.batch_size,
                                              args.no_repeat_ngram_size)))
    finally:
        shutdown_ray(started)
    return result


def score_responses(tok, rows, responses_per_seed: list[list[list[int]]]) -> tuple[dict, list[list[str]]]:
    """Every generation score (rlkd.metrics), mean ± std over the seeds, and the decoded answers."""
    refs, families = [r.references for r in rows], [r.family for r in rows]
    texts = [decode(tok, r) for r in responses_per_seed]
    per_seed = [sample_scores(t, r, refs, families, tok.eos_token_id) for t, r in zip(texts, responses_per_seed)]
    return summarize(per_seed, texts, refs, families), texts


def evaluate_model(cfg: Config, tok, sample: Callable, rows) -> dict | None:
    """ROUGE-L and exact match (mean ± std over eval.num_seeds sampling seeds), the same scores decoded
    greedily (`greedy`: a sampled score rewards a sharper model, a greedy one what it knows), and three
    sample answers, on the first eval.num_examples of `rows`. `sample(prompts, seed, temperature)` returns
    one response per prompt, sampled as rlkd evaluates: top-p 1, eval.no_repeat_ngram_size."""
    rows = rows[:cfg.eval.num_examples]
    if not rows:
        return None
    prompts, e = [r.prompt_ids for r in rows], cfg.eval
    result, texts = score_responses(tok, rows, [sample(prompts, e.seed + 10 * i, 1.0) for i in range(e.num_seeds)])
    result["greedy"] = greedy_scores(tok, rows, sample(prompts, e.seed, 0.0))
    result["samples"] = [f"{prompt_summary(tok.decode(rows[i].prompt_ids))} -> {texts[0][i]}"
                         for i in range(min(3, len(rows)))]
    return result


def greedy_scores(tok, rows, responses: list[list[int]]) -> dict:
    """Exact match (overall, per family and per row: `correct`, for paired comparisons on the same prompts),
    ROUGE-L, length and EOS rate of one greedy decoding, and its first three answers."""
    one, texts = score_responses(tok, rows, [responses])
    return {"exact_match": one["exact_match_mean"], "rougeL": one["rougeL_mean"], "length": one["length_mean"],
            "eos_rate": one["eos_rate_mean"],
            "exact_match_family": {f: v["mean"] for f, v in one["exact_match_family"].items()},
            "correct": [int(x > 0) for x in exact_match(texts[0], [r.references for r in rows])],
            "answers": texts[0][:3]}


def evaluate_dir(cfg: Config, tok, model_dir: Path, rows) -> dict | None:
    """`evaluate_model` of a model directory (sampled in fresh Ray tasks)."""
    return evaluate_model(cfg, tok, sampler_from_dir(cfg, tok, model_dir), rows)


def sampler_from_dir(cfg: Config, tok, model_dir: Path) -> Callable:
    """Sample from a model directory in a fresh Ray task (one CPU), e.g. the saved student."""
    import ray

    from actors.hf_generate import generate_from_dir

    task, path = ray.remote(num_cpus=1)(generate_from_dir), str(Path(model_dir).resolve())  # the task may run elsewhere
    return lambda prompts, seed, temperature=1.0: ray.get(task.remote(
        path, prompts, tok.pad_token_id, tok.eos_token_id, cfg.data.max_response_tokens, seed,
        cfg.eval.no_repeat_ngram_size, cfg.model.trust_remote_code, len(tok), temperature))


def sampler_from_group(cfg: Config, group) -> Callable:
    """Sample through running actors (an rlkd.cluster.ActorGroup of teacher or rollout actors)."""
    return lambda prompts, seed, temperature=1.0: group.split(
        "generate", prompts, seed, max_new_tokens=cfg.data.max_response_tokens, temperature=temperature, top_p=1.0,
        no_repeat_ngram_size=cfg.eval.no_repeat_ngram_size)["responses"]


def markdown(result: dict) -> str:
    seeds = result["seeds"]
    lines = ["| metric | value |", "|---|---|",
             f"| ROUGE-L (mean ± std over seeds {seeds}) | {result['rougeL_mean']:.2f} ± {result['rougeL_std']:.2f} |",
             f"| exact match, % (mean ± std over seeds) | {result['exact_match_mean']:.1f} ± "
             f"{result['exact_match_std']:.1f} |",
             f"| exact match, %, greedy | {result['greedy']['exact_match']:.1f} |",
             f"| ROUGE-L, greedy | {result['greedy']['rougeL']:.2f} |"]
    for fam, s in result["exact_match_family"].items():
        lines.append(f"| exact match, family {fam} | {s['mean']:.1f} ± {s['std']:.1f} |")
    if "answer_diversity" in result:
        lines.append(f"| answer diversity (distinct valid answers per prompt over {len(seeds)} seeds) | "
                     f"{result['answer_diversity']:.2f} |")
        lines += [f"| answer diversity, family {f} | {v:.2f} |" for f, v in result["answer_diversity_family"].items()]
    lines += [f"| answer length, tokens | {result['length_mean']:.1f} |",
              f"| EOS rate, % | {result['eos_rate_mean']:.1f} |"]
    for k, v in result.items():
        if k.startswith(("top1", "token_kl", "exacc", "unc", "gold_ce")):
            lines.append(f"| {k} | {v:.4f} |")
    samples = ["", "Samples (one answer per seed):", ""]
    for s in result.get("samples", []):
        samples.append(f"- `{prompt_summary(s['prompt'])}` -> {s['answers']!r} (references {s['references']!r})")
    return (f"{result['model']} on {result['data']} ({result['num_examples']} examples, "
            f"{result['truncated_prompts']} prompts cut)\n\n" + "\n".join(lines + samples) + "\n")


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        check_writable_dir(args.out, "--out")  # before the evaluation: its results are never lost to a bad --out
        result = run_cli(args)
    except (ConfigError, DataError) as e:
        print(f"rlkd.eval: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "eval.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
