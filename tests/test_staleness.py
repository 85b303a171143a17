"""rollout.max_staleness = 1 through the real pipeline: the rollout actor generates step t+1 while the
learner updates on step t, and the lag is bounded by 1. Staleness 0 matches the code before staleness."""
import json
import math

from rlkd.config import load_config
from rlkd.launch import run
from rlkd.outputs import COMPLETED


def test_staleness_one_overlaps_and_bounds_the_lag(ray_cluster, tmp_path):
    cfg = load_config("configs/smoke.yaml", [
        f"run.output_dir={tmp_path}", f"model.cache_dir={tmp_path / 'cache'}", "run.name=stale",
        "algo.method=ammd", "algo.ammd.critic_warmup_steps=1", "rollout.max_staleness=1", "train.steps=10",
        "eval.num_examples=0"])
    run_dir = run(cfg)
    assert (run_dir / COMPLETED).exists()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lags = [r["rollout/version_lag"] for r in rows]
    assert max(lags) == 1 and lags[0] == 0 and lags[2:] == [1] * (len(rows) - 2)  # lag 1 once the student moves
    assert all(r["rollout/queue_depth"] == 1 for r in rows)
    # Lag 1 from step 3 on means step t+1's batch was sampled before step t's update: the overlap itself.
    # How much time it saves depends on the machine and its load, so it is measured in bench/throughput.py,
    # not asserted here (a loaded 2-core machine can run the overlapped phases no faster than in a row).
    later = rows[2:]
    assert all(abs(r["loss/pg"]) < 1e3 for r in later)  # the importance-weighted pg term stays finite


# Integer-valued metrics (counts, positions) must match exactly. Floats are compared within a tolerance,
# because float32 results of the same code differ between machines, BLAS kernels and thread counts: the
# issue-25 run on another machine differed in the 7th significant digit (rel 1e-6 on losses). REL is 100x
# that, and still far below what a deliberate numeric change moves (a changed reduction, coefficient or
# seed moves these metrics by 1e-3 or more). ABS covers metrics that are themselves round-off (the sync
# gap is ~1e-7: it only has to stay at round-off) and values near zero.
REL, ABS = 1e-4, 1e-5


def _close(want: float, got: float) -> bool:
    if float(want).is_integer() and float(got).is_integer():
        return want == got
    return math.isclose(want, got, rel_tol=REL, abs_tol=ABS)


def test_staleness_zero_matches_the_code_before(ray_cluster, tmp_path):
    """max_staleness 0 (the default) keeps the strictly sequential step: a 6-step AMMD smoke run gives the
    metrics the code before staleness existed gave (tests/data/ammd_smoke_6_steps.json, written by commit
    7b2bdb9 with the run below; timings and memory excluded, new keys ignored), within REL / ABS above on
    any machine. On one machine the same run is deterministic: a second run in this test equals the first
    bit for bit. A deliberate numeric change must rewrite the golden file, and say so in its commit."""
    from pathlib import Path

    golden = json.loads((Path(__file__).parent / "data" / "ammd_smoke_6_steps.json").read_text())

    def metrics(name):
        cfg = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}", f"model.cache_dir={tmp_path / 'cache'}",
                                                 f"run.name={name}", "train.steps=6", "eval.num_examples=0",
                                                 "algo.ammd.critic_warmup_steps=2"])
        return [json.loads(x) for x in (run(cfg, log=lambda *a: None) / "metrics.jsonl").read_text().splitlines()]

    rows = metrics("g")
    assert len(rows) == len(golden)
    for want, got in zip(golden, rows):
        off = {k: (v, got[k]) for k, v in want.items() if not _close(v, got[k])}
        assert not off, f"step {want['step']}: golden != this run beyond rel {REL} / abs {ABS}: {off}"
    again = metrics("g2")
    for a, b in zip(rows, again):  # same machine, same code: exact, timings aside
        assert {k: v for k, v in a.items() if k in golden[0] or k.startswith(("loss/", "ammd/", "collapse/"))} == \
            {k: v for k, v in b.items() if k in golden[0] or k.startswith(("loss/", "ammd/", "collapse/"))}
