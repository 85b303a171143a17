"""Every loss against a brute-force loop over a tiny vocabulary: values and gradients."""
import dataclasses
import math

import pytest
import torch

from rlkd import losses
from rlkd.advantages import future_returns, whiten
from rlkd.algorithms import build_method
from rlkd.batch import StudentForward, TeacherScores
from rlkd.config import load_config
from rlkd.objectives import (
    ObjectiveContext,
    ammd_critic_objective,
    ammd_policy_objective,
)

B, R, V = 2, 3, 5
torch.manual_seed(0)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(B, R, V, generator=g, dtype=torch.float64, requires_grad=True)
    t_logp = torch.log_softmax(torch.randn(B, R, V, generator=g, dtype=torch.float64), -1)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    return s_logits, t_logp, mask


def _brute(per_token_fn, s_logits, t_logp, mask):
    """Σ over masked tokens of per_token_fn(p_list, q_list) / #tokens, with explicit loops."""
    total, n = 0.0, 0
    q_all = torch.softmax(s_logits, -1)
    for b in range(B):
        for t in range(R):
            if mask[b, t] == 0:
                continue
            p = [math.exp(t_logp[b, t, a].item()) for a in range(V)]
            q = [q_all[b, t, a] for a in range(V)]
            total = total + per_token_fn(p, q)
            n += 1
    return total / n


CASES = {
    "forward_kl": (losses.forward_kl, lambda p, q: sum(p[a] * (math.log(p[a]) - torch.log(q[a])) for a in range(V))),
    "reverse_kl": (losses.reverse_kl, lambda p, q: sum(q[a] * (torch.log(q[a]) - math.log(p[a])) for a in range(V))),
    "total_variation": (losses.total_variation, lambda p, q: 0.5 * sum(abs(p[a] - q[a]) for a in range(V))),
}


def _kl(x, y):
    """Σ_a x_a log(x_a / y_a) over python lists of scalars / 0-d tensors."""
    return sum(x[a] * (_log(x[a]) - _log(y[a])) for a in range(V))


def _log(v):
    return torch.log(v) if isinstance(v, torch.Tensor) else math.log(v)


def _mix(w, x, y):
    return [w * x[a] + (1 - w) * y[a] for a in range(V)]


for _beta in (0.0, 0.1, 0.5, 1.0):  # TRL: β KL(p‖m) + (1−β) KL(q‖m), m = βp + (1−β)q; endpoints special
    CASES[f"generalized_jsd_beta{_beta}"] = (
        lambda s, t, m, b=_beta: losses.generalized_jsd(s, t, m, beta=b),
        (lambda p, q: _kl(p, q)) if _beta == 0 else (lambda p, q: _kl(q, p)) if _beta == 1 else
        (lambda p, q, b=_beta: b * _kl(p, _mix(b, p, q)) + (1 - b) * _kl(q, _mix(b, p, q))))
for _lam in (0.5, 0.9):  # distillm: λ KL(q‖m) + (1−λ) KL(p‖m), m = (1−λ)p + λq
    CASES[f"js_distance_lam{_lam}"] = (
        lambda s, t, m, lam=_lam: losses.js_distance(s, t, m, lam=lam),
        lambda p, q, lam=_lam: lam * _kl(q, _mix(1 - lam, p, q)) + (1 - lam) * _kl(p, _mix(1 - lam, p, q)))
CASES["skew_forward_kl"] = (lambda s, t, m: losses.skew_forward_kl(s, t, m, lam=0.1),
                            lambda p, q: _kl(p, _mix(0.1, p, q)))  # KL(p ‖ 0.1p + 0.9q)
CASES["skew_reverse_kl"] = (lambda s, t, m: losses.skew_reverse_kl(s, t, m, lam=0.1),
                            lambda p, q: _kl(q, _mix(0.9, p, q)))  # KL(q ‖ 0.9p + 0.1q)


def test_jsd_conventions_agree():
    """distillm's λ is GKD's 1 − β (docs/algorithms.md#jsd)."""
    s_logits, t_logp, mask = _data(3)
    s = torch.log_softmax(s_logits, -1)
    for lam in (0.1, 0.5, 0.9):
        gkd = losses.generalized_jsd(s, t_logp, mask, 1 - lam)
        assert torch.allclose(losses.js_distance(s, t_logp, mask, lam), gkd)


