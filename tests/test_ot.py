"""Word-region alignment by optimal transport (cacr/ot.py) against a per-pair loop."""
import torch

from cacr.ot import cosine_cost, ipot_plan, ot_distance, wra_loss


def loop_ipot(cost, beta=0.5, iters=50):
    """IPOT on one unpadded (T, K) cost, written out as in Xie et al. (2019), Algorithm 1."""
    n, m = cost.shape
    mu, nu = torch.full((n,), 1.0 / n, dtype=cost.dtype), torch.full((m,), 1.0 / m, dtype=cost.dtype)
    G = torch.exp(-cost / beta)
    T = torch.ones(n, m, dtype=cost.dtype)
    b = nu.clone()
    for _ in range(iters):
        Q = G * T
        a = mu / (Q @ b)
        b = nu / (Q.T @ a)
        T = torch.diag(a) @ Q @ torch.diag(b)
    return T


def ragged(seed, B=5, d=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(2, 9, (B,), generator=g)
    k = torch.randint(1, 12, (B,), generator=g)
    words = torch.randn(B, int(t.max()), d, generator=g, dtype=dtype)
    regions = torch.randn(B, int(k.max()), d, generator=g, dtype=dtype)
    wm = torch.arange(words.shape[1])[None] < t[:, None]
    rm = torch.arange(regions.shape[1])[None] < k[:, None]
    words[~wm] = 1e3  # padding must not matter, however large
    regions[~rm] = -1e3
    return words, regions, wm, rm, t, k


def test_batched_plan_equals_the_loop_on_ragged_pairs():
    words, regions, wm, rm, t, k = ragged(0)
    plan = ipot_plan(cosine_cost(words, regions), wm, rm)
    for i in range(len(t)):
        ref = loop_ipot(cosine_cost(words[i:i + 1, :t[i]], regions[i:i + 1, :k[i]])[0])
        torch.testing.assert_close(plan[i, :t[i], :k[i]], ref, rtol=1e-9, atol=1e-12)
        assert plan[i, t[i]:].abs().sum() == 0 and plan[i, :, k[i]:].abs().sum() == 0


def test_plan_has_the_uniform_marginals():
    words, regions, wm, rm, t, k = ragged(1)
    plan = ipot_plan(cosine_cost(words, regions), wm, rm, iters=200)
    for i in range(len(t)):
        # each iteration ends with the column scaling: columns exact, rows converging
        torch.testing.assert_close(plan[i].sum(0)[:k[i]], torch.full((int(k[i]),), 1 / int(k[i]), dtype=plan.dtype), atol=1e-12, rtol=0)
        torch.testing.assert_close(plan[i].sum(1)[:t[i]], torch.full((int(t[i]),), 1 / int(t[i]), dtype=plan.dtype), atol=1e-4, rtol=0)


def test_distance_and_gradient_equal_the_loop():
    words, regions, wm, rm, t, k = ragged(2)
    words.requires_grad_(True)
    regions.requires_grad_(True)
    d = ot_distance(words, regions, wm, rm)
    d.sum().backward()
    gw, gr = words.grad.clone(), regions.grad.clone()
    for i in range(len(t)):
        w = words[i, :t[i]].detach().clone().requires_grad_(True)
        r = regions[i, :k[i]].detach().clone().requires_grad_(True)
        c = cosine_cost(w[None], r[None])[0]
        di = (loop_ipot(c.detach()) * c).sum()
        di.backward()
        torch.testing.assert_close(d[i], di, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gw[i, :t[i]], w.grad, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(gr[i, :k[i]], r.grad, rtol=1e-7, atol=1e-10)
        assert gw[i, t[i]:].abs().sum() == 0 and gr[i, k[i]:].abs().sum() == 0


def test_aligned_pairs_are_closer_and_the_loss_rewards_them():
    g = torch.Generator().manual_seed(3)
    regions = torch.randn(4, 6, 32, generator=g, dtype=torch.float64)
    perm = torch.stack([torch.randperm(6, generator=g) for _ in range(4)])
    words = torch.gather(regions, 1, perm[..., None].expand(-1, -1, 32)) + 0.05 * torch.randn(4, 6, 32, generator=g, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    matched = ot_distance(words, regions, mask, mask)
    shuffled = ot_distance(words, regions.roll(1, dims=0), mask, mask)
    assert (matched < 0.1).all() and (shuffled > 0.5).all()
    both = torch.cat([words, words]), torch.cat([regions, regions.roll(1, dims=0)])
    pos = torch.tensor([True] * 4 + [False] * 4)
    loss = wra_loss(*both, torch.cat([mask, mask]), torch.cat([mask, mask]), pos)
    torch.testing.assert_close(loss, matched.mean() - shuffled.mean())
    assert wra_loss(words, regions, mask, mask, torch.zeros(4, dtype=torch.bool)) == -matched.mean()
