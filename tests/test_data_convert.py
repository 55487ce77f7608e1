"""Converters: the official UNITER DB sample survives exactly; TSV, npz, Karpathy and Winoground inputs."""
import base64
import io
import json
import shutil

import lmdb
import lz4.frame
import msgpack
import msgpack_numpy
import numpy as np
import pytest

from cacr.data.convert import convert_bua_tsv, convert_karpathy, convert_npz_dir, convert_uniter_img, \
    convert_uniter_txt, main
from cacr.data.formats import FormatError, RegionsFile, read_captions
from cacr.data.tokenizer import WordPieceTokenizer

from .conftest import FIXTURES

SAMPLE = FIXTURES / "uniter_db_sample"
IMG_DB = SAMPLE / "img_db" / "flickr30k" / "feat_th0.2_max100_min10"
TXT_DB = SAMPLE / "txt_db" / "itm_flickr30k_test.db"


def official_images(db=IMG_DB):
    """Slow twin: every image of the official DB as stored (all rows)."""
    env = lmdb.open(str(db), readonly=True, lock=False)
    out = {}
    with env.begin() as txn:
        for k, v in txn.cursor():
            if k != b"__keys__":
                out[k.decode()] = msgpack.unpackb(v, raw=False, object_hook=msgpack_numpy.decode)
    env.close()
    return out


