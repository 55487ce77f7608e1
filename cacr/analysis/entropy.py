"""Section 5.2 of the paper: entropy of the cross-modal argmax indices against Winoground.

For a pair, the words' argmax indices are ``argmax_r S_LV[w, r]`` (one region index per
word) and the regions' are ``argmax_w S_VL[r, w]`` (one word index per region). Their
Shannon entropy (base 2, of the empirical distribution of the indices) is high when every
word picks a different region (a one-to-one alignment) and low when many pick the same.
An example's entropy is the mean over its matched pairs ``(caption_0, image_0)`` and
``(caption_1, image_1)`` (or over its four pairs, ``pairs="all"``).

The paper correlates this entropy with a "soft Winoground score" it does not define. Here
it is correlated with each example's correctness (text, image, group: 0/1, Pearson = the
point-biserial correlation) and with continuous margins: ``text_margin = min(s(c0,i0) -
s(c1,i0), s(c1,i1) - s(c0,i1))`` (positive iff text correct), ``image_margin`` likewise,
``group_margin`` their minimum. Pearson and Spearman coefficients with two-sided p-values
(scipy); undefined (``None``) where either variable is constant.

    python -m cacr.analysis.entropy --ckpt outputs/<date>/<time>/checkpoints/best-stepN.ckpt --out analysis/entropy
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .attention import relation_attention

DIRECTIONS = ("LV", "VL")
OUTCOMES = ("text", "image", "group", "text_margin", "image_margin", "group_margin")


def argmax_entropy(indices: Sequence[int], base: float = 2.0) -> float:
    """Shannon entropy ``-sum_k p_k log p_k`` of the empirical distribution of ``indices``."""
    idx = np.asarray(indices).ravel()
    if idx.size == 0:
        raise ValueError("argmax_entropy: no indices")
    _, counts = np.unique(idx, return_counts=True)
    p = counts / idx.size
    return float(-(p * np.log(p)).sum() / math.log(base))


def pair_entropies(att) -> Dict[str, float]:
    """``{"LV": entropy of the words' region argmaxes, "VL": of the regions' word argmaxes}``."""
    if att.S_LV.ndim != 2:
        raise ValueError("pair_entropies needs 2-d blocks (heads averaged)")
    return {"LV": argmax_entropy(att.S_LV.argmax(1)), "VL": argmax_entropy(att.S_VL.argmax(1))}


@dataclass
class ExampleEntropy:
    id: str
    tag: str  # collapsed_tag
    entropy_LV: float
    entropy_VL: float
    text: bool
    image: bool
    group: bool
    text_margin: float
    image_margin: float
    group_margin: float
    scores: List[List[float]]  # [caption][image]


def example_records(ids: Sequence[str], tags: Sequence[str], scores: torch.Tensor,
                    entropies: Sequence[Dict[str, float]]) -> List[ExampleEntropy]:
    """Records from ``scores`` ``(N, 2, 2)`` and each example's mean entropies."""
    from cacr.evaluation.winoground_metrics import winoground_correct

    correct = winoground_correct(scores)
    s = scores.double()
    text_m = torch.minimum(s[:, 0, 0] - s[:, 1, 0], s[:, 1, 1] - s[:, 0, 1])
    image_m = torch.minimum(s[:, 0, 0] - s[:, 0, 1], s[:, 1, 1] - s[:, 1, 0])
    return [ExampleEntropy(str(ids[e]), str(tags[e]), entropies[e]["LV"], entropies[e]["VL"],
                           bool(correct["text"][e]), bool(correct["image"][e]), bool(correct["group"][e]),
                           float(text_m[e]), float(image_m[e]), float(min(text_m[e], image_m[e])),
                           s[e].tolist())
            for e in range(len(ids))]


