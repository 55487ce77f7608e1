"""Batches of (caption, image) pairs for UNITER, and the collate function that builds them.

One example is ``PairExample(input_ids, img_feat, img_pos_feat)``:

- ``input_ids``: 1-d integer tensor ``[CLS] w_1 .. w_n [SEP]`` (the tokenizer adds the
  special tokens; at least one word piece);
- ``img_feat``: ``(m, img_dim)`` region features (any float dtype; fp16 is kept as is, the
  model casts), ``m >= 1``;
- ``img_pos_feat``: ``(m, 7)`` boxes ``[x1, y1, x2, y2, w, h, w*h]`` normalised by the image
  size. ``(m, 6)`` boxes (the official DBs' ``norm_bb``) get ``w*h`` appended and ``(m, 4)``
  boxes ``[x1, y1, x2, y2]`` get ``w = x2-x1``, ``h = y2-y1`` and ``w*h`` appended.

The joint sequence of example ``b`` holds its ``t_b`` text tokens and ``m_b`` regions. Two
layouts give identical outputs on valid positions (position information is added before
concatenation and the attention mask is key-side only):

- ``compact`` (the official one): ``[CLS] w.. [SEP] r_1..r_m`` then tail padding, length
  ``max_b(t_b + m_b)``; least padding, so the fastest;
- ``padded``: ``[text padded to max t | regions padded to max m]``, length ``max t + max m``.

The model embeds text ``(B, Lt)`` and regions ``(B, Lv)`` separately, concatenates them to
``(B, Lt + Lv)`` and, in the compact layout, gathers ``gather_index`` ``(B, L)`` out of it.
``word_index`` / ``region_index`` give the joint-sequence position of every word (without
[CLS]/[SEP]) and every region, padded with 0 and masked by ``word_mask`` / ``region_mask``:
the regularizers use them to cut the relation blocks out of the last layer's attention.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

LAYOUTS = ("compact", "padded")


class PairExample(NamedTuple):
    """One (caption, image) pair before batching."""

    input_ids: Tensor  # (t,) with [CLS] and [SEP]
    img_feat: Tensor  # (m, img_dim)
    img_pos_feat: Tensor  # (m, 7), (m, 6) or (m, 4)


@dataclass
class UniterBatch:
    """A batch of pairs in one of the two layouts (see the module docstring)."""

    input_ids: Tensor  # (B, Lt) long, padded with 0
    position_ids: Tensor  # (1, Lt) long
    img_feat: Tensor  # (B, Lv, img_dim), zero padded
    img_pos_feat: Tensor  # (B, Lv, 7), zero padded
    attn_mask: Tensor  # (B, L) bool, True on valid joint positions
    gather_index: Optional[Tensor]  # (B, L) long into cat(text, image); None = padded layout
    txt_lens: Tensor  # (B,) long, text tokens including [CLS]/[SEP]
    num_bbs: Tensor  # (B,) long, regions
    word_index: Tensor  # (B, n) long, joint positions of the words
    word_mask: Tensor  # (B, n) bool
    region_index: Tensor  # (B, m) long, joint positions of the regions
    region_mask: Tensor  # (B, m) bool
    layout: str = "compact"

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device, non_blocking: bool = False) -> "UniterBatch":
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), Tensor)
            },
        )

    def pin_memory(self) -> "UniterBatch":
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).pin_memory()
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), Tensor)
            },
        )


def boxes_to_7d(boxes: Tensor, *, where: str = "boxes") -> Tensor:
    """Return ``(m, 7)`` box features from ``(m, 7)``, ``(m, 6)`` or ``(m, 4)`` normalised boxes."""
    if boxes.dim() != 2 or boxes.shape[1] not in (4, 6, 7):
        raise ValueError(
            f"{where}: expected boxes of shape (m, 7), (m, 6) or (m, 4), got {tuple(boxes.shape)}"
        )
    boxes = boxes.float()
    if boxes.shape[1] == 7:
        return boxes
    if boxes.shape[1] == 4:
        w = boxes[:, 2] - boxes[:, 0]
        h = boxes[:, 3] - boxes[:, 1]
        boxes = torch.cat([boxes, w[:, None], h[:, None]], dim=1)
    return torch.cat([boxes, (boxes[:, 4] * boxes[:, 5])[:, None]], dim=1)


def _check_example(i: int, ex: PairExample, img_dim: Optional[int], max_txt_positions: Optional[int]):
    ids, feat, pos = ex
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.dtype.is_floating_point:
        raise ValueError(f"example {i}: input_ids must be a 1-d integer tensor, got {_describe(ids)}")
    if ids.numel() < 3:
        raise ValueError(
            f"example {i}: empty text: expected [CLS], at least one word piece and [SEP], "
            f"got {ids.numel()} token(s)"
        )
    if max_txt_positions is not None and ids.numel() > max_txt_positions:
        raise ValueError(
            f"example {i}: text of {ids.numel()} tokens is longer than "
            f"max_position_embeddings={max_txt_positions}"
        )
    if not isinstance(feat, Tensor) or feat.dim() != 2 or not feat.dtype.is_floating_point:
        raise ValueError(f"example {i}: img_feat must be a 2-d float tensor (m, img_dim), got {_describe(feat)}")
    if feat.shape[0] == 0:
        raise ValueError(f"example {i}: zero regions: expected at least one region feature")
    if img_dim is not None and feat.shape[1] != img_dim:
        raise ValueError(f"example {i}: region features have width {feat.shape[1]}, expected img_dim={img_dim}")
    if not torch.isfinite(feat).all():
        bad = (~torch.isfinite(feat)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"example {i}: NaN or Inf in region features (rows {bad[:10]})")
    if not isinstance(pos, Tensor) or pos.dim() != 2 or pos.shape[0] != feat.shape[0]:
        raise ValueError(
            f"example {i}: img_pos_feat must be (m, 7) with m={feat.shape[0]} regions, got {_describe(pos)}"
        )
    if not torch.isfinite(pos).all():
        raise ValueError(f"example {i}: NaN or Inf in boxes")


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def collate(
    examples: Sequence[PairExample],
    *,
    layout: str = "compact",
    img_dim: Optional[int] = None,
    max_txt_positions: Optional[int] = None,
    check_finite: bool = True,
) -> UniterBatch:
    """Stack ``examples`` into a :class:`UniterBatch`.

    ``img_dim`` and ``max_txt_positions`` (the model's ``max_position_embeddings``) are
    checked when given; every problem raises ``ValueError`` naming the example index.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if len(examples) == 0:
        raise ValueError("collate: got an empty list of examples")
    prepared = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, (tuple, list)) or len(ex) != 3:
            raise ValueError(f"example {i}: expected (input_ids, img_feat, img_pos_feat), got {type(ex).__name__}")
        ex = PairExample(*ex)
        if check_finite:
            _check_example(i, ex, img_dim, max_txt_positions)
        prepared.append(
            PairExample(ex.input_ids.long(), ex.img_feat, boxes_to_7d(ex.img_pos_feat, where=f"example {i}"))
        )

    B = len(prepared)
    txt_lens = torch.tensor([ex.input_ids.numel() for ex in prepared], dtype=torch.long)
    num_bbs = torch.tensor([ex.img_feat.shape[0] for ex in prepared], dtype=torch.long)
    Lt, Lv = int(txt_lens.max()), int(num_bbs.max())
    feat_dtype = prepared[0].img_feat.dtype
    D = prepared[0].img_feat.shape[1]
    for i, ex in enumerate(prepared):
        if ex.img_feat.shape[1] != D:
            raise ValueError(f"example {i}: region feature width {ex.img_feat.shape[1]} differs from example 0's {D}")

    input_ids = torch.zeros(B, Lt, dtype=torch.long)
    img_feat = torch.zeros(B, Lv, D, dtype=feat_dtype)
    img_pos_feat = torch.zeros(B, Lv, 7, dtype=torch.float32)
    for b, ex in enumerate(prepared):
        input_ids[b, : ex.input_ids.numel()] = ex.input_ids
        img_feat[b, : ex.img_feat.shape[0]] = ex.img_feat
        img_pos_feat[b, : ex.img_feat.shape[0]] = ex.img_pos_feat

    if layout == "compact":
        L = int((txt_lens + num_bbs).max())
        ar = torch.arange(L)[None, :]  # (1, L)
        t = txt_lens[:, None]
        # joint position p < t_b reads text token p; p >= t_b reads region p - t_b,
        # which sits at Lt + (p - t_b) in cat(text, image). Tail padding reads anything
        # valid-shaped (it is masked out of every key and never read back).
        gather_index = torch.where(ar < t, ar, Lt + ar - t).clamp(max=Lt + Lv - 1)
        attn_mask = ar < (txt_lens + num_bbs)[:, None]
        region_offset = txt_lens  # (B,)
    else:
        L = Lt + Lv
        ar_t = torch.arange(Lt)[None, :]
        ar_v = torch.arange(Lv)[None, :]
        attn_mask = torch.cat([ar_t < txt_lens[:, None], ar_v < num_bbs[:, None]], dim=1)
        gather_index = None
        region_offset = torch.full((B,), Lt, dtype=torch.long)

    n = int(txt_lens.max()) - 2
    word_mask = torch.arange(n)[None, :] < (txt_lens - 2)[:, None]
    word_index = torch.where(word_mask, 1 + torch.arange(n)[None, :], 0)
    region_mask = torch.arange(Lv)[None, :] < num_bbs[:, None]
    region_index = torch.where(region_mask, region_offset[:, None] + torch.arange(Lv)[None, :], 0)

    return UniterBatch(
        input_ids=input_ids,
        position_ids=torch.arange(Lt, dtype=torch.long)[None, :],
        img_feat=img_feat,
        img_pos_feat=img_pos_feat,
        attn_mask=attn_mask,
        gather_index=gather_index,
        txt_lens=txt_lens,
        num_bbs=num_bbs,
        word_index=word_index,
        word_mask=word_mask,
        region_index=region_index,
        region_mask=region_mask,
        layout=layout,
    )
