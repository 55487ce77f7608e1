"""Dev binding against steps and against positives seen, for every curve in results/
(search.py writes them): results/curves.png.

    python experiments/default_recipe/plot.py
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import search  # noqa: E402


def read(path: Path):
    rows = [r for r in csv.DictReader(line for line in open(path) if not line.startswith("#"))]
    return [(int(r["step"]), float(r["binding"]), float(r["group"])) for r in rows]


def batch_size(name: str) -> int:
    over = search.CANDIDATES.get(name, [])
    sizes = [int(o.split("=")[1]) for o in over if o.startswith("data.batch_size=")]
    return sizes[-1] if sizes else 16  # binding_pilot's


def main(out: Path = HERE / "results" / "curves.png") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted((HERE / "results").glob("*.csv"))
    if not files:
        raise SystemExit(f"plot.py: no curves in {HERE / 'results'} (run search.py first)")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for f in files:
        pts = read(f)
        b = batch_size(f.stem)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f.stem)
        axes[1].plot([p[0] * b / 1000 for p in pts], [p[1] for p in pts], marker="o", label=f.stem)
    for ax, xl in zip(axes, ("optimizer step", "positives seen (thousands)")):
        ax.axhline(75, color="grey", lw=0.8, ls="--")
        ax.axhline(50, color="grey", lw=0.5, ls=":")
        ax.set_xlabel(xl)
    axes[0].set_ylabel("dev binding (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Default-recipe candidates: dev-half binding (world seed 0)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)
    return out


if __name__ == "__main__":
    main()
