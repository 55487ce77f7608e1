"""Region sources, caps, negative sampling, the data config reader and the datamodule on the synthetic world."""
import logging
import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from cacr.data.datamodule import RetrievalDataModule
from cacr.data.datasets import LazyRegions, RegionCaps, RegionStore, TrainPools, build_split
from cacr.data.formats import FormatError, read_captions, write_captions
from cacr.model import collate

from .conftest import FIXTURES, REPO
from .test_data_formats import TOK, random_images, write_regions

SMALL = dict(seed=5, n_train=60, n_val=12, n_test=10, n_winoground=8)


def test_caps_match_slow_loop():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 140, 50)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    conf = rng.uniform(0, 0.6, offsets[-1]).astype(np.float32)
    caps = RegionCaps(0.2, 10, 100)
    slow = [min(max(10, min(100, int((conf[a:b] > 0.2).sum()))), b - a) for a, b in zip(offsets[:-1], offsets[1:])]
    np.testing.assert_array_equal(caps.kept_counts(offsets, conf), slow)
    np.testing.assert_array_equal(caps.kept_counts(offsets, None), counts)


def test_store_gather_and_lazy_match_file_with_caps(tmp_path):
    rng = np.random.default_rng(1)
    images = random_images(rng, n=12, conf=True)
    p = write_regions(tmp_path / "r.h5", images, conf=True)
    caps = RegionCaps(0.5, 2, 4)
    store, lazy = RegionStore.from_file(p, caps), LazyRegions(p, caps)
    for i, (iid, f, b, c) in enumerate(images):
        n = min(max(2, min(4, int((c > 0.5).sum()))), len(f))
        for src in (store, lazy):
            gf, gb = src.get(src.index(iid))
            np.testing.assert_array_equal(gf.numpy(), f[:n])
            np.testing.assert_array_equal(gb.numpy(), b[:n])
    idx = torch.tensor([3, 0, 11, 3, 7])
    feat, box, num = store.gather(idx)  # (k, M, D)
    assert feat.shape == (5, int(num.max()), 5) and feat.dtype == torch.float16
    for r, i in enumerate(idx.tolist()):
        gf, gb = store.get(i)
        assert num[r] == len(gf)
        torch.testing.assert_close(feat[r, :len(gf)], gf, rtol=0, atol=0)
        torch.testing.assert_close(box[r, :len(gf)], gb, rtol=0, atol=0)
        assert (feat[r, len(gf):] == 0).all() and (box[r, len(gf):] == 0).all()
    # no caps: every row
    assert (RegionStore.from_file(p, None).num_regions == [len(i[1]) for i in images]).all()


def test_caps_on_official_sample(tmp_path):
    from cacr.data.convert import convert_uniter_img

    p = convert_uniter_img(FIXTURES / "uniter_db_sample/img_db/flickr30k/feat_th0.2_max100_min10", tmp_path / "r.h5")
    store = RegionStore.from_file(p, RegionCaps())
    # the official nbb already applied th 0.2 / min 10 / max 100, so applying it again keeps every row
    assert dict(zip(store.image_ids, store.num_regions.tolist())) == {
        "flickr30k_000830354086.npz": 21, "flickr30k_000796694334.npz": 34, "flickr30k_000175703994.npz": 15,
        "flickr30k_000925218732.npz": 10, "flickr30k_000432114396.npz": 12, "flickr30k_000175415953.npz": 35}
    assert RegionStore.from_file(p, RegionCaps(0.25, 3, 100)).num_regions.tolist() != store.num_regions.tolist()


def test_lazy_regions_pickle_into_dataloader_workers(tmp_path):
    images = random_images(np.random.default_rng(2), n=9)
    p = write_regions(tmp_path / "r.h5", images)
    lazy = LazyRegions(p, None)
    lazy.get(0)
    lazy2 = pickle.loads(pickle.dumps(lazy))
    loader = DataLoader(list(range(9)), batch_size=3, num_workers=2,
                        collate_fn=lambda ix: [lazy2.get(i)[0].sum().item() for i in ix])
    got = [x for b in loader for x in b]
    assert got == pytest.approx([float(torch.from_numpy(i[1]).sum()) for i in images], rel=1e-3)


