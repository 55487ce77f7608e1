"""Compositional multiple-choice evaluation (cacr/evaluation/multiple_choice.py,
eval_multiple_choice.py): readers of the public ARO / SugarCrepe / VALSE formats on the
files in tests/fixtures/multiple_choice, one-line errors, the synthetic set derived from
Winoground-format examples, metrics against loop twins, scores against a per-pair slow
twin and against the Winoground evaluator, and 1 vs 2 processes."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from cacr.data.formats import RegionsWriter
from cacr.data.synthetic_mc import multiple_choice_items, write_multiple_choice
from cacr.data.tokenizer import SPECIAL_TOKENS
from cacr.evaluation import cli
from cacr.evaluation.bootstrap import macro_interval, macro_mean, wilson
from cacr.evaluation.multiple_choice import (ARO_SYMMETRIC_RELATIONS, Item, MultipleChoiceSet, accuracy_summary,
                                             correct_items, macro_summary, read_file, read_set, results_markdown,
                                             run_multiple_choice, set_results)
from cacr.evaluation.scorefile import read_score_file, read_winoground_examples
from cacr.model import build_uniter, collate
from cacr.model.batch import PairExample

from .conftest import REPO, synthetic_world
from .test_eval_cli import _env, _free_port, save_ckpt, tiny_config

MC = Path(__file__).parent / "fixtures" / "multiple_choice"
FILES = {
    "vg_relation": MC / "aro" / "visual_genome_relation.json",
    "vg_attribution": MC / "aro" / "visual_genome_attribution.json",
    "coco_order": MC / "aro" / "coco_order.json",
    "flickr30k_order": MC / "aro" / "flickr30k_order.json",
    "sugarcrepe": [MC / "sugarcrepe" / "replace_rel.json", MC / "sugarcrepe" / "swap_att.json"],
    "valse": [MC / "valse" / "action-replacement.json", MC / "valse" / "existence.json"],
}
WORLD = dict(n_train=20, n_val=10, n_test=10, n_winoground=16)
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- readers


def test_readers_of_the_public_formats():
    fmt, items = read_file(FILES["vg_relation"])
    assert fmt == "aro_relation" and len(items) == 5
    assert items[0].captions == ("the horse is eating the grass", "the grass is eating the horse")
    assert items[0].image == "2315375" and items[0].key == "visual_genome_relation/0"
    assert [it.tags["relation"] for it in items] == ["eating", "on", "on", "eating", "next to"]
    assert items[2].box == (5.0, 5.0, 100.0, 80.0)  # ARO crops the image to bbox_x, bbox_y, bbox_w, bbox_h

    fmt, items = read_file(FILES["vg_attribution"])
    assert fmt == "aro_attribution" and items[1].tags == {"attributes": "brown_white"}
    assert items[1].captions[0] == "the brown dog and the white cake"

    fmt, items = read_file(FILES["coco_order"])
    assert fmt == "aro_order" and len(items[0].captions) == 5 and items[0].tags == {}
    assert items[0].image == "COCO_val2014_000000391895"
    assert read_file(FILES["coco_order"], image_key="path")[1][0].image == "val2014/COCO_val2014_000000391895.jpg"
    assert read_file(FILES["coco_order"], image_key="name")[1][0].image == "COCO_val2014_000000391895.jpg"
    fmt, items = read_file(FILES["flickr30k_order"])
    assert fmt == "aro_order" and items[1].captions[0] == items[1].captions[2]  # a perturbation that changed nothing

    # SugarCrepe: items of the published files, unchanged
    s = read_set("sugarcrepe", [str(p) for p in FILES["sugarcrepe"]])
    assert s.format == "sugarcrepe" and len(s.items) == 5 and s.kept is None
    assert s.items[0].key == "replace_rel/0" and s.items[0].image == "000000397133"
    assert s.items[0].captions == ("A man is in a kitchen making pizzas.",
                                   "A man is in a kitchen cleaning up after making pizzas.")
    assert s.items[3].tags == {"category": "swap_att", "type": "swap", "target": "att"}

    # VALSE: "foil" a string; only the valid items (mturk.caption >= 2) by default, counted
    v = read_set("valse", str(MC / "valse" / "*.json"))  # a glob, files in sorted order
    assert [p.name for p in v.files] == ["action-replacement.json", "existence.json"]
    assert v.format == "valse" and [it.key for it in v.items] == [
        "action-replacement/actions_test_0", "existence/v7w_1", "existence/v7w_2"]
    assert v.kept == {"rule": "mturk.caption >= 2", "kept": 3, "of": 5}
    assert v.items[0].captions == ("A man exercises his torso.", "A torso exercises for a man.")
    assert v.items[0].tags == {"piece": "action-replacement", "phenomenon": "actions"}
    assert v.items[1].image == "v7w_2315375"
    everything = read_set("valse", str(MC / "valse" / "*.json"), valse_valid_only=False)
    assert len(everything.items) == 5 and everything.kept is None


def test_image_key_template():
    """Benchmark file names mapped to UNITER's feature keys (flickr30k_000000830354086-style)."""
    _, items = read_file(FILES["flickr30k_order"], image_key="flickr30k_{stem:0>12}")
    assert items[0].image == "flickr30k_001007129816"
    _, items = read_file(FILES["sugarcrepe"][0], image_key="coco_val2014_{stem}")
    assert items[0].image == "coco_val2014_000000397133"
    _, items = read_file(FILES["coco_order"], image_key="{path}")
    assert items[0].image == "val2014/COCO_val2014_000000391895.jpg"
    with pytest.raises(ValueError, match=r"image_key='basename': expected one of \['stem', 'name', 'path'\] or a template"):
        read_file(FILES["coco_order"], image_key="basename")
    with pytest.raises(ValueError, match=r"image_key='\{file\}': not a template of \{stem\}, \{name\}, \{path\}"):
        read_file(FILES["coco_order"], image_key="{file}")


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


