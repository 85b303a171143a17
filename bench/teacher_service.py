"""The teacher as a service: scoring throughput of each engine, tensor-parallel size and signal, the bytes each
signal ships per scored position, and the step time of GKD and OPD with each teacher backend.

    python bench/teacher_service.py [--shape tiny|realistic|both] [--reps 3] [--steps 6]
        -> bench/results/teacher_service.md, teacher_service.json

Scoring: the engines run in this process (no Ray) on one batch of 16 gold rows, scored `reps` times after a
warm-up; tokens/s counts the real response tokens. Shapes: 'tiny' is the shipped skills teacher (2.26M
parameters, 1,265 tokens); 'realistic' is bench/throughput.py's random 2-layer teacher at Qwen2.5's 151,665-token
vocabulary. Step times: `--steps`-step rlkd runs of the smoke config with teacher.backend hf and vllm (median of
steps 2 onwards). On this machine's 2 CPU cores TP = 2 splits the same cores: it shows that sharding works,
not what it buys on GPUs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
CASES = [("hf", 1, "full"), ("hf", 1, "topk"), ("hf", 1, "token"), ("vllm", 1, "topk"), ("vllm", 1, "token"),
         ("vllm", 2, "topk"), ("vllm", 2, "token")]
K, ROWS = 64, 16


def _shape(name: str):
    """(teacher dir, tokenizer, gold rows) of a shape."""
    from rlkd.data import SHIPPED_DOLLY, read_examples, tokenize
    from rlkd.models import load_tokenizer

    if name == "tiny":
        from rlkd.builtin import load_data
        from rlkd.config import load_config
        from rlkd.tasks.teacher import SHIPPED_TEACHER

        teacher, examples = SHIPPED_TEACHER, load_data(load_config(None, []), log=lambda *a: None).test
        max_prompt, max_response = 64, 16
    else:
        from throughput import realistic_models

        root = Path(tempfile.gettempdir()) / "rlkd-throughput-realistic"
        realistic_models(root)
        teacher, examples, max_prompt, max_response = root / "teacher", read_examples(SHIPPED_DOLLY, 200)[0], 128, 64
    tok = load_tokenizer(teacher)
    return teacher, tok, tokenize(examples[:ROWS], tok, max_prompt, max_response), max_prompt + max_response + 8


def score_case(shape: str, backend: str, tp: int, signal: str, reps: int) -> dict:
    from actors.engines import ENGINES, EngineSpec
    from rlkd.batch import SequenceBatch

    teacher, tok, rows, max_len = _shape(shape)
    batch = SequenceBatch.collate([r.prompt_ids for r in rows], [r.response_ids for r in rows], tok.pad_token_id)
    k = K if signal == "topk" else 0
    engine = ENGINES[backend](EngineSpec(str(teacher), tok.pad_token_id, tok.eos_token_id, vocab_size=len(tok),
                                         max_logprobs=max(k, 1), cpu_kv_cache_gib=0.2, max_model_len=max_len,
                                         tensor_parallel_size=tp))
    scores = engine.score(batch, signal, k, 1.0)  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        scores = engine.score(batch, signal, k, 1.0)
        times.append(time.perf_counter() - t0)
    shipped = sum(t.numel() * t.element_size() for t in vars(scores).values() if hasattr(t, "numel"))
    tokens = batch.response_mask.sum().item()
    return {"shape": shape, "backend": backend, "tp": tp, "signal": signal, "k": k,
            "tokens_per_s": tokens / statistics.median(times), "seconds": statistics.median(times),
            "bytes_per_position": shipped / batch.responses.numel(), "vocab": len(tok)}


def _in_a_fresh_process(shape: str, case: tuple, reps: int) -> dict:
    """One engine per process: a vLLM engine (and its TP workers) is gone with it, and cannot slow the next."""
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--case", ",".join(map(str, (shape, *case))), "--reps", str(reps)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])


def step_times(steps: int) -> list[dict]:
    from rlkd.config import load_config
    from rlkd.launch import run

    out = []
    for method in ("gkd", "opd"):
        for backend in ("hf", "vllm"):
            work = Path(tempfile.mkdtemp(prefix="rlkd-teacher-bench-"))
            cfg = load_config("configs/smoke.yaml", [
                f"algo.method={method}", "algo.gkd.lmbda=1.0", f"teacher.backend={backend}", f"train.steps={steps}",
                "train.checkpoint_every=0", "eval.num_examples=0", f"run.output_dir={work}", "run.name=s",
                f"model.cache_dir={Path(tempfile.gettempdir()) / 'rlkd-teacher-bench-cache'}"])
            rows = [json.loads(x) for x in (run(cfg, log=lambda *a: None) / "metrics.jsonl").read_text().splitlines()]
            out.append({"method": method, "backend": backend,
                        "step_s": statistics.median(r["timing/step"] for r in rows[1:]),
                        "score_wait_s": statistics.median(r.get("timing/score", 0.0) for r in rows[1:]),
                        "bytes_per_step": statistics.median(r["scores/bytes"] for r in rows[1:])})
    return out


def markdown(scoring: list[dict], steps: list[dict], flags: str, seconds: float) -> str:
    lines = [f"# Teacher service\n\n`python bench/teacher_service.py{flags}` ({seconds / 60:.0f} min, 2 CPU cores). "
             f"Scoring {ROWS} gold rows in this process, median of the timed repetitions.\n",
             "| shape (vocabulary) | engine | TP | signal | scored tokens/s | bytes per scored position |",
             "|---|---|---|---|---|---|"]
    for r in scoring:
        lines.append(f"| {r['shape']} ({r['vocab']:,}) | {r['backend']} | {r['tp']} | {r['signal']}"
                     f"{' (k=%d)' % r['k'] if r['k'] else ''} | {r['tokens_per_s']:,.0f} | {r['bytes_per_position']:,.0f} |")
    lines += ["", "Step time of the smoke config (tiny embedded models, 8 rows, HF rollouts), median over steps 2+:", "",
              "| method | teacher backend | step s | wait for scores s | score bytes per step |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['backend']} | {r['step_s']:.2f} | {r['score_wait_s']:.2f} | {r['bytes_per_step']:,.0f} |"
              for r in steps]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="both", choices=["tiny", "realistic", "both"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "teacher_service"))
    ap.add_argument("--case", help=argparse.SUPPRESS)  # shape,backend,tp,signal: one case, JSON on stdout
    a, t0 = ap.parse_args(argv), time.time()
    if a.case:
        shape, backend, tp, signal = a.case.split(",")
        print("RESULT " + json.dumps(score_case(shape, backend, int(tp), signal, a.reps)))
        return 0
    shapes = ["tiny", "realistic"] if a.shape == "both" else [a.shape]
    scoring = [_in_a_fresh_process(s, case, a.reps) for s in shapes for case in CASES
               if not (s == "realistic" and case[2] == "full")]  # a full 151k distribution per token: 600 KB
    steps = step_times(a.steps) if a.steps else []
    flags = f" --shape {a.shape} --reps {a.reps} --steps {a.steps}"
    text = markdown(scoring, steps, flags, time.time() - t0)
    Path(f"{a.out}.md").write_text(text)
    Path(f"{a.out}.json").write_text(json.dumps({"scoring": scoring, "steps": steps}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
