"""Learner peak memory at a real vocabulary: one student step on B x 128 response tokens, V = 151,936.

    python bench/learner_memory.py [--before-tree DIR] -> bench/results/learner_memory.{md,json}

The student is a random 2-layer Qwen2 (hidden 256, tied embeddings, 151,936 rows; logits sliced to a
151,665-token tokenizer, as Qwen2.5's). The teacher scores are top-64 (+ tail), as `teacher.topk: null`
gives at this vocabulary; the objective is forward KL on them. Each configuration runs in a fresh
process on one gloo rank (LearnerWorker built in-process, no Ray). Peak = the highest resident set
sampled every 5 ms during the step, minus the resident set just before it (model, optimizer and the
loaded batch are in the baseline). `--before-tree` also runs each shape against another checkout
(e.g. `git worktree add /tmp/before d4ddf34`: the learner before micro-batches and the chunked logsumexp).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS, TOKENIZER, PROMPT, RESPONSE, TOPK = 151_936, 151_665, 16, 128, 64


def build_student(out: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=ROWS, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(str(out), safe_serialization=True)


def one(student: str, rows: int, micro: int, checkpointing: bool) -> dict:
    """One configuration, in this process: setup, load, then the measured step."""
    import functools

    import psutil
    import torch

    from learners.worker import LearnerWorker, free_port
    from rlkd.batch import SequenceBatch, TeacherScores
    from rlkd.objectives import divergence_objective

    torch.manual_seed(0)
    w = LearnerWorker(0, 1)
    new = {"micro_batch_size": micro or None, "gradient_checkpointing": checkpointing}
    extra = new if micro or checkpointing else {}  # the code before has neither argument
    w.setup("127.0.0.1", free_port(), student, TOKENIZER, 0, 1e-4, 1e-3, 0.0, 1.0, **extra)
    ids = torch.randint(0, TOKENIZER, (rows, PROMPT + RESPONSE))
    batch = SequenceBatch(ids, torch.ones_like(ids), torch.ones(rows, RESPONSE), PROMPT)
    vals = torch.randn(rows, RESPONSE, TOPK).log_softmax(-1).sort(-1, descending=True).values - 0.1
    scores = TeacherScores(vals, torch.randint(0, TOKENIZER, (rows, RESPONSE, TOPK)),
                           torch.full((rows, RESPONSE), -2.3))
    w.load_batch({"train": batch}, {"train": scores}, {"train": float(rows * RESPONSE)})
    proc, peak, done = psutil.Process(), [0], threading.Event()
    base = proc.memory_info().rss

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.time()
    metrics = w.train(functools.partial(divergence_objective, divergence="fkl"), "student", collapse=False)
    seconds = time.time() - t0
    done.set()
    return {"rows": rows, "micro_batch_size": micro or None, "gradient_checkpointing": checkpointing,
            "step_peak_gib": round((max(peak[0], proc.memory_info().rss) - base) / 2**30, 2),
            "baseline_gib": round(base / 2**30, 2), "step_seconds": round(seconds, 2),
            "loss": round(float(metrics["loss/fkl"]), 4), "code_from": sys.modules["learners.worker"].__file__}


def run(tree: Path, student: Path, rows: int, micro: int, checkpointing: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(student), str(rows), str(micro),
           str(int(checkpointing))]
    out = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tree)})
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


CONFIGS = [(8, 0, False), (32, 0, False), (32, 8, False), (32, 8, True)]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        student, rows, micro, ckpt = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), bool(int(sys.argv[5]))
        print(json.dumps(one(student, rows, micro, ckpt)))
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--before-tree", help="a checkout of the code before (its learner has no micro-batches)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "learner_memory"))
    a = ap.parse_args()
    student = Path(tempfile.mkdtemp(prefix="rlkd-memory-")) / "student"
    build_student(student)
    results = []
    trees = ([("before", Path(a.before_tree).resolve())] if a.before_tree else []) + [("after", ROOT)]
    for label, tree in trees:
        for rows, micro, ckpt in CONFIGS:
            if label == "before" and (micro or ckpt):
                continue  # not available before
            r = {"code": label, **run(tree, student, rows, micro, ckpt)}
            results.append(r)
            print(json.dumps(r), flush=True)
    lines = ["# Learner peak memory at V = 151,936", "",
             f"`python bench/learner_memory.py{' --before-tree ' + a.before_tree if a.before_tree else ''}`: "
             " ".join(__doc__.split(chr(10) + chr(10))[2].split()), "",
             "| code | batch x length | micro-batch | checkpointing | step peak (GiB) | step (s) | loss |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['code']} | {r['rows']} x {RESPONSE} | {r['micro_batch_size'] or '-'} | "
                     f"{'yes' if r['gradient_checkpointing'] else 'no'} | {r['step_peak_gib']} | {r['step_seconds']} | "
                     f"{r['loss']} |")
    Path(f"{a.out}.md").write_text("\n".join(lines) + "\n")
    Path(f"{a.out}.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
