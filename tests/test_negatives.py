"""Training negatives on the synthetic world: never a true match, hard ones as defined, checked
against the scenes by a rule written independently of cacr.data.negatives."""
import json
import re

import pytest
import torch

from cacr.data.negatives import NegativeSampler, SceneTruth, parse_caption
from cacr.data.synthetic import SyntheticConfig, ensure_synthetic, load_scenes
from cacr.train_data import TrainingDataModule

WORLD = dict(seed=3, img_dim=16, vocab_size=64, n_train=150, n_val=10, n_test=10, n_winoground=40,
             min_distractors=0, max_distractors=1, n_categories=4, n_colours=3, twin_prob=0.5, absolute_captions=2)


# ------------------------------------------------------------------ an independent rule
def _truth(caption: str, scene) -> bool:
    """Is the caption true of the scene: some (colour, category) A and B, cells from box centres;
    an absolute caption ("a red mug is left"): some A in the first column (last; top; bottom row)."""
    words = caption.replace("there is ", "").replace(" is ", " ").split()
    words = [w for w in words if w not in ("a", "an", "the")]
    col_a, cat_a = words[0], words[1]
    rel = " ".join(words[2:-2])
    col_b, cat_b = words[-2], words[-1]

    def cells(col, cat):
        out = []
        for g in scene:
            if g["kind"] == "object" and g["colour"] == col and g["category"] == cat:
                x1, y1, x2, y2 = g["box"]
                out.append((int((y1 + y2) / 2 * 3), int((x1 + x2) / 2 * 3)))  # (row, column)
        return out

    if len(words) == 3:
        edge = {"left": lambda a: a[1] == 0, "right": lambda a: a[1] == 2, "above": lambda a: a[0] == 0,
                "below": lambda a: a[0] == 2}[words[2]]
        return any(edge(a) for a in cells(col_a, cat_a))
    test = {"left of": lambda a, b: a[1] < b[1], "right of": lambda a, b: a[1] > b[1],
            "above": lambda a, b: a[0] < b[0], "below": lambda a, b: a[0] > b[0]}[rel]
    return any(test(a, b) for a in cells(col_a, cat_a) for b in cells(col_b, cat_b))


def _bag(caption: str):
    words = [w for w in re.split(r"\s+", caption) if w not in ("a", "an", "the", "there", "is", "left", "right", "of",
                                                                  "above", "below")]
    return set(words[0::2]), set(words[1::2])  # colours, categories


def _scene_bag(scene):
    objs = [g for g in scene if g["kind"] == "object"]
    return {g["colour"] for g in objs}, {g["category"] for g in objs}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    paths = ensure_synthetic(SyntheticConfig(**WORLD), root)
    dm = TrainingDataModule(name="synthetic", source="synthetic", root=str(root), regions=None, captions=None,
                            tokenizer=None, winoground_examples=None, winoground_regions=None, vocab_size=64,
                            img_dim=16, p_hard=0.5,
                            synthetic={k: v for k, v in WORLD.items() if k not in ("img_dim", "vocab_size")})
    dm.setup()
    from cacr.data.formats import read_captions

    cap = read_captions(paths.captions)
    text_of = dict(zip(cap.caption_ids, cap.texts))
    split = dm.split("train")
    texts = [text_of[c] for c in split.caption_ids]
    scenes_by_id = load_scenes(paths.scenes)
    scenes = [scenes_by_id[i] for i in split.image_ids]
    return dm, paths, texts, scenes


def test_parse_caption_reads_every_template_and_names_a_bad_one():
    for t in ("a red mug left of a blue dog", "there is an orange cup above a red box", "the red mug is below the blue dog"):
        cat_a, col_a, rel, cat_b, col_b = parse_caption(t)
        assert (cat_a, col_a, rel, cat_b, col_b) != (cat_b, col_b, rel, cat_a, col_a)
    assert parse_caption("a red mug left of a blue dog") == parse_caption("the red mug is left of the blue dog")
    facts = {parse_caption(f"a red mug is {p}") for p in ("left", "right", "above", "below")}
    assert len(facts) == 4 and not facts & {parse_caption("a red mug left of a red mug")}
    with pytest.raises(ValueError, match="caption 7.*not a synthetic-world caption"):
        parse_caption("a red mug near a blue dog", where="caption 7")
    with pytest.raises(ValueError, match="not a synthetic-world caption"):
        parse_caption("a red mug is near")


