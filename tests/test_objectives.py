"""Method objectives (OKD, MiniLLM, the gold-data divergences) against brute-force loops on a tiny
vocabulary, values and gradients; and the data schedules of GKD, ImitKD and DistiLLM."""
import math
from functools import partial

import pytest
import torch

from rlkd.batch import SequenceBatch, StudentForward, TeacherScores
from rlkd.objectives import (
    ObjectiveContext,
    divergence_objective,
    minillm_objective,
    okd_objective,
)
from rlkd.schedules import (
    GOLD,
    REPLAY,
    ROLLOUT,
    TEACHER_GEN,
    AdaptiveSGO,
    OnPolicyMix,
    ReplayBuffer,
)

B, R, V = 2, 4, 5
MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)


def _logits(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, R, V, generator=g, dtype=torch.float64, requires_grad=True)


def _targets(seed=9):
    return torch.randint(0, V, (B, R), generator=torch.Generator().manual_seed(seed))


def _tokens():
    return [(b, t) for b in range(B) for t in range(R) if MASK[b, t]]


def _kl(x, y):  # lists of probabilities (tensors) -> Σ x log(x/y)
    return sum(x[a] * (torch.log(x[a]) - torch.log(y[a])) for a in range(V))


@pytest.mark.parametrize("student_loss", ["fkl", "rkl", "jsd"])
def test_okd_objective_brute_force_and_gradient_routing(student_loss):
    s_logits, ta_logits, alpha, beta = _logits(1), _logits(2), 0.7, 0.5
    targets = _targets()
    f = StudentForward(s_logits.log_softmax(-1), targets, MASK, adapted_logp=ta_logits.log_softmax(-1))
    ctx = ObjectiveContext({"train": MASK.sum().item()})
    loss, metrics = okd_objective({"train": f}, ctx, alpha=alpha, student_loss=student_loss, jsd_beta=beta)

    qs, qt = s_logits.softmax(-1), ta_logits.softmax(-1)
    t_ref = s_ref = 0.0
    for b, t in _tokens():
        ps, pt = [qs[b, t, a] for a in range(V)], [qt[b, t, a] for a in range(V)]
        ps_const = [x.detach() for x in ps]
        pt_const = [x.detach() for x in pt]
        t_ref = t_ref + alpha * _kl(ps_const, pt) - (1 - alpha) * torch.log(pt[targets[b, t]])
        if student_loss == "fkl":
            s_ref = s_ref + _kl(pt_const, ps)
        elif student_loss == "rkl":
            s_ref = s_ref + _kl(ps, pt_const)
        else:
            m = [beta * pt_const[a] + (1 - beta) * ps[a] for a in range(V)]
            s_ref = s_ref + beta * _kl(pt_const, m) + (1 - beta) * _kl(ps, m)
    n = len(_tokens())
    t_ref, s_ref = t_ref / n, s_ref / n
    assert torch.allclose(loss["teacher"], t_ref) and torch.allclose(loss["student"], s_ref)
    assert metrics["loss/student"].item() == pytest.approx(s_ref.item())
    g_t = torch.autograd.grad(loss["teacher"], (s_logits, ta_logits), retain_graph=True, allow_unused=True)
    g_s = torch.autograd.grad(loss["student"], (s_logits, ta_logits), retain_graph=True, allow_unused=True)
    assert g_t[0] is None and g_s[1] is None  # each loss reaches only its own model
    assert torch.allclose(g_t[1], torch.autograd.grad(t_ref, ta_logits, retain_graph=True)[0])
    assert torch.allclose(g_s[0], torch.autograd.grad(s_ref, s_logits, retain_graph=True)[0])


