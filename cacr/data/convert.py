"""Converters from the public formats (docs/reference.md §4, §5) to the project's regions / captions files.

``python -m cacr.data.convert <subcommand> ...``:

- ``uniter-img``: official UNITER image LMDB (msgpack + msgpack_numpy values, or the
  ``_compressed`` variant holding ``np.savez_compressed`` bytes), first ``nbb`` rows of each
  image per the ``nbb_*.json`` beside it -> regions file (features, ``norm_bb``, ``conf``;
  image ids are the DB keys, e.g. ``flickr30k_000830354086.npz``, as the text DB names them);
- ``uniter-txt``: official text LMDBs (lz4-compressed msgpack; ``input_ids`` without
  [CLS]/[SEP], ``img_fname``) -> one captions file, the split taken from each DB's name;
- ``bua-tsv``: bottom-up-attention TSV (base64 float32, pixel boxes) -> regions file;
- ``npz-dir``: a folder of per-image ``.npz`` files -> regions file;
- ``karpathy``: ``dataset_flickr30k.json`` + a tokenizer -> captions file;
- ``winoground``: check that a regions file holds both images of every example.

Every converter writes to a temporary name and renames the file when complete; it refuses an
existing output unless ``--overwrite`` and never writes onto one of its inputs.
"""
from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import re
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from cacr.winoground import read_winoground_examples

from .datasets import winoground_problems
from .formats import FormatError, RegionsFile, RegionsWriter, write_captions
from .tokenizer import WordPieceTokenizer


# ------------------------------------------------------------------ UNITER image DB


def _json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FormatError(path, [f"malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})"]) from None
    except UnicodeDecodeError as e:
        raise FormatError(path, [f"not UTF-8 text ({e.reason} at byte {e.start})"]) from None


LMDB_MAGIC = 0xBEEFC0DE


def check_lmdb_file(mdb: Path) -> None:
    """Refuse (one line) a ``data.mdb`` that is not whole, before LMDB memory-maps it: reading a
    page past the end of a truncated file would kill the process with SIGBUS. The newer of the
    two meta pages (LMDB's format: page header 16 bytes, then magic, version, address,
    map size, two 48-byte DB records whose first holds the page size, last page, txn id)
    says how many pages the file must hold."""
    import struct

    size = mdb.stat().st_size
    with open(mdb, "rb") as f:
        head = f.read(16 + 152)
        if len(head) < 16 + 152 or struct.unpack_from("<I", head, 16)[0] != LMDB_MAGIC:
            raise FormatError(mdb, ["not an LMDB data file (no LMDB meta page at its start)"])
        psize = struct.unpack_from("<I", head, 40)[0]
        if psize < 512 or psize & (psize - 1):
            raise FormatError(mdb, [f"LMDB meta page gives page size {psize}; the file is corrupt"])
        f.seek(psize)
        metas = [head, f.read(16 + 152)]
    best = None
    for m in metas:
        if len(m) == 16 + 152 and struct.unpack_from("<I", m, 16)[0] == LMDB_MAGIC:
            last_pg, txnid = struct.unpack_from("<QQ", m, 136)
            if best is None or txnid > best[1]:
                best = (last_pg, txnid)
    if best is None:
        raise FormatError(mdb, [f"truncated: {size} bytes, shorter than LMDB's two meta pages of {psize} bytes"])
    need = (best[0] + 1) * psize
    if size < need:
        raise FormatError(mdb, [f"truncated: {size} bytes, but its last page ends at byte {need} "
                                f"(page {best[0]} of {psize} bytes); copy or download the database again"])


def _open_lmdb(path: Path):
    import lmdb

    if not (path / "data.mdb").is_file():
        raise FileNotFoundError(f"{path}: not an LMDB folder (data.mdb missing)")
    check_lmdb_file(path / "data.mdb")  # before the memory map: a truncated file would be a bus error
    try:
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, create=False)
    except lmdb.Error as e:
        raise FormatError(path / "data.mdb", [f"cannot open the LMDB ({type(e).__name__}: {e})"]) from None


class _LmdbReading:
    """Turns an ``lmdb.Error`` while reading ``db`` into a FormatError naming the file and
    the item being read (``self.item``); closes the environment."""

    def __init__(self, db: Path, env):
        self.db, self.env, self.item = db, env, "the key list"

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        import lmdb

        self.env.close()
        if kind is not None and issubclass(kind, lmdb.Error):
            raise FormatError(self.db / "data.mdb", [f"{self.item}: the LMDB is corrupt or truncated "
                                                     f"({type(e).__name__}: {e})"]) from None
        return False