def test_the_world_writes_absolute_captions_that_hold(world):
    _, paths, texts, scenes = world
    absolute = [t for t in texts if t.split()[-1] in ("left", "right", "above", "below")]
    assert len(absolute) > 0.25 * len(texts)  # 2 of each image's 7 captions (fewer when a scene has fewer facts)
    assert {t.split()[-1] for t in absolute} == {"left", "right", "above", "below"}
    from cacr.data.formats import read_captions

    cap = read_captions(paths.captions)
    assert not [t for t, s in zip(cap.texts, cap.splits) if s != "train" and t.split()[-1] in ("left", "right", "above", "below")]
    with pytest.raises(ValueError, match="absolute_captions=-1 must be >= 0"):
        SyntheticConfig(**{**WORLD, "absolute_captions": -1})
    assert SyntheticConfig(**{**WORLD, "absolute_captions": 0}).key() == SyntheticConfig(
        **{k: v for k, v in WORLD.items() if k != "absolute_captions"}).key()  # worlds without them keep their folder


def test_scene_truth_equals_the_independent_rule(world):
    dm, _, texts, scenes = world
    truth = dm.train_truth
    c = torch.arange(0, len(texts), 7)
    got = truth.true_images(c)
    want = torch.tensor([[_truth(texts[int(ci)], s) for s in scenes] for ci in c])
    assert torch.equal(got, want)
    assert want.sum() > len(c)  # some captions are true of images other than their own
    i = torch.arange(0, len(scenes), 5)
    assert torch.equal(truth.true_texts(i), got.new_tensor([[_truth(t, scenes[int(ii)]) for t in texts] for ii in i]))


def test_no_negative_is_a_true_match_and_hard_ones_are_hard(world):
    dm, _, texts, scenes = world
    pools = dm.train_pools
    for p_hard in (0.0, 0.5, 1.0):
        sampler = NegativeSampler(pools.txt2img, pools.positives, pools.num_images, dm.train_truth, p_hard)
        g = torch.Generator().manual_seed(1)
        n_hard_img = n_hard_txt = 0
        for c in range(0, len(texts), 3):
            img = int(pools.txt2img[c])
            neg_img = sampler.images(c, 12, g)
            neg_txt = sampler.texts(img, 12, g)
            assert len(set(neg_img.tolist())) == 12 and len(set(neg_txt.tolist())) == 12
            assert not any(_truth(texts[c], scenes[int(j)]) for j in neg_img)
            assert not any(_truth(texts[int(t)], scenes[img]) for t in neg_txt)
            cols, cats = _bag(texts[c])
            n_hard_img += sum(cols <= _scene_bag(scenes[int(j)])[0] and cats <= _scene_bag(scenes[int(j)])[1]
                              for j in neg_img)
            n_hard_txt += sum(_bag(texts[int(t)])[0] <= _scene_bag(scenes[img])[0]
                              and _bag(texts[int(t)])[1] <= _scene_bag(scenes[img])[1] for t in neg_txt)
        n = 12 * len(range(0, len(texts), 3))
        if p_hard == 1.0:  # hard pools are large in this small inventory: (nearly) every slot is hard
            assert n_hard_img > 0.9 * n and n_hard_txt > 0.9 * n
        if p_hard == 0.0:  # random draws are hard only by chance
            assert n_hard_img < 0.8 * n
        if p_hard == 0.5:
            assert 0.4 * n < n_hard_txt


