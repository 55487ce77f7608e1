"""Benchmark of the relation-alignment regularizers (cacr/regularizers.py); prints tables.

1. Overhead: the regularizer's forward+backward (score recomputation for the positive
   rows, relation_blocks, loss) against one UNITER-base training step (model forward +
   backward, no optimizer) on a batch of ``--pairs`` pairs holding the 8 positives; all
   pairs have 20 words ([CLS]/[SEP] added) and 36 regions. The official step is 8
   positives x 32 pairs = 256 pairs; on a CPU that takes minutes, so by default a CPU
   measures 8 pairs (the positives alone: a step several times shorter than the official
   one, so the percentage is an upper bound). Step time: median of ``--step-reps`` runs
   after one warm-up; regularizer time: min and median of 20 runs.
2. Batched vs per-example loop: blocks + loss forward+backward from the last layer's
   scores ``(P, 12, L, L)`` for P positives with ragged lengths (8..20 words, 10..36
   regions). The loop does what the public code does: one example at a time, lengths
   read on the host, blocks sliced without padding.

Run: ``python experiments/bench_regularizers.py [--device cuda] [--pairs 256]``.
"""
from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch

from cacr.model import PairExample, UniterConfig, UniterForImageTextRetrieval, collate
from cacr.regularizers import Regularizer, cacr_loss, iais_loss, relation_blocks

WORDS, REGIONS, POSITIVES = 20, 36, 8
LOSSES = {
    "cacr": lambda *b: cacr_loss(*b),
    "iais_singular": lambda *b: iais_loss(*b, variant="singular"),
    "iais_distributed": lambda *b: iais_loss(*b, variant="distributed"),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fns, device, reps, warmup=1):
    """(min, median) seconds of each function; runs are interleaved so that load from
    other processes falls on all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync(device)
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t0)
    return [(min(ts), statistics.median(ts)) for ts in times]


def uniter_batch(pairs, device, gen):
    examples = [
        PairExample(torch.randint(1000, 20000, (WORDS + 2,), generator=gen),
                    torch.randn(REGIONS, 2048, generator=gen), torch.rand(REGIONS, 7, generator=gen))
        for _ in range(pairs)
    ]
    return collate(examples).to(device)


def bench_overhead(device, pairs, reps, gen):
    model = UniterForImageTextRetrieval(UniterConfig()).to(device).train()
    batch = uniter_batch(pairs, device, gen)
    pos = torch.arange(POSITIVES, device=device)
    idx = (batch.word_index[pos], batch.word_mask[pos], batch.region_index[pos], batch.region_mask[pos])

    def step():
        model.zero_grad(set_to_none=True)
        model(batch).rank_logits.sum().backward()

    t_step = timeit([step], device, reps)[0][1]

    # The regularizer's own work, isolated: last-layer Q, K of the positives -> scores -> loss.
    H, h = model.config.hidden_size, model.config.num_attention_heads
    L = batch.attn_mask.shape[1]
    q = torch.randn(POSITIVES, h, L, H // h, device=device, requires_grad=True)
    k = torch.randn(POSITIVES, h, L, H // h, device=device, requires_grad=True)
    rows = []
    for name in LOSSES:
        reg = Regularizer(name)

        def reg_step():
            q.grad = k.grad = None
            scores = q @ k.transpose(-1, -2) / math.sqrt(H // h)  # (P, h, L, L)
            reg(*reg.blocks(scores, *idx)).loss.backward()

        rows.append((name, *timeit([reg_step], device, 20)[0]))
    return t_step, rows


def ragged_scores(P, device, gen, heads=12):
    n_t = torch.randint(8, WORDS + 1, (P,), generator=gen) + 2  # with [CLS]/[SEP]
    n_v = torch.randint(10, REGIONS + 1, (P,), generator=gen)
    L = int((n_t + n_v).max())
    n, m = int(n_t.max()) - 2, int(n_v.max())
    wm = torch.arange(n)[None] < (n_t - 2)[:, None]
    wi = torch.where(wm, 1 + torch.arange(n)[None], 0)
    rm = torch.arange(m)[None] < n_v[:, None]
    ri = torch.where(rm, n_t[:, None] + torch.arange(m)[None], 0)
    scores = torch.randn(P, heads, L, L, generator=gen)
    return [x.to(device) for x in (scores, wi, wm, ri, rm)]


def loop_loss(loss_fn, scores, wi, wm, ri, rm):
    """Per-example path: lengths on the host, unpadded blocks, one loss per example."""
    total = 0.0
    P = scores.shape[0]
    for p in range(P):
        n, m = int(wm[p].sum()), int(rm[p].sum())  # host sync, as in the public code
        one = relation_blocks(scores[p:p + 1], wi[p:p + 1, :n], wm[p:p + 1, :n], ri[p:p + 1, :m], rm[p:p + 1, :m])
        total = total + loss_fn(*one)
    return total / P


def bench_batched_vs_loop(device, sizes, reps, gen):
    rows = []
    for P in sizes:
        base, wi, wm, ri, rm = ragged_scores(P, device, gen)
        for name, fn in LOSSES.items():
            scores = base.clone().requires_grad_(True)

            def batched():
                scores.grad = None
                fn(*relation_blocks(scores, wi, wm, ri, rm)).backward()

            def looped():
                scores.grad = None
                loop_loss(fn, scores, wi, wm, ri, rm).backward()

            scores.grad = None
            a = fn(*relation_blocks(scores, wi, wm, ri, rm))
            b = loop_loss(fn, scores, wi, wm, ri, rm)
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (name, P, a.item(), b.item())
            rows.append((P, name, *timeit([batched, looped], device, reps, warmup=2)))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pairs", type=int, default=None, help="pairs in the training step (default: 8 on CPU, 256 on GPU)")
    ap.add_argument("--step-reps", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--parts", default="1,2", help="which parts to run: 1 (step overhead), 2 (batched vs loop)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = args.pairs or (POSITIVES if device.type == "cpu" else POSITIVES * 32)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"))

    parts = {p.strip() for p in args.parts.split(",")}
    if "1" in parts:
        t_step, rows = bench_overhead(device, pairs, args.step_reps, gen)
        print(f"\n1. UNITER-base training step (fwd+bwd, {pairs} pairs incl. {POSITIVES} positives, "
              f"{WORDS} words, {REGIONS} regions): {t_step * 1e3:.1f} ms")
        print(f"{'regularizer':<18}{'fwd+bwd ms (min / median)':>27}{'% of step (median)':>20}")
        for name, tmin, tmed in rows:
            print(f"{name:<18}{tmin * 1e3:>13.2f} / {tmed * 1e3:<11.2f}{100 * tmed / t_step:>19.3f}%")

    if "2" not in parts:
        return
    sizes = [1, 2, 4, 8, 16, 32]
    rows = bench_batched_vs_loop(device, sizes, args.reps, gen)
    print(f"\n2. Blocks + loss fwd+bwd from scores (P, 12, L, L), ragged 8..{WORDS} words, 10..{REGIONS} regions")
    print(f"min / median of {args.reps} runs, ms; speed-up of the minima")
    print(f"{'P':>3} {'loss':<18}{'batched':>17}{'loop':>19}{'speed-up':>10}")
    for P, name, (bmin, bmed), (lmin, lmed) in rows:
        print(f"{P:>3} {name:<18}{bmin * 1e3:>8.2f} / {bmed * 1e3:<7.2f}{lmin * 1e3:>9.2f} / {lmed * 1e3:<8.2f}"
              f"{lmin / bmin:>7.1f}x")


if __name__ == "__main__":
    main()
