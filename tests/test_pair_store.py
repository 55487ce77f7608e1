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
    bounded = store.batch(idx, idx.flip(0), max_txt_len=store.input_ids.shape[1], max_regions=store.img_feat.shape[1])
    model = tiny_model()
    with torch.no_grad():
        assert torch.allclose(model.score(exact), model.score(bounded), atol=1e-5)


def test_store_rejects_mismatched_tensors():
    with pytest.raises(ValueError, match="img_pos_feat"):
        PairStore(torch.zeros(2, 4, dtype=torch.long), torch.tensor([3, 4]), torch.zeros(3, 5, 8),
                  torch.zeros(3, 5, 6), torch.tensor([1, 2, 3]))
