"""Per-item crop regions for ARO's VG-Relation and VG-Attribution (a regions file keyed by item).

ARO scores each VG item on its image cropped to the item's box (``bbox_x``, ``bbox_y``,
``bbox_w``, ``bbox_h``, pixels), and items share images with different boxes, so the
regions of an item are stored under the item's key, ``<file stem>/<index>`` (the key
``eval_multiple_choice.py`` gives it; read with ``region_key=item``). Two ways in:

- ``--regions FULL.h5 --image-sizes SIZES.json``: cut the crops from full-image regions.
  A region is kept when at least ``--min-inside`` (default 0.5) of its area lies in the box;
  its box is clipped to the crop and re-normalised by the crop's size; features and
  confidences are kept as they are. ``SIZES.json`` gives each image's pixel size: Visual
  Genome's ``image_data.json`` (a list of ``{"image_id", "width", "height", ...}``) or an
  object ``{image id: [width, height]}``. The features saw the whole image in the
  detector, so this approximates scoring the cropped picture;
- ``--npz-dir DIR``: features extracted from each item's cropped picture, one
  ``DIR/<index>.npz`` per item (the item's place in the file, from 0; UNITER's ``features``
  / ``norm_bb`` keys or the bottom-up extractor's ``x`` / ``bbox`` / ``image_w`` /
  ``image_h``, boxes relative to the crop): ARO's input exactly.

    python -m cacr.data.crops data/aro/visual_genome_relation.json data/aro/vgr_crops.h5 \\
        --regions data/vg_regions.h5 --image-sizes data/vg/image_data.json
    python eval_multiple_choice.py ... +sets.vg_relation=data/aro/visual_genome_relation.json \\
        +regions.vg_relation=data/aro/vgr_crops.h5 +region_key.vg_relation=item

Errors are one line naming the file, the item and what was expected; an existing output is
refused unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

MIN_INSIDE = 0.5


def read_image_sizes(path) -> Dict[str, Tuple[float, float]]:
    """``{image id: (width, height)}`` from VG's ``image_data.json`` or ``{id: [w, h]}``."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image sizes file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    out: Dict[str, Tuple[float, float]] = {}
    if isinstance(obj, list):
        for n, e in enumerate(obj):
            if not isinstance(e, dict) or "image_id" not in e:
                raise ValueError(f"{path}: item {n}: expected an object with 'image_id', 'width', 'height' "
                                 f"(Visual Genome's image_data.json), got {e!r:.80}")
            out[str(e["image_id"])] = _size(path, f"item {n}", e.get("width"), e.get("height"))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(v, (list, tuple)) or len(v) != 2:
                raise ValueError(f"{path}: image {k!r}: expected [width, height], got {v!r}")
            out[str(k)] = _size(path, f"image {k!r}", *v)
    else:
        raise ValueError(f"{path}: expected a list (image_data.json) or an object {{id: [w, h]}}")
    return out


def _size(path: Path, where: str, w, h) -> Tuple[float, float]:
    ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in (w, h))
    if not ok:
        raise ValueError(f"{path}: {where}: 'width' and 'height' must be positive numbers, got {w!r}, {h!r}")
    return float(w), float(h)


