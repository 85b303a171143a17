"""AMMD's critic phase (K critic updates on one batch) before and after the K updates share one student
forward, measured side by side: the same LearnerWorker code path of two source trees, in one process each,
interleaved, on the throughput benchmark's Dolly shape.

    python bench/critic_phase.py --before-tree DIR [--rounds 3] [--reps 8]
        -> bench/results/critic_phase.md, critic_phase.json

DIR is a checkout of the code before the change (e.g. `git worktree add /tmp/before 203b11d`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
K, BATCH = 4, 8


def worker_main(job: dict) -> dict:
    """Inside one tree: build the learner and teacher, load one batch, time `reps` critic phases."""
    from functools import partial

    import torch

    from actors.engines import EngineSpec
    from actors.teacher import TeacherActor
    from learners.worker import LearnerWorker, free_port
    from rlkd.batch import SequenceBatch
    from rlkd.objectives import ammd_critic_objective

    torch.set_num_threads(1)
    worker = LearnerWorker(0, 1)
    worker.setup("127.0.0.1", free_port(), job["student"], job["vocab"], 0, 1e-3, 1e-2, 0.0, 1.0,
                 critic_heads=("on",), critic_hidden=job["teacher_hidden"])
    teacher = TeacherActor(EngineSpec(job["teacher"], job["pad"], job["eos"], vocab_size=job["vocab"]))
    batch = SequenceBatch.collate(job["prompts"], job["responses"], job["pad"])
    worker.load_batch({"on": batch}, {"on": teacher.score(batch, True)}, {"on": float(batch.num_tokens())})
    objective = partial(ammd_critic_objective, beta=0.0, l2=0.1)
    times = []
    for _ in range(job["reps"] + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        for _ in range(K):
            worker.train(objective, "critic")
        times.append(time.perf_counter() - t0)
    return {"critic_phase_seconds": times[1:]}


def _job(reps: int) -> dict:
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    from throughput import DOLLY
    from transformers import AutoConfig

    from rlkd.config import load_config
    from rlkd.prepare import prepare

    prep = prepare(load_config("configs/default.yaml", DOLLY), log=lambda *a: None)
    rows = prep.train[:BATCH]
    tok = prep.tokenizer
    return {"student": str(prep.student_dir), "teacher": str(prep.teacher_dir), "vocab": prep.vocab_size,
            "teacher_hidden": AutoConfig.from_pretrained(prep.teacher_dir).hidden_size, "pad": tok.pad_token_id,
            "eos": tok.eos_token_id, "prompts": [r.prompt_ids for r in rows],
            "responses": [r.response_ids for r in rows], "reps": reps}


def _in_tree(tree: Path, job_path: Path) -> list[float]:
    code = (f"import json,sys; sys.path.insert(0, {str(tree)!r}); sys.path.insert(1, {str(ROOT / 'bench')!r}); "
            f"from critic_phase import worker_main; print(json.dumps(worker_main(json.load(open({str(job_path)!r})))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["critic_phase_seconds"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before-tree", required=True, help="a checkout of the code before the change")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "critic_phase"))
    a = ap.parse_args()
    job = _job(a.reps)
    trees = {"before": Path(a.before_tree).resolve(), "after": ROOT}
    times: dict[str, list[float]] = {k: [] for k in trees}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "job.json"
        path.write_text(json.dumps(job))
        for _ in range(a.rounds):
            for name, tree in trees.items():
                times[name] += _in_tree(tree, path)
    med = {k: statistics.median(v) for k, v in times.items()}
    text = (f"`python bench/critic_phase.py --before-tree ... --rounds {a.rounds} --reps {a.reps}`: AMMD critic phase "
            f"(K = {K} critic updates, batch {BATCH} x {len(job['responses'][0])}-token gold responses, Dolly tiny "
            f"models, one thread), median of {len(times['after'])} phases per tree, interleaved\n\n"
            "| code | critic phase (median s) |\n|---|---|\n"
            + "".join(f"| {k} | {v:.4f} |\n" for k, v in med.items())
            + f"\nafter / before = **{med['after'] / med['before']:.2f}x**\n")
    Path(a.out + ".md").write_text(text)
    Path(a.out + ".json").write_text(json.dumps({"median": med, "all": times}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
