"""`python -m rlkd.prune`: a student cut from the teacher by layer, MLP-channel and head-group importance. The cut model
reloads as an HF model of the new shape and generates (the KV cache is indexed by the new layer numbers); a
layer that does nothing is the one dropped; a 151,936-row Qwen2 keeps its embedding and LM head whole."""
import json

import pytest
import torch

from rlkd.models import load_model, load_tokenizer
from rlkd.prune import main
from rlkd.sampling import hf_generate


def _prune(tmp_path, model_dir, *args):
    out = tmp_path / "pruned"
    assert main(["--model", str(model_dir), "--out", str(out), "--calib-rows", "32", *args]) == 0
    return out, json.loads((out / "prune.json").read_text())


def test_cut_llama_reloads_and_generates(tmp_path, tiny_models, tiny_data):
    width = load_model(tiny_models[0]).config.intermediate_size
    out, summary = _prune(tmp_path, tiny_models[0], "--layers", "1", "--mlp-ratio", "0.5", "--head-ratio", "0.5")
    model = load_model(out)
    assert model.config.num_hidden_layers == 1 and model.config.intermediate_size == round(width / 2)
    c = model.config  # 2 heads of 32 (multi-head attention: each head is its own group) -> 1
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (1, 1, 32)
    assert summary["kept_layers"] in ([0], [1]) and summary["parameters_after"] < summary["parameters_before"]
    tok, data = tiny_data
    responses, logprobs = hf_generate(model, [d.prompt_ids for d in data[:4]], tok.pad_token_id, tok.eos_token_id, 6)
    assert all(1 <= len(r) <= 6 for r in responses) and all(torch.isfinite(torch.tensor(x)).all() for x in logprobs)
    assert len(load_tokenizer(out)) == len(tok)


def _with_identity_layer(tmp_path):
    """The shipped skills teacher (trained: every layer matters) with a layer inserted after layer 1 that adds
    nothing to the residual stream, and skills rows to calibrate on."""
    import copy

    from rlkd.tasks import skills
    from rlkd.tasks.teacher import SHIPPED_TEACHER

    model = load_model(SHIPPED_TEACHER)
    layers = list(model.model.layers)
    idle = copy.deepcopy(layers[1])
    with torch.no_grad():
        idle.self_attn.o_proj.weight.zero_()
        idle.mlp.down_proj.weight.zero_()
    model.model.layers = torch.nn.ModuleList(layers[:2] + [idle] + layers[2:])
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    model.config.num_hidden_layers = len(model.model.layers)
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:1] * len(model.model.layers)
    model.save_pretrained(str(tmp_path / "five"))
    load_tokenizer(SHIPPED_TEACHER).save_pretrained(str(tmp_path / "five"))
    assert skills.main(["--out", str(tmp_path / "suite"), "--train", "64", "--val", "8", "--test", "8"]) == 0
    return tmp_path / "five", tmp_path / "suite" / "train.jsonl"


@pytest.mark.parametrize("metric", ["loss", "influence"])
def test_the_layer_that_does_nothing_is_dropped(tmp_path, metric):
    five, data = _with_identity_layer(tmp_path)
    _, summary = _prune(tmp_path, five, "--layers", "4", "--depth-metric", metric, "--data", str(data))
    assert summary["kept_layers"] == [0, 1, 3, 4]
    assert abs(summary["layer_scores"][2]) < 1e-5  # skipping it changes nothing


def test_qwen2_with_151k_rows_keeps_its_embedding(tmp_path, tiny_models):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = load_tokenizer(tiny_models[1])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=151_936, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=128, tie_word_embeddings=False,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.save_pretrained(str(tmp_path / "qwen"))
    tok.save_pretrained(str(tmp_path / "qwen"))
    out, summary = _prune(tmp_path, tmp_path / "qwen", "--keep-layers", "0,2", "--mlp-ratio", "0.25")
    cut = load_model(out)
    assert summary["kept_layers"] == [0, 2] and cut.config.num_hidden_layers == 2
    assert cut.lm_head.weight.shape == (151_936, 64) and cut.config.intermediate_size == 32
    assert len(cut.config.layer_types) == 2
    before = model.model.layers[2].mlp.down_proj.weight
    after = cut.model.layers[1].mlp.down_proj.weight  # layer 2's most active channels, in order
    assert after.shape == (64, 32) and all(any(torch.equal(c, b) for b in before.T) for c in after.T)