def _decode_img_value(value: bytes, compressed: bool, where: str) -> Dict[str, np.ndarray]:
    if compressed:
        with np.load(io.BytesIO(value)) as z:
            return {k: z[k] for k in z.files}
    import msgpack
    import msgpack_numpy

    d = msgpack.unpackb(value, raw=False, object_hook=msgpack_numpy.decode)
    if not isinstance(d, dict):
        raise FormatError(where, [f"value is a {type(d).__name__}, expected a dict of arrays"])
    return d


def nbb_json_for(db: Path) -> Path:
    """``.../feat_th0.2_max100_min10`` -> ``.../nbb_th0.2_max100_min10.json`` (docs/reference.md §4)."""
    name = db.name.replace("_compressed", "")
    return db.parent / (name.replace("feat_", "nbb_", 1) + ".json")


def read_uniter_img_db(db, nbb_json=None, compressed: Optional[bool] = None
                       ) -> Iterator[Tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(image_id, features, norm_bb, conf)`` with the first ``nbb`` rows of each image."""
    db = Path(db)
    if compressed is None:
        compressed = "_compressed" in db.name
    nbb_path = Path(nbb_json) if nbb_json else nbb_json_for(db)
    if not nbb_path.is_file():
        raise FileNotFoundError(f"{nbb_path}: nbb json not found (image name -> number of regions kept); "
                                f"pass --nbb")
    nbb = _json(nbb_path)
    env = _open_lmdb(db)
    with _LmdbReading(db, env) as reading, env.begin() as txn:
        raw_keys = txn.get(b"__keys__")
        if raw_keys is not None:
            keys = json.loads(raw_keys)
        else:
            keys = [k.decode() for k, _ in txn.cursor() if k != b"__keys__"]
        problems = [f"image {k!r}: missing from {nbb_path}" for k in keys if k not in nbb]
        if problems:
            raise FormatError(db, problems)
        for k in tqdm(keys, desc=f"images {db.name}", unit="img"):
            reading.item = f"image {k!r}"
            v = txn.get(k.encode("utf-8"))
            if v is None:
                raise FormatError(db, [f"image {k!r}: listed in __keys__ but not stored"])
            try:
                d = _decode_img_value(v, compressed, f"{db}: image {k!r}")
            except FormatError:
                raise
            except Exception as e:  # noqa: BLE001 - corrupt bytes: name the DB and the image
                raise FormatError(db, [f"image {k!r}: undecodable value ({type(e).__name__}: {e}); expected "
                                       f"{'np.savez_compressed bytes' if compressed else 'msgpack-numpy'}"]) from None
            miss = [n for n in ("features", "norm_bb") if n not in d]
            if miss:
                raise FormatError(db, [f"image {k!r}: arrays {miss} missing (has {sorted(d)})"])
            n = int(nbb[k])
            if n > d["features"].shape[0]:
                raise FormatError(db, [f"image {k!r}: nbb says {n} regions, the DB stores {d['features'].shape[0]}"])
            conf = d["conf"][:n] if "conf" in d else None
            yield k, d["features"][:n], d["norm_bb"][:n], conf


def convert_uniter_img(db, out, nbb_json=None, compressed: Optional[bool] = None, source: str = "") -> Path:
    src = source or (f"UNITER image DB {Path(db).name} (bottom-up attention Faster R-CNN, fp16), first nbb rows "
                     f"per {Path(nbb_json).name if nbb_json else nbb_json_for(Path(db)).name}")
    items = ((k, feat, np.asarray(bb, dtype=np.float32), conf)
             for k, feat, bb, conf in read_uniter_img_db(db, nbb_json, compressed))
    return _regions_from(items, out, src, progress=False)


def _chain(first, it):
    yield first
    yield from it


# ------------------------------------------------------------------ UNITER text DB


def split_of_txt_db(db: Path) -> str:
    m = re.search(r"_(train|val|test|restval|dev)\.db$", db.name.rstrip("/"))
    if not m:
        raise ValueError(f"{db}: cannot tell the split from the name (expected ..._<split>.db); pass --split")
    return m.group(1)


def read_uniter_txt_db(db) -> Tuple[dict, List[Tuple[str, dict]]]:
    """``(meta, [(caption_id, example)])`` in ``img2txts.json`` order (captions of an image together)."""
    import lz4.frame
    import msgpack

    db = Path(db)
    meta_path = db / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: meta.json of the text DB not found")
    meta = _json(meta_path)
    env = _open_lmdb(db)
    order: Optional[List[str]] = None
    if (db / "img2txts.json").is_file():
        order = [t for ts in _json(db / "img2txts.json").values() for t in ts]
    out = []
    with _LmdbReading(db, env) as reading, env.begin() as txn:
        if order is None:
            order = [k.decode() for k, _ in txn.cursor()]
        for k in tqdm(order, desc=f"captions {db.name}", unit="cap"):
            reading.item = f"caption {k!r}"
            v = txn.get(k.encode("utf-8"))
            if v is None:
                raise FormatError(db, [f"caption {k!r}: listed in img2txts.json but not stored"])
            try:
                ex = msgpack.unpackb(lz4.frame.decompress(v), raw=False)
            except Exception as e:  # noqa: BLE001 - corrupt bytes: name the DB and the caption
                raise FormatError(db, [f"caption {k!r}: undecodable value ({type(e).__name__}: {e}); expected "
                                       f"lz4-compressed msgpack"]) from None
            if not isinstance(ex, dict):
                raise FormatError(db, [f"caption {k!r}: value is a {type(ex).__name__}, expected a dict"])
            miss = [n for n in ("input_ids", "img_fname") if n not in ex]
            if miss:
                raise FormatError(db, [f"caption {k!r}: fields {miss} missing"])
            out.append((k, ex))
    return meta, out


def convert_uniter_txt(dbs: Sequence, out, tokenizer: WordPieceTokenizer, splits: Optional[Sequence[str]] = None,
                       regions=None) -> Path:
    cap_ids, img_ids, texts, toks, spl = [], [], [], [], []
    problems = []
    for n, db in enumerate(dbs):
        db = Path(db)
        split = splits[n] if splits else split_of_txt_db(db)
        meta, rows = read_uniter_txt_db(db)
        for key in ("CLS", "SEP", "UNK"):
            want = {"CLS": tokenizer.cls_id, "SEP": tokenizer.sep_id, "UNK": tokenizer.unk_id}[key]
            if key in meta and int(meta[key]) != want:
                problems.append(f"{db}/meta.json: {key} id {meta[key]}, the tokenizer {tokenizer.name!r} has {want}")
        if "toker" in meta and Path(str(tokenizer.name)).name not in (meta["toker"], "vocab.txt"):
            problems.append(f"{db}/meta.json: made with tokenizer {meta['toker']!r}, converting with "
                            f"{tokenizer.name!r}")
        for k, ex in rows:
            cap_ids.append(k)
            img_ids.append(ex["img_fname"])
            ids = [int(i) for i in ex["input_ids"]]
            toks.append(ids)
            texts.append(ex.get("raw") or tokenizer.decode(ids))
            spl.append(split)
    if problems:
        raise FormatError(dbs[0], problems)
    known = RegionsFile(regions).image_ids if regions else None
    return write_captions(out, caption_ids=cap_ids, image_ids=img_ids, texts=texts, token_ids=toks, splits=spl,
                          known_image_ids=known, **tokenizer.file_attrs())


# ------------------------------------------------------------------ bottom-up-attention TSV / npz

TSV_FIELDS = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"]
LXMERT_FIELDS = ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                 "num_boxes", "boxes", "features"]


def _b64_floats(s: str, where: str, column: str) -> np.ndarray:
    """float32 values of a base64 column, or one line naming the line, image and column."""
    import binascii

    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise FormatError(where, [f"column {column!r}: not valid base64, truncated? ({e})"]) from None
    if len(raw) % 4:
        raise FormatError(where, [f"column {column!r}: {len(raw)} bytes, not whole float32 values; truncated?"])
    return np.frombuffer(raw, dtype=np.float32)


def _b64(s: str, shape, where: str, column: str = "boxes") -> np.ndarray:
    a = _b64_floats(s, where, column)
    if a.size != int(np.prod(shape)):
        raise FormatError(where, [f"expected {int(np.prod(shape))} float32 values {shape}, got {a.size}"])
    return a.reshape(shape)


def normalise_boxes(boxes: np.ndarray, w: float, h: float, where: str) -> np.ndarray:
    """Pixel ``x1 y1 x2 y2`` -> ``(m, 6)`` normalised ``x1 y1 x2 y2 w h``; boxes outside the image are errors."""
    b = np.asarray(boxes, dtype=np.float64) / np.array([w, h, w, h])
    if (b < -1e-3).any() or (b > 1 + 1e-3).any():
        rows = np.flatnonzero(((b < -1e-3) | (b > 1 + 1e-3)).any(1)).tolist()
        raise FormatError(where, [f"boxes outside the {w}x{h} image, rows {rows[:10]}"])
    b = np.clip(b, 0, 1)
    return np.concatenate([b, b[:, 2:3] - b[:, 0:1], b[:, 3:4] - b[:, 1:2]], 1).astype(np.float32)


def read_bua_tsv(path) -> Iterator[Tuple[str, np.ndarray, np.ndarray, Optional[np.ndarray]]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: TSV file not found")
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="") as f:
        for ln, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if len(row) == len(TSV_FIELDS):
                d = dict(zip(TSV_FIELDS, row))
                iid, w, h, conf = d["image_id"], float(d["image_w"]), float(d["image_h"]), None
            elif len(row) == len(LXMERT_FIELDS):
                d = dict(zip(LXMERT_FIELDS, row))
                iid, w, h = d["img_id"], float(d["img_w"]), float(d["img_h"])
            else:
                raise FormatError(path, [f"line {ln}: {len(row)} columns, expected {len(TSV_FIELDS)} "
                                         f"({', '.join(TSV_FIELDS)}) or {len(LXMERT_FIELDS)} (LXMERT)"])
            where = f"{path}: line {ln} (image {iid!r})"
            n = int(d["num_boxes"])
            boxes = _b64(d["boxes"], (n, 4), where)
            feat = _b64_floats(d["features"], where, "features")
            if n == 0 or feat.size % n:
                raise FormatError(path, [f"line {ln} (image {iid!r}): {feat.size} feature values for {n} boxes"])
            feat = feat.reshape(n, -1)
            conf = _b64(d["objects_conf"], (n,), where, "objects_conf") if len(row) == len(LXMERT_FIELDS) else None
            nb = normalise_boxes(boxes, w, h, where)
            if conf is not None:  # rows sorted by confidence, so the region caps keep a prefix
                order = np.argsort(-conf, kind="stable")
                feat, nb, conf = feat[order], nb[order], conf[order]
            yield iid, feat, nb, conf


def _regions_from(items, out, source: str, total: Optional[int] = None, progress: bool = True) -> Path:
    it = iter(items)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError(f"{out}: no images found in the input") from None
    with RegionsWriter(out, feature_dim=first[1].shape[1], feature_source=source,
                       with_conf=first[3] is not None) as w:
        rows = _chain(first, it)
        if progress:
            rows = tqdm(rows, desc=f"regions {Path(out).name}", unit="img", total=total)
        for iid, feat, nb, conf in rows:
            if (conf is not None) != w.with_conf:
                raise FormatError(out, [f"image {iid!r}: confidences present in some images only"])
            w.add(iid, feat, nb, conf)
    return Path(out)


def convert_bua_tsv(tsvs: Sequence, out, source: str = "") -> Path:
    items = (x for p in tsvs for x in read_bua_tsv(p))
    return _regions_from(items, out, source or f"bottom-up-attention TSV {', '.join(Path(p).name for p in tsvs)}")


def read_npz(path: Path) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """``(features, (m, 6) normalised boxes, conf or None)`` of one per-image ``.npz``.

    Accepts UNITER's own ``features`` / ``norm_bb`` / ``conf`` keys, or the bottom-up
    extractor's ``x`` / ``bbox`` (pixels) / ``image_w`` / ``image_h`` (optionally ``conf``).
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - truncated zip, pickled objects, not an npz at all
        raise FormatError(path, [f"not a readable .npz ({type(e).__name__}: {e})"]) from None
    feat = d.get("features", d.get("x"))
    if feat is None:
        raise FormatError(path, [f"no features array ('features' or 'x'); has {sorted(d)}"])
    feat = np.asarray(feat)
    if feat.ndim == 2 and feat.shape[0] != feat.shape[1] and "bbox" in d and feat.shape[1] == d["bbox"].shape[0]:
        feat = feat.T  # some extractors store (D, m)
    if "norm_bb" in d:
        nb = np.asarray(d["norm_bb"], dtype=np.float32)
        if nb.shape[1] == 4:
            nb = np.concatenate([nb, nb[:, 2:3] - nb[:, 0:1], nb[:, 3:4] - nb[:, 1:2]], 1)
        nb = nb[:, :6]
    elif ("bbox" in d or "boxes" in d) and "image_w" in d and "image_h" in d:
        nb = normalise_boxes(d.get("bbox", d.get("boxes")), float(d["image_w"]), float(d["image_h"]), str(path))
    else:
        raise FormatError(path, [f"no boxes: expected 'norm_bb', or 'bbox' with 'image_w'/'image_h'; has {sorted(d)}"])
    conf = d.get("conf")
    if conf is not None:
        conf = np.asarray(conf, dtype=np.float32).reshape(-1)
        order = np.argsort(-conf, kind="stable")
        feat, nb, conf = feat[order], nb[order], conf[order]
    return feat, nb, conf


def format_image_id(fmt: str, option: str, **fields) -> str:
    """``fmt.format(**fields)``, or one line naming the option and the fields it may use."""
    try:
        return fmt.format(**fields)
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        name = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise ValueError(f"{option} {fmt!r}: no field {name!r} ({type(e).__name__}); expected a format of "
                         f"{', '.join('{' + k + '}' for k in fields)}") from None


def convert_npz_dir(folder, out, id_format: str = "{name}", source: str = "") -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder of .npz files not found")
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .npz files")
    items = ((format_image_id(id_format, "--id-format", name=p.name, stem=p.stem), *read_npz(p)) for p in files)
    return _regions_from(items, out, source or f"per-image npz files from {folder.name}", total=len(files))


# ------------------------------------------------------------------ Karpathy captions


def convert_karpathy(json_path, out, tokenizer: WordPieceTokenizer, image_id_format: str = "{stem}",
                     restval_as: str = "train", regions=None) -> Path:
    json_path = Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path}: Karpathy captions json not found")
    data = _json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise FormatError(json_path, ["no 'images' list (expected Karpathy's dataset_flickr30k.json)"])
    cap_ids, img_ids, texts, toks, spl = [], [], [], [], []
    split_of: dict = {}  # image id -> (split, entry): an image in two splits is a test image seen in training
    leaks: List[str] = []
    for n, img in enumerate(tqdm(data["images"], desc="captions", unit="img")):
        miss = [k for k in ("filename", "split", "sentences") if not isinstance(img, dict) or k not in img]
        if miss:
            raise FormatError(json_path, [f"images[{n}]: missing {miss}"])
        bad = [j for j, s in enumerate(img["sentences"]) if not isinstance(s, dict) or "sentid" not in s]
        if bad:
            raise FormatError(json_path, [f"images[{n}] ({img['filename']}): sentences {bad[:5]} lack 'sentid'"])
        fn = img["filename"]
        iid = format_image_id(image_id_format, "--image-id-format", filename=fn, stem=Path(fn).stem,
                              imgid=img.get("imgid"))
        split = restval_as if img["split"] == "restval" else img["split"]
        first = split_of.setdefault(iid, (split, n))
        if first[0] != split:
            leaks.append(f"images[{n}] ({fn}): image {iid!r} in split {split!r}, and in split {first[0]!r} at "
                         f"images[{first[1]}]; expected every image in one split")
        for s in img["sentences"]:
            raw = s.get("raw", " ".join(s.get("tokens", [])))
            cap_ids.append(str(s["sentid"]))
            img_ids.append(iid)
            texts.append(raw)
            toks.append(tokenizer.encode(raw))
            spl.append(split)
    if leaks:
        raise FormatError(json_path, leaks)
    known = RegionsFile(regions).image_ids if regions else None
    return write_captions(out, caption_ids=cap_ids, image_ids=img_ids, texts=texts, token_ids=toks, splits=spl,
                          known_image_ids=known, **tokenizer.file_attrs())