def test_ppo_clip_matches_brute_force():
    g = torch.Generator().manual_seed(5)
    logp = torch.randn(B, R, generator=g, dtype=torch.float64, requires_grad=True)
    old = logp.detach() + 0.3 * torch.randn(B, R, generator=g, dtype=torch.float64)
    adv = torch.randn(B, R, generator=g, dtype=torch.float64)
    w = torch.rand(B, R, generator=g, dtype=torch.float64) + 0.5
    _, _, mask = _data()
    got = losses.ppo_clip(logp, old, adv, mask, clip=0.2, weights=w)
    (g_got,) = torch.autograd.grad(got, logp)
    total, n = 0.0, 0
    for b in range(B):
        for t in range(R):
            if mask[b, t]:
                ratio = torch.exp(logp[b, t] - old[b, t]) * w[b, t]
                clipped = ratio.clamp(0.8, 1.2)
                total, n = total + max(-adv[b, t] * ratio, -adv[b, t] * clipped), n + 1
    (g_ref,) = torch.autograd.grad(total / n, logp)
    assert torch.allclose(got, total / n) and torch.allclose(g_got, g_ref)
    assert (g_got[~mask.bool()] == 0).all()


@pytest.mark.parametrize("name", sorted(CASES))
def test_divergence_matches_brute_force(name):
    fn, per_token = CASES[name]
    s_logits, t_logp, mask = _data()
    got = fn(torch.log_softmax(s_logits, -1), t_logp, mask)
    (g_got,) = torch.autograd.grad(got, s_logits)
    ref = _brute(per_token, s_logits, t_logp, mask)
    (g_ref,) = torch.autograd.grad(ref, s_logits)
    assert torch.allclose(got, ref, atol=1e-10)
    assert torch.allclose(g_got, g_ref, atol=1e-10)


def test_sft_is_gold_token_cross_entropy():
    s_logits, _, mask = _data()
    targets = torch.tensor([[0, 4, 2], [1, 1, 3]])
    logp = torch.log_softmax(s_logits, -1)
    got = losses.sft(logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), mask)
    ref = sum(-logp[b, t, targets[b, t]] for b in range(B) for t in range(R) if mask[b, t]) / mask.sum()
    assert torch.allclose(got, ref)
    g1 = torch.autograd.grad(got, s_logits, retain_graph=True)[0]
    g2 = torch.autograd.grad(ref, s_logits)[0]
    assert torch.allclose(g1, g2)


def test_moment_distance_is_hand_computed_sum():
    """AMMD's distance equals Σ_a (p − q)(a)·f(a), token-averaged; gradients match too."""
    s_logits, t_logp, mask = _data()
    f = torch.empty(B, R, V, dtype=torch.float64).uniform_(-1, 1).requires_grad_()
    got = losses.token_mean(losses.moment_gap(torch.log_softmax(s_logits, -1), t_logp, f), mask)
    q_all = torch.softmax(s_logits, -1)
    total, n = 0.0, 0
    for b in range(B):
        for t in range(R):
            if mask[b, t]:
                total = total + sum((t_logp[b, t, a].exp() - q_all[b, t, a]) * f[b, t, a] for a in range(V))
                n += 1
    ref = total / n
    assert torch.allclose(got, ref, atol=1e-12)
    for x in (s_logits, f):
        assert torch.allclose(torch.autograd.grad(got, x, retain_graph=True)[0],
                              torch.autograd.grad(ref, x, retain_graph=True)[0], atol=1e-12)


def test_moment_distance_sup_over_bounded_critic_is_2c_tv():
    """With f free per state and |f| <= c, the sup equals 2c·TV (docs/algorithms.md#ammd)."""
    s_logits, t_logp, mask = _data()
    s_logp = torch.log_softmax(s_logits, -1).detach()
    c = 0.7
    f_star = c * torch.sign(t_logp.exp() - s_logp.exp())
    d = losses.token_mean(losses.moment_gap(s_logp, t_logp, f_star), mask)
    assert torch.allclose(d, 2 * c * losses.total_variation(s_logp, t_logp, mask))


