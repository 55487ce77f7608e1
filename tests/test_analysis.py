"""Attention analyses (cacr/analysis) and scene pictures (cacr/data/render.py) on a tiny
synthetic world and a tiny random UNITER saved as this project's .ckpt: the batched blocks
against an explicit per-pair twin, the boxes drawn against the matrix shown, entropies and
correlations against hand values, and both command lines end to end."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib import image as mimage
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from cacr.analysis import attention, entropy, pictures
from cacr.analysis.attention import PairAttention, relation_attention
from cacr.data import WinogroundSet, WordPieceTokenizer, load_scenes
from cacr.data.render import render_scene
from cacr.evaluation.evaluators import evaluate_winoground
from cacr.model import PairExample, UniterConfig, build_uniter, collate
from cacr.regularizers import cacr_loss

from .conftest import REPO, synthetic_world

WORLD = dict(n_train=20, n_val=10, n_test=10, n_winoground=8)


def tiny_config(**kw) -> UniterConfig:
    # a wide init so that attention is far from uniform and argmaxes are well defined
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=64, img_dim=64, initializer_range=0.3)
    return UniterConfig(**{**base, **kw})


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic_world(tmp_path_factory.mktemp("world"), WORLD)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_uniter(tiny_config()).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model_config": model.config.to_dict()}, "global_step": 3}, path)
    return path


@pytest.fixture(scope="module")
def wino(world):
    paths, _ = world
    return WinogroundSet(paths.winoground_examples, paths.winoground_regions,
                         WordPieceTokenizer.from_vocab_file(paths.vocab))


# --------------------------------------------------------------------------- blocks


def explicit_blocks(model, ex, normalisation):
    """One pair alone, its last layer's Q and K from a hook, loops over heads and positions."""
    layer = model.uniter.encoder.layer[-1].attention.self
    seen = {}
    handle = layer.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    with torch.no_grad():
        batch = collate([ex])
        score = float(model.score(batch))
    handle.remove()
    x = seen["x"][0].detach().double()  # (L, H)
    h, d = layer.num_heads, layer.head_dim
    t, m = ex.input_ids.numel(), ex.img_feat.shape[0]
    words, regions = list(range(1, t - 1)), list(range(t, t + m))
    with torch.no_grad():
        q = (x @ layer.query.weight.double().T + layer.query.bias.double()).view(-1, h, d)  # (L, h, d)
        k = (x @ layer.key.weight.double().T + layer.key.bias.double()).view(-1, h, d)
    out = {}
    for name, rows, cols in (("S_LL", words, words), ("S_LV", words, regions), ("S_VL", regions, words),
                             ("S_VV", regions, regions)):
        per_head = []
        for a in range(h):
            s = q[:, a] @ k[:, a].T / math.sqrt(d)  # (L, L), one example: no padding
            joint = torch.softmax(s, dim=-1)
            block = joint[rows][:, cols]
            if normalisation == "block":
                block = torch.softmax(s[rows][:, cols], dim=-1)
            per_head.append(block)
        out[name] = torch.stack(per_head).mean(0).numpy()
    return out, score


@pytest.mark.parametrize("normalisation", ["block", "joint"])
def test_batched_blocks_match_an_explicit_twin_on_ragged_pairs(model, wino, normalisation):
    short = wino.pair(1, 1, 0)
    short = PairExample(torch.cat([short.input_ids[:4], short.input_ids[-1:]]), short.img_feat, short.img_pos_feat)
    few = wino.pair(2, 0, 1)
    few = PairExample(few.input_ids, few.img_feat[:5], few.img_pos_feat[:5])
    pairs = [wino.pair(0, 0, 0), short, few, wino.pair(5, 1, 1)]
    assert len({p.input_ids.numel() for p in pairs}) > 1 and len({p.img_feat.shape[0] for p in pairs}) > 1
    got = relation_attention(model, pairs, normalisation=normalisation, batch_size=3)
    for p, att in zip(pairs, got):
        want, score = explicit_blocks(model, p, normalisation)
        assert att.n == p.input_ids.numel() - 2 and att.m == p.img_feat.shape[0]
        for name, w in want.items():
            np.testing.assert_allclose(getattr(att, name), w, atol=2e-5, err_msg=name)
        assert att.score == pytest.approx(score, abs=1e-4)
        np.testing.assert_allclose(att.boxes, p.img_pos_feat[:, :4].numpy(), atol=1e-6)
        if normalisation == "block":
            for name in ("S_LL", "S_LV", "S_VL", "S_VV"):
                np.testing.assert_allclose(getattr(att, name).sum(-1), 1.0, atol=1e-5)
        else:  # slices of one softmax: [S_LL | S_LV] misses only what goes to [CLS] and [SEP]
            total = att.S_LL.sum(-1) + att.S_LV.sum(-1)
            assert (total < 1).all() and (total > 0).all()


