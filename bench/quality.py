"""Method-by-method quality: every method, two student sizes, several seeds, one optimizer-step budget.

    python bench/quality.py [--smoke] [--seeds 3] [--budget 40] [--methods ammd,gkd,...]
        -> bench/results/quality.md, quality.json, quality.png   (--smoke: /tmp, about a minute)

Teacher: the embedded default (cached). Students: the embedded default student and a narrower one,
both from the same random initialization for every method. Budget: the same number of student
optimizer steps per method (MiniLLM's PPO epochs count, so it sees budget / ppo_epochs batches;
AMMD's critic-only warm-up steps do not). Reported per method: held-out Dolly ROUGE-L (the run's
own eval.json), DialogSum dev ROUGE-L (summarization, never trained on), TOP-1 agreement and
ExAccErr(16) against the teacher on Dolly, training wall time and the student tokens generated.
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
sys.path[:0] = [str(ROOT)]
DIALOGSUM = ROOT.parent / "shared" / "data" / "dialogsum" / "dialogsum.dev.jsonl"
METHODS = ["sft", "fkl", "rkl", "jsd", "tvd", "seqkd", "gkd", "imitkd", "distillm", "minillm", "okd", "ammd"]


def dialogsum_examples(n: int):
    from rlkd.data import Example, format_prompt

    rows = [json.loads(x) for x in DIALOGSUM.read_text().splitlines()[:n]]
    return [Example(format_prompt("Summarize the dialogue.", r["dialogue"]), [r["summary"]]) for r in rows]


def students(prep, base_cfg, root: Path) -> dict[str, Path]:
    """'S': the embedded default student; 'XS': half as wide, same layers, random init."""
    from rlkd.models import load_model, tiny_llama

    t = base_cfg.model.tiny
    xs = root / f"student-xs-{t.student_layers}x{t.student_hidden // 2}"
    if not (xs / "config.json").exists():
        tiny_llama(prep.tokenizer, max(t.head_dim, t.student_hidden // 2), t.student_layers, t.head_dim,
                   load_model(prep.student_dir).config.max_position_embeddings, seed=7).save_pretrained(str(xs))
        prep.tokenizer.save_pretrained(str(xs))
    return {"S": prep.student_dir, "XS": xs}


def run_one(base: str, method: str, student: Path, teacher: Path, seed: int, budget: int, out: Path, smoke: bool):
    from rlkd.config import load_config
    from rlkd.launch import run

    steps = {"minillm": max(1, budget // 4)}.get(method, budget)
    warm = 2 if smoke else 5
    overrides = [f"model.teacher={teacher}", f"model.student={student}", f"algo.method={method}", f"train.seed={seed}",
                 f"train.steps={steps + (warm if method == 'ammd' else 0)}", f"algo.ammd.critic_warmup_steps={warm}",
                 f"eval.every_steps={max(1, steps // 4)}", f"run.output_dir={out}",
                 f"run.name={method}-{student.name}-{seed}", "algo.distillm.init_threshold=0.2", "eval.baselines=false",
                 "train.checkpoint_every=0"]
    t0 = time.time()
    run_dir = run(load_config(base, overrides), log=lambda *a: None)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "eval.json").read_text())
    def student_steps(step):  # x axis in student optimizer steps, the budget's unit
        return step * 4 if method == "minillm" else max(0, step - warm) if method == "ammd" else step

    curve = [(student_steps(r["step"]), r["train/wall_seconds"], r["eval/rougeL"]) for r in rows if "eval/rougeL" in r]
    last = rows[-1]
    curve.append((student_steps(last["step"]), last["train/wall_seconds"], summary["rougeL"]["student_after"]))
    return run_dir / "student", {"rougeL_dolly": summary["rougeL"]["student_after"], "curve": curve,
                                 "train_seconds": last["train/wall_seconds"], "run_seconds": time.time() - t0,
                                 "generated_tokens": sum(r.get("tokens/generated", 0.0) for r in rows)}


def agreement(student_dir: Path, teacher: Path, prep, val, dialogsum, n_new: int, seed: int) -> dict:
    """TOP-1 agreement and ExAccErr(16) on Dolly, ROUGE-L on DialogSum: rlkd.eval's functions, run as
    Ray tasks so the pooled workers keep torch imported between the 72 runs."""
    import ray

    from actors.hf_generate import generate_from_dir
    from rlkd.data import tokenize
    from rlkd.eval import teacher_metrics
    from rlkd.evaluation import decode, rouge_l

    tok, gen = prep.tokenizer, ray.remote(num_cpus=1)(generate_from_dir)
    rows_v, rows_d = (tokenize(x, tok, 256, n_new) for x in (val, dialogsum))
    prompts_v, prompts_d = [r.prompt_ids for r in rows_v], [r.prompt_ids for r in rows_d]
    samples_v, samples_d = (gen.remote(str(student_dir), p, tok.pad_token_id, tok.eos_token_id, n_new, seed, 6)
                            for p in (prompts_v, prompts_d))
    metrics = ray.remote(num_cpus=1)(teacher_metrics).remote(
        teacher, student_dir, prep.vocab_size, tok.pad_token_id, tok.eos_token_id, prompts_v,
        [r.response_ids for r in rows_v], samples_v, n_new, seed, 16)
    dolly, summaries = ray.get([metrics, samples_d])
    return {"top1_agreement": dolly["top1_agreement"], "exacc_err_16": dolly["exacc_err_16"],
            "rougeL_dialogsum": rouge_l(decode(tok, summaries), [r.references for r in rows_d])}


def _ms(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def table(results: list[dict]) -> str:
    lines = ["| student | method | Dolly ROUGE-L | DialogSum ROUGE-L | TOP-1 agr. | ExAccErr(16) % | train s | "
             "student tokens |", "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["student"], r["method"]) for r in results}, key=lambda k: (k[0], METHODS.index(k[1])))
    for student, method in keys:
        rs = [r for r in results if r["student"] == student and r["method"] == method]
        cols = [_ms([r[k] for r in rs]) for k in ("rougeL_dolly", "rougeL_dialogsum", "top1_agreement",
                                                     "exacc_err_16", "train_seconds")]
        lines.append(f"| {student} | {method} | " + " | ".join(cols) +
                     f" | {statistics.mean(r['generated_tokens'] for r in rs):.0f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab20").colors
    for i, method in enumerate(METHODS):
        rs = [r for r in results if r["method"] == method and r["student"] == "S"]
        if not rs:
            continue
        n = min(len(r["curve"]) for r in rs)
        steps = [rs[0]["curve"][i][0] for i in range(n)]
        wall = [statistics.mean(r["curve"][i][1] for r in rs) for i in range(n)]
        score = [statistics.mean(r["curve"][i][2] for r in rs) for i in range(n)]
        style = {"color": "black", "linewidth": 2.5} if method == "ammd" else {"color": colors[i], "linewidth": 1.2}
        axes[0].plot(steps, score, marker="o", label=method, **style)
        axes[1].plot(wall, score, marker="o", label=method, **style)
    axes[0].set(xlabel="student optimizer steps", ylabel="held-out Dolly ROUGE-L (mean over seeds)",
                title="student S: vs step")
    axes[1].set(xlabel="training wall clock (s)", title="student S: vs wall clock")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny config, 2 methods, 1 seed, to /tmp (tests)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=int, default=40, help="student optimizer steps per run")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality"))
    a = ap.parse_args(argv)
    t0 = time.time()
    import ray

    from rlkd.config import load_config
    from rlkd.data import SHIPPED_DOLLY, read_examples, split
    from rlkd.launch import connect_ray, prepare

    base = "configs/smoke.yaml" if a.smoke else "configs/default.yaml"
    methods = ["sft", "ammd"] if a.smoke else a.methods.split(",")
    seeds, budget = ([10], 3) if a.smoke else ([10 * (i + 1) for i in range(a.seeds)], a.budget)
    out = Path(tempfile.mkdtemp(prefix="rlkd-quality-")) / "quality" if a.smoke else Path(a.out)
    cfg = load_config(str(ROOT / base))
    prep = prepare(cfg, log=lambda *x: None)
    val = split(read_examples(SHIPPED_DOLLY, cfg.data.max_rows)[0], cfg.data.val_size, cfg.data.split_seed)[1]
    val = val[:cfg.eval.num_examples]
    dialog = dialogsum_examples(len(val))
    runs_dir = Path(tempfile.mkdtemp(prefix="rlkd-quality-runs-"))
    started = connect_ray(cfg.run.num_cpus, log=lambda *x: None)
    results = []
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for size, student in students(prep, cfg, runs_dir).items():
            for method in methods:
                for seed in seeds:
                    final, r = run_one(str(ROOT / base), method, student, prep.teacher_dir, seed, budget, runs_dir,
                                       a.smoke)
                    r.update(agreement(final, prep.teacher_dir, prep, val, dialog, cfg.data.max_response_tokens, seed))
                    results.append({"student": size, "method": method, "seed": seed, **r})
                    Path(f"{out}.partial.json").write_text(json.dumps(results) + "\n")  # a crash keeps the runs
                    print(f"{size} {method} seed {seed}: Dolly {r['rougeL_dolly']:.2f} DialogSum "
                          f"{r['rougeL_dialogsum']:.2f} ({r['run_seconds']:.0f}s)", flush=True)
    finally:
        if started:
            ray.shutdown()
    flags = " --smoke" if a.smoke else f" --seeds {a.seeds} --budget {a.budget}"
    head = (f"`python bench/quality.py{flags}`: {len(seeds)} seed(s), {budget} student "
            f"optimizer steps per run, {len(val)} held-out Dolly and {len(dialog)} DialogSum dev prompts; "
            f"{(time.time() - t0) / 60:.0f} min in all on this machine\n\n")
    Path(f"{out}.md").write_text(head + table(results))
    Path(f"{out}.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, Path(f"{out}.png"))
    Path(f"{out}.partial.json").unlink(missing_ok=True)
    print(head + table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
