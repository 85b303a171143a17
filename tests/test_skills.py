"""The skills suite: the spec checked row by row against independent verifiers, disjoint splits, exact
match and diversity scoring, middle truncation, collapse detectors, and rlkd.eval on a suite file."""
import json
import re
from collections import Counter
from itertools import combinations

import pytest
import torch

from rlkd.data import SHIPPED_DOLLY, cut_middle
from rlkd.metrics import answer_diversity, by_family, exact_match
from rlkd.tasks import skills

INSTRUCTIONS = {"reverse": "Reverse the order of the words.", "sort": "Sort the numbers from smallest to largest.",
                "add": "Add the two numbers.", "upper": "Write the words in capital letters.",
                "count": "How many words are in the input?"}


def test_words_are_the_500_most_frequent_response_words():
    counts = Counter()
    for line in SHIPPED_DOLLY.read_text(encoding="utf-8").splitlines():
        for run in re.findall(r"[A-Za-z]+", json.loads(line)["response"]):
            if 3 <= len(run) <= 8:
                counts[run.lower()] += 1
    w = skills.words()
    assert len(w) == len(set(w)) == 500
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    assert list(w) == [k for k, _ in ranked[:500]]


def _valid_answers(row: dict) -> set[str]:
    """An independent verifier of each family's spec."""
    f, inp, ins = row["family"], row["input"].split(), row["instruction"]
    if f in INSTRUCTIONS:
        assert ins == INSTRUCTIONS[f]
    if f == "reverse":
        return {" ".join(inp[::-1])}
    if f == "sort":
        return {" ".join(str(x) for x in sorted(map(int, inp)))}
    if f == "add":
        assert inp[1] == "+"
        return {str(int(inp[0]) + int(inp[2]))}
    if f == "upper":
        return {row["input"].upper()}
    if f == "count":
        return {str(len(inp))}
    if f == "initial":
        c = re.fullmatch(r"Name a word from the list that starts with the letter (\w)\.", ins).group(1)
        return {x for x in inp if x.startswith(c)}
    if f == "divisible":
        pattern = r"Give a number between (\d+) and (\d+) that is divisible by (\d)\."
        a, b, k = map(int, re.fullmatch(pattern, ins).groups())
        assert 1 <= a <= 60 and 10 <= b - a <= 39 and 2 <= k <= 9 and row["input"] == ""
        return {str(x) for x in range(a, b + 1) if x % k == 0}
    assert f == "pair" and ins == "Write two different words from the list in alphabetical order."
    return {" ".join(sorted(pair)) for pair in combinations(inp, 2)}


SIZE_RANGES = {"reverse": (3, 8), "sort": (3, 7), "add": (3, 3), "upper": (2, 6), "count": (1, 9), "initial": (4, 8),
               "divisible": (0, 0), "pair": (3, 5)}


