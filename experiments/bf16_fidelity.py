"""Does bf16 scoring change what a *trained* model's evaluation says? fp32 vs bf16 on the same
checkpoints, through the user's commands (``eval_winoground.py``, ``eval_retrieval.py``).

For each run checkpoint: Winoground-format scores (all examples of the data config's set) and a
retrieval score matrix (a split of the data config), once with ``bf16=false`` and once with
``bf16=true``; then

- score differences: max and mean |bf16 - fp32|, beside the scores' std;
- retrieval: R@1 agreement (same best image per caption; same best caption per image) and
  the recalls of both runs;
- Winoground: the share of examples whose text / image / group / binding outcome is the same,
  and the percentages of both runs.

On a CPU without AVX-512 BF16 or AMX bf16 is emulated (slow but numerically the same
rounding as native bf16 matmuls with fp32 accumulation), so the fidelity figures hold for the
machines where ``bf16: auto`` turns it on. Writes a JSON and prints a table:

    python experiments/bf16_fidelity.py <run>/checkpoints/last.ckpt [...] --json experiments/bf16_fidelity.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cacr.evaluation.winoground_metrics import METRICS, winoground_correct  # noqa: E402


def run(cmd, log):
    log.write(" ".join(cmd) + "\n")
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    log.write(done.stdout[-2000:] + done.stderr[-4000:] + "\n")
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")


def wino_scores(path: Path):
    """(keys, (N, 2, 2) scores) from a ``winoground_scores.jsonl`` (labels ``<id>_c<k>_i<j>``)."""
    scores = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            key, c, i = row["label"].rsplit("_", 2)
            scores.setdefault(key, torch.zeros(2, 2, dtype=torch.float64))[int(c[1]), int(i[1])] = row["score"]
    keys = list(scores)
    return keys, torch.stack([scores[k] for k in keys])


def load_matrix(path: Path) -> torch.Tensor:
    obj = torch.load(path, weights_only=True)
    return (obj["scores"] if isinstance(obj, dict) else obj).double()


def compare(ckpt: Path, work: Path, split: str, log) -> dict:
    out = {"checkpoint": str(ckpt)}
    wino, ret = {}, {}
    for prec in ("fp32", "bf16"):
        flag = "bf16=" + ("true" if prec == "bf16" else "false")
        flag, plain = flag, "exact=false"  # plain bf16 scores: what the evaluators' fp32 re-scoring repairs
        run([sys.executable, "eval_winoground.py", f"ckpt_path={ckpt}", flag, plain, f"output={work / ('wino_' + prec)}",
             "progress=false", "n_boot=100"], log)
        run([sys.executable, "eval_retrieval.py", f"ckpt_path={ckpt}", flag, plain, f"split={split}",
             f"output={work / ('ret_' + prec)}", f"save_scores={work / ('ret_' + prec + '.pt')}", "progress=false"],
            log)
        wino[prec] = wino_scores(work / f"wino_{prec}" / "winoground_scores.jsonl")
        ret[prec] = (load_matrix(work / f"ret_{prec}.pt"), json.loads((work / f"ret_{prec}" / "results.json").read_text()))
    (ids32, w32), (ids16, w16) = wino["fp32"], wino["bf16"]
    assert ids32 == ids16
    c32, c16 = winoground_correct(w32), winoground_correct(w16)
    out["winoground"] = {
        "examples": len(ids32),
        "max_abs_diff": float((w16 - w32).abs().max()), "mean_abs_diff": float((w16 - w32).abs().mean()),
        "score_std": float(w32.std()),
        "interaction_median_abs": float(((w32[:, 0, 0] - w32[:, 0, 1] - w32[:, 1, 0] + w32[:, 1, 1]) / 2).abs().median()),
        "same_outcome": {m: float((c32[m] == c16[m]).double().mean()) for m in METRICS if m in c32},
        "fp32_percent": {m: float(100 * c32[m].double().mean()) for m in METRICS if m in c32},
        "bf16_percent": {m: float(100 * c16[m].double().mean()) for m in METRICS if m in c16},
    }
    (m32, r32), (m16, r16) = ret["fp32"], ret["bf16"]
    out["retrieval"] = {
        "shape": list(m32.shape),
        "max_abs_diff": float((m16 - m32).abs().max()), "score_std": float(m32.std()),
        "r1_agreement_text_to_image": float((m32.argmax(1) == m16.argmax(1)).double().mean()),
        "r1_agreement_image_to_text": float((m32.argmax(0) == m16.argmax(0)).double().mean()),
        "fp32": {k: v for k, v in r32.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        "bf16": {k: v for k, v in r16.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
    }
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", type=Path, help="run .ckpt files of train.py")
    ap.add_argument("--split", default="test", help="retrieval split (default test)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="keep the evaluators' outputs here (default: a temp dir)")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base = args.work or Path(tmp)
        with open(base / "fidelity.log", "a") as log:
            for i, ckpt in enumerate(args.checkpoints):
                work = base / f"ckpt{i}"
                work.mkdir(parents=True, exist_ok=True)
                results.append(compare(ckpt.resolve(), work, args.split, log))
    for r in results:
        w, t = r["winoground"], r["retrieval"]
        print(f"\n{r['checkpoint']}")
        print(f"  Winoground ({w['examples']} examples): max |bf16-fp32| {w['max_abs_diff']:.2e} (scores' std "
              f"{w['score_std']:.3f}, median |interaction| {w['interaction_median_abs']:.2e}); same outcome: " +
              ", ".join(f"{m} {100 * v:.1f}%" for m, v in w["same_outcome"].items()))
        print("    fp32 " + ", ".join(f"{m} {v:.2f}" for m, v in w["fp32_percent"].items()) +
              " | bf16 " + ", ".join(f"{m} {v:.2f}" for m, v in w["bf16_percent"].items()))
        print(f"  retrieval {t['shape'][0]} x {t['shape'][1]}: max |bf16-fp32| {t['max_abs_diff']:.2e} (std "
              f"{t['score_std']:.3f}); R@1 agreement text->image {100 * t['r1_agreement_text_to_image']:.1f}%, "
              f"image->text {100 * t['r1_agreement_image_to_text']:.1f}%")
    if args.json:
        from cacr.outputs import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
