"""Curves of probe.py runs, read from their logs (the lines ``step N: ... binding B ... mlm ...``).

    python experiments/binding_study/probe_plot.py OUT.png NAME=LOG [NAME=LOG ...]

Left: binding on the probe's fresh Winoground-format pairs; right: the masked relation word's
accuracy (4-way among left/right/above/below; "of" alone gives 50%).
"""
from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plots import parse_runs, save, two_panels  # noqa: E402

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
    out, runs = parse_runs(sys.argv[1:] if argv is None else argv, __doc__)
    fig, (ax1, ax2) = two_panels()
    for n, (name, path) in enumerate(runs):
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
    save(fig, out)


if __name__ == "__main__":
    main()
