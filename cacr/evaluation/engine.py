"""Batched scoring of (caption, image) pairs with a UNITER-style cross-encoder.

A cross-encoder scores each pair with a full forward pass, so evaluation is dominated by
how the pairs are batched. :func:`score_pairs` fetches every caption and every image
once (packing them into a :class:`cacr.model.PairStore` on the device, from which each
batch is cut with tensor ops), orders the pairs by joint length (text tokens + regions, longest first) so that a
batch holds similar lengths and little padding, runs ``score_fn`` under
``torch.inference_mode`` (optionally in bf16 autocast) and returns the scores in the
order of the pairs given. :func:`score_matrix` fills the captions x images matrix of a
full retrieval ranking, each DDP rank scoring its own block of caption rows (see
``distributed.py``); :func:`score_winoground` the ``(N, 2, 2)`` scores of Winoground.

The data stay behind two lookups, either a sequence or a callable on an index:

- ``captions[c]``: 1-d token ids ``[CLS] w.. [SEP]`` of caption ``c``;
- ``images[i]``: ``(img_feat (m, img_dim), img_pos_feat (m, 7|6|4))`` of image ``i``.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cacr.model.batch import UniterBatch
from cacr.model.pair_store import PairStore

from .distributed import gather_shards, rank_and_world_size, shard_range

CaptionLookup = Union[Sequence[Tensor], Callable[[int], Tensor]]
ImageLookup = Union[Sequence[Tuple[Tensor, Tensor]], Callable[[int], Tuple[Tensor, Tensor]]]
ScoreFn = Callable[[UniterBatch], Tensor]


def _fetch(lookup, i: int):
    return lookup[i] if hasattr(lookup, "__getitem__") else lookup(i)


def _owner_module(fn) -> Optional[nn.Module]:
    while isinstance(fn, functools.partial):
        fn = fn.func
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _as_pairs(pairs) -> Tensor:
    pairs = torch.as_tensor(pairs) if not isinstance(pairs, Tensor) else pairs
    if pairs.numel() == 0:
        return torch.zeros(0, 2, dtype=torch.long)
    if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.dtype.is_floating_point:
        raise ValueError(f"pairs: expected (caption index, image index) integer pairs, got shape {tuple(pairs.shape)}")
    if (pairs < 0).any():
        raise ValueError(f"pairs: negative index in pair {int((pairs < 0).any(1).nonzero()[0])}")
    return pairs.long().cpu()


def _store_batches(store: PairStore, cap_pos: Tensor, img_pos: Tensor, order: Tensor, batch_size: int):
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, store.batch(cap_pos[idx], img_pos[idx])


def score_pairs(
    score_fn: ScoreFn,
    pairs,
    captions: CaptionLookup,
    images: ImageLookup,
    *,
    layout: str = "compact",
    batch_size: int = 256,
    device: Union[str, torch.device] = "cpu",
    bf16: bool = False,
    progress: bool = False,
    desc: str = "scoring",
) -> Tensor:
    """Score every ``(caption, image)`` pair of ``pairs`` (``(P, 2)`` indices); returns
    ``(P,)`` float32 scores in the order of ``pairs``.

    ``score_fn(batch) -> (B,)`` is e.g. ``functools.partial(model.score, head="rank")``; a
    model it belongs to must be in eval mode. The fetched captions and images are packed
    once into a :class:`cacr.model.PairStore` on ``device`` and every batch is cut out of
    it with tensor ops (``layout`` picks the batch layout; the tests check the batches
    against ``cacr.model.collate``). ``bf16`` runs the scoring under bf16 autocast on ``device``.
    """
    owner = _owner_module(score_fn)
    if owner is not None and owner.training:
        raise ValueError("score_pairs: the model is in training mode (dropout on); call model.eval() first")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = _as_pairs(pairs)
    P = pairs.shape[0]
    out = torch.empty(P, dtype=torch.float32)
    if P == 0:
        return out
    device = torch.device(device)

    cap_ids, cap_pos = torch.unique(pairs[:, 0], return_inverse=True)  # cap_pos: (P,) into cap_ids
    img_ids, img_pos = torch.unique(pairs[:, 1], return_inverse=True)
    cap_items = []
    for c in cap_ids.tolist():
        ids = _fetch(captions, c)
        ids = ids if isinstance(ids, Tensor) else torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.numel() < 3:
            raise ValueError(f"captions[{c}]: expected 1-d token ids [CLS] w.. [SEP] with at least one word, "
                             f"got {ids.dtype} of shape {tuple(ids.shape)}")
        cap_items.append(ids)
    img_items = []
    for i in img_ids.tolist():
        item = _fetch(images, i)
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"images[{i}]: expected (img_feat, img_pos_feat), got {type(item).__name__}")
        feat, pos = item
        if feat.dim() != 2 or feat.shape[0] == 0 or not torch.isfinite(feat).all() or not torch.isfinite(pos).all():
            raise ValueError(f"images[{i}]: expected (m >= 1, img_dim) finite region features and finite boxes, "
                             f"got features of shape {tuple(feat.shape)}")
        img_items.append((feat, pos))

    txt_len = torch.tensor([c.numel() for c in cap_items])[cap_pos]  # (P,)
    num_bb = torch.tensor([f.shape[0] for f, _ in img_items])[img_pos]  # (P,)
    order = torch.argsort(txt_len + num_bb, descending=True, stable=True)  # (P,)

    store = PairStore.from_examples(cap_items, img_items, layout=layout).to(device)
    loader = _store_batches(store, cap_pos, img_pos, order, batch_size)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    bar = tqdm(total=P, desc=desc, unit="pair", unit_scale=True, disable=not progress, dynamic_ncols=True)
    out = torch.empty(P, dtype=torch.float32, device=device)  # filled on the device: no sync per batch
    with torch.inference_mode(), autocast, bar:
        for idx, batch in loader:
            s = score_fn(batch.to(device, non_blocking=True))
            if s.shape != (len(idx),):
                raise ValueError(f"score_fn returned shape {tuple(s.shape)} for a batch of {len(idx)} pairs")
            out[idx.to(device, non_blocking=True)] = s.float()
            bar.update(len(idx))
    return out.cpu()


def _count(lookup, n: Optional[int], what: str) -> int:
    if n is not None:
        return n
    if hasattr(lookup, "__len__"):
        return len(lookup)
    raise ValueError(f"{what}: a callable lookup needs its count (num_{what}=...)")


def score_matrix(
    score_fn: ScoreFn,
    captions: CaptionLookup,
    images: ImageLookup,
    *,
    num_captions: Optional[int] = None,
    num_images: Optional[int] = None,
    group=None,
    gather: bool = True,
    progress: bool = False,
    **kwargs,
) -> Tensor:
    """The ``(Nc, Ni)`` matrix of every caption against every image.

    Under DDP each rank scores the caption rows of :func:`shard_range` against all images
    (each image fetched once per rank) and the blocks are gathered to every rank; with
    ``gather=False`` the rank's own ``(rows, Ni)`` block is returned. ``kwargs`` go to
    :func:`score_pairs`; the progress bar shows on rank 0 only.
    """
    Nc = _count(captions, num_captions, "captions")
    Ni = _count(images, num_images, "images")
    rows = shard_range(Nc, group)
    rank, _ = rank_and_world_size(group)
    r = torch.arange(rows.start, rows.stop)
    pairs = torch.stack([r.repeat_interleave(Ni), torch.arange(Ni).repeat(len(r))], dim=1)  # (rows*Ni, 2)
    local = score_pairs(score_fn, pairs, captions, images, progress=progress and rank == 0,
                        desc="retrieval", **kwargs).view(len(r), Ni)
    return gather_shards(local, Nc, group) if gather else local


def score_winoground(
    score_fn: ScoreFn,
    captions: CaptionLookup,
    images: ImageLookup,
    num_examples: int,
    *,
    group=None,
    progress: bool = False,
    **kwargs,
) -> Tensor:
    """``(N, 2, 2)`` scores ``[n, k, j] = s(c_k, i_j)`` of Winoground-style examples, where
    ``captions[2n + k]`` is caption ``k`` and ``images[2n + j]`` image ``j`` of example
    ``n``. Examples are sharded across DDP ranks and gathered to every rank."""
    rows = shard_range(num_examples, group)
    rank, _ = rank_and_world_size(group)
    n = torch.arange(rows.start, rows.stop)
    k = torch.tensor([0, 0, 1, 1])
    j = torch.tensor([0, 1, 0, 1])
    pairs = torch.stack([(2 * n[:, None] + k).flatten(), (2 * n[:, None] + j).flatten()], dim=1)  # (4n, 2)
    local = score_pairs(score_fn, pairs, captions, images, progress=progress and rank == 0,
                        desc="winoground", **kwargs).view(len(n), 2, 2)
    return gather_shards(local, num_examples, group)