@pytest.fixture(scope="module")
def bert_like_vocab(tmp_path_factory):
    """A vocabulary with bert-base-cased's size and special ids (the real one is not downloaded)."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"w{i}" for i in range(28996 - len(vocab))]
    p = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    p.write_text("\n".join(vocab) + "\n")
    return p


def test_uniter_img_db_survives_exactly(tmp_path):
    out = convert_uniter_img(IMG_DB, tmp_path / "regions.h5")
    rf = RegionsFile(out)
    ref = official_images()
    nbb = json.loads((IMG_DB.parent / "nbb_th0.2_max100_min10.json").read_text())
    assert sorted(rf.image_ids) == sorted(ref) and len(rf) == 6
    assert rf.feature_dim == 2048 and rf.has_conf
    for iid, d in ref.items():
        f, b, c = rf.get(rf.index(iid))
        n = nbb[iid]
        np.testing.assert_array_equal(f, d["features"][:n])  # fp16 bit for bit
        np.testing.assert_array_equal(b, d["norm_bb"][:n].astype(np.float32))  # fp16 -> fp32 is exact
        np.testing.assert_array_equal(c, d["conf"][:n].astype(np.float32))


def _rewrite_db(src, dst, encode):
    env = lmdb.open(str(src), readonly=True, lock=False)
    dst.mkdir(parents=True)
    out = lmdb.open(str(dst), map_size=1 << 28)
    with env.begin() as t, out.begin(write=True) as w:
        for k, v in t.cursor():
            w.put(k, v if k == b"__keys__" else encode(msgpack.unpackb(v, raw=False,
                                                                     object_hook=msgpack_numpy.decode)))
    env.close()
    out.close()


def test_uniter_img_db_compressed_variant_and_nbb_truncation(tmp_path):
    db = tmp_path / "img_db" / "feat_th0.2_max100_min10_compressed"

    def npz_bytes(d):
        buf = io.BytesIO()
        np.savez_compressed(buf, **d)
        return buf.getvalue()
    _rewrite_db(IMG_DB, db, npz_bytes)
    nbb = json.loads((IMG_DB.parent / "nbb_th0.2_max100_min10.json").read_text())
    cut = {k: max(1, v - 3) for k, v in nbb.items()}
    (db.parent / "nbb_th0.2_max100_min10.json").write_text(json.dumps(cut))
    out = convert_uniter_img(db, tmp_path / "r.h5")  # compressed detected from the name, nbb json beside it
    rf = RegionsFile(out)
    ref = official_images()
    for iid, d in ref.items():
        f, b, c = rf.get(rf.index(iid))
        assert f.shape[0] == cut[iid]
        np.testing.assert_array_equal(f, d["features"][:cut[iid]])
        np.testing.assert_array_equal(b, d["norm_bb"][:cut[iid]].astype(np.float32))


def test_uniter_img_db_errors(tmp_path):
    db = tmp_path / "feat_x"
    shutil.copytree(IMG_DB, db)
    with pytest.raises(FileNotFoundError, match="nbb_x.json"):
        convert_uniter_img(db, tmp_path / "r.h5")
    (tmp_path / "nbb_x.json").write_text(json.dumps({"flickr30k_000830354086.npz": 21}))
    with pytest.raises(FormatError, match="image 'flickr30k_000796694334.npz': missing from"):
        convert_uniter_img(db, tmp_path / "r.h5")
    assert not (tmp_path / "r.h5").exists()


def official_texts(db=TXT_DB):
    env = lmdb.open(str(db), readonly=True, lock=False)
    with env.begin() as txn:
        out = {k.decode(): msgpack.unpackb(lz4.frame.decompress(v), raw=False) for k, v in txn.cursor()}
    env.close()
    return out


def test_uniter_txt_db_survives_exactly(tmp_path, bert_like_vocab):
    regions = convert_uniter_img(IMG_DB, tmp_path / "regions.h5")
    tok = WordPieceTokenizer.from_vocab_file(bert_like_vocab)
    out = convert_uniter_txt([TXT_DB], tmp_path / "captions.h5", tok, regions=regions)
    t = read_captions(out, regions_path=regions)
    ref = official_texts()
    txt2img = json.loads((TXT_DB / "txt2img.json").read_text())
    assert sorted(t.caption_ids) == sorted(ref) and len(t) == 30
    assert set(t.splits) == {"test"}
    assert (t.cls_id, t.sep_id) == (101, 102)
    for i, cid in enumerate(t.caption_ids):
        assert t.tokens(i).tolist() == ref[cid]["input_ids"]
        assert t.image_ids[i] == ref[cid]["img_fname"] == txt2img[cid]
        assert t.texts[i] == ref[cid]["raw"]
    # captions of an image are kept together, in img2txts order
    img2txts = json.loads((TXT_DB / "img2txts.json").read_text())
    assert t.caption_ids == [c for cs in img2txts.values() for c in cs]


def test_uniter_txt_db_tokenizer_mismatch(tmp_path):
    tok = WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], name="tiny")
    with pytest.raises(FormatError, match="CLS id 101, the tokenizer 'tiny' has 2"):
        convert_uniter_txt([TXT_DB], tmp_path / "c.h5", tok)


def test_bua_tsv(tmp_path):
    rng = np.random.default_rng(0)
    rows, ref = [], {}
    for iid, (w, h, n) in {"111": (640, 480, 3), "222": (500, 375, 5)}.items():
        xy = rng.uniform(0, 200, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(1, 150, (n, 2))], 1).astype(np.float32)
        feats = rng.standard_normal((n, 8)).astype(np.float32)
        ref[iid] = (feats, boxes, w, h)
        enc = lambda a: base64.b64encode(a.tobytes()).decode()  # noqa: E731
        rows.append("\t".join([iid, str(w), str(h), str(n), enc(boxes), enc(feats)]))
    (tmp_path / "f.tsv").write_text("\n".join(rows) + "\n")
    rf = RegionsFile(convert_bua_tsv([tmp_path / "f.tsv"], tmp_path / "r.h5"))
    assert rf.image_ids == ["111", "222"] and not rf.has_conf
    for iid, (feats, boxes, w, h) in ref.items():
        f, b, _ = rf.get(rf.index(iid))
        np.testing.assert_array_equal(f, feats.astype(np.float16))
        exp = boxes / np.array([w, h, w, h], np.float32)
        np.testing.assert_allclose(b[:, :4], exp, rtol=1e-6)
        np.testing.assert_allclose(b[:, 4], exp[:, 2] - exp[:, 0], rtol=1e-5)
    bad = rows[0].split("\t")
    bad[1] = "100"  # boxes now outside a 100-px-wide image
    (tmp_path / "bad.tsv").write_text("\t".join(bad) + "\n")
    with pytest.raises(FormatError, match=r"(?s)bad.tsv: .*image '111'.*outside"):
        convert_bua_tsv([tmp_path / "bad.tsv"], tmp_path / "bad.h5")


def test_npz_dir_both_key_conventions_sorted_by_conf(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "npz"
    d.mkdir()
    f1 = rng.standard_normal((4, 6)).astype(np.float16)
    nb = np.array([[0, 0, .5, .5, .5, .5], [.1, .1, .2, .3, .1, .2], [0, 0, 1, 1, 1, 1], [.5, .5, .6, .9, .1, .4]],
                  np.float32)
    conf = np.array([0.1, 0.9, 0.5, 0.3], np.float32)
    np.savez(d / "ex_0_img_0.npz", features=f1, norm_bb=nb, conf=conf)
    f2 = rng.standard_normal((2, 6)).astype(np.float32)
    np.savez(d / "ex_0_img_1.npz", x=f2, bbox=np.array([[0, 0, 50, 20], [10, 10, 100, 40]], np.float32),
             image_w=100, image_h=40, conf=np.array([0.8, 0.2], np.float32))
    rf = RegionsFile(convert_npz_dir(d, tmp_path / "r.h5", id_format="{stem}"))
    assert rf.image_ids == ["ex_0_img_0", "ex_0_img_1"]
    f, b, c = rf.get(0)
    order = [1, 2, 3, 0]
    np.testing.assert_array_equal(f, f1[order])
    np.testing.assert_array_equal(b, nb[order])
    np.testing.assert_array_equal(c, conf[order])
    f, b, c = rf.get(1)
    np.testing.assert_array_equal(f, f2.astype(np.float16))
    np.testing.assert_allclose(b, [[0, 0, .5, .5, .5, .5], [.1, .25, 1, 1, .9, .75]], atol=1e-7)


def test_karpathy_json(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "runs", ".", "two", "cat", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    data = {"images": [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "train",
         "sentences": [{"sentid": 0, "raw": "a dog runs."}, {"sentid": 1, "raw": "two cats"}]},
        {"filename": "10002456.jpg", "imgid": 1, "split": "test",
         "sentences": [{"sentid": 2, "raw": "a cat ."}]}]}
    (tmp_path / "d.json").write_text(json.dumps(data))
    rc = main(["karpathy", str(tmp_path / "d.json"), str(tmp_path / "c.h5"), "--tokenizer",
               str(tmp_path / "vocab.txt"), "--image-id-format", "flickr30k_{stem:0>12}.npz"])
    assert rc == 0
    t = read_captions(tmp_path / "c.h5")
    assert t.caption_ids == ["0", "1", "2"] and t.splits == ["train", "train", "test"]
    assert t.image_ids == ["flickr30k_001000092795.npz"] * 2 + ["flickr30k_000010002456.npz"]
    assert [t.tokens(i).tolist() for i in range(3)] == [[5, 6, 7, 8], [9, 10, 11], [5, 10, 8]]
    data["images"][1]["sentences"][0]["raw"] = "  "
    (tmp_path / "d.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match="caption '2': empty caption"):
        convert_karpathy(tmp_path / "d.json", tmp_path / "c2.h5", WordPieceTokenizer(vocab))


def test_winoground_completeness_check(tmp_path, capsys):
    from cacr.data.formats import RegionsWriter

    with RegionsWriter(tmp_path / "r.h5", feature_dim=2, feature_source="t") as w:
        for k in ("ex_0_img_0", "ex_0_img_1", "ex_1_img_0"):
            w.add(k, np.ones((1, 2)), np.array([[0, 0, 1, 1]]))
    ex = dict(secondary_tag="", num_main_preds=1, tag="Relation", collapsed_tag="Relation",
              caption_0="a b", caption_1="b a")
    lines = [dict(id=i, image_0=f"ex_{i}_img_0", image_1=f"ex_{i}_img_1", **ex) for i in range(2)]
    (tmp_path / "examples.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    assert main(["winoground", str(tmp_path / "examples.jsonl"), str(tmp_path / "r.h5")]) == 1
    assert "example 1: image 'ex_1_img_1' (image_1) missing" in capsys.readouterr().out
    (tmp_path / "examples.jsonl").write_text(json.dumps(lines[0]))
    assert main(["winoground", str(tmp_path / "examples.jsonl"), str(tmp_path / "r.h5")]) == 0


def test_cli_uniter_pair(tmp_path, bert_like_vocab, capsys):
    assert main(["uniter-img", str(IMG_DB), str(tmp_path / "r.h5")]) == 0
    assert main(["uniter-txt", str(TXT_DB), "--out", str(tmp_path / "c.h5"), "--tokenizer", str(bert_like_vocab),
                 "--regions", str(tmp_path / "r.h5")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert len(read_captions(tmp_path / "c.h5", regions_path=tmp_path / "r.h5")) == 30
    assert main(["uniter-img", str(tmp_path / "nope"), str(tmp_path / "x.h5")]) == 1
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["img", "txt"])
def test_a_corrupt_lmdb_is_named_with_the_item_being_read(tmp_path, bert_like_vocab, which):
    src = IMG_DB if which == "img" else TXT_DB
    db = tmp_path / src.name
    shutil.copytree(src, db)
    if which == "img":
        shutil.copy(IMG_DB.parent / "nbb_th0.2_max100_min10.json", tmp_path)
    data = bytearray((db / "data.mdb").read_bytes())
    page = 4096
    assert len(data) > 3 * page
    for at in range(2 * page, len(data), page):  # every page after the two meta pages: a wrong page type
        data[at + 10:at + 12] = b"\xff\xff"
    (db / "data.mdb").write_bytes(bytes(data))
    out = str(tmp_path / "o.h5")
    args = (["uniter-img", str(db), out] if which == "img" else
            ["uniter-txt", str(db), "--tokenizer", str(bert_like_vocab), "--out", out])
    with pytest.raises(FormatError, match=r"(?s)data\.mdb: 1 problem.*(the key list|image '|caption ').*corrupt"):
        main(args + ["--debug"])
    assert not (tmp_path / "o.h5").exists()
