"""Batched scoring of (caption, image) pairs with a UNITER-style cross-encoder.

A cross-encoder scores each pair with a full forward pass, so evaluation is dominated by
how the pairs are batched. :func:`score_pairs` fetches every caption and every image
once (packing them into a :class:`cacr.model.PairStore` on the device, from which each
batch is cut with tensor ops), orders the pairs by joint length (text tokens + regions,
longest first) so that a batch holds similar lengths and little padding, runs ``score_fn``
under ``torch.inference_mode`` (optionally in bf16 autocast) and returns the scores in the
order of the pairs given.

**One batch plan, whatever the process count.** The plan (pair order, batch cuts, and so
each batch's padded widths) is :func:`batch_plan` of the pairs' lengths and the batch size
alone. With ``shard=True`` under DDP every rank is given the same pairs, scores the batches
``rank, rank + W, rank + 2W, ...`` of that one plan (round robin: the plan is sorted
longest first, so contiguous blocks would load rank 0 most), and the gather puts each
score back in its place. A pair is therefore scored in the same batch, beside the same
neighbours, padded to the same width, on 1, 2 or N processes, and its score is bitwise the
same (on one machine at one thread count), in fp32 and in bf16.

:func:`score_matrix` fills the captions x images matrix of a full retrieval ranking and
:func:`score_winoground` the ``(N, 2, 2)`` scores of Winoground, both sharded this way.

The data stay behind two lookups, either a sequence or a callable on an index:

- ``captions[c]``: 1-d token ids ``[CLS] w.. [SEP]`` of caption ``c``;
- ``images[i]``: ``(img_feat (m, img_dim), img_pos_feat (m, 7|6|4))`` of image ``i``.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cacr.model.batch import UniterBatch
from cacr.model.pair_store import PairStore

from .distributed import all_gather_rows, rank_and_world_size

CaptionLookup = Union[Sequence[Tensor], Callable[[int], Tensor]]
ImageLookup = Union[Sequence[Tuple[Tensor, Tensor]], Callable[[int], Tuple[Tensor, Tensor]]]
ScoreFn = Callable[[UniterBatch], Tensor]


def _fetch(lookup, i: int):
    return lookup[i] if hasattr(lookup, "__getitem__") else lookup(i)


def memoized(lookup):
    """``lookup`` as a callable that fetches each index once (for scoring the same items again,
    as the exact metrics' re-scoring does: no second read of an HDF5 file per item)."""
    cache = {}

    def get(i: int):
        if i not in cache:
            cache[i] = _fetch(lookup, i)
        return cache[i]
    return get


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


def batch_plan(joint_lengths: Tensor, batch_size: int) -> List[Tensor]:
    """The batches of an evaluation: pair indices sorted by joint length (longest first,
    ties in the order given) and cut every ``batch_size``. A function of the lengths and the
    batch size alone, so every process that is given the same pairs computes the same plan."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.argsort(joint_lengths, descending=True, stable=True)
    return list(torch.split(order, batch_size))


def rank_batches(num_batches: int, rank: int, world_size: int) -> range:
    """The batches of a plan that rank ``rank`` of ``world_size`` scores: every
    ``world_size``-th from ``rank`` (round robin, so that the long batches at the head of
    the plan are spread over the ranks)."""
    return range(rank, num_batches, world_size)


def _fetch_items(pairs: Tensor, captions, images):
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
    return cap_items, cap_pos, img_items, img_pos


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
    shard: bool = False,
    group=None,
    only: Optional[Tensor] = None,
) -> Tensor:
    """Score every ``(caption, image)`` pair of ``pairs`` (``(P, 2)`` indices); returns
    ``(P,)`` float32 scores in the order of ``pairs``.

    ``score_fn(batch) -> (B,)`` is e.g. ``functools.partial(model.score, head="rank")``; a
    model it belongs to must be in eval mode. The fetched captions and images are packed
    once into a :class:`cacr.model.PairStore` on ``device`` and every batch of
    :func:`batch_plan` is cut out of it with tensor ops (``layout`` picks the batch layout;
    the tests check the batches against ``cacr.model.collate``). ``bf16`` runs the scoring
    under bf16 autocast on ``device``.

    ``shard=True`` under DDP (every rank passing the same ``pairs``): each rank scores its
    :func:`rank_batches` of the one plan and every rank gets all ``P`` scores back, the same
    bits as one process would compute. Without a process group ``shard`` changes nothing.

    ``only`` (indices into ``pairs``): score just the batches of the plan that hold these
    pairs, exactly as the whole evaluation would (the same neighbours, widths and bits);
    the other entries of the result are NaN. The exact metrics use it to settle what fp32
    arithmetic itself barely resolves (:mod:`cacr.evaluation.exact`).
    """
    owner = _owner_module(score_fn)
    if owner is not None and owner.training:
        raise ValueError("score_pairs: the model is in training mode (dropout on); call model.eval()")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = _as_pairs(pairs)
    P = pairs.shape[0]
    if P == 0:
        return torch.empty(0, dtype=torch.float32)
    device = torch.device(device)
    rank, world = rank_and_world_size(group) if shard else (0, 1)

    cap_items, cap_pos, img_items, img_pos = _fetch_items(pairs, captions, images)
    txt_len = torch.tensor([c.numel() for c in cap_items])[cap_pos]  # (P,)
    num_bb = torch.tensor([f.shape[0] for f, _ in img_items])[img_pos]  # (P,)
    plan = batch_plan(txt_len + num_bb, batch_size)
    chosen = list(range(len(plan)))
    if only is not None:
        batch_of = torch.empty(P, dtype=torch.long)
        batch_of[torch.cat(plan)] = torch.arange(P) // batch_size  # every batch but the last holds batch_size
        chosen = torch.unique(batch_of[torch.as_tensor(only, dtype=torch.long)]).tolist()
    plan = [plan[b] for b in chosen]
    mine = [plan[b] for b in rank_batches(len(plan), rank, world)]
    n_mine = sum(len(idx) for idx in mine)

    store = PairStore.from_examples(cap_items, img_items, layout=layout).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    weights = contextlib.nullcontext()  # bf16: a model that can hold its autocast weights in bf16 does so
    if bf16 and owner is not None and hasattr(owner, "low_precision_weights"):
        weights = owner.low_precision_weights(torch.bfloat16)
    bar = tqdm(total=n_mine, desc=desc, unit="pair", unit_scale=True, disable=not progress, dynamic_ncols=True)
    local = torch.empty(n_mine, dtype=torch.float32, device=device)  # filled on the device: no sync per batch
    at = 0
    with torch.inference_mode(), weights, autocast, bar:
        for idx in mine:
            batch = store.batch(cap_pos[idx], img_pos[idx])
            s = score_fn(batch.to(device, non_blocking=True))
            if s.shape != (len(idx),):
                raise ValueError(f"score_fn returned shape {tuple(s.shape)} for a batch of {len(idx)} pairs")
            local[at:at + len(idx)] = s.float()
            at += len(idx)
            bar.update(len(idx))
    local = local.cpu()
    out = torch.full((P,), float("nan")) if only is not None else torch.empty(P, dtype=torch.float32)
    if not plan:
        return out
    if world == 1:
        out[torch.cat(mine)] = local
        return out
    gathered = all_gather_rows(local, group)  # rank 0's batches, then rank 1's, ...
    where = torch.cat([plan[b] for r in range(world) for b in rank_batches(len(plan), r, world)])
    if gathered.shape[0] != where.shape[0]:
        raise ValueError(f"score_pairs: gathered {gathered.shape[0]} scores from the ranks, expected {where.shape[0]}")
    out[where] = gathered
    return out


def _count(lookup, n: Optional[int], what: str) -> int:
    if n is not None:
        return n
    if hasattr(lookup, "__len__"):
        return len(lookup)
    raise ValueError(f"{what}: a callable lookup needs its count (num_{what}=...)")


def all_pairs(num_captions: int, num_images: int) -> Tensor:
    """``(Nc * Ni, 2)``: every caption against every image, row-major (caption-major)."""
    c = torch.arange(num_captions)
    return torch.stack([c.repeat_interleave(num_images), torch.arange(num_images).repeat(num_captions)], dim=1)


def winoground_pairs(num_examples: int) -> Tensor:
    """``(4N, 2)``: the pairs ``(2n + k, 2n + j)`` of every example ``n``, in ``[n, k, j]`` order."""
    n = torch.arange(num_examples)
    k = torch.tensor([0, 0, 1, 1])
    j = torch.tensor([0, 1, 0, 1])
    return torch.stack([(2 * n[:, None] + k).flatten(), (2 * n[:, None] + j).flatten()], dim=1)


def score_matrix(
    score_fn: ScoreFn,
    captions: CaptionLookup,
    images: ImageLookup,
    *,
    num_captions: Optional[int] = None,
    num_images: Optional[int] = None,
    group=None,
    progress: bool = False,
    **kwargs,
) -> Tensor:
    """The ``(Nc, Ni)`` matrix of every caption against every image.

    Under DDP the ranks share the batches of one plan (:func:`score_pairs` with
    ``shard=True``) and every rank returns the whole matrix. ``kwargs`` go to
    :func:`score_pairs`; the progress bar shows on rank 0 only.
    """
    Nc = _count(captions, num_captions, "captions")
    Ni = _count(images, num_images, "images")
    rank, _ = rank_and_world_size(group)
    return score_pairs(score_fn, all_pairs(Nc, Ni), captions, images, progress=progress and rank == 0,
                       desc="retrieval", shard=True, group=group, **kwargs).view(Nc, Ni)


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
    ``n``; sharded across DDP ranks as :func:`score_matrix` is, returned on every rank."""
    rank, _ = rank_and_world_size(group)
    return score_pairs(score_fn, winoground_pairs(num_examples), captions, images,
                       progress=progress and rank == 0, desc="winoground", shard=True, group=group,
                       **kwargs).view(num_examples, 2, 2)
