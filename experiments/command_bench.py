"""The user's evaluation command, timed as a user runs it, against the public code's own practice
on the same files and weights (issue 16's CPU target: "through the user's command with its
default settings").

1. Writes a Flickr-like test split in the project's file formats (what ``python -m
   cacr.data.convert`` makes of the official databases): ``--captions`` captions of 9..38 word
   pieces, one image each, ``--images`` images of 12..98 regions of 2048-d fp16 features, high
   confidences (every region kept), and UNITER-base weights (random; speed does not depend on
   them) as an official-format ``.pt``.
2. Runs ``python eval_retrieval.py model=uniter_base model.checkpoint=... data=flickr30k ...``
   in a subprocess: once with nothing else set (the defaults: batch size, precision and threads
   chosen for the device) and once per ``--variant`` (e.g. ``"batch_size=512"``). The scoring
   rate comes from the command's own ``results.json`` (``pairs_per_s``); the wall time includes
   its start-up (imports, reading the files, building the model).
3. In this process, on the same files and weights: the public evaluation's batching
   (``benchmark.public_practice_scores``: images sorted by region count, chunks of
   ``--ref-chunk`` per caption, padded, explicit attention, fp32) and, with ``--public-code
   PATH``, the public code itself (``public_code.public_code_scores``).

Every path runs ``--repeats`` times, round-robin. The table gives pairs/s (fastest and median)
and the ratio to the public practice; the header names the machine (CPU flags, threads, GPU,
load). The scores of the command are checked against the public practice's (max |diff| and
the share of captions whose best image agrees).

    python experiments/command_bench.py [--captions 28 --images 28] [--repeats 2] [--variant "bf16=false"]
        [--public-code PATH] [--json out.json]

Images get the captions in turn, so ``--captions`` must be at least ``--images``. Time: UNITER-base
scores about 4-6 pairs/s on the 2-core AVX2 machine, so the defaults (784 pairs a path and repeat)
take over 15 min with ``--public-code`` and 2 repeats; ``--captions 16 --images 16`` took 7 min.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

from cacr.outputs import atomic_write_text  # noqa: E402
from benchmark import describe_machine, machine_line, public_practice_scores, r1_agreement  # noqa: E402

VOCAB = 28996  # bert-base-cased, as uniter_base (UniterConfig's default)
SPECIALS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}


def write_split(root: Path, n_cap: int, n_img: int, seed: int = 0, dim: int = 2048,
                words=(9, 38), regions=(12, 98)) -> dict:
    """A Flickr-like ``test`` split in the project's formats; returns the data overrides."""
    from cacr.data.formats import RegionsWriter, write_captions

    if n_cap < n_img:
        raise ValueError(f"--captions {n_cap} < --images {n_img}: a split holds the images its captions name, "
                         f"so every image needs at least one caption")
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    image_ids = [f"img_{i}" for i in range(n_img)]
    with RegionsWriter(root / "regions.h5", feature_dim=dim, feature_source="command_bench: random",
                       with_conf=True) as w:
        for iid in image_ids:
            m = int(rng.integers(regions[0], regions[1] + 1))
            xy = rng.uniform(0, 0.5, (m, 2))
            boxes = np.concatenate([xy, xy + rng.uniform(0.02, 0.5, (m, 2))], 1)
            w.add(iid, rng.standard_normal((m, dim)).astype(np.float16), boxes, np.full(m, 0.9, np.float32))
    tokens = [rng.integers(999, VOCAB, int(rng.integers(words[0], words[1] + 1))).tolist() for _ in range(n_cap)]
    vocab = [SPECIALS.get(i, f"w{i}") for i in range(VOCAB)]
    write_captions(root / "captions.h5", caption_ids=[f"c{i}" for i in range(n_cap)],
                   image_ids=[image_ids[i % n_img] for i in range(n_cap)], texts=[f"caption {i}" for i in range(n_cap)],
                   token_ids=tokens, splits=["test"] * n_cap, vocab=vocab, tokenizer="command_bench",
                   do_lower_case=False, cls_id=101, sep_id=102, pad_id=0, unk_id=100)
    return {"data": "flickr30k", "data.regions": str(root / "regions.h5"), "data.captions": str(root / "captions.h5"),
            "data.tokenizer": "null", "data.name": "flickr_like"}


def write_weights(path: Path, model_overrides: dict) -> Path:
    """UNITER-base (``UniterConfig``'s defaults, or ``model_overrides``' size) with random
    weights, in the official format."""
    from cacr.model import UniterConfig, build_uniter
    from cacr.model.export import official_state_dict
    from cacr.outputs import atomic_write

    cfg = UniterConfig(**model_overrides)
    torch.manual_seed(0)
    state = official_state_dict(cfg, build_uniter(cfg).state_dict(), where="command_bench")
    return atomic_write(path, lambda f: torch.save(state, f))


