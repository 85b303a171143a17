"""Method-by-method quality on the skills suite: every method, two student sizes, several training seeds,
learning rates chosen on validation by a Ray Tune sweep, one budget of student optimizer steps.

    python bench/quality.py [--smoke] [--seeds 3] [--budget 200] [--methods ammd,gkd,...] [--lrs 3e-4,1e-3,3e-3]
        -> bench/results/quality.md, quality.json, quality.png   (--smoke: /tmp, a few minutes)

Teacher: the shipped skills teacher. Students: S (2x128) and XS (2x64), both SFT'd with the same fixed
number of steps on the suite (the 'student before'). Per method: a Tune grid over learner.student_lr on
student S, scored by validation exact match; then every size x seed at the chosen rate, scored on the
test split (the run's own final evaluation: exact match, ROUGE-L, diversity, length, EOS rate, over 3
sampling seeds) plus teacher-forced metrics (gold CE, TOP-1 agreement, ExAccErr). MiniLLM's PPO epochs
count toward the budget; AMMD's critic-only warm-up steps do not. A short Dolly section shows rlkd on
real instruction data, against the floors a constant string and a copy of the instruction set.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
SIZES = {"S": 128, "XS": 64}


def _methods() -> list[str]:
    from rlkd.algorithms import METHODS

    return list(METHODS)


def train_steps(method: str, budget: int, warm: int) -> int:
    """Controller steps that spend `budget` student optimizer steps: MiniLLM's 4 PPO epochs count,
    AMMD's `warm` critic-only steps do not."""
    return {"minillm": max(1, budget // 4)}.get(method, budget) + (warm if method == "ammd" else 0)


def overrides(method: str, budget: int, smoke: bool) -> list[str]:
    """What every run of the benchmark shares; `budget` student optimizer steps."""
    warm = 2 if smoke else 5
    steps = train_steps(method, budget, warm)
    small = ["model.tiny.student_sft_steps=20", "train.batch_size=8", "eval.num_examples=16"] if smoke else []
    return [f"algo.method={method}", f"train.steps={steps}", f"algo.ammd.critic_warmup_steps={warm}",
            "algo.distillm.init_threshold=0.2", "eval.baselines=false", "train.checkpoint_every=0",
            "eval.num_examples=128", "data.builtin=skills", *small]


def choose_lr(method: str, lrs: list[float], budget: int, smoke: bool, work: Path, log) -> tuple[float, str]:
    """A Ray Tune grid over learner.student_lr (student S, validation exact match at the last step)."""
    import yaml

    from rlkd.config import build_config, to_dict
    from rlkd.tune import sweep

    cfg = to_dict(build_config({}, overrides(method, budget, smoke) + [f"run.output_dir={work}"]))
    cfg["eval"]["every_steps"] = cfg["train"]["steps"]  # one validation score, at the end of the budget
    cfg["tune"] = {"name": f"lr-{method}", "num_samples": 1, "max_concurrent": 1, "scheduler": "fifo",
                   "metric": "eval/exact_match", "mode": "max", "space": {"learner.student_lr": {"grid": lrs}}}
    path = work / f"sweep-{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    exp, _ = sweep(str(path), log=lambda *a: None)
    best = yaml.safe_load((exp / "best_config.yaml").read_text())["learner"]["student_lr"]
    log(f"{method}: lr {best} chosen on validation\n{(exp / 'results.md').read_text()}")
    return best, (exp / "results.md").read_text()


def adapted_teacher_dir(run_dir: Path, teacher: Path) -> Path:
    """OKD: the teacher with its trained LoRA merged, as a plain HF directory."""
    from peft import PeftModel

    from rlkd.models import load_model, load_tokenizer

    out = run_dir / "teacher_adapted"
    PeftModel.from_pretrained(load_model(teacher), str(run_dir / "teacher_adapter")).merge_and_unload().save_pretrained(
        str(out))
    load_tokenizer(teacher).save_pretrained(str(out))
    return out


def forced_metrics(model_dir: Path, teacher: Path, prep, cfg, samples_seed: int) -> dict:
    """Gold CE, TOP-1 agreement and ExAccErr on the evaluated test rows (rlkd.eval's task)."""
    import ray

    from actors.hf_generate import generate_from_dir
    from rlkd.eval import teacher_metrics

    rows, tok = prep.test[:cfg.eval.num_examples], prep.tokenizer
    prompts, n = [r.prompt_ids for r in rows], cfg.data.max_response_tokens
    samples = ray.remote(num_cpus=1)(generate_from_dir).remote(str(model_dir), prompts, tok.pad_token_id,
                                                               tok.eos_token_id, n, samples_seed, 6)
    m = ray.get(ray.remote(num_cpus=1)(teacher_metrics).remote(
        teacher, model_dir, prep.vocab_size, tok.pad_token_id, tok.eos_token_id, prompts,
        [r.response_ids for r in rows], samples, n, samples_seed, 32, 6))
    return {k: m[k] for k in ("gold_ce", "top1_agreement", "exacc_err_16")}


def run_one(method: str, size: str, lr: float, seed: int, budget: int, smoke: bool, work: Path, prep) -> dict:
    from rlkd.config import load_config
    from rlkd.launch import run

    cfg = load_config(None, overrides(method, budget, smoke) + [
        f"model.tiny.student_hidden={SIZES[size]}", f"learner.student_lr={lr}", f"train.seed={seed}",
        f"run.output_dir={work}", f"run.name={method}-{size}-{seed}"])
    t0 = time.time()
    run_dir = run(cfg, log=lambda *a: None)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    after = json.loads((run_dir / "eval.json").read_text())["scores"]["student_after"]
    result = {"method": method, "student": size, "seed": seed, "lr": lr, "scores": after,
              "train_seconds": rows[-1]["train/wall_seconds"], "run_seconds": time.time() - t0,
              "generated_tokens": sum(r.get("tokens/generated", 0.0) for r in rows),
              **forced_metrics(run_dir / "student", prep.teacher_dir, prep, cfg, cfg.eval.seed)}
    if method == "okd":
        adapted = forced_metrics(run_dir / "student", adapted_teacher_dir(run_dir, prep.teacher_dir), prep, cfg,
                                 cfg.eval.seed)
        result["top1_agreement_adapted"] = adapted["top1_agreement"]
    return result


def constant_floor(train, rows) -> tuple[dict, dict]:
    """Scores of answering each test row with its family's most frequent training answer, and those answers."""
    from collections import Counter

    from rlkd.metrics import sample_scores, summarize
    from rlkd.tasks import skills

    common = {f: Counter(r.references[0] for r in train if r.family == f).most_common(1)[0][0]
              for f in skills.FAMILIES}
    texts = [common[r.family] for r in rows]
    refs, fams = [r.references for r in rows], [r.family for r in rows]
    const = summarize([sample_scores(texts, [[0]] * len(rows), refs, fams, -1)], [texts], refs, fams)
    const["samples"] = [f"-> {t}" for t in texts[:3]]
    return const, common


def floors(prep_by_size: dict, cfg, work: Path) -> list[dict]:
    """Teacher, the students before distillation, and the constant answer per family."""
    from rlkd.eval import evaluate_dir

    prep = prep_by_size["S"]
    const, common = constant_floor(prep.train, prep.test[:cfg.eval.num_examples])
    out = [{"method": "floor: constant answer", "student": "-", "scores": const, "answers": common},
           {"method": "teacher", "student": "-",
            "scores": evaluate_dir(cfg, prep.tokenizer, prep.teacher_dir, prep.test),
            **forced_metrics(prep.teacher_dir, prep.teacher_dir, prep, cfg, cfg.eval.seed)}]
    for size, p in prep_by_size.items():
        out.append({"method": "student before", "student": size,
                    "scores": evaluate_dir(cfg, p.tokenizer, p.student_dir, p.test),
                    **forced_metrics(p.student_dir, p.teacher_dir, p, cfg, cfg.eval.seed)})
    return out


def _resume(partial: Path, flags: str, log) -> dict:
    """The finished sweeps, floors and runs of an interrupted benchmark with the same flags, else nothing."""
    if partial.exists():
        done = json.loads(partial.read_text())
        if done.get("flags") == flags:
            log(f"resuming from {partial}: {len(done['sweeps'])} sweeps, {len(done['runs'])} runs done")
            return done
        log(f"ignoring {partial}: it was written with flags {done.get('flags')!r}, not {flags!r}")
    partial.parent.mkdir(parents=True, exist_ok=True)
    return {"flags": flags, "sweeps": {}, "floors": None, "runs": []}


def _save(partial: Path, done: dict, t0: float) -> None:
    done["seconds"] = time.time() - t0
    tmp = partial.with_suffix(".tmp")
    tmp.write_text(json.dumps(done) + "\n")
    tmp.replace(partial)  # atomic: a kill mid-write never loses the finished runs


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="gkd only, 2 rates, 1 seed, 3 steps, to /tmp (tests)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=200, help="student optimizer steps per run")
    ap.add_argument("--methods", default=",".join(_methods()), help="default: every method of rlkd.algorithms")
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="the learning-rate grid of every method's sweep")
    ap.add_argument("--dolly-methods", default="sft,fkl,ammd", help="methods of the Dolly section ('' skips it)")
    ap.add_argument("--dolly-only", action="store_true",
                    help="run only the Dolly section and splice it into an existing <out>.md / <out>.json")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality"))
    return ap.parse_args(argv)


def dolly_only(a, log) -> int:
    """Re-run the Dolly section alone; the skills tables already in <out>.md are kept as they are."""
    from quality_dolly import dolly_section

    from rlkd.cluster import connect_ray, shutdown_ray

    md, js = Path(f"{a.out}.md"), Path(f"{a.out}.json")
    if not md.is_file() or not js.is_file():
        raise SystemExit(f"--dolly-only needs {md} and {js} from a full run")
    t0, work = time.time(), Path(tempfile.mkdtemp(prefix="rlkd-quality-runs-"))
    started = connect_ray(0, log=lambda *x: None)
    try:
        section = dolly_section(a.dolly_methods.split(","), list(range(a.seeds)), a.budget, False, work, log)
    finally:
        shutdown_ray(started)
    section = section.replace("student steps)", f"student steps; `python bench/quality.py --dolly-only "
                              f"--seeds {a.seeds} --budget {a.budget}`, {(time.time() - t0) / 60:.0f} min)", 1)
    text = md.read_text().split("\n## Dolly", 1)[0].rstrip("\n") + "\n"
    md.write_text(text + section)
    record = json.loads(js.read_text())
    js.write_text(json.dumps({**record, "dolly_md": section}, indent=1) + "\n")
    print(section)
    return 0


def _train_all(methods, seeds, budget, smoke, work, preps, done, save, log) -> None:
    """Every method x student x seed at the method's chosen rate; each finished run is saved at once."""
    for method in methods:
        for size in SIZES:
            for seed in seeds:
                if any((r["method"], r["student"], r["seed"]) == (method, size, seed) for r in done["runs"]):
                    continue
                r = run_one(method, size, done["sweeps"][method][0], seed, budget, smoke, work, preps[size])
                done["runs"].append(r)
                save()  # an interrupted benchmark resumes from the finished runs
                log(f"{size} {method} seed {seed}: exact match {r['scores']['exact_match_mean']:.1f} "
                    f"({r['run_seconds']:.0f}s)")


def main(argv=None) -> int:
    a, t0, log = _args(argv), time.time(), print
    if a.dolly_only:
        return dolly_only(a, log)
    from quality_dolly import dolly_section
    from quality_report import report

    from rlkd.cluster import connect_ray, shutdown_ray
    from rlkd.config import load_config
    from rlkd.prepare import prepare

    methods = ["gkd"] if a.smoke else a.methods.split(",")
    seeds, budget = ([0], 3) if a.smoke else (list(range(a.seeds)), a.budget)
    lrs = [1e-3, 3e-3] if a.smoke else [float(x) for x in a.lrs.split(",")]
    out = Path(tempfile.mkdtemp(prefix="rlkd-quality-")) / "quality" if a.smoke else Path(a.out)
    work = Path(tempfile.mkdtemp(prefix="rlkd-quality-runs-"))
    cfgs = {s: load_config(None, overrides("sft", budget, a.smoke) + [f"model.tiny.student_hidden={h}"])
            for s, h in SIZES.items()}
    preps = {s: prepare(c, log=lambda *x: None) for s, c in cfgs.items()}  # builds both SFT'd students once
    flags = " --smoke" if a.smoke else f" --seeds {a.seeds} --budget {a.budget} --lrs {a.lrs}"
    partial = Path(f"{out}.partial.json")
    done = _resume(partial, flags, log)
    t0 -= done.get("seconds", 0.0)  # the wall time reported includes the interrupted sessions'
    save = lambda: _save(partial, done, t0)  # noqa: E731
    for method in methods:  # each sweep starts and stops its own Ray cluster
        if method not in done["sweeps"]:
            done["sweeps"][method] = choose_lr(method, lrs, budget, a.smoke, work, log)
            save()
    started = connect_ray(0, log=lambda *x: None)
    try:
        done["floors"] = done.get("floors") or floors(preps, cfgs["S"], work)
        _train_all(methods, seeds, budget, a.smoke, work, preps, done, save, log)
        if "dolly" not in done:
            dolly_methods = a.dolly_methods.split(",") if a.dolly_methods and not a.smoke else []
            done["dolly"] = dolly_section(dolly_methods, seeds, budget, a.smoke, work, log)
            save()
    finally:
        shutdown_ray(started)
    head = (f"`python bench/quality.py{flags}`: skills suite, {len(seeds)} training seed(s) per method and student, "
            f"budget {budget} student optimizer steps per run, learning rate per method from the grid {lrs} "
            f"chosen on validation exact match; test split, {cfgs['S'].eval.num_examples} prompts, "
            f"{cfgs['S'].eval.num_seeds} sampling seeds; {(time.time() - t0) / 60:.0f} min in all on this machine")
    results = [r for r in done["runs"] if r["method"] in methods]
    text = report(head, done["floors"], results, {m: done["sweeps"][m][1] for m in methods}, Path(f"{out}.png"))
    Path(f"{out}.md").write_text(text + done["dolly"])
    record = {"budget": budget, "lrs": lrs, "floors": done["floors"], "runs": results}
    Path(f"{out}.json").write_text(json.dumps(record, indent=1) + "\n")
    partial.unlink(missing_ok=True)
    print(text + done["dolly"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