@pytest.fixture
def tiny_split(tmp_path):
    """7 images, captions with 1..3 per image, one caption over max_txt_len."""
    images = random_images(np.random.default_rng(3), n=7)
    p = write_regions(tmp_path / "r.h5", images)
    per = [1, 3, 2, 1, 2, 3, 1]
    cap_img = [f"img_{j}" for j, k in enumerate(per) for _ in range(k)]
    toks = [[5, 6]] * len(cap_img)
    toks[4] = [5] * 9  # long
    c = write_captions(tmp_path / "c.h5", caption_ids=[f"c{i}" for i in range(len(cap_img))], image_ids=cap_img,
                       texts=["a dog"] * len(cap_img), token_ids=toks, splits=["train"] * len(cap_img), **TOK)
    return build_split("t", read_captions(c), RegionStore.from_file(p, None), "train")


def test_split_texts_have_specials_and_links(tiny_split):
    s = tiny_split
    assert s.num_images == 7 and s.num_texts == 13
    assert s.texts[0].tolist() == [2, 5, 6, 3]
    assert s.img2txts[1] == [1, 2, 3]
    ex = s.pair(2, 1)
    assert ex.input_ids.tolist() == [2, 5, 6, 3] and ex.img_feat.shape[1] == 5 and ex.img_pos_feat.shape[1] == 6


def test_pools_drop_long_captions_and_negatives_are_never_a_true_match(tiny_split, caplog):
    from cacr.data.negatives import NegativeSampler

    with caplog.at_level(logging.INFO):
        pools = TrainPools(tiny_split, max_txt_len=8)
    assert pools.num_dropped == 1 and "dropped 1 of 13" in caplog.text
    assert 4 not in pools.positives.tolist()
    sampler = NegativeSampler(pools.txt2img, pools.positives, pools.num_images)  # real data: no scene truth
    g = torch.Generator().manual_seed(0)
    for t in pools.positives.tolist():
        neg_img = sampler.images(t, 6, g)  # all other images
        assert sorted(neg_img.tolist()) == [j for j in range(7) if j != int(pools.txt2img[t])]
    k = 13 - 1 - 3  # kept captions minus the most any image owns
    for j in range(7):
        neg_txt = sampler.texts(j, k, g)
        assert (pools.txt2img[neg_txt] != j).all() and len(set(neg_txt.tolist())) == k
        assert not (neg_txt == 4).any()  # dropped captions are never negatives
    # uniform: each allowed caption is drawn about equally often for image 0
    few = torch.cat([sampler.texts(0, 1, g) for _ in range(3000)])
    freq = torch.bincount(few, minlength=13).float()
    allowed = [t for t in pools.positives.tolist() if pools.txt2img[t] != 0]
    assert (freq[allowed] > 3000 / len(allowed) * 0.7).all() and freq.sum() == freq[allowed].sum()


def test_unknown_image_in_split(tmp_path):
    p = write_regions(tmp_path / "r.h5", random_images(np.random.default_rng(4), n=1))
    c = write_captions(tmp_path / "c.h5", caption_ids=["c0"], image_ids=["img_9"], texts=["a"], token_ids=[[5]],
                       splits=["train"], **TOK)
    with pytest.raises(FormatError, match="unknown image 'img_9'"):
        build_split("t", read_captions(c), RegionStore.from_file(p), "train")


def _dm(tmp_path, **over):
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf/data/synthetic.yaml"))
    cfg.update(root=str(tmp_path / "syn"), val_max_images=5, batch_size=4, eval_batch_size=16)
    cfg["synthetic"].update(SMALL)
    cfg.update(over)
    return RetrievalDataModule.from_config(cfg)