def test_malformed_files_one_line_errors_name_file_and_item(tmp_path):
    vgr = json.loads(FILES["vg_relation"].read_text())
    del vgr[2]["false_caption"]
    p = _write(tmp_path / "vgr.json", vgr)
    with pytest.raises(ValueError, match=r"vgr.json: item 2: 'false_caption' must be a non-empty string, got None"):
        read_file(p)
    sc = json.loads(FILES["sugarcrepe"][0].read_text())
    sc["1"]["negative_caption"] = ""
    p = _write(tmp_path / "replace_obj.json", sc)
    with pytest.raises(ValueError, match=r"replace_obj.json: item '1': 'negative_caption' must be a non-empty"):
        read_file(p)
    with pytest.raises(ValueError, match=r"bad.json: malformed JSON \(.* line 1"):
        read_file(_write(tmp_path / "bad.json", "[{"))
    with pytest.raises(ValueError, match="cannot tell the format"):
        read_file(_write(tmp_path / "odd.json", [{"caption": "a"}]))
    with pytest.raises(ValueError, match=r"expected a JSON list of items \(aro_relation\), got dict"):
        read_file(FILES["sugarcrepe"][0], fmt="aro_relation")
    with pytest.raises(ValueError, match=r"d.jsonl: line 2: duplicate id 'a' \(first on line 1\)"):
        read_file(_write(tmp_path / "d.jsonl", '{"id": "a", "image": "x", "caption": "c", "foils": ["f"]}\n'
                                                 '{"id": "a", "image": "x", "caption": "c", "foils": ["f"]}\n'))
    with pytest.raises(ValueError, match=r"sets.mixed: its files have different formats"):
        read_set("mixed", [str(FILES["coco_order"]), str(FILES["sugarcrepe"][0])])
    with pytest.raises(FileNotFoundError, match="no file matches"):
        read_set("none", str(tmp_path / "*.nothing"))


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_near_misses_of_each_format_one_line_naming_file_item_field(tmp_path):
    # VALSE: the invented list form ("foils": [...]) is not VALSE's layout
    va = json.loads(FILES["valse"][1].read_text())
    va["v7w_2"]["foils"] = [va["v7w_2"].pop("foil")]
    p = _write(tmp_path / "existence.json", va)
    with pytest.raises(ValueError) as e:
        read_file(p)
    assert _one_line(e).startswith(f"{p}: item 'v7w_2': 'foil' must be a non-empty string (VALSE's field")
    # VALSE: no annotator votes, while the validity filter is on
    va = json.loads(FILES["valse"][1].read_text())
    del va["v7w_1"]["mturk"]
    p = _write(tmp_path / "existence.json", va)
    with pytest.raises(ValueError) as e:
        read_file(p)
    assert _one_line(e).startswith(f"{p}: item 'v7w_1': 'mturk' must be an object with an integer 'caption'")
    assert len(read_file(p, valse_votes=False)[1]) == 3
    va["v7w_1"]["mturk"] = {"caption": "3"}
    with pytest.raises(ValueError, match=r"item 'v7w_1': 'mturk' must be an object"):
        read_file(_write(p, va))
    # ARO VG: the box ARO crops to
    vga = json.loads(FILES["vg_attribution"].read_text())
    vga[1]["bbox_w"] = "220"
    p = _write(tmp_path / "vga.json", vga)
    with pytest.raises(ValueError) as e:
        read_file(p)
    assert _one_line(e) == f"{p}: item 1: 'bbox_w' must be a number (ARO's box, in pixels), got '220'"
    vga[1]["bbox_w"] = 0
    with pytest.raises(ValueError, match=r"vga.json: item 1: 'bbox_w' and 'bbox_h' must be positive"):
        read_file(_write(p, vga))
    # ARO order: the Karpathy caption file ARO builds them from, given as is
    with pytest.raises(ValueError) as e:
        read_file(MC / "aro" / "coco_karpathy_test.json")
    msg = _one_line(e)
    assert msg.startswith(f"{MC / 'aro' / 'coco_karpathy_test.json'}: item 0: 'caption_options' missing: a Karpathy "
                          f"caption file")
    assert "save ARO's test cases" in msg
    with pytest.raises(ValueError, match=r"k.json: item 0: 'caption_options' missing: a Karpathy"):
        read_file(_write(tmp_path / "k.json", json.loads((MC / "aro" / "coco_karpathy_test.json").read_text())),
                  fmt="aro_order")
    order = json.loads(FILES["flickr30k_order"].read_text())
    order[1]["caption_options"] = order[1]["caption_options"][:1]
    with pytest.raises(ValueError, match=r"o.json: item 1: 'caption_options' must be a list of at least 2"):
        read_file(_write(tmp_path / "o.json", order))
    # SugarCrepe: the caption under another name
    sc = json.loads(FILES["sugarcrepe"][1].read_text())
    sc["1"]["positive_caption"] = sc["1"].pop("caption")
    p = _write(tmp_path / "swap_att.json", sc)
    with pytest.raises(ValueError) as e:
        read_file(p)
    assert _one_line(e) == f"{p}: item '1': 'caption' must be a non-empty string, got None"


