"""The binding study's statistics and pre-registered verdict, and one tiny end-to-end run of its driver."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from .conftest import REPO

STUDY = REPO / "experiments" / "binding_study"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"binding_study_{name}", STUDY / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


report = _load("report")


def _comp(mean, t, boot):
    return {"mean": mean, "t_ci": list(t), "boot_ci": list(boot), "n_seeds": 5, "per_seed": [mean] * 5}


def test_verdict_follows_the_pre_registered_rules():
    v = report.verdict
    pos = _comp(4.0, (1.0, 7.0), (2.0, 6.0))
    assert v(pos, pos, True) == "positive"
    assert v(pos, _comp(4.0, (-1.0, 9.0), (0.5, 7.0)), True) == "inconclusive"  # t-interval crosses 0 vs IAIS
    assert v(pos, _comp(2.5, (1.0, 4.0), (1.0, 4.0)), True) == "inconclusive"  # under +3 points vs IAIS
    assert v(pos, None, True) == "inconclusive"  # no IAIS arm to beat
    assert v(_comp(0.3, (-1.5, 1.9), (-1.0, 1.2)), pos, True) == "negative"
    assert v(_comp(0.3, (-2.5, 1.9), (-1.0, 1.2)), pos, True) == "inconclusive"  # one interval leaves +-2
    assert v(pos, pos, False).startswith("inconclusive")  # an invalid CACR arm decides nothing
    assert v(_comp(-4.0, (-7.0, -1.0), (-6.0, -2.0)), pos, True) == "inconclusive"  # worse is not "positive"


def test_t_interval_and_paired_bootstrap():
    m, lo, hi = report.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sd 1.5811, t(0.975, 4) = 2.7764
    assert m == 3.0 and hi - m == pytest.approx(2.7764 * 1.5811 / np.sqrt(5), rel=1e-3) and lo == pytest.approx(6 - hi)
    rng = np.random.default_rng(0)
    n = 400
    arm = lambda p: {s: {"per_example": {"test": (rng.random(n) < p).astype(float)}} for s in range(5)}  # noqa: E731
    a, b = arm(0.7), arm(0.5)
    lo, hi = report.paired_bootstrap(a, b, n_boot=2000)
    assert lo < 20.0 < hi and lo > 5.0  # true difference 20 points
    same = report.paired_bootstrap(a, a, n_boot=200)
    assert same == (0.0, 0.0)


def test_dev_half_chooses_the_arm():
    arms = {"cacr_10": {0: {"dev/binding": 60.0}, 1: {"dev/binding": 62.0}},
            "cacr_30": {0: {"dev/binding": 65.0}, 1: {"dev/binding": 61.0}},
            "cacr_30_exp": {0: {"dev/binding": 50.0}, 1: {"dev/binding": 51.0}}}
    assert report.select(arms, "cacr") == "cacr_30"
    assert report.select(arms, "iais_singular") is None


def test_normalised_entropy_is_one_for_uniform_rows():
    import torch

    study = _load("study")
    mask = torch.tensor([[True, True, True, False]])
    uniform = torch.tensor([[[1 / 3, 1 / 3, 1 / 3, 0.0]] * 4])
    peaked = torch.tensor([[[1.0, 0.0, 0.0, 0.0]] * 4])
    assert study.normalised_entropy(uniform, mask) == pytest.approx(1.0)
    assert study.normalised_entropy(peaked, mask) == pytest.approx(0.0, abs=1e-6)


def test_the_study_runs_end_to_end_on_a_tiny_world(tmp_path):
    """Pre-train, calibrate, two arms, diagnose and report, with one seed and a few steps."""
    tiny = ["data.synthetic.n_train=40", "data.synthetic.n_val=8", "data.synthetic.n_test=8",
            "data.synthetic.n_winoground=8", "data.batch_size=4", "data.eval_batch_size=64",
            f"data.root={tmp_path / 'world'}", "data.val_max_images=8",
            "model.config.hidden_size=32", "model.config.num_hidden_layers=2", "model.config.intermediate_size=64",
            "train.max_steps=4", "train.num_candidates=6", "module.num_negatives=2", "eval.val_every_n_steps=2", "eval.n_boot=20",
            "module.warmup_steps=1", "logger=csv"]
    out = tmp_path / "study"
    cmd = [sys.executable, str(STUDY / "study.py"), "--out", str(out), "--seeds", "0", "--jobs", "2",
           "--threads", "1", "--arms", "none", "cacr_30", "--calibration-batches", "2", "--", *tiny]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cal = json.loads((out / "calibration.json").read_text())
    for reg in ("cacr", "iais_singular", "iais_distributed", "cacr_single_softmax"):
        lam = cal["lambda"][reg]
        assert lam["30"] == pytest.approx(3 * lam["10"])
        assert lam["10"] * cal["mean"][reg] == pytest.approx(0.1 * cal["mean"]["rank"])
    for arm in ("none", "cacr_30"):
        job = out / "finetune" / arm / "seed0"
        res = json.loads((job / "results.json").read_text())
        assert set(res["winoground"]["by_tag"]["split"]) == {"dev", "test"}
        diag = json.loads((job / "diagnostics.json").read_text())
        assert 0.0 <= diag["entropy"] <= 1.0 and diag["L_cacr"] >= 0
        assert (diag["loss_key"], diag["loss_layers"]) == (arm.split("_")[0], "last")
        assert diag["L_cacr"] == diag["L_cacr@last"] and diag["L_cacr_single_softmax@all"] >= 0
    cfg = (out / "finetune" / "cacr_30" / "seed0" / ".hydra" / "config.yaml").read_text()
    assert f"weight: {cal['lambda']['cacr']['30']:.6g}" in cfg.replace("'", "")
    rep = json.loads((out / "report.json").read_text())
    assert rep["selected"]["cacr"] == "cacr_30" and "verdict" in rep
    assert rep["arms"]["cacr_30"]["validity"]["L_reg_key"] == "L_cacr@last"
    assert (out / "report.md").is_file() and (out / "differences.png").is_file()
    # the per-seed table and the per-seed differences agree with the arms' own per-seed figures
    ps = {a: rep["arms"][a]["per_seed"]["0"] for a in ("none", "cacr_30")}
    assert rep["comparisons"]["cacr_30 - none"]["per_seed"] == [
        pytest.approx(ps["cacr_30"]["test/binding"] - ps["none"]["test/binding"])]
    md = (out / "report.md").read_text()
    assert "## Per seed (test binding / test group / R-sum)" in md
    assert f"| none | {ps['none']['test/binding']:.1f} / {ps['none']['test/group']:.1f} / " in md
    # Resumable: a second call finds every job done and only re-reports.
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "done " not in r.stdout


def test_the_study_can_pretrain_with_the_probe(tmp_path):
    """--pretrainer probe: probe.py stops at its first evaluation at or above --stop-binding, never
    trains on a layout of the study's Winoground-format set, is scored on that set by
    eval_winoground.py, and the arms fine-tune its state dict with its depth."""
    tiny = ["data.synthetic.n_train=40", "data.synthetic.n_val=8", "data.synthetic.n_test=8",
            "data.synthetic.n_winoground=8", "data.batch_size=4", "data.eval_batch_size=64",
            f"data.root={tmp_path / 'world'}", "data.val_max_images=8",
            "model.config.hidden_size=32", "model.config.intermediate_size=128",  # the probe's 4 x hidden
            "train.max_steps=2", "train.num_candidates=6", "module.num_negatives=2", "eval.n_boot=20",
            "module.warmup_steps=1", "logger=csv"]
    probe_args = ("--layers 1 --hidden 32 --steps 8 --eval-every 2 --n-eval 8 --batch 4 --mlm 1 --absolute 2 "
                  "--stop-binding 0")
    out = tmp_path / "study"
    cmd = [sys.executable, str(STUDY / "study.py"), "--out", str(out), "--seeds", "0", "--jobs", "1", "--threads", "1",
           "--arms", "none", "--calibration-batches", "1", "--pretrainer", "probe",
           f"--probe-args={probe_args}", "--stage", "all", "--", *tiny]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    pre = out / "pretrain" / "seed0"
    curve = json.loads((pre / "curve.json").read_text())
    assert curve["stopped_at"] == 2 and [c["step"] for c in curve["curve"]] == [2]  # stopped at the first evaluation
    assert curve["args"]["exclude_layouts"].endswith("winoground/scenes.jsonl")
    assert str(tmp_path / "world") in curve["args"]["exclude_layouts"]  # the fine-tuning world's set
    assert json.loads((pre / "winoground" / "results.json").read_text())["n"] == 8
    cfg = (out / "finetune" / "none" / "seed0" / ".hydra" / "config.yaml").read_text()
    assert f"checkpoint: {pre / 'model.pt'}" in cfg and "num_hidden_layers: 1" in cfg
    rep = json.loads((out / "report.json").read_text())
    row = rep["pretrain"]["0"] if "0" in rep["pretrain"] else rep["pretrain"][0]
    assert row["stopped_at"] == 2 and 0 <= row["dev/binding"] <= 100
    # killed after the probe stopped but before its scoring: a rerun only scores it
    import shutil

    shutil.rmtree(pre / "winoground")
    r = subprocess.run(cmd[:cmd.index("--stage")] + ["--stage", "pretrain", "--", *tiny], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (pre / "winoground" / "winoground_scores.jsonl").is_file()
    assert (out / "logs" / "pretrain_seed0.log").read_text().count("probe.py") == 1


def test_a_job_killed_before_its_first_checkpoint_is_set_aside_not_lost(tmp_path):
    study = _load("study")
    run = tmp_path / "finetune" / "none" / "seed0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.csv").write_text("step\n1\n")
    moved = study.set_aside_unfinished(run)
    assert moved == run.with_name("seed0.killed-1") and (moved / "metrics.csv").read_text() == "step\n1\n"
    assert not run.exists()
    run.mkdir()
    assert study.set_aside_unfinished(run) == run.with_name("seed0.killed-2")
    for keep in ("results.json", "checkpoints/last.ckpt"):  # finished, or resumable: left alone
        (run / keep).parent.mkdir(parents=True, exist_ok=True)
        (run / keep).write_text("x")
        assert study.set_aside_unfinished(run) is None and (run / keep).is_file()
        (run / keep).unlink()
    assert study.set_aside_unfinished(tmp_path / "absent") is None


# ------------------------------------------------------------------ probe.py
def _centre_cell(box):
    return int((box[1] + box[3]) / 2 * 3), int((box[0] + box[2]) / 2 * 3)  # (row, column) from the box alone


def _true_of(caption: str, regions) -> bool:
    """An independent reading of a caption against a scene's boxes (not cacr.data.negatives)."""
    words = [w for w in caption.replace("there is ", "").replace(" is ", " ").split() if w not in ("a", "an", "the")]
    cells = lambda col, cat: [_centre_cell(g.box) for g in regions  # noqa: E731
                              if g.kind == "object" and (g.colour, g.category) == (col, cat)]
    if len(words) == 3:
        edge = {"left": (1, 0), "right": (1, 2), "above": (0, 0), "below": (0, 2)}[words[2]]
        return any(c[edge[0]] == edge[1] for c in cells(words[0], words[1]))
    rel = " ".join(words[2:-2])
    test = {"left of": lambda a, b: a[1] < b[1], "right of": lambda a, b: a[1] > b[1],
            "above": lambda a, b: a[0] < b[0], "below": lambda a, b: a[0] > b[0]}[rel]
    return any(test(a, b) for a in cells(words[0], words[1]) for b in cells(words[-2], words[-1]))


