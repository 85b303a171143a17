"""Every method of the distillation benchmark at its own best learning rate, chosen on validation.

    python bench/lr_grid.py RESULT.json [RESULT.json ...] [--out bench/results/distill_tuned]
        -> <out>_grid.md (the grid), <out>.md, .json, .png (the final table at each method's chosen rate)

Each RESULT is a file written by bench/distill.py, one learning rate each (`--set learner.student_lr=X`;
a file without it ran the default, 1e-3), same student and budget. The rate is chosen per method and regime
on the validation split only: the mean greedy exact match of its seed-0 run over the last two points of its
learning curve (512 validation prompts; steps 320 and 400 at the default budget). The test split scores
only the chosen runs, and they need every seed the untuned table has (bench/distill.py --seeds 3 --reuse the
seed-0 file at that rate); a method whose chosen rate has fewer seeds is reported with the seeds it has.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from rlkd.config import LearnerConfig  # noqa: E402 (after the path)

DEFAULT_LR = LearnerConfig.student_lr  # what a file without --set learner.student_lr ran at
MIN_RATES = 3  # a method run at fewer rates is not on the grid: listed, left out of the final table


def rate(result: dict, f: Path) -> float:
    """The student learning rate the result file `f` ran at."""
    try:
        lrs = [float(x.split("=", 1)[1]) for x in result.get("set", []) if x.startswith("learner.student_lr=")]
    except ValueError:  # e.g. this script's own output, whose methods ran at different rates
        raise SystemExit(f"{f}: its runs do not share one learning rate: {result.get('set')}") from None
    others = [x for x in result.get("set", []) if not x.startswith("learner.student_lr=")]
    if others:
        raise SystemExit(f"{f}: its runs also set {others}: a grid over the learning rate alone cannot use them")
    return lrs[-1] if lrs else DEFAULT_LR


def validation(run: dict) -> float:
    """What the rate is chosen on: the mean of the last two validation points of the learning curve."""
    return statistics.mean(point[2] for point in run["curve"][-2:])


def choose(files: list[Path]) -> tuple[dict, dict, dict]:
    """grid[(regime, method)][lr] = seed-0 run; runs[(regime, method, lr)] = every seed; the shared header."""
    grid, runs, head = {}, {}, None
    for f in files:
        result = json.loads(f.read_text())
        lr = rate(result, f)
        mine = {k: result.get(k, d) for k, d in (("budget", None), ("student", "pruned"))}
        if head and mine != {k: head[k] for k in mine}:
            raise SystemExit(f"{f}: budget/student {mine} differ from the other files' {head}")
        head = head or {**mine, "floors": result["floors"]}
        for r in result["runs"]:
            have = runs.setdefault((r["regime"], r["method"], lr), [])
            if r["seed"] in {x["seed"] for x in have}:
                continue  # a file that --reuse'd another holds its runs too
            have.append(r)
            if r["seed"] == 0:
                grid.setdefault((r["regime"], r["method"]), {})[lr] = r
    share_prompt_only(grid, runs)
    return grid, runs, head


def share_prompt_only(grid: dict, runs: dict) -> None:
    """A method that needs only prompts sees the same data in every regime (bench/distill.py trains it again
    in each and gets the same run): a rate run in one regime counts in all of them."""
    from distill import GOLD_METHODS, base_method

    regimes = {regime for regime, _ in grid}
    for (regime, method), by_lr in list(grid.items()):
        if base_method(method) in GOLD_METHODS:
            continue
        for other in regimes:
            for lr, run in by_lr.items():
                if lr not in grid.setdefault((other, method), {}):
                    grid[(other, method)][lr] = {**run, "regime": other}
                    runs[(other, method, lr)] = [{**r, "regime": other} for r in runs[(regime, method, lr)]]


def grid_table(grid: dict, chosen: dict, runs: dict) -> str:
    lrs = sorted({lr for by_lr in grid.values() for lr in by_lr})
    lines = ["| regime | method | " + " | ".join(f"lr {lr:g}: val / test" for lr in lrs) + " | chosen | seeds |",
             "|---|---|" + "---|" * len(lrs) + "---|---|"]
    for (regime, method), by_lr in sorted(grid.items()):
        cells = [f"{validation(by_lr[lr]):.1f} / {by_lr[lr]['scores']['greedy']['exact_match']:.1f}"
                 if lr in by_lr else "-" for lr in lrs]
        best = chosen.get((regime, method))
        cells = [f"**{c}**" if lr == best else c for c, lr in zip(cells, lrs)]
        tail = f"{best:g} | {len(runs[(regime, method, best)])}" if best else "not on the grid | -"
        lines.append(f"| {regime} | {method} | " + " | ".join(cells) + f" | {tail} |")
    return "\n".join(lines) + "\n"


def comparisons(chosen: dict, runs: dict) -> str:
    """Paired over the test prompts (every seed): each method at its chosen rate against itself at the
    default rate, and against the leader of its regime."""
    from distill import paired

    def correct(regime, method, lr):
        return [r["scores"]["greedy"]["correct"] for r in runs[(regime, method, lr)]]

    def mean(regime, method, lr):
        return statistics.mean(r["scores"]["greedy"]["exact_match"] for r in runs[(regime, method, lr)])

    lines = []
    for regime in dict.fromkeys(g for g, _ in chosen):
        mine = {m: lr for (g, m), lr in chosen.items() if g == regime}
        leader = max(mine, key=lambda m: mean(regime, m, mine[m]))
        for m, lr in mine.items():
            vs = ([(f"itself at lr {DEFAULT_LR:g}", (m, DEFAULT_LR))]
                  if lr != DEFAULT_LR and (regime, m, DEFAULT_LR) in runs else [])
            vs += [(f"the leader, {leader}", (leader, mine[leader]))] if m != leader else []
            for name, (om, olr) in vs:
                d, lo, hi = paired(correct(regime, m, lr), correct(regime, om, olr))
                lines.append(f"- {regime}: {m} at lr {lr:g} − {name}: {d:+.1f} [{lo:+.1f}, {hi:+.1f}]")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from distill import write_report

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "distill_tuned"))
    a = ap.parse_args(argv)
    grid, runs, head = choose(a.results)
    chosen = {key: max(by_lr, key=lambda lr: (validation(by_lr[lr]), lr == DEFAULT_LR))  # ties: the default
              for key, by_lr in grid.items() if len(by_lr) >= MIN_RATES}
    command = "python bench/lr_grid.py " + " ".join(str(f) for f in a.results)
    text = (f"# Learning-rate grid\n\n`{command}`\n\nGreedy exact match of each method's seed-0 run, "
            "validation (the mean of its last two curve points, what the rate is chosen on) / test (reported, "
            "never used to choose). Chosen rate in bold; seeds: the runs the final table has at that rate. A "
            f"method run at fewer than {MIN_RATES} rates is listed, not chosen for, and left out of the final "
            "table. A method that needs only prompts shares its runs between the regimes. Runs of different "
            "files may have run side by side: compare their seconds only within one file.\n\n"
            + grid_table(grid, chosen, runs) + "\nGreedy exact match on the test split, paired over its prompts "
            "(each prompt averaged over seeds), with 95% bootstrap intervals:\n\n" + comparisons(chosen, runs))
    Path(f"{a.out}_grid.md").write_text(text)
    print(text)
    done = {"floors": head["floors"], "runs": [{**r, "method": f"{method} (lr {lr:g})"}
                                               for (regime, method), lr in chosen.items()
                                               for r in runs[(regime, method, lr)]]}
    regimes = list(dict.fromkeys(regime for regime, _ in chosen))
    methods = list(dict.fromkeys(r["method"] for r in done["runs"]))
    write_report(done, regimes, methods, head["budget"], command + f" --out {a.out}", Path(a.out), 0.0,
                 head["student"], ["learner.student_lr=<chosen per method: see the grid>"])
    with open(f"{a.out}.md", "a") as md:  # the runs came from several files: their seconds may not compare
        md.write(f"\nEach method ran at its own learning rate, chosen on validation: [{Path(a.out).name}_grid.md]"
                 f"({Path(a.out).name}_grid.md). Its runs come from several result files, some of which ran side "
                 "by side on this machine: compare training seconds only between runs of one file.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