def test_without_scene_truth_only_the_own_image_and_captions_are_excluded(world):
    dm, _, texts, scenes = world
    pools = dm.train_pools
    sampler = NegativeSampler(pools.txt2img, pools.positives, pools.num_images)
    g = torch.Generator().manual_seed(0)
    seen_true = False
    for c in range(len(texts)):
        neg = sampler.images(c, pools.num_images - 1, g)  # every other image
        assert int(pools.txt2img[c]) not in neg.tolist()
        seen_true |= any(_truth(texts[c], scenes[int(j)]) for j in neg)
        if seen_true:
            break
    assert seen_true  # the official behaviour keeps false negatives: the filter is what removes them
    with pytest.raises(ValueError, match="p_hard=0.5.*scenes of a synthetic world"):
        NegativeSampler(pools.txt2img, pools.positives, pools.num_images, None, 0.5)


def test_hard_negatives_have_a_slow_twin(world):
    dm, _, texts, scenes = world
    truth = dm.train_truth
    c = torch.arange(0, len(texts), 11)
    want = torch.tensor([[(_bag(texts[int(ci)])[0] <= _scene_bag(s)[0] and _bag(texts[int(ci)])[1] <= _scene_bag(s)[1]
                           and not _truth(texts[int(ci)], s)) for s in scenes] for ci in c])
    assert torch.equal(truth.hard_images(c), want)
    i = torch.arange(0, len(scenes), 13)
    want = torch.tensor([[(_bag(t)[0] <= _scene_bag(scenes[int(ii)])[0] and _bag(t)[1] <= _scene_bag(scenes[int(ii)])[1]
                           and not _truth(t, scenes[int(ii)])) for t in texts] for ii in i])
    assert torch.equal(truth.hard_texts(i), want)


def _objects(caption: str):
    """The (colour, category) objects a caption names, read word by word."""
    words = [w for w in caption.split() if w not in ("a", "an", "the", "there", "is", "of")]
    return {(words[0], words[1]), (words[-2], words[-1])} if len(words) > 3 else {(words[0], words[1])}


def _scene_objects(scene):
    return {(g["colour"], g["category"]) for g in scene if g["kind"] == "object"}


def test_object_pool_has_a_slow_twin(world):
    dm, _, texts, scenes = world
    truth = dm.train_truth
    c = torch.arange(0, len(texts), 11)
    want = torch.tensor([[_objects(texts[int(ci)]) <= _scene_objects(s) for s in scenes] for ci in c])
    assert torch.equal(truth.object_images(c), want)
    assert (want & ~truth.true_images(c)).any()  # some images hold both objects, the relation the other way
    i = torch.arange(0, len(scenes), 13)
    want = torch.tensor([[_objects(t) <= _scene_objects(scenes[int(ii)]) for t in texts] for ii in i])
    assert torch.equal(truth.object_texts(i), want)
    sub = torch.arange(0, len(texts), 3)
    assert torch.equal(truth.object_texts(i, sub), want[:, sub])


def test_the_object_pool_draws_negatives_only_the_relation_tells_apart(world):
    dm, _, texts, scenes = world
    pools = dm.train_pools
    sampler = NegativeSampler(pools.txt2img, pools.positives, pools.num_images, dm.train_truth, 1.0, "objects")
    g = torch.Generator().manual_seed(2)
    n_img = n_txt = n = 0
    for c in range(0, len(texts), 3):
        img = int(pools.txt2img[c])
        neg_img, neg_txt = sampler.images(c, 6, g), sampler.texts(img, 6, g)
        assert not any(_truth(texts[c], scenes[int(j)]) for j in neg_img)
        assert not any(_truth(texts[int(t)], scenes[img]) for t in neg_txt)
        n_img += sum(_objects(texts[c]) <= _scene_objects(scenes[int(j)]) for j in neg_img)
        n_txt += sum(_objects(texts[int(t)]) <= _scene_objects(scenes[img]) for t in neg_txt)
        n += 6
    # the pool runs out for some positives (then the rest are drawn at random), but most slots are in it
    assert n_img > 0.5 * n and n_txt > 0.5 * n
    bag = NegativeSampler(pools.txt2img, pools.positives, pools.num_images, dm.train_truth, 1.0, "bag")
    g = torch.Generator().manual_seed(2)
    n_bag = sum(_objects(texts[c]) <= _scene_objects(scenes[int(j)])
                for c in range(0, len(texts), 3) for j in bag.images(c, 6, g))
    assert n_bag < 0.9 * n_img  # the bag pool is wider: fewer of its draws hold both named objects
    with pytest.raises(ValueError, match="data.hard_pool must be one of.*'pairs'"):
        NegativeSampler(pools.txt2img, pools.positives, pools.num_images, dm.train_truth, 1.0, "pairs")
    with pytest.raises(ValueError, match="data.hard_pool must be one of.*'pairs'"):
        TrainingDataModule(name="synthetic", source="synthetic", root=None, regions=None, captions=None, tokenizer=None,
                           winoground_examples=None, winoground_regions=None, vocab_size=64, img_dim=16,
                           hard_pool="pairs")
    dm.hard_pool = "objects"
    try:
        assert dm.negative_sampler().hard_pool == "objects"  # the data config's choice reaches the sampler
    finally:
        dm.hard_pool = "bag"