def crop_regions(boxes: np.ndarray, crop: Tuple[float, float, float, float], size: Tuple[float, float],
                 min_inside: float = MIN_INSIDE) -> Tuple[np.ndarray, np.ndarray]:
    """``(kept rows, (k, 6) boxes normalised by the crop)``: the regions (``boxes`` ``(m, 6)``
    ``x1 y1 x2 y2 w h`` normalised by the image ``size``) with at least ``min_inside`` of
    their area in ``crop`` (``x, y, w, h`` pixels), clipped to it."""
    W, H = size
    x, y, w, h = crop
    c = np.array([max(0.0, x / W), max(0.0, y / H), min(1.0, (x + w) / W), min(1.0, (y + h) / H)])
    b = np.asarray(boxes, dtype=np.float64)[:, :4]
    ix1, iy1 = np.maximum(b[:, 0], c[0]), np.maximum(b[:, 1], c[1])
    ix2, iy2 = np.minimum(b[:, 2], c[2]), np.minimum(b[:, 3], c[3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    keep = np.flatnonzero(inter >= min_inside * np.maximum(area, 1e-12))
    cw, ch = c[2] - c[0], c[3] - c[1]
    nb = np.stack([(ix1[keep] - c[0]) / cw, (iy1[keep] - c[1]) / ch,
                   (ix2[keep] - c[0]) / cw, (iy2[keep] - c[1]) / ch], 1).clip(0, 1)
    nb = np.concatenate([nb, nb[:, 2:3] - nb[:, 0:1], nb[:, 3:4] - nb[:, 1:2]], 1)
    return keep, nb.astype(np.float32)


def _items(items_file, image_key: str):
    from cacr.evaluation.multiple_choice import read_file

    fmt, items = read_file(items_file, "auto", image_key)
    if fmt not in ("aro_relation", "aro_attribution"):
        raise ValueError(f"{items_file}: a {fmt} file; crops are for ARO's VG-Relation / VG-Attribution items")
    return items


def crops_from_regions(items_file, regions, sizes, image_key: str = "stem",
                       min_inside: float = MIN_INSIDE) -> Iterator[Tuple[str, np.ndarray, np.ndarray, Optional[np.ndarray]]]:
    """``(item key, features, crop boxes, conf)`` of every item of an ARO VG file."""
    from .formats import RegionsFile

    items_file = Path(items_file)
    rf = RegionsFile(regions)
    known = set(rf.image_ids)
    for n, it in enumerate(_items(items_file, image_key)):
        where = f"{items_file}: item {n} (image {it.image!r})"
        if it.image not in known:
            raise ValueError(f"{where}: not in {regions}")
        if it.image not in sizes:
            raise ValueError(f"{where}: no width and height in the image sizes file")
        feat, box, conf = rf.get(rf.index(it.image))
        keep, nb = crop_regions(np.asarray(box), it.box, sizes[it.image], min_inside)
        if keep.size == 0:
            raise ValueError(f"{where}: no region lies at least {min_inside:g} inside the box {list(it.box)}; "
                             f"lower --min-inside or give features of the crop (--npz-dir)")
        yield it.key, np.asarray(feat)[keep], nb, (np.asarray(conf)[keep] if conf is not None else None)


def crops_from_npz(items_file, folder, image_key: str = "stem"):
    """``(item key, features, boxes, conf)`` from ``folder/<index>.npz``, one per item."""
    from .convert import read_npz

    items_file, folder = Path(items_file), Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder of per-item .npz files not found")
    for n, it in enumerate(_items(items_file, image_key)):
        p = folder / f"{n}.npz"
        if not p.is_file():
            raise FileNotFoundError(f"{items_file}: item {n} (image {it.image!r}): {p} not found "
                                    f"(one <index>.npz per item, features of its crop)")
        yield (it.key, *read_npz(p))


def write_crops(items_file, out, *, regions=None, image_sizes=None, npz_dir=None, image_key: str = "stem",
                min_inside: float = MIN_INSIDE, progress: bool = True) -> Path:
    from .convert import _regions_from

    if (regions is None) == (npz_dir is None):
        raise ValueError("give --regions FULL.h5 (with --image-sizes) or --npz-dir DIR, one of them")
    if regions is not None:
        if image_sizes is None:
            raise ValueError("--regions needs --image-sizes (the pixel size of every image, e.g. VG's image_data.json)")
        rows = crops_from_regions(items_file, regions, read_image_sizes(image_sizes), image_key, min_inside)
        source = f"crops of {Path(regions).name} to the boxes of {Path(items_file).name} (min_inside {min_inside:g})"
    else:
        rows = crops_from_npz(items_file, npz_dir, image_key)
        source = f"per-item crop features from {Path(npz_dir).name} for {Path(items_file).name}"
    return _regions_from(rows, out, source, progress=progress)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cacr.data.crops", description=__doc__.split("\n\n")[0])
    ap.add_argument("items", help="ARO visual_genome_relation.json or visual_genome_attribution.json")
    ap.add_argument("out", help="regions file keyed by item (<file stem>/<index>)")
    ap.add_argument("--regions", help="full-image regions file of the items' images")
    ap.add_argument("--image-sizes", help="VG image_data.json, or {image id: [width, height]}")
    ap.add_argument("--npz-dir", help="folder of <index>.npz, features of each item's crop")
    ap.add_argument("--image-key", default="stem", help="image id in --regions: stem | name | path | a template")
    ap.add_argument("--min-inside", type=float, default=MIN_INSIDE, help="share of a region's area in the box")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(argv)
    from cacr.errors import debug, one_line
    from cacr.outputs import check_output

    try:
        if not 0 < args.min_inside <= 1:
            raise ValueError(f"--min-inside must be in (0, 1], got {args.min_inside}")
        check_output(args.out, overwrite=args.overwrite, inputs=[args.items, args.regions, args.image_sizes,
                                                                 args.npz_dir], what="out")
        out = write_crops(args.items, args.out, regions=args.regions, image_sizes=args.image_sizes,
                          npz_dir=args.npz_dir, image_key=args.image_key, min_inside=args.min_inside)
    except KeyboardInterrupt:
        print("error: interrupted; no output written", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for any bad input
        if args.debug or debug():
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
