"""Data: prompt template, malformed rows reported by line number, fixed-seed split, token limits."""
import json

import pytest

from rlkd.data import (
    DataError,
    PromptSampler,
    format_prompt,
    read_examples,
    split,
    tokenize,
)


def test_template_matches_minillm():
    assert format_prompt("Say hi") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nSay hi\n\n### Response:\n")
    assert "### Input:\nctx\n\n### Response:\n" in format_prompt("Say hi", "ctx")


def test_malformed_rows_are_counted_with_line_numbers(tmp_path):
    rows = [
        json.dumps({"instruction": "a", "context": "", "response": "b"}),
        "{not json",
        json.dumps({"instruction": "", "response": "x"}),
        json.dumps({"instruction": "q", "input": "i", "output": ["r1", "r2"]}),
        json.dumps([1, 2]),
        "",
        json.dumps({"instruction": "q"}),
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(rows) + "\n")
    examples, report = read_examples(path)
    assert len(examples) == 2 and examples[1].references == ["r1", "r2"]
    assert "### Input:\ni" in examples[1].prompt
    assert [n for n, _ in report.malformed] == [2, 3, 5, 7]
    summary = report.summary()
    assert "6 rows read, 4 malformed skipped" in summary and "line 2: invalid JSON" in summary


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no usable rows"):
        read_examples(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="not found"):
        read_examples(tmp_path / "missing.jsonl")


def test_split_is_fixed_by_seed(examples):
    a = split(examples, 20, 1)
    b = split(examples, 20, 1)
    c = split(examples, 20, 2)
    assert [e.prompt for e in a[1]] == [e.prompt for e in b[1]] != [e.prompt for e in c[1]]
    assert len(a[1]) == 20 and len(a[0]) == len(examples) - 20


def test_token_limits_and_eos(tiny_data, examples):
    tok, _ = tiny_data
    data = tokenize(examples[:50], tok, 16, 5)
    assert all(len(d.prompt_ids) <= 16 and 1 <= len(d.response_ids) <= 5 for d in data)
    short = [d for d in data if len(d.response_ids) < 5]
    assert all(d.response_ids[-1] == tok.eos_token_id for d in short)


def test_sampler_is_seeded_and_counts_position(tiny_data):
    _, data = tiny_data
    a, b = PromptSampler(data, 5), PromptSampler(data, 5)
    assert [x.uid for x in a.next(7)] == [x.uid for x in b.next(7)]
    assert a.position == 7
