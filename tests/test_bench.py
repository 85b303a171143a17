"""Benchmarks under bench/: the throughput bench's bare-loop reference runs the same objectives on real tiny
models, and the quality bench's --smoke mode runs end to end."""
import math
import sys
from pathlib import Path

import pytest

from rlkd.algorithms import build_method
from rlkd.config import load_config
from rlkd.data import PromptSampler
from rlkd.models import load_model

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))


def test_bare_loop_ammd_and_gkd_steps(tiny_models, tiny_data):
    from bare_loop import BareLoop

    tok, data = tiny_data
    for method_name in ("ammd", "gkd"):
        algo = load_config(None, [f"algo.method={method_name}", "algo.gkd.lmbda=1.0"]).algo
        loop = BareLoop(build_method(algo), load_model(tiny_models[1]), load_model(tiny_models[0]), tok.pad_token_id,
                        tok.eos_token_id, len(tok), 1e-3, 1e-3, 6, 1.0, 0)
        before = {k: v.clone() for k, v in loop.student.state_dict().items()}
        m = loop.step(1, PromptSampler(data, 0).next(4))
        assert m["tokens/generated"] > 0 and math.isfinite(m["throughput/tokens_per_s"])
        expected = {"rollout", "score", "policy", "sync"}
        if method_name == "ammd":
            expected |= {"critic", "teacher_gen"}
        assert {k.split("/")[1] for k in m if k.startswith("timing/") and k != "timing/step"} == expected
        assert any(not (before[k] == v).all() for k, v in loop.student.state_dict().items())
        gen = loop.generator.state_dict()
        assert all((gen[k] == v).all() for k, v in loop.student.state_dict().items())  # weights copied


def test_quality_benchmark_smoke(capsys):
    """`bench/quality.py --smoke` on the skills suite: a Tune learning-rate grid, then both student sizes at
    the chosen rate, floors first, samples shown; nothing read from outside the repository."""
    import glob
    import json as _json

    from quality import main as quality_main

    assert quality_main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "budget 3 student optimizer steps" in out and "chosen on validation exact match" in out
    for floor in ("*floor: constant answer*", "*teacher*", "*student before*"):
        assert floor in out
    latest = max(glob.glob("/tmp/rlkd-quality-*/quality.json"), key=lambda p: Path(p).stat().st_mtime)
    results = _json.loads(Path(latest).read_text())
    runs = results["runs"]
    assert {(r["student"], r["method"]) for r in runs} == {("S", "gkd"), ("XS", "gkd")}
    assert all(r["lr"] in (1e-3, 3e-3) and r["generated_tokens"] > 0 for r in runs)
    for r in runs:
        s = r["scores"]
        assert 0 <= s["exact_match_mean"] <= 100 and len(s["per_seed"]) == 3 and len(s["samples"]) == 3
        assert math.isfinite(r["gold_ce"]) and 0 <= r["top1_agreement"] <= 1 and math.isfinite(r["exacc_err_16"])
    teacher, const = (next(f for f in results["floors"] if f["method"] == m)
                      for m in ("teacher", "floor: constant answer"))
    assert teacher["scores"]["exact_match_mean"] > const["scores"]["exact_match_mean"] + 5
    assert Path(latest).with_suffix(".png").stat().st_size > 10_000


def test_distill_benchmark_smoke(capsys):
    """`bench/distill.py --smoke`: floors, SFT and OPD on the pruned student in the label-scarce regime, the
    paired comparison with SFT, greedy answers and the curves' PNG."""
    import glob
    import json as _json

    from distill import main as distill_main

    assert distill_main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "| sft (1 seeds) | 512 labelled rows |" in out and "| opd (1 seeds) | all train prompts |" in out
    assert "floor: constant answer" in out and "Smallest detectable difference" in out and "- **opd**:" in out
    latest = max(glob.glob("/tmp/rlkd-distill-*/distill.json"), key=lambda p: Path(p).stat().st_mtime)
    runs = _json.loads(Path(latest).read_text())["runs"]
    assert {r["method"] for r in runs} == {"sft", "opd"}
    for r in runs:
        assert r["curve"] and len(r["scores"]["greedy"]["correct"]) == 16
        assert 0 <= r["top1_agreement"] <= 100 and math.isfinite(r["gold_ce"])
    assert Path(latest).with_suffix(".png").stat().st_size > 10_000
    _lr_grid_chooses_on_validation(_json.loads(Path(latest).read_text()), Path(latest).parent, capsys)


