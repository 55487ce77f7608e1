"""Regions / captions HDF5 files: round trips, lazy reading across processes, bad input, validator."""
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from cacr.data.formats import (FormatError, RegionsFile, RegionsWriter, check_captions_file, check_regions_file,
                               read_captions, write_captions)
from cacr.data.validate import main as validate_main
from cacr.data.validate import validate

from .conftest import REPO

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat", "##s", "red"]
TOK = dict(vocab=VOCAB, tokenizer="test", do_lower_case=False, cls_id=2, sep_id=3, pad_id=0, unk_id=1)


def random_images(rng, n=7, D=5, conf=False):
    out = []
    for i in range(n):
        m = int(rng.integers(1, 9))
        xy = rng.uniform(0, 0.5, (m, 2))
        wh = rng.uniform(0.01, 0.5, (m, 2))
        b = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        b6 = np.concatenate([b, b[:, 2:3] - b[:, 0:1], b[:, 3:4] - b[:, 1:2]], 1)
        c = np.sort(rng.uniform(0, 1, m).astype(np.float32))[::-1] if conf else None
        out.append((f"img_{i}", rng.standard_normal((m, D)).astype(np.float16), b6, c))
    return out


def write_regions(path, images, D=5, conf=False):
    with RegionsWriter(path, feature_dim=D, feature_source="test", with_conf=conf, chunk_rows=10) as w:
        for iid, f, b, c in images:
            w.add(iid, f, b, c)
    return path


def test_regions_round_trip_ragged(tmp_path):
    rng = np.random.default_rng(0)
    images = random_images(rng, conf=True)
    p = write_regions(tmp_path / "r.h5", images, conf=True)
    assert list(tmp_path.iterdir()) == [p]  # no temporary file left
    rf = RegionsFile(p)
    assert rf.image_ids == [i[0] for i in images]
    assert rf.attrs["format_version"] == 1 and rf.attrs["kind"] == "regions" and rf.feature_dim == 5
    for i, (iid, f, b, c) in enumerate(images):
        gf, gb, gc = rf.get(rf.index(iid))
        np.testing.assert_array_equal(gf, f)
        np.testing.assert_array_equal(gb, b)
        np.testing.assert_array_equal(gc, c)
    assert check_regions_file(p) == []
    with pytest.raises(KeyError, match="unknown image 'nope'"):
        rf.index("nope")


def test_writer_four_column_boxes_and_no_conf(tmp_path):
    with RegionsWriter(tmp_path / "r.h5", feature_dim=2, feature_source="t") as w:
        w.add("x", np.ones((2, 2)), np.array([[0, 0, 0.5, 0.25], [0.1, 0.2, 0.3, 0.9]]))
    f, b, c = RegionsFile(tmp_path / "r.h5").get(0)
    np.testing.assert_allclose(b[:, 4:], [[0.5, 0.25], [0.2, 0.7]], atol=1e-6)
    assert c is None


def _in_child(rf):
    return float(rf.get(len(rf) - 1)[0].astype(np.float32).sum())


