"""Pictures of synthetic-world scenes: every region drawn at its box from ``scenes.jsonl``.

The synthetic world (``synthetic.py``) stores, per image and in the regions file's row
order, each region's ``kind`` (object | distractor), ``category``, ``colour`` and ``box``
``[x1, y1, x2, y2]`` normalised to the image (y down). Objects are drawn as a filled shape
of their colour (one shape per category) with the category written on it; distractors
(unnamed background regions) as translucent hatched rectangles of their colour, beneath
the objects. The picture is an RGB array whose pixel ``(x * W, y * H)`` is the normalised
point ``(x, y)``, so boxes drawn over it by the analysis tools line up with the regions.

    python -m cacr.data.render --scenes data/synthetic/<world>/winoground/scenes.jsonl --image-id ex_0_img_0 --out ex0.png
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import List, Mapping, Sequence

import numpy as np

from .synthetic import CATEGORIES, COLOURS, load_scenes

SHAPES = ("circle", "square", "triangle", "diamond", "pentagon", "hexagon")
SHAPE_OF = {c: SHAPES[k % len(SHAPES)] for k, c in enumerate(CATEGORIES)}
CANVAS = "#dcdcdc"  # light grey, so that white and yellow objects stay visible


def check_scene(regions: Sequence[Mapping], where: str) -> None:
    """Every region has a known kind and colour and a box ``x1 <= x2``, ``y1 <= y2``."""
    if not regions:
        raise ValueError(f"{where}: a scene without regions")
    for k, g in enumerate(regions):
        miss = [f for f in ("kind", "category", "colour", "box") if f not in g]
        if miss:
            raise ValueError(f"{where}: region {k} lacks {miss} (expected kind, category, colour, box)")
        if g["kind"] not in ("object", "distractor"):
            raise ValueError(f"{where}: region {k} has kind {g['kind']!r}, expected 'object' or 'distractor'")
        if g["colour"] not in COLOURS:
            raise ValueError(f"{where}: region {k} has colour {g['colour']!r}, expected one of {list(COLOURS)}")
        box = g["box"]
        if len(box) != 4 or not all(math.isfinite(float(v)) for v in box) or box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"{where}: region {k} has box {box}, expected finite [x1, y1, x2, y2] "
                             f"with x1 <= x2, y1 <= y2")


def _shape(kind: str, box, colour: str):
    from matplotlib import patches

    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    style = dict(facecolor=colour, edgecolor="black", linewidth=1.0)
    if kind == "circle":
        return patches.Ellipse((cx, cy), w, h, **style)
    if kind == "square":
        return patches.Rectangle((x1, y1), w, h, **style)
    sides = {"triangle": 3, "diamond": 4, "pentagon": 5, "hexagon": 6}[kind]
    angles = -math.pi / 2 + 2 * math.pi * np.arange(sides) / sides  # first vertex at the top (y down)
    pts = np.stack([cx + w / 2 * np.cos(angles), cy + h / 2 * np.sin(angles)], 1)
    return patches.Polygon(pts, closed=True, **style)


def render_scene(regions: Sequence[Mapping], size: int = 384, where: str = "scene") -> np.ndarray:
    """``(size, size, 3)`` uint8 picture of one scene (regions as ``load_scenes`` gives them)."""
    from matplotlib import patches
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check_scene(regions, where)
    dpi = 100
    fig = Figure(figsize=(size / dpi, size / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)
    ax.set_axis_off()
    ax.add_patch(patches.Rectangle((0, 0), 1, 1, facecolor=CANVAS, edgecolor="none"))
    order = sorted(range(len(regions)), key=lambda k: regions[k]["kind"] == "object")  # distractors first
    for k in order:
        g = regions[k]
        x1, y1, x2, y2 = (float(v) for v in g["box"])
        if g["kind"] == "distractor":
            ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, facecolor=g["colour"], alpha=0.25,
                                           edgecolor=g["colour"], hatch="//", linewidth=0.8))
            ax.text(x1 + 0.01, y2 - 0.01, g["category"], fontsize=6, color="dimgray", style="italic", va="bottom")
        else:
            ax.add_patch(_shape(SHAPE_OF.get(g["category"], "circle"), g["box"], g["colour"]))
            dark = g["colour"] in ("black", "blue", "purple", "red", "green")
            ax.text((x1 + x2) / 2, (y1 + y2) / 2, g["category"], fontsize=7, ha="center", va="center",
                    color="white" if dark else "black", weight="bold")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def scene_regions(scenes_path, image_id: str) -> List[dict]:
    """The regions of ``image_id`` in ``scenes_path`` (a ``scenes.jsonl`` of the synthetic world)."""
    path = Path(scenes_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: scenes file not found")
    scenes = load_scenes(path)
    if image_id not in scenes:
        raise KeyError(f"{path}: no scene {image_id!r} ({len(scenes)} scenes)")
    return scenes[image_id]


def save_png(image: np.ndarray, path) -> Path:
    """Write an RGB array as a PNG (temporary name, then renamed: :func:`cacr.outputs.atomic_write`)."""
    from matplotlib import image as mimage

    from cacr.outputs import atomic_write

    return atomic_write(path, lambda f: mimage.imsave(f, image, format="png"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m cacr.data.render", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", required=True, help="scenes.jsonl of a synthetic world")
    p.add_argument("--image-id", required=True, nargs="+", help="image id(s), e.g. ex_0_img_0 syn_test_00003")
    p.add_argument("--out", required=True, help="output folder (one <image_id>.png each; characters other than "
                   "letters, digits, _ - . percent-encoded, so no id leaves the folder)")
    p.add_argument("--size", type=int, default=384, help="picture side in pixels")
    a = p.parse_args(argv)
    from cacr.errors import one_line
    from cacr.outputs import file_stem

    try:
        for image_id in a.image_id:
            regions = scene_regions(a.scenes, image_id)
            picture = render_scene(regions, a.size, where=f"{a.scenes} {image_id}")
            print(save_png(picture, Path(a.out) / f"{file_stem(image_id, '--image-id')}.png"))
    except (ValueError, KeyError, OSError) as e:  # OSError: a write error names its path
        sys.exit(f"cacr.data.render: {one_line(e)}")


if __name__ == "__main__":
    main()
