"""`python -m rlkd.eval` on tiny real models: ROUGE-L over seeds through a rollout actor, teacher
agreement metrics, and clear errors. The metric functions against brute-force loops."""
import json
import math

import pytest
import torch

from rlkd import metrics as M
from rlkd.data import SHIPPED_DOLLY
from rlkd.eval import main
from rlkd.losses import per_token_kl


def test_metrics_brute_force():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 4, generator=g).log_softmax(-1)
    s = torch.randn(2, 3, 4, generator=g).log_softmax(-1)
    targets = torch.tensor([[0, 1, 2], [3, 0, 1]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    hits = M.top1_hits(t, s)
    brute = [float(t[b, i].argmax() == s[b, i].argmax()) for b in range(2) for i in range(3) if mask[b, i]]
    assert M.masked_mean(hits, mask) == pytest.approx(sum(brute) / 5)
    kl = per_token_kl(t, s)
    assert kl[1, 0] == pytest.approx(sum(t[1, 0, a].exp() * (t[1, 0, a] - s[1, 0, a]) for a in range(4)).item())
    assert M.unc(t, targets)[0, 2] == pytest.approx(1 - t[0, 2, 2].exp().item())
    # ExAccErr: KL summed per sequence over its first l positions (none past its EOS), mean over sequences
    kl_s, m_s = torch.tensor([[1.0, 2.0, 5.0], [3.0, 9.0, 9.0]]), torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    kl_t, m_t = torch.ones(2, 3), torch.ones(2, 3)
    r = sum(sum(kl_s[b, i] * m_s[b, i] for i in range(2)) for b in range(2)) / 2  # (3 + 3) / 2
    e = sum(sum(kl_t[b, i] * m_t[b, i] for i in range(2)) for b in range(2)) / 2
    assert M.exacc_err(kl_s, m_s, kl_t, m_t, 2) == pytest.approx(float((r - e) / e * 100)) == pytest.approx(50.0)


def test_eval_cli_with_teacher(ray_cluster, tiny_models, tmp_path, capsys):
    teacher, student = tiny_models
    data = tmp_path / "d.jsonl"
    rows = SHIPPED_DOLLY.read_text().splitlines()[:6]
    lines = [json.dumps({"instruction": json.loads(r)["instruction"], "output": [json.loads(r)["response"], "x"]})
             for r in rows]
    data.write_text("\n".join(lines + ["{not json", '{"instruction": "no output"}']) + "\n")
    code = main(["--model", str(student), "--teacher", str(teacher), "--data", str(data), "--seeds", "10,20",
                 "--out", str(tmp_path / "out"), "--max-new-tokens", "8", "--max-prompt-tokens", "48"])
    assert code == 0
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert result["num_examples"] == 6 and result["malformed_rows"] == 2
    assert len(result["per_seed"]) == 2 and 0 <= result["rougeL_mean"] <= 100
    assert result["truncated_prompts"] > 0  # 48-token budget: long Dolly prompts were cut in the middle
    assert math.isfinite(result["gold_ce"]) and len(result["samples"]) == 3
    for k in ("top1_agreement", "top1_agreement_easy", "top1_agreement_hard"):
        assert 0 <= result[k] <= 1
    assert result["token_kl_teacher_student"] > 0 and math.isfinite(result["exacc_err_16"])
    assert (tmp_path / "out" / "eval.md").read_text().count("|") > 10


@pytest.mark.parametrize("case", ["missing_model", "empty_file", "bad_seeds"])
def test_eval_cli_errors(tiny_models, tmp_path, capsys, case):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    args = {"missing_model": ["--model", str(tmp_path / "nope"), "--data", str(SHIPPED_DOLLY)],
            "empty_file": ["--model", str(tiny_models[1]), "--data", str(empty)],
            "bad_seeds": ["--model", str(tiny_models[1]), "--data", str(SHIPPED_DOLLY), "--seeds", "a,b"]}[case]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlkd.eval: error: ")
    assert not (tmp_path / "o").exists()


def test_prompt_budget_never_runs_past_the_positions(tiny_models):
    """rlkd.eval shrinks the prompt budget to the models' positions (128 here); a run config that cannot fit
    is refused before any actor starts, naming the field."""
    from rlkd.config import ConfigError, load_config
    from rlkd.eval import prompt_limit
    from rlkd.prepare import check_positions

    assert prompt_limit(list(tiny_models), 48, 16, log=lambda *a: None) == 48
    assert prompt_limit(list(tiny_models), 500, 16, log=lambda *a: None) == 128 - 16
    with pytest.raises(ConfigError, match="--max-new-tokens=128"):
        prompt_limit(list(tiny_models), 48, 128)
    cfg = load_config(None, ["data.max_prompt_tokens=120", "data.max_response_tokens=16"])
    with pytest.raises(ConfigError, match="data.max_prompt_tokens=120 is invalid: .* needs 136 positions"):
        check_positions(cfg, *tiny_models)
