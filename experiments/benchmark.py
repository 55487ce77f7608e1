"""Speed and memory of UNITER-base retrieval evaluation and hard-negative training, each
against a plain reference kept in this file, on whatever device it runs; prints a table and
writes JSON.

Inputs follow a Flickr-like length mix: captions of 8..40 word pieces (plus [CLS]/[SEP]),
images of 10..100 regions of 2048-d features (fp16, as the official feature databases),
both uniform. Weights are random (speed does not depend on them).

1. Device rate: the dense matmul rate the device reaches here (bf16 on a GPU, fp32 on a
   CPU, which is also timed in bf16 to show why it is not used there). Every utilisation
   below is achieved model FLOP/s over this measured rate.
2. Evaluation: ``cacr.evaluation.score_pairs`` (pairs sorted by joint length, batches cut
   from a PairStore on the device, compact layout, fused attention; bf16 autocast where
   ``--bf16 auto`` resolves to it: CUDA, or a CPU with AVX-512 BF16 / AMX) against the public
   code's own practice (its ``ItmEvalDataset``): images sorted by region count once, each
   caption against consecutive chunks of them, each chunk padded to its largest image,
   explicit attention, fp32. Useful FLOPs are counted on the real lengths, so padding is
   waste. Also the largest score difference and the R@1 agreement (same best image per caption).
3. Training: one hard-negative step (mining ``2 B K`` candidates without gradient in eval
   mode, training on ``B + 2Bk`` pairs with backward, the regularizer on the positives,
   grad clip, AdamW) through ``RetrievalModule.compute_losses``, against the reference
   step (padded layout, explicit attention, fp32, the regularizer one example at a time).
   The regularizer's share is its own forward+backward time over the step time.

Every path is timed ``--repeats`` times (default 3) round-robin with the others, after one
warm-up call each; the table shows the fastest repeat and the median. The header names the
machine: CPU model, the flags that decide bf16 (AVX2, AVX-512, AVX-512 BF16, AMX), threads,
GPU, and the load average at start and end (figures taken under load are not comparable).
The public code's batching is re-implemented here from its description (docs/performance.md);
``--public-code PATH`` also times the public code itself, imported from a local checkout
(``experiments/public_code.py``), on the same weights, inputs and batching.

Run: ``python experiments/benchmark.py [--device cuda] [--json out.json]``; the CPU
defaults are small (UNITER-base scores ~10 pairs/s on 2 cores).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository, for `cacr`
from bench_regularizers import LOSSES, loop_loss  # noqa: E402

from cacr.evaluation import score_pairs  # noqa: E402
from cacr.evaluation.inputs import scoring_batch_size  # noqa: E402
from cacr.model import PairExample, PairStore, UniterConfig, UniterForImageTextRetrieval, collate  # noqa: E402
from cacr.module import RetrievalModule, ranking_loss  # noqa: E402
from cacr.precision import cpu_flags, resolve_bf16  # noqa: E402
from cacr.regularizers import Regularizer  # noqa: E402

CLS, SEP = 101, 102
MIN_WORDS, MAX_WORDS, MIN_REGIONS, MAX_REGIONS, IMG_DIM = 8, 40, 10, 100, 2048


# ---------------------------------------------------------------------------------------- helpers
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def flickr_like(n_cap: int, n_img: int, gen: torch.Generator):
    """Random captions ``[CLS] w.. [SEP]`` and images ``(fp16 features, 4-d boxes)`` of the length mix."""
    caps = []
    for t in torch.randint(MIN_WORDS, MAX_WORDS + 1, (n_cap,), generator=gen).tolist():
        caps.append(torch.cat([torch.tensor([CLS]), torch.randint(1000, 28000, (t,), generator=gen),
                               torch.tensor([SEP])]))
    imgs = []
    for m in torch.randint(MIN_REGIONS, MAX_REGIONS + 1, (n_img,), generator=gen).tolist():
        xy = torch.rand(m, 2, generator=gen) * 0.7
        wh = torch.rand(m, 2, generator=gen) * 0.3 + 0.01
        feat = torch.rand(m, IMG_DIM, generator=gen).to(torch.float16)
        imgs.append((feat, torch.cat([xy, xy + wh], dim=1)))
    return caps, imgs


def pair_flops(cfg: UniterConfig, t, m):
    """Forward FLOPs of one pair (t text tokens incl. [CLS]/[SEP], m regions): the matmuls of
    the region embedding and of every layer (QKV + output projection, FFN, QK^T and PV)."""
    H, F_, D = cfg.hidden_size, cfg.intermediate_size, cfg.img_dim
    L = t + m
    per_layer = 8 * L * H * H + 4 * L * H * F_ + 4 * L * L * H
    return 2 * m * D * H + 2 * m * 7 * H + cfg.num_hidden_layers * per_layer


def matmul_rate(device, dtype, n=None, reps=10):
    """Achieved FLOP/s of a square matmul of size n (8192 on a GPU, 2048 on a CPU)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(2):
        a @ b
    reps = reps if device.type == "cuda" else max(2, reps // 4)
    dt, _ = timed(lambda: [a @ b for _ in range(reps)], device)
    return 2 * n**3 * reps / dt


def int8_linear_rate(tokens=4096, d_in=768, d_out=3072, reps=5):
    """CPU: FLOP/s of a UNITER-base FFN-sized Linear under dynamic int8 quantisation
    (``torch.ao.quantization.quantize_dynamic``) and in fp32, on the same input."""
    import warnings

    lin = torch.nn.Linear(d_in, d_out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
    x = torch.randn(tokens, d_in)
    flops = 2 * tokens * d_in * d_out * reps
    out = {}
    with torch.inference_mode():
        for name, f in (("fp32_linear", lin), ("int8_dynamic_linear", q)):
            f(x)
            dt, _ = timed(lambda: [f(x) for _ in range(reps)], torch.device("cpu"))
            out[f"{name}_flop_per_s"] = flops / dt
        out["int8_dynamic_max_abs_error"] = float((q(x) - lin(x)).abs().max())
    return out


# ---------------------------------------------------------------------------------------- timing
def interleaved(paths: dict, device, repeats: int) -> dict:
    """Time every path ``repeats`` times, round-robin (A B C A B C ...), so that a change of
    machine load hits every path alike; one untimed warm-up call each first.
    Returns ``{name: {"times": [...], "min": s, "median": s, "out": last result}}`` (or an error)."""
    res = {}
    for name, fn in paths.items():
        try:
            t_warm, out = timed(fn, device)
            res[name] = {"times": [], "warmup_seconds": t_warm, "out": out}
        except Exception as e:  # noqa: BLE001 - a failing optional variant is reported, not fatal
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    live = [n for n in paths if "error" not in res[n]]
    for _ in range(repeats):
        for name in live:
            reset_peak(device)
            dt, out = timed(paths[name], device)
            res[name]["times"].append(dt)
            res[name]["out"] = out
            res[name]["peak_gib"] = peak_gib(device)
    for name in live:
        res[name]["min"] = min(res[name]["times"])
        res[name]["median"] = statistics.median(res[name]["times"])
    return res


# ---------------------------------------------------------------------------------------- evaluation
def public_practice_scores(model, caps, imgs, cap_rows, chunk, device):
    """The public UNITER evaluation's own batching (its ``ItmEvalDataset``): all images sorted
    by region count once, then each caption against consecutive chunks of ``chunk`` images,
    each chunk padded to its largest image (one caption: no text padding), explicit
    attention (the model passed is in eager mode), fp32, under no_grad. Returns
    ``(len(cap_rows), n_img)`` scores in the original image order."""
    n_img = len(imgs)
    by_regions = sorted(range(n_img), key=lambda i: imgs[i][0].shape[0])
    out = torch.empty(len(cap_rows), n_img)
    with torch.no_grad():
        for r, c in enumerate(cap_rows):
            for s in range(0, n_img, chunk):
                ids = by_regions[s:s + chunk]
                batch = collate([PairExample(caps[c], imgs[i][0].float(), imgs[i][1]) for i in ids],
                                layout="padded", img_dim=IMG_DIM).to(device)
                out[r, ids] = model.score(batch).float().cpu()
    return out


def r1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of rows (captions) whose best column (image) is the same in both score matrices."""
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def bench_eval(model, device, n_cap, n_img, ref_cap, batch_size, ref_chunk, gen, repeats, bf16_cpu=False,
               compile_=False, batch_sweep=(), public_code=None):
    """Project paths and the public code's practice on the same captions and images, interleaved."""
    cfg = model.config
    caps, imgs = flickr_like(n_cap, n_img, gen)
    t_len = torch.tensor([c.numel() for c in caps])
    m_len = torch.tensor([f.shape[0] for f, _ in imgs])
    pairs = torch.stack(torch.meshgrid(torch.arange(n_cap), torch.arange(n_img), indexing="ij"), -1).view(-1, 2)
    flops = pair_flops(cfg, t_len[pairs[:, 0]].double(), m_len[pairs[:, 1]].double()).sum().item()
    ref_pairs = pairs[: ref_cap * n_img]
    ref_flops = pair_flops(cfg, t_len[ref_pairs[:, 0]].double(), m_len[ref_pairs[:, 1]].double()).sum().item()
    gpu = device.type == "cuda"
    fast = model.eval()
    fast.set_attn_impl("sdpa")
    res = {"pairs": len(pairs), "captions": n_cap, "images": n_img, "flops_per_pair": flops / len(pairs),
           "batch_size": batch_size, "reference_captions": ref_cap, "reference_chunk": ref_chunk, "repeats": repeats}

    def project(bf16, fn=fast.score, bs=batch_size):
        return lambda: score_pairs(fn, pairs, caps, imgs, batch_size=bs, device=device, bf16=bf16).view(n_cap, n_img)

    paths = {"project_fp32": project(False)}
    if gpu or bf16_cpu:
        paths["project_bf16"] = project(True)
    if compile_:
        compiled = fast.scorer(compile=True)
        paths["project_bf16_compiled" if gpu else "project_fp32_compiled"] = project(gpu, compiled)
    for bs in batch_sweep:
        paths[f"project_fp32_batch{bs}"] = project(False, bs=bs)
    ref = copy.deepcopy(model).eval()
    ref.set_attn_impl("eager")
    paths["public_practice"] = lambda: public_practice_scores(ref, caps, imgs, range(ref_cap), ref_chunk, device)
    if public_code is not None:  # the public code itself, imported from the checkout given by path
        from public_code import public_code_scores, public_model

        pub, res["public_code_layer_norm"] = public_model(public_code, model)
        res["public_code_path"] = str(public_code)
        paths["public_code"] = lambda: public_code_scores(pub, caps, imgs, range(ref_cap), ref_chunk, device)

    timings = interleaved(paths, device, repeats)
    scores = {}
    for name, t in timings.items():
        if "error" in t:
            res[name] = {"error": t["error"]}
            continue
        scores[name] = t.pop("out")
        n, fl = (len(ref_pairs), ref_flops) if name.startswith("public_") else (len(pairs), flops)
        res[name] = {**t, "pairs": n, "pairs_per_s": n / t["min"], "pairs_per_s_median": n / t["median"],
                     "flop_per_s": fl / t["min"]}
    s_ref = scores["public_practice"]
    fp32 = scores["project_fp32"][:ref_cap]
    res["fidelity"] = {"fp32_vs_public_practice_max_abs": float((fp32 - s_ref).abs().max()),
                       "score_std": float(s_ref.std())}
    if "public_code" in scores:
        res["fidelity"]["public_code_vs_public_practice_max_abs"] = float((scores["public_code"] - s_ref).abs().max())
        res["fidelity"]["fp32_vs_public_code_max_abs"] = float((fp32 - scores["public_code"]).abs().max())
    if "project_bf16_compiled" in scores:
        res["fidelity"]["compiled_vs_eager_bf16_max_abs"] = float((scores["project_bf16_compiled"] -
                                                                  scores["project_bf16"]).abs().max())
    if "project_bf16" in scores:
        b, f = scores["project_bf16"], scores["project_fp32"]
        res["fidelity"].update(bf16_vs_fp32_max_abs=float((b - f).abs().max()), bf16_vs_fp32_r1_agreement=r1_agreement(b, f),
                               fp32_score_std=float(f.std()))
    return res


# ---------------------------------------------------------------------------------------- training
def training_inputs(n_items, B, K, gen, t_len, m_len):
    """B positives (caption c with image c) and K random candidate negatives per direction, with
    the widths the training data module gives a step (``cacr.train_data.TrainBatches``): the
    longest caption and the largest image the step names."""
    cap = torch.randperm(n_items, generator=gen)[:B]
    neg = torch.randint(0, n_items - 1, (2, B, K), generator=gen)
    neg = neg + (neg >= cap[None, :, None]).long()  # never the positive itself
    return {"cap_idx": cap, "img_idx": cap.clone(), "neg_img": neg[0], "neg_cap": neg[1],
            "max_txt_len": t_len[torch.cat([cap, neg[1].flatten()])].max(),
            "max_regions": m_len[torch.cat([cap, neg[0].flatten()])].max()}


def make_optimizer(model, lr=5e-5):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)


def project_step(module, opt, batch, device, bf16):
    """What Lightning does with a training batch: host-side preparation (mining plan), the move
    to the device, the losses under autocast, backward, clip, AdamW."""
    batch = module.prepare_batch(batch, module.stores["train"])
    batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    opt.zero_grad(set_to_none=True)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else torch.autocast(device.type, enabled=False)
    with ctx:
        losses = module.compute_losses(batch, step=100, total_steps=1000)
    losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_(module.model.parameters(), 2.0)
    opt.step()
    return losses


def reference_step(model, opt, store, batch, k, reg_name, mining_chunk):
    """The public code's step: padded batches (each padded to its longest item, lengths read on
    the host), explicit attention, fp32, the regularizer one example at a time."""
    cap, img, neg_img, neg_cap = batch["cap_idx"], batch["img_idx"], batch["neg_img"], batch["neg_cap"]
    B, K = neg_img.shape
    caps, imgs = RetrievalModule.mining_pairs(batch)  # (2BK,), the same candidates as the project
    model.eval()
    with torch.no_grad():
        sc = torch.cat([model.score(store.batch(caps[s:s + mining_chunk], imgs[s:s + mining_chunk]))
                        for s in range(0, len(caps), mining_chunk)]).view(2, B, K)
    top = sc.topk(k, dim=-1).indices.cpu()
    hard_img, hard_cap = neg_img.gather(1, top[0]), neg_cap.gather(1, top[1])
    model.train()
    opt.zero_grad(set_to_none=True)
    pairs = store.batch(torch.cat([cap, cap.repeat_interleave(k), hard_cap.flatten()]),
                        torch.cat([img, hard_img.flatten(), img.repeat_interleave(k)]))
    out = model(pairs, score_rows=torch.arange(B, device=pairs.input_ids.device) if reg_name != "none" else None)
    loss = ranking_loss(out.rank_logits[:B], out.rank_logits[B:].view(2, B, k).transpose(0, 1), 0.2)
    if reg_name != "none":
        loss = loss + loop_loss(LOSSES[reg_name], out.last_scores, pairs.word_index[:B], pairs.word_mask[:B],
                                pairs.region_index[:B], pairs.region_mask[:B])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
    opt.step()
    return loss


def regularizer_time(model, store, batch, reg_name, device, reps):
    """The regularizer's own forward+backward on the positives: last-layer scores recomputed
    from Q and K (as the model does for ``score_rows``), relation blocks, loss."""
    B = batch["cap_idx"].shape[0]
    pairs = store.batch(batch["cap_idx"].to(device), batch["img_idx"].to(device),
                        max_txt_len=MAX_WORDS + 2, max_regions=MAX_REGIONS)
    cfg = model.config
    h, d = cfg.num_attention_heads, cfg.head_dim
    L = pairs.attn_mask.shape[1]
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, h, L, d, device=device, generator=gen, requires_grad=True)
    k = torch.randn(B, h, L, d, device=device, generator=gen, requires_grad=True)
    reg = Regularizer(reg_name)
    idx = (pairs.word_index, pairs.word_mask, pairs.region_index, pairs.region_mask)

    def one():
        q.grad = k.grad = None
        s = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, h, L, L)
        reg(*reg.blocks(s, *idx)).loss.backward()

    one()
    times = [timed(one, device)[0] for _ in range(reps)]
    return statistics.median(times)