def test_synthetic_set_from_winoground_examples(tmp_path):
    rows = [{"id": i, "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1", "caption_0": f"a{i} left of b{i}",
             "caption_1": f"b{i} left of a{i}", "tag": "t", "secondary_tag": "", "num_main_preds": 1,
             "collapsed_tag": ["Object", "Relation"][i % 2], "relation": "left of", "split": "dev"} for i in range(3)]
    ex = _write(tmp_path / "examples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    out = write_multiple_choice(ex, tmp_path / "mc" / "multiple_choice.jsonl")
    fmt, items = read_file(out)
    assert fmt == "jsonl" and len(items) == 6
    assert items[0].key == "multiple_choice/0_i0" and items[0].image == "ex_0_img_0"
    assert items[0].captions == ("a0 left of b0", "b0 left of a0")
    assert items[3].image == "ex_1_img_1" and items[3].captions == ("b1 left of a1", "a1 left of b1")
    assert items[3].tags == {"collapsed_tag": "Relation", "relation": "left of", "split": "dev"}
    assert [d["id"] for d in multiple_choice_items(ex)] == ["0_i0", "0_i1", "1_i0", "1_i1", "2_i0", "2_i1"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["multiple_choice.jsonl"]


# --------------------------------------------------------------------------- metrics


def test_correct_is_strict_and_ignores_padding():
    nan = float("nan")
    s = torch.tensor([[1.0, 0.0, nan], [1.0, 1.0, nan], [2.0, 1.0, 3.0], [2.0, 1.0, 1.5], [0.5, nan, nan]])
    with pytest.raises(ValueError, match=r"item\(s\) \[4\]"):
        correct_items(s)
    assert correct_items(s[:4]).tolist() == [True, False, False, True]


def test_macro_vectorised_matches_loop_twin():
    g = torch.Generator().manual_seed(0)
    n, C = 57, 6
    correct = torch.rand(n, generator=g) < 0.6
    cats = torch.randint(C, (n,), generator=g)
    idx = torch.randint(n, (40, n), generator=g)
    fast = macro_mean(correct.numpy()[idx.numpy()], cats.numpy()[idx.numpy()], num_cats=C)  # (40,) resamples
    for b in range(idx.shape[0]):
        per = {}
        for i in idx[b].tolist():
            per.setdefault(int(cats[i]), []).append(float(correct[i]))
        assert fast[b].item() == pytest.approx(np.mean([np.mean(v) for v in per.values()]), abs=1e-12)


def test_summaries():
    correct = torch.tensor([True] * 30 + [False] * 10)
    r = accuracy_summary(correct, n_boot=2000, seed=1)
    assert r["accuracy"] == 75.0 and r["n"] == 40
    lo, hi = r["ci95"]
    assert lo < 75.0 < hi and hi - lo < 35
    assert accuracy_summary(correct, n_boot=2000, seed=1) == r  # seeded
    labels = ["a"] * 30 + ["b"] * 6 + ["c"] * 4
    m = macro_summary(correct, labels, n_boot=500)
    assert m["accuracy"] == pytest.approx(100 * (1.0 + 0.0 + 0.0) / 3) and m["n_categories"] == 3
    m25 = macro_summary(correct, labels, min_count=25, n_boot=500)
    assert m25["accuracy"] == 100.0 and m25["n_categories"] == 1 and m25["n"] == 30
    assert macro_summary(correct, labels, min_count=31, n_boot=10) is None
    # every item correct: BCa is undefined, the Wilson interval (the percentile bootstrap gave [100, 100])
    r = accuracy_summary(torch.ones(40, dtype=torch.bool), n_boot=500)
    assert r["ci95"] == [pytest.approx(100 * wilson(40, 40)[0]), 100.0] and r["ci95"][0] < 100
    m = macro_summary(torch.ones(40, dtype=torch.bool), labels, n_boot=500)
    assert m["ci95"] == r["ci95"]
    mi = macro_interval(correct.double().numpy(), np.array([{"a": 0, "b": 1, "c": 2}[x] for x in labels]), n_boot=500)
    assert macro_summary(correct, labels, n_boot=500)["ci95"] == pytest.approx([100 * mi[0], 100 * mi[1]])


def _set(fmt, items, name="x"):
    return MultipleChoiceSet(name, fmt, [Path(f"{name}.json")], items)


def test_benchmark_rules_by_hand():
    """Each benchmark's own numbers on the fixture items, with scores chosen by hand and the
    results worked out from the rules (not from the code)."""
    # ARO VG-Relation: scores [true, false]; ties wrong (argmax over [false, true] picks false);
    # the macro leaves out the symmetric "next to": eating 1/2, on 1/2 -> 50 (with it: 33.33)
    _, items = read_file(FILES["vg_relation"])
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 1.0], [0.0, 3.0]])
    r = set_results(_set("aro_relation", items), scores, n_boot=200)
    assert r["accuracy"] == pytest.approx(40.0)
    assert r["by_tag"]["relation"]["next to"]["accuracy"] == 0.0
    m = r["macro"]["relation"]
    assert m["accuracy"] == pytest.approx(50.0) and m["n_categories"] == 2
    assert (m["excluded_categories"], m["excluded_items"]) == (1, 1)
    assert r["benchmark"]["macro_accuracy"]["value"] == pytest.approx(50.0)
    assert {"next to", "near", "with", "on the side of"} <= ARO_SYMMETRIC_RELATIONS
    assert not {"on", "eating", "holding", "wearing", "sitting on"} & ARO_SYMMETRIC_RELATIONS
    assert len(ARO_SYMMETRIC_RELATIONS) == 157

    # ARO VG-Attribution: the macro over attribute pairs with >= 25 items only
    att = [Item(f"a/{i}", "1", ("t", "f"), {"attributes": "white_wooden" if i < 25 else "brown_white"})
           for i in range(49)]
    scores = torch.tensor([[1.0, 0.0]] * 20 + [[0.0, 1.0]] * 5 + [[0.0, 0.0]] * 24)
    r = set_results(_set("aro_attribution", att), scores, n_boot=200)
    assert r["accuracy"] == pytest.approx(100 * 20 / 49)
    assert r["benchmark"]["macro_accuracy"]["value"] == pytest.approx(80.0)
    assert r["macro"]["attributes"]["n_categories"] == 1

    # ARO order: argmax with the true caption first, so a tie counts as correct
    _, items = read_file(FILES["flickr30k_order"])
    scores = torch.tensor([[1.0, 2.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.5, 0.0]])
    r = set_results(_set("aro_order", items), scores, n_boot=200)
    assert r["accuracy"] == 50.0 and r["benchmark"] == {"precision_at_1": {"value": 50.0, "ci95": r["ci95"]}}
    assert correct_items(scores).tolist() == [False, False]  # the strict rule of the other sets

    # SugarCrepe: per category file, strictly higher (a tie is wrong)
    s = read_set("sugarcrepe", [str(p) for p in FILES["sugarcrepe"]])
    scores = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 2.0]])
    b = set_results(s, scores, n_boot=200)["benchmark"]
    assert {k: v["value"] for k, v in b.items()} == {"replace_rel": pytest.approx(100 / 3), "swap_att": 50.0}

    # VALSE, valid items only (3 of 5): ITM scores (match minus no-match logit), [caption, foil]
    # actions_test_0: 1.5, 0.0 -> acc_r yes, p_c yes, p_f yes (0.0 <= 0: the foil is detected)
    # v7w_1:         -0.2, 0.4 -> acc_r no,  p_c no,  p_f no
    # v7w_2:          0.3, 0.8 -> acc_r no,  p_c yes, p_f no
    v = read_set("valse", [str(p) for p in FILES["valse"]])
    scores = torch.tensor([[1.5, 0.0], [-0.2, 0.4], [0.3, 0.8]])
    r = set_results(v, scores, n_boot=200, threshold=0.0)
    b = r["benchmark"]
    assert r["kept"] == {"rule": "mturk.caption >= 2", "kept": 3, "of": 5} and r["n"] == 3
    assert {k: b[k]["value"] for k in ("acc", "acc_r", "p_c", "p_f")} == pytest.approx(
        {"acc": 50.0, "acc_r": 100 / 3, "p_c": 200 / 3, "p_f": 100 / 3})
    assert r["accuracy"] == pytest.approx(b["acc_r"]["value"])  # acc_r is the pairwise accuracy
    assert {k: b["by_piece"]["existence"][k]["value"] for k in ("acc", "acc_r", "p_c", "p_f")} == pytest.approx(
        {"acc": 25.0, "acc_r": 0.0, "p_c": 50.0, "p_f": 0.0})
    assert b["by_piece"]["action-replacement"]["acc"]["value"] == 100.0
    rank = set_results(v, scores, n_boot=200)["benchmark"]  # no threshold (the rank head): acc_r only
    assert set(rank) == {"acc_r", "by_piece"}
    table = results_markdown("m", {"valse": r})
    assert "`valse`, valse's own metrics (3 of 5 items valid, mturk.caption >= 2): acc 50.00 [" in table


