"""PairStore builds the same batches as collate (its slow, obvious twin)."""
import pytest
import torch

from cacr.model import PairStore, collate

from .test_model import random_examples, tiny_model


@pytest.mark.parametrize("layout", ["compact", "padded"])
def test_store_batches_score_like_collate(layout):
    examples = random_examples(10, seed=11, max_t=15, max_m=12)
    captions = [ex.input_ids for ex in examples]
    images = [(ex.img_feat, ex.img_pos_feat) for ex in examples]
    store = PairStore.from_examples(captions, images, layout=layout)
    g = torch.Generator().manual_seed(1)
    cap_idx = torch.randint(0, 10, (23,), generator=g)
    img_idx = torch.randint(0, 10, (23,), generator=g)
    fast = store.batch(cap_idx, img_idx)
    slow = collate([(captions[c], *images[i]) for c, i in zip(cap_idx.tolist(), img_idx.tolist())], layout=layout)
    model = tiny_model()
    with torch.no_grad():
        a, b = model(fast, score_rows=torch.arange(23)), model(slow, score_rows=torch.arange(23))
    assert torch.allclose(a.rank_logits, b.rank_logits, atol=1e-5)
    for name in ("txt_lens", "num_bbs", "word_mask", "region_mask"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    # The words and regions found through the index tensors hold the same hidden states.
    for idx, mask in (("word_index", "word_mask"), ("region_index", "region_mask")):
        ha = torch.gather(a.last_hidden, 1, getattr(fast, idx)[..., None].expand(-1, -1, 32))
        hb = torch.gather(b.last_hidden, 1, getattr(slow, idx)[..., None].expand(-1, -1, 32))
        assert (ha - hb).mul(getattr(fast, mask)[..., None]).abs().max() < 1e-5


def test_upper_bounds_give_the_same_scores():
    examples = random_examples(6, seed=2)
    store = PairStore.from_examples([e.input_ids for e in examples], [(e.img_feat, e.img_pos_feat) for e in examples])
    idx = torch.tensor([0, 3, 5])
    exact = store.batch(idx, idx.flip(0))
    bounded = store.batch(idx, idx.flip(0), max_txt_len=store.input_ids.shape[1], max_regions=int(store.num_bbs.max()) + 3)
    model = tiny_model()
    with torch.no_grad():
        assert torch.allclose(model.score(exact), model.score(bounded), atol=1e-5)


def test_store_rejects_mismatched_tensors():
    with pytest.raises(ValueError, match="img_pos_feat"):
        PairStore(torch.zeros(2, 4, dtype=torch.long), torch.tensor([3, 4]), torch.zeros(3, 5, 8),
                  torch.zeros(3, 5, 6), torch.tensor([1, 2, 3]))


def test_length_plan_sorts_pairs_and_bounds_each_chunk_exactly():
    gen = torch.Generator().manual_seed(1)
    caps = [torch.randint(1, 50, (int(n),), generator=gen) for n in torch.randint(3, 12, (9,), generator=gen)]
    imgs = [(torch.randn(int(m), 4, generator=gen), torch.rand(int(m), 4, generator=gen))
            for m in torch.randint(1, 8, (7,), generator=gen)]
    store = PairStore.from_examples(caps, imgs)
    c = torch.randint(0, 9, (23,), generator=gen)
    i = torch.randint(0, 7, (23,), generator=gen)
    order, chunks = store.length_plan(c, i, batch_size=5)
    assert sorted(order.tolist()) == list(range(23))
    joint = torch.tensor([caps[a].numel() + imgs[b][0].shape[0] for a, b in zip(c[order].tolist(), i[order].tolist())])
    assert (joint[:-1] >= joint[1:]).all()
    assert [(s, e) for s, e, *_ in chunks] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    for s, e, lt, lv, lj in chunks:
        idx = order[s:e]
        assert lt == max(caps[a].numel() for a in c[idx].tolist())
        assert lv == max(imgs[b][0].shape[0] for b in i[idx].tolist())
        assert lj == int(joint[s:e].max())
        exact = store.batch(c[idx], i[idx])  # widths from the host lengths
        planned = store.batch(c[idx], i[idx], max_txt_len=lt, max_regions=lv, max_len=lj)
        for got in (exact, planned):
            assert got.input_ids.shape[1] == lt and got.img_feat.shape[1] == lv and got.attn_mask.shape[1] == lj


@pytest.mark.parametrize("bounds", [{}, {"max_txt_len": 30, "max_regions": 20}], ids=["exact", "loose"])
def test_compact_batches_of_any_width_score_alike(bounds):
    """The compact layout's width: exact (max t + m, from the host) or the sync-free bound Lt + Lv."""
    examples = random_examples(12, seed=4, max_t=15, max_m=12)
    store = PairStore.from_examples([e.input_ids for e in examples], [(e.img_feat, e.img_pos_feat) for e in examples])
    idx = torch.arange(12)
    batch = store.batch(idx, idx, **bounds)
    joint = max(e.input_ids.numel() + e.img_feat.shape[0] for e in examples)
    assert batch.attn_mask.shape[1] == (joint if not bounds else batch.input_ids.shape[1] + batch.img_feat.shape[1])
    model = tiny_model()
    with torch.no_grad():
        assert torch.allclose(model.score(batch), model.score(collate(examples)), atol=1e-5)


def test_regions_are_stored_flat_and_padded_input_gives_the_same_store():
    examples = random_examples(7, seed=6, max_m=9)
    flat = PairStore.from_examples([e.input_ids for e in examples], [(e.img_feat, e.img_pos_feat) for e in examples])
    assert flat.region_feat.shape == (sum(e.img_feat.shape[0] for e in examples) + 1, 16)  # + the zero row
    assert not flat.region_feat[-1].any()
    M = max(e.img_feat.shape[0] for e in examples)
    feat = torch.zeros(7, M, 16)
    pos = torch.zeros(7, M, 7)
    for i, e in enumerate(examples):
        feat[i, : e.img_feat.shape[0]], pos[i, : e.img_feat.shape[0]] = e.img_feat, e.img_pos_feat
    padded = PairStore(flat.input_ids, flat.txt_lens, feat, pos, flat.num_bbs)
    c, i = torch.tensor([0, 2, 6, 1]), torch.tensor([6, 0, 3, 3])
    a, b = flat.batch(c, i), padded.batch(c, i)
    assert torch.equal(a.img_feat, b.img_feat) and torch.equal(a.img_pos_feat, b.img_pos_feat)
    for k in range(4):  # each pair's regions are its image's, then zeros
        m = examples[int(i[k])].img_feat.shape[0]
        assert torch.equal(a.img_feat[k, :m], examples[int(i[k])].img_feat) and not a.img_feat[k, m:].any()
    with pytest.raises(ValueError, match="every image holding >= 1 region"):
        PairStore.from_flat(flat.input_ids, flat.txt_lens, torch.zeros(3, 16), torch.zeros(3, 7), torch.tensor([3, 0]))