def test_probe_negatives_are_false_and_positives_true():
    from cacr.data.synthetic import SyntheticConfig, World, layout

    probe = _load("probe")
    world = World(SyntheticConfig(noise=0.2, n_categories=4, n_colours=3, min_distractors=1, max_distractors=3))
    r = np.random.default_rng(0)
    held_out = {layout(x) for it in probe.eval_set(world, 20, 0) for x in it[:2]}
    items = probe.training_items(world, r, held_out, 200)
    for regions, cap, swapped, swapped_img, perm, neg_perm in items:
        assert layout(regions) not in held_out and sorted(perm) == list(range(len(regions)))
        assert _true_of(cap, regions) and list(neg_perm) == list(perm)
        assert not _true_of(swapped, regions) and sorted(swapped.split()) == sorted(cap.split())
        assert not _true_of(cap, swapped_img)
        assert [g.feature.tolist() for g in swapped_img] == [g.feature.tolist() for g in regions]
    # train.py's situation: a finite pool of scenes, image negatives from other scenes with both objects
    scenes = probe.Scenes(world, r, held_out, pool=300)
    ids = {id(s) for s in scenes.pool}
    items = probe.training_items(world, r, held_out, 200, scenes, image_negative="other")
    others = 0
    for regions, cap, swapped, neg, perm, neg_perm in items:
        assert id(regions) in ids and _true_of(cap, regions) and not _true_of(cap, neg)
        assert sorted(neg_perm) == list(range(len(neg)))
        named = {(g.colour, g.category) for g in neg if g.kind == "object"}
        words = [w for w in cap.replace("there is ", "").replace(" is ", " ").split() if w not in ("a", "an", "the")]
        if id(neg) in ids:  # another pool scene (else the swap, where the pool has none)
            others += 1
            assert {(words[0], words[1]), (words[-2], words[-1])} <= named
    assert others > 150
    assert all(id(s) in ids for s, _ in probe.absolute_items(world, r, held_out, 20, scenes))
    absolute = probe.absolute_items(world, r, held_out, 200)
    assert {cap.split()[-1] for _, cap in absolute} == {"left", "right", "above", "below"}
    assert all(_true_of(cap, regions) for regions, cap in absolute)
    for img0, img1, c0, c1, _ in probe.eval_set(world, 20, 0):  # the Winoground-format pairs it scores
        assert _true_of(c0, img0) and _true_of(c1, img1) and not _true_of(c0, img1) and not _true_of(c1, img0)