def _layout(scene):
    return tuple(sorted((g["category"], g["colour"], int((g["box"][1] + g["box"][3]) / 2 * 3),
                         int((g["box"][0] + g["box"][2]) / 2 * 3)) for g in scene if g["kind"] == "object"))


def test_box_swaps_name_the_captions_objects_and_make_it_false(world):
    dm, paths, texts, scenes = world
    split = dm.split("train")
    held_out = {_layout(s) for s in load_scenes(paths.winoground_scenes).values()}
    rows = dm.swap_rows()
    assert rows.shape == (len(texts), 2)
    n_swaps = 0
    for c, (a, b) in enumerate(rows.tolist()):
        scene = scenes[int(split.txt2img[c])]
        words = [w for w in texts[c].replace("there is ", "").replace(" is ", " ").split() if w not in ("a", "an", "the")]
        if len(words) == 3:  # absolute: one object, no swap
            assert (a, b) == (-1, -1)
            continue
        if a < 0:  # only where the swap would repeat an evaluation layout
            swapped = [dict(g) for g in scene]
            named = [k for k, g in enumerate(scene) if (g["colour"], g["category"]) in {(words[0], words[1]), (words[-2], words[-1])}]
            swapped[named[0]]["box"], swapped[named[1]]["box"] = scene[named[1]]["box"], scene[named[0]]["box"]
            assert _layout(swapped) in held_out
            continue
        n_swaps += 1
        assert (scene[a]["colour"], scene[a]["category"]) == (words[0], words[1])
        assert (scene[b]["colour"], scene[b]["category"]) == (words[-2], words[-1])
        swapped = [dict(g) for g in scene]
        swapped[a]["box"], swapped[b]["box"] = scene[b]["box"], scene[a]["box"]
        assert _truth(texts[c], scene) and not _truth(texts[c], swapped)
        assert _layout(swapped) not in held_out
    assert n_swaps > 0.5 * len(texts)