def test_topk_support_is_exact_coarsened_divergence():
    s_logits, t_logp, mask = _data()
    k = 2
    vals, idx = t_logp.topk(k, -1)
    tail = torch.logsumexp(t_logp.scatter(-1, idx, float("-inf")), -1)
    s_logp = torch.log_softmax(s_logits, -1)
    s, t = losses.on_support(s_logp, TeacherScores(vals, idx, tail))
    got = losses.forward_kl(s, t, mask)

    def coarse(p, q, b, tt):
        keep = idx[b, tt].tolist()
        pk = [p[a] for a in keep] + [1 - sum(p[a] for a in keep)]
        qk = [q[a] for a in keep] + [1 - sum(q[a] for a in keep)]
        return sum(pk[i] * (math.log(pk[i]) - torch.log(qk[i])) for i in range(k + 1))

    total, n = 0.0, 0
    q_all = torch.softmax(s_logits, -1)
    for b in range(B):
        for tt in range(R):
            if mask[b, tt]:
                total = total + coarse([t_logp[b, tt, a].exp().item() for a in range(V)], q_all[b, tt], b, tt)
                n += 1
    ref = total / n
    assert torch.allclose(got, ref, atol=1e-9)
    assert torch.allclose(torch.autograd.grad(got, s_logits)[0], torch.autograd.grad(ref, s_logits)[0], atol=1e-9)


def test_full_vocab_topk_equals_full():
    s_logits, t_logp, mask = _data()
    s_logp = torch.log_softmax(s_logits, -1)
    vals, idx = t_logp.topk(V, -1)
    tail = torch.full(vals.shape[:-1], -1e30, dtype=vals.dtype)
    s, t = losses.on_support(s_logp, TeacherScores(vals, idx, tail), with_tail=False)
    assert torch.allclose(losses.reverse_kl(s, t, mask), losses.reverse_kl(s_logp, t_logp, mask))


def test_future_returns_brute_force():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    got = future_returns(r, m, gamma=0.9, include_current=False, length_normalize=True)
    for b in range(2):
        n = int(m[b].sum())
        for t in range(n):
            terms = [0.9 ** (j - t - 1) * r[b, j].item() for j in range(t + 1, n)]
            assert got[b, t].item() == pytest.approx(sum(terms) / max(1, len(terms)))
        assert got[b, n:].abs().sum() == 0
    inc = future_returns(r, m, gamma=1.0, include_current=True, length_normalize=False)
    assert inc[0, 0].item() == pytest.approx(10.0) and inc[1, 0].item() == pytest.approx(1.5)


def test_whiten_uses_global_stats_across_ranks():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    full = whiten(x, m)
    vals = x[m.bool()]
    assert torch.allclose(full[m.bool()], (vals - vals.mean()) / vals.std(unbiased=False), atol=1e-5)
    # two "ranks" holding one row each, stats summed by all_reduce -> same result
    parts = [(x[:1], m[:1]), (x[1:], m[1:])]
    stats = [torch.stack([(a * b).sum(), (a.square() * b).sum(), b.sum()]) for a, b in parts]
    total = stats[0] + stats[1]
    sharded = torch.cat([whiten(a, b, all_reduce=lambda s: total) for a, b in parts])
    assert torch.allclose(sharded, full)


def _fwd(seed, with_rollout):
    s_logits, t_logp, mask = _data(seed)
    g = torch.Generator().manual_seed(seed + 100)
    critic = torch.empty(B, R, V, dtype=torch.float64).uniform_(-1, 1, generator=g).requires_grad_()
    targets = torch.randint(0, V, (B, R), generator=g)
    logp = torch.log_softmax(s_logits, -1)
    return StudentForward(logp, targets, mask, TeacherScores(t_logp), critic), s_logits