def test_okd_trust_region_and_drift_metrics_brute_force():
    """trust_kl adds trust_kl * KL(p_ta ‖ p_frozen) to the teacher's loss (gradient to the LoRA side only);
    the drift metrics are that KL and the share of tokens whose argmax both teachers agree on."""
    s_logits, ta_logits, fr_logits, trust = _logits(1), _logits(2), _logits(3).detach(), 0.3
    targets = _targets()
    f = StudentForward(s_logits.log_softmax(-1), targets, MASK, adapted_logp=ta_logits.log_softmax(-1),
                       frozen_logp=fr_logits.log_softmax(-1))
    ctx = ObjectiveContext({"train": MASK.sum().item()})
    base, _ = okd_objective({"train": f}, ctx, alpha=0.5)
    loss, metrics = okd_objective({"train": f}, ctx, alpha=0.5, trust_kl=trust)
    qt, qf = ta_logits.softmax(-1), fr_logits.softmax(-1)
    kl = sum(_kl([qt[b, t, a] for a in range(V)], [qf[b, t, a] for a in range(V)]) for b, t in _tokens())
    agree = sum(float(qt[b, t].argmax() == qf[b, t].argmax()) for b, t in _tokens())
    n = len(_tokens())
    assert metrics["okd/teacher_drift_kl"].item() == pytest.approx(kl.item() / n, rel=1e-5)
    assert metrics["okd/teacher_top1_agree"].item() == pytest.approx(agree / n)
    assert torch.allclose(loss["teacher"], base["teacher"] + trust * kl / n)
    assert torch.allclose(loss["student"], base["student"])
    g = torch.autograd.grad(loss["teacher"] - base["teacher"], ta_logits, retain_graph=True)[0]
    assert torch.allclose(g, torch.autograd.grad(trust * kl / n, ta_logits, retain_graph=True)[0])


def test_minillm_objective_brute_force():
    gamma, clip, reward_clip = 0.9, 0.2, 1.5
    s_logits, t_logits = _logits(3), _logits(4).detach()
    targets = _targets(5)
    logp = s_logits.log_softmax(-1)
    t_logp = t_logits.log_softmax(-1)
    g = torch.Generator().manual_seed(6)
    old = (logp.gather(-1, targets[..., None])[..., 0] + 0.2 * torch.randn(B, R, generator=g)).detach()
    behavior = (old + 0.3 * torch.randn(B, R, generator=g)).clamp(max=0)
    teacher = TeacherScores(t_logp, token_logp=t_logp.gather(-1, targets[..., None])[..., 0])
    f = StudentForward(logp, targets, MASK, teacher, behavior_logprobs=behavior, old_logp=old)
    n = MASK.sum().item()
    loss, m = minillm_objective({"on": f}, ObjectiveContext({"on": n}), gamma=gamma, clip=clip, single_step_reg=True,
                                length_norm=True, whiten_returns=True, reward_clip=reward_clip)

    returns = {}
    for b in range(B):
        length = int(MASK[b].sum())
        r = [min(max((teacher.token_logp[b, t] - old[b, t]).item(), -reward_clip), reward_clip) for t in range(length)]
        for t in range(length):
            returns[b, t] = sum(gamma ** (j - t) * r[j] for j in range(t, length)) / (length - t)
    vals = list(returns.values())
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals) + 1e-8)
    total = 0.0
    q = logp.exp()
    for (b, t), ret in returns.items():
        adv = (ret - mean) / std
        w = math.exp(old[b, t] - behavior[b, t])
        ratio = torch.exp(logp[b, t, targets[b, t]] - old[b, t]) * w
        clipped = ratio.clamp(1 - clip, 1 + clip)
        pg = torch.maximum(-adv * ratio, -adv * clipped)
        reg = sum(q[b, t, a] * (logp[b, t, a] - t_logp[b, t, a]) for a in range(V))
        total = total + pg + reg
    ref = total / n
    assert torch.allclose(loss, ref)
    assert torch.allclose(torch.autograd.grad(loss, s_logits, retain_graph=True)[0],
                          torch.autograd.grad(ref, s_logits)[0])
    assert math.isfinite(m["loss/pg"].item()) and m["loss/reg"].item() > 0


@pytest.mark.parametrize("divergence,kw", [("tvd", {}), ("jsd", {"lam": 0.9}), ("gjsd", {"beta": 0.3}),
                                           ("sfkl", {"lam": 0.1}), ("srkl", {"lam": 0.1})])
def test_divergence_objective_is_the_token_mean_over_the_batch(divergence, kw):
    s_logits, t_logp = _logits(7), _logits(8).detach().log_softmax(-1)
    f = StudentForward(s_logits.log_softmax(-1), _targets(), MASK, TeacherScores(t_logp))
    loss, m = partial(divergence_objective, divergence=divergence, **kw)({"train": f}, ObjectiveContext({"train": 6.0}))
    # one token mean over all 6 response tokens of the batch (not a mean of per-sequence means)
    ref = sum(divergence_objective({"train": StudentForward(f.logp[b:b + 1, t:t + 1], f.targets[b:b + 1, t:t + 1],
                                                             MASK[b:b + 1, t:t + 1],
                                                             TeacherScores(t_logp[b:b + 1, t:t + 1]))},
                                   ObjectiveContext({"train": 1.0}), divergence, **kw)[0]
              for b, t in _tokens()) / 6
    assert torch.allclose(loss, ref) and m[f"loss/{divergence}"] == loss.detach()