def test_reader_pickles_and_works_in_worker_processes(tmp_path):
    images = random_images(np.random.default_rng(1))
    rf = RegionsFile(write_regions(tmp_path / "r.h5", images))
    rf.get(0)  # opens the handle in this process
    clone = pickle.loads(pickle.dumps(rf))
    assert clone._f is None
    np.testing.assert_array_equal(clone.get(3)[0], images[3][1])
    want = float(images[-1][1].astype(np.float32).sum())
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_in_child, (rf,)) == pytest.approx(want)
    # A forked worker (DataLoader's default on Linux) inherits the open handle. Forked from a fresh
    # process: forking the test process itself can deadlock on a lock another thread of an
    # earlier test holds at that moment (seen once under load), which is not what is tested here.
    code = (f"import multiprocessing as mp, pickle, sys; sys.path.insert(0, {str(Path(__file__).parent.parent)!r});"
            f"from tests.test_data_formats import _in_child; rf = pickle.loads({pickle.dumps(rf)!r}); rf.get(0);"
            f"pool = mp.get_context('fork').Pool(1); print(pool.apply(_in_child, (rf,))); pool.close(); pool.join()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) == pytest.approx(want)


@pytest.mark.parametrize("bad, message", [
    (lambda f, b: (f[:0], b[:0]), "zero regions"),
    (lambda f, b: (np.where(np.arange(len(f))[:, None] == 0, np.nan, f), b), "NaN or Inf in features"),
    (lambda f, b: (np.full_like(f, np.inf), b), "NaN or Inf in features"),
    (lambda f, b: (f[:, :3], b), "feature width 3, expected 5"),
    (lambda f, b: (f, b + np.array([0, 0, 2, 0, 2, 0], np.float32)), "outside \\[0, 1\\]"),
    (lambda f, b: (f, b[:, [2, 1, 0, 3, 4, 5]] * np.array([1, 1, 1, 1, -1, 1], np.float32)), "x2 < x1"),
    (lambda f, b: (f, b[:, :5]), "boxes of shape"),
    (lambda f, b: (f, b * np.array([[0]] + [[1]] * (len(b) - 1), np.float32)), "all-zero boxes"),
])
def test_writer_rejects_bad_images_naming_them(tmp_path, bad, message):
    iid, f, b, _ = random_images(np.random.default_rng(2), n=1)[0]
    f2, b2 = bad(f, b)
    w = RegionsWriter(tmp_path / "r.h5", feature_dim=5, feature_source="t")
    with pytest.raises(ValueError, match=message) as e:
        w.add(iid, f2, b2)
    assert "img_0" in str(e.value) and "r.h5" in str(e.value)
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_duplicate_ids_and_leaves_no_file_on_error(tmp_path):
    iid, f, b, _ = random_images(np.random.default_rng(3), n=1)[0]
    with pytest.raises(ValueError, match="duplicate image id"):
        with RegionsWriter(tmp_path / "r.h5", feature_dim=5, feature_source="t") as w:
            w.add(iid, f, b)
            w.add(iid, f, b)
    assert list(tmp_path.iterdir()) == []


def corrupt(path, fn):
    with h5py.File(path, "a") as f:
        fn(f)


def test_check_regions_lists_every_problem(tmp_path):
    images = random_images(np.random.default_rng(4), n=5)
    p = write_regions(tmp_path / "r.h5", images)

    def damage(f):
        feats = f["features"][:]
        feats[0, 0] = np.nan  # image 0
        f["features"][:] = feats
        boxes = f["boxes"][:]
        o = f["offsets"][:]
        boxes[o[2], 2] = 1.7  # image 2 outside
        boxes[o[3], 0] = boxes[o[3], 2] + 0.1  # image 3 flipped
        f["boxes"][:] = boxes
        ids = f["image_ids"][:]
        ids[4] = ids[1]
        del f["image_ids"]
        f.create_dataset("image_ids", data=ids, dtype=h5py.string_dtype())
    corrupt(p, damage)
    probs = check_regions_file(p)
    assert any("duplicate image id" in q and "img_1" in q for q in probs)
    # duplicate ids stop the deep scan; fix them and rescan
    corrupt(p, lambda f: f["image_ids"].__setitem__(4, "img_4"))
    probs = check_regions_file(p)
    joined = "\n".join(probs)
    assert "image 'img_0': NaN or Inf in features" in joined
    assert "image 'img_2': box corners outside" in joined
    assert "image 'img_3': boxes with x2 < x1" in joined
    assert {q.split("'")[1] for q in probs} == {"img_0", "img_2", "img_3"}


def test_offsets_that_do_not_add_up_and_missing_dataset(tmp_path):
    p = write_regions(tmp_path / "r.h5", random_images(np.random.default_rng(5), n=3))
    corrupt(p, lambda f: f["offsets"].__setitem__(-1, 10 ** 6))
    with pytest.raises(FormatError, match="offsets do not add up"):
        RegionsFile(p)
    q = write_regions(tmp_path / "q.h5", random_images(np.random.default_rng(5), n=3))
    corrupt(q, lambda f: f.__delitem__("boxes"))
    with pytest.raises(FormatError, match="dataset 'boxes' missing") as e:
        RegionsFile(q)
    assert "q.h5" in str(e.value)
    with pytest.raises(FileNotFoundError, match="nothere.h5"):
        RegionsFile(tmp_path / "nothere.h5")


def write_caps(path, **over):
    cols = dict(caption_ids=["c0", "c1", "c2"], image_ids=["img_0", "img_1", "img_0"],
                texts=["a dog", "red cats", "a cat"], token_ids=[[5, 6], [9, 7, 8], [5, 7]],
                splits=["train", "train", "test"])
    cols.update(over)
    return write_captions(path, **cols, **TOK)


def test_captions_round_trip(tmp_path):
    p = write_caps(tmp_path / "c.h5")
    t = read_captions(p)
    assert t.caption_ids == ["c0", "c1", "c2"] and t.image_ids == ["img_0", "img_1", "img_0"]
    assert t.texts[1] == "red cats" and t.splits == ["train", "train", "test"]
    assert [t.tokens(i).tolist() for i in range(3)] == [[5, 6], [9, 7, 8], [5, 7]]
    assert t.vocab == VOCAB and t.cls_id == 2 and t.sep_id == 3 and t.attrs["tokenizer"] == "test"


def test_captions_bad_input_lists_all(tmp_path):
    with pytest.raises(FormatError) as e:
        write_caps(tmp_path / "c.h5", caption_ids=["c0", "c0", "c2"], token_ids=[[5, 6], [], [5, 99]],
                   known_image_ids=["img_0"])
    probs = e.value.problems
    assert any("caption 'c0': duplicate caption id" in q for q in probs)
    assert any("caption 'c0': empty caption" in q for q in probs)
    assert any("caption 'c2': token id outside the vocabulary" in q for q in probs)
    assert any("caption 'c0': unknown image 'img_1'" in q for q in probs)
    assert not (tmp_path / "c.h5").exists()


def test_captions_unknown_image_against_regions_file(tmp_path):
    r = write_regions(tmp_path / "r.h5", random_images(np.random.default_rng(6), n=1))
    c = write_caps(tmp_path / "c.h5")
    probs = check_captions_file(c, regions_path=r)
    assert probs == ["caption 'c1': unknown image 'img_1' (not in the regions file)"]


def test_validator_cli_lists_problems_and_exits_nonzero(tmp_path):
    r = write_regions(tmp_path / "r.h5", random_images(np.random.default_rng(7), n=1))
    c = write_caps(tmp_path / "c.h5")
    good = write_caps(tmp_path / "good.h5", image_ids=["img_0"] * 3, splits=["train"] * 3)  # one split per image
    assert validate([r, good]) == {str(r): [], str(good): []}
    res = subprocess.run([sys.executable, "-m", "cacr.data.validate", str(r), str(c), str(tmp_path / "gone.h5")],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 1
    assert "unknown image 'img_1'" in res.stdout and "gone.h5: 1 problem" in res.stdout
    assert f"{r}: ok" in res.stdout
    assert validate_main([str(r), str(good)]) == 0


def test_validator_groups_repeated_unknown_images(tmp_path):
    r = write_regions(tmp_path / "r.h5", random_images(np.random.default_rng(8), n=1))
    n = 9
    many = write_caps(tmp_path / "many.h5", caption_ids=[f"c{k}" for k in range(n)],
                      image_ids=[f"img_{k % 3 + 1}" for k in range(n)], texts=["a dog"] * n,
                      token_ids=[[5, 6]] * n, splits=["train"] * n)
    probs = validate([r, many])[str(many)]
    assert len(probs) == 4  # the first three, then one line with the count of the rest
    assert probs[0].startswith("caption ") and "unknown image 'img_1'" in probs[0]
    assert probs[-1].startswith("... and 6 more caption(s) with the same problem: unknown image")
