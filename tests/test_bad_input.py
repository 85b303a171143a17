"""Bad input: a clear one-line error, exit code 2, and no run directory that looks complete."""
import pytest

from rlkd.main import main


@pytest.fixture
def out_dir(tmp_path):
    return tmp_path / "runs"


def _run(capsys, out_dir, *overrides):
    code = main(["--config", "configs/smoke.yaml", f"run.output_dir={out_dir}", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _assert_clean_failure(code, err, out_dir, needle):
    assert code == 2
    assert len(err) == 1 and err[0].startswith("rlkd: error: ") and needle in err[0], err
    assert not list(out_dir.rglob("COMPLETED"))


def test_missing_model_directory(capsys, out_dir, tiny_models, tmp_path):
    code, err = _run(capsys, out_dir, f"model.teacher={tiny_models[0]}", f"model.student={tmp_path / 'nope'}")
    _assert_clean_failure(code, err, out_dir, "model.student=")
    assert "directory not found" in err[0]


def test_mismatched_tokenizers(capsys, out_dir, tiny_models, other_tokenizer_model):
    code, err = _run(capsys, out_dir, f"model.teacher={tiny_models[0]}", f"model.student={other_tokenizer_model}")
    _assert_clean_failure(code, err, out_dir, "use different tokenizers")


def test_unknown_method(capsys, out_dir):
    code, err = _run(capsys, out_dir, "algo.method=distill-magic")
    _assert_clean_failure(code, err, out_dir, "algo.method='distill-magic' is invalid: one of ['ammd'")


def test_bad_config_field(capsys, out_dir):
    code, err = _run(capsys, out_dir, "learner.zero_stag=2")
    _assert_clean_failure(code, err, out_dir, "unknown config field 'learner.zero_stag'")


def test_empty_dataset(capsys, out_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, err = _run(capsys, out_dir, f"data.train_file={empty}")
    _assert_clean_failure(code, err, out_dir, "has no usable rows")


def test_okd_lora_targets_the_teacher_lacks(capsys, out_dir, tiny_models):
    code, err = _run(capsys, out_dir, f"model.teacher={tiny_models[0]}", f"model.student={tiny_models[1]}",
                     "algo.method=okd", "algo.okd.lora_targets=c_attn")
    _assert_clean_failure(code, err, out_dir, "algo.okd.lora_targets='c_attn' is invalid")
    assert "q_proj" in err[0]  # names what is allowed


def test_teacher_mixed_sampling_needs_hf_backend(capsys, out_dir):
    code, err = _run(capsys, out_dir, "algo.method=minillm", "rollout.backend=vllm")
    _assert_clean_failure(code, err, out_dir, "algo.minillm.teacher_mix_alpha=0.2 is invalid")
