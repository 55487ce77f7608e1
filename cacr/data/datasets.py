"""Region sources (lazy HDF5, in-memory store), retrieval splits, training pools with negative
sampling, and the Winoground-format set.

A pair is a ``cacr.model.PairExample`` (``input_ids`` with [CLS]/[SEP]); training and
evaluation batch pairs from a ``cacr.model.PairStore`` built from these objects.

Negatives (docs/reference.md §2): for a positive caption ``t`` the candidate images are every image of
the split except ``t``'s own; for a positive image ``j`` the candidate captions are every
kept training caption (``TrainPools.positives``) except ``j``'s captions;
``cacr.data.negatives.NegativeSampler`` draws them (random negatives: ``k = 31``; a mining
pool: ``k = 399``).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from cacr.model import PairExample
from cacr.winoground import WinogroundExample, read_winoground_examples

from .formats import CaptionsTable, FormatError, RegionsFile

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ region caps


@dataclass(frozen=True)
class RegionCaps:
    """Official region caps: keep ``clamp(#(conf > conf_th), min_bb, max_bb)`` leading rows.

    Applied only where a file has confidences (rows sorted by confidence, as the official
    DBs store them); without confidences every row is kept.
    """

    conf_th: float = 0.2
    min_bb: int = 10
    max_bb: int = 100

    def kept_counts(self, offsets: np.ndarray, conf: Optional[np.ndarray]) -> np.ndarray:
        counts = np.diff(offsets)
        if conf is None:
            return counts
        above = np.concatenate([[0], np.cumsum(np.asarray(conf, dtype=np.float32) > self.conf_th)])
        n = above[offsets[1:]] - above[offsets[:-1]]  # (N,) rows above the threshold per image
        return np.minimum(np.clip(n, self.min_bb, self.max_bb), counts)


# ------------------------------------------------------------------ region sources


class LazyRegions:
    """Regions read from the HDF5 file on demand (one contiguous read per image, caps applied)."""

    def __init__(self, file: Union[RegionsFile, str, Path], caps: Optional[RegionCaps] = RegionCaps()):
        self.file = file if isinstance(file, RegionsFile) else RegionsFile(file)
        conf = None
        if caps is not None and self.file.has_conf:
            conf = self.file._handle()["conf"][:]
        self.num_regions = (caps or RegionCaps()).kept_counts(self.file.offsets, conf if caps else None)
        self.file.close()  # reopened lazily where it is used (worker processes)

    @property
    def image_ids(self) -> List[str]:
        return self.file.image_ids

    @property
    def feature_dim(self) -> int:
        return self.file.feature_dim

    def __len__(self) -> int:
        return len(self.file)

    def index(self, image_id: str) -> int:
        return self.file.index(image_id)

    def get(self, i: int) -> Tuple[Tensor, Tensor]:
        """``(features (m, D) fp16, boxes (m, 6) fp32)`` of image ``i``."""
        feat, box, _ = self.file.datasets()
        a = int(self.file.offsets[i])
        b = a + int(self.num_regions[i])
        return torch.from_numpy(feat[a:b]), torch.from_numpy(box[a:b])


class RegionStore:
    """All (capped) regions of a file in memory as flat tensors, optionally on a GPU.

    ``get(i)`` returns views; ``gather(idx)`` builds padded ``(k, M, D)`` blocks for many
    images with one ``index_select`` (the region fetch of a mining step): the flat tensors
    carry one extra all-zero row that padding positions read.
    """

    def __init__(self, image_ids: List[str], features_padded: Tensor, boxes_padded: Tensor, offsets: Tensor):
        R = int(offsets[-1])
        if features_padded.shape[0] != R + 1 or boxes_padded.shape[0] != R + 1:
            raise ValueError(f"region store: expected {R + 1} rows (R regions + a zero row), "
                             f"got {features_padded.shape[0]} and {boxes_padded.shape[0]}")
        self.image_ids = image_ids
        self._feat = features_padded  # (R+1, D) fp16, last row zeros
        self._box = boxes_padded  # (R+1, 6) fp32, last row zeros
        self.offsets = offsets  # (N+1,) long
        self.num_regions = (offsets[1:] - offsets[:-1]).cpu().numpy()
        self._counts = offsets[1:] - offsets[:-1]
        self._index = {s: i for i, s in enumerate(image_ids)}
        self.feature_dim = features_padded.shape[1]

    @property
    def features(self) -> Tensor:
        return self._feat[:-1]  # (R, D)

    @property
    def boxes(self) -> Tensor:
        return self._box[:-1]  # (R, 6)

    @classmethod
    def from_file(cls, file: Union[RegionsFile, str, Path], caps: Optional[RegionCaps] = RegionCaps(),
                  device="cpu") -> "RegionStore":
        file = file if isinstance(file, RegionsFile) else RegionsFile(file)
        fds, bds, cds = file.datasets()
        R, D = fds.shape
        feat = np.empty((R + 1, D), dtype=np.float16)
        box = np.empty((R + 1, bds.shape[1]), dtype=np.float32)
        try:
            if R:
                fds.read_direct(feat, np.s_[0:R], np.s_[0:R])
                bds.read_direct(box, np.s_[0:R], np.s_[0:R])
            conf = cds[:] if cds is not None else None
        except OSError as e:  # a Fletcher-32 checksum that does not match: corrupted bytes
            file.close()
            raise FormatError(file.path, [f"features, boxes or conf: checksum mismatch or unreadable bytes ({e}); "
                                          f"the file is corrupted (python -m cacr.data.validate names the rows)"]) from None
        feat[R], box[R] = 0, 0
        file.close()
        kept = (caps or RegionCaps()).kept_counts(file.offsets, conf if caps else None)
        if (kept != file.counts).any():
            rows = np.concatenate([np.arange(a, a + k) for a, k in zip(file.offsets[:-1], kept)] + [[R]])
            feat, box = feat[rows], box[rows]
        offsets = np.zeros(len(kept) + 1, dtype=np.int64)
        np.cumsum(kept, out=offsets[1:])
        return cls(list(file.image_ids), torch.from_numpy(feat).to(device), torch.from_numpy(box).to(device),
                   torch.from_numpy(offsets).to(device))

    def __len__(self) -> int:
        return len(self.image_ids)

    def index(self, image_id: str) -> int:
        try:
            return self._index[image_id]
        except KeyError:
            raise KeyError(f"region store: unknown image {image_id!r}") from None

    def get(self, i: int) -> Tuple[Tensor, Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self._feat[a:b], self._box[a:b]

    def gather(self, idx: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(features (k, M, D), boxes (k, M, 6), num_regions (k,))`` for images ``idx``, zero padded."""
        idx = idx.to(self.offsets.device)
        start = self.offsets[idx]  # (k,)
        num = self._counts[idx]  # (k,)
        M = int(num.max()) if idx.numel() else 0
        ar = torch.arange(M, device=idx.device)
        pad_row = self._feat.shape[0] - 1
        rows = torch.where(ar[None, :] < num[:, None], start[:, None] + ar[None, :], pad_row)  # (k, M)
        feat = self._feat.index_select(0, rows.flatten()).view(len(idx), M, -1)  # (k, M, D)
        box = self._box.index_select(0, rows.flatten()).view(len(idx), M, -1)  # (k, M, 6)
        return feat, box, num


RegionSource = Union[LazyRegions, RegionStore]


def open_regions(path, caps: Optional[RegionCaps] = RegionCaps(), in_memory: bool = True,
                 device="cpu") -> RegionSource:
    return RegionStore.from_file(path, caps, device) if in_memory else LazyRegions(path, caps)


# ------------------------------------------------------------------ splits


@dataclass
class RetrievalSplit:
    """One split's captions and images: every caption x image pair can be scored.

    Captions are indexed ``0..num_texts-1`` and images ``0..num_images-1`` within the split;
    ``txt2img[t]`` is caption ``t``'s image; ``img2txts[j]`` lists image ``j``'s captions.
    """

    name: str
    caption_ids: List[str]
    texts: List[Tensor]  # each (t,) long with [CLS]/[SEP]
    txt2img: Tensor  # (N_txt,) long
    image_ids: List[str]
    image_rows: Tensor  # (N_img,) long: row of each image in ``regions``
    regions: RegionSource

    @property
    def num_texts(self) -> int:
        return len(self.texts)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @functools.cached_property
    def img2txts(self) -> List[List[int]]:
        out: List[List[int]] = [[] for _ in range(self.num_images)]
        for t, j in enumerate(self.txt2img.tolist()):
            out[j].append(t)
        return out

    def image(self, j: int) -> Tuple[Tensor, Tensor]:
        return self.regions.get(int(self.image_rows[j]))

    def pair(self, t: int, j: int) -> PairExample:
        feat, box = self.image(j)
        return PairExample(self.texts[t], feat, box)

    def subset(self, max_images: Optional[int]) -> "RetrievalSplit":
        """The first ``max_images`` images and all their captions (validation for speed)."""
        if max_images is None or max_images >= self.num_images:
            return self
        keep = (self.txt2img < max_images).nonzero().flatten()
        return RetrievalSplit(self.name, [self.caption_ids[i] for i in keep.tolist()],
                              [self.texts[i] for i in keep.tolist()], self.txt2img[keep],
                              self.image_ids[:max_images], self.image_rows[:max_images], self.regions)


def build_split(name: str, captions: CaptionsTable, regions: RegionSource, split: str) -> RetrievalSplit:
    """All captions of ``split`` (in file order) and their images (in order of first mention)."""
    rows = [i for i, s in enumerate(captions.splits) if s == split]
    if not rows:
        raise ValueError(f"{captions.path}: no captions with split {split!r} "
                         f"(splits present: {sorted(set(captions.splits))})")
    img_of: Dict[str, int] = {}
    txt2img = []
    for i in rows:
        txt2img.append(img_of.setdefault(captions.image_ids[i], len(img_of)))
    image_ids = list(img_of)
    missing = {s for s in image_ids if _missing(regions, s)}
    if missing:
        raise FormatError(captions.path, [f"caption {captions.caption_ids[i]!r}: unknown image "
                                          f"{captions.image_ids[i]!r} (not in the regions file)"
                                          for i in rows if captions.image_ids[i] in missing])
    cls_id, sep_id = captions.cls_id, captions.sep_id
    texts = [torch.tensor([cls_id, *captions.tokens(i).tolist(), sep_id], dtype=torch.long) for i in rows]
    return RetrievalSplit(name=split, caption_ids=[captions.caption_ids[i] for i in rows], texts=texts,
                          txt2img=torch.tensor(txt2img, dtype=torch.long), image_ids=image_ids,
                          image_rows=torch.tensor([regions.index(s) for s in image_ids], dtype=torch.long),
                          regions=regions)


def _missing(regions, image_id) -> bool:
    try:
        regions.index(image_id)
        return False
    except KeyError:
        return True


# ------------------------------------------------------------------ training


class TrainPools:
    """Positives and the negative pools of the training split.

    ``positives``: caption indices (within ``split``) kept for training (at most
    ``max_txt_len`` word pieces); negative captions are drawn from the same kept captions.
    """

    def __init__(self, split: RetrievalSplit, max_txt_len: Optional[int] = 60):
        self.split = split
        lens = torch.tensor([t.numel() - 2 for t in split.texts])
        keep = lens <= max_txt_len if max_txt_len is not None else torch.ones_like(lens, dtype=torch.bool)
        self.positives = keep.nonzero().flatten()  # (P,) long
        self.num_dropped = int((~keep).sum())
        if self.num_dropped:
            log.info("training split %r: dropped %d of %d captions longer than max_txt_len=%s word pieces",
                     split.name, self.num_dropped, len(lens), max_txt_len)
        self.txt2img = split.txt2img

    @property
    def num_images(self) -> int:
        return self.split.num_images


# ------------------------------------------------------------------ Winoground


def winoground_problems(examples: Sequence[WinogroundExample], image_ids, where) -> List[str]:
    """Every example whose image is not among ``image_ids`` (those of the regions file
    ``where``), ``[]`` if none."""
    known = set(image_ids)
    return [f"example {ex.id!r}: image {getattr(ex, k)!r} ({k}) missing from {where}"
            for ex in examples for k in ("image_0", "image_1") if getattr(ex, k) not in known]


class WinogroundSet:
    """Winoground-format examples (:class:`cacr.winoground.WinogroundExample`, as read from
    ``examples.jsonl``) with their regions and tokenized captions.

    ``texts[e][c]``: caption ``c`` of example ``e`` as ``[CLS] w.. [SEP]``;
    ``image_rows[2e + i]``: the row of example ``e``'s ``image_i`` in ``regions``;
    ``pair(e, c, i)``: the pair (caption_c, image_i) of example ``e``.
    """

    def __init__(self, examples_path, regions_path, tokenizer, caps: Optional[RegionCaps] = RegionCaps(),
                 in_memory: bool = True):
        self.examples: List[WinogroundExample] = read_winoground_examples(examples_path)
        self.regions = open_regions(regions_path, caps, in_memory)
        problems = winoground_problems(self.examples, self.regions.image_ids, regions_path)
        if problems:
            raise FormatError(examples_path, problems)
        self.image_rows = torch.tensor([self.regions.index(getattr(ex, f"image_{i}"))
                                        for ex in self.examples for i in (0, 1)], dtype=torch.long)  # (2N,)
        self.texts = [[torch.tensor(tokenizer.with_specials(tokenizer.encode(getattr(ex, f"caption_{c}"))),
                                    dtype=torch.long) for c in (0, 1)] for ex in self.examples]
        for ex, pair in zip(self.examples, self.texts):
            for c, t in enumerate(pair):
                if t.numel() < 3:
                    raise FormatError(examples_path, [f"example {ex.id!r}: caption_{c} has no word pieces"])

    def __len__(self) -> int:
        return len(self.examples)

    def image(self, i: int) -> Tuple[Tensor, Tensor]:
        """``(features, boxes)`` of image ``i = 2e + j``: example ``e``'s ``image_j``."""
        return self.regions.get(int(self.image_rows[i]))

    def pair(self, e: int, c: int, i: int) -> PairExample:
        feat, box = self.image(2 * e + i)
        return PairExample(self.texts[e][c], feat, box)