def test_per_head_blocks_average_to_the_mean(model, wino):
    pairs = [wino.pair(e, 0, 0) for e in range(3)]
    mean = relation_attention(model, pairs)
    per = relation_attention(model, pairs, head_reduction="per_head")
    for a, b in zip(mean, per):
        assert b.S_LV.shape == (2, a.n, a.m)
        for name in ("S_LL", "S_LV", "S_VL", "S_VV"):
            np.testing.assert_allclose(getattr(b, name).mean(0), getattr(a, name), atol=1e-6)
        np.testing.assert_allclose(b.head(1).S_VV, b.S_VV[1])


def test_projection_and_cacr_parts(model, wino):
    att = relation_attention(model, [wino.pair(3, 0, 0)])[0]
    LV, VV, VL, LL = att.S_LV, att.S_VV, att.S_VL, att.S_LL
    want = np.zeros((att.n, att.n))
    for i in range(att.n):  # paper Alg. 1 for the language side: a*_{i->j} = sum_{p,k} S_LV[i,p] S_LV[j,k] S_VV[p,k]
        for j in range(att.n):
            want[i, j] = sum(LV[i, p] * LV[j, k] * VV[p, k] for p in range(att.m) for k in range(att.m))
    np.testing.assert_allclose(att.projected_L, want, rtol=1e-5)
    np.testing.assert_allclose(att.projected_V, VL @ LL @ VL.T, rtol=1e-6)
    T = [torch.from_numpy(x)[None].double() for x in (LL, VV, LV, VL)]
    parts = cacr_loss(*T, torch.ones(1, att.n, dtype=torch.bool), torch.ones(1, att.m, dtype=torch.bool),
                      return_parts=True)
    assert att.cacr_parts() == pytest.approx((float(parts.loss_L), float(parts.loss_V)), rel=1e-9)
    assert all(math.isfinite(v) and v >= 0 for v in att.cacr_parts())


def test_model_in_training_mode_is_refused(wino):
    m = build_uniter(tiny_config())
    with pytest.raises(ValueError, match="eval mode"):
        relation_attention(m, [wino.pair(0, 0, 0)])


# --------------------------------------------------------------------------- pictures


def test_highly_attended_by_hand():
    d = pictures.highly_attended(np.array([0.1, 0.4, 0.25, 0.19, 0.06]), rel_threshold=0.45, max_others=3)
    assert d.argmax == 1 and d.others == [2, 3]  # 0.25, 0.19 >= 0.18; 0.1 is not
    assert pictures.highly_attended(np.array([0.1, 0.4, 0.25, 0.19]), 0.45, max_others=1).others == [2]
    assert pictures.highly_attended(np.array([0.3, 0.3, 0.4]), 0.0, max_others=5).others == [0, 1]
    with pytest.raises(ValueError, match="finite"):
        pictures.highly_attended(np.array([np.nan, 1.0]))


def test_drawn_patches_sit_on_the_chosen_boxes():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 0.5, (6, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.1, 0.5, (6, 2))], 1)
    weights = rng.dirichlet(np.ones(6))
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    drawn = pictures.draw_boxes(ax, np.zeros((30, 40, 3), np.uint8), boxes, weights, rel_threshold=0.3)
    assert drawn.argmax == int(weights.argmax())
    found = {}
    for p in ax.patches:
        kind, k = p.get_gid().rsplit("-region-", 1)
        found.setdefault(kind, []).append(int(k))
        k = int(k)
        np.testing.assert_allclose([p.get_x(), p.get_y(), p.get_x() + p.get_width(), p.get_y() + p.get_height()],
                                   boxes[k], atol=1e-12)
        colour = pictures.GREEN if kind == "argmax" else pictures.RED
        np.testing.assert_allclose(p.get_edgecolor()[:3], to_rgb(colour))
    assert found["argmax"] == [drawn.argmax]
    assert sorted(found.get("other", [])) == sorted(drawn.others)
    assert all(weights[k] >= 0.3 * weights.max() for k in drawn.others)


