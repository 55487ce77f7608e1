"""Data faults of issue 30 (docs/faults.md lists every case): ``train.py`` before step 0, the
evaluators and ``python -m cacr.data.validate`` run one set of checks (boxes ordered and
inside the image, images with regions, captions within the model's positions for every
split, no image in two splits), and the converters refuse a Karpathy file that puts one
image in two splits."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from cacr.checks import SettingsError, check_data
from cacr.data.formats import RegionsFile, read_captions, write_captions
from cacr.data.validate import validate

from .test_faults import (RUN, TINY, _datamodule, _files_world, compose_train, convert, last_line,  # noqa: F401
                          no_traceback, sums, train_cli, world)
from .test_faults_files import ckpt  # noqa: F401


def _flip_box(f, i):
    row = f["offsets"][i]
    b = f["boxes"][row]
    b[0], b[2] = b[2], b[0] - 0.05  # x2 < x1
    f["boxes"][row] = b


def _empty_image(f, i):
    off = f["offsets"][:]
    off[i + 1] = off[i]  # image i loses its rows to image i + 1
    f["offsets"][:] = off


def _rewrite_captions(path, edit):
    c = read_captions(path)
    rows = [dict(caption_id=c.caption_ids[i], image_id=c.image_ids[i], text=c.texts[i], tokens=c.tokens(i).tolist(),
                 split=c.splits[i]) for i in range(len(c.caption_ids))]
    edit(rows)
    write_captions(path, caption_ids=[r["caption_id"] for r in rows], image_ids=[r["image_id"] for r in rows],
                   texts=[r["text"] for r in rows], token_ids=[r["tokens"] for r in rows],
                   splits=[r["split"] for r in rows], vocab=c.vocab, tokenizer="synthetic", do_lower_case=False,
                   cls_id=c.cls_id, sep_id=c.sep_id, pad_id=int(c.attrs["pad_id"]), unk_id=int(c.attrs["unk_id"]))
    return rows


def test_a_flipped_box_stops_train_py_before_step_0_as_the_validator_finds_it(tmp_path, world):
    """Issue 30, 8: a box with x2 < x1 trained with exit 0; ``validate`` reported it."""
    over, d = _files_world(tmp_path, world, edit=lambda f: _flip_box(f, 2))
    image = RegionsFile(d / "regions.h5").image_ids[2]
    assert any(image in q and "x2 < x1" in q for q in validate([d / "regions.h5"])[str(d / "regions.h5")])
    before = sums(d)
    proc = train_cli(*TINY, f"data.root={world[0]}", *over, *RUN, f"run_dir={tmp_path / 'r'}")
    assert proc.returncode == 1 and no_traceback(proc), proc.stderr[-2000:]
    assert last_line(proc) == (f"train.py: data.regions={d / 'regions.h5'}: boxes with x2 < x1 or y2 < y1 in 1 "
                               f"image(s): {image!r}; expected 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1")
    assert not (tmp_path / "r" / "checkpoints").exists() and sums(d) == before


def test_an_image_with_no_regions_is_named_before_step_0(tmp_path, world):
    """Issue 30, vague: an image with 0 regions failed in ``train.py`` with ``regions (R, D) and boxes (R, 7) ...``."""
    over, d = _files_world(tmp_path, world, edit=lambda f: _empty_image(f, 4))
    image = RegionsFile(d / "regions.h5", check=False).image_ids[4]
    cfg = compose_train(world[0], *over, *RUN, "data.min_bb=0")
    with pytest.raises(SettingsError) as e:
        check_data(_datamodule(cfg), cfg)
    assert f"data.regions={d / 'regions.h5'}: 1 image(s) with no regions: {image!r}; expected at least one region " \
           f"per image" in e.value.lines


def test_a_test_caption_longer_than_the_positions_is_named_before_step_0(tmp_path, world):
    """Issue 30, vague: a test caption longer than ``max_position_embeddings`` passed the checks and failed
    after training, naming no file or caption."""
    over, d = _files_world(tmp_path, world)
    rows = _rewrite_captions(d / "captions.h5", lambda rows: next(r for r in rows if r["split"] == "test")
                             .update(tokens=[5] * 100))
    long = next(r for r in rows if r["split"] == "test")["caption_id"]
    cfg = compose_train(world[0], *over, *RUN)
    with pytest.raises(SettingsError) as e:
        check_data(_datamodule(cfg), cfg)
    assert e.value.lines == [f"{d / 'captions.h5'}: 1 caption(s) of split 'test' longer than "
                             f"model.config.max_position_embeddings=64 tokens ([CLS]/[SEP] included; longest 102): "
                             f"{long!r}; expected shorter captions or more positions"]


def test_a_test_image_in_the_training_split_is_refused_by_train_and_validate(tmp_path, world):
    """Issue 30, 6: one test image's captions pointed at a train image passed ``train.py`` and ``validate``."""
    over, d = _files_world(tmp_path, world)

    def leak(rows):
        train_image = next(r["image_id"] for r in rows if r["split"] == "train")
        test_image = next(r["image_id"] for r in rows if r["split"] == "test")
        for r in rows:
            if r["image_id"] == test_image:
                r["image_id"] = train_image

    rows = _rewrite_captions(d / "captions.h5", leak)
    train_image = next(r["image_id"] for r in rows if r["split"] == "train")
    problems = validate([d / "captions.h5"])[str(d / "captions.h5")]
    assert problems == [f"image {train_image!r}: captions in splits ['test', 'train']; expected one split per image "
                        f"(a test image seen in training)"]
    cfg = compose_train(world[0], *over, *RUN)
    with pytest.raises(SettingsError) as e:
        check_data(_datamodule(cfg), cfg)
    assert e.value.lines == [f"{d / 'captions.h5'}: 1 image(s) with captions in both split 'train' and split 'test': "
                             f"{train_image!r}; expected every image in one split only"]


