"""AMMD against the best baseline of the quality benchmark, at equal steps and at equal wall-clock.

    python bench/ammd_vs_best.py [--quality bench/results/quality.json] [--seeds 3]
        -> bench/results/ammd_vs_best.md, ammd_vs_best.json

Equal steps is read from quality.json (every method had the same budget of student optimizer steps).
Equal wall-clock re-runs the best baseline of each student size, at its chosen learning rate, for as
many steps as fit into AMMD's mean training time (train/wall_seconds, so start-up and evaluation are
excluded from both). Diversity on the open-ended families is compared with RKL's, the mode-seeking
baseline the issue names.
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


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"


def _open_ended(scores: dict) -> float:
    from rlkd.tasks.skills import OPEN_ENDED

    return statistics.mean(scores["exact_match_family"][f]["mean"] for f in OPEN_ENDED)


def _by(runs: list[dict], method: str, size: str) -> list[dict]:
    return [r for r in runs if r["method"] == method and r["student"] == size]


def best_baseline(runs: list[dict], size: str) -> str:
    methods = {r["method"] for r in runs if r["student"] == size and r["method"] != "ammd"}
    return max(methods, key=lambda m: statistics.mean(r["scores"]["exact_match_mean"] for r in _by(runs, m, size)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quality", default=str(ROOT / "bench" / "results" / "quality.json"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=int, help="the benchmark's budget, if quality.json does not record it")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ammd_vs_best"))
    a = ap.parse_args(argv)
    from quality import SIZES, overrides, run_one

    from rlkd.cluster import connect_ray, shutdown_ray
    from rlkd.config import load_config
    from rlkd.prepare import prepare

    q = json.loads(Path(a.quality).read_text())
    runs, budget = q["runs"], q.get("budget") or a.budget
    if not budget:
        ap.error(f"{a.quality} does not record its budget of student steps; pass --budget")
    work = Path(tempfile.mkdtemp(prefix="rlkd-ammd-vs-best-"))
    t0, rows = time.time(), []
    started = connect_ray(0, log=lambda *x: None)
    try:
        for size, hidden in SIZES.items():
            base = best_baseline(runs, size)
            ammd, other = _by(runs, "ammd", size), _by(runs, base, size)
            t_ammd = statistics.mean(r["train_seconds"] for r in ammd)
            t_base = statistics.mean(r["train_seconds"] for r in other)
            steps = max(1, round(budget * t_ammd / t_base))
            prep = prepare(load_config(None, overrides(base, steps, False) + [f"model.tiny.student_hidden={hidden}"]),
                           log=lambda *x: None)
            timed = [run_one(base, size, other[0]["lr"], seed, steps, False, work, prep) for seed in range(a.seeds)]
            print(f"{size}: {base} for {steps} steps ({t_ammd:.0f}s of AMMD training): "
                  f"{_ms([r['scores']['exact_match_mean'] for r in timed])}")
            rows.append({"student": size, "baseline": base, "budget": budget, "ammd": ammd, "equal_steps": other,
                         "equal_wall_steps": steps, "ammd_train_seconds": t_ammd, "baseline_train_seconds": t_base,
                         "equal_wall": timed, "rkl": _by(runs, "rkl", size)})
    finally:
        shutdown_ray(started)
    Path(f"{a.out}.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = report(rows, (time.time() - t0) / 60)
    Path(f"{a.out}.md").write_text(text)
    print(text)
    return 0


def report(rows: list[dict], minutes: float) -> str:
    em = lambda rs: _ms([r["scores"]["exact_match_mean"] for r in rs])  # noqa: E731
    lines = [f"`python bench/ammd_vs_best.py`: AMMD against the best baseline of `bench/results/quality.json`; "
             f"test exact match %, mean ± std over training seeds; {minutes:.0f} min on this machine.", "",
             "| student | best baseline | AMMD, equal steps | baseline, equal steps | AMMD train s | "
             "baseline, equal wall-clock (steps) | open-ended diversity AMMD | open-ended diversity RKL |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        div = lambda rs: _ms([x["scores"]["answer_diversity"] for x in rs])  # noqa: E731
        lines.append(f"| {r['student']} | {r['baseline']} | {em(r['ammd'])} | {em(r['equal_steps'])} | "
                     f"{r['ammd_train_seconds']:.0f} | {em(r['equal_wall'])} ({r['equal_wall_steps']}) | "
                     f"{div(r['ammd'])} | {div(r['rkl'])} |")
    lines += ["", "Open-ended exact match (the families where diversity counts): " + "; ".join(
        f"{r['student']}: AMMD {_ms([_open_ended(x['scores']) for x in r['ammd']])}, "
        f"RKL {_ms([_open_ended(x['scores']) for x in r['rkl']])}" for r in rows)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
