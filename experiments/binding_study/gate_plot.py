"""Learning curves of train.py runs on the dev half, read from their ``metrics.csv``
(``val/wino_binding``, ``val/wino_group``, written with ``module.val_winoground=true``).

    python experiments/binding_study/gate_plot.py OUT.png NAME=METRICS_CSV [NAME=METRICS_CSV ...]

Left: dev binding (chance 50); right: dev group; the gate's thresholds (75, 40) dashed.
"""
from __future__ import annotations

import csv
import os
import sys


def read_metrics(path):
    """``[(step, binding, group)]`` at each validation of a run's metrics.csv."""
    with open(path) as f:
        rows = [(int(r["step"]) + 1, float(r["val/wino_binding"]), float(r["val/wino_group"]))
                for r in csv.DictReader(f) if r.get("val/wino_binding")]
    if not rows:
        raise ValueError(f"{path}: no val/wino_binding rows (was the run validated with module.val_winoground=true?)")
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        raise SystemExit(__doc__)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for n, spec in enumerate(argv[1:]):
        name, path = spec.split("=", 1)
        steps, binding, group = zip(*read_metrics(path))
        style = dict(marker="o", ms=3, label=name, color=f"C{n % 10}")
        ax1.plot(steps, binding, **style)
        ax2.plot(steps, group, **style)
    for ax, gate, chance, what in ((ax1, 75, 50, "binding"), (ax2, 40, None, "group")):
        ax.axhline(gate, color="k", lw=0.8, ls="--", label=f"gate {gate}")
        if chance:
            ax.axhline(chance, color="grey", lw=0.8, ls=":")
        ax.set(xlabel="step", ylabel=f"dev {what} (%)", title=f"dev half, {what}", ylim=(0, 102))
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = argv[0] + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, argv[0])
    print(argv[0])


if __name__ == "__main__":
    main()
