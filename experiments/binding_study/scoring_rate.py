"""How close the study's scoring runs to this machine's limit (LOG.md "How long it takes").

Most of a fine-tuning job's time is full cross-encoder forward passes: the mining pool during
training, then 50,000 retrieval and 8000 Winoground-format pairs at the end. This script
scores captions of the synthetic test split against all of its images with the study's model
shape (``uniter_tiny`` at 4 layers; random weights unless ``--ckpt`` names a study checkpoint:
speed does not depend on them) through ``cacr.evaluation.score_matrix``, the path the final
evaluation takes, and prints:

- the machine (CPU model, the flags that decide bf16, threads, load);
- the mean positions per pair and the forward FLOPs per pair (``benchmark.pair_flops``);
- the dense fp32 matmul rate at the FFN's shape (the largest batch's tokens x hidden x intermediate),
  the ceiling for this work on this machine;
- pairs/s and achieved GFLOP/s at each ``--batch-sizes``, timed ``--repeats`` times round-robin
  after a warm-up (fastest and median).

    python experiments/binding_study/scoring_rate.py [--threads 1] [--captions 50] [--ckpt PATH] [--json F]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

from cacr.outputs import atomic_write_text  # noqa: E402
from benchmark import describe_machine, machine_line, pair_flops  # noqa: E402
from cacr.evaluation.engine import score_matrix  # noqa: E402


def load_model(ckpt, layers: int, data_overrides):
    """The evaluators' model of a run's ``.ckpt``, or ``uniter_tiny`` at ``layers`` with random weights."""
    from omegaconf import OmegaConf

    from cacr.model import build_uniter

    if ckpt:
        from cacr.evaluation.inputs import build_model

        return build_model(OmegaConf.create({"ckpt_path": str(ckpt)}), torch.device("cpu"))[0]
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("train", overrides=["model=uniter_tiny", f"model.config.num_hidden_layers={layers}",
                                          *data_overrides])
    torch.manual_seed(0)
    return build_uniter(OmegaConf.to_container(cfg.model.config, resolve=True)).eval()


def fp32_ffn_rate(tokens: int, hidden: int, inter: int, rounds: int = 3, seconds: float = 0.5) -> float:
    """FLOP/s of ``(tokens, hidden) @ (hidden, inter)`` in fp32: the best of ``rounds`` rounds of
    about ``seconds`` each, after a warm-up."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(tokens, hidden, generator=gen), torch.randn(hidden, inter, generator=gen)
    t = time.perf_counter()
    for _ in range(3):
        a @ b
    reps = max(3, int(seconds / max((time.perf_counter() - t) / 3, 1e-6)))
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * tokens * hidden * inter * reps / best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default=None, help="a study .ckpt (default: random weights, same shape)")
    ap.add_argument("--layers", type=int, default=4, help="depth when no --ckpt (the study's: 4)")
    ap.add_argument("--captions", type=int, default=50, help="captions of the test split, each against every image")
    ap.add_argument("--batch-sizes", default="64,256", help="pairs per forward, comma-separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the study runs one per job)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--override", nargs="*", default=[], help="data config overrides, e.g. data.root=DIR")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from hydra import compose, initialize_config_dir

    from cacr.data.sources import open_data

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        dcfg = compose("retrieval", overrides=args.override).data
    split = open_data(dcfg).split("test")
    model = load_model(args.ckpt, args.layers, args.override)
    cfg = model.config
    caps = list(split.texts[: args.captions])
    n_img = split.num_images
    t_mean = sum(c.numel() for c in caps) / len(caps)
    m_mean = sum(split.image(i)[0].shape[0] for i in range(n_img)) / n_img
    flops = sum(pair_flops(cfg, c.numel(), split.image(i)[0].shape[0]) for c in caps for i in range(n_img))
    P = len(caps) * n_img
    machine = describe_machine(torch.device("cpu"))
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    ceiling = fp32_ffn_rate(max(sizes) * round(t_mean + m_mean), cfg.hidden_size, cfg.intermediate_size)

    fn = lambda batch: model.score(batch, head="rank")  # noqa: E731
    runs = {bs: [] for bs in sizes}
    for bs in sizes:  # warm-up
        score_matrix(fn, caps[:2], split.image, num_captions=2, num_images=n_img, batch_size=bs)
    for _ in range(args.repeats):
        for bs in sizes:
            t = time.perf_counter()
            score_matrix(fn, caps, split.image, num_captions=len(caps), num_images=n_img, batch_size=bs)
            runs[bs].append(time.perf_counter() - t)
    machine["load_average_end"] = os.getloadavg()[0]

    print(f"machine: {machine_line(machine)}")
    print(f"model: {cfg.num_hidden_layers} layers x {cfg.hidden_size}, {'checkpoint ' + args.ckpt if args.ckpt else 'random weights'}")
    print(f"pairs: {len(caps)} captions x {n_img} images = {P}; mean {t_mean:.1f} word pieces + {m_mean:.1f} regions; "
          f"{flops / P / 1e6:.1f} MFLOP per pair")
    print(f"dense fp32 matmul at the FFN's shape: {ceiling / 1e9:.1f} GFLOP/s")
    print("| pairs per forward | pairs/s (fastest) | pairs/s (median) | GFLOP/s (fastest) | of the matmul rate |")
    print("|---|---|---|---|---|")
    out = {"machine": machine, "pairs": P, "mflop_per_pair": flops / P / 1e6, "matmul_gflops": ceiling / 1e9, "batch": {}}
    for bs in sizes:
        fast, med = min(runs[bs]), statistics.median(runs[bs])
        rate = flops / fast
        out["batch"][bs] = {"seconds": runs[bs], "pairs_per_s": P / fast, "pairs_per_s_median": P / med,
                            "gflops": rate / 1e9, "share_of_matmul": rate / ceiling}
        print(f"| {bs} | {P / fast:.0f} | {P / med:.0f} | {rate / 1e9:.1f} | {100 * rate / ceiling:.0f}% |")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
