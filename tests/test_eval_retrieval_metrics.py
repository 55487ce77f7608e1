"""Retrieval recalls: vectorized ranks vs a slow sort-based twin, torchmetrics, hand cases."""
import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate

from cacr.evaluation.retrieval_metrics import retrieval_metrics, retrieval_ranks


def random_problem(seed, n_images, max_caps=5, ties=True):
    g = torch.Generator().manual_seed(seed)
    per_image = torch.randint(1, max_caps + 1, (n_images,), generator=g)
    txt2img = torch.repeat_interleave(torch.arange(n_images), per_image)
    txt2img = txt2img[torch.randperm(txt2img.numel(), generator=g)]
    Nc = txt2img.numel()
    if ties:
        scores = torch.randint(0, 4, (Nc, n_images), generator=g).float()
    else:
        scores = torch.randn(Nc, n_images, generator=g, dtype=torch.float64)
    return scores, txt2img


def slow_ranks(scores, txt2img, ties="pessimistic"):
    """Sort each query's items by score, breaking ties against (or for) the right items,
    and return the position of the first right item."""
    Nc, Ni = scores.shape
    right_last = ties == "pessimistic"

    def first_right(values, right):
        order = sorted(range(len(values)), key=lambda j: (-values[j], right[j] if right_last else not right[j]))
        return next(pos for pos, j in enumerate(order) if right[j])

    s = scores.tolist()
    t = txt2img.tolist()
    image_ranks = [first_right(s[c], [i == t[c] for i in range(Ni)]) for c in range(Nc)]
    text_ranks = [first_right([s[c][i] for c in range(Nc)], [t[c] == i for c in range(Nc)]) for i in range(Ni)]
    return torch.tensor(image_ranks), torch.tensor(text_ranks)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_ranks_match_slow_twin_on_ragged_ties(seed, ties):
    scores, txt2img = random_problem(seed, n_images=3 + 4 * seed)
    fast = retrieval_ranks(scores, txt2img, ties=ties, chunk_rows=7)
    slow = slow_ranks(scores, txt2img, ties)
    assert torch.equal(fast[0], slow[0])
    assert torch.equal(fast[1], slow[1])


def test_chunking_does_not_change_ranks():
    scores, txt2img = random_problem(11, n_images=40)
    ref = retrieval_ranks(scores, txt2img, chunk_rows=10_000)
    for chunk in (1, 3, 64):
        got = retrieval_ranks(scores, txt2img, chunk_rows=chunk)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def torchmetrics_recalls(scores, txt2img, k):
    Nc, Ni = scores.shape
    right = txt2img[:, None] == torch.arange(Ni)[None, :]  # (Nc, Ni)
    ir = RetrievalHitRate(top_k=k)(scores.flatten(), right.flatten(),
                                   indexes=torch.arange(Nc)[:, None].expand(Nc, Ni).flatten())
    tr = RetrievalHitRate(top_k=k)(scores.T.flatten(), right.T.flatten(),
                                   indexes=torch.arange(Ni)[:, None].expand(Ni, Nc).flatten())
    return 100 * ir.item(), 100 * tr.item()