# --------------------------------------------------------------------------- scoring the fixture files


def fixture_words():
    words = set()
    for spec in FILES.values():
        for p in spec if isinstance(spec, list) else [spec]:
            for it in read_file(p)[1]:
                for c in it.captions:
                    words.update(c.split())
    return sorted(words)


@pytest.fixture(scope="module")
def fixture_inputs(tmp_path_factory):
    """A vocabulary of the fixture captions' words, a regions file of their images and a
    tiny random UNITER .ckpt that embeds that vocabulary."""
    d = tmp_path_factory.mktemp("mc")
    vocab = list(SPECIAL_TOKENS) + fixture_words()
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    images = sorted({it.image for spec in FILES.values() for p in (spec if isinstance(spec, list) else [spec])
                     for it in read_file(p)[1]})
    rng = np.random.default_rng(0)
    with RegionsWriter(d / "regions.h5", feature_dim=16, feature_source="random") as w:
        for iid in images:
            m = int(rng.integers(2, 6))
            xy = rng.random((m, 2)) * 0.5
            w.add(iid, rng.standard_normal((m, 16)).astype(np.float16), np.concatenate([xy, xy + 0.3], 1))
    cfg = tiny_config(vocab_size=len(vocab), img_dim=16)
    return d, save_ckpt(d / "tiny.ckpt", cfg, seed=5), cfg


