"""AMMD ablations on the skills suite: the default job, with one choice switched at a time.

    python bench/ammd_ablations.py [--seeds 1] [--only default,beta0,...] [-- extra rlkd.main overrides]
        -> bench/results/ammd_ablations.md, ammd_ablations.json

Each row is a full `python -m rlkd.main` run (Ray actors, DeepSpeed learner, HF rollouts) on the default
job's budget. Reported: test exact match after distillation (mean ± std over the run's 3 sampling seeds;
with --seeds > 1 the std is over training seeds), the floors (teacher, student before, the most frequent
training answer per family), the true TV(p*, q) and the student's context TV on the last 10 steps'
rollouts, its distinct argmax tokens, how many steps each invariant was broken, wall time, and each
row's answer to the same held-out prompt.
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
ABLATIONS = {  # name -> (what changes, overrides)
    "default": ("today's defaults", []),
    "beta0": ("β = 0 (on-policy only)", ["algo.ammd.beta=0.0"]),
    "beta1": ("β = 1 (off-policy only)", ["algo.ammd.beta=1.0"]),
    "student_critic": ("critic on the student's hidden state", ["algo.ammd.critic_input=student"]),
    "k1": ("K = 1 critic step", ["algo.ammd.critic_steps=1"]),
    "lr_ratio1": ("critic lr = student lr (ratio 1)", ["learner.critic_lr=1e-3"]),
    "no_l2": ("no norm control (critic_l2 = 0)", ["algo.ammd.critic_l2=0.0"]),
    "pg1": ("policy-gradient term on (pg_coef = 1)", ["algo.ammd.pg_coef=1.0"]),
    "random_student": ("random-init student (no SFT)", ["model.tiny.student_sft_steps=0"]),
    "anchor": ("+ anchor 0.1·KL(p*‖q) (changes the method)", ["algo.ammd.anchor_fkl=0.1"]),
    "old_defaults": ("all old defaults (student critic, ratio 1, no l2, pg 1, random student)",
                     ["algo.ammd.critic_input=student", "learner.critic_lr=1e-3", "algo.ammd.critic_l2=0.0",
                      "algo.ammd.pg_coef=1.0", "model.tiny.student_sft_steps=0"]),
    "fkl": ("baseline: forward KL, same budget", ["algo.method=fkl"]),
    "tvd": ("baseline: TVD, same budget", ["algo.method=tvd"]),
    "fkl_equal_wall": ("baseline: forward KL, 500 steps (about AMMD's wall time)",
                       ["algo.method=fkl", "train.steps=500"]),
}


def run_one(overrides: list[str], out: Path, seed: int) -> dict:
    t0 = time.time()
    cmd = [sys.executable, "-m", "rlkd.main", f"run.output_dir={out}", "run.name=run", f"train.seed={seed}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    run_dir = next(out.glob("run*"))
    ev = json.loads((run_dir / "eval.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    late = [r for r in rows if any(k.startswith("collapse/student_context_tv_") for k in r)][-10:]

    def late_mean(prefix):  # the on-policy batch's value; the off-policy one when there is no on-policy batch
        for keep in (lambda k: not k.endswith("_off"), lambda k: k.endswith("_off")):
            vals = [v for r in late for k, v in r.items() if k.startswith(prefix) and keep(k)]
            if vals:
                return statistics.mean(vals)
        return None

    broken = {k.split("/")[1]: sum(r[k] == 0.0 for r in rows if k in r)
              for k in sorted({k for r in rows for k in r if k.startswith("invariant/")})}
    s = ev["scores"]
    return {"after": s["student_after"]["exact_match_mean"], "after_std": s["student_after"]["exact_match_std"],
            "before": s["student_before"]["exact_match_mean"], "teacher": s["teacher"]["exact_match_mean"],
            "tv": late_mean("ammd/tv_"), "context_tv": late_mean("collapse/student_context_tv_"),
            "teacher_context_tv": late_mean("collapse/teacher_context_tv_"),
            "distinct_argmax": late_mean("collapse/student_distinct_argmax_"), "broken": broken,
            "family": s["student_after"].get("exact_match_family", {}),
            "sample": s["student_after"]["samples"][0], "wall_seconds": round(time.time() - t0, 1)}


def fmt(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def constant_answer_floor(extra: list[str]) -> float:
    """Exact match of the most frequent training answer per family on the default job's test prompts."""
    sys.path.insert(0, str(ROOT / "bench"))
    from quality import constant_floor

    from rlkd.builtin import load_data
    from rlkd.config import load_config

    cfg = load_config(None, extra)
    data = load_data(cfg, log=lambda *_: None)
    return constant_floor(data.train, data.test[:cfg.eval.num_examples])[0]["exact_match_mean"]