def run_command(overrides: list, out: Path) -> dict:
    """``eval_retrieval.py`` with ``overrides`` in a subprocess; its results.json plus the wall time."""
    cmd = [sys.executable, str(REPO / "eval_retrieval.py"), *overrides, f"output={out}", "overwrite=true",
           "progress=false", f"save_scores={out / 'scores.pt'}"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed (exit {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    res = json.loads((out / "results.json").read_text())
    res["wall_seconds"] = wall
    res["out_dir"] = str(out)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--captions", type=int, default=28)
    ap.add_argument("--images", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variant", action="append", default=[],
                    help="extra eval_retrieval.py settings to time beside the defaults, e.g. 'batch_size=512 bf16=false'")
    ap.add_argument("--ref-chunk", type=int, default=16, help="the public evaluation's images per forward on a CPU")
    ap.add_argument("--public-code", default=None, help="a local checkout of the public UNITER code (never downloaded)")
    ap.add_argument("--model", nargs="*", default=[], help="model size overrides, e.g. hidden_size=64 (tests)")
    ap.add_argument("--work", default=None, help="folder for the files and outputs (default: a temporary one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    size = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.model)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        data = write_split(work / "split", args.captions, args.images)
        weights = write_weights(work / "uniter.pt", size)
        common = ["model=uniter_base", f"model.checkpoint={weights}", "split=test",
                  *[f"model.config.{k}={v}" for k, v in size.items()], *[f"{k}={v}" for k, v in data.items()]]
        return _bench(args, work, common, data, weights, size)


def _bench(args, work: Path, common: list, data: dict, weights: Path, size: dict) -> dict:
    from hydra import compose, initialize_config_dir

    from cacr.data.sources import open_data
    from cacr.evaluation.scorefile import load_score_matrix
    from cacr.model import UniterConfig, build_uniter

    machine = describe_machine(torch.device("cpu"))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        dcfg = compose("retrieval", overrides=[f"{k}={v}" for k, v in data.items()]).data
    split = open_data(dcfg).split("test")
    caps = list(split.texts)
    imgs = [split.image(j) for j in range(split.num_images)]
    eager = build_uniter(UniterConfig(**size, attn_impl="eager"), checkpoint=str(weights)).eval()
    rows = list(range(len(caps)))
    P = len(caps) * len(imgs)

    paths = {"command, defaults": lambda i: run_command(common, work / f"cmd0_{i}")}
    for k, v in enumerate(args.variant):
        paths[f"command, {v}"] = lambda i, v=v, k=k: run_command(common + shlex.split(v), work / f"cmd{k + 1}_{i}")
    paths["public practice (re-implemented)"] = lambda i: public_practice_scores(eager, caps, imgs, rows,
                                                                                 args.ref_chunk, torch.device("cpu"))
    if args.public_code:
        from public_code import public_code_scores, public_model

        pub, _ = public_model(args.public_code, eager)
        paths["public code itself"] = lambda i: public_code_scores(pub, caps, imgs, rows, args.ref_chunk,
                                                                   torch.device("cpu"))
    times = {n: [] for n in paths}
    walls = {n: [] for n in paths}
    last = {}
    for i in range(args.repeats):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            out = fn(i)
            dt = time.perf_counter() - t0
            if isinstance(out, dict):  # a command: its own scoring time; the wall time with start-up
                times[name].append(out["scoring_seconds"])
                walls[name].append(out["wall_seconds"])
            else:
                times[name].append(dt)
                walls[name].append(dt)
            last[name] = out
    machine["load_average_end"] = os.getloadavg()[0]

    ref = last["public practice (re-implemented)"]
    ref_rate = P / min(times["public practice (re-implemented)"])
    report = {"machine": machine, "pairs": P, "paths": {}}
    print(f"machine: {machine_line(machine)}")
    print(f"split: {len(caps)} captions x {len(imgs)} images = {P} pairs; "
          f"{min(c.numel() for c in caps)}-{max(c.numel() for c in caps)} word pieces with [CLS]/[SEP], "
          f"{min(f.shape[0] for f, _ in imgs)}-{max(f.shape[0] for f, _ in imgs)} regions; "
          f"model {eager.config.num_hidden_layers} x {eager.config.hidden_size}")
    print("| path | pairs/s (fastest) | pairs/s (median) | x public practice | wall s (fastest, with start-up) | settings |")
    print("|---|---|---|---|---|---|")
    for name in paths:
        rate, med = P / min(times[name]), P / statistics.median(times[name])
        entry = {"pairs_per_s": rate, "pairs_per_s_median": med, "x_public_practice": rate / ref_rate,
                 "seconds": times[name], "wall_seconds": walls[name]}
        settings = ""
        if isinstance(last[name], dict):
            res = last[name]
            mat = load_score_matrix(Path(res["out_dir"]) / "scores.pt").scores.float()
            entry.update(max_abs_diff=float((mat - ref).abs().max()), r1_agreement=r1_agreement(mat, ref),
                         batch_size=res["batch_size"], bf16=res["bf16"], bf16_reason=res["bf16_reason"],
                         threads=res["threads"])
            settings = (f"batch {res['batch_size']}, {'bf16' if res['bf16'] else 'fp32'}, {res['threads']} threads; "
                        f"max abs diff {entry['max_abs_diff']:.1e}, R@1 agreement {entry['r1_agreement']:.2f}")
        elif name != "public practice (re-implemented)":
            entry.update(max_abs_diff=float((last[name] - ref).abs().max()), r1_agreement=r1_agreement(last[name], ref))
            settings = f"max abs diff {entry['max_abs_diff']:.1e}, R@1 agreement {entry['r1_agreement']:.2f}"
        report["paths"][name] = entry
        print(f"| {name} | {rate:.2f} | {med:.2f} | {rate / ref_rate:.2f}x | {min(walls[name]):.1f} | {settings} |")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
