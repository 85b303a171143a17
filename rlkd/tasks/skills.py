"""The skills suite: eight verifiable instruction families, generated deterministically from a seed.

Every row is rlkd JSONL: `instruction`, `input`, `output` (the list of *every* acceptable answer) and
`family`. Exact match against any reference is the verifier, so `rlkd.eval` scores a file of these
rows with no task-specific code. The first reference is the training target: for the open-ended
families (initial, divisible, pair) it is one valid answer drawn uniformly at random, so a model
trained on the suite learns a distribution with several modes.

    python -m rlkd.tasks.skills --out DIR [--seed 0] [--train 4000] [--val 256] [--test 512]
        -> DIR/train.jsonl, DIR/val.jsonl, DIR/test.jsonl
"""
from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from itertools import combinations
from pathlib import Path

from rlkd.data import SHIPPED_DOLLY

FAMILIES = ("reverse", "sort", "add", "upper", "count", "initial", "divisible", "pair")
OPEN_ENDED = frozenset({"initial", "divisible", "pair"})
SPLITS = ("train", "val", "test")


@lru_cache(maxsize=4)
def words(path: str = str(SHIPPED_DOLLY), n: int = 500) -> tuple[str, ...]:
    """W: the n most frequent words of the `response` fields (maximal runs of ASCII letters,
    lowercased, 3 to 8 letters), ties broken alphabetically."""
    counts: Counter = Counter()
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                counts.update(w.lower() for w in re.findall(r"[A-Za-z]+", json.loads(line).get("response", ""))
                              if 3 <= len(w) <= 8)
    return tuple(sorted(counts, key=lambda w: (-counts[w], w))[:n])


def _join(items) -> str:
    return " ".join(str(x) for x in items)


# Each family: rng, W -> (instruction, input, every acceptable answer). Sizes are uniform over ranges.
def _reverse(rng, w):
    xs = rng.sample(w, rng.randint(3, 8))
    return "Reverse the order of the words.", _join(xs), [_join(reversed(xs))]


def _sort(rng, w):
    xs = rng.sample(range(100), rng.randint(3, 7))
    return "Sort the numbers from smallest to largest.", _join(xs), [_join(sorted(xs))]


def _add(rng, w):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return "Add the two numbers.", f"{a} + {b}", [str(a + b)]


def _upper(rng, w):
    xs = rng.sample(w, rng.randint(2, 6))
    return "Write the words in capital letters.", _join(xs), [_join(x.upper() for x in xs)]


def _count(rng, w):
    xs = rng.sample(w, rng.randint(1, 9))
    return "How many words are in the input?", _join(xs), [str(len(xs))]


def _initial(rng, w):
    xs = rng.sample(w, rng.randint(4, 8))
    c = rng.choice(xs)[0]
    return (f"Name a word from the list that starts with the letter {c}.", _join(xs),
            [x for x in xs if x[0] == c])


def _divisible(rng, w):
    a = rng.randint(1, 60)
    b, k = a + rng.randint(10, 39), rng.randint(2, 9)
    return (f"Give a number between {a} and {b} that is divisible by {k}.", "",
            [str(x) for x in range(a, b + 1) if x % k == 0])


def _pair(rng, w):
    xs = rng.sample(w, rng.randint(3, 5))
    return ("Write two different words from the list in alphabetical order.", _join(xs),
            [f"{u} {v}" for u, v in combinations(sorted(xs), 2)])


GENERATORS: dict[str, Callable] = {"reverse": _reverse, "sort": _sort, "add": _add, "upper": _upper,
                                   "count": _count, "initial": _initial, "divisible": _divisible, "pair": _pair}


def make_row(family: str, rng: random.Random, w: tuple[str, ...]) -> dict:
    """One row; output[0] is the training target (uniform over the answers of an open-ended family)."""
    instruction, inp, answers = GENERATORS[family](rng, list(w))
    first = rng.randrange(len(answers))
    answers = [answers[first]] + answers[:first] + answers[first + 1:]
    return {"instruction": instruction, "input": inp, "output": answers, "family": family}


def generate(seed: int = 0, sizes: dict[str, int] | None = None, families=FAMILIES) -> dict[str, list[dict]]:
    """Rows per split, balanced over `families` (row i of a split has family i mod len(families)).

    No (instruction, input) pair appears twice, so the splits are disjoint. Test is drawn first,
    then validation, then train, so a larger train split never changes the test rows.
    """
    sizes = sizes or {"train": 4000, "val": 256, "test": 512}
    rng, w, seen = random.Random(seed), words(), set()
    out: dict[str, list[dict]] = {}
    for split in ("test", "val", "train"):
        rows = []
        for i in range(sizes.get(split, 0)):
            family = families[i % len(families)]
            for _ in range(1000):
                row = make_row(family, rng, w)
                key = (row["instruction"], row["input"])
                if key not in seen:
                    break
            else:
                raise ValueError(f"family {family!r} ran out of distinct rows for a {split} split of "
                                 f"{sizes[split]}; ask for fewer rows")
            seen.add(key)
            rows.append(row)
        out[split] = rows
    return {s: out[s] for s in SPLITS if s in out}


def write_splits(out_dir: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write train/val/test JSONL files; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in generate(seed, sizes).items():
        paths[split] = out_dir / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlkd.tasks.skills", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for train.jsonl, val.jsonl, test.jsonl")
    ap.add_argument("--seed", type=int, default=0, help="generator seed")
    for split, n in (("train", 4000), ("val", 256), ("test", 512)):
        ap.add_argument(f"--{split}", type=int, default=n, help=f"rows in the {split} split")
    args = ap.parse_args(argv)
    paths = write_splits(args.out, args.seed, {"train": args.train, "val": args.val, "test": args.test})
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
