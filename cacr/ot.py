"""Word-region alignment by optimal transport (UNITER's WRA pre-training objective).

UNITER (Chen et al., 2020, Section 3.2) aligns the words of a caption with the regions of an
image without labels: the transport plan ``T`` between the T word states ``w_i`` and the K
region states ``v_j`` (uniform marginals ``1/T`` and ``1/K``) minimises the total cost
``<T, C>`` with cosine distances ``C_ij = 1 - cos(w_i, v_j)``; the OT distance
``D = <T*, C>`` is small for a matching pair and is pushed up for a mismatched one:

    L_WRA = mean_{positives} D  -  mean_{negatives} D

``T*`` is approximated by the Inexact Proximal point method for OT (IPOT; Xie et al., 2019)
with step ``1/beta`` and one Sinkhorn sweep per outer iteration, and is held constant
(no gradient through the iterations): gradients reach the states through ``C`` only.

Pure tensor functions on padded batches with masks; ``tests/test_ot.py`` checks them against
a per-pair loop on the unpadded states.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_cost(words: Tensor, regions: Tensor) -> Tensor:
    """``1 - cos``: (B, T, d) words x (B, K, d) regions -> (B, T, K) costs in [0, 2]."""
    return 1.0 - F.normalize(words, dim=-1) @ F.normalize(regions, dim=-1).transpose(1, 2)


@torch.no_grad()
def ipot_plan(cost: Tensor, word_mask: Tensor, region_mask: Tensor, beta: float = 0.5, iters: int = 50) -> Tensor:
    """IPOT transport plans (B, T, K) between uniform marginals over the unmasked words and
    regions of each pair; masked rows and columns carry no mass."""
    wm, rm = word_mask.to(cost.dtype), region_mask.to(cost.dtype)  # (B, T), (B, K)
    mu = wm / wm.sum(1, keepdim=True).clamp_min(1)  # (B, T) marginal over words
    nu = rm / rm.sum(1, keepdim=True).clamp_min(1)  # (B, K) marginal over regions
    kernel = torch.exp(-cost / beta) * wm[:, :, None] * rm[:, None, :]  # (B, T, K)
    plan = wm[:, :, None] * rm[:, None, :]
    b = nu.clone()
    tiny = torch.finfo(cost.dtype).tiny
    for _ in range(iters):
        q = kernel * plan  # (B, T, K)
        a = torch.where(wm > 0, mu / (q @ b[:, :, None]).squeeze(2).clamp_min(tiny), torch.zeros_like(mu))
        b = torch.where(rm > 0, nu / (q.transpose(1, 2) @ a[:, :, None]).squeeze(2).clamp_min(tiny), torch.zeros_like(nu))
        plan = a[:, :, None] * q * b[:, None, :]
    return plan


def ot_distance(words: Tensor, regions: Tensor, word_mask: Tensor, region_mask: Tensor,
                beta: float = 0.5, iters: int = 50) -> Tensor:
    """(B,) OT distances ``<T*, C>`` between each pair's word and region states."""
    dtype = torch.promote_types(words.dtype, torch.float32)  # at least fp32 under autocast
    cost = cosine_cost(words.to(dtype), regions.to(dtype))
    plan = ipot_plan(cost.detach(), word_mask, region_mask, beta, iters)
    return (plan * cost).sum((1, 2))


def wra_loss(words: Tensor, regions: Tensor, word_mask: Tensor, region_mask: Tensor, positive: Tensor,
             beta: float = 0.5, iters: int = 50) -> Tensor:
    """``mean D(positives) - mean D(negatives)``; ``positive`` (B,) bool marks the matching pairs.
    A side with no pairs contributes 0."""
    d = ot_distance(words, regions, word_mask, region_mask, beta, iters)
    pos = positive.to(torch.bool)
    zero = d.new_zeros(())
    d_pos = d[pos].mean() if pos.any() else zero
    d_neg = d[~pos].mean() if (~pos).any() else zero
    return d_pos - d_neg