def test_karpathy_file_with_an_image_in_two_splits_is_refused(tmp_path, world, convert):  # noqa: F811
    """Issue 30, 7: ``convert karpathy`` with one file name in both train and test gave exit 0."""
    kp = tmp_path / "karpathy.json"
    images = [{"filename": "a.jpg", "split": "train", "sentences": [{"sentid": 1, "raw": "a red cube"}]},
              {"filename": "b.jpg", "split": "val", "sentences": [{"sentid": 2, "raw": "a red cube"}]},
              {"filename": "a.jpg", "split": "test", "sentences": [{"sentid": 3, "raw": "a blue cube"}]}]
    kp.write_text(json.dumps({"images": images}))
    proc = convert("karpathy", kp, tmp_path / "c.h5", "--tokenizer", world[1].vocab)
    assert proc.returncode == 1 and no_traceback(proc)
    assert last_line(proc) == (f"error: {kp}: images[2] (a.jpg): image 'a' in split 'test', and in split 'train' "
                                   f"at images[0]; expected every image in one split")
    assert not list(tmp_path.glob("c.h5*"))


def test_converter_names_a_bad_id_format(tmp_path, convert):  # noqa: F811
    """Issue 30, vague: ``convert npz-dir --id-format '{bogus}'`` said ``error: bogus``."""
    folder = tmp_path / "npz"
    folder.mkdir()
    np.savez(folder / "img0.npz", features=np.zeros((3, 8), np.float32),
             norm_bb=np.array([[0.1, 0.1, 0.5, 0.5]] * 3, dtype=np.float32))
    proc = convert("npz-dir", folder, tmp_path / "r.h5", "--id-format", "{bogus}")
    assert proc.returncode == 1 and last_line(proc) == (
        "error: --id-format '{bogus}': no field 'bogus' (KeyError); expected a format of {name}, {stem}")


def test_validate_on_a_folder_says_so(tmp_path):
    assert validate([tmp_path]) == {str(tmp_path): ["a folder, expected a regions or captions HDF5 file or an "
                                                    "examples .jsonl"]}