def test_datamodule_on_synthetic_world(tmp_path):
    dm = _dm(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    tr = dm.split("train")
    assert tr.num_images == 60 and tr.num_texts == 300
    val = dm.split("val")
    assert val.num_images == 5 and val.num_texts == 25  # val_max_images
    assert dm.split("test").num_texts == 50 and len(dm.winoground) == 8
    assert dm.paths["scenes"].name == "scenes.jsonl" and dm.train_truth is not None
    # the training pools: positives with their own image, negatives never a true match
    pools = dm.train_pools
    assert torch.equal(pools.txt2img, tr.txt2img) and len(pools.positives) == 300
    g = torch.Generator().manual_seed(0)
    sampler = dm.negative_sampler()
    for t in (0, 7, 299):
        j = int(tr.txt2img[t])
        assert j not in sampler.images(t, 39, g).tolist()
        assert all(int(tr.txt2img[c]) != j for c in sampler.texts(j, 20, g).tolist())
    store = dm.pair_store("train")
    assert store.num_captions == 300 and store.num_images == 60


def test_datamodule_reads_what_open_data_reads(tmp_path):
    """The datamodule and the evaluators read a data config through the same reader."""
    from cacr.data.sources import open_data

    dm = _dm(tmp_path)
    dm.setup()
    data = open_data(dm.data_config)
    for role in ("train", "val", "test"):
        ours, theirs = data.split(role), dm.splits[role]
        assert ours.caption_ids == theirs.caption_ids and ours.image_ids == theirs.image_ids
        assert all(torch.equal(a, b) for a, b in zip(ours.texts, theirs.texts))
    wino = data.winoground()
    assert wino.examples == dm.winoground.examples
    assert all(torch.equal(a, b) for x, y in zip(wino.texts, dm.winoground.texts) for a, b in zip(x, y))
    assert torch.equal(wino.image_rows, dm.winoground.image_rows)


def test_datamodule_lazy_and_errors(tmp_path):
    dm = _dm(tmp_path, in_memory=False)
    dm.setup()
    assert isinstance(dm.regions, LazyRegions) and dm.split("val").num_texts == 25
    with pytest.raises(ValueError, match="unknown keys \\['bogus'\\]"):
        RetrievalDataModule.from_config({**OmegaConf.to_container(OmegaConf.load(REPO / "conf/data/synthetic.yaml")),
                                         "bogus": 1})
    bad = _dm(tmp_path, source="files", regions=str(tmp_path / "none.h5"), captions=str(tmp_path / "none.h5"))
    with pytest.raises(FileNotFoundError, match="data.regions: .*none.h5 not found"):
        bad.setup()
    wrong = _dm(tmp_path, source="files", regions=str(dm.paths["regions"]), captions=str(dm.paths["captions"]),
                img_dim=32)
    with pytest.raises(ValueError, match="width 64, data.img_dim is 32"):
        wrong.setup()


def test_winoground_missing_image_is_an_error(tmp_path):
    dm = _dm(tmp_path)
    dm.setup()
    lines = dm.paths["winoground_examples"].read_text().splitlines()
    ex = tmp_path / "examples.jsonl"
    ex.write_text("\n".join(lines + [lines[0].replace('"id": 0', '"id": 99').replace("ex_0_img_1", "ex_99_img_1")]))
    bad = _dm(tmp_path, source="files", regions=str(dm.paths["regions"]), captions=str(dm.paths["captions"]),
              winoground_examples=str(ex), winoground_regions=str(dm.paths["winoground_regions"]))
    with pytest.raises(FormatError, match="example 99: image 'ex_99_img_1'"):
        bad.setup()


@pytest.mark.parametrize("in_memory", [True, False])
def test_pair_store_batches_equal_collate(tmp_path, in_memory):
    """``PairStore`` batches (the fast path of training and evaluation) against ``collate`` of
    the split's own pairs (the slow, obvious twin), on random caption/image pairs."""
    dm = _dm(tmp_path, in_memory=in_memory)
    dm.setup()
    s = dm.split("val")
    store = dm.pair_store("val", layout="padded")  # compact PairStore batches carry extra tail padding
    g = torch.Generator().manual_seed(1)
    cap = torch.randint(s.num_texts, (9,), generator=g)
    img = torch.randint(s.num_images, (9,), generator=g)
    fast = store.batch(cap, img)
    slow = collate([s.pair(t, j) for t, j in zip(cap.tolist(), img.tolist())], layout="padded")
    for name in ("input_ids", "img_feat", "img_pos_feat", "attn_mask", "txt_lens", "num_bbs", "region_index"):
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("in_memory", [True, False])
def test_datamodule_pickles_after_setup_for_ddp_spawn(tmp_path, in_memory):
    dm = _dm(tmp_path, in_memory=in_memory)
    dm.setup()
    clone = pickle.loads(pickle.dumps(dm))
    a, b = dm.pair_store("val", layout="padded"), clone.pair_store("val", layout="padded")
    cap, img = torch.arange(4), torch.tensor([0, 1, 2, 0])
    for name in ("input_ids", "img_feat", "img_pos_feat", "attn_mask"):
        assert torch.equal(getattr(a.batch(cap, img), name), getattr(b.batch(cap, img), name))
    assert clone.winoground.examples == dm.winoground.examples