def make_cfg(overrides):
    """Scoring in fp32 unless ``bf16=`` is given (the scores are compared with fp32 twins)."""
    overrides = list(overrides)
    if not any(o.startswith("bf16=") for o in overrides):
        overrides.append("bf16=false")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="multiple_choice", overrides=overrides)


def set_overrides():
    out = []
    for name, spec in FILES.items():
        v = f"[{','.join(str(p) for p in spec)}]" if isinstance(spec, list) else str(spec)
        out.append(f"+sets.{name}={v}")
    return out


def slow_scores(model, vocab_path, regions_path, items):
    """One forward per (caption, image) pair through the collate path, tokenized by the
    Python twin of the tokenizer."""
    from cacr.data.datasets import open_regions

    from .tokenizer_twin import PythonWordPiece

    vocab = Path(vocab_path).read_text().splitlines()
    tok = PythonWordPiece(vocab)
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    regions = open_regions(regions_path, None)
    out = []
    with torch.no_grad():
        for it in items:
            feat, box = regions.get(regions.index(it.image))
            row = []
            for c in it.captions:
                ex = PairExample(torch.tensor([cls, *tok.encode(c), sep]), feat, box)
                row.append(float(model.score(collate([ex], img_dim=model.config.img_dim))))
            out.append(row)
    return out


