"""The project's two HDF5 file formats (regions, captions): writers, lazy readers, checks.

Regions file (``kind = "regions"``), all images of a set as flat datasets with offsets:

- ``image_ids`` (N,) utf-8 strings, unique;
- ``offsets`` (N+1,) int64, ``offsets[0] = 0``, non-decreasing, ``offsets[N] = R``; image
  ``i`` owns rows ``offsets[i]:offsets[i+1]`` (at least one), read in one contiguous slice;
- ``features`` (R, D) float16;
- ``boxes`` (R, 6) float32 ``[x1, y1, x2, y2, w, h]`` normalised by the image size (the
  official ``norm_bb`` layout, kept exactly; the model's collate appends ``w*h``);
- ``conf`` (R,) float32, optional: detector confidence, rows of an image sorted by it
  (descending) so that the official region caps keep a prefix;
- attributes ``format_version``, ``kind``, ``feature_dim``, ``box_format``,
  ``feature_source`` (free text: extractor, checkpoint, what was done to the features).

Captions file (``kind = "captions"``):

- ``caption_ids``, ``image_ids``, ``text``, ``split`` (N,) utf-8 strings;
- ``token_offsets`` (N+1,) int64 and ``token_ids`` (T,) int32: the word pieces of caption
  ``i`` (without [CLS]/[SEP]) are ``token_ids[token_offsets[i]:token_offsets[i+1]]``;
- ``vocab`` (V,) utf-8 strings: the tokenizer's vocabulary, so a file is self-contained;
- attributes ``format_version``, ``kind``, ``tokenizer`` (name), ``do_lower_case``,
  ``cls_id``, ``sep_id``, ``pad_id``, ``unk_id``.

Writers write ``<name>.tmp-<pid>`` and rename it when complete. Readers open the file
lazily, once per process (they pickle without the handle, so they work in DataLoader
workers and with ``ddp_spawn``). ``check_regions_file`` / ``check_captions_file`` list
every problem with the item it concerns; ``FormatError`` carries that list.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import h5py
import numpy as np

FORMAT_VERSION = 1
BOX_FORMAT = "x1y1x2y2wh"
BOX_COLUMNS = 6
STR = h5py.string_dtype("utf-8")
MAX_LISTED = 20  # problems listed per kind of problem before summarising the rest
DIGEST_ATTR = "sha256"  # attribute of a string dataset: the digest of its values


class FormatError(ValueError):
    """A file breaks its format; ``problems`` lists every problem found (file and item named)."""

    def __init__(self, path, problems: Sequence[str]):
        self.path = str(path)
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:MAX_LISTED])
        more = f"\n  ... and {len(self.problems) - MAX_LISTED} more" if len(self.problems) > MAX_LISTED else ""
        super().__init__(f"{self.path}: {len(self.problems)} problem(s):\n  {shown}{more}")


# --------------------------------------------------------------------------- writing


_hdf5_broken = False  # an HDF5 write failed: the library may crash when it closes its files at exit


def hdf5_broken() -> bool:
    """Whether an HDF5 file of this process failed to be written (disk full, file too large):
    HDF5 then segfaults when Python exits and closes it again, so a command ends with
    ``os._exit`` once its one-line message is printed."""
    return _hdf5_broken


def _write_failed(path: Path, tmp: Path, e: BaseException):
    """The one-line error of a failed HDF5 write of ``path``; its temporary file removed."""
    global _hdf5_broken
    from cacr.outputs import WriteError

    _hdf5_broken = True
    tmp.unlink(missing_ok=True)
    m = re.search(r"error message = '([^']*)'", str(e))
    reason = m.group(1) if m else (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return WriteError(path, OSError(getattr(e, "errno", None), reason))


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _str_array(values: Iterable[str]) -> np.ndarray:
    return np.array([str(v) for v in values], dtype=object)


def strings_digest(values: Iterable[str]) -> str:
    """SHA-256 of a string column (HDF5 filters cannot checksum variable-length strings)."""
    h = hashlib.sha256()
    for v in values:
        h.update(str(v).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _write_strings(f: h5py.File, name: str, values) -> None:
    arr = _str_array(values)
    ds = f.create_dataset(name, data=arr, dtype=STR)
    ds.attrs[DIGEST_ATTR] = strings_digest(arr)


def read_strings(f: h5py.File, name: str, path) -> List[str]:
    """A string column (decoded by h5py's ``asstr``), checked against its stored digest when
    it has one."""
    ds = f[name]
    if ds.dtype.kind not in "OSU":
        raise FormatError(path, [f"dataset {name!r}: {ds.dtype} values, expected utf-8 strings"])
    try:
        values = ds.asstr()[:].tolist()
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(path, [f"dataset {name!r}: unreadable bytes ({e}); the file is corrupted"]) from None
    want = ds.attrs.get(DIGEST_ATTR)
    if want is not None and strings_digest(values) != str(want):
        raise FormatError(path, [f"dataset {name!r}: content differs from its stored SHA-256; the file is corrupted"])
    return values


def read_array(ds, path, rows=None) -> np.ndarray:
    """``ds[rows]`` (all rows by default), with a Fletcher-32 failure named as corruption."""
    try:
        return ds[:] if rows is None else ds[rows]
    except OSError as e:
        where = f"rows {rows.start}:{rows.stop} of " if isinstance(rows, slice) else ""
        raise FormatError(path, [f"{where}dataset {ds.name.lstrip('/')!r}: checksum mismatch or unreadable bytes "
                                 f"({e}); the file is corrupted"]) from None


class RegionsWriter:
    """Append images one at a time, then ``close()`` renames the finished file into place.

    ``with RegionsWriter(path, feature_dim=2048, feature_source="...") as w:
    w.add(image_id, features (m, D), boxes (m, 6|4), conf=None)``. Every image is checked
    as it is added (``ValueError`` naming the image); rows are buffered in chunks.
    """

    def __init__(self, path, *, feature_dim: int, feature_source: str, with_conf: bool = False,
                 chunk_rows: int = 65536, check: bool = True):
        self.path = Path(path)
        self.tmp = _tmp_name(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.D = int(feature_dim)
        self.with_conf = with_conf
        self.check = check
        self._f = h5py.File(self.tmp, "w")
        rows_chunk = max(1, min(1024, (1 << 20) // max(1, 2 * self.D)))
        self._feat = self._f.create_dataset("features", (0, self.D), np.float16, maxshape=(None, self.D),
                                            chunks=(rows_chunk, self.D), fletcher32=True)
        self._box = self._f.create_dataset("boxes", (0, BOX_COLUMNS), np.float32,
                                           maxshape=(None, BOX_COLUMNS), chunks=(4096, BOX_COLUMNS), fletcher32=True)
        self._conf = (self._f.create_dataset("conf", (0,), np.float32, maxshape=(None,), chunks=(16384,),
                                             fletcher32=True)
                      if with_conf else None)
        self._f.attrs.update(format_version=FORMAT_VERSION, kind="regions", feature_dim=self.D,
                             box_format=BOX_FORMAT, feature_source=str(feature_source))
        self._ids: List[str] = []
        self._seen = set()
        self._counts: List[int] = []
        self._buf_f, self._buf_b, self._buf_c = [], [], []
        self._buffered = 0
        self._chunk_rows = chunk_rows
        self._rows = 0

    def add(self, image_id: str, features, boxes, conf=None) -> None:
        image_id = str(image_id)
        features = np.asarray(features)
        boxes = np.asarray(boxes, dtype=np.float32)
        if boxes.ndim == 2 and boxes.shape[1] == 4:
            boxes = np.concatenate([boxes, boxes[:, 2:3] - boxes[:, 0:1], boxes[:, 3:4] - boxes[:, 1:2]], 1)
        where = f"{self.path}: image {image_id!r}"
        if image_id in self._seen:
            raise ValueError(f"{where}: duplicate image id")
        if self.check:
            problems = region_problems(image_id, features, boxes, conf if self.with_conf else None, self.D)
            if self.with_conf and conf is None:
                problems.append(f"image {image_id!r}: no confidences given to a file written with conf")
            if problems:
                raise ValueError(f"{self.path}: " + "; ".join(problems))
        self._seen.add(image_id)
        self._ids.append(image_id)
        self._counts.append(features.shape[0])
        self._buf_f.append(features.astype(np.float16))
        self._buf_b.append(boxes)
        if self.with_conf:
            self._buf_c.append(np.asarray(conf, dtype=np.float32).reshape(-1))
        self._buffered += features.shape[0]
        if self._buffered >= self._chunk_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._buffered:
            return
        n0, n1 = self._rows, self._rows + self._buffered
        for ds, buf in ((self._feat, self._buf_f), (self._box, self._buf_b), (self._conf, self._buf_c)):
            if ds is None:
                continue
            ds.resize(n1, axis=0)
            ds[n0:n1] = np.concatenate(buf, 0)
            buf.clear()
        self._rows, self._buffered = n1, 0

    def close(self) -> Path:
        try:
            self._flush()
            if not self._ids:
                self._f.close()
                self.tmp.unlink(missing_ok=True)
                raise ValueError(f"{self.path}: no images were added")
            offsets = np.zeros(len(self._counts) + 1, dtype=np.int64)
            np.cumsum(self._counts, out=offsets[1:])
            self._f.create_dataset("offsets", data=offsets, fletcher32=True)
            _write_strings(self._f, "image_ids", self._ids)
            self._f.close()
        except (OSError, RuntimeError) as e:  # HDF5's write errors (EFBIG, ENOSPC) come as either
            raise _write_failed(self.path, self.tmp, e) from None
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._f.close()
        except (OSError, RuntimeError) as e:
            _write_failed(self.path, self.tmp, e)
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_captions(path, *, caption_ids: Sequence[str], image_ids: Sequence[str], texts: Sequence[str],
                   token_ids: Sequence[Sequence[int]], splits: Sequence[str], vocab: Sequence[str],
                   tokenizer: str, do_lower_case: bool, cls_id: int, sep_id: int, pad_id: int,
                   unk_id: int, known_image_ids: Optional[Iterable[str]] = None) -> Path:
    """Write a captions file (checked first: every problem raises one ``FormatError``)."""
    path = Path(path)
    n = len(caption_ids)
    lengths = np.array([len(t) for t in token_ids], dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = (np.concatenate([np.asarray(t, dtype=np.int64) for t in token_ids]) if n else np.zeros(0, np.int64))
    cols = dict(caption_ids=_str_array(caption_ids), image_ids=_str_array(image_ids), text=_str_array(texts),
                split=_str_array(splits))
    for k, v in cols.items():
        if len(v) != n:
            raise FormatError(path, [f"{k} has {len(v)} entries, expected {n} (one per caption)"])
    problems = caption_problems(cols["caption_ids"], cols["image_ids"], cols["text"], offsets, flat,
                                len(vocab), known_image_ids)
    if problems:
        raise FormatError(path, problems)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with h5py.File(tmp, "w") as f:
            for k, v in cols.items():
                _write_strings(f, k, v)
            f.create_dataset("token_offsets", data=offsets, fletcher32=True)
            f.create_dataset("token_ids", data=flat.astype(np.int32), fletcher32=True, chunks=True)
            _write_strings(f, "vocab", vocab)
            f.attrs.update(format_version=FORMAT_VERSION, kind="captions", tokenizer=str(tokenizer),
                           do_lower_case=bool(do_lower_case), cls_id=int(cls_id), sep_id=int(sep_id),
                           pad_id=int(pad_id), unk_id=int(unk_id))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # HDF5's write errors (EFBIG, ENOSPC) come as either
        raise _write_failed(path, tmp, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- checks


BOX_TOLERANCE = 1e-3  # box corners may stray this far outside [0, 1] (rounding of the detector's pixels)


def box_faults(boxes: np.ndarray):
    """``(outside, flipped)`` row masks of ``(R, >= 4)`` boxes ``[x1, y1, x2, y2, ...]`` (finite
    rows only): corners outside ``[0, 1]``; ``x2 < x1`` or ``y2 < y1``. The one definition
    the validator, ``train.py`` and the evaluators check against."""
    b = np.asarray(boxes, dtype=np.float32)
    finite = np.isfinite(b).all(axis=1)
    with np.errstate(invalid="ignore"):
        outside = finite & ((b[:, :4] < -BOX_TOLERANCE) | (b[:, :4] > 1 + BOX_TOLERANCE)).any(axis=1)
        flipped = finite & ((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1]))
    return outside, flipped


def region_problems(image_id: str, features: np.ndarray, boxes: np.ndarray, conf, feature_dim: int,
                    start_row: int = 0) -> List[str]:
    """Problems of one image's rows (``[]`` if none)."""
    where = f"image {image_id!r}"
    out = []
    if features.ndim != 2 or features.shape[0] == 0:
        return [f"{where}: zero regions (features of shape {features.shape}); expected at least one"]
    m = features.shape[0]
    if features.shape[1] != feature_dim:
        out.append(f"{where}: feature width {features.shape[1]}, expected {feature_dim}")
    bad = ~np.isfinite(features.astype(np.float32)).all(axis=1)
    if bad.any():
        out.append(f"{where}: NaN or Inf in features, rows {(np.flatnonzero(bad) + start_row).tolist()[:10]}")
    if boxes.ndim != 2 or boxes.shape != (m, BOX_COLUMNS):
        out.append(f"{where}: boxes of shape {boxes.shape}, expected ({m}, {BOX_COLUMNS}) [{BOX_FORMAT}]")
    else:
        b = boxes.astype(np.float32)
        finite = np.isfinite(b).all(axis=1)
        if not finite.all():
            out.append(f"{where}: NaN or Inf in boxes, rows {(np.flatnonzero(~finite) + start_row).tolist()[:10]}")
        outside, flipped = box_faults(b)
        with np.errstate(invalid="ignore"):
            wh = finite & ((np.abs(b[:, 4] - (b[:, 2] - b[:, 0])) > 2e-3)
                           | (np.abs(b[:, 5] - (b[:, 3] - b[:, 1])) > 2e-3))
            zero = finite & (b[:, :4] == 0).all(axis=1)
        if zero.any():
            out.append(f"{where}: all-zero boxes (padding rows?), rows {(np.flatnonzero(zero) + start_row).tolist()[:10]}")
        if outside.any():
            out.append(f"{where}: box corners outside [0, 1], rows {(np.flatnonzero(outside) + start_row).tolist()[:10]}")
        if flipped.any():
            out.append(f"{where}: boxes with x2 < x1 or y2 < y1, rows {(np.flatnonzero(flipped) + start_row).tolist()[:10]}")
        if wh.any():
            out.append(f"{where}: box w/h columns differ from x2-x1 / y2-y1, rows {(np.flatnonzero(wh) + start_row).tolist()[:10]}")
    if conf is not None:
        conf = np.asarray(conf, dtype=np.float32).reshape(-1)
        if conf.shape[0] != m:
            out.append(f"{where}: {conf.shape[0]} confidences for {m} regions")
        elif not np.isfinite(conf).all():
            out.append(f"{where}: NaN or Inf in confidences")
        elif (np.diff(conf) > 0).any():
            out.append(f"{where}: confidences not sorted in descending order (the region caps keep a prefix)")
    return out


def caption_problems(caption_ids, image_ids, texts, offsets, flat, vocab_size: int,
                     known_image_ids: Optional[Iterable[str]] = None) -> List[str]:
    out = []
    n = len(caption_ids)
    seen = {}
    for i, c in enumerate(caption_ids):
        if c in seen:
            out.append(f"caption {c!r}: duplicate caption id (rows {seen[c]} and {i})")
        else:
            seen[c] = i
    if offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != len(flat):
        out.append(f"token_offsets do not add up: first {offsets[0]}, last {offsets[-1]}, "
                   f"{len(flat)} token ids, non-decreasing={bool((np.diff(offsets) >= 0).all())}")
        return out
    lengths = np.diff(offsets)
    for i in np.flatnonzero(lengths == 0)[:MAX_LISTED * 5]:
        out.append(f"caption {caption_ids[i]!r}: empty caption (no word pieces; text {texts[i]!r})")
    for i in range(n):
        if not str(texts[i]).strip() and lengths[i] > 0:
            out.append(f"caption {caption_ids[i]!r}: empty raw text")
    if len(flat) and (flat.min() < 0 or flat.max() >= vocab_size):
        bad_rows = np.unique(np.searchsorted(offsets, np.flatnonzero((flat < 0) | (flat >= vocab_size)), "right") - 1)
        for i in bad_rows[:MAX_LISTED]:
            out.append(f"caption {caption_ids[i]!r}: token id outside the vocabulary [0, {vocab_size})")
    if known_image_ids is not None:
        known = set(known_image_ids)
        for i, img in enumerate(image_ids):
            if img not in known:
                out.append(f"caption {caption_ids[i]!r}: unknown image {img!r} (not in the regions file)")
    return out


_ITEM = re.compile(r"^(image|caption|example) '(?:[^'\\]|\\.)*': ")


def group_problems(problems: Sequence[str], shown: int = 3) -> List[str]:
    """Repeated problems grouped: of the problems that differ only in the item they name
    (and in numbers), the first ``shown``, then one line with the count of the rest."""
    groups: dict = {}
    for p in problems:
        m = _ITEM.match(p)
        key = (m.group(1), re.sub(r"\d+", "#", p[m.end():])) if m else (None, p)
        groups.setdefault(key, []).append(p)
    out: List[str] = []
    for (item, kind), ps in groups.items():
        out += ps[:shown]
        if len(ps) > shown:
            out.append(f"... and {len(ps) - shown} more {item or 'problem'}(s) with the same problem: "
                       f"{kind}")
    return out


def _require(f: h5py.File, path, names: Sequence[str], kind: str) -> List[str]:
    out = []
    if f.attrs.get("kind") != kind:
        out.append(f"attribute kind is {f.attrs.get('kind')!r}, expected {kind!r}")
    if "format_version" not in f.attrs:
        out.append("attribute format_version missing")
    elif int(f.attrs["format_version"]) > FORMAT_VERSION:
        out.append(f"format_version {int(f.attrs['format_version'])} is newer than this code's {FORMAT_VERSION}")
    for n in names:
        if n not in f:
            out.append(f"dataset {n!r} missing")
    return out


def _open(path) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise FormatError(path, [f"not a readable HDF5 file ({e})"]) from None


def check_regions_file(path, *, deep: bool = True, block_rows: int = 1 << 18) -> List[str]:
    """Every problem of a regions file (``[]`` if none). ``deep`` scans all rows."""
    with _open(path) as f:
        out = _require(f, path, ("image_ids", "offsets", "features", "boxes"), "regions")
        if out:
            return out
        try:
            ids = read_strings(f, "image_ids", path)
            offsets = read_array(f["offsets"], path).astype(np.int64)
        except FormatError as e:
            return e.problems
        R, D = f["features"].shape
        if int(f.attrs.get("feature_dim", D)) != D:
            out.append(f"features have width {D}, attribute feature_dim says {int(f.attrs['feature_dim'])}")
        if f["boxes"].shape != (R, BOX_COLUMNS):
            out.append(f"boxes shape {f['boxes'].shape}, expected ({R}, {BOX_COLUMNS})")
        has_conf = "conf" in f
        if has_conf and f["conf"].shape != (R,):
            out.append(f"conf shape {f['conf'].shape}, expected ({R},)")
        if len(offsets) != len(ids) + 1:
            out.append(f"offsets has {len(offsets)} entries, expected {len(ids) + 1} (images + 1)")
        elif offsets[0] != 0 or offsets[-1] != R or (np.diff(offsets) < 0).any():
            out.append(f"offsets do not add up: first {offsets[0]}, last {offsets[-1]} for {R} rows, "
                       f"non-decreasing={bool((np.diff(offsets) >= 0).all())}")
        seen = {}
        for i, s in enumerate(ids):
            if s in seen:
                out.append(f"image {s!r}: duplicate image id (entries {seen[s]} and {i})")
            else:
                seen[s] = i
        if out or not deep:
            return out
        counts = np.diff(offsets)
        for i in np.flatnonzero(counts == 0):
            out.append(f"image {ids[i]!r}: zero regions; expected at least one")
        # scan in blocks of whole images
        i = 0
        while i < len(ids):
            j = int(np.searchsorted(offsets, offsets[i] + block_rows, "right")) - 1
            j = max(j, i + 1)
            j = min(j, len(ids))
            r0, r1 = int(offsets[i]), int(offsets[j])
            try:
                feat = read_array(f["features"], path, slice(r0, r1))
                box = read_array(f["boxes"], path, slice(r0, r1))
                conf = read_array(f["conf"], path, slice(r0, r1)) if has_conf else None
            except FormatError as e:
                out += [f"images {ids[i]!r} to {ids[j - 1]!r}: {p}" for p in e.problems]
                i = j
                continue
            for k in range(i, j):
                a, b = int(offsets[k]) - r0, int(offsets[k + 1]) - r0
                if a == b:
                    continue
                out += region_problems(ids[k], feat[a:b], box[a:b], None if conf is None else conf[a:b], D,
                                       start_row=int(offsets[k]))
            i = j
        return group_problems(out)


def check_captions_file(path, *, regions_path=None) -> List[str]:
    """Every problem of a captions file; with ``regions_path``, also captions of unknown images."""
    with _open(path) as f:
        out = _require(f, path, ("caption_ids", "image_ids", "text", "split", "token_offsets", "token_ids",
                                 "vocab"), "captions")
        if out:
            return out
        try:
            cols = {k: read_strings(f, k, path) for k in ("caption_ids", "image_ids", "text", "split")}
            read_strings(f, "vocab", path)
            tokens = read_array(f["token_ids"], path).astype(np.int64)
            offsets = read_array(f["token_offsets"], path).astype(np.int64)
        except FormatError as e:
            return e.problems
        n = len(cols["caption_ids"])
        for k, v in cols.items():
            if len(v) != n:
                out.append(f"dataset {k!r} has {len(v)} entries, expected {n}")
        if len(offsets) != n + 1:
            out.append(f"token_offsets has {len(offsets)} entries, expected {n + 1}")
        if out:
            return out
        V = f["vocab"].shape[0]
        for a in ("cls_id", "sep_id", "pad_id", "unk_id"):
            if a not in f.attrs:
                out.append(f"attribute {a} missing")
            elif not 0 <= int(f.attrs[a]) < V:
                out.append(f"attribute {a}={int(f.attrs[a])} outside the vocabulary of {V}")
    known = None
    if regions_path is not None:
        known = RegionsFile(regions_path).image_ids
    out += caption_problems(cols["caption_ids"], cols["image_ids"], cols["text"], offsets, tokens, V, known)
    return group_problems(out)


def _read(path, name):
    with _open(path) as f:
        return f[name][:]


def file_kind(path) -> str:
    with _open(path) as f:
        return str(f.attrs.get("kind", ""))


# --------------------------------------------------------------------------- reading


class RegionsFile:
    """Lazy reader of a regions file: index data in memory, rows read on demand.

    The HDF5 handle is opened on first row access in each process (and reopened after a
    fork), and is not pickled. ``get(i)`` is one contiguous read per dataset.
    """

    def __init__(self, path, *, check: bool = True):
        self.path = Path(path)
        with _open(self.path) as f:
            problems = _require(f, self.path, ("image_ids", "offsets", "features", "boxes"), "regions")
            if problems:
                raise FormatError(self.path, problems)
            self.image_ids: List[str] = read_strings(f, "image_ids", self.path)
            self.offsets = read_array(f["offsets"], self.path).astype(np.int64)
            self.num_rows, self.feature_dim = f["features"].shape
            self.has_conf = "conf" in f
            self.attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        if check:
            problems = check_regions_file(self.path, deep=False)
            if problems:
                raise FormatError(self.path, problems)
        self._index = {s: i for i, s in enumerate(self.image_ids)}
        self._f = None
        self._ds = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_f"] = state["_ds"] = None
        state["_pid"] = None
        return state

    def _handle(self) -> h5py.File:
        if self._f is None or self._pid != os.getpid():
            self._f = h5py.File(self.path, "r")
            self._pid = os.getpid()
            # dataset objects are cached: looking one up by name costs more than a small read
            self._ds = (self._f["features"], self._f["boxes"], self._f["conf"] if self.has_conf else None)
        return self._f

    def datasets(self):
        """``(features, boxes, conf or None)`` h5py datasets, opened in this process."""
        self._handle()
        return self._ds

    def close(self) -> None:
        if self._f is not None and self._pid == os.getpid():
            self._f.close()
        self._f = None
        self._ds = None

    def index(self, image_id: str) -> int:
        try:
            return self._index[image_id]
        except KeyError:
            raise KeyError(f"{self.path}: unknown image {image_id!r}") from None

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get(self, i: int):
        """``(features (m, D) fp16, boxes (m, 6) fp32, conf (m,) fp32 or None)`` of image ``i``."""
        feat, box, conf = self.datasets()
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return feat[a:b], box[a:b], (conf[a:b] if conf is not None else None)

    def read_all(self):
        """``(features (R, D), boxes (R, 6), conf (R,) or None)`` of every row."""
        f = self._handle()
        return f["features"][:], f["boxes"][:], (f["conf"][:] if self.has_conf else None)


@dataclass
class CaptionsTable:
    """A captions file in memory (Flickr30k's 155k captions are a few MB)."""

    path: str
    caption_ids: List[str]
    image_ids: List[str]
    texts: List[str]
    splits: List[str]
    token_offsets: np.ndarray  # (N+1,)
    token_ids: np.ndarray  # (T,) int32
    vocab: List[str]
    attrs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.caption_ids)

    def tokens(self, i: int) -> np.ndarray:
        return self.token_ids[self.token_offsets[i]:self.token_offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.token_offsets)

    @property
    def cls_id(self) -> int:
        return int(self.attrs["cls_id"])

    @property
    def sep_id(self) -> int:
        return int(self.attrs["sep_id"])


def read_captions(path, *, check: bool = True, regions_path=None) -> CaptionsTable:
    path = Path(path)
    if check:
        problems = check_captions_file(path, regions_path=regions_path)
        if problems:
            raise FormatError(path, problems)
    with _open(path) as f:
        if not check:
            problems = _require(f, path, ("caption_ids", "image_ids", "text", "split", "token_offsets",
                                          "token_ids", "vocab"), "captions")
            if problems:
                raise FormatError(path, problems)
        dec = lambda k: read_strings(f, k, path)  # noqa: E731
        return CaptionsTable(
            path=str(path), caption_ids=dec("caption_ids"), image_ids=dec("image_ids"), texts=dec("text"),
            splits=dec("split"), token_offsets=read_array(f["token_offsets"], path).astype(np.int64),
            token_ids=read_array(f["token_ids"], path).astype(np.int32), vocab=dec("vocab"),
            attrs={k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()},
        )