def test_the_evaluators_run_the_same_region_checks(tmp_path, world, ckpt):  # noqa: F811
    """Issue 30, 4: the evaluators check the regions as ``train.py`` does, before any scoring."""
    from hydra import compose, initialize_config_dir

    from cacr.evaluation.cli import guarded, run_retrieval

    from .conftest import REPO

    over, d = _files_world(tmp_path, world, edit=lambda f: _flip_box(f, 2))
    image = RegionsFile(d / "regions.h5").image_ids[2]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("retrieval", overrides=[f"data.root={world[0]}", *over, f"ckpt_path={ckpt}", "progress=false",
                                              f"output={tmp_path / 'out'}"])
    with pytest.raises(SystemExit) as e:
        guarded("eval_retrieval.py", run_retrieval, cfg)
    assert str(e.value.code) == (f"eval_retrieval.py: data.regions={d / 'regions.h5'}: boxes with x2 < x1 or "
                                 f"y2 < y1 in 1 image(s): {image!r}; expected 0 <= x1 <= x2 <= 1 and "
                                 f"0 <= y1 <= y2 <= 1")
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("which", ["img", "txt"])
def test_truncated_lmdb_is_one_line_not_a_bus_error(tmp_path, which):
    """Issue 30, crash: ``convert uniter-txt`` / ``uniter-img`` on a truncated ``data.mdb`` died of SIGBUS
    (exit 135, no message): the file is checked before it is memory-mapped."""
    import shutil
    import subprocess
    import sys

    from .conftest import FIXTURES, REPO
    from .test_faults import ENV

    sample = FIXTURES / "uniter_db_sample"
    src = sample / "img_db" / "flickr30k" / "feat_th0.2_max100_min10" if which == "img" else \
        sample / "txt_db" / "itm_flickr30k_test.db"
    db = tmp_path / src.name
    shutil.copytree(src, db)
    if which == "img":
        shutil.copy(src.parent / "nbb_th0.2_max100_min10.json", tmp_path)
    mdb = db / "data.mdb"
    whole = mdb.stat().st_size
    mdb.write_bytes(mdb.read_bytes()[:whole // 2 // 4096 * 4096])
    out = tmp_path / "o.h5"
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog"]) + "\n")
    args = ["uniter-img", str(db), str(out)] if which == "img" else \
        ["uniter-txt", str(db), "--tokenizer", str(vocab), "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "cacr.data.convert", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and no_traceback(proc), (proc.returncode, proc.stderr[-1000:])
    assert last_line(proc).startswith(f"error: {mdb}: truncated: {whole // 2 // 4096 * 4096} bytes, but its last "
                                      f"page ends at byte {whole}")
    assert not list(tmp_path.glob("o.h5*"))


@pytest.mark.parametrize("cut", [7, 8], ids=["bad-padding", "not-whole-floats"])
def test_truncated_base64_in_a_bua_tsv_names_line_image_and_column(tmp_path, convert, cut):  # noqa: F811
    """Issue 30, vague: ``convert bua-tsv`` with truncated base64 said ``error: Incorrect padding`` or
    ``error: buffer size must be a multiple of element size``, naming no line or image."""
    import base64

    boxes = np.array([[1, 1, 50, 50], [2, 2, 60, 60]], np.float32)
    feats = np.ones((2, 8), np.float32)
    enc = base64.b64encode(feats.tobytes()).decode()
    enc = enc[:len(enc) - cut] + ("" if cut == 7 else "AAA=")  # 7 chars off: bad padding; else 2 bytes too few
    tsv = tmp_path / "f.tsv"
    tsv.write_text("\t".join(["111", "640", "480", "2", base64.b64encode(boxes.tobytes()).decode(), enc]) + "\n")
    proc = convert("bua-tsv", tsv, "--out", tmp_path / "r.h5")
    assert proc.returncode == 1 and no_traceback(proc)
    assert last_line(proc).startswith(f"error: {tsv}: line 1 (image '111'): column 'features': ")
    assert not list(tmp_path.glob("r.h5*"))


def test_a_multiple_choice_foil_equal_to_its_caption_is_warned_and_counted(caplog):
    """Issue 30, 9: an item whose foil equals its caption is always scored wrong, with no warning.
    (The check; tests/test_multiple_choice.py tests the evaluator that calls it.)"""
    import logging

    from cacr.checks import identical_foils
    from cacr.evaluation.multiple_choice import Item

    items = [Item("set/0", "img0", ("a dog on a mat", "a mat on a dog")),
             Item("set/1", "img1", ("a red cube", "a blue cube", "A red  cube")),
             Item("set/2", "img2", ("two cats", "two cats"))]
    with caplog.at_level(logging.WARNING, logger="cacr.checks"):
        assert identical_foils(items, "set.json") == ["set/1", "set/2"]
    assert [r.getMessage() for r in caplog.records] == [
        "set.json: 2 item(s) whose foil equals the caption, always scored wrong: 'set/1', 'set/2'"]


def test_a_converter_past_the_file_size_limit_is_one_line_and_leaves_no_temporary_file(tmp_path):
    """Issue 30, crash: ``convert npz-dir --overwrite`` at the file-size limit segfaulted (HDF5 closing the
    failed file again at exit), with 4 tracebacks and a ``.tmp-*`` left (the old output intact)."""
    import subprocess
    import sys

    from .conftest import REPO
    from .test_faults import ENV
    from .test_faults_files import file_size_limit

    folder = tmp_path / "npz"
    folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(40):
        np.savez(folder / f"img{i}.npz", features=g.standard_normal((30, 256)).astype(np.float32),
                 norm_bb=np.array([[0.1, 0.1, 0.5, 0.5]] * 30, dtype=np.float32))
    out = tmp_path / "regions.h5"
    out.write_bytes(b"the old output")
    proc = subprocess.run([sys.executable, "-m", "cacr.data.convert", "npz-dir", str(folder), str(out), "--overwrite"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120,
                          preexec_fn=file_size_limit(100_000))
    assert proc.returncode == 1 and no_traceback(proc), (proc.returncode, proc.stderr[-1500:])
    assert last_line(proc) == f"error: {out}: cannot write (File too large); existing content kept, no temporary " \
                              f"file left"
    assert out.read_bytes() == b"the old output" and sorted(p.name for p in tmp_path.iterdir()) == ["npz", "regions.h5"]
