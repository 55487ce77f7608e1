"""The paper's attention pictures (Figures 2, 4, 5) and the Section 5.2 entropy analysis for
fine-tuned models of the study, side by side (issue 13, item 7).

For each arm named, the model of one seed (``<runs>/finetune/<arm>/seed<s>/checkpoints/last.ckpt``,
the model the study reports) is run through the project's analysis tools on the world that
run was evaluated on (the data config in its ``results.json``):

- ``python -m cacr.analysis.attention`` on fixed examples of the **test half**, chosen by rule
  and not by outcome: the first example of each tag (Relation, Object) in ``test.jsonl``,
  with the synthetic scene rendered behind the boxes;
- ``python -m cacr.analysis.entropy`` on the whole test half.

Writes ``<out>/<arm>_seed<s>/{attention,entropy}/`` and ``<out>/pictures.md`` (the entropy
tables and the picture files, per arm).

Run: ``python experiments/binding_study/pictures.py --runs experiments/binding_study/runs/stage_b
--arms none cacr_30 --seed 0 --out experiments/binding_study/results/stage_b/pictures``
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # for `cacr` when run as a script


def evaluated_files(run: Path) -> Path:
    """The Winoground-format folder (examples, regions, scenes, dev/test halves) of the world the
    run was trained and evaluated on, from the data config in its ``results.json``; the world
    must exist (nothing is generated here)."""
    from cacr.data.sources import synthetic_config
    from cacr.data.synthetic import SyntheticPaths

    res = run / "results.json"
    if not res.is_file():
        raise FileNotFoundError(f"{res}: no results.json; has this fine-tuning run finished?")
    d = json.loads(res.read_text()).get("config", {}).get("data")
    if not isinstance(d, dict) or d.get("source") != "synthetic":
        raise ValueError(f"{res}: its config has no synthetic data section; the pictures read the synthetic world")
    cfg = synthetic_config(d)
    paths = SyntheticPaths.under(REPO / d["root"] / f"seed{cfg.seed}-{cfg.key()}")
    for f in (paths.winoground_test, paths.winoground_regions, paths.winoground_scenes):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (the world {res} was evaluated on)")
    return paths.winoground_examples.parent


def first_of_each_tag(test: Path, tags: Sequence[str] = ("Relation", "Object")) -> List[int]:
    """Ids of the first example of each tag in the test half, in file order."""
    out: Dict[str, int] = {}
    with open(test) as f:
        for line in f:
            ex = json.loads(line)
            if ex["tag"] in tags and ex["tag"] not in out:
                out[ex["tag"]] = ex["id"]
    missing = [t for t in tags if t not in out]
    if missing:
        raise ValueError(f"{test}: no example tagged {missing}")
    return [out[t] for t in tags]


def run(cmd: List[str], threads: int) -> None:
    r = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS=str(threads)),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}")


def analyse(runs: Path, arm: str, seed: int, out: Path, threads: int) -> Dict:
    run_dir = runs / "finetune" / arm / f"seed{seed}"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: missing")
    w = evaluated_files(run_dir)
    ids = first_of_each_tag(w / "test.jsonl")
    dest = out / f"{arm}_seed{seed}"
    files = [f"examples={w / 'examples.jsonl'}", f"regions={w / 'regions.h5'}"]
    for i in ids:
        run([sys.executable, "-m", "cacr.analysis.attention", "--ckpt", str(ckpt), "--example", str(i),
             "--scenes", str(w / "scenes.jsonl"), "--out", str(dest / "attention"), *files], threads)
    run([sys.executable, "-m", "cacr.analysis.entropy", "--ckpt", str(ckpt), "--out", str(dest / "entropy"),
         f"examples={w / 'test.jsonl'}", f"regions={w / 'regions.h5'}"], threads)
    return {"arm": arm, "seed": seed, "examples": ids, "dir": dest,
            "entropy_md": (dest / "entropy" / "entropy.md").read_text()}


def write_md(results: List[Dict], out: Path) -> Path:
    lines = ["# Attention pictures and entropy analysis of the study's models", "",
             "Made by `experiments/binding_study/pictures.py`; examples: the first Relation and the first "
             "Object example of the test half.", ""]
    for r in results:
        lines += [f"## {r['arm']}, seed {r['seed']}", ""]
        for i in r["examples"]:
            for stem in (f"ex{i}_c0_i0", f"ex{i}_c1_i1"):
                for kind in ("congruence", "boxes_LV", "boxes_VL", "argmax_labels_LV"):
                    p = (r["dir"] / "attention" / f"{stem}_{kind}.png").relative_to(out)
                    lines.append(f"- `{p}`")
        md = r["entropy_md"].replace("### ", "### entropy: ").replace(f"{REPO}/", "")
        lines += ["", md, ""]
    from cacr.outputs import atomic_write_text

    return atomic_write_text(out / "pictures.md", "\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", required=True, help="the study's --out folder")
    ap.add_argument("--arms", nargs="+", default=["none", "cacr_30"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [analyse(Path(args.runs), a, args.seed, out, args.threads) for a in args.arms]
    print(f"wrote {write_md(results, out)}")


if __name__ == "__main__":
    main()
