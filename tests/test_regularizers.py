"""Tests of cacr/regularizers.py: relation blocks, CACR and IAIS losses, schedule and configs.

Fast paths are checked against slow twins on random ragged batches: the paper's Alg. 1
loop (soft_alignment_loss), per-example computation on unpadded slices, and the naive
block extraction written here; parity with the public code uses tests/fixtures/uniter_parity.pt.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cacr.regularizers import (
    NAMES,
    Regularizer,
    RelationBlocks,
    RelationLoss,
    cacr_loss,
    iais_loss,
    relation_blocks,
    schedule_weight,
    soft_alignment_loss,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "uniter_parity.pt"
CONF_LOSS = ROOT / "conf" / "loss"


def fast_losses():
    """(id, fn) for every batched loss and option combination worth checking."""
    return [
        ("cacr", lambda *a, **k: cacr_loss(*a, **k)),
        ("cacr_nosg", lambda *a, **k: cacr_loss(*a, stop_grad=False, **k)),
        ("cacr_sum", lambda *a, **k: cacr_loss(*a, row_reduction="sum", **k)),
        ("singular", lambda *a, **k: iais_loss(*a, variant="singular", **k)),
        ("singular_sum", lambda *a, **k: iais_loss(*a, variant="singular", row_reduction="sum", **k)),
        ("distributed", lambda *a, **k: iais_loss(*a, variant="distributed", **k)),
        ("distributed_sg", lambda *a, **k: iais_loss(*a, variant="distributed", stop_grad=True, **k)),
    ]


def ragged_blocks(seed, lens_n, lens_m, *, dtype=torch.float64, junk="random", sharp=1.0):
    """Row-stochastic blocks on valid entries, ``junk`` in padded rows/columns.

    junk: "random" (large values), "nonfinite" (NaN and +-inf mixed in), or "zero".
    """
    g = torch.Generator().manual_seed(seed)
    lens_n, lens_m = torch.tensor(lens_n), torch.tensor(lens_m)
    B, n, m = len(lens_n), int(lens_n.max()), int(lens_m.max())
    wm = torch.arange(n)[None] < lens_n[:, None]
    rm = torch.arange(m)[None] < lens_m[:, None]

    def block(rows, cols):
        r, c = rows.shape[1], cols.shape[1]
        x = (torch.randn(B, r, c, generator=g, dtype=dtype) * 2 * sharp)
        x = x.masked_fill(~cols[:, None, :], float("-inf")).softmax(-1)
        if junk == "zero":
            filler = torch.zeros_like(x)
        else:
            filler = torch.randn(B, r, c, generator=g, dtype=dtype) * 1e3
            if junk == "nonfinite":
                pick = torch.randint(0, 3, (B, r, c), generator=g)
                filler = torch.where(pick == 0, float("nan"), torch.where(pick == 1, float("inf"), filler))
        valid = rows[:, :, None] & cols[:, None, :]
        return torch.where(valid, x, filler)

    return RelationBlocks(block(wm, wm), block(rm, rm), block(wm, rm), block(rm, wm), wm, rm)


def example_slices(blocks: RelationBlocks, b: int) -> RelationBlocks:
    """Example b alone, without padding (B = 1, all-True masks)."""
    wm, rm = blocks.word_mask[b], blocks.region_mask[b]
    w, v = wm.nonzero().flatten(), rm.nonzero().flatten()
    S_LL, S_VV, S_LV, S_VL = blocks.S_LL[b], blocks.S_VV[b], blocks.S_LV[b], blocks.S_VL[b]
    return RelationBlocks(
        S_LL[w][:, w][None], S_VV[v][:, v][None], S_LV[w][:, v][None], S_VL[v][:, w][None],
        torch.ones(1, len(w), dtype=torch.bool), torch.ones(1, len(v), dtype=torch.bool),
    )


RAGGED = [
    (0, [5, 1, 3, 7], [4, 6, 1, 2]),
    (1, [2, 9, 4], [7, 3, 5]),
    (2, [1], [1]),
    (3, [6, 6], [3, 3]),
]


# --------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("seed,lens_n,lens_m", RAGGED)
@pytest.mark.parametrize("row_reduction", ["mean", "sum"])
def test_cacr_equals_soft_alignment_loop(seed, lens_n, lens_m, row_reduction):
    blocks = ragged_blocks(seed, lens_n, lens_m)
    fast = cacr_loss(*blocks, row_reduction=row_reduction, return_parts=True)
    slow = soft_alignment_loss(*blocks, row_reduction=row_reduction, return_parts=True)
    for a, b in zip(fast, slow):
        assert a.dtype == torch.float64
        assert abs(a.item() - b.item()) < 1e-6, (fast, slow)
    if max(lens_n) > 1:
        assert fast.loss.item() > 0


@pytest.mark.parametrize("seed,lens_n,lens_m", RAGGED)
def test_iais_singular_equals_soft_alignment_with_one_hot_weights(seed, lens_n, lens_m):
    blocks = ragged_blocks(seed, lens_n, lens_m, sharp=2.0)
    fast = iais_loss(*blocks, variant="singular", return_parts=True)
    slow = soft_alignment_loss(*blocks, weights="argmax", target_softmax=False, return_parts=True)
    for a, b in zip(fast, slow):
        assert abs(a.item() - b.item()) < 1e-6, (fast, slow)
    # The same oracle fed explicit one-hot cross-modal matrices (argmax over valid columns).
    wm, rm = blocks.word_mask, blocks.region_mask
    one_hot_LV = torch.nn.functional.one_hot(
        blocks.S_LV.masked_fill(~rm[:, None, :], -math.inf).argmax(-1), rm.shape[1]).double()
    one_hot_VL = torch.nn.functional.one_hot(
        blocks.S_VL.masked_fill(~wm[:, None, :], -math.inf).argmax(-1), wm.shape[1]).double()
    explicit = soft_alignment_loss(blocks.S_LL, blocks.S_VV, one_hot_LV, one_hot_VL, wm, rm,
                                   target_softmax=False)
    assert abs(explicit.item() - fast.loss.item()) < 1e-6
    # Soft weights differ from hard ones: the special case is not the general case.
    if max(lens_n) > 1:
        assert abs(soft_alignment_loss(*blocks, target_softmax=False).item() - fast.loss.item()) > 1e-3


def naive_distributed(blocks: RelationBlocks, eps=1e-6):
    """IAIS distributed with explicit per-row KLs, one example at a time."""
    def mkl(P, Q):
        rows = []
        for i in range(len(P)):
            p, q = P[i], Q[i]
            kl_pq = sum(p[j] * (math.log(p[j] + eps) - math.log(q[j] + eps)) for j in range(len(p)))
            kl_qp = sum(q[j] * (math.log(q[j] + eps) - math.log(p[j] + eps)) for j in range(len(p)))
            rows.append(kl_pq + kl_qp)
        return sum(rows) / len(rows)

    L, V = [], []
    for b in range(blocks.S_LL.shape[0]):
        one = example_slices(blocks, b)
        LL, VV, LV, VL = (x[0].tolist() for x in one[:4])
        n, m = len(LL), len(VV)
        P_L = [[sum(LV[i][r] * VL[r][j] for r in range(m)) for j in range(n)] for i in range(n)]
        P_V = [[sum(VL[i][w] * LV[w][j] for w in range(n)) for j in range(m)] for i in range(m)]
        L.append(mkl(P_L, LL))
        V.append(mkl(P_V, VV))
    return sum(L) / len(L), sum(V) / len(V)


@pytest.mark.parametrize("seed,lens_n,lens_m", RAGGED[:3])
def test_iais_distributed_matches_naive_loops(seed, lens_n, lens_m):
    blocks = ragged_blocks(seed, lens_n, lens_m)
    fast = iais_loss(*blocks, variant="distributed", return_parts=True)
    L, V = naive_distributed(blocks)
    assert abs(fast.loss_L.item() - L) < 1e-9 and abs(fast.loss_V.item() - V) < 1e-9


# --------------------------------------------------------------------------- padding, dtype, edge cases


@pytest.mark.parametrize("junk", ["random", "nonfinite"])
@pytest.mark.parametrize("name,fn", fast_losses())
def test_exact_under_padding_with_junk(name, fn, junk):
    blocks = ragged_blocks(7, [5, 1, 8, 3, 2], [4, 9, 1, 3, 6], junk=junk)
    batched = fn(*blocks, return_parts=True)
    alone = [fn(*example_slices(blocks, b), return_parts=True) for b in range(5)]
    for k in range(3):
        expect = sum(a[k].item() for a in alone) / 5
        assert math.isfinite(batched[k].item())
        assert abs(batched[k].item() - expect) < 1e-10, (name, k, batched[k].item(), expect)


@pytest.mark.parametrize("name,fn", fast_losses())
def test_padding_gets_zero_and_finite_gradient(name, fn):
    blocks = ragged_blocks(8, [4, 2, 6], [3, 5, 2], junk="nonfinite")
    leaves = [x.clone().requires_grad_(True) for x in blocks[:4]]
    fn(*leaves, *blocks[4:]).backward()
    wm, rm = blocks.word_mask, blocks.region_mask
    valid = [wm[:, :, None] & wm[:, None, :], rm[:, :, None] & rm[:, None, :],
             wm[:, :, None] & rm[:, None, :], rm[:, :, None] & wm[:, None, :]]
    for x, ok in zip(leaves, valid):
        if x.grad is None:
            continue
        assert torch.isfinite(x.grad).all()
        assert (x.grad[~ok] == 0).all()


@pytest.mark.parametrize("name,fn", fast_losses())
def test_fp32_under_bf16_autocast(name, fn):
    blocks = ragged_blocks(9, [6, 3], [5, 7], dtype=torch.float32)
    ref = fn(*blocks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = fn(*blocks)
        from_bf16 = fn(*(x.bfloat16() for x in blocks[:4]), *blocks[4:])
    assert under.dtype == torch.float32 and from_bf16.dtype == torch.float32
    assert abs(under.item() - ref.item()) <= 1e-6 * max(1.0, abs(ref.item()))
    ref_bf16 = fn(*(x.bfloat16().float() for x in blocks[:4]), *blocks[4:])
    assert abs(from_bf16.item() - ref_bf16.item()) <= 1e-6 * max(1.0, abs(ref_bf16.item()))


def test_relation_blocks_fp32_under_bf16_autocast():
    scores, wi, wm, ri, rm = random_scores(3)
    ref = relation_blocks(scores, wi, wm, ri, rm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = relation_blocks(scores.bfloat16(), wi, wm, ri, rm)
    for a, b in zip(ref[:4], under[:4]):
        assert b.dtype == torch.float32
    ref_bf = relation_blocks(scores.bfloat16().float(), wi, wm, ri, rm)
    for a, b in zip(ref_bf[:4], under[:4]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def one_hot_blocks():
    """Examples with one-hot attention rows, and n = 1 / m = 1 examples."""
    lens_n, lens_m = [3, 1, 4, 1], [2, 4, 1, 1]
    blocks = ragged_blocks(11, lens_n, lens_m, junk="zero", dtype=torch.float32)
    g = torch.Generator().manual_seed(12)

    def one_hot(x, cols):
        idx = torch.randint(0, 1000, x.shape[:2], generator=g) % cols.sum(-1, keepdim=True)
        return torch.nn.functional.one_hot(idx, x.shape[2]).float()

    S_LL = torch.eye(blocks.S_LL.shape[1]).expand_as(blocks.S_LL).clone()
    S_VV = one_hot(blocks.S_VV, blocks.region_mask)
    S_LV = one_hot(blocks.S_LV, blocks.region_mask)
    S_VL = one_hot(blocks.S_VL, blocks.word_mask)
    return RelationBlocks(S_LL, S_VV, S_LV, S_VL, blocks.word_mask, blocks.region_mask)


@pytest.mark.parametrize("name,fn", fast_losses())
def test_finite_values_and_gradients_for_one_hot_rows_and_singletons(name, fn):
    blocks = one_hot_blocks()
    leaves = [x.clone().requires_grad_(True) for x in blocks[:4]]
    out = fn(*leaves, *blocks[4:], return_parts=True)
    assert all(math.isfinite(x.item()) for x in out)
    out.loss.backward()
    for x in leaves:
        assert x.grad is None or torch.isfinite(x.grad).all()
    single = ragged_blocks(13, [1], [1], dtype=torch.float32)
    leaves = [x.clone().requires_grad_(True) for x in single[:4]]
    out = fn(*leaves, *single[4:])
    out.backward()
    assert math.isfinite(out.item())
    # One word and one region: every distribution is the point mass, so every loss is 0.
    assert abs(out.item()) < 1e-6


def test_no_host_sync_in_batched_losses():
    """Meta tensors have no data: any .item(), bool() or data-dependent shape would raise."""
    B, n, m = 3, 5, 4
    t = lambda *s: torch.rand(*s, device="meta", requires_grad=True)  # noqa: E731
    wm = torch.ones(B, n, dtype=torch.bool, device="meta")
    rm = torch.ones(B, m, dtype=torch.bool, device="meta")
    for _, fn in fast_losses():
        out = fn(t(B, n, n), t(B, m, m), t(B, n, m), t(B, m, n), wm, rm)
        assert out.shape == () and out.device.type == "meta"
        out.backward()
    scores = torch.rand(B, 2, 12, 12, device="meta")
    idx_w, idx_r = torch.zeros(B, n, dtype=torch.long, device="meta"), torch.zeros(B, m, dtype=torch.long, device="meta")
    assert relation_blocks(scores, idx_w, wm, idx_r, rm).S_VL.shape == (B, m, n)


def test_shape_errors_name_the_block():
    blocks = ragged_blocks(0, [3, 2], [2, 4])
    with pytest.raises(ValueError, match="S_LV has shape"):
        cacr_loss(blocks.S_LL, blocks.S_VV, blocks.S_VL, blocks.S_VL, blocks.word_mask, blocks.region_mask)
    with pytest.raises(ValueError, match="variant must be one of"):
        iais_loss(*blocks, variant="soft")
    with pytest.raises(ValueError, match="scores must be"):
        relation_blocks(torch.zeros(2, 3, 4), *blocks[4:5], blocks.word_mask, *blocks[5:6], blocks.region_mask)


# --------------------------------------------------------------------------- gradient flow


def grads(fn, blocks, **kw):
    leaves = [x.clone().requires_grad_(True) for x in blocks[:4]]
    fn(*leaves, *blocks[4:], **kw).backward()
    return [None if x.grad is None or (x.grad == 0).all() else x.grad for x in leaves]


def test_cacr_gradient_flow():
    blocks = ragged_blocks(21, [4, 3], [3, 5])
    g_LL, g_VV, g_LV, g_VL = grads(cacr_loss, blocks)
    assert g_LL is not None and g_VV is not None
    assert g_LV is None and g_VL is None  # stop-gradient through the cross-modal matrices
    assert all(g is not None for g in grads(cacr_loss, blocks, stop_grad=False))


def test_cacr_gradients_equal_soft_alignment_gradients():
    blocks = ragged_blocks(22, [4, 2, 3], [3, 5, 1])
    fast = grads(cacr_loss, blocks, stop_grad=False)
    slow = grads(soft_alignment_loss, blocks)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_iais_gradient_flow():
    blocks = ragged_blocks(23, [4, 3], [3, 5])
    g_LL, g_VV, g_LV, g_VL = grads(iais_loss, blocks, variant="singular")
    assert g_LL is not None and g_VV is not None
    assert g_LV is None and g_VL is None  # only used through the argmax
    assert all(g is not None for g in grads(iais_loss, blocks, variant="distributed"))
    g_LL, g_VV, g_LV, g_VL = grads(iais_loss, blocks, variant="distributed", stop_grad=True)
    assert g_LL is not None and g_VV is not None and g_LV is None and g_VL is None


# --------------------------------------------------------------------------- relation blocks


def random_scores(seed, P=4, h=3, lens_t=(5, 3, 7, 4), lens_v=(4, 6, 2, 5)):
    """Random scores in a compact-like layout: [CLS] words [SEP] regions, then tail padding."""
    g = torch.Generator().manual_seed(seed)
    lens_t, lens_v = torch.tensor(lens_t), torch.tensor(lens_v)  # lens_t includes [CLS]/[SEP]
    L = int((lens_t + lens_v).max()) + 2
    scores = torch.randn(P, h, L, L, generator=g) * 3
    n, m = int(lens_t.max()) - 2, int(lens_v.max())
    wm = torch.arange(n)[None] < (lens_t - 2)[:, None]
    wi = torch.where(wm, 1 + torch.arange(n)[None], 0)
    rm = torch.arange(m)[None] < lens_v[:, None]
    ri = torch.where(rm, lens_t[:, None] + torch.arange(m)[None], 0)
    return scores, wi, wm, ri, rm


def naive_blocks(scores, wi, wm, ri, rm, source, p, head):
    w, v = wi[p][wm[p]], ri[p][rm[p]]
    S = scores[p, head]
    LL, VV, LV, VL = S[w][:, w], S[v][:, v], S[w][:, v], S[v][:, w]
    if source == "probs":
        LL, VV, LV, VL = (x.softmax(-1) for x in (LL, VV, LV, VL))
    return LL, VV, LV, VL


@pytest.mark.parametrize("source", ["probs", "scores"])
def test_relation_blocks_match_naive_slices(source):
    scores, wi, wm, ri, rm = random_scores(31)
    h = scores.shape[1]
    mean = relation_blocks(scores, wi, wm, ri, rm, source=source)
    per = relation_blocks(scores, wi, wm, ri, rm, source=source, head_reduction="per_head")
    assert per.S_LL.shape[0] == scores.shape[0] * h
    for p in range(scores.shape[0]):
        n, m = int(wm[p].sum()), int(rm[p].sum())
        heads = [naive_blocks(scores, wi, wm, ri, rm, source, p, k) for k in range(h)]
        for i, got in enumerate(mean[:4]):
            want = torch.stack([hb[i] for hb in heads]).mean(0)
            torch.testing.assert_close(got[p][: want.shape[0], : want.shape[1]], want)
            for k in range(h):
                torch.testing.assert_close(per[i][p * h + k][: want.shape[0], : want.shape[1]], heads[k][i])
        if source == "probs":
            for blk, r in ((mean.S_LL, n), (mean.S_LV, n), (mean.S_VV, m), (mean.S_VL, m)):
                torch.testing.assert_close(blk[p][:r].sum(-1), torch.ones(r))
    for x in mean[:4] + per[:4]:
        assert torch.isfinite(x).all()
    assert torch.equal(per.word_mask, wm.repeat_interleave(h, 0))


def test_per_head_loss_is_mean_of_single_head_losses():
    scores, wi, wm, ri, rm = random_scores(32)
    h = scores.shape[1]
    per = cacr_loss(*relation_blocks(scores, wi, wm, ri, rm, head_reduction="per_head"))
    single = [cacr_loss(*relation_blocks(scores[:, k:k + 1], wi, wm, ri, rm)) for k in range(h)]
    assert abs(per.item() - sum(x.item() for x in single) / h) < 1e-6
    mean = cacr_loss(*relation_blocks(scores, wi, wm, ri, rm))
    assert abs(per.item() - mean.item()) > 1e-4  # a different loss, not a relabelling


# --------------------------------------------------------------------------- schedule and Regularizer


def test_schedule_values():
    T = 1000
    assert schedule_weight("exponential", 0, T) == pytest.approx(math.exp(-5))
    assert schedule_weight("exponential", T, T) == pytest.approx(1.0)
    assert schedule_weight("exponential", T // 2, T) == pytest.approx(math.exp(-2.5))
    assert schedule_weight("linear", 0, T) == 0.0 and schedule_weight("linear", 250, T) == 0.25
    assert schedule_weight("linear", T, T) == 1.0
    assert schedule_weight("log", 0, T) == 0.0
    assert schedule_weight("log", T, T) == pytest.approx(1 - math.exp(-5))
    assert schedule_weight("constant", 0, T) == schedule_weight("constant", T, T) == 1.0
    assert schedule_weight("exponential", 2 * T, T) == 1.0  # clipped past the end
    for s in ("exponential", "linear", "log"):
        values = [schedule_weight(s, t, T) for t in range(0, T + 1, 50)]
        assert values == sorted(values) and values[0] < values[-1]
    with pytest.raises(ValueError, match="total_steps"):
        schedule_weight("linear", 0, 0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        schedule_weight("cosine", 0, 10)


def test_schedule_resume_continues():
    T = 300
    full = [Regularizer(weight=0.5).weight_at(t, T) for t in range(T + 1)]
    first = Regularizer(weight=0.5)
    before = [first.weight_at(t, T) for t in range(120)]
    resumed = Regularizer(weight=0.5)  # a fresh object, as after loading a checkpoint at step 120
    after = [resumed.weight_at(t, T) for t in range(120, T + 1)]
    assert before + after == full
    assert after[0] == pytest.approx(0.5 * math.exp(5 * (120 / T - 1)))
    assert after[0] > 5 * full[0]  # not restarted at e^-5


def test_regularizer_dispatch_and_defaults():
    blocks = ragged_blocks(41, [3, 5], [4, 2], dtype=torch.float32)
    assert Regularizer("cacr").stop_grad is True
    assert Regularizer("iais_distributed").stop_grad is False
    out = Regularizer("cacr")(*blocks)
    assert isinstance(out, RelationLoss)
    assert out.loss.item() == pytest.approx(cacr_loss(*blocks).item(), abs=0)
    assert Regularizer("iais_singular")(*blocks).loss.item() == pytest.approx(
        iais_loss(*blocks, variant="singular").item(), abs=0)
    dist = Regularizer("iais_distributed", row_reduction="sum")(*blocks)
    assert dist.loss.item() == pytest.approx(
        iais_loss(*blocks, variant="distributed", row_reduction="sum").item(), abs=0)
    none = Regularizer("none")
    assert not none.enabled and none.weight_at(5, 10) == 0.0
    assert none(*blocks).loss.item() == 0.0 and none(*blocks).loss.dtype == torch.float32
    assert Regularizer(weight=2.0, schedule="constant").weight_at(3, 10) == 2.0


def test_regularizer_rejects_bad_options():
    with pytest.raises(ValueError, match="loss.name"):
        Regularizer("iais")
    with pytest.raises(ValueError, match="source='scores' does not apply"):
        Regularizer("iais_singular", source="scores")
    with pytest.raises(ValueError, match="loss.weight"):
        Regularizer(weight=-1.0)
    with pytest.raises(ValueError, match="loss.schedule"):
        Regularizer(schedule="cosine")
    with pytest.raises(ValueError, match="loss.row_reduction"):
        Regularizer(row_reduction="max")


def test_loss_configs_have_same_keys_and_compose():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    # The options inherit their keys from conf/loss/base.yaml, which is not an option itself.
    assert {p.stem for p in CONF_LOSS.glob("*.yaml")} - {"base"} == set(NAMES)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        keys = {name: set(compose(overrides=[f"+loss={name}"]).loss) for name in NAMES}
        assert all(k == keys["cacr"] for k in keys.values()), keys
        for name in NAMES:
            cfg = compose(overrides=[f"+loss={name}"])
            reg = instantiate(cfg.loss)
            assert isinstance(reg, Regularizer) and reg.name == name
            cfg = compose(overrides=[f"+loss={name}", "loss.weight=0.5", "loss.schedule=linear"])
            reg = instantiate(cfg.loss)
            assert reg.weight == 0.5 and reg.schedule == "linear"
        cacr = instantiate(compose(overrides=["+loss=cacr"]).loss)
        assert cacr == Regularizer()  # the config's defaults are the public code's
        assert instantiate(compose(overrides=["+loss=iais_distributed"]).loss).stop_grad is False


# --------------------------------------------------------------------------- parity with the public code


@pytest.fixture(scope="module")
def parity():
    from cacr.model import PairExample, UniterConfig, UniterForImageTextRetrieval, collate

    d = torch.load(FIXTURE, weights_only=True)
    model = UniterForImageTextRetrieval(UniterConfig(**d["config"], img_dim=d["img_dim"]))
    model.load_state_dict(d["state_dict"])
    model.eval()
    inp = d["inputs"]
    examples = [
        PairExample(inp["input_ids"][b, : d["txt_lens"][b]], inp["img_feat"][b, : d["num_bbs"][b]],
                    inp["img_pos_feat"][b, : d["num_bbs"][b]])
        for b in range(len(d["txt_lens"]))
    ]
    blocks = {}
    for layout in ("compact", "padded"):
        batch = collate(examples, layout=layout)
        with torch.no_grad():
            out = model(batch, score_rows=torch.arange(len(examples)))
        blocks[layout] = relation_blocks(out.last_scores, batch.word_index, batch.word_mask,
                                         batch.region_index, batch.region_mask)
    return d["expected_losses"], blocks, model, examples


@pytest.mark.parametrize("layout", ["compact", "padded"])
def test_parity_with_public_code(parity, layout):
    expected, blocks, _, _ = parity
    b = blocks[layout]
    got = {
        "soft": cacr_loss(*b, return_parts=True),
        "singular": iais_loss(*b, variant="singular", return_parts=True),
        "distributed": iais_loss(*b, variant="distributed", return_parts=True),
    }
    for key, out in got.items():
        assert abs(out.loss.item() - expected[key]) < 1e-4, (key, out, expected[key])
        assert abs(out.loss_L.item() - expected[f"L-{key}"]) < 1e-4
        assert abs(out.loss_V.item() - expected[f"V-{key}"]) < 1e-4
    oracle = soft_alignment_loss(*b)
    assert abs(oracle.item() - expected["soft"]) < 1e-4


def test_layouts_give_the_same_blocks(parity):
    _, blocks, _, _ = parity
    for a, b in zip(blocks["compact"], blocks["padded"]):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_regularizer_backpropagates_into_the_model(parity):
    from cacr.model import collate

    _, _, model, examples = parity
    batch = collate(examples)
    pos = torch.tensor([0, 2, 5])
    model.zero_grad()
    out = model(batch, score_rows=pos)
    reg = Regularizer("cacr")
    parts = reg(*reg.blocks(out.last_scores, batch.word_index[pos], batch.word_mask[pos],
                            batch.region_index[pos], batch.region_mask[pos]))
    parts.loss.backward()
    last = model.uniter.encoder.layer[-1].attention.self
    assert last.query.weight.grad.abs().sum() > 0 and last.key.weight.grad.abs().sum() > 0
    # The value projection only shapes the layer's output, not its attention.
    assert last.value.weight.grad is None or (last.value.weight.grad == 0).all()
    model.zero_grad()


# --------------------------------------------------------------------------- ablation switches


def single_softmax_loop(blocks: RelationBlocks):
    """CACR without the second softmax, one example at a time: P row-normalised vs the blocks' rows."""
    L, V = [], []
    for b in range(blocks.word_mask.shape[0]):
        LL, VV, LV, VL, _, _ = example_slices(blocks, b)
        LL, VV, LV, VL = LL[0], VV[0], LV[0], VL[0]

        def side(P, T):
            P = P / P.sum(1, keepdim=True)
            return torch.stack([((P[i] - T[i]) * (P[i].log() - T[i].log())).sum() for i in range(len(P))]).mean()

        L.append(side(LV @ VV @ LV.T, LL))
        V.append(side(VL @ LL @ VL.T, VV))
    return torch.stack(L).mean(), torch.stack(V).mean()


