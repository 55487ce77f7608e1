"""Image-text retrieval recalls from a full score matrix (Flickr30k / COCO protocol, docs/reference.md §6).

``scores[c, i]`` is the score of caption ``c`` against image ``i`` (``Nc x Ni``) and
``txt2img[c]`` the one image caption ``c`` describes; every image has at least one caption.

- Image retrieval (IR) R@K: share of captions whose image is among their top K images.
- Text retrieval (TR) R@K: share of images with at least one of their captions among
  their top K captions.

Ties count against the model. The rank of the ground truth of a query is the number of
*wrong* items whose score is ``>=`` the score of the best *right* item; the query is a hit
at K iff that rank is ``< K``. This is where the first right item lands when every tie
between a right and a wrong item is broken against the right one (ties between right
items do not matter: one of them comes first whatever the order). ``ties="optimistic"``
counts only strictly higher wrong items (ties broken in favour): any tie-breaking order,
such as a ``topk`` or an unstable ``argsort``, gives a recall between the two. Without ties
the two agree.

Each query counts once: the official code's image-retrieval recall also counted the row
index of its ``nonzero()`` result and could overcount by up to K hits; here a hit is a
0/1 per caption by construction.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor

TIES = ("pessimistic", "optimistic")


def check_txt2img(txt2img, num_captions: int, num_images: int) -> Tensor:
    """Validate the caption -> image map and return it as a ``(Nc,)`` long tensor."""
    txt2img = torch.as_tensor(txt2img)
    if txt2img.dim() != 1 or txt2img.numel() != num_captions or txt2img.dtype.is_floating_point:
        raise ValueError(
            f"txt2img: expected {num_captions} integer image indices (one per caption row), "
            f"got a {txt2img.dtype} tensor of shape {tuple(txt2img.shape)}"
        )
    txt2img = txt2img.long()
    bad = ((txt2img < 0) | (txt2img >= num_images)).nonzero().flatten()
    if bad.numel():
        c = int(bad[0])
        raise ValueError(
            f"txt2img: caption {c} points to image {int(txt2img[c])}, expected an index in [0, {num_images})"
        )
    counts = torch.bincount(txt2img, minlength=num_images)
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(
            f"txt2img: image(s) {empty[:10].tolist()} have no caption; text retrieval needs at "
            f"least one caption per image column ({empty.numel()} image(s) without)"
        )
    return txt2img


def _check_scores(scores) -> Tensor:
    scores = torch.as_tensor(scores)
    if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores: expected a non-empty (captions, images) matrix, got shape {tuple(scores.shape)}")
    if not scores.dtype.is_floating_point:
        scores = scores.double()
    nonfinite = (~torch.isfinite(scores)).nonzero()
    if nonfinite.numel():
        c, i = nonfinite[0].tolist()
        raise ValueError(f"scores: NaN or Inf at (caption {c}, image {i}) ({nonfinite.shape[0]} such entries)")
    return scores


def retrieval_ranks(
    scores, txt2img, *, ties: str = "pessimistic", chunk_rows: int = 512
) -> Tuple[Tensor, Tensor]:
    """0-based ranks of the ground truth: ``(image_ranks (Nc,), text_ranks (Ni,))``.

    ``image_ranks[c]``: wrong images scoring ``>=`` (pessimistic) or ``>`` (optimistic) the
    true image of caption ``c``; ``text_ranks[i]``: wrong captions scoring ``>=`` / ``>`` the
    best caption of image ``i``. Rows are processed ``chunk_rows`` at a time, so memory is
    ``O(chunk_rows * Ni)`` beyond the matrix itself.
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    scores = _check_scores(scores)
    Nc, Ni = scores.shape
    txt2img = check_txt2img(txt2img, Nc, Ni).to(scores.device)
    ahead = torch.ge if ties == "pessimistic" else torch.gt

    true = scores.gather(1, txt2img[:, None]).squeeze(1)  # (Nc,)
    best_true = torch.full((Ni,), float("-inf"), dtype=scores.dtype, device=scores.device)
    best_true = best_true.scatter_reduce(0, txt2img, true, reduce="amax")  # (Ni,)

    image_ranks = torch.empty(Nc, dtype=torch.long, device=scores.device)
    text_ranks = torch.zeros(Ni, dtype=torch.long, device=scores.device)
    cols = torch.arange(Ni, device=scores.device)[None, :]  # (1, Ni)
    for start in range(0, Nc, chunk_rows):
        block = scores[start:start + chunk_rows]  # (b, Ni)
        wrong = txt2img[start:start + chunk_rows, None] != cols  # (b, Ni)
        image_ranks[start:start + chunk_rows] = (ahead(block, true[start:start + chunk_rows, None]) & wrong).sum(1)
        text_ranks += (ahead(block, best_true[None, :]) & wrong).sum(0)
    return image_ranks.cpu(), text_ranks.cpu()


def recall_at(ranks: Tensor, k: int) -> float:
    """Percentage of queries whose ground truth rank is ``< k``."""
    return 100.0 * (ranks < k).double().mean().item()


def retrieval_metrics(
    scores, txt2img, *, ks: Sequence[int] = (1, 5, 10), ties: str = "pessimistic", chunk_rows: int = 512
) -> Dict[str, float]:
    """IR and TR recalls at ``ks`` in percent, their means and the R-sum.

    Keys: ``ir_r{k}``, ``tr_r{k}``, ``ir_mean``, ``tr_mean``, ``r_mean`` (mean of all of
    them) and ``rsum`` (their sum), plus ``n_captions`` and ``n_images``.
    """
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    image_ranks, text_ranks = retrieval_ranks(scores, txt2img, ties=ties, chunk_rows=chunk_rows)
    out: Dict[str, float] = {}
    for k in ks:
        out[f"ir_r{k}"] = recall_at(image_ranks, int(k))
    for k in ks:
        out[f"tr_r{k}"] = recall_at(text_ranks, int(k))
    ir = [out[f"ir_r{k}"] for k in ks]
    tr = [out[f"tr_r{k}"] for k in ks]
    out["ir_mean"] = sum(ir) / len(ir)
    out["tr_mean"] = sum(tr) / len(tr)
    out["r_mean"] = (sum(ir) + sum(tr)) / (2 * len(ks))
    out["rsum"] = sum(ir) + sum(tr)
    out["n_captions"] = int(image_ranks.numel())
    out["n_images"] = int(text_ranks.numel())
    return out
