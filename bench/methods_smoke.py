"""Run every smoke config under configs/methods/ and record its training loss at the start and end.

Each config runs as a user runs it (`python -m rlkd.main --config ...`, its own local Ray cluster),
one after another, so the wall times compare side by side on the same machine. The loss reported is
the one the method descends (`rlkd.algorithms.METHODS[name].descended`, which tests/test_methods.py checks
too), averaged over the first and the last three steps, since every step trains on a different batch.
For AMMD it is the true β-weighted TV(p*, q) of the step's batches, which the estimated distances bound
(d <= 2·TV) and which is what the student should lower.
Usage: python bench/methods_smoke.py [names...]   -> bench/results/methods_smoke.json (names: only those
rows are re-run; the others are kept from the file)
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rlkd.algorithms import METHODS  # noqa: E402

LOSS = {name: spec.descended for name, spec in METHODS.items() if spec.descended}


def _loss(name: str, row: dict, cfg_beta: float) -> float | None:
    if name in LOSS:
        return row.get(LOSS[name])
    if "loss/policy" not in row:  # AMMD critic warm-up step
        return None
    return cfg_beta * row.get("ammd/tv_off", 0.0) + (1 - cfg_beta) * row.get("ammd/tv_on", 0.0)


def run_one(name: str, out_dir: Path) -> dict:
    import yaml

    cfg = yaml.safe_load((ROOT / "configs/methods" / f"{name}.yaml").read_text())
    beta = cfg["algo"].get("ammd", {}).get("beta", 0.5)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "rlkd.main", "--config", f"configs/methods/{name}.yaml",
                           f"run.output_dir={out_dir}", f"run.name={name}"], cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        return {"name": name, "error": proc.stderr.strip().splitlines()[-1:], "wall_seconds": wall}
    rows = [json.loads(x) for x in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    losses = [v for v in (_loss(name, r, beta) for r in rows) if v is not None]
    summary = json.loads((out_dir / name / "eval.json").read_text())
    return {"name": name, "method": summary["method"], "loss": LOSS.get(name, "beta*TV_off + (1-beta)*TV_on"),
            "first3": sum(losses[:3]) / 3, "last3": sum(losses[-3:]) / 3, "first": losses[0], "last": losses[-1],
            "steps": len(rows), "rollouts": any("timing/rollout" in r for r in rows), "wall_seconds": round(wall, 1),
            "rougeL_8_examples": summary["rougeL"]}


def main() -> int:
    names = sys.argv[1:] or sorted(p.stem for p in (ROOT / "configs/methods").glob("*.yaml"))
    out_dir = Path(tempfile.mkdtemp(prefix="rlkd-methods-"))
    results = []
    for name in names:
        r = run_one(name, out_dir)
        results.append(r)
        if "error" in r:
            print(f"{name:<20} FAILED {r['error']}", flush=True)
        else:
            print(f"{name:<20} {r['loss']:<28} {r['first3']:.4f} -> {r['last3']:.4f}  "
                  f"rollouts={r['rollouts']!s:<5} {r['wall_seconds']:.0f}s", flush=True)
    out = ROOT / "bench/results/methods_smoke.json"
    if sys.argv[1:] and out.is_file():
        kept = [r for r in json.loads(out.read_text())["results"] if r["name"] not in names]
        results = sorted(kept + results, key=lambda r: r["name"])
    out.write_text(json.dumps({"machine": "2-core CPU, no GPU", "results": results}, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    return int(any("error" in r for r in results))


if __name__ == "__main__":
    sys.exit(main())
