"""PNG figures of a pair's last-layer attention (paper Figures 2, 4 and 5), and wandb images.

All figures are drawn with matplotlib's Agg canvas (no display, no pyplot state) on a
:class:`cacr.analysis.attention.PairAttention` with 2-d blocks, and written to a temporary
name renamed into place.

- :func:`words_regions_heatmap`: ``S_LV`` (words -> regions) and ``S_VL^T`` (regions ->
  words, shown as words x regions) as heatmaps, each row's argmax outlined.
- :func:`attended_boxes_figure` (Figure 4 top with ``direction="LV"``, Figure 5 with
  ``"VL"``): one panel per word, the image with the word's most attended box in green and
  the other highly attended boxes (attention at least ``rel_threshold`` times the
  maximum, at most ``max_others``) in red. The word's weights are its row of the matrix
  the heatmap shows (``S_LV[w]``, or ``S_VL[:, w]``: how much each region attends to it).
- :func:`argmax_labels_figure` (Figure 4 bottom): each box that is some word's argmax,
  labelled with those words.
- :func:`congruence_figure` (Figure 2): ``S_LL`` beside CACR's ``S_LV S_VV S_LV^T``, and
  ``S_VV`` beside ``S_VL S_LL S_VL^T``, with the pair's ``L_CACR-L`` and ``L_CACR-V``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

GREEN = "#00c000"
RED = "#e00000"
DIRECTIONS = ("LV", "VL")


@dataclass
class DrawnBoxes:
    """Boxes drawn for one word: its most attended region and the other highly attended ones."""

    argmax: int
    others: List[int] = field(default_factory=list)


def word_region_matrix(att, direction: str) -> np.ndarray:
    """``(n, m)``: ``S_LV`` (``"LV"``) or ``S_VL^T`` (``"VL"``), row ``w`` = word ``w``'s weights over regions."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if att.S_LV.ndim != 2:
        raise ValueError(f"pictures need 2-d blocks (heads averaged, or one head): S_LV has shape {att.S_LV.shape}")
    return att.S_LV if direction == "LV" else att.S_VL.T


def highly_attended(weights: np.ndarray, rel_threshold: float = 0.5, max_others: int = 3) -> DrawnBoxes:
    """The argmax of ``weights`` (first on ties) and up to ``max_others`` other indices, by
    decreasing weight, whose weight is at least ``rel_threshold`` times the maximum."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.isfinite(w).all():
        raise ValueError(f"weights must be a non-empty finite vector, got shape {w.shape}")
    if not 0 <= rel_threshold <= 1:
        raise ValueError(f"rel_threshold must be in [0, 1], got {rel_threshold}")
    best = int(np.argmax(w))
    order = [int(k) for k in np.argsort(-w, kind="stable") if k != best and w[k] >= rel_threshold * w[best]]
    return DrawnBoxes(best, order[:max(0, max_others)])


def _show_image(ax, image: Optional[np.ndarray]) -> None:
    """The image in normalised coordinates (x right, y down, both in [0, 1])."""
    if image is None:
        image = np.full((2, 2, 3), 255, dtype=np.uint8)
    ax.imshow(image, extent=(0, 1, 1, 0), interpolation="bilinear")
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)
    ax.set_aspect(image.shape[0] / image.shape[1])
    ax.set_xticks([])
    ax.set_yticks([])


def _box(ax, box, colour: str, gid: str, label: Optional[str] = None, width: float = 2.5):
    from matplotlib.patches import Rectangle

    x1, y1, x2, y2 = (float(v) for v in box[:4])
    rect = Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=width, gid=gid)
    ax.add_patch(rect)
    if label:
        ax.text(x1 + 0.005, y1 + 0.005, label, color="white", fontsize=7, va="top", ha="left",
                bbox=dict(facecolor=colour, edgecolor="none", pad=1.0, alpha=0.85))
    return rect


def draw_boxes(ax, image: Optional[np.ndarray], boxes: np.ndarray, weights: np.ndarray, *,
               rel_threshold: float = 0.5, max_others: int = 3) -> DrawnBoxes:
    """Draw ``image`` and, from ``weights`` over the ``(m, 4)`` boxes, the argmax box in green
    (gid ``argmax-region-k``) and the other highly attended ones in red (``other-region-k``)."""
    boxes = np.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[1] < 4 or boxes.shape[0] != len(weights):
        raise ValueError(f"boxes must be (m, 4) with m = {len(weights)} weights, got shape {boxes.shape}")
    drawn = highly_attended(weights, rel_threshold, max_others)
    _show_image(ax, image)
    for k in reversed(drawn.others):
        _box(ax, boxes[k], RED, f"other-region-{k}", f"{k}: {weights[k]:.2f}", width=1.8)
    k = drawn.argmax
    _box(ax, boxes[k], GREEN, f"argmax-region-{k}", f"{k}: {weights[k]:.2f}")
    return drawn


def save_figure(fig, path, dpi: int = 100) -> Path:
    from cacr.outputs import atomic_write

    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _labels(m: int, region_labels: Optional[Sequence[str]]) -> List[str]:
    if region_labels is None:
        return [f"r{k}" for k in range(m)]
    if len(region_labels) != m:
        raise ValueError(f"region_labels: {len(region_labels)} labels for {m} regions")
    return list(region_labels)


def _heatmap(fig, ax, M: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str, mark_argmax: bool,
             vmin: Optional[float] = 0.0):
    from matplotlib.patches import Rectangle

    im = ax.imshow(M, cmap="viridis", aspect="auto", interpolation="nearest", vmin=vmin)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=60, ha="right")
    ax.set_title(title, fontsize=9)
    if mark_argmax:
        for r, c in enumerate(M.argmax(1)):
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor=GREEN, linewidth=1.8))
    fig.colorbar(im, ax=ax)


def words_regions_heatmap(att, path, *, region_labels: Optional[Sequence[str]] = None, title: str = "") -> Path:
    """``S_LV`` and ``S_VL^T`` side by side (rows: words, columns: regions), argmax per row in green."""
    cols = _labels(att.m, region_labels)
    w = max(4.0, 0.35 * att.m + 2.5)
    fig = new_figure(2 * w, max(3.0, 0.3 * att.n + 2.0))
    axes = fig.subplots(1, 2)
    _heatmap(fig, axes[0], word_region_matrix(att, "LV"), att.words, cols, "S_LV: words -> regions", True)
    _heatmap(fig, axes[1], word_region_matrix(att, "VL"), att.words, cols,
             "S_VL^T: regions -> words (column of each word)", True)
    fig.suptitle(f"{title}\n{att.normalisation} softmax, {att.head_reduction} over heads", fontsize=9)
    return save_figure(fig, path)


def attended_boxes_figure(att, image: Optional[np.ndarray], path, *, direction: str = "LV",
                          rel_threshold: float = 0.5, max_others: int = 3,
                          region_labels: Optional[Sequence[str]] = None, title: str = "") -> List[DrawnBoxes]:
    """One panel per word: its most attended box green, other highly attended boxes red.
    Returns the boxes drawn, in word order (row ``w`` of :func:`word_region_matrix`)."""
    M = word_region_matrix(att, direction)
    _labels(att.m, region_labels)
    cols = min(4, att.n)
    rows = (att.n + cols - 1) // cols
    fig = new_figure(3.0 * cols, 3.1 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    drawn = []
    for w in range(att.n):
        d = draw_boxes(axes[w], image, att.boxes, M[w], rel_threshold=rel_threshold, max_others=max_others)
        name = region_labels[d.argmax] if region_labels is not None else f"r{d.argmax}"
        axes[w].set_title(f"{att.words[w]!r} -> {name}", fontsize=8)
        drawn.append(d)
    for ax in axes[att.n:]:
        ax.set_axis_off()
    what = "S_LV: boxes each word attends to" if direction == "LV" else "S_VL: boxes attending to each word"
    fig.suptitle(f"{title}\n{what} (green: maximum; red: >= {rel_threshold:g} x maximum)", fontsize=9)
    save_figure(fig, path)
    return drawn


def argmax_labels_figure(att, image: Optional[np.ndarray], path, *, direction: str = "LV",
                         title: str = "") -> Dict[int, List[str]]:
    """The image with every box that is some word's argmax, labelled with those words."""
    M = word_region_matrix(att, direction)
    by_box: Dict[int, List[str]] = {}
    for w, k in enumerate(M.argmax(1)):
        by_box.setdefault(int(k), []).append(att.words[w])
    fig = new_figure(5.0, 5.4)
    ax = fig.add_subplot(1, 1, 1)
    _show_image(ax, image)
    for k, words in sorted(by_box.items()):
        _box(ax, att.boxes[k], GREEN, f"argmax-region-{k}", f"{k}: " + ", ".join(words))
    ax.set_title(f"{title}\nboxes labelled with the words whose {direction} argmax they are", fontsize=8)
    save_figure(fig, path)
    return by_box


