"""Data and models, checked before any actor starts: a bad config or file fails here, with a clear
error, before Ray does any work."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rlkd.config import Config, ConfigError
from rlkd.data import TokenizedExample, tokenize
from rlkd.models import (
    check_lora_targets,
    check_model_dir,
    check_same_tokenizer,
    embedded_models,
    load_tokenizer,
)


@dataclass
class Prepared:
    teacher_dir: Path
    student_dir: Path
    tokenizer: object
    vocab_size: int
    train: list[TokenizedExample]
    val: list[TokenizedExample]
    data_report: str
    embedded: bool
    test: list[TokenizedExample]  # the final evaluation set (the skills test split; else = val)
    teachers: dict = field(default_factory=dict)  # model.teachers: name -> checked directory (a teacher per row)


def prepare(cfg: Config, log: Callable = print) -> Prepared:
    """Data and models, checked before any actor starts. Raises ConfigError / DataError."""
    from rlkd.builtin import load_data, skills_models
    from rlkd.pretrain import sft_train

    data = load_data(cfg, log)
    d = cfg.data
    if cfg.model.teacher is None and d.train_file is None and d.builtin == "skills":
        teacher_dir, student_dir = skills_models(cfg, data.train, log)
    elif cfg.model.teacher is None:
        t = cfg.model.tiny
        tokenized: dict = {}  # the tokenizer is built inside embedded_models; tokenize once for both models

        def sft(model, tok, steps):
            if "train" not in tokenized:
                tokenized["train"] = tokenize(data.train, tok, d.max_prompt_tokens, d.max_response_tokens)
            return sft_train(model, tokenized["train"], tok.pad_token_id, len(tok), steps, t.sft_batch_size,
                             t.sft_lr, cfg.train.seed, log)

        teacher_dir, student_dir = embedded_models(
            cfg, data.source, lambda: [e.prompt + e.references[0] for e in data.train], sft, log)
    else:
        trust = cfg.model.trust_remote_code
        teacher_dir = check_model_dir(cfg.model.teacher, "config field model.teacher", trust, log)
        student_dir = (None if cfg.model.prune_layers else
                       check_model_dir(cfg.model.student, "config field model.student", trust, log))
    if cfg.model.prune_layers:  # the student is cut from the teacher, on labelled rows only
        from rlkd.prune import cached_pruned_student

        labelled = data.train[:d.labelled_rows] if d.labelled_rows else data.train
        student_dir = cached_pruned_student(cfg, teacher_dir, labelled, log)
    vocab = check_same_tokenizer(teacher_dir, student_dir, cfg.model.trust_remote_code)
    check_positions(cfg, teacher_dir, student_dir)
    if cfg.algo.method == "okd":
        check_lora_targets(teacher_dir, cfg.algo.okd.lora_targets, cfg.model.trust_remote_code)
    tok = load_tokenizer(student_dir, cfg.model.trust_remote_code)
    train_tok, val_tok = (tokenize(x, tok, d.max_prompt_tokens, d.max_response_tokens) for x in (data.train, data.val))
    test_tok = (val_tok if data.test is data.val
                else tokenize(data.test, tok, d.max_prompt_tokens, d.max_response_tokens))
    cut = sum(r.truncated for r in train_tok + val_tok)
    if cut:
        log(f"data: {cut} prompts longer than data.max_prompt_tokens={d.max_prompt_tokens} were cut in the middle")
    return Prepared(teacher_dir, student_dir, tok, vocab, train_tok, val_tok, data.summary, cfg.model.teacher is None,
                    test_tok, row_teachers(cfg, student_dir, data.train + data.val + data.test, log))


def row_teachers(cfg: Config, student_dir: Path, rows, log: Callable) -> dict:
    """model.teachers, checked: each a model directory with the student's tokenizer, and every `teacher` a data
    row names one of them."""
    named = {e.teacher for e in rows if e.teacher}
    unknown = sorted(named - set(cfg.model.teachers))
    if unknown:
        raise ConfigError(f"config field model.teachers={dict(cfg.model.teachers)} is invalid: data rows name teacher(s) "
                          f"{unknown}; define each as model.teachers.<name>=DIR")
    out = {}
    for name, path in cfg.model.teachers.items():
        out[name] = check_model_dir(path, f"config field model.teachers.{name}", cfg.model.trust_remote_code, log)
        check_same_tokenizer(out[name], student_dir, cfg.model.trust_remote_code)
    if out:
        log(f"teachers: {len(out)} named ({', '.join(out)}), rows per teacher: "
            f"{ {n: sum(e.teacher == n for e in rows) for n in out} }, the rest model.teacher")
    return out


def check_positions(cfg: Config, teacher_dir: Path, student_dir: Path) -> None:
    """Prompt + response must fit every model's positions (else RoPE runs past what was trained)."""
    from transformers import AutoConfig

    need = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
    for name, path in (("teacher", teacher_dir), ("student", student_dir)):
        have = getattr(AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code),
                       "max_position_embeddings", need)
        if need > have:
            raise ConfigError(f"config field data.max_prompt_tokens={cfg.data.max_prompt_tokens} is invalid: with "
                              f"data.max_response_tokens={cfg.data.max_response_tokens} it needs {need} positions and "
                              f"the {name} has {have}; lower either so they sum to <= {have}")
