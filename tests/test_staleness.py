"""rollout.max_staleness = 1 through the real pipeline: the rollout actor generates step t+1 while the
learner updates on step t. The lag is bounded by 1, and the step takes less than its phases added up."""
import json
import statistics

from rlkd.config import load_config
from rlkd.launch import run
from rlkd.outputs import COMPLETED


def test_staleness_one_overlaps_and_bounds_the_lag(ray_cluster, tmp_path):
    cfg = load_config("configs/smoke.yaml", [
        f"run.output_dir={tmp_path}", f"model.cache_dir={tmp_path / 'cache'}", "run.name=stale",
        "algo.method=ammd", "algo.ammd.critic_warmup_steps=1", "rollout.max_staleness=1", "train.steps=10",
        "eval.num_examples=0", "data.max_response_tokens=48"])  # generation long enough to outweigh Ray's overhead
    run_dir = run(cfg)
    assert (run_dir / COMPLETED).exists()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lags = [r["rollout/version_lag"] for r in rows]
    assert max(lags) == 1 and lags[0] == 0 and lags[2:] == [1] * (len(rows) - 2)  # lag 1 once the student moves
    assert all(r["rollout/queue_depth"] == 1 for r in rows)
    # each phase's own time (the rollout as its actor timed it; 'rollout' is only the driver's wait for it):
    # the rollout hides behind the teacher's generation and the learner's updates
    later = rows[2:]
    step = statistics.mean(r["timing/step"] for r in later)
    phases = statistics.mean(sum(v for k, v in r.items() if k.startswith("timing/") and k not in
                                 ("timing/step", "timing/rollout")) for r in later)
    assert step < phases, f"no overlap: step {step:.3f}s, phases {phases:.3f}s"
    assert all(abs(r["loss/pg"]) < 1e3 for r in later)  # the importance-weighted pg term stays finite


def test_staleness_zero_is_bit_identical_to_the_code_before(ray_cluster, tmp_path):
    """max_staleness 0 (the default) keeps the strictly sequential step: a 6-step AMMD smoke run gives
    exactly the metrics the code before staleness existed gave (tests/data/ammd_smoke_6_steps.json, written
    by commit 7b2bdb9 with the run below; timings and memory excluded, new keys ignored). A deliberate
    numeric change must rewrite that file, and say so in its commit."""
    from pathlib import Path

    golden = json.loads((Path(__file__).parent / "data" / "ammd_smoke_6_steps.json").read_text())
    cfg = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}", f"model.cache_dir={tmp_path / 'cache'}",
                                             "run.name=g", "train.steps=6", "eval.num_examples=0",
                                             "algo.ammd.critic_warmup_steps=2"])
    rows = [json.loads(x) for x in (run(cfg, log=lambda *a: None) / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(golden)
    for want, got in zip(golden, rows):
        assert {k: got[k] for k in want} == want  # exact: every loss, distance and collapse detector
