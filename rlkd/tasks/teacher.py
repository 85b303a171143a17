"""Build the skills-suite tokenizer and teacher: one command, reproducible, logged beside the weights.

    python -m rlkd.tasks.teacher --out rlkd/assets/skills_teacher   (the shipped teacher; see its build.log)

Generates the suite (rlkd.tasks.skills, seed 0), builds a word-level tokenizer over it, trains a tiny
Llama by SFT on the train split (one uniformly drawn answer per open-ended row), and scores exact match
per family on the test split, sampled at temperature 1 as rlkd.eval does. Writes an HF model directory
(safetensors + tokenizer), `teacher.json` (shape, training time, per-family scores) and `build.log`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from rlkd.data import Example, format_prompt, tokenize
from rlkd.tasks import skills

SHIPPED_TEACHER = Path(__file__).parents[1] / "assets" / "skills_teacher"
SHIPPED_STUDENT = Path(__file__).parents[1] / "assets" / "skills_student"  # from scratch, trained to its plateau
MAX_PROMPT, MAX_RESPONSE = 64, 16  # the suite's longest prompt is ~50 word tokens, longest answer 8 + EOS
SIZES = {"train": 64000, "val": 256, "test": 512}  # the shipped teacher's splits (seed 0)


def examples(rows: list[dict]) -> list[Example]:
    return [Example(format_prompt(r["instruction"], r["input"]), r["output"], r["family"]) for r in rows]


def suite_tokenizer(rows: list[dict], out_dir: Path):
    """Word-level tokenizer over every prompt and answer of `rows`, plus every word the generators can
    emit (W, upper-cased W, 0..198, single letters), so no split ever meets an unknown token."""
    from rlkd.models import train_word_tokenizer

    w = skills.words()
    extra = (*w, *(x.upper() for x in w), *map(str, range(199)), *"abcdefghijklmnopqrstuvwxyz")
    texts = [e.prompt + " " + " ".join(e.references) for e in examples(rows)]
    return train_word_tokenizer(texts, out_dir, extra)


def sample_exact_match(model, tok, rows: list[dict], seed: int, no_repeat_ngram_size: int = 6) -> dict:
    """Exact match ×100 per family and overall, one T=1 sample per prompt (rlkd.eval's protocol)."""
    from rlkd.metrics import by_family, decode, exact_match
    from rlkd.sampling import hf_generate

    data = tokenize(examples(rows), tok, MAX_PROMPT, MAX_RESPONSE)
    out, _ = hf_generate(model.eval(), [d.prompt_ids for d in data], tok.pad_token_id, tok.eos_token_id,
                         MAX_RESPONSE, seed=seed, no_repeat_ngram_size=no_repeat_ngram_size)
    em = exact_match(decode(tok, out), [r["output"] for r in rows])
    return {"overall": statistics.mean(em), **by_family(em, [r["family"] for r in rows])}


def _init_model(init: Path | None, splits: dict, out: Path, hidden: int, layers: int, head_dim: int,
                seed: int):
    """A fresh tokenizer and model, or (init) a previous build's, to train for another cycle."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlkd.models import tiny_llama

    if init is None:
        tok = suite_tokenizer(splits["train"], out)
        return tok, tiny_llama(tok, hidden, layers, head_dim, MAX_PROMPT + MAX_RESPONSE + 8, seed)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # byte-identical: the same tokenizer
        shutil.copyfile(init / name, out / name)
    return AutoTokenizer.from_pretrained(str(init)), AutoModelForCausalLM.from_pretrained(str(init))


def build(out: Path, hidden: int, layers: int, head_dim: int, steps: int, batch_size: int, lr: float,
          train_rows: int, seed: int, eval_every: int, log=print, init: Path | None = None,
          bf16: bool = False) -> dict:
    import torch

    from rlkd.pretrain import sft_train

    t0 = time.time()
    splits = skills.generate(0, {**SIZES, "train": train_rows})
    out.mkdir(parents=True, exist_ok=True)
    tok, model = _init_model(init, splits, out, hidden, layers, head_dim, seed)
    c = model.config
    hidden, layers, head_dim = c.hidden_size, c.num_hidden_layers, c.head_dim
    n_params = sum(p.numel() for p in model.parameters())
    log(f"teacher: Llama {layers}x{hidden} (head_dim {head_dim}), {n_params / 1e6:.2f}M params, vocab {len(tok)}; "
        f"{len(splits['train'])} train rows; {steps} steps of {batch_size}, lr {lr}; torch threads "
        f"{torch.get_num_threads()}; bf16 autocast {bf16}" + (f"; continues {init}" if init else ""))
    train = tokenize(examples(splits["train"]), tok, MAX_PROMPT, MAX_RESPONSE)
    curve = []

    def on_log(step):
        em = sample_exact_match(model, tok, splits["val"], seed=step)
        curve.append({"step": step, "seconds": time.time() - t0, **em})
        log(f"  val exact match {em['overall']:.1f} " + " ".join(f"{k} {v:.0f}" for k, v in em.items()
                                                               if k != "overall"))

    fit = sft_train(model, train, tok.pad_token_id, len(tok), steps, batch_size, lr, seed, log,
                    warmup=min(200, steps // 10), log_every=eval_every, on_log=on_log, bf16=bf16)
    train_seconds = time.time() - t0
    tests = [sample_exact_match(model, tok, splits["test"], seed=s) for s in (10, 20, 30)]
    test = {k: statistics.mean(t[k] for t in tests) for k in tests[0]}
    test_std = {k: statistics.stdev(t[k] for t in tests) for k in tests[0]}
    model.save_pretrained(str(out), safe_serialization=True)  # the tokenizer is already in `out`
    summary = {"params": n_params, "shape": {"hidden": hidden, "layers": layers, "head_dim": head_dim},
               "vocab": len(tok), "train_rows": len(splits["train"]), "steps": steps, "batch_size": batch_size,
               "lr": lr, "seed": seed, "bf16": bf16, "init": str(init) if init else None,
               "earlier": json.loads((init / "teacher.json").read_text()) if init else None,
               "train_seconds": train_seconds, "sft": fit, "val_curve": curve,
               "test_exact_match_mean": test, "test_exact_match_std": test_std, "test_seeds": [10, 20, 30]}
    (out / "teacher.json").write_text(json.dumps(summary, indent=1) + "\n")
    log("test exact match (mean ± std over sampling seeds 10,20,30, T=1): " +
        " ".join(f"{k} {test[k]:.1f}±{test_std[k]:.1f}" for k in test))
    log(f"done in {time.time() - t0:.0f}s")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlkd.tasks.teacher", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="HF model directory to write")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--train-rows", type=int, default=64000, help="train split size (8000 per family)")
    ap.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    ap.add_argument("--eval-every", type=int, default=500, help="validation exact match every N steps")
    ap.add_argument("--init", type=Path, help="continue a previous build (its weights and tokenizer) for "
                    "another warm-up + cosine cycle; its build.log is kept at the top of the new one")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights); faster on AVX512-BF16")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    earlier = (args.init / "build.log").read_text() if args.init else ""
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    with (out / "build.log").open("w") as fh:
        fh.write(earlier)
        def log(msg):
            print(msg, flush=True)
            fh.write(msg + "\n")
            fh.flush()
        log("$ python -m rlkd.tasks.teacher " + " ".join(argv if argv is not None else __import__("sys").argv[1:]))
        build(out, args.hidden, args.layers, args.head_dim, args.steps, args.batch_size, args.lr,
              args.train_rows, args.seed, args.eval_every, log, args.init, args.bf16)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
