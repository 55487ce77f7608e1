"""The synthetic compositional world: deterministic, true captions, swap pairs a bag model cannot solve."""
import json
from collections import Counter
from dataclasses import fields

import h5py
import numpy as np
import pytest
from omegaconf import OmegaConf

from cacr.data.datamodule import CONFIG_KEYS
from cacr.data.formats import RegionsFile, check_captions_file, check_regions_file, read_captions
from cacr.data.synthetic import SyntheticConfig, ensure_synthetic, load_scenes, synthetic_vocab
from cacr.data.tokenizer import WordPieceTokenizer

from .conftest import REPO

SMALL = SyntheticConfig(seed=3, n_train=120, n_val=20, n_test=20, n_winoground=40)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_synthetic(SMALL, tmp_path_factory.mktemp("syn"))


def centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def holds(caption: str, scene) -> bool:
    """Slow twin of the grammar: parse ``... <col> <cat> <rel> ... <col> <cat>`` and test it on box centres."""
    words = caption.split()
    for rel in ("left of", "right of", "above", "below"):
        if f" {rel} " in caption:
            left, right = caption.split(f" {rel} ")
            break
    a, b = left.removesuffix(" is").split()[-2:], right.split()[-2:]
    find = lambda cc: [g for g in scene if g["kind"] == "object" and [g["colour"], g["category"]] == cc]  # noqa
    (ga,), (gb,) = find(a), find(b)
    (xa, ya), (xb, yb) = centre(ga["box"]), centre(gb["box"])
    assert len(words) >= 5
    return {"left of": xa < xb - 0.15, "right of": xa > xb + 0.15, "above": ya < yb - 0.15,
            "below": ya > yb + 0.15}[rel]


def test_files_valid_and_complete(world):
    assert check_regions_file(world.regions) == []
    assert check_regions_file(world.winoground_regions) == []
    assert check_captions_file(world.captions, regions_path=world.regions) == []
    t = read_captions(world.captions)
    assert Counter(t.splits) == {"train": 600, "val": 100, "test": 100}
    assert all(v == 5 for v in Counter(t.image_ids).values())
    assert len(t.vocab) == SMALL.vocab_size == len(WordPieceTokenizer.from_vocab_file(world.vocab))
    rf = RegionsFile(world.regions)
    assert rf.feature_dim == SMALL.img_dim and len(rf) == 160
    assert (rf.counts >= SMALL.min_objects + SMALL.min_distractors).all()


def test_every_caption_is_true_of_its_scene(world):
    t = read_captions(world.captions)
    scenes = load_scenes(world.scenes)
    tok = WordPieceTokenizer.from_vocab_file(world.vocab)
    for i in range(len(t)):
        assert holds(t.texts[i], scenes[t.image_ids[i]]), t.texts[i]
        assert t.tokens(i).tolist() == tok.encode(t.texts[i])
        assert tok.unk_id not in t.tokens(i).tolist()


def test_scenes_match_region_rows(world):
    rf = RegionsFile(world.regions)
    scenes = load_scenes(world.scenes)
    for i in (0, 7, 100):
        _, b, _ = rf.get(i)
        np.testing.assert_allclose(b[:, :4], np.array([g["box"] for g in scenes[rf.image_ids[i]]]), atol=1e-5)


def _sorted_rows(a):
    return a[np.lexsort(a.T[::-1])]


