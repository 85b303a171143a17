"""Model directories: loading and checking HF models, and building the embedded tiny default.

The embedded default needs no network: a byte-level BPE tokenizer is trained on the shipped Dolly
subset, a tiny Llama teacher and student are built from the config, the teacher (and briefly the
student) are trained by SFT, and everything is cached under model.cache_dir keyed by a hash of the
settings that shape it, so a second run reuses it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rlkd.config import Config, ConfigError, TinyModelConfig

EOS, PAD, UNK = "<|endoftext|>", "<|pad|>", "<|unk|>"


def check_model_dir(path: str, name: str, trust_remote_code: bool = False, log: Callable = print) -> Path:
    """A local HF model directory, checked before any actor starts (no hub lookups, ever): a config.json,
    weights (safetensors; .bin only with a warning), custom code only with trust_remote_code, and a
    tokenizer that loads. `name` is how the user set it, e.g. 'config field model.student' or '--model'."""
    p = Path(path).expanduser()

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{name}={path!r} is invalid: {why}")
    if not p.is_dir():
        raise bad("directory not found (expected a local Hugging Face model directory)")
    if not (p / "config.json").is_file():
        raise bad("no config.json in it (expected a local Hugging Face model directory)")
    try:
        config = json.loads((p / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"its config.json is not valid JSON ({e})") from None
    if "auto_map" in config and not trust_remote_code:
        raise bad("the model needs its own code (config.json has auto_map); set model.trust_remote_code=true "
                  "only if you trust that code")
    if not any(p.glob("*.safetensors")):
        if not any(p.glob("*.bin")):
            raise bad("no weights in it (model.safetensors, or shards with model.safetensors.index.json)")
        log(f"warning: {name}={path!r} has only .bin weights (pickles); safetensors are preferred")
    for weights in sorted(p.glob("*.safetensors")):  # the header only: an empty or cut file fails here
        try:
            from safetensors import safe_open

            with safe_open(str(weights), "pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - any reader failure becomes one line naming the file
            raise bad(f"{weights.name} is not a readable safetensors file ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120] if str(e) else 'empty'})") from None
    try:
        tok = load_tokenizer(p, trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one line naming the field
        raise bad(f"its tokenizer does not load ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    rows = config.get("vocab_size")
    if isinstance(rows, int) and len(tok) > rows:  # token ids past the embedding would index out of range
        raise bad(f"its tokenizer has {len(tok)} tokens but the model only {rows} embedding rows "
                  "(config.json vocab_size); resize the embeddings or use the model's own tokenizer")
    return p


def use_allotted_threads() -> None:
    """Torch threads = the CPUs Ray gave this actor (it sets OMP_NUM_THREADS from num_cpus), not every core."""
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))


def quiet_hf() -> None:
    """No per-file progress bars or info chatter from transformers inside actors."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, trust_remote_code: bool = False, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    quiet_hf()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32,
                                                trust_remote_code=trust_remote_code)


def check_same_tokenizer(teacher_dir: str | Path, student_dir: str | Path, trust_remote_code: bool = False,
                         log: Callable = print) -> int:
    """Teacher and student must share a vocabulary (embedding sizes may differ by padding rows).

    What matters is that every id means the same token to both: the same length, the same id for every
    token both know, and the same eos / bos / pad ids. An id whose *added* token is named differently
    (Llama 3.1 and 3.2 renamed unused reserved specials) only gets a warning. Returns the tokenizer's
    length, the width every logit tensor is sliced to.
    """
    t, s = load_tokenizer(teacher_dir, trust_remote_code), load_tokenizer(student_dir, trust_remote_code)
    tv, sv = t.get_vocab(), s.get_vocab()
    moved = [tok for tok in tv.keys() & sv.keys() if tv[tok] != sv[tok]]
    t_by_id, s_by_id = {i: tok for tok, i in tv.items()}, {i: tok for tok, i in sv.items()}
    renamed = [i for i in t_by_id.keys() & s_by_id.keys() if t_by_id[i] != s_by_id[i]]
    added = {i for i in t.added_tokens_decoder} & {i for i in s.added_tokens_decoder}
    problems = [f"{len(t)} vs {len(s)} tokens"] if len(t) != len(s) else []
    if moved:
        problems.append(f"{len(moved)} shared tokens have different ids (e.g. {moved[0]!r})")
    if set(renamed) - added:
        problems.append(f"{len(set(renamed) - added)} ids are different tokens")
    for name in ("eos", "bos", "pad"):  # eos must agree; bos and pad where both define one
        a, b = getattr(t, f"{name}_token_id"), getattr(s, f"{name}_token_id")
        if a != b and (name == "eos" or None not in (a, b)):
            problems.append(f"{name} id {a} vs {b}")
    if problems:
        raise ConfigError(f"model.teacher={str(teacher_dir)!r} and model.student={str(student_dir)!r} use "
                          f"different tokenizers ({'; '.join(problems)}); distillation needs one shared vocabulary")
    if renamed:
        log(f"warning: {len(renamed)} added special tokens are named differently in the teacher's and the "
            f"student's tokenizer (e.g. id {renamed[0]}: {t_by_id[renamed[0]]!r} vs {s_by_id[renamed[0]]!r}); "
            "their ids agree, so rlkd goes on")
    return len(s)


