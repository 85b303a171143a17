"""`python -m rlkd.main [--config FILE | --resume RUN_DIR] [section.field=value ...]`: run one distillation job.

Without --config it runs the default job (rlkd/assets/default_job.yaml, the same as configs/default.yaml): the
shipped skills teacher distilled with GKD into a 2-layer student cut from it, with 512 labelled rows and 4000
prompts, on a local Ray cluster. Under `ray job submit` it joins that cluster.
A config with a `tune:` section runs a Ray Tune sweep instead (rlkd.tune); `--resume` continues a
run from its last checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from rlkd.config import Config, ConfigError, field_docs, load_config, read_yaml

DEFAULT_JOB = Path(__file__).parent / "assets" / "default_job.yaml"


def _config_help(obj=None, prefix: str = "") -> list[str]:
    """Every field with its default and docstring, walking nested sections."""
    obj = Config() if obj is None else obj
    lines, docs = [], field_docs(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines += _config_help(value, prefix + f.name + ".")
        else:
            lines.append(f"  {prefix}{f.name} = {value!r}\n      {docs.get(f.name, '')}")
    return lines


# what a resumed run may change: how long it runs and how it reports, never what a step computes
RESUME_SAFE = ("train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "eval.",
               "run.num_cpus", "run.max_actor_restarts", "run.placement_timeout_s", "run.ray_address")


def check_resume_overrides(overrides: list[str]) -> None:
    for ov in overrides:
        key = ov.partition("=")[0].strip()
        if not any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in RESUME_SAFE):
            raise ConfigError(f"--resume with override {ov!r}: it would change what the resumed run computes; "
                              f"a resumed run may only change {', '.join(RESUME_SAFE)} (start a new run instead)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlkd.main", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last checkpoint "
                        "(its config.yaml is the config; overrides still apply)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.steps=10")
    parser.add_argument("--help-config", action="store_true", help="list every config field and exit")
    args = parser.parse_args(argv)
    if args.help_config:
        print("\n".join(_config_help()))
        return 0
    from rlkd.data import DataError
    from rlkd.loop import Stopped
    try:
        if args.resume and args.config:
            raise ConfigError("--resume and --config exclude each other: a resumed run keeps its own config.yaml")
        if args.config and not args.resume and "tune" in read_yaml(args.config):
            from rlkd.tune import sweep
            return 0 if sweep(args.config, args.overrides)[1] else 130  # 130: interrupted, as after Ctrl-C
        config = str(Path(args.resume) / "config.yaml") if args.resume else (args.config or str(DEFAULT_JOB))
        if args.resume:
            from rlkd.checkpoint import resumable
            resumable(Path(args.resume), log=lambda *a: None)  # a clear error before the config is even read
            check_resume_overrides(args.overrides)
        cfg = load_config(config, args.overrides)
        from rlkd.launch import run
        run(cfg, resume=Path(args.resume) if args.resume else None)
    except (ConfigError, DataError) as e:
        print(f"rlkd: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only directory: one line, not a traceback
        where = f": {e.filename}" if e.filename else ""
        print(f"rlkd: error: {e.strerror or e}{where} (a full disk, or a directory rlkd cannot write?); "
              "a run with a checkpoint continues with --resume RUN_DIR", file=sys.stderr)
        return 1
    except Stopped as e:
        print(f"rlkd: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # before training started: nothing to resume
        name = getattr(e, "signal_name", "SIGINT")
        print(f"rlkd: stopped by {name} before training started", file=sys.stderr)
        return 143 if name == "SIGTERM" else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
