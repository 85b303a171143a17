"""What a running job shows: Prometheus gauges (Ray dashboard / Grafana) and a progress display.

Every numeric step metric becomes a `ray.util.metrics.Gauge` named `rlkd_<metric>` ('/' -> '_'),
tagged with the run name. Ray exports application metrics with its own `ray_` prefix, so
`loss/policy` is scraped as `ray_rlkd_loss_policy{run="..."}` from each node's metrics port
(the dashboard's Grafana reads the same series; see docs/grafana_rlkd.json).
"""
from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable

_HELP = {"timing": "seconds spent in this phase of the step", "loss": "training loss",
         "ammd": "AMMD moment-matching distance or critic statistic", "throughput": "tokens per second",
         "tokens": "tokens this step", "collapse": "collapse detector on the step's batch",
         "invariant": "1 while the training invariant holds, 0 when broken",
         "memory": "peak memory of a learner rank in GiB (CUDA allocations on GPU, resident set on CPU)"}


def gauge_name(key: str) -> str:
    return "rlkd_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


class PrometheusMetrics:
    """Sets one Ray gauge per numeric metric; gauges are created on first sight."""

    def __init__(self, run_name: str):
        # the tag goes into Ray's metrics export, which failed on a non-ASCII value (issue 24); run.name is
        # ASCII by validation, but a Tune trial's or a resumed old run's name need not be
        self.run_name = run_name.encode("ascii", "backslashreplace").decode()
        self.gauges: dict = {}

    def update(self, metrics: dict) -> None:
        from ray.util.metrics import Gauge

        for key, value in metrics.items():
            if not isinstance(value, (int, float)):
                continue
            if key not in self.gauges:
                help_text = _HELP.get(key.split("/")[0], "rlkd step metric")
                self.gauges[key] = Gauge(gauge_name(key), description=f"{key}: {help_text}", tag_keys=("run",))
                self.gauges[key].set_default_tags({"run": self.run_name})
            self.gauges[key].set(float(value))


class Progress:
    """A tqdm bar (step, loss, tokens/s, ETA) in a terminal; otherwise one line every `every` steps."""

    def __init__(self, total: int, start: int, every: int, log: Callable, interactive: bool | None = None):
        self.total, self.every, self.log = total, every, log
        self.t0, self.start = time.time(), start
        interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = None
        if interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start - 1, desc="rlkd", unit="step", dynamic_ncols=True)

    def update(self, m: dict) -> None:
        step = int(m["step"])
        losses = {k.split("/")[-1]: v for k, v in sorted(m.items()) if k.startswith(("loss/", "ammd/", "val/"))}
        tok_s = m.get("throughput/tokens_per_s", 0.0)
        if self.bar is not None:
            self.bar.set_postfix({**{k: f"{v:.4f}" for k, v in list(losses.items())[:3]}, "tok/s": f"{tok_s:.0f}"})
            self.bar.update(1)
        elif step % self.every == 0 or step == self.total:
            done = step - self.start + 1
            eta = (time.time() - self.t0) / done * (self.total - step)
            text = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
            self.log(f"step {step}/{self.total} {text} tok/s={tok_s:.0f} eta={eta:.0f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