@torch.no_grad()
def winoground_entropies(model: nn.Module, wino, *, pairs: str = "matched", normalisation: str = "block",
                         score_head: str = "rank", batch_size: int = 64, device=None,
                         max_examples: Optional[int] = None) -> List[ExampleEntropy]:
    """One record per example of a ``cacr.data.WinogroundSet`` (the first ``max_examples``)."""
    if pairs not in ("matched", "all"):
        raise ValueError(f"pairs must be 'matched' or 'all', got {pairs!r}")
    N = len(wino) if max_examples is None else min(len(wino), int(max_examples))
    if N < 1:
        raise ValueError("no Winoground examples to analyse")
    combos = [(c, i) for c in (0, 1) for i in (0, 1)]
    atts = relation_attention(model, [wino.pair(e, c, i) for e in range(N) for c, i in combos],
                              normalisation=normalisation, score_head=score_head, batch_size=batch_size,
                              device=device)
    scores = torch.tensor([a.score for a in atts], dtype=torch.float64).view(N, 2, 2)  # (N, caption, image)
    used = [(0, 0), (1, 1)] if pairs == "matched" else combos
    entropies = []
    for e in range(N):
        per_pair = [pair_entropies(atts[4 * e + combos.index(ci)]) for ci in used]
        entropies.append({d: float(np.mean([h[d] for h in per_pair])) for d in DIRECTIONS})
    ex = wino.examples[:N]
    return example_records([x.key for x in ex], [x.collapsed_tag for x in ex], scores, entropies)


def _corr(fn, x: np.ndarray, y: np.ndarray):
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None, None
    r, p = fn(x, y)
    return float(r), float(p)


def correlations(records: Sequence[ExampleEntropy]) -> List[Dict[str, object]]:
    """One row per (direction, outcome): n, mean entropy of correct / wrong examples (0/1
    outcomes), Pearson r and p, Spearman rho and p."""
    from scipy.stats import pearsonr, spearmanr

    rows = []
    for d in DIRECTIONS:
        x = np.array([getattr(r, f"entropy_{d}") for r in records], dtype=np.float64)
        for o in OUTCOMES:
            y = np.array([float(getattr(r, o)) for r in records], dtype=np.float64)
            row: Dict[str, object] = {"direction": d, "outcome": o, "n": len(records)}
            if o in ("text", "image", "group"):
                k = y.astype(bool)
                row["n_correct"] = int(k.sum())
                row["entropy_correct"] = float(x[k].mean()) if k.any() else None
                row["entropy_wrong"] = float(x[~k].mean()) if (~k).any() else None
            row["pearson_r"], row["pearson_p"] = _corr(pearsonr, x, y)
            row["spearman_rho"], row["spearman_p"] = _corr(spearmanr, x, y)
            rows.append(row)
    return rows


