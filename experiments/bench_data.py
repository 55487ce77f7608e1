"""Region fetch of one hard-negative mining step: 400 random images (1 + 399 candidates).

Compares the lazy HDF5 reader (one contiguous read per image), the in-memory RegionStore
read image by image, and ``RegionStore.gather`` (one padded block by index arithmetic).
Prints images/s. The file is freshly written, so the lazy reader runs from the OS page
cache (the best case for it; a cold disk is slower).

    python experiments/bench_data.py [--images 2000] [--dim 2048] [--trials 5]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cacr.data.datasets import LazyRegions, RegionCaps, RegionStore
from cacr.data.formats import RegionsWriter


def make_file(path: Path, n: int, dim: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    rows = 0
    with RegionsWriter(path, feature_dim=dim, feature_source="benchmark: random", with_conf=True) as w:
        for i in range(n):
            m = int(rng.integers(10, 61))  # Flickr30k after the caps: 10..100, mostly 10..50
            xy = rng.uniform(0, 0.5, (m, 2))
            b = np.concatenate([xy, xy + rng.uniform(0.01, 0.5, (m, 2))], 1)
            w.add(f"img_{i}", rng.standard_normal((m, dim)).astype(np.float16), b,
                  np.sort(rng.uniform(0.2, 1, m))[::-1])
            rows += m
    return rows


def rate(fn, trials: int, k: int, rng) -> float:
    times = []
    for _ in range(trials):
        idx = torch.from_numpy(rng.choice(N, k, replace=False))
        t = time.perf_counter()
        fn(idx)
        times.append(time.perf_counter() - t)
    return k / float(np.median(times))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--per-step", type=int, default=400)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    N = args.images
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "regions.h5"
        t = time.perf_counter()
        rows = make_file(p, N, args.dim)
        write_s = time.perf_counter() - t
        size_mb = p.stat().st_size / 2 ** 20
        caps = RegionCaps()
        lazy = LazyRegions(p, caps)
        t = time.perf_counter()
        store = RegionStore.from_file(p, caps)
        load_s = time.perf_counter() - t

        def lazy_fetch(idx):
            return [lazy.get(int(i)) for i in idx]

        def store_loop(idx):
            return [store.get(int(i)) for i in idx]

        def store_gather(idx):
            return store.gather(idx)

        lazy_fetch(torch.arange(10))  # open the handle
        res = {name: rate(fn, args.trials, args.per_step, rng)
               for name, fn in (("lazy HDF5, image by image", lazy_fetch),
                                ("RegionStore.get, image by image", store_loop),
                                ("RegionStore.gather, padded block", store_gather))}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")
    print(f"file: {N} images, {rows} regions, dim {args.dim} fp16, {size_mb:.0f} MiB; "
          f"written in {write_s:.1f} s, loaded into a RegionStore in {load_s:.2f} s")
    print(f"fetch of {args.per_step} random images (median of {args.trials}):")
    for name, r in res.items():
        print(f"  {name:36s} {r:12,.0f} images/s  ({args.per_step / r * 1e3:8.2f} ms per step)")
