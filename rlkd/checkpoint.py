"""Resumable checkpoints: `<run>/checkpoints/step_NNNNNN/`, written atomically.

A checkpoint is assembled in a hidden `.tmp-step_NNNNNN` directory and renamed into place only
when complete (a rename is atomic on one file system); the `latest` pointer is replaced atomically
after that. A crash while writing leaves at worst a stale temporary directory, and the previous
checkpoint stays the one `latest` names. Contents:

    student/                 the student, Hugging Face format (safetensors, with its tokenizer)
    critic.safetensors       AMMD critic heads (when the method has them)
    teacher_adapter/         OKD: the teacher's LoRA adapter (PEFT format)
    deepspeed/<engine>/      DeepSpeed checkpoints: module, optimizer (and scheduler) states per engine
    rng/rank<i>.pt           each learner rank's torch RNG state (tensors only: weights_only loads)

Nothing in a checkpoint runs code when resumed: DeepSpeed's files are loaded with weights_only=True and
only the DeepSpeed types below allowed (learners/safe_checkpoint.py), and `damage` refuses, before Ray
starts, a checkpoint whose .pt files name any other object (a planted pickle).
    state.json               step, data position and sampler RNG, schedule state (replay buffers,
                             thresholds, RNGs), training wall clock, baseline scores
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from rlkd.outputs import COMPLETED, write_text_atomic

LATEST = "latest"
# The only non-torch objects DeepSpeed's checkpoints hold (ZeRO 0-3, found by loading each with
# weights_only=True): plain data that runs no code when rebuilt.
DEEPSPEED_GLOBALS = frozenset({"deepspeed.runtime.fp16.loss_scaler.LossScaler",
                               "deepspeed.runtime.zero.config.ZeroStageEnum",
                               "deepspeed.utils.tensor_fragment.fragment_address"})


def _dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: Path, step: int, learners, state: dict, keep: int = 2, finalize=None) -> Path:
    """Write checkpoint `step` (learners: anything with save_checkpoint(dir); finalize(dir) adds the rest,
    e.g. the tokenizer beside the HF student); keep the newest `keep`."""
    root = _dir(run_dir)
    final, tmp = root / f"step_{step:06d}", root / f".tmp-step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    learners.save_checkpoint(str(tmp))
    if finalize is not None:
        finalize(tmp)
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}))
    shutil.rmtree(final, ignore_errors=True)  # only if a resumed run passes this step again
    os.replace(tmp, final)
    write_text_atomic(root / LATEST, final.name)
    for old in sorted(root.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint: the one `latest` names, else the highest complete step_*."""
    root = _dir(run_dir)
    named = root / LATEST
    if named.is_file():
        path = root / named.read_text().strip()
        if (path / "state.json").is_file():
            return path
    complete = [p for p in sorted(root.glob("step_*")) if (p / "state.json").is_file()]
    return complete[-1] if complete else None


def load_state(path: Path) -> dict:
    return json.loads((Path(path) / "state.json").read_text())


def damage(path: Path) -> str | None:
    """Why checkpoint `path` cannot be resumed (naming the file), or None if it is intact."""
    state = Path(path) / "state.json"
    try:
        data = json.loads(state.read_text())
    except FileNotFoundError:
        return f"{state} is missing"
    except (ValueError, UnicodeDecodeError) as e:
        return f"{state} is not valid JSON ({e})"
    for key in ("step", "controller"):
        if key not in data:
            return f"{state} has no {key!r}"
    for part in ("deepspeed", "rng"):
        if not (Path(path) / part).is_dir():
            return f"{Path(path) / part} is missing"
    for pt in sorted(Path(path).glob("deepspeed/**/*.pt")) + sorted(Path(path).glob("rng/*.pt")):
        why = _unsafe(pt)
        if why:
            return why
    return None


def _unsafe(pt: Path) -> str | None:
    """Why torch file `pt` is not one rlkd or DeepSpeed wrote (read from its pickle's names, no tensors
    loaded), or None."""
    import zipfile

    from torch.serialization import get_unsafe_globals_in_checkpoint

    if not zipfile.is_zipfile(pt):
        return f"{pt} is not a torch checkpoint archive (truncated, or not written by rlkd)"
    try:
        names = set(get_unsafe_globals_in_checkpoint(str(pt))) - DEEPSPEED_GLOBALS
    except Exception as e:  # noqa: BLE001 - a damaged archive: say which file
        return f"{pt} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if names:
        return (f"{pt} names objects a checkpoint never holds ({', '.join(sorted(names))}); refusing it, since "
                "loading it could run code")
    return None


def resumable(run_dir: Path, log=print) -> Path:
    """The checkpoint `--resume run_dir` continues from: the newest intact one (a damaged newer one is
    reported and skipped); a one-line ConfigError if there is none."""
    from rlkd.config import ConfigError

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume {str(run_dir)!r}: not a run directory (no config.yaml); give the directory "
                          "that `python -m rlkd.main` printed after 'run:'")
    if (run_dir / COMPLETED).exists():
        raise ConfigError(f"--resume {str(run_dir)!r}: that run already completed ({COMPLETED} is present)")
    candidates = sorted(_dir(run_dir).glob("step_*"), reverse=True)
    if not candidates:
        raise ConfigError(f"--resume {str(run_dir)!r}: no complete checkpoint under {run_dir / 'checkpoints'} "
                          "(train.checkpoint_every=0, or the run stopped before its first checkpoint): nothing to "
                          "resume; remove the directory and start the run again")
    problems = []
    for path in candidates:
        why = damage(path)
        if why is None:
            if problems:
                log(f"rlkd: warning: {problems[0]}; resuming from the older intact checkpoint {path.name}")
            return path
        problems.append(why)
    raise ConfigError(f"--resume {str(run_dir)!r}: no intact checkpoint ({'; '.join(problems)})")
