"""Dashboards and progress: a running node's Prometheus endpoint serves rlkd's gauges; the shipped
Grafana dashboard queries them; progress is a bar in a terminal and periodic lines elsewhere."""
import json
import time
import urllib.request
from pathlib import Path

from rlkd.config import load_config
from rlkd.launch import run
from rlkd.telemetry import Progress, gauge_name

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = ["ray_rlkd_throughput_tokens_per_s", "ray_rlkd_timing_policy", "ray_rlkd_timing_rollout",
            "ray_rlkd_timing_critic", "ray_rlkd_loss_critic", "ray_rlkd_ammd_d_on", "ray_rlkd_step"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_endpoint_serves_rlkd_gauges(tmp_path):
    import ray

    port = _free_port()
    from rlkd.cluster import init_on_loopback

    init_on_loopback(4, _metrics_export_port=port, log_to_driver=False)
    try:
        cfg = load_config("configs/smoke.yaml", [f"run.output_dir={tmp_path}", "run.name=scrape", "train.steps=4",
                                                 "algo.ammd.critic_warmup_steps=1", "eval.num_examples=0",
                                                 f"model.cache_dir={tmp_path / 'cache'}"])
        run(cfg)
        deadline, text = time.time() + 90, ""
        while time.time() < deadline:  # Ray pushes application metrics to the node agent every few seconds
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            final = any(x.startswith("ray_rlkd_step{") and x.rstrip().endswith(" 4.0") for x in text.splitlines())
            if final and all(name in text for name in EXPECTED):  # the last step's values have arrived
                break
            time.sleep(3)
    finally:
        ray.shutdown()
    missing = [n for n in EXPECTED if n not in text]
    assert not missing, f"not scraped: {missing}; rlkd lines: {[x for x in text.splitlines() if 'rlkd' in x][:10]}"
    step_lines = [x for x in text.splitlines() if x.startswith("ray_rlkd_step{")]
    assert any('run="scrape"' in x and x.rstrip().endswith(" 4.0") for x in step_lines), step_lines


def test_grafana_dashboard_queries_exported_names():
    dash = json.loads((ROOT / "docs" / "grafana_rlkd.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(dash["panels"]) >= 6 and all("ray_rlkd_" in e for e in exprs)
    assert gauge_name("loss/policy") == "rlkd_loss_policy" and gauge_name("timing/step") == "rlkd_timing_step"


def _metrics(step):
    return {"step": step, "loss/policy": 0.5 / step, "throughput/tokens_per_s": 1000.0}


def test_progress_prints_every_n_steps_outside_a_terminal():
    lines = []
    p = Progress(total=6, start=1, every=2, log=lines.append, interactive=False)
    for s in range(1, 7):
        p.update(_metrics(s))
    p.close()
    assert [x.split()[1] for x in lines] == ["2/6", "4/6", "6/6"]
    assert "policy=0.2500" in lines[0] and "tok/s=1000" in lines[0] and "eta=" in lines[0]


def test_progress_bar_in_a_terminal(capsys):
    p = Progress(total=3, start=1, every=1, log=print, interactive=True)
    for s in range(1, 4):
        p.update(_metrics(s))
    p.close()
    err = capsys.readouterr().err
    assert "3/3" in err and "tok/s=1000" in err and "policy=" in err


def test_invariant_watch_warns_once_per_streak_and_names_the_fields():
    from rlkd.invariants import InvariantWatch

    lines = []
    watch = InvariantWatch(lines.append, patience=3)
    good = {"ammd/d_on": 0.3, "ammd/critic_saturated_on": 0.1, "collapse/student_context_tv_on": 0.4,
            "collapse/teacher_context_tv_on": 0.5}
    bad = {**good, "ammd/d_on": -0.2, "collapse/student_context_tv_on": 0.01}
    assert watch.update(1, good) == {"invariant/critic_keeps_up": 1.0, "invariant/critic_unsaturated": 1.0,
                                     "invariant/student_keeps_context": 1.0}
    for step in range(2, 8):
        out = watch.update(step, bad)
    assert out["invariant/critic_keeps_up"] == 0.0 and out["invariant/student_keeps_context"] == 0.0
    assert len(lines) == 2 and all("step 4" in x for x in lines)  # once, after 3 broken steps in a row
    assert "learner.critic_lr" in lines[0] and "algo.ammd.critic_input" in lines[1]
    watch.update(8, good)
    watch.update(9, bad), watch.update(10, bad), watch.update(11, bad)
    assert len(lines) == 4  # a new streak warns again
    assert watch.update(12, {"loss/sft": 1.0}) == {}  # methods without a critic: nothing to check


def test_a_non_ascii_run_name_is_exported(ray_cluster):
    """Ray's metrics export failed on a non-ASCII tag value after step 1 (issue 24): the tag is made ASCII."""
    from rlkd.telemetry import PrometheusMetrics

    metrics = PrometheusMetrics("模型-ü")
    metrics.update({"step": 1.0, "loss/x": 0.5})
    assert metrics.run_name.isascii() and metrics.run_name == "\\u6a21\\u578b-\\xfc"