def test_probe_masks_one_content_word_and_runs(tmp_path):
    import torch

    from cacr.data.synthetic import SyntheticConfig, World, synthetic_vocab
    from cacr.data.tokenizer import SPECIAL_TOKENS, WordPieceTokenizer
    from cacr.model import MlmHead, UniterConfig, UniterForImageTextRetrieval

    probe = _load("probe")
    world = World(SyntheticConfig(noise=0.2, n_categories=4, n_colours=3))
    tok = WordPieceTokenizer(synthetic_vocab(64), name="synthetic")
    r = np.random.default_rng(1)
    batch, k = probe.training_batch(world, r, tok, set(), 6, in_batch=True)
    assert k == 4 and len(batch) == 24
    # captions as the project reads them: [CLS] words [SEP] (the score reads position 0)
    assert (batch.input_ids[:, 0] == tok.cls_id).all()
    assert all(int(batch.input_ids[b, int(batch.txt_lens[b]) - 1]) == tok.sep_id for b in range(len(batch)))
    cfg = UniterConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64, img_dim=64)
    model = UniterForImageTextRetrieval(cfg)
    head = MlmHead(cfg, model.uniter.embeddings.word_embeddings)
    seen = []
    real = model.uniter.forward
    model.uniter.forward = lambda b, *a: (seen.append(b.input_ids.clone()), real(b, *a))[1]
    loss, acc = probe.masked_lm(model, head, tok, batch, 6, r, ["relation"])
    assert torch.isfinite(loss) and set(acc) == {"relation"}
    masked = seen[0]
    mask_id = tok.token_to_id["[MASK]"]
    assert ((masked == mask_id).sum(1) == 1).all()  # exactly one word per positive
    original = batch.input_ids[:6]
    words = {tok.token_to_id[w] for w in ("left", "right", "above", "below")}
    assert all(int(original[b][masked[b] == mask_id]) in words for b in range(6))
    assert torch.equal(masked[masked != mask_id], original[masked != mask_id])
    seen.clear()
    probe.masked_lm(model, head, tok, batch, 6, r, ["colour", "category", "relation"], mode="focus")
    is_relation = torch.isin(original, torch.tensor(sorted(words)))
    assert (seen[0][is_relation] == mask_id).all()  # every relation word, and some others
    assert ((seen[0] == mask_id) & ~is_relation).sum() <= 0.5 * (~is_relation & (original >= len(SPECIAL_TOKENS))).sum()
    out = tmp_path / "curve.json"
    probe.main(["--steps", "4", "--eval-every", "2", "--n-eval", "8", "--batch", "4", "--hidden", "32",
                "--layers", "1", "--heads", "2", "--mlm", "1", "--absolute", "2", "--out", str(out)])
    curve = json.loads(out.read_text())["curve"]
    assert [c["step"] for c in curve] == [2, 4] and all(0 <= c["binding"] <= 100 for c in curve)
    assert "absolute" in curve[-1]["mlm_acc"]  # the other kinds are drawn at random per caption


