"""The run directory: resolved config, metrics.jsonl, TensorBoard events, models, eval, marker.

The completion marker `COMPLETED` is written last; a directory without it is not a finished run.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

COMPLETED = "COMPLETED"


def make_run_dir(output_dir: str, name: str, method: str) -> Path:
    run_name = name or f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(output_dir).expanduser().resolve() / run_name
    if (path / COMPLETED).exists():
        raise FileExistsError(f"run.name={name!r}: {path} already holds a completed run; choose another name")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_yaml(path: Path, data: dict) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside the target, then rename over it: a killed process never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


class MetricsWriter:
    """One JSON line per step in metrics.jsonl, and the same scalars to TensorBoard."""

    def __init__(self, run_dir: Path, purge_step: int = 1):
        """purge_step > 1 (a resumed run): TensorBoard drops the events the checkpoint did not cover."""
        from torch.utils.tensorboard import SummaryWriter

        self.file = (run_dir / "metrics.jsonl").open("a", buffering=1)
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step if purge_step > 1 else None)

    def write(self, metrics: dict, step: int | None = None) -> None:
        step = int(metrics.get("step", 0) if step is None else step)
        self.file.write(json.dumps(metrics) + "\n")
        for k, v in metrics.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()


def mark_completed(run_dir: Path, summary: dict) -> None:
    write_json(run_dir / COMPLETED, summary)