def test_rows_follow_the_spec_and_splits_are_disjoint():
    out = skills.generate(3, {"train": 800, "val": 80, "test": 160})
    assert out == skills.generate(3, {"train": 800, "val": 80, "test": 160})  # deterministic
    keys = {s: {(r["instruction"], r["input"]) for r in rows} for s, rows in out.items()}
    assert all(len(keys[s]) == len(out[s]) for s in out)  # no duplicates within a split either
    assert not (keys["train"] & keys["val"] or keys["train"] & keys["test"] or keys["val"] & keys["test"])
    w = set(skills.words())
    for rows in out.values():
        assert Counter(r["family"] for r in rows) == {f: len(rows) // 8 for f in skills.FAMILIES}
        for r in rows:
            assert set(r["output"]) == _valid_answers(r) and len(r["output"]) == len(set(r["output"]))
            lo, hi = SIZE_RANGES[r["family"]]
            n = len(r["input"].split())
            assert lo <= n <= hi
            if r["family"] in ("reverse", "upper", "count", "initial", "pair"):
                assert set(r["input"].split()) <= w and len(set(r["input"].split())) == n
            if r["family"] == "sort":
                assert all(0 <= int(x) <= 99 for x in r["input"].split()) and len(set(r["input"].split())) == n
    # open-ended training targets are spread over the valid answers, not always the first one
    pairs = [r for r in out["train"] if r["family"] == "pair"]
    assert len({sorted(r["output"]).index(r["output"][0]) for r in pairs}) > 3


def test_larger_train_split_keeps_val_and_test():
    small, big = skills.generate(0, {"train": 80, "val": 16, "test": 32}), skills.generate(0, {"train": 160, "val": 16,
                                                                                                "test": 32})
    assert small["test"] == big["test"] and small["val"] == big["val"] and big["train"][:80] == small["train"]


def test_cli_writes_three_files(tmp_path):
    assert skills.main(["--out", str(tmp_path), "--train", "16", "--val", "8", "--test", "8"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and set(rows[0]) == {"instruction", "input", "output", "family"}


def test_exact_match_family_and_diversity():
    refs = [["a b"], ["3", "6", "9"], ["x"]]
    assert exact_match([" a b ", "6", "y"], refs) == [100.0, 100.0, 0.0]
    assert exact_match(["a  b", "6 9", "x."], refs) == [0.0, 0.0, 0.0]  # exact: no fuzzy matching
    assert by_family([100.0, 0.0, 50.0], ["f", "f", None]) == {"f": 50.0}
    # 3 seeds: prompt 0 gave 2 distinct valid answers (and one invalid), prompt 1 one valid answer
    seeds = [["3", "u v"], ["6", "u v"], ["7", "u v"]]
    assert answer_diversity(seeds, [["3", "6", "9"], ["u v", "u w"]]) == pytest.approx((2 + 1) / 2)


def test_long_prompts_are_cut_in_the_middle():
    ids = list(range(100))
    cut = cut_middle(ids, 11)
    assert cut == list(range(6)) + list(range(95, 100)) and cut_middle(ids[:11], 11) == ids[:11]


def test_collapse_detector_separates_a_context_free_model_from_the_teacher():
    """A model that ignores its input (final norm zeroed: the same logits everywhere) scores context
    dependence 0; the shipped teacher on suite prompts scores high, with many distinct argmax tokens."""
    from rlkd.batch import SequenceBatch
    from rlkd.data import tokenize
    from rlkd.forward import response_forward
    from rlkd.metrics import collapse_stats
    from rlkd.models import load_model, load_tokenizer
    from rlkd.tasks.teacher import SHIPPED_TEACHER, examples

    tok, teacher = load_tokenizer(SHIPPED_TEACHER), load_model(SHIPPED_TEACHER).eval()
    rows = tokenize(examples(skills.generate(0, {"test": 64})["test"]), tok, 64, 16)
    batch = SequenceBatch.collate([r.prompt_ids for r in rows], [r.response_ids for r in rows], tok.pad_token_id)
    with torch.no_grad():
        t = collapse_stats(torch.log_softmax(response_forward(teacher, batch, len(tok))[0], -1), batch.response_mask)
        teacher.model.norm.weight.zero_()
        c = collapse_stats(torch.log_softmax(response_forward(teacher, batch, len(tok))[0], -1), batch.response_mask)
    assert c["context_tv"] < 1e-6 and c["distinct_argmax"] == 1
    assert t["context_tv"] > 0.5 and t["distinct_argmax"] > 50 and t["entropy"] < c["entropy"]


def test_eval_scores_a_suite_file_with_no_task_code(ray_cluster, tmp_path):
    """rlkd.eval on suite rows: exact match per family, diversity on open-ended rows; the shipped
    teacher beats the constant-answer floor (the most frequent training answer of each family)."""
    from rlkd.eval import main
    from rlkd.tasks.teacher import SHIPPED_TEACHER

    paths = skills.write_splits(tmp_path / "suite", 0, {"test": 48})
    assert main(["--model", str(SHIPPED_TEACHER), "--data", str(paths["test"]), "--seeds", "10,20,30",
                 "--max-new-tokens", "16", "--max-prompt-tokens", "64", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert set(result["exact_match_family"]) == set(skills.FAMILIES)
    assert set(result["answer_diversity_family"]) <= skills.OPEN_ENDED and result["answer_diversity"] >= 1
    train = skills.generate(0, {"train": 4000, "val": 256, "test": 512})["train"]
    common = {f: Counter(r["output"][0] for r in train if r["family"] == f).most_common(1)[0][0]
              for f in skills.FAMILIES}
    rows = [json.loads(x) for x in paths["test"].read_text().splitlines()]
    floor = sum(100.0 * (common[r["family"]] in r["output"]) for r in rows) / len(rows)
    assert result["exact_match_mean"] > floor + 5 and result["eos_rate_mean"] > 90
    assert "family reverse" in (tmp_path / "out" / "eval.md").read_text()


def test_teacher_builder_continues_a_build(tmp_path):
    """`python -m rlkd.tasks.teacher` builds, and `--init` continues that build for another cycle: same
    tokenizer bytes, both commands and logs in build.log, the earlier scores kept in teacher.json."""
    from rlkd.tasks.teacher import main

    first, second = tmp_path / "t1", tmp_path / "t2"
    small = ["--steps", "2", "--eval-every", "2", "--train-rows", "800", "--batch-size", "4"]
    assert main(["--out", str(first), "--hidden", "32", "--layers", "1", "--head-dim", "16", *small]) == 0
    assert main(["--out", str(second), "--init", str(first), "--bf16", "--threads", "1", *small]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    log = (second / "build.log").read_text()
    assert log.count("$ python -m rlkd.tasks.teacher") == 2 and "continues" in log
    summary = json.loads((second / "teacher.json").read_text())
    assert summary["bf16"] and summary["earlier"]["steps"] == 2 and summary["shape"]["hidden"] == 32
    assert set(summary["test_exact_match_mean"]) == {"overall", *skills.FAMILIES}


def test_shipped_plateau_student_is_the_teachers_tokenizer_and_its_build_is_logged():
    """model.plateau_student's directory: the teacher's tokenizer (so distillation needs no remapping), the
    command that built it at the top of its build.log, and its validation curve in the summary."""
    from rlkd.models import check_same_tokenizer
    from rlkd.tasks.teacher import SHIPPED_STUDENT, SHIPPED_TEACHER

    assert check_same_tokenizer(SHIPPED_TEACHER, SHIPPED_STUDENT) == 1265
    first = (SHIPPED_STUDENT / "build.log").read_text().splitlines()[0]
    assert first.startswith("$ python -m rlkd.tasks.teacher --out ") and "--hidden 128 --layers 2" in first
    summary = json.loads((SHIPPED_STUDENT / "teacher.json").read_text())
    assert summary["shape"] == {"hidden": 128, "layers": 2, "head_dim": 32} and len(summary["val_curve"]) >= 10
