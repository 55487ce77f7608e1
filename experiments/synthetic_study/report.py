"""Collect a synthetic-study sweep (``run.sh``) into a markdown table and PNG plots.

    python experiments/synthetic_study/report.py multirun/synthetic_study/<date>_<time> [more sweeps] [--out DIR]

Reads every job directory's ``results.json`` (test retrieval, Winoground-format scores with
their ``collapsed_tag`` breakdown), ``winoground_scores.jsonl`` (the scores themselves),
``.hydra/config.yaml`` (loss name, seed, the synthetic world's parameters) and
``metrics.csv`` (training curves), and writes into ``--out`` (default: the sweep folder):

- ``table.md``: per loss, mean and sample standard deviation over seeds of Winoground
  text / image / group (all pairs, Relation pairs, Object pairs), retrieval R@1 and the
  binding score (:func:`read_binding`) of all, Relation and Object pairs;
- ``scores.png``: those scores as bars with standard-deviation error bars, chance marked;
- ``curves.png``: ranking loss and regularizer (unweighted, and weighted by ``w(t)``) against
  the step, mean over seeds with a min-max band.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import yaml

LOSSES = ("none", "iais_singular", "iais_distributed", "cacr")
METRICS = ("text", "image", "group")
GROUPS = (("all", None), ("Relation", "Relation"), ("Object", "Object"))
CHANCE = {"text": 25.0, "image": 25.0, "group": 100 / 6, "binding": 50.0}


def load_job(job: Path) -> Dict:
    res_path, cfg_path = job / "results.json", job / ".hydra" / "config.yaml"
    for p in (res_path, cfg_path):
        if not p.is_file():
            raise FileNotFoundError(f"{job}: missing {p.name} (did the job finish?)")
    res = json.loads(res_path.read_text())
    cfg = yaml.safe_load(cfg_path.read_text())
    if "winoground" not in res or "retrieval" not in res:
        raise ValueError(f"{res_path}: expected 'winoground' and 'retrieval' entries "
                         "(eval.test and eval.winoground on)")
    w = res["winoground"]
    row = {"loss": cfg["loss"]["name"], "seed": cfg["seed"], "job": job.name}
    for group, tag in GROUPS:
        src = w if tag is None else w.get("by_tag", {}).get("collapsed_tag", {}).get(tag)
        if src is None:
            raise ValueError(f"{res_path}: no collapsed_tag breakdown for {tag!r}")
        for m in METRICS:
            row[f"{group}/{m}"] = float(src[m])
    binding = read_binding(job / "winoground_scores.jsonl", cfg)
    for group, tag in GROUPS:
        row[f"{group}/binding"] = binding[group]
    r = res["retrieval"]
    row["ir_r1"], row["tr_r1"], row["rsum"] = float(r["ir_r1"]), float(r["tr_r1"]), float(r["rsum"])
    row["curves"] = read_curves(job / "metrics.csv")
    return row


def read_binding(path: Path, cfg: Dict) -> Dict[str, float]:
    """Percent of examples whose scores, with each caption's and each image's own effect
    removed, favour the true pairs: ``s(c0,i0) - s(c0,i1) - s(c1,i0) + s(c1,i1) > 0`` (chance
    50). Winoground's scores also fail when one caption (or image) scores higher everywhere;
    this one does not."""
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: missing {path.name}")
    from cacr.data.synthetic import SyntheticConfig, ensure_synthetic

    d = cfg["data"]
    world = ensure_synthetic(SyntheticConfig(img_dim=d["img_dim"], vocab_size=d["vocab_size"], **d["synthetic"]),
                             d["root"])
    tags = {str(e["id"]): e["collapsed_tag"] for e in map(json.loads, open(world.winoground_examples))}
    scores: Dict[str, Dict[str, float]] = defaultdict(dict)
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            ex, c, i = rec["label"].rsplit("_", 2)
            scores[ex][c + i] = float(rec["score"])
    if set(scores) != set(tags):
        raise ValueError(f"{path}: its example ids are not those of {world.winoground_examples}")
    hits: Dict[str, List[bool]] = defaultdict(list)
    for ex, s in scores.items():
        ok = s["c0i0"] - s["c0i1"] - s["c1i0"] + s["c1i1"] > 0
        hits["all"].append(ok)
        hits[tags[ex]].append(ok)
    return {g: 100.0 * sum(hits[g]) / len(hits[g]) for g, _ in GROUPS}


def read_curves(path: Path) -> Dict[str, List[tuple]]:
    """``{column: [(step, value), ...]}`` for the training losses logged in ``metrics.csv``."""
    out: Dict[str, List[tuple]] = defaultdict(list)
    if not path.is_file():
        return out
    with open(path) as f:
        for rec in csv.DictReader(f):
            for col in ("train/rank_loss", "train/reg_loss", "train/reg_weight"):
                if rec.get(col):
                    out[col].append((int(rec["step"]), float(rec[col])))
    return out


def mean_std(xs: List[float]):
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, s


def by_loss(rows: List[Dict]) -> Dict[str, List[Dict]]:
    groups: Dict[str, List[Dict]] = defaultdict(list)
    for r in rows:
        groups[r["loss"]].append(r)
    order = [x for x in LOSSES if x in groups] + sorted(set(groups) - set(LOSSES))
    return {k: sorted(groups[k], key=lambda r: r["seed"]) for k in order}


def table(rows: List[Dict]) -> str:
    cols = [f"{g}/{m}" for g, _ in GROUPS for m in METRICS] + ["ir_r1", "tr_r1"] + [f"{g}/binding" for g, _ in GROUPS]
    head = ["loss", "seeds"] + [c.replace("/", " ") for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for loss, rs in by_loss(rows).items():
        cells = [loss, ",".join(str(r["seed"]) for r in rs)]
        for c in cols:
            m, s = mean_std([r[c] for r in rs])
            cells.append(f"{m:.1f} ± {s:.1f}" if not math.isnan(s) else f"{m:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_scores(rows: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = by_loss(rows)
    panels = [(g, m) for g, _ in GROUPS for m in (*METRICS, "binding")]
    panels += [("retrieval", "ir_r1"), ("retrieval", "tr_r1")]
    ncols = (len(panels) + 1) // 2
    fig, grid = plt.subplots(2, ncols, figsize=(2.2 * ncols, 6.0), sharey=False)
    axes = grid.flatten()
    for ax in axes[len(panels):]:
        ax.axis("off")
    for ax, (g, m) in zip(axes, panels):
        key = m if g == "retrieval" else f"{g}/{m}"
        for i, (loss, rs) in enumerate(groups.items()):
            mu, sd = mean_std([r[key] for r in rs])
            ax.bar(i, mu, yerr=0 if math.isnan(sd) else sd, capsize=3, color=f"C{i}", label=loss)
            ax.scatter([i] * len(rs), [r[key] for r in rs], s=8, color="k", zorder=3)
        if m in CHANCE:
            ax.axhline(CHANCE[m], color="grey", ls="--", lw=0.8)
        ax.set_title(f"{g} {m}", fontsize=9)
        ax.set_xticks([])
    for row in grid:
        row[0].set_ylabel("percent (mean ± std over seeds)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(groups), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _save(fig, path)


def plot_curves(rows: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("train/rank_loss", "ranking loss"), ("train/reg_loss", "regularizer L_reg"),
              ("weighted", "w(t) * L_reg"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for i, (loss, rs) in enumerate(by_loss(rows).items()):
        for ax, (col, title) in zip(axes, panels):
            series = []
            for r in rs:
                c = r["curves"]
                if col == "weighted":
                    w = dict(c.get("train/reg_weight", []))
                    pts = [(s, v * w[s]) for s, v in c.get("train/reg_loss", []) if s in w]
                else:
                    pts = c.get(col, [])
                if pts:
                    series.append(dict(pts))
            if not series:
                continue
            steps = sorted(set.intersection(*(set(s) for s in series)))
            vals = [[s[t] for s in series] for t in steps]
            ax.plot(steps, [sum(v) / len(v) for v in vals], color=f"C{i}", label=loss, lw=1)
            ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=f"C{i}", alpha=0.2)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweeps", type=Path, nargs="+", help="multirun folders (one sub-folder per job)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the first sweep folder)")
    ap.add_argument("--allow-missing", action="store_true",
                    help="report the finished jobs of a sweep still running (the others are listed, not used)")
    args = ap.parse_args(argv)
    jobs = []
    for sweep in args.sweeps:
        found = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir()) if sweep.is_dir() else []
        if not found:
            sys.exit(f"report.py: {sweep}: no job folders (with .hydra/) found")
        jobs += found
    rows = []
    for j in jobs:
        try:
            rows.append(load_job(j))
        except FileNotFoundError as e:
            if not args.allow_missing:
                sys.exit(f"report.py: {e}")
            print(f"report.py: skipped {e}", file=sys.stderr)
        except ValueError as e:
            sys.exit(f"report.py: {e}")
    if not rows:
        sys.exit("report.py: no finished job to report")
    out = args.out or args.sweeps[0]
    out.mkdir(parents=True, exist_ok=True)
    md = table(rows)
    _write(out / "table.md", md)
    plot_scores(rows, out / "scores.png")
    plot_curves(rows, out / "curves.png")
    print(md)
    print(f"{len(rows)} jobs; wrote {out / 'table.md'}, {out / 'scores.png'}, {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