def test_probe_plot_reads_probe_logs(tmp_path):
    plot = _load("probe_plot")
    log = tmp_path / "x.log"
    log.write_text("some warning\n"
                   "step 250: loss 1.099 (chance 1.099) binding 51.1 (relation 49.8, object 52.4) group 0.0 mlm  [165 s]\n"
                   "step 500: loss 0.763 (chance 1.099) binding 46.9 (relation 48.6, object 45.2) group 1.8 mlm "
                   "absolute 0.70 category 1.00 colour 1.00 relation 0.70 [452 s]\n")
    rows = plot.read_log(log)
    assert [r["step"] for r in rows] == [250, 500] and rows[1]["binding"] == 46.9 and rows[1]["group"] == 1.8
    assert rows[1]["mlm_relation"] == 0.70 and "mlm_relation" not in rows[0]
    plot.main([str(tmp_path / "c.png"), f"x={log}"])
    assert (tmp_path / "c.png").stat().st_size > 1000
    (tmp_path / "empty.log").write_text("nothing\n")
    with pytest.raises(ValueError, match="empty.log: no 'step N"):
        plot.read_log(tmp_path / "empty.log")


def test_gate_plot_reads_validation_rows_of_metrics_csv(tmp_path):
    plot = _load("gate_plot")
    m = tmp_path / "metrics.csv"
    m.write_text("epoch,step,train/loss,val/wino_binding,val/wino_group\n0,49,2.0,,\n0,249,,47.5,0.0\n0,499,1.5,,\n"
                 "0,499,,94.5,85.8\n")
    assert plot.read_metrics(m) == [(250, 47.5, 0.0), (500, 94.5, 85.8)]
    plot.main([str(tmp_path / "g.png"), f"run={m}"])
    assert (tmp_path / "g.png").stat().st_size > 1000
    (tmp_path / "none.csv").write_text("epoch,step,train/loss\n0,49,2.0\n")
    with pytest.raises(ValueError, match="none.csv: no val/wino_binding rows"):
        plot.read_metrics(tmp_path / "none.csv")