def test_fixture_sets_scored_as_the_slow_twin(fixture_inputs, tmp_path, capsys):
    d, ckpt, mcfg = fixture_inputs
    out = tmp_path / "out"
    cfg = make_cfg(["data=flickr30k", f"data.tokenizer={d / 'vocab.txt'}", f"regions={d / 'regions.h5'}",
                    f"ckpt_path={ckpt}", f"output={out}", "n_boot=300", "progress=false", "device=cpu",
                    "batch_size=5"] + set_overrides())
    rec = run_multiple_choice(cfg)
    printed = capsys.readouterr().out
    assert list(rec["sets"]) == list(FILES)

    model = build_uniter(mcfg)
    from cacr.model import load_checkpoint

    load_checkpoint(model, torch.load(ckpt, weights_only=True)["state_dict"])
    model.eval()
    lines = [json.loads(x) for x in (out / "multiple_choice_scores.jsonl").read_text().splitlines()]
    n_correct_total = 0
    for name, spec in FILES.items():
        s = read_set(name, [str(p) for p in spec] if isinstance(spec, list) else str(spec))
        want = slow_scores(model, d / "vocab.txt", d / "regions.h5", s.items)
        got = [x for x in lines if x["set"] == name]
        assert [x["id"] for x in got] == [it.key for it in s.items]
        ties = s.format == "aro_order"  # ARO's argmax with the true caption first

        def rule(w):
            return w[0] >= max(w[1:]) if ties else w[0] > max(w[1:])
        for g, w in zip(got, want):
            np.testing.assert_allclose(g["scores"], w, atol=1e-5, rtol=0)
            assert g["correct"] == rule(g["scores"])
            if abs(w[0] - max(w[1:])) > 1e-5:  # an exact tie (equal captions) may differ in the last bits
                assert g["correct"] == rule(w)
        r = rec["sets"][name]
        n_correct = sum(g["correct"] for g in got)
        n_correct_total += n_correct
        assert r["n"] == len(s.items) and r["accuracy"] == pytest.approx(100.0 * n_correct / len(s.items))
        assert r["chance"] == pytest.approx(100.0 * np.mean([1 / len(it.captions) for it in s.items]))
        for tag, cats in r["by_tag"].items():
            assert sum(c["n"] for c in cats.values()) == sum(tag in it.tags for it in s.items)
    assert 0 < n_correct_total < len(lines)  # a non-trivial outcome for this random model
    assert set(rec["sets"]["sugarcrepe"]["by_tag"]) == {"category", "type", "target"}
    assert rec["sets"]["vg_attribution"]["macro"] == {}  # ARO's rule: attribute pairs with >= 25 items only
    assert rec["sets"]["vg_relation"]["macro"]["relation"]["n_categories"] == 2  # "next to" left out
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(rec))
    table = (out / "results.md").read_text()
    assert table == results_markdown(rec["model"], rec["sets"]) and printed.startswith(table)
    assert "| tiny | vg_relation | aro_relation | 5 |" in table
    assert rec["sets"]["valse"]["kept"] == {"rule": "mturk.caption >= 2", "kept": 3, "of": 5}
    assert set(rec["sets"]["valse"]["benchmark"]) == {"acc_r", "by_piece"}  # head=rank: no match threshold
    assert rec["sets"]["vg_relation"]["region_key"] == "image"


def exit_message(overrides) -> str:
    with pytest.raises(SystemExit) as e:
        cli.guarded("eval_multiple_choice.py", run_multiple_choice, make_cfg(overrides))
    return str(e.value.code)


