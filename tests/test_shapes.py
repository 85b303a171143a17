"""Real-model shapes on CPU, without Ray: a 151,665-token vocabulary with padded embedding rows (151,936 in
the Qwen2 student, 152,064 in the Llama teacher, as in Qwen2.5-0.5B / 7B), the learner's logits at
response positions only, and teacher scores computed in row chunks and shipped small."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from actors.engines import scores_from_logits, topk_with_tail
from rlkd.batch import SequenceBatch, TeacherScores
from rlkd.forward import response_forward

VOCAB, STUDENT_ROWS, TEACHER_ROWS = 151_665, 151_936, 152_064


def _model(arch: str, rows: int):
    torch.manual_seed(0)
    kw = dict(vocab_size=rows, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=64)
    return (Qwen2ForCausalLM(Qwen2Config(**kw)) if arch == "qwen2" else LlamaForCausalLM(LlamaConfig(**kw))).eval()


def _batch():
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 3)]
    responses = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (4, 2)]
    return SequenceBatch.collate(prompts, responses, pad_id=0)


@pytest.mark.parametrize("arch,rows", [("qwen2", STUDENT_ROWS), ("llama", TEACHER_ROWS)])
def test_response_logits_only_at_response_positions(arch, rows):
    model, batch = _model(arch, rows), _batch()
    with torch.no_grad():
        logits, hidden = response_forward(model, batch, VOCAB, with_hidden=True)
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, output_hidden_states=True).logits
    p, r = batch.prompt_width, batch.responses.shape[1]
    assert logits.shape == (2, r, VOCAB) and logits.dtype == torch.float32  # padding rows sliced away
    assert torch.allclose(logits, full[:, p - 1:p - 1 + r, :VOCAB], atol=1e-5)
    assert hidden.shape == (2, r, 64)


def test_teacher_scores_in_row_chunks_match_the_full_computation():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, VOCAB, generator=g) * 3
    responses = torch.randint(0, VOCAB, (5, 3), generator=g)
    logp = torch.log_softmax(logits / 0.8, -1)
    full = scores_from_logits(logits, responses, 0.8, topk=0, rows_per_chunk=2)
    assert torch.allclose(full.logp, logp, atol=1e-6) and full.index is None
    top = scores_from_logits(logits, responses, 0.8, topk=64, rows_per_chunk=2)
    ref = topk_with_tail(logp, 64)
    assert top.index.dtype == torch.int32 and top.logp.shape == (5, 3, 64)
    assert torch.equal(top.index.long(), ref.index) and torch.allclose(top.logp, ref.logp, atol=1e-6)
    # exact on their support: the top-k values are the full log-probs at those ids, the tail the rest
    assert torch.allclose(top.logp, logp.gather(-1, top.index.long()), atol=1e-6)
    rest = 1 - logp.gather(-1, top.index.long()).exp().sum(-1)
    assert torch.allclose(top.tail.exp(), rest, atol=2e-4)  # 1 - sum in fp32 is the less exact side
    assert torch.allclose(top.token_logp, logp.gather(-1, responses.unsqueeze(-1)).squeeze(-1), atol=1e-6)


def test_scores_ship_small_and_arrive_ready():
    logits, responses = torch.randn(2, 3, VOCAB), torch.zeros(2, 3, dtype=torch.long)
    shipped = scores_from_logits(logits, responses, 1.0, topk=64, dtype=torch.bfloat16)
    bytes_per_token = sum(t.element_size() * t[0, 0].numel() for t in (shipped.logp, shipped.index)) + 4 + 4
    assert shipped.logp.dtype == torch.bfloat16 and bytes_per_token == 64 * (2 + 4) + 8  # vs 4 * V for full fp32
    ready = shipped.to("cpu")
    assert ready.logp.dtype == torch.float32 and ready.index.dtype == torch.int64
    assert isinstance(ready, TeacherScores) and ready.hidden is None


def test_sampling_never_reaches_padding_rows():
    """The padding rows' logits are made the largest: every sampler still stays below the tokenizer."""
    from actors.mixed_generate import mixed_generate
    from rlkd.sampling import hf_generate

    student, teacher = _model("qwen2", STUDENT_ROWS), _model("llama", TEACHER_ROWS)
    for m in (student, teacher):
        m.get_output_embeddings().register_forward_hook(
            lambda mod, inp, out: out.index_add(-1, torch.arange(VOCAB, out.shape[-1]),
                                                torch.full(out.shape[:-1] + (out.shape[-1] - VOCAB,), 100.0)))
    prompts = [[5, 6, 7], [8, 9]]
    unsafe, _ = hf_generate(student, prompts, 0, 1, 4, seed=0)
    assert all(t >= VOCAB for r in unsafe for t in r)  # the hook works: unrestricted sampling hits padding
    for model in (student, teacher):
        out, logprobs = hf_generate(model, prompts, 0, 1, 4, seed=0, vocab_size=VOCAB)
        assert all(0 <= t < VOCAB for r in out for t in r) and all(lp <= 0 for r in logprobs for lp in r)
    mixed, _, _ = mixed_generate(student, teacher, prompts, 0, 1, VOCAB, 4, 0.5, 1.0, 0)
    assert all(0 <= t < VOCAB for r in mixed for t in r)


def _tokenizer(path, words, specials):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<eos>", "<pad>", "<unk>", *words])},
                                      unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.save_pretrained(str(path))
    (path / "config.json").write_text("{}")


def test_tokenizers_compare_what_matters(tmp_path):
    from rlkd.config import ConfigError
    from rlkd.models import check_same_tokenizer

    base = ["a", "b", "c"]
    _tokenizer(tmp_path / "t", base, ["<|reserved_0|>"])
    _tokenizer(tmp_path / "renamed", base, ["<|reserved_special_0|>"])  # Llama 3.1 -> 3.2 style
    _tokenizer(tmp_path / "swapped", ["b", "a", "c"], ["<|reserved_0|>"])
    _tokenizer(tmp_path / "longer", base + ["d"], ["<|reserved_0|>"])
    warnings = []
    assert check_same_tokenizer(tmp_path / "t", tmp_path / "renamed", log=warnings.append) == 7
    assert len(warnings) == 1 and "named differently" in warnings[0]
    for other, words in (("swapped", "different ids"), ("longer", "7 vs 8 tokens")):
        with pytest.raises(ConfigError, match=words):
            check_same_tokenizer(tmp_path / "t", tmp_path / other)


@pytest.mark.parametrize("network", ["linear", "mlp", "logratio"])
def test_critic_at_top_k_ids_equals_the_full_critic_gathered(network):
    from learners.critic import CriticHeads

    torch.manual_seed(0)
    heads = CriticHeads(16, 1000, ("on",), network, bound=1.0)
    if network == "logratio":
        heads.ratio_weight["on"].data.fill_(0.7)
    hidden, index = torch.randn(2, 3, 16), torch.randint(0, 1000, (2, 3, 8))
    ratio = torch.randn(2, 3, 1000)
    full = heads("on", hidden, log_ratio=ratio)
    top = heads("on", hidden, index, log_ratio=ratio.gather(-1, index))
    assert top.shape == (2, 3, 8) and torch.allclose(top, full.gather(-1, index), atol=1e-6)