def test_batches_with_p_swap_put_the_own_image_first(world):
    dm, _, texts, scenes = world
    from cacr.train_data import TrainBatches

    split = dm.split("train")
    rows = dm.swap_rows()
    kw = dict(batch_size=6, num_candidates=5, seed=0, txt_lens=torch.tensor([t.numel() for t in split.texts]),
              num_bbs=torch.ones(split.num_images, dtype=torch.long))
    pools = dm.train_pools
    plain = TrainBatches(pools, **kw, sampler=NegativeSampler(pools.txt2img, pools.positives, pools.num_images,
                                                              dm.train_truth, 0.5))
    swapped = TrainBatches(pools, **kw, sampler=NegativeSampler(pools.txt2img, pools.positives, pools.num_images,
                                                                dm.train_truth, 0.5, "bag", 1.0, rows))
    n = 0
    for step in range(8):
        x, y = plain[step], swapped[step]
        assert "swap_rows" not in x  # only a sampler with p_swap > 0 adds them
        for k in ("cap_idx", "img_idx", "neg_cap"):  # the draws are those of the run without swaps
            assert torch.equal(x[k], y[k])
        has = y["swap_rows"][:, 0] >= 0
        assert torch.equal(has, rows[y["cap_idx"], 0] >= 0)  # p_swap = 1: wherever a swap exists
        assert torch.equal(y["swap_rows"][has], rows[y["cap_idx"][has]])
        assert torch.equal(y["neg_img"][has, 0], y["img_idx"][has])
        assert torch.equal(y["neg_img"][~has], x["neg_img"][~has]) and torch.equal(y["neg_img"][:, 1:], x["neg_img"][:, 1:])
        n += int(has.sum())
    assert n > 0
    with pytest.raises(ValueError, match="data.p_swap=0.5: box-swapped images need the scenes"):
        NegativeSampler(pools.txt2img, pools.positives, pools.num_images, dm.train_truth, 0.0, "bag", 0.5)
    with pytest.raises(ValueError, match="data.p_swap must be in"):
        NegativeSampler(pools.txt2img, pools.positives, pools.num_images, dm.train_truth, 0.0, "bag", 1.5, rows)


def test_no_retrieval_scene_repeats_an_evaluation_layout(world):
    _, paths, _, _ = world

    def layout(scene):
        return tuple(sorted((g["category"], g["colour"], int((g["box"][1] + g["box"][3]) / 2 * 3),
                             int((g["box"][0] + g["box"][2]) / 2 * 3)) for g in scene if g["kind"] == "object"))

    held_out = {layout(s) for s in load_scenes(paths.winoground_scenes).values()}
    assert not held_out & {layout(s) for s in load_scenes(paths.scenes).values()}


def test_winoground_set_has_a_dev_and_a_test_half(world):
    _, paths, _, _ = world
    read = lambda p: [json.loads(line) for line in open(p)]  # noqa: E731
    every, dev, test = read(paths.winoground_examples), read(paths.winoground_dev), read(paths.winoground_test)
    assert len(every) == WORLD["n_winoground"] and len(dev) == len(test) == len(every) // 2
    assert {e["id"] for e in dev}.isdisjoint({e["id"] for e in test})
    assert [e for e in every if e["split"] == "dev"] == dev
    for half in (dev, test):
        tags = [e["collapsed_tag"] for e in half]
        assert tags.count("Relation") == tags.count("Object")


def test_training_batches_draw_through_the_sampler(world):
    """TrainBatches' negatives are the scene-checked ones (p_hard from the data config)."""
    dm, _, texts, scenes = world
    split = dm.split("train")
    from cacr.train_data import TrainBatches

    batches = TrainBatches(dm.train_pools, batch_size=4, num_candidates=8, seed=0,
                           txt_lens=torch.tensor([t.numel() for t in split.texts]),
                           num_bbs=torch.ones(split.num_images, dtype=torch.long), sampler=dm.negative_sampler())
    for step in range(5):
        b = batches[step]
        for c, ni in zip(b["cap_idx"].tolist(), b["neg_img"]):
            assert not any(_truth(texts[c], scenes[int(j)]) for j in ni)
        for i, nc in zip(b["img_idx"].tolist(), b["neg_cap"]):
            assert not any(_truth(texts[int(t)], scenes[i]) for t in nc)


def test_a_killed_generation_leaves_nothing_behind(tmp_path):
    import os
    import subprocess
    import sys

    cfg = SyntheticConfig(**{**WORLD, "n_train": 12, "n_winoground": 4})
    final = f"seed{cfg.seed}-{cfg.key()}"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".tmp-{final}-{dead.pid}"
    (stale / "winoground").mkdir(parents=True)
    (stale / "regions.h5").write_bytes(b"half written")
    mine = tmp_path / f".tmp-{final}-{os.getpid()}-other"  # not a pid suffix: left alone
    mine.mkdir()
    ensure_synthetic(cfg, tmp_path)
    assert not stale.exists() and mine.exists()
    assert (tmp_path / final / "MANIFEST.json").is_file()
