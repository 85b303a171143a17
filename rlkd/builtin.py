"""Built-in data and models, for runs that name no files (`data.train_file` / `model.teacher` null).

- data.builtin='skills' (the default): the skills suite (rlkd.tasks.skills, seed 0) with the teacher
  shipped in rlkd/assets/skills_teacher, and a student of model.tiny's shape, SFT'd briefly on the
  suite's train split (the 'student before', as in the papers) and cached under model.cache_dir; or
  (model.plateau_student) the shipped from-scratch student trained to its plateau, rlkd/assets/skills_student.
- data.builtin='dolly': the shipped Dolly subset, with a tokenizer and tiny models built and trained
  locally (rlkd.models.embedded_models): the seconds-scale path of the smoke configs.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlkd.config import Config, ConfigError
from rlkd.data import SHIPPED_DOLLY, Example, read_examples, split


@dataclass
class Data:
    train: list[Example]
    val: list[Example]
    test: list[Example]  # the final evaluation set (the val split for files without a test split)
    summary: str
    source: Path  # what the embedded models' cache key hashes


def load_data(cfg: Config, log: Callable = print) -> Data:
    d = cfg.data
    if d.train_file is None and d.builtin == "skills":
        from rlkd.tasks import skills
        from rlkd.tasks.teacher import SIZES, examples

        rows = skills.generate(0, {**SIZES, "train": d.skills_train_rows})
        text = (f"data: skills suite (rlkd.tasks.skills, seed 0): {len(rows['train'])} train, {len(rows['val'])} val, "
                f"{len(rows['test'])} test rows over {len(skills.FAMILIES)} families")
        log(text)
        return Data(*(examples(rows[s]) for s in skills.SPLITS), text, Path(skills.__file__))
    source = Path(d.train_file).expanduser() if d.train_file else SHIPPED_DOLLY
    ex, report = read_examples(source, d.max_rows)
    log(report.summary())
    train, val = split(ex, d.val_size, d.split_seed)
    return Data(train, val, val, report.summary(), source)


def _require_shipped(model_dir: Path, what: str, build_flags: str) -> None:
    """One line naming the command that rebuilds a shipped model directory that is missing."""
    if not (model_dir / "model.safetensors").is_file():
        raise ConfigError(f"{what} is missing from {model_dir}; rebuild it with "
                          f"`python -m rlkd.tasks.teacher --out {model_dir}{build_flags}`")


def skills_models(cfg: Config, train: list[Example], log: Callable = print) -> tuple[Path, Path | None]:
    """(the shipped skills teacher, the SFT'd tiny student built from its tokenizer, cached); no student when
    model.prune_layers cuts it from the teacher instead."""
    from rlkd.models import build_cached, load_tokenizer, tiny_llama
    from rlkd.tasks.teacher import MAX_PROMPT, MAX_RESPONSE, SHIPPED_STUDENT, SHIPPED_TEACHER

    _require_shipped(SHIPPED_TEACHER, "the skills teacher", "")
    if cfg.model.prune_layers:
        return SHIPPED_TEACHER, None
    if cfg.model.plateau_student:
        _require_shipped(SHIPPED_STUDENT, "model.plateau_student: the shipped student", " --hidden 128 --layers 2 "
                         "--head-dim 32 --steps 16000 --lr 3e-3 --eval-every 1000 --bf16 --threads 1")
        log(f"models: student: the shipped from-scratch skills student ({SHIPPED_STUDENT})")
        return SHIPPED_TEACHER, SHIPPED_STUDENT
    t, d = cfg.model.tiny, cfg.data
    key = hashlib.sha256(json.dumps({"tiny": t.__dict__, "rows": d.skills_train_rows, "seed": cfg.train.seed,
                                     "v": 1}, sort_keys=True).encode())
    key.update((SHIPPED_TEACHER / "model.safetensors").read_bytes())
    root = Path(cfg.model.cache_dir).expanduser() / f"skills-student-{key.hexdigest()[:12]}"

    def build(tmp: Path) -> None:
        from transformers import AutoConfig

        from rlkd.data import tokenize
        from rlkd.pretrain import sft_train

        tok = load_tokenizer(SHIPPED_TEACHER)
        positions = AutoConfig.from_pretrained(SHIPPED_TEACHER).max_position_embeddings
        model = tiny_llama(tok, t.student_hidden, t.student_layers, t.head_dim, positions, seed=cfg.train.seed + 7)
        n = sum(p.numel() for p in model.parameters())
        log(f"models: student: tiny Llama {t.student_layers}x{t.student_hidden}, {n / 1e6:.2f}M params, "
            f"SFT {t.student_sft_steps} steps on the suite")
        data = tokenize(train, tok, MAX_PROMPT, MAX_RESPONSE)
        fit = sft_train(model, data, tok.pad_token_id, len(tok), t.student_sft_steps, t.sft_batch_size, t.sft_lr,
                        cfg.train.seed, log)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "sft.json").write_text(json.dumps({"params": n, **fit}, indent=1))

    return SHIPPED_TEACHER, build_cached(root, build, log)