# ------------------------------------------------------------------ CLI


def _inputs(args) -> List[Optional[str]]:
    """Every file or folder a subcommand reads (its output may be none of them)."""
    if args.cmd == "uniter-img":
        return [args.db, args.nbb or str(nbb_json_for(Path(args.db)))]
    if args.cmd == "uniter-txt":
        return [*args.dbs, args.tokenizer, args.regions]
    if args.cmd == "bua-tsv":
        return list(args.tsv)
    if args.cmd == "npz-dir":
        return [args.folder]
    if args.cmd == "karpathy":
        return [args.json, args.tokenizer, args.regions]
    return []


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Every expected failure ends in one line ``error: <file>: <item>: <expected>``, exit
    code 1 (``--debug`` or ``CACR_DEBUG=1``: the traceback); an existing output is refused
    unless ``--overwrite``, an output that is one of the inputs always; SIGTERM and SIGINT
    remove the temporary file, and one left by a killed run is removed by the next."""
    ap = argparse.ArgumentParser(prog="python -m cacr.data.convert", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    a = sub.add_parser("uniter-img", parents=[common], help="official UNITER image LMDB -> regions file")
    a.add_argument("db", help="LMDB folder, e.g. img_db/flickr30k/feat_th0.2_max100_min10")
    a.add_argument("out")
    a.add_argument("--nbb", help="nbb json (default: nbb_<...>.json beside the DB)")
    a.add_argument("--compressed", choices=["auto", "yes", "no"], default="auto")
    a = sub.add_parser("uniter-txt", parents=[common], help="official UNITER text LMDBs -> captions file")
    a.add_argument("dbs", nargs="+", help="text DB folders, e.g. itm_flickr30k_train.db")
    a.add_argument("--out", required=True)
    a.add_argument("--tokenizer", required=True, help="vocab.txt of bert-base-cased, or the name")
    a.add_argument("--splits", nargs="+", help="split of each DB (default: from the names)")
    a.add_argument("--regions", help="regions file to check every caption's image against")
    a = sub.add_parser("bua-tsv", parents=[common], help="bottom-up-attention TSV -> regions file")
    a.add_argument("tsv", nargs="+")
    a.add_argument("--out", required=True)
    a = sub.add_parser("npz-dir", parents=[common], help="folder of per-image .npz -> regions file")
    a.add_argument("folder")
    a.add_argument("out")
    a.add_argument("--id-format", default="{name}", help="image id from {name} (file name) or {stem}")
    a = sub.add_parser("karpathy", parents=[common], help="dataset_flickr30k.json + tokenizer -> captions file")
    a.add_argument("json")
    a.add_argument("out")
    a.add_argument("--tokenizer", required=True)
    a.add_argument("--image-id-format", default="{stem}",
                   help="image id from {filename}, {stem}, {imgid}; UNITER's DB: flickr30k_{stem:0>12}.npz")
    a.add_argument("--regions", help="regions file to check every caption's image against")
    a = sub.add_parser("winoground", parents=[common], help="check a regions file holds every Winoground example's images")
    a.add_argument("examples")
    a.add_argument("regions")
    args = ap.parse_args(argv)
    from cacr.errors import debug, one_line, raise_on_termination
    from cacr.outputs import check_output

    raise_on_termination()
    try:
        if args.cmd != "winoground":
            what = "out" if args.cmd in ("uniter-img", "npz-dir", "karpathy") else "--out"
            check_output(args.out, overwrite=args.overwrite, inputs=_inputs(args), what=what)
        if args.cmd == "uniter-img":
            comp = None if args.compressed == "auto" else args.compressed == "yes"
            out = convert_uniter_img(args.db, args.out, args.nbb, comp)
        elif args.cmd == "uniter-txt":
            out = convert_uniter_txt(args.dbs, args.out, WordPieceTokenizer.load(args.tokenizer), args.splits,
                                     args.regions)
        elif args.cmd == "bua-tsv":
            out = convert_bua_tsv(args.tsv, args.out)
        elif args.cmd == "npz-dir":
            out = convert_npz_dir(args.folder, args.out, args.id_format)
        elif args.cmd == "karpathy":
            out = convert_karpathy(args.json, args.out, WordPieceTokenizer.load(args.tokenizer),
                                   args.image_id_format, regions=args.regions)
        else:
            problems = winoground_problems(read_winoground_examples(args.examples),
                                           RegionsFile(args.regions).image_ids, args.regions)
            for p in problems[:MAX_SHOWN]:
                print(p)
            if len(problems) > MAX_SHOWN:
                print(f"... and {len(problems) - MAX_SHOWN} more")
            if problems:
                print(f"{len(problems)} missing image(s)", file=sys.stderr)
                return 1
            print(f"{args.examples}: every image is in {args.regions}")
            return 0
    except KeyboardInterrupt:
        print("error: interrupted; no output written", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - bad input of any library (lmdb, lz4, msgpack, zip) in one line
        if args.debug or debug():
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        from cacr.data.formats import hdf5_broken

        if hdf5_broken():  # HDF5 segfaults when it frees the failed file: the message is out, the temp gone
            import os

            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 1
    print(f"wrote {out}")
    return 0


MAX_SHOWN = 20


if __name__ == "__main__":
    sys.exit(main())