def bench_train(model, device, n_items, B, K, k, reps, mining_batch, gen, bf16, compile_=False, train_chunk=None):
    """Project training steps (CACR, none, optionally compiled mining) and the reference step,
    interleaved one step each per round; bf16 autocast for the project paths if ``bf16``."""
    cfg = model.config
    gpu = device.type == "cuda"
    caps, imgs = flickr_like(n_items, n_items, gen)
    t_len = torch.tensor([c.numel() for c in caps])
    m_len = torch.tensor([f.shape[0] for f, _ in imgs])
    store = PairStore.from_examples(caps, imgs, feat_dtype=torch.float16 if gpu else torch.float32).to(device)
    batches = [training_inputs(n_items, B, K, gen, t_len, m_len) for _ in range(reps + 1)]

    def step_flops(b):
        """Mining forward FLOPs + 3x the forward FLOPs of the trained pairs (forward + backward)."""
        cap, img, ni, nc = b["cap_idx"], b["img_idx"], b["neg_img"], b["neg_cap"]
        mine = pair_flops(cfg, t_len[cap].repeat_interleave(K).double(), m_len[ni.flatten()].double()).sum()
        mine += pair_flops(cfg, t_len[nc.flatten()].double(), m_len[img].repeat_interleave(K).double()).sum()
        # the trained negatives are the mined ones: count them at the candidates' mean cost
        pos = pair_flops(cfg, t_len[cap].double(), m_len[img].double()).sum()
        per_neg = mine / (2 * B * K)
        return float(mine + 3 * (pos + 2 * B * k * per_neg))

    res = {"positives": B, "candidates": K, "hard_negatives": k, "repeats": reps, "bf16": bf16,
           "pairs_per_step": B + 2 * B * k + 2 * B * K}
    model.set_attn_impl("sdpa")
    ref = copy.deepcopy(model).float()
    ref.set_attn_impl("eager")
    ref_store = PairStore.from_flat(store.input_ids, store.txt_lens_cpu, store.region_feat[:-1].float(),
                                    store.region_pos_feat[:-1], store.num_bbs_cpu, layout="padded")
    ref_opt = make_optimizer(ref)
    paths, step_no = {}, {}
    # (regularizer, compiled mining, module.train_chunk_size): "auto" is what training uses on
    # this device; 0 trains every pair in one batch padded to the step's widths
    variants = [("cacr", False, "auto"), ("none", False, "auto"), ("cacr", False, 0)]
    variants += [("cacr", True, "auto")] if compile_ else []
    variants += [("cacr", False, train_chunk)] if train_chunk else []
    for reg_name, comp, chunk in variants:
        name = (f"project_{reg_name}" + ("_compiled" if comp else "") + ("_one_batch" if chunk == 0 else "")
                + (f"_chunks_of_{chunk}" if isinstance(chunk, int) and chunk > 0 else ""))
        module = RetrievalModule(model, Regularizer(reg_name), num_negatives=k, mining=True,
                                 mining_batch_size=mining_batch, ranking="hinge", compile_scoring=comp,
                                 train_chunk_size=chunk).to(device)
        res.setdefault("train_chunk_size", module.train_chunk_size)
        if chunk == 0 and res["train_chunk_size"] == 0:
            continue  # auto is one batch here already
        module.stores["train"] = store
        opt = make_optimizer(module.model)
        step_no[name] = 0

        def step(name=name, module=module, opt=opt):  # a new batch each call: round r uses batches[r]
            b = batches[step_no[name] % len(batches)]
            step_no[name] += 1
            return project_step(module, opt, b, device, bf16)
        paths[name] = step
    step_no["reference_cacr"] = 0

    def ref_step():
        b = batches[step_no["reference_cacr"] % len(batches)]
        step_no["reference_cacr"] += 1
        return reference_step(ref, ref_opt, ref_store, b, k, "cacr", mining_batch)
    paths["reference_cacr"] = ref_step

    timings = interleaved(paths, device, reps)
    fl = statistics.mean(step_flops(b) for b in batches)
    for name, t in timings.items():
        if "error" in t:
            res[name] = {"error": t["error"]}
            continue
        t.pop("out")
        res[name] = {**t, "seconds_per_step": t["min"], "seconds_per_step_median": t["median"],
                     "positives_per_s": B / t["min"], "pairs_per_s": res["pairs_per_step"] / t["min"],
                     "flop_per_s": fl / t["min"]}
    res["regularizer_seconds"] = {name: regularizer_time(model, store, batches[0], name, device, 10)
                                  for name in ("cacr", "iais_singular", "iais_distributed")}
    res["regularizer_share"] = {name: t / res["project_cacr"]["seconds_per_step"]
                                for name, t in res["regularizer_seconds"].items()}
    return res


