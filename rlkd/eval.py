"""`python -m rlkd.eval`: ROUGE-L over seeds, and teacher agreement metrics, for any HF model directory.

    python -m rlkd.eval --model DIR [--teacher DIR] --data FILE.jsonl [--seeds 10,20,30]
                        [--max-examples N] --out DIR [--backend hf|vllm]

Generation follows ALGORITHMS.md §4.1 (MiniLLM's protocol) and runs in a rollout actor, batched.
With --teacher, teacher-forced metrics on the first reference (§4.2-4.4). Like rlkd.launch, this is an
entry point (composition root), so it may import actors/.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from rlkd.config import ConfigError
from rlkd.data import DataError, read_examples, tokenize
from rlkd.evaluation import decode, rouge_l
from rlkd.models import check_model_dir, check_same_tokenizer, load_tokenizer


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m rlkd.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF causal-LM directory to evaluate")
    ap.add_argument("--teacher", help="HF directory of the teacher (adds agreement, KL, ExAccErr)")
    ap.add_argument("--data", required=True, help="JSONL: instruction, [input|context], output (str or list)")
    ap.add_argument("--seeds", default="10,20,30", help="comma-separated sampling seeds, one run each")
    ap.add_argument("--max-examples", type=int, default=0, help="evaluate the first N usable rows (0 = all)")
    ap.add_argument("--out", required=True, help="directory for eval.json and eval.md")
    ap.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="rollout actor engine")
    ap.add_argument("--max-prompt-tokens", type=int, default=256, help="prompts are cut from the left to this")
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
    if args.backend == "vllm" and args.no_repeat_ngram_size:
        raise ConfigError("--backend=vllm is invalid with --no-repeat-ngram-size > 0 (vLLM has no n-gram "
                          "blocking); use --backend hf or --no-repeat-ngram-size 0")
    return args


def teacher_metrics(teacher_dir, model_dir, vocab, pad_id, eos_id, prompts, references, student_samples, max_new,
                    seed, batch_size) -> dict:
    """TOP-1 agreement (all / easy / hard by teacher UNC), token KL(p‖q), ExAccErr(16) and at full length.

    Runs where it is called; rlkd.eval runs it as a Ray task, so pooled workers keep their imports.
    """
    from actors.pair_scorer import PairScorer
    from rlkd import eval_metrics as M

    scorer = PairScorer(str(teacher_dir), str(model_dir), vocab, pad_id, eos_id)
    gold = scorer.stats(prompts, references, batch_size)
    hits, mask = gold["hits"], gold["mask"]
    easy, hard, threshold = M.easy_hard_agreement(hits, gold["unc"], mask)
    on_s = scorer.stats(prompts, student_samples, batch_size)
    on_t = scorer.stats(prompts, scorer.generate_teacher(prompts, max_new, seed), batch_size)
    kl_s, m_s, kl_t, m_t = on_s["kl"], on_s["mask"], on_t["kl"], on_t["mask"]
    full = int(min(m_s.sum(1).max(), m_t.sum(1).max()))
    return {"top1_agreement": M.masked_mean(hits, mask), "top1_agreement_easy": easy, "top1_agreement_hard": hard,
            "unc_threshold": threshold, "token_kl_teacher_student": M.masked_mean(gold["kl"], mask),
            "exacc_err_16": M.exacc_err(kl_s, m_s, kl_t, m_t, 16),
            f"exacc_err_full_{full}": M.exacc_err(kl_s, m_s, kl_t, m_t, full)}


def evaluate(args, log=print) -> dict:
    """The CLI's work: read the data file, then `evaluate_examples`."""
    model_dir = check_model_dir(args.model, "--model")
    teacher_dir = check_model_dir(args.teacher, "--teacher") if args.teacher else None
    examples, report = read_examples(args.data, args.max_examples)
    log(report.summary())
    result = evaluate_examples(examples, model_dir, teacher_dir, args, log)
    result.update(data=str(args.data), malformed_rows=len(report.malformed))
    return result


def evaluate_examples(examples, model_dir: Path, teacher_dir: Path | None, args, log=print) -> dict:
    """ROUGE-L over args.seeds (and teacher metrics) for parsed examples; args as parse_args gives them."""
    import ray

    from actors.rollout import RolloutActor
    from rlkd.launch import connect_ray

    vocab = check_same_tokenizer(teacher_dir, model_dir) if teacher_dir else None
    tok = load_tokenizer(model_dir)
    rows = tokenize(examples, tok, args.max_prompt_tokens, args.max_new_tokens)
    prompts, refs = [r.prompt_ids for r in rows], [r.references for r in rows]
    started = connect_ray(log=lambda *a: None)
    try:
        gen = ray.remote(RolloutActor).options(num_cpus=1).remote(
            str(model_dir), args.backend, tok.pad_token_id, tok.eos_token_id,
            max_model_len=args.max_prompt_tokens + args.max_new_tokens + 8)
        scores, samples = [], {}
        for seed in args.seeds:
            out = ray.get(gen.generate.remote(prompts, args.max_new_tokens, 1.0, 1.0, seed, args.no_repeat_ngram_size))
            samples[seed] = out["responses"]
            scores.append(rouge_l(decode(tok, out["responses"]), refs))
            log(f"seed {seed}: ROUGE-L {scores[-1]:.2f}")
        result = {"model": str(model_dir), "num_examples": len(rows), "seeds": args.seeds, "rougeL_per_seed": scores,
                  "rougeL_mean": statistics.mean(scores),
                  "rougeL_std": statistics.stdev(scores) if len(scores) > 1 else 0.0}
        if teacher_dir is not None:
            task = ray.remote(num_cpus=1)(teacher_metrics)
            result["teacher"] = str(teacher_dir)
            result.update(ray.get(task.remote(teacher_dir, model_dir, vocab, tok.pad_token_id, tok.eos_token_id,
                                              prompts, [r.response_ids for r in rows], samples[args.seeds[0]],
                                              args.max_new_tokens, args.seeds[0], args.batch_size)))
    finally:
        if started:
            ray.shutdown()
    return result


def markdown(result: dict) -> str:
    lines = ["| metric | value |", "|---|---|",
             f"| ROUGE-L (mean ± std over seeds {result['seeds']}) | {result['rougeL_mean']:.2f} ± "
             f"{result['rougeL_std']:.2f} |"]
    for k, v in result.items():
        if k.startswith(("top1", "token_kl", "exacc", "unc")):
            lines.append(f"| {k} | {v:.4f} |")
    return f"{result['model']} on {result['data']} ({result['num_examples']} examples)\n\n" + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        result = evaluate(args)
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
