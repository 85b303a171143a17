"""Bad input, as a careless or hostile user types it (issue 24's probes that run in seconds): each gives one
`rlkd: error:` line naming the field, the value and what is allowed, exit code 2, no traceback, and
nothing written. A later change cannot bring one of them back without failing here."""
import json
import shutil
from pathlib import Path

import pytest

from rlkd.tasks.teacher import SHIPPED_TEACHER as TEACHER

SMOKE = ["--config", "configs/smoke.yaml"]


def _model(root: Path, name: str, edit) -> Path:
    """A copy of the shipped skills teacher, damaged by `edit(dir)`."""
    d = root / name
    shutil.copytree(TEACHER, d)
    edit(d)
    return d


def _shrink_vocab(d: Path) -> None:  # the tokenizer then has more tokens than the embedding has rows
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": 1000}))


def _models(root, name, edit):
    return [f"model.teacher={TEACHER}", f"model.student={_model(root, name, edit)}"]


# (id, argv after the output fields, environment, the message's words, the program)
PROBES = [
    ("run.name parent", ["run.name=../x"], {}, "run.name='../x' is invalid: one directory name", "main"),
    ("run.name absolute", ["run.name=/abs/path"], {}, "run.name='/abs/path' is invalid", "main"),
    ("run.name non-ascii", ["run.name=模型-ü"], {}, "run.name='模型-ü' is invalid", "main"),
    ("lr inf", ["learner.student_lr=inf"], {}, "learner.student_lr=inf is invalid: a finite number > 0", "main"),
    ("lr nan", ["learner.student_lr=nan"], {}, "learner.student_lr=nan is invalid", "main"),
    ("unreachable RAY_ADDRESS", ["run.name=r"], {"RAY_ADDRESS": "127.0.0.1:1"},
     "RAY_ADDRESS='127.0.0.1:1': no Ray cluster answers there", "main"),
    ("empty safetensors", lambda root: _models(root, "empty", lambda d: (d / "model.safetensors").write_bytes(b"")),
     {}, "model.safetensors is not a readable safetensors file", "main"),
    ("cut safetensors", lambda root: _models(root, "cut", lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:100])), {}, "model.safetensors is not a readable safetensors file",
     "main"),
    ("tokenizer past embedding", lambda root: _models(root, "small", _shrink_vocab), {},
     "tokenizer has 1265 tokens but the model only 1000 embedding rows", "main"),
    ("eval max-new-tokens 0", ["--max-new-tokens", "0"], {}, "--max-new-tokens=0 is invalid: an integer >= 1", "eval"),
    ("eval max-new-tokens < 0", ["--max-new-tokens", "-3"], {}, "--max-new-tokens=-3 is invalid", "eval"),
    ("eval max-prompt-tokens 0", ["--max-prompt-tokens", "0"], {}, "--max-prompt-tokens=0 is invalid", "eval"),
    ("eval batch-size 0", ["--batch-size", "0"], {}, "--batch-size=0 is invalid", "eval"),
    ("eval max-examples < 0", ["--max-examples", "-1"], {}, "--max-examples=-1 is invalid: an integer >= 0", "eval"),
]


@pytest.mark.parametrize("probe", PROBES, ids=[p[0] for p in PROBES])
def test_probe_is_one_clear_line(probe, tmp_path, capsys, monkeypatch):
    _, args, env, words, program = probe
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = args(tmp_path) if callable(args) else args
    out = tmp_path / "out"
    if program == "main":
        from rlkd.main import main

        code = main([*SMOKE, f"run.output_dir={out}", f"model.cache_dir={tmp_path / 'cache'}", *args])
    else:
        from rlkd.eval import main

        code = main(["--model", str(TEACHER), "--data", "rlkd/assets/dolly_short.jsonl", "--out", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(("rlkd: error:", "rlkd.eval: error:")), err
    assert words in err[0], err[0]
    assert not out.exists()  # nothing written: no run directory, no eval output


def test_a_run_stopped_before_its_first_checkpoint_says_how_to_start_again(tmp_path, capsys):
    from rlkd.main import main

    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "config.yaml").write_text("{}")
    assert main([*SMOKE, f"run.output_dir={tmp_path}", "run.name=early"]) == 2
    reuse = capsys.readouterr().err
    assert "stopped before its first checkpoint" in reuse and "remove that directory" in reuse
    assert main(["--resume", str(tmp_path / "early")]) == 2
    resume = capsys.readouterr().err
    assert "nothing to resume; remove the directory and start the run again" in resume


def test_a_home_rlkd_cannot_write_is_one_line(tmp_path, capsys, monkeypatch):
    """A HOME that cannot hold the model cache (a read-only one; here a file, since root may write anywhere):
    one line naming the path, exit 1, no traceback."""
    from rlkd.main import main

    home = tmp_path / "home"
    home.write_text("not a directory")
    monkeypatch.setenv("HOME", str(home))
    code = main([*SMOKE, f"run.output_dir={tmp_path / 'out'}", "run.name=r"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("rlkd: error:"), err
    assert str(home) in err[0] and "rlkd cannot write" in err[0], err[0]
