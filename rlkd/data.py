"""Instruction data: JSONL rows -> Alpaca/MiniLLM prompts -> token ids within the length limits."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

SHIPPED_DOLLY = Path(__file__).parent / "assets" / "dolly_short.jsonl"

# MiniLLM's Dolly prompt (minillm/tools/process_data_dolly.py; docs/algorithms.md#metrics)
_HEADER = ("Below is an instruction that describes a task. "
           "Write a response that appropriately completes the request.\n\n")


class DataError(ValueError):
    """The data cannot be used at all (missing or empty file, no valid rows)."""


def format_prompt(instruction: str, context: str = "") -> str:
    """The Alpaca/MiniLLM prompt, with the '### Input:' block only when there is a context."""
    body = f"### Instruction:\n{instruction}\n\n"
    if context:
        body += f"### Input:\n{context}\n\n"
    return _HEADER + body + "### Response:\n"


def prompt_summary(prompt: str) -> str:
    """The instruction and input of an Alpaca prompt on one line (for printed samples); also works on a
    prompt decoded by a word-level tokenizer ('### Instruction :')."""
    body = prompt.split("Instruction", 1)[-1].rsplit("Response", 1)[0]
    return " ".join(body.replace("###", " ").split()).strip(" :")


@dataclass
class Example:
    prompt: str
    references: list[str]  # first one is the training target; all count for ROUGE-L and exact match
    family: str | None = None  # task family (skills suite), for per-family scores
    teacher: str | None = None  # the row's teacher, a name in model.teachers (None: model.teacher)


@dataclass
class DataReport:
    path: str
    rows: int = 0
    malformed: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)

    def summary(self, limit: int = 5) -> str:
        text = f"data: {self.path}: {self.rows} rows read, {len(self.malformed)} malformed skipped"
        if self.malformed:
            shown = "; ".join(f"line {n}: {why}" for n, why in self.malformed[:limit])
            more = f"; ... {len(self.malformed) - limit} more" if len(self.malformed) > limit else ""
            text += f" ({shown}{more})"
        return text


def _pick(row: dict, keys: tuple[str, ...]):
    for k in keys:
        if k in row:
            return row[k]
    return None


def _parse_row(row) -> tuple[Example | None, str]:
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        return None, "missing or empty 'instruction'"
    context = _pick(row, ("context", "input")) or ""
    if not isinstance(context, str):
        return None, "'context'/'input' must be a string"
    response = _pick(row, ("response", "output"))
    refs = [response] if isinstance(response, str) else response
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
        return None, "missing or empty 'response'/'output' (a string or a list of strings)"
    family, teacher = row.get("family"), row.get("teacher")
    if family is not None and not isinstance(family, str):
        return None, "'family' must be a string"
    if teacher is not None and (not isinstance(teacher, str) or not teacher.strip()):
        return None, "'teacher' must be a teacher's name (a string in model.teachers)"
    return Example(format_prompt(instruction.strip(), context.strip()), [r.strip() for r in refs], family,
                   teacher.strip() if teacher else None), ""


def read_examples(path: str | Path, max_rows: int = 0) -> tuple[list[Example], DataReport]:
    """Parse a JSONL file; malformed rows are skipped and reported by line number."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} {'is a directory' if path.is_dir() else 'not found'}")
    report, examples = DataReport(str(path)), []
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is accepted
    except UnicodeDecodeError as e:
        raise DataError(f"data file {str(path)!r} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})"
                        ) from None
    if text.lstrip().startswith("["):
        raise DataError(f"data file {str(path)!r} is a JSON array; rlkd reads JSONL, one JSON object per line "
                        "(convert with: python -c \"import json,sys; [print(json.dumps(r)) for r in "
                        "json.load(open(sys.argv[1]))]\" FILE > FILE.jsonl)")
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if max_rows and report.rows >= max_rows:
            break
        report.rows += 1
        try:
            example, why = _parse_row(json.loads(line))
        except json.JSONDecodeError as e:
            example, why = None, f"invalid JSON ({e.msg})"
        if example is None:
            report.malformed.append((lineno, why))
        else:
            examples.append(example)
    if not examples:
        raise DataError(f"data file {str(path)!r} has no usable rows: {report.summary().split(': ', 2)[-1]}")
    return examples, report


def split(examples: list, val_size: int, seed: int) -> tuple[list, list]:
    """Fixed-seed shuffle, then hold out `val_size` examples (at most half the data)."""
    if len(examples) < 2:
        raise DataError(f"need at least 2 usable rows to hold out validation, got {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(val_size, len(examples) // 2)
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


@dataclass
class TokenizedExample:
    uid: int  # position in the tokenized list (keys caches such as teacher generations)
    prompt_ids: list[int]  # cut in the middle to max_prompt_tokens (see cut_middle)
    response_ids: list[int]  # gold response + EOS, cut to max_response_tokens
    references: list[str]
    family: str | None = None
    truncated: bool = False  # the prompt was longer than max_prompt_tokens
    teacher: str | None = None  # the row's teacher (model.teachers); None: model.teacher


def cut_middle(ids: list[int], limit: int) -> list[int]:
    """Keep the first and last halves of an over-long prompt. The start holds the header and the
    instruction, the end the last of the input and '### Response:', so neither is lost (cutting from
    the left would drop the instruction)."""
    if len(ids) <= limit:
        return ids
    head = (limit + 1) // 2
    return ids[:head] + ids[len(ids) - (limit - head):]


def tokenize(examples: list[Example], tokenizer, max_prompt_tokens: int, max_response_tokens: int
             ) -> list[TokenizedExample]:
    eos = tokenizer.eos_token_id
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    responses = tokenizer([e.references[0] for e in examples], add_special_tokens=False)["input_ids"]
    return [TokenizedExample(i, cut_middle(p, max_prompt_tokens), (r + [eos])[:max_response_tokens], e.references,
                             e.family, len(p) > max_prompt_tokens, e.teacher)
            for i, (p, r, e) in enumerate(zip(prompts, responses, examples))]


def rng_state(rng: random.Random) -> list:
    """random.Random state as JSON-able lists (checkpoints hold no pickles)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


class PromptSampler:
    """Endless, seeded, epoch-shuffled iteration over the training examples."""

    def __init__(self, data: list[TokenizedExample], seed: int):
        self.data, self.rng = data, random.Random(seed)
        self.order: list[int] = []
        self.position = 0  # examples consumed so far (for logging and resume)

    def next(self, n: int) -> list[TokenizedExample]:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = list(range(len(self.data)))
                self.rng.shuffle(self.order)
            out.append(self.data[self.order.pop()])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"rng": rng_state(self.rng), "order": list(self.order), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(self.rng, state["rng"])
        self.order, self.position = list(state["order"]), state["position"]
