"""Exact metrics at bf16 speed: score every pair in bf16, then decide in fp32 every comparison
that bf16 rounding could have changed.

A reported number (a recall, a Winoground score, a multiple-choice accuracy) rests only on
comparisons between scores: is this wrong image ahead of the true one, is ``s(c0, i0)``
above ``s(c1, i0)``. If a score is known to lie within ``u`` of its fp32 value, a comparison
of two scores whose difference exceeds the sum of their ``u`` has the sign it has in fp32.
Only the comparisons closer than that need better scores, and only those pairs are scored
again. Each pair climbs at most two levels:

0. bf16, in the evaluation's batch plan: within ``margin + fp32_margin`` of the fp32 score;
1. fp32 in a batch of re-scored pairs: within ``fp32_margin``. fp32 arithmetic is not
   associative, so a pair's fp32 score moves by a few units in its last place with the batch
   it is scored in (its size and padded width; measured: 1e-9 to 1e-6), and on a model whose
   scores are all but tied (an untrained one) that noise decides comparisons;
2. fp32 in its own batch of the evaluation's plan (``score_pairs(only=...)``): the very bits
   that fp32 scoring of the whole set computes. Exact.

In each undecided comparison the less certain side climbs a level. Both margins are
measured, not assumed: a calibration sample (a fixed-seed random sample, plus the positives
of a retrieval ranking) is scored at level 1 and a few of its plan batches at level 2; each
margin is ``MARGIN_FACTOR`` times the largest error seen. Every pair that climbs measures
its error again; one that exceeds its margin widens it to ``MARGIN_FACTOR`` times the new
largest error, and the undecided comparisons are found again, until no measurement
contradicts the margins. The metrics are then those of fp32 scoring of the whole set (the
same plan, batch size and thread count) for every pair whose errors lie within the margins;
the record says how many pairs were measured, the largest errors and the margins.

The refined scores hold fp32 values for the pairs that climbed and bf16 values elsewhere;
every metric computed from them (``retrieval_metrics`` at recalls up to ``max(ks)``,
``winoground_results``, ``correct_items``) equals the fp32 one, so a saved score file
reproduces the reported numbers.

The functions here are pure: the two re-scoring callbacks are supplied by the evaluators
(:mod:`cacr.evaluation.evaluators`), which score under DDP with one shared batch plan, so
every rank takes the same decisions and the result does not depend on the process count.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

MARGIN_FACTOR = 2.0  # each margin: this many times the largest error measured
CALIBRATION_SHARE = 0.01  # share of the pairs of a ranking sampled for calibration (plus the positives)
MIN_CALIBRATION = 256  # at least this many calibration pairs (all of them if fewer)
CALIBRATION_BATCHES = 4  # plan batches of calibration pairs scored exactly, to measure fp32_margin
CALIBRATION_SEED = 0

Rescore = Callable[[Tensor], Tensor]  # flat pair indices (n,) -> their fp32 scores in batches of their own (n,)
Replan = Callable[[Tensor], Tensor]  # flat pair indices -> (P,) fp32 scores of their plan batches, NaN elsewhere
Undecided = Callable[[Tensor, Tensor], Tensor]  # (values, uncertainty) -> flat indices of pairs to climb


def plain_record(bf16: bool) -> Dict[str, Any]:
    """The scoring record of an evaluation that kept its first scores (fp32, or plain bf16)."""
    return {"precision": "bf16" if bf16 else "fp32"}


def calibration_sample(num: int, size: int, seed: int = CALIBRATION_SEED) -> Tensor:
    """``min(num, size)`` distinct indices in ``[0, num)``, sorted; a function of its arguments."""
    if size >= num:
        return torch.arange(num)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num, generator=g)[:size].sort().values


def _max(x: Tensor) -> float:
    return float(x.max()) if x.numel() else 0.0


def refine(scores16: Tensor, rescore: Rescore, replan: Replan, calibration: Tensor, undecided: Undecided, *,
           factor: float = MARGIN_FACTOR) -> Tuple[Tensor, Dict[str, Any]]:
    """The climb described in the module docstring, on flat bf16 scores ``(P,)``.

    ``calibration``: flat indices scored at level 1 first (their first few plan batches at
    level 2); ``undecided(values, unc)``: flat indices of the pairs that must climb, given the
    current ``values`` and each pair's uncertainty ``unc`` (0 for exact pairs). Returns the
    refined values and the record for ``results.json``."""
    if scores16.dim() != 1:
        raise ValueError(f"refine: expected flat scores, got shape {tuple(scores16.shape)}")
    if factor < 1:
        raise ValueError(f"refine: the margin factor must be >= 1, got {factor}")
    values = scores16.detach().float().clone()
    bad = (~torch.isfinite(values)).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"bf16 scoring gave NaN or Inf for pair {int(bad[0])} ({bad.numel()} pairs); "
                         f"score in fp32 (bf16=false)")
    bf16 = values.clone()
    level = torch.zeros(values.shape, dtype=torch.int8)
    scale = 1.0 + float(values.abs().max())
    err16 = err32 = 0.0  # largest |bf16 - fp32| and |fp32 here - fp32 in the plan| measured

    def to_level1(idx: Tensor) -> None:
        nonlocal err16
        s32 = rescore(idx).float()
        if s32.shape != idx.shape:
            raise ValueError(f"rescore returned {tuple(s32.shape)} scores for {idx.numel()} pairs")
        err16 = max(err16, _max((s32 - bf16[idx]).abs()))
        values[idx] = s32
        level[idx] = 1

    def to_level2(idx: Tensor) -> None:
        nonlocal err16, err32
        s = replan(idx).float()
        got = (~torch.isnan(s)).nonzero().flatten()
        if s.shape != values.shape or not bool(torch.isin(idx, got).all()):
            raise ValueError("replan must return the plan batches' scores of every pair asked for")
        was1, was0 = got[level[got] == 1], got[level[got] == 0]
        err32 = max(err32, _max((s[was1] - values[was1]).abs()))
        err16 = max(err16, _max((s[was0] - bf16[was0]).abs()))  # (includes the batch part: conservative)
        values[got] = s[got]
        level[got] = 2

    calibration = torch.as_tensor(calibration, dtype=torch.long).unique()
    to_level1(calibration)
    if calibration.numel():
        to_level2(calibration[calibration_sample(calibration.numel(), CALIBRATION_BATCHES)])
    n_calibration = int((level > 0).sum())
    margin32 = max(factor * err32, 1e-7 * scale)  # margins of 0 would trust the arithmetic to the last bit
    margin = max(factor * err16, 1e-6 * scale)
    rounds = 0
    while True:
        unc = torch.where(level == 0, margin + margin32, torch.where(level == 1, margin32, 0.0))
        idx = undecided(values, unc)
        idx = idx[level[idx] < 2].unique()
        if idx.numel() == 0:
            break
        rounds += 1
        up1, up2 = idx[level[idx] == 0], idx[level[idx] == 1]
        if up1.numel():
            to_level1(up1)
        if up2.numel():
            to_level2(up2)
        if err32 > margin32:  # a measurement contradicts a margin: widen it and look again
            margin32 = factor * err32
        if err16 > margin:
            margin = factor * err16
    return values, {
        "precision": "bf16, near ties re-scored in fp32",
        "pairs": int(values.numel()),
        "calibration_pairs": n_calibration,
        "fp32_pairs": int((level > 0).sum()),
        "plan_exact_pairs": int((level == 2).sum()),
        "max_bf16_error": err16,
        "margin": margin,
        "max_fp32_batch_error": err32,
        "fp32_margin": margin32,
        "margin_factor": factor,
        "rounds": rounds,
    }


# --------------------------------------------------------------------------- retrieval


def _retrieval_undecided(txt2img: Tensor, num_images: int, max_k: int, chunk_rows: int = 512) -> Undecided:
    """Pairs whose better score could change a recall at K <= ``max_k`` (both directions).

    Image retrieval compares each caption's true image with its wrong ones; text retrieval
    each image's best true caption (known only within ``[lo, hi]``, the largest lower and
    upper bound of its captions) with its wrong captions. In an undecided comparison the
    side with the larger uncertainty climbs; a query with ``max_k`` wrong items certainly
    ahead misses at every K and needs nothing."""
    def undecided(values: Tensor, unc: Tensor) -> Tensor:
        m, u = values.view(-1, num_images), unc.view(-1, num_images)
        Nc = m.shape[0]
        rows = torch.arange(Nc)
        true, ut = m[rows, txt2img], u[rows, txt2img]  # (Nc,)
        lo = torch.full((num_images,), float("-inf")).scatter_reduce(0, txt2img, true - ut, reduce="amax")
        hi = torch.full((num_images,), float("-inf")).scatter_reduce(0, txt2img, true + ut, reduce="amax")
        cols = torch.arange(num_images)[None, :]
        ir_ahead = torch.empty(Nc, dtype=torch.long)
        tr_ahead = torch.zeros(num_images, dtype=torch.long)
        for s in range(0, Nc, chunk_rows):
            v, w = m[s:s + chunk_rows], u[s:s + chunk_rows]
            wrong = txt2img[s:s + chunk_rows, None] != cols
            t, tu = true[s:s + chunk_rows, None], ut[s:s + chunk_rows, None]
            ir_ahead[s:s + chunk_rows] = (wrong & (v - w > t + tu)).sum(1)
            tr_ahead += (wrong & (v - w > hi[None, :])).sum(0)
        ir_open, tr_open = ir_ahead < max_k, tr_ahead < max_k
        out, truths, contested = [], [], torch.zeros(num_images, dtype=torch.bool)
        for s in range(0, Nc, chunk_rows):
            v, w = m[s:s + chunk_rows], u[s:s + chunk_rows]
            wrong = txt2img[s:s + chunk_rows, None] != cols
            t, tu = true[s:s + chunk_rows, None], ut[s:s + chunk_rows, None]
            ir = wrong & ir_open[s:s + chunk_rows, None] & ((v - t).abs() <= w + tu) & (w + tu > 0)
            tr = wrong & tr_open[None, :] & (v + w >= lo[None, :]) & (v - w <= hi[None, :]) \
                & ~((w == 0) & (hi == lo)[None, :])
            climb = (ir & (w >= tu) & (w > 0)) | (tr & (2 * w >= (hi - lo)[None, :]) & (w > 0))
            r, c = climb.nonzero(as_tuple=True)
            out.append((r + s) * num_images + c)
            truth = (ir & (tu >= w)).any(1) & (tu.squeeze(1) > 0)
            truths.append(truth.nonzero().flatten() + s)
            contested |= (tr & (2 * w < (hi - lo)[None, :])).any(0)
        # text retrieval: the captions of a contested image that could be its best climb
        cand = contested[txt2img] & (true + ut >= lo[txt2img]) & (ut > 0)
        captions = torch.cat(truths + [cand.nonzero().flatten()])
        out.append(captions * num_images + txt2img[captions])
        return torch.cat(out)
    return undecided


def exact_retrieval(scores16: Tensor, txt2img, rescore: Rescore, replan: Replan, *, ks: Sequence[int] = (1, 5, 10),
                    factor: float = MARGIN_FACTOR, calibration_size: Optional[int] = None,
                    ) -> Tuple[Tensor, Dict[str, Any]]:
    """Refine a bf16 ``(Nc, Ni)`` retrieval matrix so that its recalls at ``ks`` equal fp32
    scoring's: the positives and a calibration sample are re-scored, then every pair of a
    comparison that bf16 (or fp32 batch noise) could have decided wrongly, for the queries
    that could still be a hit at some K <= ``max(ks)``. The callbacks take flat indices
    ``c * Ni + i``."""
    from .retrieval_metrics import check_txt2img

    if scores16.dim() != 2:
        raise ValueError(f"exact_retrieval: expected a (captions, images) matrix, got {tuple(scores16.shape)}")
    Nc, Ni = scores16.shape
    txt2img = check_txt2img(txt2img, Nc, Ni)
    P = Nc * Ni
    size = calibration_size if calibration_size is not None else max(MIN_CALIBRATION, math.ceil(CALIBRATION_SHARE * P))
    positives = torch.arange(Nc) * Ni + txt2img
    calibration = torch.cat([positives, calibration_sample(P, size)])
    values, record = refine(scores16.reshape(-1), rescore, replan, calibration,
                            _retrieval_undecided(txt2img, Ni, max(int(k) for k in ks)), factor=factor)
    record["ks"] = [int(k) for k in ks]
    return values.view(Nc, Ni), record


# --------------------------------------------------------------------------- groups: Winoground, multiple choice


def _group_undecided(present: Tensor, close: Callable[[Tensor, Tensor], Tensor]) -> Undecided:
    """The least certain captions of every item that ``close(values, U)`` finds within reach
    of an item uncertainty ``U`` (the largest of its pairs')."""
    N, K = present.shape

    def undecided(values: Tensor, unc: Tensor) -> Tensor:
        v = values.view(N, K).masked_fill(~present, float("nan"))
        u = unc.view(N, K).masked_fill(~present, 0.0)
        U = u.max(1).values
        open_items = (U > 0) & close(v, U)
        idx = (open_items[:, None] & present & (u == U[:, None])).nonzero(as_tuple=True)
        return idx[0] * K + idx[1]
    return undecided


def _refine_groups(scores16: Tensor, rescore: Rescore, replan: Replan, close, factor: float,
                   calibration_items: Optional[int]) -> Tuple[Tensor, Dict[str, Any]]:
    N, K = scores16.shape
    present = ~torch.isnan(scores16)
    n_cal = calibration_items if calibration_items is not None else \
        max(math.ceil(MIN_CALIBRATION / K), math.ceil(CALIBRATION_SHARE * 4 * N))
    items = calibration_sample(N, n_cal)
    calibration = (items[:, None] * K + torch.arange(K)[None, :])[present[items]]
    flat = scores16.reshape(-1).clone()
    flat[~present.reshape(-1)] = 0.0  # never read: absent entries are never re-scored or compared
    values, record = refine(flat, rescore, replan, calibration, _group_undecided(present, close), factor=factor)
    values = values.view(N, K)
    values[~present] = float("nan")
    return values, record


def _winoground_close(v: Tensor, U: Tensor) -> Tensor:
    """Examples with a decision within reach: one of the four comparisons of text and image
    within 2 U, or the binding interaction within 4 U."""
    c00, c01, c10, c11 = v.unbind(1)
    diffs = torch.stack([c00 - c10, c11 - c01, c00 - c01, c11 - c10], 1)
    return (diffs.abs() <= 2 * U[:, None]).any(1) | ((c00 - c01 - c10 + c11).abs() <= 4 * U)


def exact_winoground(scores16: Tensor, rescore: Rescore, replan: Replan, *, factor: float = MARGIN_FACTOR,
                     calibration_items: Optional[int] = None) -> Tuple[Tensor, Dict[str, Any]]:
    """Refine bf16 Winoground scores ``(N, 2, 2)`` so that ``winoground_correct`` of the result
    equals fp32 scoring's; the callbacks take flat indices ``4n + 2k + j``."""
    if scores16.dim() != 3 or scores16.shape[1:] != (2, 2):
        raise ValueError(f"exact_winoground: expected (N, 2, 2) scores, got {tuple(scores16.shape)}")
    values, record = _refine_groups(scores16.reshape(-1, 4).float(), rescore, replan, _winoground_close, factor,
                                    calibration_items)
    return values.view(-1, 2, 2), record


def _choice_close(v: Tensor, U: Tensor) -> Tensor:
    """Items whose outcome is within reach: no foil certainly ahead of the true caption, and
    one within 2 U of it."""
    d = v[:, 1:] - v[:, :1]  # foil - true; NaN where absent
    ahead = (d > 2 * U[:, None]).any(1)
    near = (d.abs() <= 2 * U[:, None]).any(1)
    return near & ~ahead


def exact_choices(scores16: Tensor, rescore: Rescore, replan: Replan, *, factor: float = MARGIN_FACTOR,
                  calibration_items: Optional[int] = None,
                  threshold: Optional[float] = None) -> Tuple[Tensor, Dict[str, Any]]:
    """Refine bf16 multiple-choice scores ``(N, K)`` (column 0 the true caption, NaN where an
    item has fewer captions) so that ``correct_items`` of the result equals fp32 scoring's;
    the callbacks take flat indices ``n * K + k``. With ``threshold`` (VALSE's p_c and p_f:
    each score against a match threshold), a score within reach of it is decided too."""
    if scores16.dim() != 2 or scores16.shape[1] < 2:
        raise ValueError(f"exact_choices: expected (items, >= 2 captions), got {tuple(scores16.shape)}")
    close = _choice_close
    if threshold is not None:
        def close(v: Tensor, U: Tensor) -> Tensor:
            near_t = ((v - threshold).abs() <= U[:, None]).any(1)  # NaN (no caption) compares False
            return _choice_close(v, U) | near_t
    return _refine_groups(scores16.float(), rescore, replan, close, factor, calibration_items)