def congruence_figure(att, path, *, region_labels: Optional[Sequence[str]] = None, title: str = "") -> Path:
    """Figure 2: ``S_LL`` | ``S_LV S_VV S_LV^T`` (top), ``S_VV`` | ``S_VL S_LL S_VL^T`` (bottom)."""
    word_region_matrix(att, "LV")  # 2-d check
    regions = _labels(att.m, region_labels)
    L_L, L_V = att.cacr_parts()
    side = max(3.5, 0.3 * max(att.n, att.m) + 2.0)
    fig = new_figure(2 * side, 2 * side)
    axes = fig.subplots(2, 2)
    # each panel on its own colour scale: the projections are sums over many entries and flatter
    _heatmap(fig, axes[0, 0], att.S_LL, att.words, att.words, "S_LL (language)", False, None)
    _heatmap(fig, axes[0, 1], att.projected_L, att.words, att.words, "S_LV S_VV S_LV^T (vision, language basis)",
             False, None)
    _heatmap(fig, axes[1, 0], att.S_VV, regions, regions, "S_VV (vision)", False, None)
    _heatmap(fig, axes[1, 1], att.projected_V, regions, regions, "S_VL S_LL S_VL^T (language, vision basis)",
             False, None)
    fig.suptitle(f"{title}\nL_CACR-L = {L_L:.4f}   L_CACR-V = {L_V:.4f}   (m-KL of the row softmaxes)", fontsize=9)
    return save_figure(fig, path)


def log_to_wandb(images: Mapping[str, Path], *, start_offline_run: Optional[str] = None,
                 run_dir: Optional[Path] = None) -> int:
    """Log ``{key: png path}`` as wandb images to the active run; with ``start_offline_run``
    (a project name) and no active run, to a new offline run in ``run_dir``. Returns how
    many images were logged (0 without wandb or a run)."""
    try:
        import wandb
    except ImportError:
        return 0
    run, started = wandb.run, False
    if run is None and start_offline_run:
        run = wandb.init(project=start_offline_run, mode="offline", dir=str(run_dir or "."), job_type="analysis")
        started = True
    if run is None or not images:
        return 0
    try:
        run.log({k: wandb.Image(str(p)) for k, p in images.items()})
    finally:
        if started:
            run.finish()
    return len(images)
