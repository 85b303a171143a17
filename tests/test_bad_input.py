"""Bad input, table-driven: every case ends in one line `rlkd: error: ...` with its key words, exit code 2,
and no run directory that looks complete. All of them fail before Ray starts, so the file runs in seconds."""
import json
import shutil

import pytest

from rlkd.eval import main as eval_main
from rlkd.main import main
from rlkd.outputs import COMPLETED


@pytest.fixture()
def files(tmp_path, tiny_models):
    """Broken files and model directories, built once per test in tmp_path."""
    (tmp_path / "bad.yaml").write_text("train:\n  steps: [1\n")
    (tmp_path / "latin1.yaml").write_bytes(b"run:\n  name: caf\xe9\n")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n')
    (tmp_path / "array.jsonl").write_text('[{"instruction": "a", "output": "b"}]')
    (tmp_path / "allbad.jsonl").write_text('{"instruction": "a"}\nnot json\n')
    (tmp_path / "a_file").write_text("x")
    teacher, student = tiny_models
    for name, drop in (("no_weights", "model.safetensors"), ("no_tokenizer", "tokenizer.json")):
        shutil.copytree(student, tmp_path / name)
        (tmp_path / name / drop).unlink()
        if name == "no_tokenizer":
            (tmp_path / name / "tokenizer_config.json").unlink()
    shutil.copytree(student, tmp_path / "custom_code")
    cfg = json.loads((tmp_path / "custom_code" / "config.json").read_text())
    (tmp_path / "custom_code" / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "x.Y"}}))
    (tmp_path / "runs" / "taken").mkdir(parents=True)  # stopped before its first checkpoint
    (tmp_path / "runs" / "resumable" / "checkpoints" / "step_000002").mkdir(parents=True)
    return tmp_path


def _models(t, s):
    return [f"model.teacher={t}", f"model.student={s}"]


# (argv built from the files fixture and tiny_models, key words of the one line)
CASES = {
    "yaml syntax in the config file": (lambda f, m: ["--config", str(f / "bad.yaml")],
                                       ["bad.yaml", "invalid YAML", "at line"]),
    "yaml syntax in an override": (lambda f, m: ["train.steps=[1"], ["train.steps=[1", "not valid YAML"]),
    "config file not UTF-8": (lambda f, m: ["--config", str(f / "latin1.yaml")], ["latin1.yaml", "not UTF-8", "byte"]),
    "config file is a directory": (lambda f, m: ["--config", str(f)], ["is a directory"]),
    "data file not UTF-8": (lambda f, m: [f"data.train_file={f / 'latin1.jsonl'}"], ["latin1.jsonl", "not UTF-8",
                                                                                       "byte 20"]),
    "data file is a JSON array": (lambda f, m: [f"data.train_file={f / 'array.jsonl'}"], ["JSON array", "JSONL"]),
    "data path is a directory": (lambda f, m: [f"data.train_file={f}"], ["is a directory"]),
    "every row malformed": (lambda f, m: [f"data.train_file={f / 'allbad.jsonl'}"], ["no usable rows", "line 1:",
                                                                                      "line 2: invalid JSON"]),
    "head_dim 0 (range before arithmetic)": (lambda f, m: ["model.tiny.head_dim=0"],
                                             ["model.tiny.head_dim=0", ">= 32"]),
    "negative steps named as such": (lambda f, m: ["train.steps=-1"], ["train.steps=-1", "> 0"]),
    "output dir is a file": (lambda f, m: [f"run.output_dir={f / 'a_file'}"], ["run.output_dir", "is a file"]),
    "run directory exists": (lambda f, m: [f"run.output_dir={f / 'runs'}", "run.name=resumable"],
                             ["'resumable'", "already exists", "--resume"]),
    "run directory exists, no checkpoint": (lambda f, m: [f"run.output_dir={f / 'runs'}", "run.name=taken"],
                                            ["'taken'", "before its first checkpoint", "remove that directory"]),
    "model without weights": (lambda f, m: _models(m[0], f / "no_weights"), ["model.student", "no weights"]),
    "model without a tokenizer": (lambda f, m: _models(m[0], f / "no_tokenizer"), ["model.student",
                                                                                    "tokenizer does not load"]),
    "custom code without trust": (lambda f, m: _models(f / "custom_code", m[1]), ["model.teacher", "auto_map",
                                                                                  "trust_remote_code"]),
    "unknown method": (lambda f, m: ["algo.method=nope"], ["algo.method='nope'", "one of"]),
    "unknown field": (lambda f, m: ["train.stepz=3"], ["unknown config field", "train.stepz"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line(case, files, tiny_models, capsys):
    argv, words = CASES[case]
    code = main(["--config", "configs/smoke.yaml", *argv(files, tiny_models), f"model.cache_dir={files / 'cache'}",
                 "eval.num_examples=8"] if "--config" not in argv(files, tiny_models) else argv(files, tiny_models))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("rlkd: error: "), err
    assert all(w in err[0] for w in words), (err[0], words)
    assert not list(files.rglob(COMPLETED))


def test_eval_checks_out_before_it_evaluates(files, tiny_models, capsys):
    code = eval_main(["--model", str(tiny_models[1]), "--data", str(files / "allbad.jsonl"),
                      "--out", str(files / "a_file")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--out=" in err[0] and "is a file" in err[0]


def test_bom_is_accepted(tmp_path):
    from rlkd.data import read_examples

    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"instruction": "Say hi", "output": "hi"}\n')
    examples, report = read_examples(tmp_path / "bom.jsonl")
    assert len(examples) == 1 and not report.malformed


def _fake_run(root, steps_ok, steps_broken):
    """A run directory with checkpoints: intact ones, and ones whose state.json was cut short."""
    (root / "config.yaml").write_text("train:\n  steps: 10\n")
    for step in steps_ok + steps_broken:
        ckpt = root / "checkpoints" / f"step_{step:06d}"
        for part in ("deepspeed", "rng"):
            (ckpt / part).mkdir(parents=True)
        text = json.dumps({"step": step, "controller": {}})
        (ckpt / "state.json").write_text(text if step in steps_ok else text[:9])
    return root


def test_resume_skips_a_damaged_checkpoint(tmp_path):
    from rlkd.checkpoint import resumable

    said = []
    assert resumable(_fake_run(tmp_path, [2], [4]), log=said.append).name == "step_000002"
    assert len(said) == 1 and "step_000004/state.json is not valid JSON" in said[0] and "step_000002" in said[0]


def test_resume_with_no_intact_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["--resume", str(_fake_run(tmp_path, [], [2, 4]))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no intact checkpoint" in err[0] and "step_000004/state.json" in err[0]


def test_resume_refuses_overrides_that_change_the_computation(tmp_path, capsys):
    run_dir = _fake_run(tmp_path, [2], [])
    assert main(["--resume", str(run_dir), "algo.method=fkl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "algo.method=fkl" in err[0] and "train.steps" in err[0]