@pytest.mark.parametrize("seed,lens_n,lens_m", RAGGED)
def test_cacr_single_softmax_equals_a_loop(seed, lens_n, lens_m):
    blocks = ragged_blocks(seed, lens_n, lens_m)
    fast = cacr_loss(*blocks, double_softmax=False, return_parts=True)
    want_L, want_V = single_softmax_loop(blocks)
    torch.testing.assert_close(fast.loss_L, want_L)
    torch.testing.assert_close(fast.loss_V, want_V)
    if max(lens_n) > 1:  # one word and one region: both losses are 0
        assert not torch.allclose(fast.loss, cacr_loss(*blocks))  # the switch changes the loss


def test_ablation_switches_are_validated_and_dispatched():
    assert Regularizer("cacr").layer_indices(4) == [3]
    assert Regularizer("cacr", layers="penultimate").layer_indices(4) == [2]
    assert Regularizer("iais_singular", layers="all").layer_indices(3) == [0, 1, 2]
    with pytest.raises(ValueError, match="loss.layers"):
        Regularizer("cacr", layers="first")
    with pytest.raises(ValueError, match="at least 2 layers"):
        Regularizer("cacr", layers="penultimate").layer_indices(1)
    with pytest.raises(ValueError, match="double_softmax=false applies to cacr"):
        Regularizer("iais_singular", double_softmax=False)
    with pytest.raises(ValueError, match="double_softmax=false applies to cacr"):
        Regularizer("cacr", source="scores", double_softmax=False)
    blocks = ragged_blocks(0, [5, 1, 3], [4, 6, 1])
    got = Regularizer("cacr", double_softmax=False)(*blocks).loss
    torch.testing.assert_close(got, cacr_loss(*blocks, double_softmax=False))


def test_score_layers_return_each_layers_attention(parity):
    """The model's per-layer scores equal those of the explicit attention of that layer (hooked)."""
    from cacr.model import collate

    _, _, model, examples = parity
    batch = collate(examples)
    pos = torch.tensor([1, 4])
    seen = {}
    hooks = [layer.attention.self.register_forward_hook(
        lambda mod, args, out, i=i: seen.__setitem__(i, (args[0], mod))) for i, layer in
        enumerate(model.uniter.encoder.layer)]
    try:
        with torch.no_grad():
            n = len(model.uniter.encoder.layer)
            out = model(batch, score_rows=pos, score_layers=[0, n - 1])
            last = model(batch, score_rows=pos).last_scores
    finally:
        for h in hooks:
            h.remove()
    assert out.last_scores is None and len(out.layer_scores) == 2
    torch.testing.assert_close(out.layer_scores[-1], last)
    for i, scores in zip([0, n - 1], out.layer_scores):
        x, att = seen[i]
        q = att._heads(att.query(x))[pos]
        k = att._heads(att.key(x))[pos]
        torch.testing.assert_close(scores, q @ k.transpose(-1, -2) / math.sqrt(att.head_dim))
    assert not torch.allclose(out.layer_scores[0], out.layer_scores[1])