def test_every_gate_variant_composes():
    """gate.sh's variants are override lists for train.py: each must name real config keys."""
    import re
    import shlex

    from hydra import compose, initialize_config_dir

    text = (STUDY / "gate.sh").read_text().replace("\\\n", " ")
    common = shlex.split(re.search(r"^common=\((.*)\)$", text, re.M)[1].replace('"$@"', ""))
    variants = {}
    for line in text.splitlines():
        m = re.match(r"^\s*(?:GATE_PARALLEL=0 )?run (\w+)(.*)$", line)
        if m:
            variants[m[1]] = [a for a in shlex.split(m[2], comments=True) if not a.startswith(("${", "model.checkpoint="))]
    assert {"base", "swap_n1", "absolute_l4", "objects_l4", "no_absolute", "uniter_l4", "curriculum_1",
            "curriculum_2", "simple_world"} <= set(variants)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        for name, args in variants.items():
            cfg = compose("train", overrides=[*common, *args])
            assert cfg.train.max_steps in (20000, 5000, 15000), name
            if name == "base":  # the recipe itself
                assert cfg.data.p_swap == 1.0 and cfg.data.hard_pool == "objects" and not cfg.module.mining
                assert cfg.module.num_negatives == 3 and cfg.data.synthetic.absolute_captions == 5
                assert cfg.model.config.num_hidden_layers == 4 and cfg.module.mlm_focus
            if name == "swap_n1":
                assert cfg.module.num_negatives == 1
            if name == "absolute_l4":
                assert cfg.data.synthetic.absolute_captions == 5 and cfg.model.config.num_hidden_layers == 4