# ---------------------------------------------------------------------------------------------
# embedded default


def check_lora_targets(model_dir: str | Path, targets: str, trust_remote_code: bool = False) -> list[str]:
    """The module names of `targets` (comma-separated) that the model has; ConfigError otherwise.

    Builds the architecture on the meta device (no weights read), so it is cheap for any size.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    modules = [m.strip() for m in targets.split(",") if m.strip()]
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in modules if m not in present]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)})
        raise ConfigError(f"config field algo.okd.lora_targets={targets!r} is invalid: the teacher has no modules "
                          f"named {missing}; its linear layers are {linear}")
    return modules


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS,
                                  pad_token=PAD, unk_token=EOS)
    tok.save_pretrained(str(out_dir))
    return tok


def train_word_tokenizer(texts: list[str], out_dir: Path, extra: tuple[str, ...] = ()):
    """A word-level tokenizer (one id per word, number or punctuation run) for built-in suites whose
    vocabulary is closed: short sequences and one token per answer word. Decoding joins with spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    seen = dict.fromkeys(extra)
    for text in texts:
        seen.update(dict.fromkeys(piece for piece, _ in split.pre_tokenize_str(text)))
    vocab = {t: i for i, t in enumerate([EOS, PAD, UNK] + sorted(seen))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = split
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                  unk_token=UNK, clean_up_tokenization_spaces=False)
    tok.save_pretrained(str(out_dir))
    return tok


def tiny_llama(tok, hidden: int, layers: int, head_dim: int, max_positions: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16,
                      num_hidden_layers=layers, num_attention_heads=hidden // head_dim,
                      num_key_value_heads=hidden // head_dim, head_dim=head_dim,
                      max_position_embeddings=max_positions, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg)


def _embedded_key(cfg: Config, data_file: Path) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"tiny": cfg.model.tiny.__dict__, "prompt": cfg.data.max_prompt_tokens,
                         "response": cfg.data.max_response_tokens, "val": cfg.data.val_size,
                         "split_seed": cfg.data.split_seed, "max_rows": cfg.data.max_rows, "v": 1},
                        sort_keys=True).encode())
    h.update(data_file.read_bytes())
    return h.hexdigest()[:12]


def remove_abandoned_builds(cache: Path) -> None:
    """Remove `.building-PID-*` directories whose process is gone (a build killed half way); a build still
    running in another process is left alone."""
    import psutil

    for d in cache.glob(".building-*"):
        pid = d.name.split("-")[1]
        if not pid.isdigit() or not psutil.pid_exists(int(pid)):  # older builds had no pid in the name
            shutil.rmtree(d, ignore_errors=True)


def build_cached(root: Path, build: Callable[[Path], None], log=print) -> Path:
    """`root` if a finished build is cached there; else build(tmp) into a temporary sibling directory,
    mark it DONE and rename it into place (a concurrent run that finished first wins)."""
    if (root / "DONE").is_file():
        log(f"models: reusing cached {root}")
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_builds(root.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{os.getpid()}-", dir=root.parent))
    t0 = time.time()
    build(tmp)
    (tmp / "DONE").write_text(f"built in {time.time() - t0:.1f}s\n")
    if root.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, root)
    log(f"models: cached in {root} ({time.time() - t0:.0f}s)")
    return root


def embedded_models(cfg: Config, data_file: Path, train_texts: Callable[[], list[str]],
                    sft: Callable[..., dict], log=print) -> tuple[Path, Path]:
    """Build (or reuse from cache) the embedded tokenizer + SFT'd tiny teacher and student.

    `train_texts()` gives the raw training texts for the tokenizer; `sft(model, tok, steps)` trains
    a model in place and returns its summary. Returns (teacher_dir, student_dir).
    """
    root = Path(cfg.model.cache_dir).expanduser() / f"embedded-{_embedded_key(cfg, data_file)}"
    t: TinyModelConfig = cfg.model.tiny

    def build(tmp: Path) -> None:
        tok = train_tokenizer(train_texts(), t.vocab_size, tmp / "tokenizer")
        max_pos = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens + 8
        summary = {}
        for role, hidden, layers, steps in (("teacher", t.teacher_hidden, t.teacher_layers, t.teacher_sft_steps),
                                            ("student", t.student_hidden, t.student_layers, t.student_sft_steps)):
            model = tiny_llama(tok, hidden, layers, t.head_dim, max_pos, seed=cfg.train.seed + len(role))
            n_params = sum(p.numel() for p in model.parameters())
            log(f"models: {role}: tiny Llama {layers}x{hidden}, {n_params / 1e6:.2f}M params, SFT {steps} steps")
            summary[role] = {"params": n_params, **sft(model, tok, steps)}
            model.save_pretrained(str(tmp / role), safe_serialization=True)
            tok.save_pretrained(str(tmp / role))
        (tmp / "embedded.json").write_text(json.dumps(summary, indent=2))

    root = build_cached(root, build, log)
    return root / "teacher", root / "student"
