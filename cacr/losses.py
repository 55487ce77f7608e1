"""The training objective's pure tensor losses (the relation-alignment regularizers are in
:mod:`cacr.regularizers`); the training module (:mod:`cacr.module`) only wires them up.

- :func:`ranking_loss`: UNITER's hinge on sigmoid scores (docs/reference.md §2),
  ``mean(clamp(margin + s_neg - s_pos, min=0))``.
- :func:`softmax_ranking_loss`: the cross-entropy of the positive in its group of
  negatives (trains a model from scratch, where the sigmoid hinge saturates).
- :func:`alignment_loss`: align-before-fuse (in the spirit of ALBEF's contrastive loss
  before fusion, here token-level): an in-batch InfoNCE on
  :func:`word_region_alignment_logits`, against every positive of the global batch under
  DDP (gathered with gradient, :mod:`cacr.distributed`).

Imports nothing of the project but :mod:`cacr.distributed`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from cacr.distributed import all_gather_no_grad, all_gather_with_grad, rank_and_world_size


def ranking_loss(pos: Tensor, neg: Tensor, margin: float) -> Tensor:
    """Hinge on sigmoid scores: ``pos`` (B,) and ``neg`` (B, ..., k) logits."""
    s_pos = pos.float().sigmoid().view(pos.shape[0], *([1] * (neg.dim() - 1)))
    return (margin + neg.float().sigmoid() - s_pos).clamp(min=0).mean()


def softmax_ranking_loss(pos: Tensor, neg: Tensor) -> Tensor:
    """Cross-entropy of the positive against its group of negatives, on logits: ``pos`` (B,),
    ``neg`` (B, ..., k). Unlike the sigmoid hinge it cannot be satisfied by saturating every
    score, so it also trains a model from scratch (the synthetic world)."""
    pos = pos.float().view(pos.shape[0], *([1] * (neg.dim() - 1))).expand(*neg.shape[:-1], 1)
    logits = torch.cat([pos, neg.float()], dim=-1).flatten(0, -2)  # (groups, 1 + k)
    return F.cross_entropy(logits, logits.new_zeros(logits.shape[0], dtype=torch.long))


def word_region_alignment_logits(words: Tensor, word_mask: Tensor, regions: Tensor, region_mask: Tensor,
                                  temperature: float) -> Tensor:
    """In-batch late-interaction scores before fusion: ``s[a, b]`` is the mean over the words of
    caption ``a`` of their best cosine similarity with a region of image ``b``, over
    ``temperature``. ``words`` (B, n, H) with ``word_mask`` (B, n); ``regions`` (B', m, H) with
    ``region_mask`` (B', m). Returns (B, B') logits, captions along the rows."""
    w = F.normalize(words.float(), dim=-1)
    r = F.normalize(regions.float(), dim=-1)
    sim = torch.einsum("anh,bmh->abnm", w, r)  # (B, B', n, m)
    sim = sim.masked_fill(~region_mask[None, :, None, :], float("-inf")).amax(-1)  # (B, B', n)
    wm = word_mask[:, None, :].to(sim.dtype)  # (B, 1, n)
    best = (sim.nan_to_num(0.0, neginf=0.0) * wm).sum(-1) / wm.sum(-1).clamp(min=1)  # (B, B')
    return best / temperature


def alignment_loss(words: Tensor, word_mask: Tensor, regions: Tensor, region_mask: Tensor, images: Tensor,
                   temperature: float, gather_widths: Optional[Tuple[int, int]] = None) -> Tensor:
    """Symmetric in-batch InfoNCE on :func:`word_region_alignment_logits` of this process's
    positives: caption ``b`` (``words`` (B, n, H), ``word_mask`` (B, n)) with its image
    (``regions`` (B, m, H), ``region_mask`` (B, m); ``images`` (B,) its ids), against the
    images and captions of every positive of the global batch. Another caption of the same
    image is not used as a negative.

    Under DDP the words and regions of all processes are gathered with gradient, so the
    loss does not depend on how many processes share the batch; they are padded first to
    ``gather_widths = (n, m)``, widths every process knows without a synchronisation (with
    ``None`` the widths are agreed by an all-reduce)."""
    B = words.shape[0]
    rank, world = rank_and_world_size()
    all_words, all_wm, all_regions, all_rm, all_images = words, word_mask, regions, region_mask, images
    if world > 1:
        n, m = gather_widths if gather_widths is not None else _agreed_widths(words.shape[1], regions.shape[1],
                                                                              words.device)
        words, word_mask = F.pad(words, (0, 0, 0, n - words.shape[1])), F.pad(word_mask, (0, n - word_mask.shape[1]))
        regions = F.pad(regions, (0, 0, 0, m - regions.shape[1]))
        region_mask = F.pad(region_mask, (0, m - region_mask.shape[1]))
        # One collective each for the features (with gradient) and the masks: two gathers with
        # gradient could run their backward exchanges in different orders on different ranks.
        feats = all_gather_with_grad(torch.cat([words, regions], dim=1))  # (G, n + m, H)
        all_words, all_regions = feats[:, :n], feats[:, n:]
        masks = all_gather_no_grad(torch.cat([word_mask.long(), region_mask.long(), images[:, None].long()], dim=1))
        all_wm, all_rm, all_images = masks[:, :n].bool(), masks[:, n:n + m].bool(), masks[:, -1]
    target = rank * B + torch.arange(B, device=words.device)  # this process's rows in the global batch
    t2i = word_region_alignment_logits(words, word_mask, all_regions, all_rm, temperature)  # (B, G)
    i2t = word_region_alignment_logits(all_words, all_wm, regions, region_mask, temperature).t()  # (B, G)
    same = images[:, None] == all_images[None, :]
    same[torch.arange(B, device=same.device), target] = False
    return 0.5 * (F.cross_entropy(t2i.masked_fill(same, float("-inf")), target)
                  + F.cross_entropy(i2t.masked_fill(same, float("-inf")), target))


def _agreed_widths(n: int, m: int, device) -> Tuple[int, int]:
    """The largest word and region widths over the processes (one all-reduce)."""
    import torch.distributed as dist

    widths = torch.tensor([n, m], device=device)
    dist.all_reduce(widths, op=dist.ReduceOp.MAX)
    return int(widths[0]), int(widths[1])