def test_bad_input_one_line(fixture_inputs, tmp_path):
    d, ckpt, _ = fixture_inputs
    base = ["data=flickr30k", f"data.tokenizer={d / 'vocab.txt'}", f"ckpt_path={ckpt}", f"output={tmp_path}",
            "progress=false", "device=cpu"]
    one = f"+sets.vgr={FILES['vg_relation']}"
    assert "need regions=PATH" in exit_message(base + [one])
    (tmp_path / "results.json").write_text("{}")  # an earlier run's output is not replaced silently
    assert "overwrite" in exit_message(base + [one, f"regions={d / 'regions.h5'}"])
    (tmp_path / "results.json").unlink()
    assert exit_message(base + [one, f"regions={tmp_path / 'no.h5'}"]) == \
        f"eval_multiple_choice.py: regions file {tmp_path / 'no.h5'} (set 'vgr') not found"
    bad = json.loads(FILES["vg_relation"].read_text())
    bad[1]["image_path"] = "999.jpg"
    p = _write(tmp_path / "vgr.json", bad)
    msg = exit_message(base + [f"+sets.vgr={p}", f"regions={d / 'regions.h5'}"])
    assert msg == (f"eval_multiple_choice.py: {d / 'regions.h5'}: no regions for 1 of 5 items of set 'vgr': "
                   f"vgr/1 (image '999')")
    assert "'true_caption' must be a non-empty string" in exit_message(
        base + [f"+sets.x={_write(tmp_path / 'e.json', [dict(bad[0], true_caption='')])}", f"regions={d / 'regions.h5'}"])


def test_a_foil_equal_to_its_caption_is_warned_about_and_counted(fixture_inputs, tmp_path, caplog):
    """Issue 30, 9: such an item is always scored wrong (a tie is wrong); the evaluator warns
    (cacr.checks.identical_foils), counts it in results.json and says so in results.md."""
    import logging

    d, ckpt, _ = fixture_inputs
    items = json.loads(FILES["sugarcrepe"][0].read_text())
    items["1"]["negative_caption"] = "  Cars are parked on the street  near an old building."  # spacing
    p = _write(tmp_path / "replace_rel.json", items)
    cfg = make_cfg(["data=flickr30k", f"data.tokenizer={d / 'vocab.txt'}", f"regions={d / 'regions.h5'}",
                    f"ckpt_path={ckpt}", f"output={tmp_path / 'out'}", "n_boot=20", "progress=false",
                    "device=cpu", f"+sets.rel={p}", f"+sets.att={FILES['sugarcrepe'][1]}"])
    with caplog.at_level(logging.WARNING, logger="cacr.checks"):
        rec = run_multiple_choice(cfg)
    assert [r.getMessage() for r in caplog.records] == [
        f"set 'rel' ({p}): 1 item(s) whose foil equals the caption, always scored wrong: 'replace_rel/1'"]
    assert rec["sets"]["rel"]["identical_foils"] == {"n": 1, "items": ["replace_rel/1"]}
    assert rec["sets"]["att"]["identical_foils"] == {"n": 0, "items": []}
    lines = [json.loads(x) for x in (tmp_path / "out" / "multiple_choice_scores.jsonl").read_text().splitlines()]
    assert [x["correct"] for x in lines if x["id"] == "replace_rel/1"] == [False]
    assert "`rel`: 1 item(s) whose foil equals the caption, always scored wrong" in \
        (tmp_path / "out" / "results.md").read_text()