@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_torchmetrics_without_ties(seed):
    scores, txt2img = random_problem(seed, n_images=30, ties=False)
    m = retrieval_metrics(scores, txt2img, ks=(1, 5, 10))
    for k in (1, 5, 10):
        ir, tr = torchmetrics_recalls(scores, txt2img, k)
        assert m[f"ir_r{k}"] == pytest.approx(ir, abs=1e-4)
        assert m[f"tr_r{k}"] == pytest.approx(tr, abs=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_torchmetrics_with_ties_lies_between_pessimistic_and_optimistic(seed):
    # torchmetrics breaks ties by an unstable argsort, i.e. in no defined direction: any
    # such order gives a recall between the pessimistic (ours) and the optimistic one.
    scores, txt2img = random_problem(seed, n_images=25, ties=True)
    pess = retrieval_metrics(scores, txt2img, ties="pessimistic")
    opt = retrieval_metrics(scores, txt2img, ties="optimistic")
    strictly_lower = False
    for k in (1, 5, 10):
        ir, tr = torchmetrics_recalls(scores, txt2img, k)
        assert pess[f"ir_r{k}"] - 1e-4 <= ir <= opt[f"ir_r{k}"] + 1e-4
        assert pess[f"tr_r{k}"] - 1e-4 <= tr <= opt[f"tr_r{k}"] + 1e-4
        strictly_lower |= pess[f"ir_r{k}"] < opt[f"ir_r{k}"]
    assert strictly_lower  # these matrices do have ties that matter


def test_hand_case_values_and_keys():
    # 3 images; captions 0,1 -> image 0, caption 2 -> image 1, captions 3,4 -> image 2.
    txt2img = torch.tensor([0, 0, 1, 2, 2])
    scores = torch.tensor([
        [5., 1., 0.],   # image 0 first: IR rank 0
        [1., 3., 2.],   # image 0 last: rank 2
        [4., 4., 0.],   # tie between right (1) and wrong (0): pessimistic rank 1
        [0., 0., 1.],   # rank 0
        [9., 8., 7.],   # rank 2
    ])
    image_ranks, text_ranks = retrieval_ranks(scores, txt2img)
    assert image_ranks.tolist() == [0, 2, 1, 0, 2]
    # image 0: best right 5 (caption 0), wrong captions >= 5: caption 4 (9) -> 1
    # image 1: right 4 (caption 2), wrong >= 4: caption 1 (3)? no; caption 4 (8) -> 1
    # image 2: best right 7 (caption 4), wrong >= 7: none -> 0
    assert text_ranks.tolist() == [1, 1, 0]
    m = retrieval_metrics(scores, txt2img, ks=(1, 2))
    assert m["ir_r1"] == pytest.approx(40.0) and m["ir_r2"] == pytest.approx(60.0)
    assert m["tr_r1"] == pytest.approx(100 / 3) and m["tr_r2"] == pytest.approx(100.0)
    assert m["ir_mean"] == pytest.approx(50.0)
    assert m["rsum"] == pytest.approx(40 + 60 + 100 / 3 + 100)
    assert m["r_mean"] == pytest.approx(m["rsum"] / 4)
    assert (m["n_captions"], m["n_images"]) == (5, 3)
    opt = retrieval_ranks(scores, txt2img, ties="optimistic")
    assert opt[0].tolist() == [0, 2, 0, 0, 2]


def test_ties_between_right_captions_do_not_count():
    # Both captions of image 0 tie at the top: one of them is first whatever the order.
    txt2img = torch.tensor([0, 0, 1])
    scores = torch.tensor([[3., 0.], [3., 0.], [1., 5.]])
    _, text_ranks = retrieval_ranks(scores, txt2img)
    assert text_ranks.tolist() == [0, 0]


def test_each_caption_counts_once():
    # The official defect added the row index of nonzero() and could exceed one hit per
    # caption; with every caption's image at the top, recall is exactly 100, and with a
    # single hit exactly 1/Nc.
    Ni = 12
    txt2img = torch.arange(Ni).repeat_interleave(5)
    perfect = (txt2img[:, None] == torch.arange(Ni)[None, :]).float()
    m = retrieval_metrics(perfect, txt2img)
    assert all(m[k] == pytest.approx(100.0) for k in ("ir_r1", "ir_r5", "ir_r10", "tr_r1"))
    one_hit = -perfect.clone()
    one_hit[7] = perfect[7]
    m = retrieval_metrics(one_hit, txt2img, ks=(1,))
    assert m["ir_r1"] == pytest.approx(100 / 60)


def test_full_size_matrix_runs_chunked():
    g = torch.Generator().manual_seed(0)
    txt2img = torch.arange(1000).repeat_interleave(5)
    scores = torch.randn(5000, 1000, generator=g)
    scores[torch.arange(5000), txt2img] += 3.0
    m = retrieval_metrics(scores, txt2img, chunk_rows=256)
    assert 0 < m["ir_r1"] < m["ir_r5"] < m["ir_r10"] <= 100
    assert 0 < m["tr_r1"] <= m["tr_r5"] <= m["tr_r10"] <= 100


def test_bad_inputs_are_named():
    scores = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"image\(s\) \[1\] have no caption"):
        retrieval_metrics(scores, torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="caption 2 points to image 5"):
        retrieval_metrics(scores, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="expected 3 integer image indices"):
        retrieval_metrics(scores, torch.tensor([0, 1]))
    bad = scores.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf at \(caption 1, image 0\)"):
        retrieval_metrics(bad, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="ties must be one of"):
        retrieval_metrics(scores, torch.tensor([0, 1, 1]), ties="random")
