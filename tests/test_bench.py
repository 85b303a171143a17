"""Benchmarks under bench/: the throughput bench's bare-loop reference runs the same objectives on real tiny
models, and the quality bench's --smoke mode runs end to end."""
import math
import sys
from pathlib import Path

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


def test_quality_benchmark_smoke(ray_cluster, capsys):
    """`bench/quality.py --smoke`: two methods x two student sizes end to end, table and plot written."""
    import json as _json

    from quality import main as quality_main

    assert quality_main(["--smoke"]) == 0
    out = capsys.readouterr().out
    md_line = next(line for line in out.splitlines() if line.startswith("`python bench/quality.py --smoke`"))
    assert "3 student optimizer steps" in md_line
    rows = [line for line in out.splitlines() if line.startswith(("| S |", "| XS |"))]
    assert len(rows) == 4  # {S, XS} x {sft, ammd}
    import glob

    latest = max(glob.glob("/tmp/rlkd-quality-*/quality.json"), key=lambda p: Path(p).stat().st_mtime)
    results = _json.loads(Path(latest).read_text())
    assert all(math.isfinite(r["exacc_err_16"]) and 0 <= r["top1_agreement"] <= 1 for r in results)
    assert Path(latest).with_suffix(".png").stat().st_size > 10_000
    ammd = [r for r in results if r["method"] == "ammd"]
    assert all(r["generated_tokens"] > 0 for r in ammd) and all(len(r["curve"]) >= 2 for r in ammd)