def _f(v, digits=3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _p(v) -> str:
    return "n/a" if v is None else (f"{v:.2g}" if v < 0.001 else f"{v:.3f}")


def entropy_markdown(rows: Sequence[Dict[str, object]], records: Sequence[ExampleEntropy], title: str = "") -> str:
    H = {d: np.array([getattr(r, f"entropy_{d}") for r in records]) for d in DIRECTIONS}
    out = [f"### {title}\n" if title else "",
           f"{len(records)} examples; argmax entropy (bits) mean +- sd: "
           f"S_LV {H['LV'].mean():.3f} +- {H['LV'].std():.3f}, S_VL {H['VL'].mean():.3f} +- {H['VL'].std():.3f}.\n",
           "| argmax of | outcome | correct / n | H if correct | H if wrong | Pearson r | p | Spearman rho | p |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        frac = f"{r['n_correct']} / {r['n']}" if "n_correct" in r else f"({r['n']})"
        out.append(f"| S_{r['direction']} | {r['outcome']} | {frac} | {_f(r.get('entropy_correct'))} | "
                   f"{_f(r.get('entropy_wrong'))} | {_f(r['pearson_r'])} | {_p(r['pearson_p'])} | "
                   f"{_f(r['spearman_rho'])} | {_p(r['spearman_p'])} |")
    return "\n".join(x for x in out if x) + "\n"


def entropy_scatter(records: Sequence[ExampleEntropy], rows: Sequence[Dict[str, object]], path,
                    title: str = "") -> Path:
    """Entropy (x) against correctness (0/1, jittered) and the group margin, per direction."""
    from .pictures import new_figure, save_figure

    outcomes = ("text", "image", "group", "group_margin")
    fig = new_figure(3.2 * len(outcomes), 6.2)
    axes = fig.subplots(2, len(outcomes))
    rng = np.random.default_rng(0)
    tags = sorted({r.tag for r in records})
    colours = dict(zip(tags, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))
    stats = {(r["direction"], r["outcome"]): r for r in rows}
    for a, d in enumerate(DIRECTIONS):
        x = np.array([getattr(r, f"entropy_{d}") for r in records])
        for b, o in enumerate(outcomes):
            ax = axes[a, b]
            y = np.array([float(getattr(r, o)) for r in records])
            if o != "group_margin":
                y = y + rng.uniform(-0.08, 0.08, y.size)
                ax.set_yticks([0, 1], ["wrong", "correct"])
            for t in tags:
                k = np.array([r.tag == t for r in records])
                ax.scatter(x[k], y[k], s=8, alpha=0.6, color=colours.get(t, "gray"), label=t or "untagged")
            s = stats[(d, o)]
            ax.set_title(f"S_{d} argmax vs {o}\nr={_f(s['pearson_r'], 2)} (p={_p(s['pearson_p'])})", fontsize=8)
            ax.set_xlabel("argmax entropy (bits)", fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle(title or "Section 5.2: cross-modal argmax entropy against Winoground", fontsize=9)
    return save_figure(fig, path)


def run(args: argparse.Namespace) -> Dict[str, object]:
    from cacr.evaluation.inputs import check_inputs, winoground_inputs
    from cacr.evaluation.scorefile import write_results_json
    from cacr.outputs import atomic_write_text

    from . import inputs, pictures

    out_dir = Path(args.out)
    src = inputs.open_sources(args.ckpt, args.overrides, device=args.device)
    examples_path, regions_path, _ = winoground_inputs(src.cfg, need_regions=True)
    wino = src.data.winoground(examples_path, regions_path, in_memory=True)
    check_inputs(src.model, [t for pair in wino.texts for t in pair],
                 [f"example {ex.id!r} caption_{c}" for ex in wino.examples for c in (0, 1)],
                 wino.regions.feature_dim, str(examples_path))
    records = winoground_entropies(src.model, wino, pairs=args.pairs, normalisation=args.normalisation,
                                   score_head=src.head, batch_size=args.batch_size, device=src.device,
                                   max_examples=args.max_examples)
    rows = correlations(records)
    title = f"{src.name} on {examples_path} ({args.pairs} pairs, {args.normalisation} softmax, head={src.head})"
    md = entropy_markdown(rows, records, title)
    png = entropy_scatter(records, rows, out_dir / "entropy_scatter.png", title=title)
    atomic_write_text(out_dir / "entropy.md", md)
    result = {"checkpoint": src.name, "examples": str(examples_path), "pairs": args.pairs,
              "normalisation": args.normalisation, "head": src.head, "correlations": rows,
              "per_example": [asdict(r) for r in records]}
    write_results_json(out_dir / "entropy.json", result)
    if args.wandb:
        pictures.log_to_wandb({"entropy/scatter": png}, start_offline_run=args.wandb_project, run_dir=out_dir)
    print(md, end="")
    print(f"\nwrote {out_dir / 'entropy.md'}, {out_dir / 'entropy.json'}, {png}")
    return result


def build_parser() -> argparse.ArgumentParser:
    from .inputs import add_common_arguments

    p = argparse.ArgumentParser(
        prog="python -m cacr.analysis.entropy",
        description="Section 5.2: entropy of the cross-modal argmax indices against Winoground correctness.",
        epilog="Trailing key=value overrides go to conf/winoground.yaml as for eval_winoground.py.")
    p.add_argument("--ckpt", help="a .ckpt of this project's train.py (or use model=... model.checkpoint=...)")
    p.add_argument("--pairs", choices=("matched", "all"), default="matched",
                   help="pairs whose entropies are averaged per example")
    p.add_argument("--normalisation", choices=("block", "joint"), default="block")
    p.add_argument("--max-examples", type=int, default=None, help="only the first N examples")
    p.add_argument("--batch-size", type=int, default=64)
    add_common_arguments(p, "the scatter plot")
    return p


def main(argv=None) -> None:
    from .inputs import run_command

    run_command("cacr.analysis.entropy", build_parser(), run, argv)


if __name__ == "__main__":
    main()