def report(results: dict, extra: list[str], seeds: int, constant: float) -> str:
    results = dict(sorted(results.items(), key=lambda kv: list(ABLATIONS).index(kv[0])))
    first = next(iter(results.values()))[0]
    lines = ["# AMMD ablations on the skills suite\n",
             f"`python bench/ammd_ablations.py --seeds {seeds}{' -- ' + ' '.join(extra) if extra else ''}`: "
             "the default job (`python -m rlkd.main`) with one change per row. Exact match on the test prompts "
             "(T = 1), mean ± std over " + ("training seeds" if seeds > 1 else "3 sampling seeds of one run") +
             ". TV, context TV and distinct argmax: mean over the last 10 steps' rollouts (β = 1: the teacher-sampled "
             "batch; teacher context TV for scale). Broken: steps on which each invariant failed.\n",
             f"Floors: teacher {first['teacher']:.1f}, student before {first['before']:.1f} (the SFT'd default "
             f"student; the random-init rows start lower), constant answer per family {constant:.1f}.\n",
             "| run | change | EM after | EM before | TV(p*,q) | context TV (teacher) | distinct argmax | broken "
             "| wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        after = [r["after"] for r in runs]
        std = statistics.stdev(after) if len(after) > 1 else runs[0]["after_std"]
        r = runs[0]
        broken = ", ".join(f"{k} {v}" for k, v in r["broken"].items() if v) or "none"
        lines.append(f"| {name} | {ABLATIONS[name][0]} | {statistics.mean(after):.1f} ± {std:.1f} | "
                     f"{r['before']:.1f} | {fmt(r['tv'])} | {fmt(r['context_tv'])} ({fmt(r['teacher_context_tv'])}) | "
                     f"{fmt(r['distinct_argmax'], 0)} | {broken} | {r['wall_seconds']:.0f} |")
    lines += ["", "## Samples (seed 0's answer to the first test prompt)", ""]
    lines += [f"- **{name}**: `{runs[0]['sample']}`" for name, runs in results.items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated subset of " + ",".join(ABLATIONS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ammd_ablations"))
    ap.add_argument("--merge", action="store_true", help="re-run the --only rows and keep the others from --out")
    ap.add_argument("extra", nargs="*", help="overrides applied to every row")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(ABLATIONS)
    results = json.loads(Path(args.out + ".json").read_text())["results"] if args.merge else {}
    with tempfile.TemporaryDirectory(prefix="rlkd-ablations-") as tmp:
        for name in names:
            results[name] = [run_one([*args.extra, *ABLATIONS[name][1]], Path(tmp) / f"{name}-{seed}", seed)
                             for seed in range(args.seeds)]
            r = results[name][0]
            print(f"{name}: EM {r['after']:.1f} (before {r['before']:.1f}) tv {fmt(r['tv'])} "
                  f"context {fmt(r['context_tv'])} ({r['wall_seconds']:.0f}s)", flush=True)
            # after every row, so an interrupted sweep keeps its rows (continue it with --merge --only ...)
            Path(args.out + ".json").write_text(json.dumps({"extra": args.extra, "seeds": args.seeds,
                                                            "results": results}, indent=1) + "\n")
    Path(args.out + ".md").write_text(report(results, args.extra, args.seeds, constant_answer_floor(args.extra)))
    print(Path(args.out + ".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