def test_ammd_objectives_against_hand_formula():
    beta = 0.3
    on, s_on = _fwd(1, True)
    off, s_off = _fwd(2, False)
    ctx = ObjectiveContext({"on": on.mask.sum().item(), "off": off.mask.sum().item()})
    critic_loss, m = ammd_critic_objective({"on": on, "off": off}, ctx, beta=beta)

    def d(f):
        q = f.logp.exp()
        return (((f.teacher.logp.exp() - q) * f.critic).sum(-1) * f.mask).sum() / f.mask.sum()

    assert torch.allclose(critic_loss, -(beta * d(off) + (1 - beta) * d(on)))
    assert m["loss/critic"].item() == pytest.approx(critic_loss.item())
    policy, pm = ammd_policy_objective({"on": on, "off": off}, ctx, beta=beta, pg_coef=1.0, whiten_returns=False)
    gaps = ((on.teacher.logp.exp() - on.logp.exp()) * on.critic).sum(-1).detach()
    adv = torch.zeros_like(gaps)
    for b in range(B):
        n = int(on.mask[b].sum())
        for t in range(n):
            future = [-gaps[b, j] for j in range(t + 1, n)]
            adv[b, t] = sum(future) / max(1, len(future)) if future else 0.0
    pg = -(adv * on.token_logp * on.mask).sum() / on.mask.sum()
    ref = beta * d(off) + (1 - beta) * (d(on) + pg)
    assert torch.allclose(policy, ref)
    assert pm["ammd/d_on"].item() == pytest.approx(d(on).item())
    for x in (s_on, s_off):
        assert torch.allclose(torch.autograd.grad(policy, x, retain_graph=True)[0],
                              torch.autograd.grad(ref, x, retain_graph=True)[0])


def test_ammd_critic_l2_optimum_is_the_scaled_gap():
    """With the output penalty, the critic loss is stationary exactly at f = (p* − q)/(2·l2) (here l2 = 2)."""
    on, _ = _fwd(3, True)
    on = dataclasses.replace(on, scores=on.logp.detach())
    ctx = ObjectiveContext({"on": on.mask.sum().item()})
    gap = (on.teacher.logp.exp() - on.logp.exp()) / 4.0

    def grad_at(f0):
        u = torch.atanh(f0).requires_grad_()
        loss, m = ammd_critic_objective({"on": dataclasses.replace(on, critic=torch.tanh(u))}, ctx, beta=0.0, l2=2.0)
        assert m["ammd/critic_l2"].item() > 0
        return torch.autograd.grad(loss, u)[0][on.mask.bool()]

    assert grad_at(gap).abs().max() < 1e-7  # the penalty runs in fp32
    assert grad_at(2 * gap).abs().max() > 1e-4
    plain, _ = ammd_critic_objective({"on": on}, ctx, beta=0.0)
    assert torch.allclose(ammd_critic_objective({"on": on}, ctx, beta=0.0, l2=0.0)[0], plain)


def test_ammd_policy_reports_tv_saturation_and_anchor():
    on, _ = _fwd(4, True)
    off, _ = _fwd(5, False)
    ctx = ObjectiveContext({"on": on.mask.sum().item(), "off": off.mask.sum().item()})
    batches = {"on": on, "off": off}
    plain, m = ammd_policy_objective(batches, ctx, beta=0.5, pg_coef=1.0, whiten_returns=False)
    anchored, m2 = ammd_policy_objective(batches, ctx, beta=0.5, pg_coef=1.0, whiten_returns=False, anchor=0.3)
    kl = (off.teacher.logp.exp() * (off.teacher.logp - off.logp)).sum(-1)
    kl = (kl * off.mask).sum() / off.mask.sum()
    assert torch.allclose(anchored, plain + 0.3 * kl)
    tv = 0.5 * (on.teacher.logp.exp() - on.logp.exp()).abs().sum(-1)
    assert m["ammd/tv_on"].item() == pytest.approx(((tv * on.mask).sum() / on.mask.sum()).item())
    assert m["ammd/d_on"].item() <= 2 * m["ammd/tv_on"].item() + 1e-9  # |f| <= 1
    sat = (on.critic.abs() >= 0.99).double().mean(-1)
    assert m["ammd/critic_saturated_on"].item() == pytest.approx(((sat * on.mask).sum() / on.mask.sum()).item())
    assert "loss/anchor_fkl" in m2 and "loss/anchor_fkl" not in m