# ---------------------------------------------------------------------------------------- report
def describe_machine(device):
    """Device, the CPU flags that decide bf16 (AVX2 / AVX-512 / AVX-512 BF16 / AMX), threads, load."""
    flags = cpu_flags()
    cpu = {"model": cpu_model(), "threads": torch.get_num_threads(), "cores": os.cpu_count(),
           "flags": {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}}
    out = {"cpu": cpu, "torch": torch.__version__, "load_average_start": os.getloadavg()[0]}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(m) -> str:
    c = m["cpu"]
    has = [f for f, v in c["flags"].items() if v] or ["none of avx2/avx512f/avx512_bf16/amx_bf16"]
    gpu = f"{m['gpu']}; " if "gpu" in m else ""
    return (f"{gpu}{c['model']}, {c['cores']} cores, {c['threads']} threads, flags: {' '.join(has)}; torch {m['torch']}; "
            f"load average {m['load_average_start']:.1f} at start, {m.get('load_average_end', float('nan')):.1f} at end")


def report(r):
    rate = r["device_rate"]
    peak = rate["model_dtype_flop_per_s"]
    lines = [f"machine: {machine_line(r['machine'])}",
             "matmul rate: " + ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in rate.items()
                                         if k.endswith("_flop_per_s") and k != "model_dtype_flop_per_s"),
             f"utilisation below = achieved model FLOP/s / {rate['model_dtype']} matmul rate ({peak / 1e12:.3g} TFLOP/s); "
             "pairs/s from the fastest of the interleaved repeats, median in brackets"]
    if "cpu_int8" in r:
        q = r["cpu_int8"]
        lines.append(f"Linear 768->3072 on 4096 tokens: fp32 {q['fp32_linear_flop_per_s'] / 1e9:.1f} GFLOP/s, dynamic int8 "
                     f"{q['int8_dynamic_linear_flop_per_s'] / 1e9:.1f} GFLOP/s (max abs error {q['int8_dynamic_max_abs_error']:.3g})")
    if "eval" in r:
        e = r["eval"]
        lines += ["", f"Evaluation, UNITER-{r['layers']}L, {e['captions']} captions x {e['images']} images "
                      f"({e['flops_per_pair'] / 1e9:.1f} GFLOP per pair on average), project batch {e['batch_size']}; "
                      f"public practice: {e['reference_captions']} caption(s), images sorted by region count in chunks "
                      f"of {e['reference_chunk']}; {e['repeats']} interleaved repeats",
                  f"{'path':<30}{'pairs/s':>10}{'(median)':>10}{'util':>8}{'peak GiB':>10}{'x public':>9}"]
        base = e["public_practice"]["pairs_per_s"]
        for name, x in e.items():
            if not isinstance(x, dict) or name == "fidelity":
                continue
            if "error" in x:
                lines.append(f"{name:<30}failed: {x['error']}")
                continue
            mem = "-" if x.get("peak_gib") is None else f"{x['peak_gib']:.2f}"
            lines.append(f"{name:<30}{x['pairs_per_s']:>10.1f}{x['pairs_per_s_median']:>10.1f}"
                         f"{100 * x['flop_per_s'] / peak:>7.1f}%{mem:>10}{x['pairs_per_s'] / base:>8.2f}x")
        if "public_code_path" in e:
            lines.append(f"public_code: the checkout at {e['public_code_path']}, imported as it is "
                         f"(LayerNorm: {e['public_code_layer_norm']}), the same weights and batching as public_practice")
        best = max(x["pairs_per_s"] for k, x in e.items() if k.startswith("project_") and "pairs_per_s" in x)
        lines.append(f"full Flickr30k test ranking (5000 x 1000 pairs) at the best project rate: {5e6 / best / 60:.1f} min")
        lines.append("fidelity: " + ", ".join(f"{k} {v:.3g}" for k, v in e["fidelity"].items()))
    if "train" in r:
        t = r["train"]
        lines += ["", f"Training step, UNITER-{r['layers']}L: {t['positives']} positives, {t['candidates']} candidates mined "
                      f"per direction, {t['hard_negatives']} hard negatives kept ({t['pairs_per_step']} pairs scored), "
                      f"project {'bf16 autocast' if t['bf16'] else 'fp32'}, trained negatives "
                      + (f"sorted by width, {t['train_chunk_size']} per forward" if t.get("train_chunk_size")
                         else "in one batch") + f" (train_chunk_size auto); {t['repeats']} interleaved rounds",
                  f"{'path':<28}{'s/step':>9}{'(median)':>10}{'pos/s':>9}{'pairs/s':>10}{'util':>8}{'peak GiB':>10}{'x ref':>8}"]
        base = t["reference_cacr"]["seconds_per_step"]
        names = ["project_cacr", "project_cacr_compiled", "project_none", "project_cacr_one_batch"]
        names += [n for n in t if n.startswith("project_cacr_chunks_of_")] + ["reference_cacr"]
        for name in names:
            if name not in t:
                continue
            x = t[name]
            if "error" in x:
                lines.append(f"{name:<28}failed: {x['error']}")
                continue
            mem = "-" if x.get("peak_gib") is None else f"{x['peak_gib']:.2f}"
            lines.append(f"{name:<28}{x['seconds_per_step']:>9.3f}{x['seconds_per_step_median']:>10.3f}"
                         f"{x['positives_per_s']:>9.2f}{x['pairs_per_s']:>10.1f}"
                         f"{100 * x['flop_per_s'] / peak:>7.1f}%{mem:>10}{base / x['seconds_per_step']:>7.2f}x")
        lines.append("regularizer fwd+bwd: " + ", ".join(
            f"{k} {1e3 * v:.2f} ms ({100 * t['regularizer_share'][k]:.2f}% of the CACR step)"
            for k, v in t["regularizer_seconds"].items()))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--parts", default="eval,train")
    ap.add_argument("--captions", type=int, default=None, help="eval captions (default 100 GPU, 2 CPU)")
    ap.add_argument("--images", type=int, default=None, help="eval images (default 1000 GPU, 32 CPU)")
    ap.add_argument("--ref-captions", type=int, default=None, help="captions the public practice scores (default 10 GPU, 1 CPU)")
    ap.add_argument("--ref-chunk", type=int, default=None,
                    help="images per public-practice batch (the public evaluation's mini_batch_size; default 400 GPU, 16 CPU)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="project eval pairs per batch (default: the evaluators' batch_size: auto for the device "
                         "and model width, cacr.evaluation.inputs.scoring_batch_size)")
    ap.add_argument("--batch-sweep", default="", help="also time the project fp32 path at these batch sizes, e.g. 8,16,64,512")
    ap.add_argument("--bf16", default="auto", choices=["auto", "true", "false"],
                    help="project bf16 paths (auto: CUDA, or a CPU with AVX-512 BF16 / AMX; cacr.precision.resolve_bf16)")
    ap.add_argument("--positives", type=int, default=None, help="training positives per step (default 4 GPU, 1 CPU)")
    ap.add_argument("--candidates", type=int, default=None, help="mined candidates per direction (default 399 GPU, 7 CPU)")
    ap.add_argument("--hard", type=int, default=None, help="hard negatives kept (default 31 GPU, 3 CPU)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timed repeats of every path (at least 3)")
    ap.add_argument("--layers", type=int, default=12, help="encoder layers (12 = UNITER-base; fewer for a quick check)")
    ap.add_argument("--train-chunk", type=int, default=None,
                    help="also time the CACR step with module.train_chunk_size at this value (auto is 0, one batch, "
                         "on a GPU)")
    ap.add_argument("--compile", action="store_true",
                    help="also time evaluation and training with torch.compile'd scoring (model.scorer(compile=True))")
    ap.add_argument("--public-code", default=None, metavar="PATH",
                    help="also time the public UNITER code itself, imported from a local checkout at PATH (its "
                         "model/ directory; nothing is downloaded), on the same weights, inputs and batching as "
                         "public_practice; apex is replaced by torch.nn.LayerNorm when absent (experiments/public_code.py)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    pick = lambda v, g, c: v if v is not None else (g if gpu else c)  # noqa: E731
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    bf16, why = resolve_bf16(args.bf16, device)

    r = {"machine": describe_machine(device), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "layers": args.layers, "bf16": bf16, "bf16_reason": why}
    rate = {"model_dtype": "bf16" if bf16 else "fp32"}
    rate["fp32_flop_per_s"] = matmul_rate(device, torch.float32)
    rate["bf16_flop_per_s"] = matmul_rate(device, torch.bfloat16, n=None if (gpu or bf16) else 512)
    rate["model_dtype_flop_per_s"] = rate["bf16_flop_per_s" if bf16 else "fp32_flop_per_s"]
    r["device_rate"] = rate
    if not gpu:
        r["cpu_int8"] = int8_linear_rate()
    model = UniterForImageTextRetrieval(UniterConfig(num_hidden_layers=args.layers, img_dim=IMG_DIM)).to(device)
    parts = {p.strip() for p in args.parts.split(",")}
    if "eval" in parts:
        r["eval"] = bench_eval(model, device, pick(args.captions, 100, 2), pick(args.images, 1000, 32),
                               pick(args.ref_captions, 10, 1), args.batch_size or scoring_batch_size("auto", device, model),
                               pick(args.ref_chunk, 400, 16), gen, max(1, args.repeats), bf16_cpu=bf16,
                               compile_=args.compile,
                               batch_sweep=[int(b) for b in args.batch_sweep.split(",") if b.strip()],
                               public_code=args.public_code)
    if "train" in parts:
        r["train"] = bench_train(model, device, 2000 if gpu else 64, pick(args.positives, 4, 1),
                                 pick(args.candidates, 399, 7), pick(args.hard, 31, 3), max(1, args.repeats),
                                 1024 if gpu else 32, gen, bf16, compile_=args.compile,
                                 train_chunk=args.train_chunk)
    r["machine"]["load_average_end"] = os.getloadavg()[0]
    text = report(r)
    print(text)
    if args.json:
        from cacr.outputs import atomic_write_text

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
