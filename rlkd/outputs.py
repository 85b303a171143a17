"""The run directory: resolved config, metrics.jsonl, TensorBoard events, models, eval, marker.

The completion marker `COMPLETED` is written last; a directory without it is not a finished run.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

COMPLETED = "COMPLETED"
LOCK = ".lock"  # held (flock) by the process working on the run


class RunLock:
    """An OS file lock on a run directory, held while one process works on the run, so a live run is never
    written by two processes. The kernel drops it when the process ends, however it ends: a run killed with
    SIGKILL can be resumed at once."""

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def take(cls, run_dir: Path, what: str) -> "RunLock":
        """Lock `run_dir`, or a ConfigError naming the process that holds it (`what`: the option at fault)."""
        import fcntl

        from rlkd.checks import ConfigError

        path = Path(run_dir) / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"{what} {str(run_dir)!r}: that run is still going (process {holder} holds {path}); "
                              "wait for it to end or stop it, then resume it") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return cls(fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


def check_writable_dir(path: str, name: str) -> Path:
    """An output directory that is not a file and that we can create or write into (its nearest existing
    ancestor is writable); a ConfigError naming `name` otherwise."""
    from rlkd.checks import ConfigError

    root = Path(path).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{name}={path!r} is invalid: it is a file, not a directory")
    existing = next(p for p in [root, *root.parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{name}={path!r} is invalid: {existing} is not writable")
    return root


def run_dir_for(output_dir: str, name: str, method: str) -> Path:
    """Where a new run goes; a ConfigError if it cannot: the output directory is a file or not writable,
    or the named run directory exists already (a finished, running or interrupted run: each directory
    belongs to one run). A generated name (no run.name) never collides: runs started in the same second
    get -2, -3, ..."""
    from rlkd.checks import ConfigError

    root = check_writable_dir(output_dir, "config field run.output_dir")
    if not name:
        stamp = f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, i = root / stamp, 1
        while path.exists():
            i += 1
            path = root / f"{stamp}-{i}"
        return path
    path = root / name
    if path.exists():
        if not any((path / "checkpoints").glob("step_*")) and not (path / COMPLETED).exists():
            raise ConfigError(f"run.name={name!r}: {path} already exists, from a run that stopped before its first "
                              f"checkpoint (nothing to resume); remove that directory to reuse the name, or "
                              "choose another run.name")
        raise ConfigError(f"run.name={name!r}: {path} already exists; continue that run with "
                          f"`python -m rlkd.main --resume {path}`, or choose another run.name")
    return path


def make_run_dir(output_dir: str, name: str, method: str) -> Path:
    """Create the run's directory; it must not exist (two runs never share one, even when started together)."""
    from rlkd.checks import ConfigError

    for _ in range(100):  # a generated name taken between the check and the mkdir: take the next one
        path = run_dir_for(output_dir, name, method)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            if name:
                break
    raise ConfigError(f"run.name={path.name!r}: {path} was just created by another run; choose another "
                      "run.name")


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


def run_summary(cfg, method, prep, scores: dict, history: list[dict], wall: float) -> dict:
    """eval.json: the evaluations, the first and last step's losses and detectors, steps and wall time."""
    warmup = method.critic_warmup_steps if method.critic_objective is not None else 0
    first, last = history[warmup], history[-1]  # warm-up steps train only the critic
    keys = [k for k in last if k.startswith(("loss/", "ammd/", "okd/", "val/", "collapse/"))]
    means = {key: {name: s[f"{key}_mean"] if s else None for name, s in scores.items()}
             for key in ("rougeL", "exact_match")}
    return {"method": method.label, "metric": "rougeL F x100 (rouge_score, stemmed, max over refs); exact match x100",
            "num_examples": min(cfg.eval.num_examples, len(prep.test)), "seeds": cfg.eval.num_seeds, **means,
            "final_split": "val" if prep.test is prep.val else "test",
            "scores": scores, "first": {k: first.get(k) for k in keys}, "last": {k: last.get(k) for k in keys},
            "steps": len(history), "wall_seconds": wall}


def format_table(summary: dict, run_dir: Path) -> str:
    """Teacher / student before / student after: exact match and ROUGE-L sampled at T = 1 (mean ± std over
    seeds) and decoded greedily, TOP-1 agreement and gold CE, and each model's answer to the same three held-out
    prompts."""
    n, k = summary["num_examples"], summary["seeds"]
    rows = [f"{'model':<16} {'exact match':>14} {'ROUGE-L':>14} {'greedy EM':>10} {'greedy R-L':>10} {'TOP-1':>6} "
            f"{'gold CE':>7}   ({n} held-out prompts; sampled at T = 1: mean ± std over {k} seeds; TOP-1 agreement "
            "with the teacher, %, and cross-entropy of the gold answers, teacher-forced)"]
    nan = float("nan")
    for name, s in summary["scores"].items():
        if s:
            g, f = s.get("greedy") or {}, s.get("forced") or {}
            rows.append(f"{name:<16} {s['exact_match_mean']:>7.1f} ± {s['exact_match_std']:<4.1f} "
                        f"{s['rougeL_mean']:>7.1f} ± {s['rougeL_std']:<4.1f} {g.get('exact_match', nan):>10.1f} "
                        f"{g.get('rougeL', nan):>10.1f} {f.get('top1_agreement', nan):>6.1f} {f.get('gold_ce', nan):>7.2f}")
    named = [(name, s["samples"]) for name, s in summary["scores"].items() if s]
    for i in range(len(named[0][1]) if named else 0):
        rows.append(f"example {i + 1}:")
        rows += [f"  {name:<15} {samples[i]!r}" for name, samples in named]
    return "\n".join(rows + [f"wall time: {summary['wall_seconds']:.0f}s", f"output: {run_dir}"])