def _method(*overrides):
    return build_method(load_config(None, ["algo.method=ammd", *overrides]).algo)


def test_ammd_beta_extremes_drop_unused_batches():
    assert set(_method("algo.ammd.beta=0.0").schedule.sources) == {"on"}
    assert set(_method("algo.ammd.beta=1.0").schedule.sources) == {"off"}
    assert _method("algo.ammd.off_policy=gold").label == "ammd (gold off-policy data)"


def test_policy_gradient_importance_weights_for_stale_tokens():
    """A token sampled by a stale policy μ weighs min(q/μ, 2); with μ = q the surrogate is plain REINFORCE."""
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.1]])).requires_grad_()
    adv, mask = torch.tensor([[1.0, -1.0, 2.0]]), torch.ones(1, 3)
    plain = losses.policy_gradient(logp, adv, mask)
    assert torch.allclose(losses.policy_gradient(logp, adv, mask, behavior_logp=logp.detach()), plain)
    mu = torch.log(torch.tensor([[0.25, 0.4, 0.01]]))  # weights 2, 0.5, 10 -> capped at 2
    got = losses.policy_gradient(logp, adv, mask, behavior_logp=mu)
    want = -(torch.tensor([2.0, 0.5, 2.0]) * adv * logp).sum() / 3
    assert torch.allclose(got, want)
    assert torch.allclose(torch.autograd.grad(got, logp)[0], torch.autograd.grad(want, logp)[0])


def test_opd_expected_gradient_on_policy_is_the_reverse_kl_gradient():
    """Monte Carlo on a 7-token vocabulary: sample y ~ q_θ, take the gradient of OPD's objective (reward
    log p(y) − log q_sampler(y), truncated importance-sampling loss) for each sample, and average. On-policy
    the mean must equal the closed form ∇_θ KL(q_θ ‖ p), within 4 standard errors per coordinate (the update
    −∇ is then −∇KL). A one-token response's gradient depends only on its token, so each of the 7 is taken
    through the objective once and the N samples reuse them."""
    from rlkd.objectives import ObjectiveContext, opd_objective

    torch.manual_seed(0)
    V, N = 7, 200_000
    theta = torch.randn(V, requires_grad=True)
    p = torch.randn(V).log_softmax(-1)
    q = theta.log_softmax(-1)
    exact = torch.autograd.grad((q.exp() * (q - p)).sum(), theta)[0]

    def grad_for(token: int) -> torch.Tensor:
        y = torch.tensor([[token]])
        f = StudentForward(theta.log_softmax(-1).view(1, 1, V), y, torch.ones(1, 1),
                           TeacherScores(p.view(1, 1, V), token_logp=p[y]), rollout_logprobs=q.detach()[y])
        loss, _ = opd_objective({"on": f}, ObjectiveContext({"on": 1.0}))
        return torch.autograd.grad(loss, theta)[0]

    per_token = torch.stack([grad_for(a) for a in range(V)])  # (V, V): the gradient a sample of token a gives
    samples = per_token[torch.multinomial(q.detach().exp(), N, replacement=True)]
    mean, sem = samples.mean(0), samples.std(0) / math.sqrt(N)
    assert torch.all((mean - exact).abs() <= 4 * sem), (mean, exact, sem)
    assert (mean - exact).abs().max() < 0.02 * exact.abs().max()
    # off-policy (a stale sampler) the ratio is truncated at the cap: weight min(ρ, 2)
    f = StudentForward(q.view(1, 1, V), torch.tensor([[0]]), torch.ones(1, 1),
                       TeacherScores(p.view(1, 1, V), token_logp=p[:1].view(1, 1)),
                       rollout_logprobs=q.detach()[:1].view(1, 1) - math.log(5.0))  # ρ = 5
    loss, metrics = opd_objective({"on": f}, ObjectiveContext({"on": 1.0}))
    assert loss.item() == pytest.approx(-2.0 * metrics["opd/reward"].item(), rel=1e-5)
