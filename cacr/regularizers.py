"""Relation-alignment regularizers on the last layer's attention: CACR and IAIS.

CACR is the loss of Pandey et al., "Cross-modal Attention Congruence Regularization for
Vision-Language Relation Alignment" (paper Eqs. 3-6); IAIS (singular, distributed) is
Ren et al. (2021), the paper's baseline. Semantics are those of the public code (docs/reference.md §3),
written as batched, masked functions on tensors (no project imports):

- :func:`relation_blocks` cuts ``S_LL`` (words->words), ``S_VV`` (regions->regions),
  ``S_LV`` (words->regions) and ``S_VL`` (regions->words) out of a layer's pre-softmax
  scores ``QK^T/sqrt(d)`` (paper Eqs. 1-2), each a softmax over its own keys, averaged
  over heads; words exclude [CLS]/[SEP].
- ``m-KL(P, Q) = KL(P||Q) + KL(Q||P)``, summed over columns and averaged over rows (the
  paper's Eq. 4 sums rows; the public code averages: ``row_reduction`` picks).
- :func:`cacr_loss`: ``L_L = m-KL(softmax(sg(S_LV) S_VV sg(S_LV)^T), softmax(S_LL))``,
  ``L_V = m-KL(softmax(sg(S_VL) S_LL sg(S_VL)^T), softmax(S_VV))``.
- :func:`iais_loss`: ``singular`` aligns ``S_LL`` with ``softmax(S_VV[i*][:, i*])``,
  ``i* = argmax S_LV`` (and symmetrically); ``distributed`` aligns ``S_LL`` with
  ``S_LV S_VL`` and ``S_VV`` with ``S_VL S_LV`` using ``log(x + 1e-6)``.
- :func:`soft_alignment_loss`: paper Alg. 1 as explicit loops over examples and matrix
  entries (``a*_{i->j} = sum_{p,k} S_VL[i,p] S_VL[j,k] S_LL[p,k]``): the slow oracle.
- :func:`schedule_weight` and :class:`Regularizer`: ``loss = rank + lambda w(t) L_reg``
  with ``w(t) = exp(5 (t/T - 1))`` by default (docs/reference.md §3.4), driven by the global step.

Every loss returns the mean over examples of ``L_L + L_V`` and is exact under padding:
values in padded rows and columns (word or region beyond an example's length) never
reach the result. Losses run in fp32 (fp64 inputs stay fp64) with autocast disabled.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

NAMES = ("none", "cacr", "iais_singular", "iais_distributed")
IAIS_VARIANTS = ("singular", "distributed")
SCHEDULES = ("exponential", "linear", "log", "constant")
HEAD_REDUCTIONS = ("mean", "per_head")
SOURCES = ("probs", "scores")
ROW_REDUCTIONS = ("mean", "sum")
WEIGHTINGS = ("soft", "argmax")
LAYERS = ("last", "penultimate", "all")
WARMUP_RATE = 5.0  # w(t) = exp(5 (t/T - 1)): e^-5 at step 0, 1 at step T
DISTRIBUTED_EPS = 1e-6  # IAIS distributed: log(x + 1e-6) inside the KLs


class RelationBlocks(NamedTuple):
    """The four attention blocks of a batch of positive pairs, padded to the largest n, m."""

    S_LL: Tensor  # (B, n, n) words -> words
    S_VV: Tensor  # (B, m, m) regions -> regions
    S_LV: Tensor  # (B, n, m) words -> regions
    S_VL: Tensor  # (B, m, n) regions -> words
    word_mask: Tensor  # (B, n) bool
    region_mask: Tensor  # (B, m) bool


class RelationLoss(NamedTuple):
    """Mean over examples of ``L_L + L_V`` (``loss``) and of each side."""

    loss: Tensor
    loss_L: Tensor
    loss_V: Tensor


def _check_choice(value, choices, what: str) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {value!r}")


def _no_autocast(t: Tensor):
    device_type = t.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def _compute_dtype(*ts: Tensor) -> torch.dtype:
    dtype = ts[0].dtype
    for t in ts[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- blocks


def _masked_softmax(x: Tensor, key_mask: Tensor) -> Tensor:
    """Softmax over the last dim, padded keys (``key_mask`` False) get exactly 0."""
    x = x.masked_fill(~key_mask, torch.finfo(x.dtype).min)
    return torch.softmax(x, dim=-1)


def relation_blocks(
    scores: Tensor,
    word_index: Tensor,
    word_mask: Tensor,
    region_index: Tensor,
    region_mask: Tensor,
    *,
    source: str = "probs",
    head_reduction: str = "mean",
) -> RelationBlocks:
    """Cut ``S_LL, S_VV, S_LV, S_VL`` out of one layer's attention scores.

    ``scores``: ``(P, h, L, L)`` pre-softmax ``QK^T/sqrt(d)`` without key mask (the
    model's ``last_scores``); ``word_index`` ``(P, n)`` / ``region_index`` ``(P, m)``: joint
    positions of each example's words (no [CLS]/[SEP]) and regions, masked by
    ``word_mask`` / ``region_mask`` (the batch's tensors at the same P rows).

    ``source="probs"`` (public code): each block is a softmax over its own valid keys;
    ``"scores"`` keeps the pre-softmax scores (paper Eq. 1), padded keys set to 0.
    ``head_reduction="mean"`` averages the blocks over heads (public code);
    ``"per_head"`` keeps them, flattened into ``P*h`` examples (row ``p*h + k`` is head
    ``k`` of example ``p``) with the masks repeated, so that any loss of this module
    gives the per-head losses averaged over heads and examples.

    Padded rows and columns hold finite values; the losses ignore them.
    """
    _check_choice(source, SOURCES, "source")
    _check_choice(head_reduction, HEAD_REDUCTIONS, "head_reduction")
    if scores.dim() != 4 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"scores must be (P, heads, L, L), got shape {tuple(scores.shape)}")
    P, h, L, _ = scores.shape
    for name, t in (("word_index", word_index), ("word_mask", word_mask),
                    ("region_index", region_index), ("region_mask", region_mask)):
        if t.dim() != 2 or t.shape[0] != P:
            raise ValueError(f"{name} must be (P={P}, k) to match scores' P rows, got shape {tuple(t.shape)}")
    if word_index.shape != word_mask.shape or region_index.shape != region_mask.shape:
        raise ValueError(
            f"index and mask shapes differ: word_index {tuple(word_index.shape)} vs word_mask "
            f"{tuple(word_mask.shape)}, region_index {tuple(region_index.shape)} vs region_mask {tuple(region_mask.shape)}"
        )
    if word_index.dtype != torch.long or region_index.dtype != torch.long:
        raise ValueError(f"word_index and region_index must be long tensors, got {word_index.dtype}, {region_index.dtype}")
    wm, rm = word_mask.bool(), region_mask.bool()
    n, m = wm.shape[1], rm.shape[1]
    N = n + m
    with _no_autocast(scores):
        if scores.dtype not in (torch.float32, torch.float64):
            scores = scores.float()
        idx = torch.cat([word_index, region_index], dim=1)  # (P, N)
        S = scores.gather(2, idx[:, None, :, None].expand(P, h, N, L))  # (P, h, N, L)
        S = S.gather(3, idx[:, None, None, :].expand(P, h, N, N))  # (P, h, N, N)
        to_words, to_regions = S[..., :n], S[..., n:]  # (P, h, N, n), (P, h, N, m)
        if source == "probs":
            to_words = _masked_softmax(to_words, wm[:, None, None, :])
            to_regions = _masked_softmax(to_regions, rm[:, None, None, :])
        else:
            to_words = to_words.masked_fill(~wm[:, None, None, :], 0.0)
            to_regions = to_regions.masked_fill(~rm[:, None, None, :], 0.0)
        if head_reduction == "mean":
            to_words, to_regions = to_words.mean(1), to_regions.mean(1)  # (P, N, n), (P, N, m)
        else:
            to_words, to_regions = to_words.flatten(0, 1), to_regions.flatten(0, 1)  # (P*h, N, .)
            wm, rm = wm.repeat_interleave(h, dim=0), rm.repeat_interleave(h, dim=0)
    return RelationBlocks(
        S_LL=to_words[:, :n], S_VV=to_regions[:, n:], S_LV=to_regions[:, :n], S_VL=to_words[:, n:],
        word_mask=wm, region_mask=rm,
    )


# --------------------------------------------------------------------------- shared pieces


def _prepare(S_LL, S_VV, S_LV, S_VL, word_mask, region_mask):
    """Check shapes, cast to fp32/fp64, and zero every padded row and column."""
    if word_mask.dim() != 2 or region_mask.dim() != 2:
        raise ValueError(
            f"word_mask and region_mask must be (B, n) and (B, m), got {tuple(word_mask.shape)}, {tuple(region_mask.shape)}"
        )
    (B, n), m = word_mask.shape, region_mask.shape[1]
    want = {"S_LL": (B, n, n), "S_VV": (B, m, m), "S_LV": (B, n, m), "S_VL": (B, m, n), "region_mask": (B, m)}
    got = {"S_LL": S_LL, "S_VV": S_VV, "S_LV": S_LV, "S_VL": S_VL, "region_mask": region_mask}
    for name, t in got.items():
        if tuple(t.shape) != want[name]:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected {want[name]} from word_mask (B, n)=({B}, {n}) "
                f"and region_mask m={m}"
            )
    dtype = _compute_dtype(S_LL, S_VV, S_LV, S_VL)
    wm, rm = word_mask.bool(), region_mask.bool()

    def clean(S, rows, cols):
        return torch.where(rows[:, :, None] & cols[:, None, :], S.to(dtype), 0.0)

    return clean(S_LL, wm, wm), clean(S_VV, rm, rm), clean(S_LV, wm, rm), clean(S_VL, rm, wm), wm, rm


def _safe_log(x: Tensor) -> Tensor:
    """log(x) with x clamped to the smallest normal number: finite value and gradient at 0."""
    return x.clamp_min(torch.finfo(x.dtype).tiny).log()


def _masked_log_softmax(x: Tensor, col_mask: Tensor) -> Tensor:
    return torch.log_softmax(x.masked_fill(~col_mask[:, None, :], torch.finfo(x.dtype).min), dim=-1)


def _mkl_rows(p: Tensor, log_p: Tensor, q: Tensor, log_q: Tensor, col_mask: Tensor) -> Tensor:
    """Per row ``KL(p||q) + KL(q||p) = sum_j (p - q)(log p - log q)`` over valid columns: (B, r)."""
    terms = (p - q) * (log_p - log_q)  # (B, r, c)
    return torch.where(col_mask[:, None, :], terms, 0.0).sum(-1)


def _reduce_rows(row_loss: Tensor, row_mask: Tensor, row_reduction: str) -> Tensor:
    """(B, r) -> (B,): mean (public code) or sum (paper Eq. 4) over an example's valid rows."""
    total = torch.where(row_mask, row_loss, 0.0).sum(-1)
    if row_reduction == "mean":
        total = total / row_mask.sum(-1).clamp_min(1).to(total.dtype)
    return total


def _finish(loss_L: Tensor, loss_V: Tensor, return_parts: bool):
    loss_L, loss_V = loss_L.mean(), loss_V.mean()
    total = loss_L + loss_V
    return RelationLoss(total, loss_L, loss_V) if return_parts else total


def _softmax_mkl(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Per-row m-KL(softmax(a), softmax(b)) over the valid columns of square (B, r, r) inputs."""
    log_p, log_q = _masked_log_softmax(a, mask), _masked_log_softmax(b, mask)
    return _mkl_rows(log_p.exp(), log_p, log_q.exp(), log_q, mask)


def _masked_argmax(S: Tensor, col_mask: Tensor) -> Tensor:
    """argmax over the valid columns of each row (first maximum on ties): (B, r)."""
    return torch.where(col_mask[:, None, :], S, float("-inf")).argmax(dim=-1)


def _gather_square(S: Tensor, idx: Tensor) -> Tensor:
    """``S[b][idx[b]][:, idx[b]]`` for every b: (B, m, m), (B, n) -> (B, n, n)."""
    n, m = idx.shape[1], S.shape[1]
    rows = S.gather(1, idx[:, :, None].expand(-1, n, m))  # (B, n, m)
    return rows.gather(2, idx[:, None, :].expand(-1, n, n))  # (B, n, n)


# --------------------------------------------------------------------------- losses


def _prob_mkl(p: Tensor, q: Tensor, mask: Tensor) -> Tensor:
    """Per-row m-KL of ``p`` normalised to sum 1 over its valid columns and ``q`` as given
    (already row-stochastic): no further softmax."""
    p = torch.where(mask[:, None, :], p, 0.0)
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return _mkl_rows(p, _safe_log(p), q, _safe_log(q), mask)


def cacr_loss(
    S_LL: Tensor, S_VV: Tensor, S_LV: Tensor, S_VL: Tensor, word_mask: Tensor, region_mask: Tensor,
    *, stop_grad: bool = True, row_reduction: str = "mean", double_softmax: bool = True,
    return_parts: bool = False,
) -> Union[Tensor, RelationLoss]:
    """CACR (paper Eqs. 3-6), batched: mean over examples of ``L_CACR-L + L_CACR-V``.

    ``stop_grad`` (public code: on) keeps gradients out of ``S_LV`` and ``S_VL``.
    ``double_softmax`` (public code: on) compares ``softmax(P)`` with ``softmax(S_LL)`` even
    though the blocks are already softmax rows; off (an ablation), the projection ``P`` is
    normalised to sum 1 per row and compared with the blocks' own rows (``S_LL``, ``S_VV``
    must then be row-stochastic, i.e. ``source="probs"``).
    """
    _check_choice(row_reduction, ROW_REDUCTIONS, "row_reduction")
    with _no_autocast(S_LL):
        S_LL, S_VV, S_LV, S_VL, wm, rm = _prepare(S_LL, S_VV, S_LV, S_VL, word_mask, region_mask)
        X_LV, X_VL = (S_LV.detach(), S_VL.detach()) if stop_grad else (S_LV, S_VL)
        P_L = X_LV @ S_VV @ X_LV.transpose(1, 2)  # (B, n, n): S_VV in the language basis
        P_V = X_VL @ S_LL @ X_VL.transpose(1, 2)  # (B, m, m): S_LL in the vision basis
        mkl = _softmax_mkl if double_softmax else _prob_mkl
        loss_L = _reduce_rows(mkl(P_L, S_LL, wm), wm, row_reduction)
        loss_V = _reduce_rows(mkl(P_V, S_VV, rm), rm, row_reduction)
        return _finish(loss_L, loss_V, return_parts)


def iais_loss(
    S_LL: Tensor, S_VV: Tensor, S_LV: Tensor, S_VL: Tensor, word_mask: Tensor, region_mask: Tensor,
    *, variant: str = "singular", stop_grad: bool = False, row_reduction: str = "mean",
    return_parts: bool = False,
) -> Union[Tensor, RelationLoss]:
    """IAIS (Ren et al., 2021), batched; ``S_LL`` and ``S_VV`` must be row-stochastic.

    ``singular``: ``L_L = m-KL(softmax(S_VV[i*][:, i*]), S_LL)`` with ``i*`` the argmax of
    each ``S_LV`` row (no gradient through the argmax; ``stop_grad`` changes nothing);
    ``L_V`` symmetric with ``argmax S_VL``. ``distributed``: ``L_L = m-KL(S_LV S_VL, S_LL)``,
    ``L_V = m-KL(S_VL S_LV, S_VV)``, logs taken of ``x + 1e-6``; ``stop_grad`` (public: off)
    detaches the cross-modal matrices.
    """
    _check_choice(variant, IAIS_VARIANTS, "variant")
    _check_choice(row_reduction, ROW_REDUCTIONS, "row_reduction")
    with _no_autocast(S_LL):
        S_LL, S_VV, S_LV, S_VL, wm, rm = _prepare(S_LL, S_VV, S_LV, S_VL, word_mask, region_mask)
        if variant == "singular":
            P_L = _gather_square(S_VV, _masked_argmax(S_LV, rm))  # (B, n, n)
            P_V = _gather_square(S_LL, _masked_argmax(S_VL, wm))  # (B, m, m)
            log_pL, log_pV = _masked_log_softmax(P_L, wm), _masked_log_softmax(P_V, rm)
            rows_L = _mkl_rows(log_pL.exp(), log_pL, S_LL, _safe_log(S_LL), wm)
            rows_V = _mkl_rows(log_pV.exp(), log_pV, S_VV, _safe_log(S_VV), rm)
        else:
            X_LV, X_VL = (S_LV.detach(), S_VL.detach()) if stop_grad else (S_LV, S_VL)
            P_L = X_LV @ X_VL  # (B, n, n)
            P_V = X_VL @ X_LV  # (B, m, m)
            rows_L = _mkl_rows(P_L, (P_L + DISTRIBUTED_EPS).log(), S_LL, (S_LL + DISTRIBUTED_EPS).log(), wm)
            rows_V = _mkl_rows(P_V, (P_V + DISTRIBUTED_EPS).log(), S_VV, (S_VV + DISTRIBUTED_EPS).log(), rm)
        loss_L = _reduce_rows(rows_L, wm, row_reduction)
        loss_V = _reduce_rows(rows_V, rm, row_reduction)
        return _finish(loss_L, loss_V, return_parts)


def soft_alignment_loss(
    S_LL: Tensor, S_VV: Tensor, S_LV: Tensor, S_VL: Tensor, word_mask: Tensor, region_mask: Tensor,
    *, weights: str = "soft", target_softmax: bool = True, row_reduction: str = "mean",
    return_parts: bool = False,
) -> Union[Tensor, RelationLoss]:
    """Soft relation alignment (paper Alg. 1), one example and one entry at a time: the slow oracle.

    For regions i, j: ``W = S_VL[i] S_VL[j]^T`` (n x n soft weighting) and
    ``a*_{i->j} = sum(W * S_LL)`` (a weighted SUM: the paper's "mean" would change the
    scale, and the softmax that follows is not scale-invariant); the language side swaps
    the roles. ``weights="argmax"`` replaces each cross-modal row by the one-hot of its
    argmax (IAIS's hard alignment). The side loss is ``m-KL(softmax(A*), T)`` with
    ``T = softmax(S_VV)`` when ``target_softmax`` (CACR) else ``S_VV`` (IAIS singular).
    No stop-gradient: this is for checking values.
    """
    _check_choice(weights, WEIGHTINGS, "weights")
    _check_choice(row_reduction, ROW_REDUCTIONS, "row_reduction")
    S_LL, S_VV, S_LV, S_VL, wm, rm = _prepare(S_LL, S_VV, S_LV, S_VL, word_mask, region_mask)

    def one_hot_rows(X):
        return torch.nn.functional.one_hot(X.argmax(dim=1), X.shape[1]).to(X.dtype)

    def side(cross, intra_other, intra_own):
        # cross (r, c): rows of this modality over the other's tokens; intra_other (c, c).
        r = cross.shape[0]
        A = torch.empty(r, r, dtype=cross.dtype)
        for i in range(r):
            for j in range(r):
                W = torch.outer(cross[i], cross[j])  # soft weighting over the other modality's pairs
                A[i, j] = (W * intra_other).sum()
        P = torch.softmax(A, dim=1)
        T = torch.softmax(intra_own, dim=1) if target_softmax else intra_own
        rows = []
        for i in range(r):
            kl_pt = (P[i] * (P[i].log() - T[i].log())).sum()
            kl_tp = (T[i] * (T[i].log() - P[i].log())).sum()
            rows.append(kl_pt + kl_tp)
        rows = torch.stack(rows)
        return rows.mean() if row_reduction == "mean" else rows.sum()

    losses_L, losses_V = [], []
    for b in range(wm.shape[0]):
        w = wm[b].nonzero().flatten()
        v = rm[b].nonzero().flatten()
        LL, VV = S_LL[b][w][:, w], S_VV[b][v][:, v]
        LV, VL = S_LV[b][w][:, v], S_VL[b][v][:, w]
        if weights == "argmax":
            LV, VL = one_hot_rows(LV), one_hot_rows(VL)
        losses_L.append(side(LV, VV, LL))
        losses_V.append(side(VL, LL, VV))
    return _finish(torch.stack(losses_L), torch.stack(losses_V), return_parts)


# --------------------------------------------------------------------------- schedule and config


def schedule_weight(schedule: str, step: int, total_steps: int) -> float:
    """``w(t)`` at global step ``t`` of ``T = total_steps`` (t/T clipped to [0, 1]).

    exponential ``exp(5 (t/T - 1))`` (the paper's "exponential warmup"), linear ``t/T``,
    log ``1 - exp(-5 t/T)``, constant ``1``. A function of the global step alone, so a
    resumed run continues where it stopped.
    """
    _check_choice(schedule, SCHEDULES, "schedule")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    r = min(step / total_steps, 1.0)
    if schedule == "exponential":
        return math.exp(WARMUP_RATE * (r - 1.0))
    if schedule == "linear":
        return r
    if schedule == "log":
        return 1.0 - math.exp(-WARMUP_RATE * r)
    return 1.0


@dataclass(frozen=True)
class Regularizer:
    """A configured relation-alignment regularizer (one ``conf/loss/*.yaml`` option).

    ``name``: none | cacr | iais_singular | iais_distributed. ``weight``: lambda.
    ``schedule``: see :func:`schedule_weight`. ``head_reduction``, ``source``: see
    :func:`relation_blocks` (``source="scores"`` only for cacr: IAIS compares the blocks
    as distributions). ``stop_grad``: detach the cross-modal matrices (None = the public
    code's choice: on for cacr, off for IAIS). ``row_reduction``: mean (public) or sum
    (paper Eq. 4) over the rows of m-KL. ``layers``: which encoder layers' attention is
    regularized (:meth:`layer_indices`; public code: the last). ``double_softmax``: see
    :func:`cacr_loss` (public code: on).

    Training use: ``blocks = reg.blocks(out.last_scores, word_index[pos], ...)``,
    ``parts = reg(*blocks)``, ``loss = rank + reg.weight_at(step, total) * parts.loss``.
    With ``name="none"`` (``enabled`` False) nothing needs computing and ``reg(...)`` is 0.
    """

    name: str = "cacr"
    weight: float = 1.0
    schedule: str = "exponential"
    head_reduction: str = "mean"
    source: str = "probs"
    stop_grad: Optional[bool] = None
    row_reduction: str = "mean"
    layers: str = "last"
    double_softmax: bool = True

    def __post_init__(self):
        _check_choice(self.name, NAMES, "loss.name")
        _check_choice(self.schedule, SCHEDULES, "loss.schedule")
        _check_choice(self.head_reduction, HEAD_REDUCTIONS, "loss.head_reduction")
        _check_choice(self.source, SOURCES, "loss.source")
        _check_choice(self.row_reduction, ROW_REDUCTIONS, "loss.row_reduction")
        _check_choice(self.layers, LAYERS, "loss.layers")
        if not isinstance(self.double_softmax, bool):
            raise ValueError(f"loss.double_softmax must be true or false, got {self.double_softmax!r}")
        if not self.double_softmax and (self.name != "cacr" or self.source != "probs"):
            raise ValueError(f"loss.double_softmax=false applies to cacr with source=probs (the blocks' rows are "
                             f"then distributions), not to name={self.name!r}, source={self.source!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not (
            math.isfinite(self.weight) and self.weight >= 0
        ):
            raise ValueError(f"loss.weight must be a finite number >= 0, got {self.weight!r}")
        if self.source == "scores" and self.name.startswith("iais"):
            raise ValueError(
                f"loss.source='scores' does not apply to {self.name}: IAIS compares S_LL and S_VV as "
                "probability rows; use source='probs' (or name='cacr')"
            )
        if self.stop_grad is None:
            object.__setattr__(self, "stop_grad", self.name == "cacr")
        if not isinstance(self.stop_grad, bool):
            raise ValueError(f"loss.stop_grad must be true, false or null, got {self.stop_grad!r}")
        object.__setattr__(self, "weight", float(self.weight))

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    def weight_at(self, step: int, total_steps: int) -> float:
        """``lambda * w(step)``: the factor of the regularizer in the training loss."""
        if not self.enabled:
            return 0.0
        return self.weight * schedule_weight(self.schedule, step, total_steps)

    def layer_indices(self, num_layers: int) -> list:
        """The encoder layers whose attention is regularized: the last (public code), the one
        before it, or all (the loss is then averaged over them)."""
        if self.layers == "last":
            return [num_layers - 1]
        if self.layers == "penultimate":
            if num_layers < 2:
                raise ValueError("loss.layers=penultimate needs a model of at least 2 layers")
            return [num_layers - 2]
        return list(range(num_layers))

    def blocks(self, scores: Tensor, word_index: Tensor, word_mask: Tensor, region_index: Tensor,
               region_mask: Tensor) -> RelationBlocks:
        return relation_blocks(scores, word_index, word_mask, region_index, region_mask,
                               source=self.source, head_reduction=self.head_reduction)

    def __call__(self, S_LL: Tensor, S_VV: Tensor, S_LV: Tensor, S_VL: Tensor, word_mask: Tensor,
                 region_mask: Tensor) -> RelationLoss:
        args = (S_LL, S_VV, S_LV, S_VL, word_mask, region_mask)
        if self.name == "none":
            zero = S_LL.new_zeros((), dtype=_compute_dtype(S_LL))
            return RelationLoss(zero, zero, zero)
        if self.name == "cacr":
            return cacr_loss(*args, stop_grad=self.stop_grad, row_reduction=self.row_reduction,
                             double_softmax=self.double_softmax, return_parts=True)
        return iais_loss(*args, variant=self.name[len("iais_"):], stop_grad=self.stop_grad,
                         row_reduction=self.row_reduction, return_parts=True)