def test_winoground_swap_pairs(world):
    rf = RegionsFile(world.winoground_regions)
    scenes = load_scenes(world.winoground_scenes)
    tok = WordPieceTokenizer.from_vocab_file(world.vocab)
    examples = [json.loads(x) for x in open(world.winoground_examples)]
    assert len(examples) == 40
    assert Counter(e["collapsed_tag"] for e in examples) == {"Relation": 20, "Object": 20}
    for e in examples:
        assert set(e) >= {"id", "image_0", "image_1", "caption_0", "caption_1", "tag", "secondary_tag",
                          "num_main_preds", "collapsed_tag"}
        assert e["image_0"] == f"ex_{e['id']}_img_0" and e["image_1"] == f"ex_{e['id']}_img_1"
        c0, c1 = e["caption_0"], e["caption_1"]
        assert c0 != c1 and Counter(tok.encode(c0)) == Counter(tok.encode(c1))  # bag of words: same
        f0, b0, _ = rf.get(rf.index(e["image_0"]))
        f1, b1, _ = rf.get(rf.index(e["image_1"]))
        np.testing.assert_array_equal(_sorted_rows(f0), _sorted_rows(f1))  # bag of regions: same
        assert not np.array_equal(_sorted_rows(np.concatenate([f0, b0.astype(np.float16)], 1)),
                                  _sorted_rows(np.concatenate([f1, b1.astype(np.float16)], 1)))
        s0, s1 = scenes[e["image_0"]], scenes[e["image_1"]]
        assert holds(c0, s0) and holds(c1, s1) and not holds(c0, s1) and not holds(c1, s0), e


def test_deterministic_from_seed(world, tmp_path):
    again = ensure_synthetic(SMALL, tmp_path)
    for a, b in ((world.regions, again.regions), (world.captions, again.captions)):
        with h5py.File(a) as fa, h5py.File(b) as fb:
            assert set(fa) == set(fb)
            for k in fa:
                np.testing.assert_array_equal(fa[k][:], fb[k][:])
    assert world.winoground_examples.read_text() == again.winoground_examples.read_text()
    other = ensure_synthetic(SyntheticConfig(**{**SMALL.__dict__, "seed": 4}), tmp_path)
    assert other.root != again.root
    assert not np.array_equal(RegionsFile(other.regions).get(0)[0], RegionsFile(again.regions).get(0)[0])


def test_cached_world_is_reused(world):
    before = world.regions.stat().st_mtime_ns
    assert ensure_synthetic(SMALL, world.root.parent) == world
    assert world.regions.stat().st_mtime_ns == before


def test_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size=10"):
        synthetic_vocab(10)


def test_data_configs_share_keys_and_match_the_code():
    syn = OmegaConf.to_container(OmegaConf.load(REPO / "conf/data/synthetic.yaml"))
    f30k = OmegaConf.to_container(OmegaConf.load(REPO / "conf/data/flickr30k.yaml"))
    assert list(syn) == list(f30k) == list(CONFIG_KEYS)
    assert (f30k["vocab_size"], f30k["img_dim"]) == (28996, 2048)
    assert set(syn["synthetic"]) == {f.name for f in fields(SyntheticConfig)} - {"img_dim", "vocab_size"}
    assert syn["vocab_size"] >= len([t for t in synthetic_vocab(syn["vocab_size"]) if not t.startswith("[unused")])


def test_a_smaller_inventory_uses_only_its_objects_and_keeps_the_swap_pairs(tmp_path):
    cfg = SyntheticConfig(seed=5, n_train=40, n_val=4, n_test=4, n_winoground=20, n_categories=3, n_colours=2)
    paths = ensure_synthetic(cfg, tmp_path)
    cats, cols = {"mug", "dog", "cup"}, {"red", "blue"}
    kinds = set()
    for scenes in (load_scenes(paths.scenes), load_scenes(paths.winoground_scenes)):
        for regions in scenes.values():
            for g in regions:
                if g["kind"] == "object":
                    assert g["category"] in cats and g["colour"] in cols, g
                    kinds.add((g["colour"], g["category"]))
    assert len(kinds) == 6  # every kind of the inventory appears
    t = read_captions(paths.captions)
    scenes = load_scenes(paths.scenes)
    assert all(holds(t.texts[i], scenes[t.image_ids[i]]) for i in range(len(t)))
    wscenes = load_scenes(paths.winoground_scenes)
    for e in map(json.loads, open(paths.winoground_examples)):
        s0, s1 = wscenes[e["image_0"]], wscenes[e["image_1"]]
        assert holds(e["caption_0"], s0) and holds(e["caption_1"], s1)
        assert not holds(e["caption_0"], s1) and not holds(e["caption_1"], s0)


