"""The binding study's report: tables, paired differences with CIs, the pre-registered verdict, plots.

    python experiments/binding_study/report.py experiments/binding_study/runs [--out DIR]

Reads ``calibration.json``, every ``pretrain/seed*/`` and ``finetune/<arm>/seed*/`` job
(``results.json``, ``winoground_scores.jsonl``, ``diagnostics.json``, ``metrics.csv``,
``.hydra/config.yaml``) and writes into ``--out`` (default: the study folder) ``report.md``,
``report.json``, ``pretrain_curves.png`` and ``differences.png``. The decision rules are
those of LOG.md ("Pre-registration", stages A and B), coded in :func:`verdict`.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

IAIS = ("iais_singular", "iais_distributed")
REGULARIZERS = ("cacr", *IAIS)
N_BOOT = 10000
POSITIVE, NEGATIVE_BAND = 3.0, 2.0  # binding points
ENTROPY_MAX, RSUM_TOLERANCE = 0.95, 0.05


# ------------------------------------------------------------------ reading


def _examples(cfg: Dict) -> List[Dict]:
    from cacr.data.synthetic import SyntheticConfig, ensure_synthetic

    d = cfg["data"]
    sc = SyntheticConfig(img_dim=d["img_dim"], vocab_size=d["vocab_size"], **d["synthetic"])
    root = Path(d["root"]) if Path(d["root"]).is_absolute() else REPO / d["root"]
    paths = ensure_synthetic(sc, root)
    return [json.loads(line) for line in open(paths.winoground_examples) if line.strip()]


def per_example_binding(job: Path, examples: List[Dict]) -> Dict[str, np.ndarray]:
    """``{"dev", "test"}`` -> 0/1 binding correctness per example of that half, in file order."""
    from cacr.evaluation.scorefile import read_score_file

    s = read_score_file(job / "winoground_scores.jsonl", [str(e["id"]) for e in examples]).numpy()
    b = ((s[:, 0, 0] - s[:, 0, 1]) - (s[:, 1, 0] - s[:, 1, 1]) > 0).astype(np.float64)
    split = np.array([e.get("split", "test") for e in examples])
    return {h: b[split == h] for h in ("dev", "test")}


def load_job(job: Path, examples_cache: Dict) -> Dict:
    res = json.loads((job / "results.json").read_text())
    cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
    key = json.dumps(cfg["data"]["synthetic"], sort_keys=True)
    if key not in examples_cache:
        examples_cache[key] = _examples(cfg)
    w = res["winoground"]
    halves = w["by_tag"]["split"]
    rsum = float(res["retrieval"]["rsum"]) if "retrieval" in res else float("nan")
    row = {"seed": int(cfg["seed"]), "job": str(job), "rsum": rsum,
           "per_example": per_example_binding(job, examples_cache[key])}
    for h in ("dev", "test"):
        for m in ("text", "image", "group", "binding"):
            row[f"{h}/{m}"] = float(halves[h][m])
    for tag in ("Relation", "Object"):
        row[f"all/{tag}/binding"] = float(w["by_tag"]["collapsed_tag"][tag]["binding"])
    diag = job / "diagnostics.json"
    row["diag"] = json.loads(diag.read_text()) if diag.is_file() else None
    row["curve"] = read_curve(job / "metrics.csv")
    return row


def read_curve(path: Path) -> List[Tuple[int, float, float]]:
    """``(step, dev binding, dev group)`` at each validation (``module.val_winoground``)."""
    if not path.is_file():
        return []
    out = []
    with open(path) as f:
        for r in csv.DictReader(f):
            if r.get("val/wino_binding"):
                out.append((int(r["step"]) + 1, float(r["val/wino_binding"]), float(r["val/wino_group"])))
    return out


def load_probe_job(job: Path, examples: List[Dict]) -> Dict:
    """A ``study.py --pretrainer probe`` checkpoint: where it stopped (``curve.json``) and its scores
    on the study's Winoground-format set (``winoground/winoground_scores.jsonl``, from eval_winoground.py)."""
    from cacr.evaluation.scorefile import read_score_file

    curve = json.loads((job / "curve.json").read_text())
    s = read_score_file(job / "winoground" / "winoground_scores.jsonl", [str(e["id"]) for e in examples]).numpy()
    split = np.array([e.get("split", "test") for e in examples])
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    binding = (s[:, 0, 0] - s[:, 0, 1]) - (s[:, 1, 0] - s[:, 1, 1]) > 0
    row = {"seed": int(job.name[4:]), "job": str(job), "rsum": float("nan"), "diag": None,
           "stopped_at": curve.get("stopped_at"), "probe_binding": curve["curve"][-1]["binding"],
           "curve": [(c["step"], c["binding"], c["group"]) for c in curve["curve"]],
           "per_example": {h: binding[split == h].astype(np.float64) for h in ("dev", "test")}}
    for h in ("dev", "test"):
        m = split == h
        for name, v in (("text", text), ("image", image), ("group", text & image), ("binding", binding)):
            row[f"{h}/{name}"] = 100 * float(v[m].mean())
    return row


