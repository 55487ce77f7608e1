"""Learning curves of train.py runs on the dev half, read from their ``metrics.csv``
(``val/wino_binding``, ``val/wino_group``, written with ``module.val_winoground=true``).

    python experiments/binding_study/gate_plot.py OUT.png NAME=METRICS_CSV [NAME=METRICS_CSV ...]

Left: dev binding (chance 50); right: dev group; the gate's thresholds (75, 40) dashed.
"""
from __future__ import annotations

import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plots import parse_runs, save, two_panels  # noqa: E402


def read_metrics(path):
    """``[(step, binding, group)]`` at each validation of a run's metrics.csv."""
    with open(path) as f:
        rows = [(int(r["step"]) + 1, float(r["val/wino_binding"]), float(r["val/wino_group"]))
                for r in csv.DictReader(f) if r.get("val/wino_binding")]
    if not rows:
        raise ValueError(f"{path}: no val/wino_binding rows (was the run validated with module.val_winoground=true?)")
    return rows


def main(argv=None):
    out, runs = parse_runs(sys.argv[1:] if argv is None else argv, __doc__)
    fig, (ax1, ax2) = two_panels()
    for n, (name, path) in enumerate(runs):
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
    save(fig, out)


if __name__ == "__main__":
    main()