def _lr_grid_chooses_on_validation(result: dict, tmp: Path, capsys):
    """bench/lr_grid.py on the smoke result as three learning rates: SFT's rate is the one whose validation
    curve ends higher (even where its test score is lower); OPD's ties go to the default, and OPD (prompts
    only) run in another regime counts in both."""
    import copy
    import json as _json

    from lr_grid import main as grid_main

    files = [tmp / "default.json", tmp / "high.json", tmp / "low.json"]
    variants = [result, copy.deepcopy(result), copy.deepcopy(result)]
    for v, lr, shift in ((variants[1], "3e-3", 10), (variants[2], "3e-4", -10)):
        v["set"] = [f"learner.student_lr={lr}"]
        for r in v["runs"]:
            if r["method"] == "sft":
                r["curve"] = [(s, t, y + shift) for s, t, y in r["curve"]]
                r["scores"]["greedy"]["exact_match"] -= shift / 2
            else:
                r["regime"] = "full" if lr == "3e-4" else r["regime"]
    for f, res in zip(files, variants):
        f.write_text(_json.dumps(res))
    assert grid_main([*map(str, files), "--out", str(tmp / "tuned")]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[1]: line for line in out.splitlines() if line.startswith("| scarce |")}
    assert rows["sft"].endswith("| 0.003 | 1 |") and rows["opd"].endswith("| 0.001 | 1 |")
    assert "| full | opd |" in out and "| full | sft |" not in out
    assert "| sft (lr 0.003) (1 seeds) | 512 labelled rows |" in out and "| opd (lr 0.001) (1 seeds) |" in out
    variants[1]["set"].append("algo.opd.discount=0.5")
    files[1].write_text(_json.dumps(variants[1]))
    with pytest.raises(SystemExit, match="also set"):
        grid_main([*map(str, files), "--out", str(tmp / "tuned")])


def test_teacher_service_bench_scores_and_counts_bytes():
    """bench/teacher_service.py's scoring case, in this process on the skills teacher (HF engine)."""
    from teacher_service import score_case

    full, token = score_case("tiny", "hf", 1, "full", 1), score_case("tiny", "hf", 1, "token", 1)
    assert full["bytes_per_position"] == 4 * 1265 + 4 and token["bytes_per_position"] == 4
    assert full["tokens_per_s"] > 0 and token["tokens_per_s"] > 0


def test_distill_reuse_refuses_runs_of_another_student_or_setting(tmp_path):
    """--reuse merges saved runs only when they ran the same budget, student and --set."""
    import json as _json

    from distill import reuse

    saved = tmp_path / "saved.json"
    saved.write_text(_json.dumps({"budget": 400, "student": "plateau", "set": [], "floors": {}, "runs": []}))
    with pytest.raises(SystemExit, match="student plateau, not pruned"):
        reuse({"runs": []}, [saved], 400, "pruned", [], print)
    with pytest.raises(SystemExit, match=r"--set \[\], not \['learner.student_lr=1e-4'\]"):
        reuse({"runs": []}, [saved], 400, "plateau", ["learner.student_lr=1e-4"], print)
    done = {"runs": []}
    reuse(done, [saved], 400, "plateau", [], print)
    assert done["floors"] == {}


def test_distill_methods_keep_a_variants_settings_together():
    from distill import parse_methods

    assert parse_methods("sft,okd:teacher_lr=0,trust_kl=1,gkd") == ["sft", "okd:teacher_lr=0,trust_kl=1", "gkd"]


def test_distill_compare_pairs_two_methods_on_the_same_prompts():
    """--compare A/B: A − B paired over the test prompts, only where both ran."""
    from distill import pairs

    runs = [{"method": m, "scores": {"greedy": {"correct": c}}}
            for m, c in (("a", [1, 1, 0, 1]), ("a", [1, 0, 0, 1]), ("b", [0, 1, 0, 1]), ("b", [0, 1, 0, 1]))]
    text = pairs(runs, ("a/b", "a/missing"))
    assert "- a − b: +12.5 [" in text and "missing" not in text
    assert pairs(runs, ("a/missing",)) == ""