def test_figures_are_written_and_draw_the_argmax_of_the_matrix_shown(model, wino, world, tmp_path):
    paths, _ = world
    att = relation_attention(model, [wino.pair(4, 1, 0)])[0]
    image_id = wino.examples[4].image_0
    scene = load_scenes(paths.winoground_scenes)[image_id]
    image = render_scene(scene, size=128)
    for d in ("LV", "VL"):
        shown = pictures.word_region_matrix(att, d)
        assert shown.shape == (att.n, att.m) and np.isfinite(shown).all()
        drawn = pictures.attended_boxes_figure(att, image, tmp_path / f"boxes_{d}.png", direction=d)
        assert [b.argmax for b in drawn] == shown.argmax(1).tolist()
        for w, b in enumerate(drawn):
            assert b.argmax not in b.others and all(shown[w, k] >= 0.5 * shown[w].max() for k in b.others)
        labels = pictures.argmax_labels_figure(att, None, tmp_path / f"labels_{d}.png", direction=d)
        assert sorted(w for ws in labels.values() for w in ws) == sorted(att.words)
        assert all(shown[att.words.index(ws[0]), k] == shown[att.words.index(ws[0])].max() for k, ws in labels.items()
                   if att.words.count(ws[0]) == 1)
    pictures.words_regions_heatmap(att, tmp_path / "heat.png")
    pictures.congruence_figure(att, tmp_path / "cong.png", region_labels=[f"g{k}" for k in range(att.m)])
    for f in ("boxes_LV", "boxes_VL", "labels_LV", "labels_VL", "heat", "cong"):
        png = (tmp_path / f"{f}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert not list(tmp_path.glob(".*"))  # no temporary files left
    with pytest.raises(ValueError, match="2 labels for"):
        pictures.words_regions_heatmap(att, tmp_path / "x.png", region_labels=["a", "b"])


def test_log_to_wandb_uses_the_active_run(monkeypatch, tmp_path):
    import wandb

    monkeypatch.setattr(wandb, "run", None)
    assert pictures.log_to_wandb({"a": tmp_path / "a.png"}) == 0
    png = tmp_path / "a.png"
    pictures.save_figure(Figure(figsize=(1, 1)), png)

    class FakeRun:
        logged = []

        def log(self, d):
            self.logged.append(d)

    run = FakeRun()
    monkeypatch.setattr(wandb, "run", run)
    assert pictures.log_to_wandb({"attention/a": png}) == 1
    assert list(run.logged[0]) == ["attention/a"] and isinstance(run.logged[0]["attention/a"], wandb.Image)


# --------------------------------------------------------------------------- scene pictures


def test_render_puts_each_object_at_its_box():
    scene = [{"kind": "distractor", "category": "sky", "colour": "blue", "box": [0.0, 0.0, 1.0, 0.15]},
             {"kind": "object", "category": "dog", "colour": "red", "box": [0.2, 0.3, 0.6, 0.9]},
             {"kind": "object", "category": "mug", "colour": "yellow", "box": [0.7, 0.5, 0.95, 0.8]}]
    img = render_scene(scene, size=200)
    assert img.shape == (200, 200, 3) and img.dtype == np.uint8
    px = lambda x, y: img[int(y * 200), int(x * 200)].astype(int)  # noqa: E731  (x right, y down)
    np.testing.assert_allclose(px(0.4, 0.8), [255, 0, 0], atol=3)  # inside the red square, below its label
    np.testing.assert_allclose(px(0.825, 0.74), [255, 255, 0], atol=3)  # the yellow ellipse's lower part
    np.testing.assert_allclose(px(0.1, 0.6), [220, 220, 220], atol=3)  # empty canvas
    assert px(0.5, 0.03)[2] > px(0.5, 0.03)[0] + 20  # blue-tinted distractor
    with pytest.raises(ValueError, match="region 1 has colour 'teal'"):
        render_scene([scene[0], {**scene[1], "colour": "teal"}])
    with pytest.raises(ValueError, match="region 0 has box"):
        render_scene([{**scene[1], "box": [0.5, 0.5, 0.2, 0.9]}])


def test_render_cli_draws_the_worlds_scenes(world, tmp_path):
    from cacr.data import render

    paths, _ = world
    render.main(["--scenes", str(paths.winoground_scenes), "--image-id", "ex_0_img_0", "ex_0_img_1",
                 "--out", str(tmp_path), "--size", "96"])
    a, b = (mimage.imread(tmp_path / f"ex_0_img_{i}.png") for i in (0, 1))
    assert a.shape[:2] == (96, 96) and not np.array_equal(a, b)  # a swap example: two objects exchanged boxes
    with pytest.raises(SystemExit, match="no scene 'nope'"):
        render.main(["--scenes", str(paths.winoground_scenes), "--image-id", "nope", "--out", str(tmp_path)])


# --------------------------------------------------------------------------- entropy


def test_argmax_entropy_by_hand():
    assert entropy.argmax_entropy([0, 0, 1, 2]) == pytest.approx(1.5)  # p = 1/2, 1/4, 1/4
    assert entropy.argmax_entropy([3, 3, 3]) == 0.0
    assert entropy.argmax_entropy([0, 1, 2, 3]) == pytest.approx(2.0)
    assert entropy.argmax_entropy([5, 9], base=math.e) == pytest.approx(math.log(2))
    assert entropy.argmax_entropy([0, 0, 1]) == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))
    with pytest.raises(ValueError):
        entropy.argmax_entropy([])
    # words 0, 1 pick region 2, word 2 picks region 0; regions 0, 1 pick word 1, region 2 picks word 0
    S_LV = np.array([[0.1, 0.2, 0.7], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    S_VL = np.array([[0.2, 0.5, 0.3], [0.1, 0.8, 0.1], [0.6, 0.2, 0.2]])
    att = PairAttention(["a", "b", "c"], np.zeros((3, 4)), np.eye(3), S_LV, S_VL, np.eye(3), 0.0)
    h = entropy.pair_entropies(att)
    assert h["LV"] == pytest.approx(entropy.argmax_entropy([2, 2, 0])) and h["VL"] == pytest.approx(h["LV"])


def test_records_and_correlations_by_hand():
    # example 0: text and image correct; 1: text only; 2: nothing; 3: image only (tie on text)
    scores = torch.tensor([[[2.0, 0.0], [0.0, 2.0]], [[1.0, 2.0], [0.0, 3.0]],
                           [[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 2.0]]])
    H = [{"LV": 1.0, "VL": 0.5}, {"LV": 0.5, "VL": 0.5}, {"LV": 0.0, "VL": 0.5}, {"LV": 1.5, "VL": 0.5}]
    recs = entropy.example_records(["a", "b", "c", "d"], ["Relation", "Object"] * 2, scores, H)
    assert [(r.text, r.image, r.group) for r in recs] == [(True, True, True), (True, False, False),
                                                        (False, False, False), (False, True, False)]
    assert [r.text_margin for r in recs] == [2.0, 1.0, -1.0, 0.0]
    assert [r.image_margin for r in recs] == [2.0, -1.0, -1.0, 1.0]
    rows = {(r["direction"], r["outcome"]): r for r in entropy.correlations(recs)}
    x, y = np.array([1.0, 0.5, 0.0, 1.5]), np.array([1.0, 1.0, 0.0, 0.0])
    r = ((x - x.mean()) * (y - y.mean())).sum() / math.sqrt(((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum())
    assert rows[("LV", "text")]["pearson_r"] == pytest.approx(r)
    assert rows[("LV", "text")]["entropy_correct"] == pytest.approx(0.75)
    assert rows[("LV", "text")]["entropy_wrong"] == pytest.approx(0.75)
    assert 0 <= rows[("LV", "text")]["pearson_p"] <= 1
    assert rows[("VL", "text")]["pearson_r"] is None  # constant entropy: undefined, not NaN
    md = entropy.entropy_markdown(entropy.correlations(recs), recs)
    assert "| S_LV | text | 2 / 4 |" in md and "n/a" in md


def test_winoground_entropies_agree_with_the_evaluator(model, wino):
    recs = entropy.winoground_entropies(model, wino, batch_size=5)
    scores, results = evaluate_winoground(model, wino, n_boot=10)
    got = torch.tensor([r.scores for r in recs], dtype=torch.float64)
    torch.testing.assert_close(got, scores.double(), atol=1e-4, rtol=0)
    assert 100 * np.mean([r.text for r in recs]) == pytest.approx(results["text"])
    att = relation_attention(model, [wino.pair(6, 0, 0), wino.pair(6, 1, 1)])
    want = np.mean([entropy.pair_entropies(a)["LV"] for a in att])
    assert recs[6].entropy_LV == pytest.approx(want)
    assert recs[6].tag == wino.examples[6].collapsed_tag


# --------------------------------------------------------------------------- command lines


def test_attention_cli_on_a_checkpoint(world, ckpt, tmp_path, capsys):
    paths, overrides = world
    out = tmp_path / "ex"
    attention.main(["--ckpt", str(ckpt), "--example", "2", "--out", str(out), *overrides])
    summary = json.loads((out / "attention.json").read_text())
    assert [p["label"].split(":")[0] for p in summary["pairs"]] == ["example 2"] * 2
    for p, stem in zip(summary["pairs"], ("ex2_c0_i0", "ex2_c1_i1")):
        assert p["background"].startswith("synthetic scene rendered from")
        saved = np.load(out / f"{stem}_attention.npz")
        assert list(saved["words"]) == p["words"] and np.isfinite(saved["S_LV"]).all()
        view = p["views"][stem]
        for d, M in (("LV", saved["S_LV"]), ("VL", saved["S_VL"].T)):
            assert [w["argmax"] for w in view["drawn"][d]] == M.argmax(1).tolist()
        for f in view["files"].values():
            assert Path(f).is_file()
    printed = capsys.readouterr().out
    assert str(out / "attention.json") in printed

    # any caption with any image of the regions file, per head
    attention.main(["--ckpt", str(ckpt), "--text", "a red mug left of a blue dog", "--image-id", "syn_test_00003",
                    "--heads", "per_head", "--direction", "LV", "--figures", "boxes", "--out", str(tmp_path / "free"),
                    *overrides])
    summary = json.loads((tmp_path / "free" / "attention.json").read_text())
    assert set(summary["pairs"][0]["views"]) == {"pair_syn_test_00003_head0", "pair_syn_test_00003_head1"}
    assert summary["pairs"][0]["words"] == "a red mug left of a blue dog".split()
    assert sorted(p.name for p in (tmp_path / "free").glob("*.png")) == \
        ["pair_syn_test_00003_head0_boxes_LV.png", "pair_syn_test_00003_head1_boxes_LV.png"]

    with pytest.raises(SystemExit, match="no example with id '99'"):
        attention.main(["--ckpt", str(ckpt), "--example", "99", "--out", str(tmp_path / "x"), *overrides])
    with pytest.raises(SystemExit, match="give --text and --image-id together"):
        attention.main(["--ckpt", str(ckpt), "--text", "a dog", "--out", str(tmp_path / "x"), *overrides])


def test_entropy_cli_runs_as_a_module(world, ckpt, tmp_path):
    _, overrides = world
    out = tmp_path / "ent"
    proc = subprocess.run([sys.executable, "-m", "cacr.analysis.entropy", "--ckpt", str(ckpt), "--out", str(out),
                           *overrides], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "entropy.json").read_text())
    assert len(res["per_example"]) == WORLD["n_winoground"]
    assert {(r["direction"], r["outcome"]) for r in res["correlations"]} == \
        {(d, o) for d in entropy.DIRECTIONS for o in entropy.OUTCOMES}
    assert (out / "entropy_scatter.png").read_bytes()[:4] == b"\x89PNG"
    assert "| S_LV | group |" in (out / "entropy.md").read_text() and "| S_LV | group |" in proc.stdout