def test_qwen2_head_groups_the_idle_group_is_dropped(tmp_path, tiny_models, tiny_data):
    """Grouped-query attention (4 query heads, 2 KV heads): --head-ratio 0.5 keeps one KV group with its two
    query heads. Group 0's output projection is zeroed, so group 1 is kept in every layer, its q/k/v rows and
    o_proj columns copied exactly; the cut model reloads with head_dim written out, and generates."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok, data = tiny_data
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, :32].zero_()  # query heads 0 and 1: group 0 adds nothing
    model.save_pretrained(str(tmp_path / "gqa"))
    tok.save_pretrained(str(tmp_path / "gqa"))
    out, summary = _prune(tmp_path, tmp_path / "gqa", "--layers", "2", "--head-ratio", "0.5")
    cut = load_model(out)
    c = cut.config
    assert summary["kept_head_groups"] == [[1], [1]] and summary["kv_heads"] == 1
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 1, 16)
    for old, new in zip(model.model.layers, cut.model.layers):
        a, b = old.self_attn, new.self_attn
        assert torch.equal(b.q_proj.weight, a.q_proj.weight[32:]) and torch.equal(b.q_proj.bias, a.q_proj.bias[32:])
        assert torch.equal(b.k_proj.weight, a.k_proj.weight[16:]) and torch.equal(b.v_proj.weight, a.v_proj.weight[16:])
        assert torch.equal(b.o_proj.weight, a.o_proj.weight[:, 32:])
    prompts = [d.prompt_ids for d in data[:4]]
    batch = torch.tensor([p[:8] for p in prompts])
    with torch.no_grad():  # group 0 contributed nothing, so the cut model computes the same function
        assert torch.allclose(cut(batch).logits, model(batch).logits, atol=1e-5)
    responses, _ = hf_generate(cut, prompts, tok.pad_token_id, tok.eos_token_id, 4)
    assert all(1 <= len(r) <= 4 for r in responses)


@pytest.mark.parametrize("args,words", [
    (["--layers", "0"], "--layers=0 is invalid"),
    (["--keep-layers", "0,9"], "--keep-layers='0,9' is invalid"),
    (["--mlp-ratio", "0"], "--mlp-ratio=0.0 is invalid"),
    (["--head-ratio", "1.5"], "--head-ratio=1.5 is invalid"),
    (["--layers", "1", "--keep-layers", "0"], "exclude each other"),
])
def test_bad_arguments_are_one_line(tmp_path, tiny_models, capsys, args, words):
    assert main(["--model", str(tiny_models[0]), "--out", str(tmp_path / "o"), "--calib-rows", "8", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and not (tmp_path / "o").exists()


def test_a_model_without_llama_layers_is_one_line(tmp_path, tiny_models, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer(tiny_models[1])
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path / "g")
    tok.save_pretrained(tmp_path / "g")
    capsys.readouterr()  # the save's progress bar
    assert main(["--model", str(tmp_path / "g"), "--out", str(tmp_path / "o"), "--calib-rows", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cuts Llama-style decoders" in err[0] and "GPT2LMHeadModel" in err[0]


def test_a_config_can_name_a_pruned_student(tmp_path):
    """model.prune_layers: the student is cut from the teacher at start, on labelled rows only, and cached."""
    import json

    from transformers import AutoConfig

    from rlkd.config import load_config
    from rlkd.prepare import prepare

    cfg = load_config("configs/smoke.yaml", [f"model.cache_dir={tmp_path}", "model.prune_layers=1",
                                             "data.labelled_rows=100"])
    logs = []
    prep = prepare(cfg, log=logs.append)
    assert prep.student_dir.name.startswith("pruned-student-")
    assert AutoConfig.from_pretrained(prep.student_dir).num_hidden_layers == 1
    assert json.loads((prep.student_dir / "prune.json").read_text())["calibration_rows"] == 100
    again = prepare(cfg, log=logs.append)
    assert again.student_dir == prep.student_dir and any("reusing cached" in x and "pruned" in x for x in logs)


def test_label_scarce_rows_go_only_to_methods_that_train_on_answers():
    from types import SimpleNamespace

    from rlkd.config import ConfigError, load_config
    from rlkd.launch import _method_on_its_rows

    for method, rows in (("sft", 512), ("fkl", 512), ("okd", 512), ("opd", 4000), ("seqkd", 4000), ("ammd", 4000)):
        prep = SimpleNamespace(train=list(range(4000)))
        _method_on_its_rows(load_config(None, [f"algo.method={method}", "data.labelled_rows=512"]), prep,
                            lambda *a: None)
        assert len(prep.train) == rows, method
    prep = SimpleNamespace(train=list(range(100)))
    with pytest.raises(ConfigError, match="data.labelled_rows=512 is invalid: at most the 100 train rows"):
        _method_on_its_rows(load_config(None, ["data.labelled_rows=512"]), prep, lambda *a: None)
