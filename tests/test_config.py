"""Config loading and validation: every YAML under configs/ (recursively), and clear errors."""
from pathlib import Path

import pytest

from rlkd.config import Config, ConfigError, field_docs, load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


def test_configs_found():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_config_loads_and_validates(path):
    if path.parent.name == "sweeps":  # a tune: section: the base config and every search-space field are checked
        from rlkd.tune import load_sweep

        cfg = load_sweep(str(path))[2]
    else:
        cfg = load_config(str(path))
    assert isinstance(cfg, Config)


def test_every_field_has_a_docstring():
    import dataclasses

    def walk(cls):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name, "").strip(), f"{cls.__name__}.{f.name} has no docstring"
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default))

    walk(Config)
    from rlkd.tune import TuneConfig

    walk(TuneConfig)


def test_overrides_are_typed_and_frozen():
    cfg = load_config(None, ["train.steps=7", "algo.ammd.beta=1", "learner.zero_stage=3", "model.teacher=null",
                             "model.student=null"])
    assert cfg.train.steps == 7 and cfg.algo.ammd.beta == 1.0 and isinstance(cfg.algo.ammd.beta, float)
    with pytest.raises(Exception):
        cfg.train.steps = 3  # frozen


@pytest.mark.parametrize("overrides, needle", [
    (["algo.method=foo"], "algo.method='foo' is invalid: one of ["),
    (["algo.ammd.beta=1.5"], "algo.ammd.beta=1.5 is invalid: in [0, 1]"),
    (["learner.zero_stage=4"], "learner.zero_stage=4 is invalid: one of [0, 1, 2, 3]"),
    (["train.steps=zero"], "train.steps='zero' is invalid: expected int"),
    (["train.stepz=3"], "unknown config field 'train.stepz'"),
    (["rollout.backend=trt"], "rollout.backend='trt' is invalid: one of ['hf', 'vllm']"),
    (["train.batch_size=3", "learner.num_ranks=2"], "train.batch_size=3 is invalid: a multiple of learner.num_ranks=2"),
    (["model.teacher=/x"], "model.teacher='/x' is invalid: set both model.teacher and model.student"),
    (["model.tiny.head_dim=16"], "model.tiny.head_dim=16 is invalid: >= 32"),
    (["model.plateau_student=true", "data.builtin=dolly"], "model.plateau_student=True is invalid: only with the skills suite's own"),
    (["model.prune_head_ratio=0"], "model.prune_head_ratio=0.0 is invalid: in (0, 1]"),
    (["algo.ammd.critic_network=rnn"], "algo.ammd.critic_network='rnn' is invalid: one of ['linear', 'mlp', 'logratio']"),
    (["nosep"], "expected section.field=value"),
])
def test_validation_errors_name_field_value_and_allowed(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="file not found"):
        load_config("/nonexistent/x.yaml")


def test_the_default_job_is_configs_default_yaml():
    """`python -m rlkd.main` with no --config runs rlkd/assets/default_job.yaml; configs/default.yaml is the same."""
    from rlkd.config import load_config, to_dict
    from rlkd.main import DEFAULT_JOB

    assert DEFAULT_JOB.read_text() == (Path(__file__).resolve().parents[1] / "configs" / "default.yaml").read_text()
    cfg = load_config(str(DEFAULT_JOB))
    assert (cfg.algo.method, cfg.model.prune_layers, cfg.data.labelled_rows) == ("gkd", 2, 512)
    assert to_dict(cfg)["algo"]["gkd"]["seq_kd"] is True


def test_the_two_gpu_teacher_recipe_fills_one_8_gpu_node():
    cfg = load_config("configs/recipes/opd_qwen2.5-1.5b_from_32b_tp2.yaml")
    t, r, lc = cfg.teacher, cfg.rollout, cfg.learner
    assert (t.backend, t.tensor_parallel_size, t.num_gpus) == ("vllm", 2, 2)
    assert t.num_actors * t.num_gpus + r.num_actors * r.num_gpus + lc.num_ranks * lc.num_gpus == 8
    with pytest.raises(ConfigError, match="teacher.num_gpus=1.0 is invalid: 0 .CPU. or teacher.tensor_parallel_size=2"):
        load_config("configs/recipes/opd_qwen2.5-1.5b_from_32b_tp2.yaml", ["teacher.num_gpus=1"])
