"""Binding against wall time for candidate default recipes (issue 31).

Each candidate is ``python train.py`` with a set of overrides, validated often on the
Winoground-format dev half (``val/wino_binding``) and stopped at ``--stop`` binding or after
``--max-seconds``. Its curve (step, wall seconds, dev binding / group, val R-sum) is written to
``results/<name>.csv`` beside this file; ``plot.py`` draws them. Only the dev half is watched:
the test half is for the chosen recipe's final report.

    python experiments/default_recipe/search.py --only A B     # candidates by name
    python experiments/default_recipe/search.py --list
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# What every candidate shares: validation every 100 steps on 20 images (retrieval) and the dev
# half (binding), no final test (the search reads only dev), CSV logs.
COMMON = ["eval.test=false", "eval.winoground=false", "module.val_winoground=true",
          "eval.val_every_n_steps=100", "data.val_max_images=20", "trainer.log_every_n_steps=50"]
PILOT = ["experiment=binding_pilot", "loss=cacr"]

CANDIDATES = {
    # the gate recipe with CACR on and one negative per direction (the probe's Q had one)
    "A_l4_k1": PILOT + ["module.num_negatives=1"],
    # two layers (the default tiny UNITER's depth)
    "B_l2_k1": PILOT + ["module.num_negatives=1", "model.config.num_hidden_layers=2"],
    # a larger learning rate
    "C_l4_k1_lr1e-3": PILOT + ["module.num_negatives=1", "module.lr=1e-3"],
    # simpler scenes: at most one unnamed region
    "D_l4_k1_d01": PILOT + ["module.num_negatives=1", "data.synthetic.min_distractors=0",
                            "data.synthetic.max_distractors=1"],
    # 32 positives a step (the probe bound in fewer positives at 32 than at 16)
    "E_l4_k1_b32": PILOT + ["module.num_negatives=1", "data.batch_size=32"],
    "F_l2_k1_b32": PILOT + ["module.num_negatives=1", "data.batch_size=32", "model.config.num_hidden_layers=2"],
    # E (the default) at a larger learning rate
    "G_l4_k1_b32_lr1e-3": PILOT + ["module.num_negatives=1", "data.batch_size=32", "module.lr=1e-3"],
}


def curve(run_dir: Path):
    rows = []
    path = run_dir / "metrics.csv"
    if not path.exists():
        return rows
    for r in csv.DictReader(open(path)):
        if r.get("val/wino_binding"):
            rows.append({"step": int(r["step"]) + 1, "wall_s": float(r.get("val/wall_s") or "nan"),
                         "binding": float(r["val/wino_binding"]), "group": float(r["val/wino_group"]),
                         "rsum": float(r["val/rsum"])})
    return rows


def run(name, overrides, args):
    run_dir = Path(args.runs) / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "train.py", *overrides, *COMMON, f"train.stop_at_binding={args.stop}",
           f"train.max_steps={args.max_steps}", f"run_dir={run_dir}"]
    print(" ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    with open(Path(args.runs) / f"{name}.log", "w") as log:
        try:
            env = dict(os.environ)
            if args.threads:
                env["OMP_NUM_THREADS"] = str(args.threads)
            subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=args.max_seconds, env=env)
            why = "finished"
        except subprocess.TimeoutExpired:
            why = f"stopped at {args.max_seconds} s"
    wall = time.perf_counter() - t0
    rows = curve(run_dir)
    out = HERE / "results" / f"{name}.csv"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, ["step", "wall_s", "binding", "group", "rsum"])
        w.writeheader()
        w.writerows(rows)
        f.write(f"# {' '.join(overrides)} | process wall {wall:.0f} s, {why} | cpu flags: {cpu_kind()}\n")
    os.replace(tmp, out)
    last = rows[-1] if rows else {}
    print(f"{name}: {why} after {wall:.0f} s; last dev binding {last.get('binding')} group {last.get('group')} "
          f"at step {last.get('step')}", flush=True)


def cpu_kind() -> str:
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    kinds = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{os.cpu_count()} cores, " + " ".join(kinds)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="candidate names (default: all)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--stop", type=float, default=90.0, help="stop a run at this dev binding")
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--max-seconds", type=int, default=1800)
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of each run (0: as set)")
    ap.add_argument("--runs", default=str(ROOT / "outputs" / "default_recipe"))
    args = ap.parse_args()
    if args.list:
        for k, v in CANDIDATES.items():
            print(k, " ".join(v))
        return
    names = args.only or list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        sys.exit(f"search.py: unknown candidate(s) {unknown}; --list shows them")
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    for n in names:
        run(n, CANDIDATES[n], args)


if __name__ == "__main__":
    main()
