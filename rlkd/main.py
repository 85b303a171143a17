"""`python -m rlkd.main [--config FILE] [section.field=value ...]`: run one distillation job.

Without arguments it runs the embedded default: tiny tokenizer and models built locally, AMMD on
the shipped Dolly subset, on a local Ray cluster. Under `ray job submit` it joins that cluster.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from rlkd.config import Config, ConfigError, field_docs, load_config


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlkd.main", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.steps=10")
    parser.add_argument("--help-config", action="store_true", help="list every config field and exit")
    args = parser.parse_args(argv)
    if args.help_config:
        print("\n".join(_config_help()))
        return 0
    from rlkd.data import DataError
    try:
        cfg = load_config(args.config, args.overrides)
        from rlkd.launch import run
        run(cfg)
    except (ConfigError, DataError, FileExistsError) as e:
        print(f"rlkd: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