def load_study(root: Path):
    cache: Dict = {}
    pre = {int(p.parent.name[4:]): load_job(p.parent, cache) for p in sorted(root.glob("pretrain/seed*/results.json"))}
    for job in sorted(p.parent.parent for p in root.glob("pretrain/seed*/winoground/winoground_scores.jsonl")):
        # study.py --pretrainer probe: scored by eval_winoground.py on the fine-tuning world's set
        path = json.loads((job / "winoground" / "results.json").read_text())["examples"]
        examples = [json.loads(line) for line in open(path) if line.strip()]
        pre[int(job.name[4:])] = load_probe_job(job, examples)
    arms: Dict[str, Dict[int, Dict]] = {}
    for p in sorted(root.glob("finetune/*/seed*/results.json")):
        arms.setdefault(p.parent.parent.name, {})[int(p.parent.name[4:])] = load_job(p.parent, cache)
    cal = json.loads((root / "calibration.json").read_text()) if (root / "calibration.json").is_file() else None
    return pre, arms, cal


# ------------------------------------------------------------------ statistics


def t_interval(d: Sequence[float], level: float = 0.95) -> Tuple[float, float, float]:
    from scipy.stats import t

    d = np.asarray(d, dtype=np.float64)
    m = float(d.mean())
    if len(d) < 2:
        return m, float("nan"), float("nan")
    h = float(t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return m, m - h, m + h


def paired_bootstrap(a: Dict[int, Dict], b: Dict[int, Dict], half: str = "test", n_boot: int = N_BOOT,
                     seed: int = 0) -> Tuple[float, float]:
    """95% percentile interval of mean(binding a - binding b) in points, resampling seeds, then
    within each resampled seed the evaluation pairs (the same pairs for both arms)."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s]["per_example"][half] - b[s]["per_example"][half] for s in seeds]  # (S, N) each in {-1, 0, 1}
    rng = np.random.default_rng(seed)
    n = len(diffs[0])
    out = np.empty(n_boot)
    D = np.stack(diffs)  # (S, N)
    for k in range(n_boot):
        ss = rng.integers(len(seeds), size=len(seeds))
        idx = rng.integers(n, size=(len(seeds), n))
        out[k] = 100.0 * np.take_along_axis(D[ss], idx, axis=1).mean()
    lo, hi = np.percentile(out, [2.5, 97.5])
    return float(lo), float(hi)


def compare(a: Dict[int, Dict], b: Dict[int, Dict], half: str = "test") -> Dict:
    seeds = sorted(set(a) & set(b))
    d = [a[s][f"{half}/binding"] - b[s][f"{half}/binding"] for s in seeds]
    m, lo, hi = t_interval(d)
    blo, bhi = paired_bootstrap(a, b, half)
    return {"n_seeds": len(seeds), "mean": m, "t_ci": [lo, hi], "boot_ci": [blo, bhi], "per_seed": d}


def mean_sd(xs: Sequence[float]) -> Tuple[float, float]:
    xs = np.asarray(xs, dtype=np.float64)
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


# ------------------------------------------------------------------ the pre-registered rules


def select(arms: Dict[str, Dict[int, Dict]], reg: str) -> Optional[str]:
    """The regularizer's arm (10% or 30% weight, constant; 30% exponential) with the highest mean
    binding on the dev half."""
    cands = [a for a in (f"{reg}_10", f"{reg}_30", f"{reg}_30_exp") if a in arms]
    if not cands:
        return None
    return max(cands, key=lambda a: np.mean([r["dev/binding"] for r in arms[a].values()]))


def loss_measure(diag: Dict, reg: str) -> str:
    """The diagnostics key of an arm's own loss: its loss (variant) in its own layers
    (``L_<loss>@<layers>``, measured the same way in ``none``), or ``L_<reg>`` in diagnostics
    written before those existed."""
    if "loss_key" in diag:
        return f"L_{diag['loss_key']}@{diag['loss_layers']}"
    return f"L_{reg}"


def validity(arm: str, arms: Dict[str, Dict[int, Dict]]) -> Dict:
    """L_reg below the none model's (the arm's own loss in its own layers, measured the same way in
    none; same seeds), normalised entropy below
    0.95, R-sum within 5% of none."""
    reg = next((r for r in REGULARIZERS if arm.startswith(r)), None)
    rows, none = arms[arm], arms.get("none", {})
    out: Dict = {}
    if reg is not None and all(r["diag"] for r in rows.values()) and all(r["diag"] for r in none.values()) and none:
        key = loss_measure(next(iter(rows.values()))["diag"], reg)
        if not all(key in r["diag"] for r in [*rows.values(), *none.values()]):
            key = f"L_{reg}"  # some diagnostics predate the matched measures
        own = np.mean([r["diag"][key] for r in rows.values()])
        base = np.mean([r["diag"][key] for r in none.values()])
        out.update(L_reg=float(own), L_reg_none=float(base), reg_lower=bool(own < base), L_reg_key=key)
    if all(r["diag"] for r in rows.values()):
        ent = float(np.mean([r["diag"]["entropy"] for r in rows.values()]))
        out.update(entropy=ent, entropy_ok=bool(ent < ENTROPY_MAX))
    if none:
        rs, rs0 = np.mean([r["rsum"] for r in rows.values()]), np.mean([r["rsum"] for r in none.values()])
        out.update(rsum=float(rs), rsum_none=float(rs0), rsum_ok=bool(abs(rs - rs0) <= RSUM_TOLERANCE * rs0))
    checks = [out.get(k) for k in ("reg_lower", "entropy_ok", "rsum_ok")]
    out["valid"] = bool(all(c is True for c in checks)) if reg is not None else bool(out.get("rsum_ok", True))
    return out


def _excludes_zero(c: Dict) -> bool:
    return all(ci[0] > 0 for ci in (c["t_ci"], c["boot_ci"])) or all(ci[1] < 0 for ci in (c["t_ci"], c["boot_ci"]))


def _within(c: Dict, band: float) -> bool:
    return all(-band <= ci[0] and ci[1] <= band for ci in (c["t_ci"], c["boot_ci"]))


def verdict(cacr_vs_none: Dict, cacr_vs_iais: Optional[Dict], cacr_valid: bool) -> str:
    """LOG.md "Pre-registration" (stages A and B): positive if CACR - none >= +3 binding points with both CIs
    excluding 0, and likewise against the best IAIS arm; negative if both CIs of CACR - none lie
    within +-2 points; otherwise inconclusive. A verdict other than inconclusive needs a valid
    CACR arm."""
    if not cacr_valid:
        return "inconclusive (the CACR arm fails a validity condition)"
    pos = lambda c: c is not None and c["mean"] >= POSITIVE and _excludes_zero(c) and c["mean"] > 0  # noqa: E731
    if pos(cacr_vs_none) and pos(cacr_vs_iais):
        return "positive"
    if _within(cacr_vs_none, NEGATIVE_BAND):
        return "negative"
    return "inconclusive"


# ------------------------------------------------------------------ writing


PER_SEED = ("test/binding", "test/group", "rsum")  # the per-seed table's cells


def _fmt(m, sd=None, nd=1):
    return f"{m:.{nd}f}" if sd is None else f"{m:.{nd}f} ± {sd:.{nd}f}"


def write(root: Path, out: Path) -> Dict:
    pre, arms, cal = load_study(root)
    lines = ["# Binding study: results", "",
             f"Generated by `experiments/binding_study/report.py` from `{root}`.", ""]
    report: Dict = {"pretrain": {}, "arms": {}, "comparisons": {}, "calibration": cal}

    if pre:
        lines += ["## Pre-trained checkpoints", "",
                  "| seed | dev binding | test binding | test group | test text | test image | R-sum |", "|---|---|---|---|---|---|---|"]
        for s, r in sorted(pre.items()):
            lines.append(f"| {s} | {_fmt(r['dev/binding'])} | {_fmt(r['test/binding'])} | {_fmt(r['test/group'])} | "
                         f"{_fmt(r['test/text'])} | {_fmt(r['test/image'])} | {_fmt(r['rsum'])} |")
            report["pretrain"][s] = {k: v for k, v in r.items() if k not in ("per_example", "curve")}
        lines.append("")
    if cal:
        lines += ["## Calibration (at the pre-trained checkpoints)", "",
                  f"Mean ranking loss {cal['mean']['rank']:.4f} over {cal['n_batches']} fine-tuning batches per seed.", "",
                  "| regularizer | mean raw L_reg | lambda (10%) | lambda (30%) |", "|---|---|---|---|"]
        for r in REGULARIZERS:
            lines.append(f"| {r} | {cal['mean'][r]:.5f} | {cal['lambda'][r]['10']:.4g} | {cal['lambda'][r]['30']:.4g} |")
        lines.append("")

    if arms:
        lines += ["## Arms (mean ± sd over seeds; Winoground-format test half unless marked)", "",
                  "| arm | seeds | binding | Relation bind. (all) | Object bind. (all) | text | image | group | dev binding | "
                  "R-sum | L_reg own | entropy |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name in sorted(arms, key=lambda a: (a != "none", a)):
            rows = list(arms[name].values())
            val = validity(name, arms)
            cell = lambda k: _fmt(*mean_sd([r[k] for r in rows]))  # noqa: E731
            reg = next((r for r in REGULARIZERS if name.startswith(r)), None)
            lreg = f"{val['L_reg']:.3g}" if "L_reg" in val else "-"
            ent = _fmt(val["entropy"], nd=3) if "entropy" in val else "-"
            lines.append(f"| {name} | {len(rows)} | {cell('test/binding')} | {cell('all/Relation/binding')} | "
                         f"{cell('all/Object/binding')} | {cell('test/text')} | {cell('test/image')} | "
                         f"{cell('test/group')} | {cell('dev/binding')} | {cell('rsum')} | {lreg} | {ent} |")
            report["arms"][name] = {"seeds": sorted(arms[name]), "validity": val, "regularizer": reg,
                                    **{k: mean_sd([r[k] for r in rows]) for k in
                                       ("test/binding", "dev/binding", "test/group", "rsum")},
                                    "per_seed": {s: {k: arms[name][s][k] for k in PER_SEED}
                                                 for s in sorted(arms[name])}}
        lines.append("")
        seeds = sorted({s for a in arms.values() for s in a})
        lines += ["## Per seed (test binding / test group / R-sum)", "",
                  "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
        for name in sorted(arms, key=lambda a: (a != "none", a)):
            cells = [" / ".join(_fmt(arms[name][s][k]) for k in PER_SEED) if s in arms[name] else "-"
                     for s in seeds]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")

    if "none" in arms:
        chosen = {r: select(arms, r) for r in REGULARIZERS}
        report["selected"] = chosen
        lines += ["## Pre-registered comparison", "",
                  "Arms chosen on the dev half (highest mean dev binding among each regularizer's 10% / 30% / "
                  "30%-exponential arms): " + ", ".join(f"{r} -> `{a}`" for r, a in chosen.items()), ""]
        comps = {}
        for r, a in chosen.items():
            if a:
                comps[f"{a} - none"] = compare(arms[a], arms["none"])
        iais = [chosen[r] for r in IAIS if chosen[r]]
        best_iais = max(iais, key=lambda a: np.mean([x["dev/binding"] for x in arms[a].values()])) if iais else None
        if chosen["cacr"] and best_iais:
            comps[f"{chosen['cacr']} - {best_iais}"] = compare(arms[chosen["cacr"]], arms[best_iais])
        for name in ("cacr_30_penultimate", "cacr_30_all_layers", "cacr_30_single_softmax", "cacr_30_single_softmax_cal"):
            if name in arms and "cacr_30" in arms:
                comps[f"{name} - cacr_30 (ablation)"] = compare(arms[name], arms["cacr_30"])
        lines += ["| difference (test binding, points) | seeds | mean | 95% t-interval | 95% bootstrap (seeds x pairs) | "
                  "per seed |", "|---|---|---|---|---|---|"]
        for k, c in comps.items():
            lines.append(f"| {k} | {c['n_seeds']} | {c['mean']:+.2f} | [{c['t_ci'][0]:+.2f}, {c['t_ci'][1]:+.2f}] | "
                         f"[{c['boot_ci'][0]:+.2f}, {c['boot_ci'][1]:+.2f}] | "
                         + ", ".join(f"{d:+.1f}" for d in c["per_seed"]) + " |")
        report["comparisons"] = comps
        if chosen["cacr"]:
            cv = validity(chosen["cacr"], arms)
            v = verdict(comps[f"{chosen['cacr']} - none"],
                        comps.get(f"{chosen['cacr']} - {best_iais}"), cv["valid"])
            report["verdict"] = v
            report["cacr_validity"] = cv
            lines += ["", f"**Verdict (pre-registered rules): {v}.**", "",
                      "Validity of the CACR arm: " + ", ".join(f"{k}={v}" for k, v in cv.items()), ""]
        plot_differences(comps, out / "differences.png")
    if pre:
        plot_curves(pre, out / "pretrain_curves.png")
    from cacr.outputs import atomic_write_text

    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=float))
    print("\n".join(lines))
    return report


def plot_differences(comps: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not comps:
        return
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.5 * len(comps)))
    for i, (k, c) in enumerate(comps.items()):
        ax.errorbar(c["mean"], i, xerr=[[c["mean"] - c["boot_ci"][0]], [c["boot_ci"][1] - c["mean"]]], fmt="o",
                    color="C0", capsize=3)
        ax.scatter(c["per_seed"], [i] * len(c["per_seed"]), s=8, color="C1", zorder=3)
    for x, style in ((0, "-"), (POSITIVE, ":"), (-NEGATIVE_BAND, "--"), (NEGATIVE_BAND, "--")):
        ax.axvline(x, color="grey", ls=style, lw=0.8)
    ax.set_yticks(range(len(comps)), list(comps))
    ax.set_xlabel("paired difference in test binding, points (bars: bootstrap 95% CI; dots: seeds)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(pre: Dict[int, Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for s, r in sorted(pre.items()):
        if r["curve"]:
            st, b, g = zip(*r["curve"])
            axes[0].plot(st, b, label=f"seed {s}")
            axes[1].plot(st, g, label=f"seed {s}")
    axes[0].axhline(50, color="grey", lw=0.8, ls="--")
    axes[0].set(xlabel="step", ylabel="dev binding (%)", title="binding (chance 50)")
    axes[1].set(xlabel="step", ylabel="dev group (%)", title="group")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    out = a.out or a.root
    Path(out).mkdir(parents=True, exist_ok=True)  # a new --out folder is made, not an error
    write(a.root, out)


if __name__ == "__main__":
    main()