# ---------------------------------------------------------------------------------------------
# schedules (pure Python: a recorder stands in for the controller, producing what each plan asks for)

class _Recorder:
    def __init__(self):
        self.calls = []

    def step(self, sched, step, n=2):
        plan = sched.plan(step)
        self.calls += [s for s in plan.values() if s != REPLAY]  # REPLAY costs no actor call
        made = {name: SequenceBatch.collate([[1, 2]] * n, [[step + 3, len(self.calls) + 3]] * n, 0)
                for name, source in plan.items() if source != REPLAY}
        return sched.settle(made, n, 0)


def test_on_policy_mix_fraction_and_off_source():
    src, sched = _Recorder(), OnPolicyMix(0.25, TEACHER_GEN, seed=0)
    for step in range(1, 401):
        src.step(sched, step)
    frac = src.calls.count(ROLLOUT) / len(src.calls)
    assert set(src.calls) == {ROLLOUT, TEACHER_GEN} and 0.18 < frac < 0.32
    assert OnPolicyMix(1.0, GOLD, 0).uses == {ROLLOUT} and OnPolicyMix(0.0, GOLD, 0).uses == {GOLD}


def test_imitkd_trains_on_replay_samples():
    src, sched = _Recorder(), OnPolicyMix(1.0, GOLD, seed=0, capacity=5)
    for step in range(1, 6):
        out = src.step(sched, step)
    assert src.calls == [ROLLOUT] * 5 and len(sched.buffer) == 5  # FIFO: capacity 5 sequences
    assert len(out["train"]) == 2 and out["train"].rollout_logprobs is None  # replayed: no fresh log-probs


def test_replay_buffer_is_fifo():
    buf = ReplayBuffer(3, seed=0)
    for i in range(5):
        buf.add(SequenceBatch.collate([[1]], [[10 + i]], 0))
    assert [r for _, r in buf.items] == [[12], [13], [14]]


def test_adaptive_sgo_branches_and_threshold():
    src = _Recorder()
    sched = AdaptiveSGO(init_threshold=0.0, loss_eps=0.1, capacity=4, total_steps=100, seed=0)
    for step in range(1, 11):
        src.step(sched, step)
    assert src.calls == [GOLD] * 10  # threshold 0: always gold
    sched.on_validation(2.0)
    sched.on_validation(2.05)  # rose by less than loss_eps: unchanged
    assert sched.threshold == 0.0
    for _ in range(10):  # each rise of >= eps adds 0.1, capped at 1
        sched.on_validation(sched.prev_loss + 0.1)
    assert sched.threshold == pytest.approx(1.0)
    src.calls.clear()
    for step in range(11, 31):
        src.step(sched, step)
    assert GOLD not in src.calls and src.calls[:2] == [ROLLOUT, ROLLOUT]  # fills the buffer first
    assert len(sched.buffer) == 4 and len(src.calls) < 20  # then also replays (no actor call)


def test_logratio_critic_reaches_a_larger_moment_gap_than_the_linear_one():
    """With a hidden state that carries nothing (one vector for every state), the linear critic can only
    play one f for all states; the 'logratio' critic also sees log p* - log q, learns a positive weight on it,
    and so finds a larger distance under the same L2 penalty: its function class holds the linear one's."""
    from learners.critic import CriticHeads
    from rlkd.objectives import ammd_critic_objective

    torch.manual_seed(0)
    p, q = torch.randn(B, R, V).log_softmax(-1), torch.randn(B, R, V).log_softmax(-1)
    hidden, ctx = torch.ones(B, R, 8), ObjectiveContext({"on": MASK.sum().item()})
    gaps = {}
    for network in ("linear", "logratio"):
        heads = CriticHeads(8, V, ("on",), network)
        opt = torch.optim.Adam(heads.parameters(), lr=0.05)
        for _ in range(300):
            f = StudentForward(q, _targets(), MASK.float(), TeacherScores(p), heads("on", hidden, log_ratio=p - q))
            loss, m = ammd_critic_objective({"on": f}, ctx, beta=0.0, l2=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        gaps[network] = -m["loss/critic"].item()
        if network == "logratio":
            assert heads.ratio_weight["on"].item() > 0.1
    assert gaps["logratio"] > 1.5 * gaps["linear"] > 0, gaps