# --------------------------------------------------------------------------- the synthetic default


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic_world(tmp_path_factory.mktemp("world"), WORLD, config="multiple_choice")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_ckpt(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", tiny_config())


def test_synthetic_default_agrees_with_winoground(world, ckpt, tmp_path):
    """With no sets, the synthetic world's set (two items per Winoground-format example);
    its scores are the Winoground evaluator's s(c_k, i_k) and s(c_1-k, i_k)."""
    paths, data = world
    common = data + [f"ckpt_path={ckpt}", "progress=false", "device=cpu", "n_boot=200", "batch_size=6", "bf16=false"]
    rec = run_multiple_choice(make_cfg(common + [f"output={tmp_path / 'mc'}"]))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        wcfg = compose(config_name="winoground", overrides=common + [f"output={tmp_path / 'w'}"])
    cli.run_winoground(wcfg)
    examples = read_winoground_examples(paths.winoground_examples)
    w = read_score_file(tmp_path / "w" / "winoground_scores.jsonl", examples)
    lines = [json.loads(x) for x in (tmp_path / "mc" / "multiple_choice_scores.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * len(examples) == rec["sets"]["synthetic"]["n"]
    for n, ex in enumerate(examples):
        for k in (0, 1):
            line = lines[2 * n + k]
            assert line["id"] == f"multiple_choice/{ex.id}_i{k}"
            np.testing.assert_allclose(line["scores"], [w[n, k, k].item(), w[n, 1 - k, k].item()], atol=1e-5, rtol=0)
    r = rec["sets"]["synthetic"]
    assert set(r["by_tag"]) >= {"collapsed_tag"} and r["chance"] == 50.0
    # the generator's file, when present, is read instead of deriving the set
    mc_file = paths.winoground_examples.parent / "multiple_choice.jsonl"
    write_multiple_choice(paths.winoground_examples, mc_file)
    try:
        rec2 = run_multiple_choice(make_cfg(common + [f"output={tmp_path / 'mc2'}"]))
        assert rec2["sets"]["synthetic"]["files"] == [str(mc_file)]
        assert {k: v for k, v in rec2["sets"]["synthetic"].items() if k != "files"} == \
            {k: v for k, v in r.items() if k != "files"}
    finally:
        mc_file.unlink()


@pytest.mark.slow
def test_two_processes_match_one(fixture_inputs, tmp_path):
    d, ckpt, _ = fixture_inputs
    common = ["data=flickr30k", f"data.tokenizer={d / 'vocab.txt'}", f"regions={d / 'regions.h5'}",
              f"ckpt_path={ckpt}", "progress=false", "device=cpu", "n_boot=300", "batch_size=4"] + set_overrides()
    fp32 = run_multiple_choice(make_cfg(common + ["bf16=false", f"output={tmp_path / 'p32'}"]))
    common.append("bf16=true")  # forced: what auto picks on a GPU or an AVX-512 BF16 CPU
    one = run_multiple_choice(make_cfg(common + [f"output={tmp_path / 'p1'}"]))
    for name, r in one["sets"].items():  # fp32's numbers
        assert r["scoring"]["precision"].startswith("bf16") and fp32["sets"][name]["scoring"]["precision"] == "fp32"
        assert {k: v for k, v in r.items() if k != "scoring"} == \
            {k: v for k, v in fp32["sets"][name].items() if k != "scoring"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(REPO / "eval_multiple_choice.py"), *common, f"output={tmp_path / 'p2'}", f"hydra.run.dir={tmp_path / 'h'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    two = json.loads((tmp_path / "p2" / "results.json").read_text())
    assert two["sets"] == json.loads(json.dumps(one["sets"]))
    s1, s2 = ((tmp_path / p / "multiple_choice_scores.jsonl").read_text().splitlines() for p in ("p1", "p2"))
    assert s1 == s2  # the same bits on 1 and 2 processes
    assert len(s1) == len(s2) == sum(len(read_set("x", [str(p) for p in s] if isinstance(s, list) else str(s)).items)
                                     for s in FILES.values())


def test_valse_itm_metrics_bf16_at_fp32s_numbers_and_config_errors(fixture_inputs, tmp_path):
    """head=itm gives VALSE's acc, p_c, p_f; in bf16 scores near the threshold are decided in
    fp32 (the same record as fp32 scoring); bad region_key / image_key settings in one line."""
    d, ckpt, _ = fixture_inputs
    base = ["data=flickr30k", f"data.tokenizer={d / 'vocab.txt'}", f"regions={d / 'regions.h5'}",
            f"ckpt_path={ckpt}", "progress=false", "device=cpu", "n_boot=200", "head=itm",
            f"+sets.valse=[{','.join(str(p) for p in FILES['valse'])}]"]
    fp32 = run_multiple_choice(make_cfg(base + [f"output={tmp_path / 'a'}"]))["sets"]["valse"]
    assert set(fp32["benchmark"]) == {"acc", "acc_r", "p_c", "p_f", "by_piece"}
    lines = [json.loads(x) for x in (tmp_path / "a" / "multiple_choice_scores.jsonl").read_text().splitlines()]
    sc = torch.tensor([x["scores"] for x in lines])
    assert fp32["benchmark"]["p_c"]["value"] == pytest.approx(100 * (sc[:, 0] > 0).double().mean().item())
    assert fp32["benchmark"]["p_f"]["value"] == pytest.approx(100 * (sc[:, 1] <= 0).double().mean().item())
    bf = run_multiple_choice(make_cfg(base + ["bf16=true", f"output={tmp_path / 'b'}"]))["sets"]["valse"]
    assert bf["scoring"]["precision"].startswith("bf16")
    assert {k: v for k, v in bf.items() if k != "scoring"} == {k: v for k, v in fp32.items() if k != "scoring"}

    out = ["progress=false", f"output={tmp_path / 'c'}"]
    assert exit_message(base + out + ["region_key=crop"]) == \
        "eval_multiple_choice.py: region_key='crop' (set 'valse'): expected one of ['image', 'item']"
    assert "expected one of ['stem', 'name', 'path'] or a template" in exit_message(base + out + ["image_key=basename"])
    msg = exit_message(base + out + ["region_key=item"])
    assert "no regions for 3 of 3 items of set 'valse': action-replacement/actions_test_0 (region id " in msg