def test_pictures_pick_examples_by_rule_and_name_missing_files(tmp_path):
    pictures = _load("pictures")
    test = tmp_path / "test.jsonl"
    rows = [{"id": 7, "tag": "Object"}, {"id": 9, "tag": "Relation"}, {"id": 11, "tag": "Relation"},
            {"id": 12, "tag": "Object"}]
    test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert pictures.first_of_each_tag(test) == [9, 7]  # Relation first, then Object, each its first in file order
    with pytest.raises(ValueError, match=r"test\.jsonl: no example tagged \['Both'\]"):
        pictures.first_of_each_tag(test, tags=("Relation", "Both"))
    with pytest.raises(FileNotFoundError, match="no results.json"):
        pictures.evaluated_files(tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps({"config": {"data": {"source": "flickr30k"}}}))
    with pytest.raises(ValueError, match="no synthetic data section"):
        pictures.evaluated_files(tmp_path / "run")


def test_scoring_rate_prints_the_rate_and_its_ceiling(tmp_path, capsys):
    from .conftest import synthetic_world

    _, overrides = synthetic_world(tmp_path / "world", dict(n_train=20, n_val=8, n_test=12, n_winoground=16),
                                   config="retrieval")
    out = _load("scoring_rate").main(["--captions", "3", "--repeats", "1", "--batch-sizes", "4,16",
                                      "--layers", "1", "--json", str(tmp_path / "rate.json"), "--override", *overrides])
    printed = capsys.readouterr().out
    assert "flags:" in printed and "dense fp32 matmul" in printed
    n_img = out["pairs"] // 3
    assert out["pairs"] == 3 * n_img and n_img > 0
    for bs in (4, 16):
        b = out["batch"][bs]
        assert b["pairs_per_s"] > 0 and b["gflops"] == pytest.approx(b["pairs_per_s"] * out["mflop_per_pair"] / 1e3)
    assert json.loads((tmp_path / "rate.json").read_text())["pairs"] == out["pairs"]


def test_calibration_is_topped_up_with_new_variants_and_keeps_old_weights(tmp_path, monkeypatch):
    study = _load("study")
    measured = {"rank": 1.2, "cacr": 0.04, "iais_singular": 1.0, "iais_distributed": 2.0, "cacr_single_softmax": 0.5}
    calls = []

    def fake_calibrate(checkpoint, seed, n_batches, extra, names=None):
        calls.append((seed, tuple(names), n_batches))
        return {"rank": measured["rank"] + 0.1 * seed, **{n: measured[n] for n in names}}

    monkeypatch.setattr(study, "calibrate", fake_calibrate)
    old = {"n_batches": 7, "per_seed": {str(s): {"rank": 1.2 + 0.1 * s, "cacr": 0.04, "iais_singular": 1.0,
                                                  "iais_distributed": 2.0} for s in (0, 1)},
           "lambda": {"cacr": {"10": 3.0, "30": 9.0}, "iais_singular": {"10": 0.1, "30": 0.3},
                      "iais_distributed": {"10": 0.05, "30": 0.15}}}
    (tmp_path / "calibration.json").write_text(json.dumps(old))
    out = study.stage_calibrate(tmp_path, [0, 1], 20, [])
    assert calls == [(0, ("cacr_single_softmax",), 7), (1, ("cacr_single_softmax",), 7)]  # only the new one, same batches
    for r in study.REGULARIZERS:
        assert out["lambda"][r] == old["lambda"][r]  # weights already used by arms are not moved
    rank = (1.2 + 1.3) / 2
    assert out["lambda"]["cacr_single_softmax"]["30"] == pytest.approx(0.3 * rank / 0.5)
    assert out["topped_up"][0]["names"] == ["cacr_single_softmax"]
    arm = study.arms(out)["cacr_30_single_softmax_cal"]
    assert "loss.double_softmax=false" in arm and f"loss.weight={0.3 * rank / 0.5:.6g}" in arm
    assert study.arms(old).get("cacr_30_single_softmax_cal") is None  # no weight measured, no arm
    assert study.stage_calibrate(tmp_path, [0, 1], 20, []) == out and len(calls) == 2  # complete: not measured again

    old["per_seed"]["1"]["rank"] = 9.9  # other checkpoints or batches than the file was made with
    (tmp_path / "calibration.json").write_text(json.dumps(old))
    with pytest.raises(RuntimeError, match="ranking loss"):
        study.stage_calibrate(tmp_path, [0, 1], 20, [])
    with pytest.raises(RuntimeError, match="same --seeds"):
        study.stage_calibrate(tmp_path, [0, 1, 2], 20, [])


