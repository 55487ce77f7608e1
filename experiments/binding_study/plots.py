"""What probe_plot.py and gate_plot.py share: the ``OUT.png NAME=PATH ...`` command line, a
two-panel figure without a display, and an atomic save."""
from __future__ import annotations

import os
from typing import List, Sequence, Tuple


def parse_runs(argv: Sequence[str], usage: str) -> Tuple[str, List[Tuple[str, str]]]:
    """``OUT.png NAME=PATH ...`` -> (out, [(name, path)]); the usage text on anything else."""
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        raise SystemExit(usage)
    return argv[0], [tuple(a.split("=", 1)) for a in argv[1:]]


def two_panels(width: float = 11, height: float = 4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 2, figsize=(width, height))


def save(fig, path: str) -> None:
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    print(path)