@pytest.mark.parametrize("kw, message", [({"n_categories": 1}, "n_categories=1"), ({"n_colours": 9}, "n_colours=9"),
                                         ({"n_categories": 2, "n_colours": 2, "max_objects": 5}, "max_objects=5")])
def test_inventory_out_of_range(kw, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**kw)


NOVEL = SyntheticConfig(seed=6, n_train=150, n_val=10, n_test=10, n_winoground=8, novel_pairs=3, n_novel=12,
                        n_categories=4, n_colours=3)


def _kinds(caption):
    """The (colour, category) pairs a caption names, by the grammar's words."""
    from cacr.data.synthetic import CATEGORIES, COLOURS

    w = caption.split()
    return [(w[i], w[i + 1]) for i in range(len(w) - 1) if w[i] in COLOURS and w[i + 1] in CATEGORIES]


def test_the_novel_split_relates_only_pairs_no_training_caption_relates(tmp_path):
    """data.synthetic.novel_pairs / n_novel: every novel example's two captions relate a held-out
    pair of object kinds, no training caption relates one (nor, so, any training negative's
    caption), the captions are true of their images, and the dev/test halves are untouched."""
    w = ensure_synthetic(NOVEL, tmp_path)
    held = {frozenset(tuple(x.split()) for x in p) for p in json.loads((w.root / "winoground" / "held_out_pairs.json").read_text())}
    assert len(held) == 2 * NOVEL.novel_pairs
    t = read_captions(w.captions)
    relational = [k for k, s in zip(map(_kinds, t.texts), t.splits) if s == "train" and len(k) == 2]
    assert len(relational) >= 5 * NOVEL.n_train * 0.9
    assert not [k for k in relational if frozenset(k) in held]
    examples = [json.loads(x) for x in open(w.winoground_examples)]
    novel = [e for e in examples if e["split"] == "novel"]
    assert len(novel) == NOVEL.n_novel and Counter(e["collapsed_tag"] for e in novel) == {"Relation": 6, "Object": 6}
    assert [json.loads(x) for x in open(w.root / "winoground" / "novel.jsonl")] == novel
    scenes = load_scenes(w.winoground_scenes)
    for e in novel:
        for c in (e["caption_0"], e["caption_1"]):
            assert frozenset(_kinds(c)) in held, c
        s0, s1 = scenes[e["image_0"]], scenes[e["image_1"]]
        assert holds(e["caption_0"], s0) and holds(e["caption_1"], s1)
        assert not holds(e["caption_0"], s1) and not holds(e["caption_1"], s0)
    assert {e["split"] for e in examples} == {"dev", "test", "novel"}
    # the training half of the world does see the held-out kinds, just never related to each other
    named = {k for ks in map(_kinds, t.texts) for k in ks}
    assert {k for p in held for k in p} <= named


def test_worlds_without_a_novel_split_keep_their_names_and_bad_settings_are_refused():
    assert SyntheticConfig(seed=3, novel_pairs=0, n_novel=0).key() == SyntheticConfig(seed=3).key()
    assert NOVEL.key() != SyntheticConfig(**{**NOVEL.__dict__, "novel_pairs": 0, "n_novel": 0}).key()
    with pytest.raises(ValueError, match="n_novel=4 needs novel_pairs"):
        SyntheticConfig(n_novel=4)
    from cacr.data.synthetic import World, held_out_pairs

    with pytest.raises(ValueError, match="novel_pairs=99 exceeds"):
        held_out_pairs(World(SyntheticConfig(n_categories=2, n_colours=2, max_objects=2, novel_pairs=99)))
