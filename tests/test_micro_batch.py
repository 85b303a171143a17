"""Bounded learner memory: micro-batches with gradient accumulation, and the chunked logsumexp that
replaces the full fp32 log-softmax. Built in-process (no Ray): one gloo rank."""
import pytest
import torch

from rlkd import forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logsumexp_matches_torch(monkeypatch, dtype):
    monkeypatch.setattr(forward, "LSE_ROWS", 3)  # 2 x 5 = 10 positions: 4 chunks, the last one short
    x = (torch.randn(2, 5, 300) * 4).to(dtype).requires_grad_()
    ref_x = x.detach().float().requires_grad_()
    w = torch.randn(2, 5)
    out, ref = forward.logsumexp(x), torch.logsumexp(ref_x, -1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    assert x.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x.grad.float(), ref_x.grad, rtol=tol, atol=tol)


def test_student_forward_gathers_equal_the_full_log_softmax():
    from rlkd.batch import StudentForward, TeacherScores

    logits = torch.randn(2, 4, 50)
    index = torch.randint(0, 50, (2, 4, 6))
    targets = torch.randint(0, 50, (2, 4))
    full = StudentForward(logits.log_softmax(-1), targets, torch.ones(2, 4), TeacherScores(torch.zeros(2, 4, 6), index))
    lazy = StudentForward(logits, targets, torch.ones(2, 4), TeacherScores(torch.zeros(2, 4, 6), index),
                          lse=forward.logsumexp(logits))
    torch.testing.assert_close(lazy.support_logp(), full.support_logp())
    torch.testing.assert_close(lazy.token_logp, full.token_logp)
    torch.testing.assert_close(lazy.logp, full.logp)


def _worker(student_dir, v, micro, critic_heads=(), zero=0, checkpointing=False):
    from learners.worker import LearnerWorker, free_port

    w = LearnerWorker(0, 1)
    w.setup("127.0.0.1", free_port(), str(student_dir), v, zero, 1e-2, 1e-2, 0.0, 1.0, critic_heads=critic_heads,
            seed=0, micro_batch_size=micro, gradient_checkpointing=checkpointing)
    return w


def _batch(tok, rows, teacher_dir, v, topk):
    from actors.engines import EngineSpec
    from actors.teacher import TeacherActor
    from rlkd.batch import SequenceBatch

    batch = SequenceBatch.collate([r.prompt_ids for r in rows], [r.response_ids for r in rows], tok.pad_token_id)
    spec = EngineSpec(str(teacher_dir), tok.pad_token_id, tok.eos_token_id, vocab_size=v)
    scores = TeacherActor(spec, "hf", topk=topk).score(batch)
    return batch, scores


@pytest.mark.parametrize("method,zero", [("gkd", 0), ("gkd", 2), ("ammd", 0)])
def test_four_micro_batches_take_the_same_step_as_one(method, zero, tiny_models, tiny_data):
    """8 rows at once vs 4 micro-batches of 2: the same metrics and the same weights after the step
    (ZeRO-2 included: DeepSpeed reduces the accumulated gradients only at the boundary)."""
    from rlkd.algorithms import build_method
    from rlkd.config import load_config

    (teacher_dir, student_dir), (tok, rows) = tiny_models, tiny_data
    v = len(tok)
    m = build_method(load_config(None, [f"algo.method={method}", "algo.ammd.critic_input=student"]).algo, 0, 1)
    batch, scores = _batch(tok, rows[:8], teacher_dir, v, topk=16)
    names = ("on", "off") if method == "ammd" else ("train",)
    n_tokens = {k: float(batch.response_mask.sum()) for k in names}
    results = []
    for micro in (None, 2):
        w = _worker(student_dir, v, micro, m.critic_heads, zero)
        before = {k: p.detach().clone() for k, p in w.student.module.named_parameters()}
        w.load_batch({k: batch for k in names}, {k: scores for k in names}, n_tokens)
        assert len(w.slots["step"]) == (1 if micro is None else 4)
        if method == "ammd":
            w.train(m.critic_objective, "critic")
            metrics = w.train(m.policy_objective, "student")
        else:
            metrics = w.train(m.policy_objective, "student")
        results.append((metrics, {k: p.detach().clone() for k, p in w.student.module.named_parameters()}))
    (m1, p1), (m4, p4) = results
    for k in m1:
        if not k.startswith(("collapse/", "memory/")):  # the detectors read the first micro-batch only
            assert m4[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), k
    for k in p1:
        torch.testing.assert_close(p4[k], p1[k], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(p1[k], before[k]) for k in p1)  # the step moved the weights


def test_gradient_checkpointing_takes_the_same_step(tiny_models, tiny_data):
    from rlkd.algorithms import build_method
    from rlkd.config import load_config

    (teacher_dir, student_dir), (tok, rows) = tiny_models, tiny_data
    m = build_method(load_config(None, ["algo.method=fkl"]).algo, 0, 1)
    batch, scores = _batch(tok, rows[:4], teacher_dir, len(tok), topk=0)
    weights = []
    for checkpointing in (False, True):
        w = _worker(student_dir, len(tok), None, checkpointing=checkpointing)
        assert w.student.module.is_gradient_checkpointing == checkpointing
        w.load_batch({"train": batch}, {"train": scores}, {"train": float(batch.response_mask.sum())})
        w.train(m.policy_objective, "student")
        weights.append({k: p.detach().clone() for k, p in w.student.module.named_parameters()})
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-5, atol=1e-7)


def test_micro_batch_size_is_validated():
    from rlkd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="learner.micro_batch_size"):
        load_config(None, ["learner.micro_batch_size=0"])