def test_an_arm_is_compared_with_none_on_its_own_loss_in_its_own_layers(tmp_path, monkeypatch):
    def row(diag, seed):
        return {"diag": diag, "rsum": 300.0, "seed": seed}

    def diag(key, layers, **losses):
        return {"loss_key": key, "loss_layers": layers, "entropy": 0.9, **losses}

    none = {s: row(diag("none", "last", **{"L_cacr@last": 0.03, "L_cacr_single_softmax@last": 1.0,
                                              "L_cacr@penultimate": 0.5, "L_cacr": 0.03}), s) for s in (0, 1)}
    arms = {"none": none,
            "cacr_30_single_softmax_cal": {s: row(diag("cacr_single_softmax", "last", **{
                "L_cacr_single_softmax@last": 0.2, "L_cacr@last": 0.05, "L_cacr": 0.05}), s) for s in (0, 1)},
            "cacr_30_penultimate": {s: row(diag("cacr", "penultimate", **{
                "L_cacr@penultimate": 0.4, "L_cacr": 0.4}), s) for s in (0, 1)}}
    v = report.validity("cacr_30_single_softmax_cal", arms)
    assert (v["L_reg_key"], v["L_reg"], v["L_reg_none"], v["reg_lower"]) == ("L_cacr_single_softmax@last", 0.2, 1.0, True)
    v = report.validity("cacr_30_penultimate", arms)  # not against none's last layer (0.03)
    assert (v["L_reg_key"], v["L_reg_none"], v["reg_lower"]) == ("L_cacr@penultimate", 0.5, True)
    del none[0]["diag"]["L_cacr@penultimate"]  # diagnostics from before the matched measures: the old key
    assert report.validity("cacr_30_penultimate", arms)["L_reg_key"] == "L_cacr"

    study = _load("study")
    from omegaconf import OmegaConf

    key = lambda **loss: study.loss_key(OmegaConf.create(loss))  # noqa: E731
    assert key(name="cacr", double_softmax=False) == "cacr_single_softmax"
    assert key(name="cacr", double_softmax=True) == key(name="cacr") == "cacr" and key(name="none") == "none"
    assert key(name="iais_singular", double_softmax=False) == "iais_singular"
    job = tmp_path / "finetune" / "cacr_30" / "seed0"
    job.mkdir(parents=True)
    (job / "results.json").write_text("{}")
    (job / "diagnostics.json").write_text(json.dumps({"L_cacr": 0.123, "entropy": 0.5}))
    monkeypatch.setattr(study, "diagnose", lambda j: {"L_cacr": 0.1230001, "L_cacr@last": 0.1230001,
                                                      "loss_key": "cacr", "loss_layers": "last", "entropy": 0.5})
    study.stage_diagnose(tmp_path)
    d = json.loads((job / "diagnostics.json").read_text())
    assert d["L_cacr"] == 0.123 and d["L_cacr@last"] == 0.1230001 and d["loss_key"] == "cacr"  # old values kept
    monkeypatch.setattr(study, "diagnose", lambda j: pytest.fail("complete diagnostics measured again"))
    study.stage_diagnose(tmp_path)
