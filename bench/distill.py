"""The distillation benchmark on a student that can learn: which methods add what the teacher knows.

    python bench/distill.py [--smoke] [--seeds 3] [--budget 400] [--regimes scarce,full] [--methods sft,fkl,...]
                            [--reuse earlier.json,...]
        -> bench/results/distill.md, distill.json, distill.png   (--smoke: /tmp, a few minutes)

A method may carry settings of its own section: `okd:teacher_lr=1e-5`, `ammd:critic_network=logratio`
(`algo.<method>.<key>=<value>`; the table names the variant). `--reuse` takes the runs of earlier result
files with the same budget instead of training them again (how the benchmark grows across sessions).

Teacher: the shipped skills teacher (4 layers, 73.6% greedy exact match). Student: the teacher cut to 2
layers by rlkd.prune (`model.prune_layers=2`, 1.37M parameters), the same for every method; or (`--student plateau`)
the shipped from-scratch 2x128 student trained by SFT to its plateau (`model.plateau_student`). Two data regimes:
- `scarce`: 512 labelled train rows (`data.labelled_rows=512`); methods that train on answers draw only from
  them, methods that need only prompts from all 4000 train prompts. This is the regime users distil in;
- `full`: every train row keeps its answer.
Every method runs the same budget of student optimizer steps (AMMD's critic-only warm-up steps and MiniLLM's
PPO epochs as in bench/quality.py), at the default learning rate 1e-3 (`--set learner.student_lr=X` for
another; bench/lr_grid.py picks each method's rate on validation from one file per rate), for each seed. GKD uses
teacher samples for its off-policy half (`seq_kd`), so it is a prompt-only method. Scores:
- test split, 512 prompts: greedy and sampled (T = 1) exact match, TOP-1 agreement with the teacher and the
  gold cross-entropy (teacher-forced on the gold answers), mean ± std over training seeds;
- every method against SFT at the same budget, paired on the same prompts: the mean difference in greedy
  exact match with a 95% bootstrap interval over prompts (each prompt's correctness averaged over seeds);
- learning curves: greedy exact match on 512 validation prompts against student steps and wall-clock seconds.
Each finished run is saved at once; an interrupted benchmark resumes from them (same flags).
OKD's adapted teacher (the teacher with its trained LoRA merged) is scored too, greedy, beside its student.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
REGIMES = {"scarce": 512, "full": 0}  # data.labelled_rows
METHODS = ["sft", "fkl", "rkl", "tvd", "seqkd", "gkd", "opd", "ammd"]
EXTRA = {"gkd": ["algo.gkd.seq_kd=true"], "distillm": ["algo.distillm.init_threshold=0.2"]}
CURVE_POINTS = 5
STUDENTS = {"pruned": (["model.prune_layers=2"], "pruned 2-layer student"),  # --student: its overrides, its name
            "plateau": (["model.plateau_student=true"], "from-scratch 2x128 student at its SFT plateau")}


def parse_methods(text: str) -> list[str]:
    """'sft,okd:teacher_lr=0,trust_kl=1,gkd' -> ['sft', 'okd:teacher_lr=0,trust_kl=1', 'gkd']: a `key=value`
    without a method before it belongs to the variant before it."""
    methods = []
    for item in text.split(","):
        if "=" in item and ":" not in item and methods and ":" in methods[-1]:
            methods[-1] += f",{item}"
        else:
            methods.append(item)
    return methods


def split_variant(method: str) -> tuple[str, list[str]]:
    """'okd:teacher_lr=1e-5,alpha=0.2' -> ('okd', ['algo.okd.teacher_lr=1e-5', 'algo.okd.alpha=0.2'])."""
    base, _, settings = method.partition(":")
    return base, [f"algo.{base}.{kv}" for kv in settings.split(",") if kv]


def base_method(label: str) -> str:
    """'okd:teacher_lr=1e-5' -> 'okd'; 'fkl (lr 0.003)' (bench/lr_grid.py's labels) -> 'fkl'."""
    return label.split(" ")[0].partition(":")[0]


def overrides(method: str, regime: str, budget: int, seed: int, smoke: bool, work: Path,
              student: str = "pruned", common: tuple[str, ...] = ()) -> list[str]:
    from quality import train_steps

    warm = 2 if smoke else 5
    small = ["eval.num_examples=16", "train.batch_size=8"] if smoke else []
    method, own = split_variant(method)
    name = f"{regime}-{method}-{zlib.crc32(','.join(own).encode()) if own else 0}-{seed}"
    return [f"algo.method={method}", *STUDENTS[student][0], f"data.labelled_rows={REGIMES[regime]}",
            f"train.steps={train_steps(method, budget, warm)}", f"algo.ammd.critic_warmup_steps={warm}",
            f"train.seed={seed}", "eval.baselines=false", "train.checkpoint_every=0", "eval.num_seeds=1",
            f"eval.every_steps={max(1, budget // CURVE_POINTS)}", f"run.output_dir={work}",
            f"run.name={name}", *EXTRA.get(method, []), *own, *common, *small]


def run_one(method: str, regime: str, budget: int, seed: int, smoke: bool, work: Path, prep, student: str,
            common: tuple[str, ...] = ()) -> dict:
    from rlkd.config import load_config
    from rlkd.launch import run

    cfg = load_config(None, overrides(method, regime, budget, seed, smoke, work, student, common))
    t0 = time.time()
    run_dir = run(cfg, log=lambda *a: None)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    after = json.loads((run_dir / "eval.json").read_text())["scores"]["student_after"]
    curve = [(r["step"], r["train/wall_seconds"], r["eval/greedy_exact_match"]) for r in rows
             if "eval/greedy_exact_match" in r]
    extra = {}
    if cfg.algo.method == "okd":  # the adapted teacher: its exact match, and its drift at the last step
        drift = [r for r in rows if "okd/teacher_drift_kl" in r][-1]
        extra = {"adapted_teacher": adapted_teacher_greedy(cfg, prep, run_dir),
                 "adapted_drift": {k: drift[f"okd/{k}"] for k in ("teacher_drift_kl", "teacher_top1_agree",
                                                                  "teacher_ce")}}
    return {"method": method, "regime": regime, "seed": seed, "scores": after, "curve": curve,
            "train_seconds": rows[-1]["train/wall_seconds"], "run_seconds": time.time() - t0, **after["forced"],
            **extra}


def adapted_teacher_greedy(cfg, prep, run_dir: Path) -> float:
    """Greedy exact match of OKD's teacher with its trained LoRA merged in (the run saved the adapter)."""
    from peft import PeftModel

    from rlkd.eval import evaluate_dir
    from rlkd.models import load_model

    merged = run_dir / "teacher_adapted"
    PeftModel.from_pretrained(load_model(prep.teacher_dir), str(run_dir / "teacher_adapter")).merge_and_unload(
    ).save_pretrained(str(merged))
    # evaluated in a Ray task on the cluster main() holds open for every run
    return evaluate_dir(cfg, prep.tokenizer, merged, prep.test)["greedy"]["exact_match"]


def floors(prep, cfg) -> dict:
    """Constant answer, the student before (test and validation, for the curves' step 0) and the teacher."""
    from quality import constant_floor

    from rlkd.eval import evaluate_dir
    from rlkd.launch import with_forced

    const, _ = constant_floor(prep.train, prep.test[:cfg.eval.num_examples])
    out = {"constant answer": {"scores": const}}
    for name, d in (("student before", prep.student_dir), ("teacher", prep.teacher_dir)):
        scores = with_forced(cfg, prep, d, evaluate_dir(cfg, prep.tokenizer, d, prep.test))
        out[name] = {"scores": scores, **scores["forced"]}
    out["student before"]["val_greedy"] = evaluate_dir(cfg, prep.tokenizer, prep.student_dir,
                                                       prep.val)["greedy"]["exact_match"]
    return out


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired(a: list[list[int]], b: list[list[int]], draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean per-prompt difference of greedy correctness (each prompt averaged over its seeds), in points, with
    a 95% bootstrap interval over prompts."""
    n = len(a[0])
    d = [100 * (statistics.mean(x[i] for x in a) - statistics.mean(x[i] for x in b)) for i in range(n)]
    rng = random.Random(seed)
    boots = sorted(statistics.mean(d[rng.randrange(n)] for _ in range(n)) for _ in range(draws))
    return statistics.mean(d), boots[int(0.025 * draws)], boots[int(0.975 * draws) - 1]


def table(regime: str, runs: list[dict], fl: dict, labelled: int) -> tuple[str, float]:
    """The final table of one regime, and the largest fraction of the before -> teacher greedy gap closed."""
    before, teacher = (fl[k]["scores"]["greedy"]["exact_match"] for k in ("student before", "teacher"))
    by = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    sft = next((rs for m, rs in by.items() if base_method(m) == "sft"), None)
    lines = ["| model | data used | greedy EM | sampled EM | TOP-1 agree | gold CE | greedy − SFT [95% CI] | "
             "separated from SFT | train s |", "|---|---|---|---|---|---|---|---|---|"]
    c = fl["constant answer"]["scores"]
    lines.append(f"| floor: constant answer | - | {c['exact_match_mean']:.1f} | - | - | - | | | |")
    for k in ("student before", "teacher"):
        f = fl[k]
        lines.append(f"| {k} | - | {f['scores']['greedy']['exact_match']:.1f} | {f['scores']['exact_match_mean']:.1f} "
                     f"| {f['top1_agreement']:.1f} | {f['gold_ce']:.2f} | | | |")
    ranked = sorted(by.items(), key=lambda kv: -statistics.mean(r["scores"]["greedy"]["exact_match"] for r in kv[1]))
    best, widths = -math.inf, []
    for m, rs in ranked:
        g, s = (mean_std([r["scores"]["greedy"]["exact_match"] for r in rs]),
                mean_std([r["scores"]["exact_match_mean"] for r in rs]))
        top1, ce = mean_std([r["top1_agreement"] for r in rs]), mean_std([r["gold_ce"] for r in rs])
        best = max(best, (g[0] - before) / (teacher - before))
        diff, sep = "", ""
        if sft and base_method(m) != "sft":
            d, lo, hi = paired([r["scores"]["greedy"]["correct"] for r in rs],
                               [r["scores"]["greedy"]["correct"] for r in sft])
            widths.append((hi - lo) / 2)
            diff, sep = f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]", ("yes" if lo > 0 or hi < 0 else "no")
        gold = base_method(m) in GOLD_METHODS  # prompt-only methods see the same data in both regimes
        used = (f"{labelled} labelled rows" if labelled else "all 4000 labelled rows") if gold else "all train prompts"
        lines.append(f"| {m} ({len(rs)} seeds) | {used} | {g[0]:.1f} ± {g[1]:.1f} | {s[0]:.1f} ± {s[1]:.1f} | "
                     f"{top1[0]:.1f} ± {top1[1]:.1f} | {ce[0]:.2f} ± {ce[1]:.2f} | {diff} | {sep} | "
                     f"{statistics.mean(r['train_seconds'] for r in rs):.0f} |")
    sdd = (f"Smallest detectable difference against SFT (the widest half-interval above): {max(widths):.1f} points."
           if widths else "")
    for m, rs in ranked:  # OKD: how much of the teacher survived its LoRA training
        if "adapted_teacher" in rs[0]:
            g = mean_std([r["adapted_teacher"] for r in rs])
            kl, agree = (mean_std([r["adapted_drift"][k] for r in rs]) for k in ("teacher_drift_kl",
                                                                                  "teacher_top1_agree"))
            sdd += (f"\n\n{m}'s adapted teacher (LoRA merged) at the end: greedy {g[0]:.1f} ± {g[1]:.1f} "
                    f"(the frozen teacher: {teacher:.1f}); at its last step KL(adapted ‖ frozen) {kl[0]:.3f}, "
                    f"TOP-1 agreement with the frozen teacher {100 * agree[0]:.1f}%.")
    return "\n".join(lines) + f"\n\n{sdd}\n", best


def pairs(runs: list[dict], compare: tuple[str, ...]) -> str:
    """`--compare A/B`: A − B in greedy exact match, paired over the test prompts, where both ran."""
    correct = {}
    for r in runs:
        correct.setdefault(r["method"], []).append(r["scores"]["greedy"]["correct"])
    lines = [f"- {a} − {b}: " + "{:+.1f} [{:+.1f}, {:+.1f}]".format(*paired(correct[a], correct[b]))
             for a, b in (c.split("/") for c in compare) if a in correct and b in correct]
    return "Paired over the test prompts, 95% bootstrap interval:\n\n" + "\n".join(lines) + "\n\n" if lines else ""


GOLD_METHODS = {"sft", "fkl", "rkl", "tvd", "jsd", "okd", "imitkd", "distillm"}  # their schedules use gold rows


def samples(runs: list[dict], fl: dict) -> str:
    """Greedy answers of each model (seed 0) to the first three test prompts."""
    prompts = [x.split(" -> ")[0] for x in fl["teacher"]["scores"]["samples"]]
    out = ["prompts: " + " · ".join(f"`{p}`" for p in prompts)]
    for name, f in (("teacher", fl["teacher"]), ("student before", fl["student before"])):
        out.append(f"- **{name}**: " + " · ".join(f"`{a}`" for a in f["scores"]["greedy"]["answers"]))
    for r in runs:
        if r["seed"] == 0:
            out.append(f"- **{r['method']}**: " + " · ".join(f"`{a}`" for a in r["scores"]["greedy"]["answers"]))
    return "\n".join(out) + "\n"


def plot(runs: list[dict], fl: dict, regimes: list[str], path: Path, student: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(regimes), 2, figsize=(12, 4.2 * len(regimes)), squeeze=False)
    start = fl["student before"]["val_greedy"]
    every = sorted({r["method"] for r in runs})  # one colour per method in every panel
    colour = {m: plt.get_cmap("tab10" if len(every) <= 10 else "tab20")(i) for i, m in enumerate(every)}
    for row, regime in zip(axes, regimes):
        methods = sorted({r["method"] for r in runs if r["regime"] == regime})
        for m in methods:
            rs = [r for r in runs if r["regime"] == regime and r["method"] == m]
            n = min(len(r["curve"]) for r in rs)
            ys = [[start] + [r["curve"][i][2] for i in range(n)] for r in rs]
            for ax, xs in ((row[0], [0] + [rs[0]["curve"][i][0] for i in range(n)]),
                           (row[1], [0] + [statistics.mean(r["curve"][i][1] for r in rs) for i in range(n)])):
                mean = [statistics.mean(y[i] for y in ys) for i in range(n + 1)]
                ax.plot(xs, mean, label=m, marker="o", ms=3, color=colour[m])
                ax.fill_between(xs, [min(y[i] for y in ys) for i in range(n + 1)],
                                [max(y[i] for y in ys) for i in range(n + 1)], color=colour[m], alpha=0.15)
        for ax, xlabel in zip(row, ("student optimizer steps", "training wall-clock seconds")):
            ax.axhline(start, color="grey", ls=":", lw=1)
            ax.set(xlabel=xlabel, ylabel="greedy exact match, % (validation)", title=f"regime: {regime}")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8, ncol=2)
    fig.suptitle(f"{STUDENTS[student][1]} distilled from the skills teacher: mean and min-max over training seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="sft and opd, 1 seed, 3 steps, 16 prompts, to /tmp (tests)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=400, help="student optimizer steps per run")
    ap.add_argument("--regimes", default="scarce,full")
    ap.add_argument("--methods", default=None, help=f"default: {','.join(METHODS)} (--smoke: sft,opd)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "distill"))
    ap.add_argument("--student", choices=sorted(STUDENTS), default="pruned",
                    help="pruned: the teacher cut to 2 layers; plateau: the shipped from-scratch student")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="a config override for every run (e.g. learner.student_lr=1e-4)")
    ap.add_argument("--compare", action="append", default=[], metavar="A/B",
                    help="also report method A - method B, paired over the test prompts (e.g. ammd/gkd)")
    ap.add_argument("--report-only", action="store_true", help="train nothing: the report of the --reuse runs")
    ap.add_argument("--reuse", default="", help="comma-separated result files whose runs (same budget) are kept")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from quality import _resume, _save

    from rlkd.checks import ConfigError
    from rlkd.cluster import connect_ray, shutdown_ray
    from rlkd.config import load_config
    from rlkd.prepare import prepare

    a, t0, log = _args(argv), time.time(), print
    methods = parse_methods(a.methods or ("sft,opd" if a.smoke else ",".join(METHODS)))
    seeds, budget = ([0], 3) if a.smoke else (list(range(a.seeds)), a.budget)
    regimes = ["scarce"] if a.smoke else a.regimes.split(",")
    out = Path(tempfile.mkdtemp(prefix="rlkd-distill-")) / "distill" if a.smoke else Path(a.out)
    work = Path(tempfile.mkdtemp(prefix="rlkd-distill-runs-"))
    for method in methods:  # a misspelt method or setting fails now, not after hours of other runs
        try:
            load_config(None, overrides(method, "scarce", budget, 0, a.smoke, work, a.student, tuple(a.set)))
        except ConfigError as e:
            raise SystemExit(f"--methods {method}: {e}") from None
    cfg = load_config(None, overrides("sft", "scarce", budget, 0, a.smoke, work, a.student))
    prep = prepare(cfg, log=lambda *x: None)  # the pruned student is built (and cached) once
    flags = " --smoke" if a.smoke else (f" --regimes {','.join(regimes)} --methods {','.join(methods)} "
                                        f"--seeds {a.seeds} --budget {budget}" + (a.reuse and f" --reuse {a.reuse}")
                                        + (f" --student {a.student}" if a.student != "pruned" else "")
                                        + "".join(f" --set {x}" for x in a.set)
                                        + "".join(f" --compare {x}" for x in a.compare) + " --report-only" * a.report_only)
    partial = Path(f"{out}.partial.json")
    done = _resume(partial, flags, log)
    t0 -= done.get("seconds", 0.0)
    reuse(done, [Path(x) for x in a.reuse.split(",") if x], budget, a.student, a.set, log)
    started = connect_ray(0, log=lambda *x: None)
    try:
        done["floors"] = done.get("floors") or floors(prep, cfg)
        _save(partial, done, t0)
        for regime in ([] if a.report_only else regimes):
            for method in methods:
                for seed in seeds:
                    if any((r["method"], r["regime"], r["seed"]) == (method, regime, seed) for r in done["runs"]):
                        continue
                    r = run_one(method, regime, budget, seed, a.smoke, work, prep, a.student, tuple(a.set))
                    done["runs"].append(r)
                    _save(partial, done, t0)
                    log(f"{regime} {method} seed {seed}: greedy {r['scores']['greedy']['exact_match']:.1f} "
                        f"({r['run_seconds']:.0f}s)")
    finally:
        shutdown_ray(started)
    # the report holds the reused runs too: their regimes and methods after the ones asked for
    regimes += [g for g in dict.fromkeys(r["regime"] for r in done["runs"]) if g not in regimes]
    methods += [m for m in dict.fromkeys(r["method"] for r in done["runs"]) if m not in methods]
    write_report(done, regimes, methods, budget, f"python bench/distill.py{flags}", out, time.time() - t0, a.student,
                 a.set, tuple(a.compare))
    partial.unlink(missing_ok=True)
    return 0


def reuse(done: dict, files: list[Path], budget: int, student: str, common: list[str], log) -> None:
    """Add the runs (and floors) of earlier result files with the same budget, student and --set that `done`
    lacks. (Files written before these were recorded are the pruned student with no --set.)"""
    for f in files:
        old = json.loads(f.read_text())
        for what, theirs, ours in (("budget", old["budget"], budget), ("student", old.get("student", "pruned"),
                                   student), ("--set", old.get("set", []), list(common))):
            if theirs != ours:
                raise SystemExit(f"--reuse {f}: its runs have {what} {theirs}, not {ours}")
        have = {(r["method"], r["regime"], r["seed"]) for r in done["runs"]}
        new = [r for r in old["runs"] if (r["method"], r["regime"], r["seed"]) not in have]
        done["runs"] += new
        done["floors"] = done.get("floors") or old["floors"]
        log(f"reusing {len(new)} runs of {f}")


def write_report(done: dict, regimes, methods, budget: int, command: str, out: Path, seconds: float,
                 student: str, common: list[str], compare: tuple[str, ...] = ()) -> None:
    fl, runs = done["floors"], [r for r in done["runs"] if r["method"] in methods]
    spent = sum(r["run_seconds"] for r in runs) / 60  # reused runs were timed when they ran
    took = f"{seconds / 60:.0f} min on this machine; " if seconds else "merged from saved runs; "
    text = [f"# Distillation benchmark\n\n`{command}` ({took}"
            f"its {len(runs)} runs took {spent:.0f} min of training and evaluation in all): "
            f"skills suite, {STUDENTS[student][1]}, {budget} student optimizer steps per run. Test split: "
            f"{len(fl['teacher']['scores']['greedy']['correct'])} prompts; greedy exact match, one T = 1 sample "
            "per prompt, TOP-1 agreement and gold cross-entropy; mean ± std over training seeds. Curves: "
            f"[{out.name}.png]({out.name}.png).\n"]
    for regime in regimes:
        rs = [r for r in runs if r["regime"] == regime]
        body, best = table(regime, rs, fl, REGIMES[regime])
        below = "; below 0: every method ends below the student before" if best < 0 else ""
        text.append(f"## Regime: {regime}\n\n{body}\n{pairs(rs, compare)}The best method closes {100 * best:.0f}% of the gap between the "
                    f"student before and the teacher (greedy{below}).\n\nGreedy answers to the first three test "
                    f"prompts:\n\n{samples(rs, fl)}")
    Path(f"{out}.md").write_text("\n".join(text))
    Path(f"{out}.json").write_text(json.dumps({"budget": budget, "student": student, "set": list(common),
                                                "floors": fl, "runs": runs}, indent=1) + "\n")
    plot(runs, fl, regimes, Path(f"{out}.png"), student)
    print("\n".join(text))


if __name__ == "__main__":
    sys.exit(main())
