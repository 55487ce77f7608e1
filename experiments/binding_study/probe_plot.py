"""Curves of probe.py runs, read from their logs (the lines ``step N: ... binding B ... mlm ...``).

    python experiments/binding_study/probe_plot.py OUT.png NAME=LOG [NAME=LOG ...]

Left: binding on the probe's fresh Winoground-format pairs; right: the masked relation word's
accuracy (4-way among left/right/above/below; "of" alone gives 50%).
"""
from __future__ import annotations

import os
import re
import sys

LINE = re.compile(r"^step (?P<step>\d+): .*? binding (?P<binding>[\d.]+) .*? group (?P<group>[\d.]+)(?: mlm(?P<mlm>.*?))? \[")


def read_log(path):
    rows = []
    with open(path) as f:
        for line in f:
            m = LINE.match(line)
            if m is None:
                continue
            mlm = dict(zip(*[iter((m["mlm"] or "").split())] * 2))
            rows.append({"step": int(m["step"]), "binding": float(m["binding"]), "group": float(m["group"]),
                         **{f"mlm_{k}": float(v) for k, v in mlm.items()}})
    if not rows:
        raise ValueError(f"{path}: no 'step N: ... binding ...' lines (is it a probe.py log?)")
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
        rows = read_log(path)
        steps = [r["step"] for r in rows]
        style = dict(marker="o", ms=3, label=name, color=f"C{n % 10}")  # one colour per run in both panels
        ax1.plot(steps, [r["binding"] for r in rows], **style)
        if any("mlm_relation" in r for r in rows):
            ax2.plot(steps, [100 * r.get("mlm_relation", float("nan")) for r in rows], **style)
    ax1.axhline(50, color="grey", lw=0.8, ls="--")
    ax1.set(xlabel="step", ylabel="binding (%)", title="binding, fresh swap pairs")
    ax2.axhline(50, color="grey", lw=0.8, ls="--")
    ax2.set(xlabel="step", ylabel="accuracy (%)", title="masked relation word", ylim=(0, 102))
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = argv[0] + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, argv[0])
    print(argv[0])


if __name__ == "__main__":
    main()
