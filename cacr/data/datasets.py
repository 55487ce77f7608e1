"""Region sources (lazy HDF5, in-memory store), retrieval splits, training pools with negative
sampling, evaluation pair sets with exact DDP sharding, and the Winoground-format set.

Items are ``cacr.model.PairExample`` (``input_ids`` with [CLS]/[SEP]); datasets that the
training or evaluation code needs to locate add the caption and image indices
(``IndexedPair``), batched by ``IndexedCollator`` around ``cacr.model.UniterCollator``.

Negatives (docs/reference.md §2): for a positive caption ``t`` the candidate images are every image of
the split except ``t``'s own; for a positive image ``j`` the candidate captions are every
training caption except ``j``'s captions. ``TrainPools.sample_negative_images`` /
``sample_negative_texts`` draw ``k`` of them uniformly without replacement (random
negatives: ``k = 31``; a mining pool: ``k = 399``), batched over positives.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from cacr.model import PairExample, UniterBatch, UniterCollator
from cacr.winoground import EXAMPLE_FIELDS
from cacr.winoground import read_winoground_examples as read_examples

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

    def to(self, device) -> "RegionStore":
        return RegionStore(self.image_ids, self._feat.to(device), self._box.to(device), self.offsets.to(device))

    @property
    def device(self) -> torch.device:
        return self._feat.device

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

    def pairs(self, txt_index: Tensor, img_index: Tensor) -> List[PairExample]:
        """Examples for the pairs ``(txt_index[n], img_index[n])`` (for scoring negatives)."""
        return [self.pair(t, j) for t, j in zip(txt_index.tolist(), img_index.tolist())]

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
        self._pool_img = split.txt2img[self.positives]  # (P,) image of each pool caption

    @property
    def num_images(self) -> int:
        return self.split.num_images

    def sample_negative_images(self, txt_index: Tensor, k: int, generator: Optional[torch.Generator] = None
                               ) -> Tensor:
        """``(B, k)`` image indices, uniform without replacement, never caption ``txt_index[b]``'s image."""
        N = self.split.num_images
        if k > N - 1:
            raise ValueError(f"asked for {k} negative images per caption; the split has only {N - 1}")
        device = generator.device if generator is not None else torch.device("cpu")
        true = self.txt2img.to(device)[txt_index.to(device)]  # (B,)
        cand = torch.rand(len(true), N - 1, generator=generator, device=device).topk(k, dim=1).indices
        return cand + (cand >= true[:, None]).long()  # skip the true image

    def sample_negative_texts(self, img_index: Tensor, k: int, generator: Optional[torch.Generator] = None
                              ) -> Tensor:
        """``(B, k)`` caption indices from the kept captions, never a caption of ``img_index[b]``."""
        device = generator.device if generator is not None else torch.device("cpu")
        img_index = img_index.to(device)
        pool_img = self._pool_img.to(device)
        own = pool_img[None, :] == img_index[:, None]  # (B, P)
        avail = int((~own).sum(1).min()) if len(img_index) else 0
        if k > avail:
            raise ValueError(f"asked for {k} negative captions per image; only {avail} are available")
        r = torch.rand(own.shape, generator=generator, device=device).masked_fill(own, -1.0)
        return self.positives.to(device)[r.topk(k, dim=1).indices]


class IndexedPair(NamedTuple):
    example: PairExample
    txt_index: int
    img_index: int


class IndexedBatch(NamedTuple):
    batch: UniterBatch
    txt_index: Tensor  # (B,) long, caption index within the split
    img_index: Tensor  # (B,) long, image index within the split

    def to(self, device, non_blocking: bool = False) -> "IndexedBatch":
        return IndexedBatch(self.batch.to(device, non_blocking), self.txt_index.to(device, non_blocking),
                            self.img_index.to(device, non_blocking))


class IndexedCollator:
    """Picklable: collates ``IndexedPair``s with a ``UniterCollator`` and keeps their indices."""

    def __init__(self, collator: UniterCollator):
        self.collator = collator

    def __call__(self, items: Sequence[IndexedPair]) -> IndexedBatch:
        return IndexedBatch(self.collator([it.example for it in items]),
                            torch.tensor([it.txt_index for it in items], dtype=torch.long),
                            torch.tensor([it.img_index for it in items], dtype=torch.long))


class PositivePairs(Dataset):
    """Training items: the kept (caption, own image) pairs."""

    def __init__(self, pools: TrainPools):
        self.pools = pools
        self._pos = pools.positives.tolist()

    def __len__(self) -> int:
        return len(self._pos)

    def __getitem__(self, n: int) -> IndexedPair:
        t = self._pos[n]
        j = int(self.pools.txt2img[t])
        return IndexedPair(self.pools.split.pair(t, j), t, j)


# ------------------------------------------------------------------ evaluation


def shard_rows(n: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous share of ``n`` rows; the shares cover each row exactly once."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    return range(n * rank // world_size, n * (rank + 1) // world_size)


class AllPairs(Dataset):
    """Every (caption, image) pair of ``txt_rows`` x ``img_rows``, caption-major."""

    def __init__(self, split: RetrievalSplit, txt_rows: Optional[Sequence[int]] = None,
                 img_rows: Optional[Sequence[int]] = None):
        self.split = split
        self.txt_rows = list(range(split.num_texts) if txt_rows is None else txt_rows)
        self.img_rows = list(range(split.num_images) if img_rows is None else img_rows)

    def __len__(self) -> int:
        return len(self.txt_rows) * len(self.img_rows)

    def __getitem__(self, n: int) -> IndexedPair:
        t = self.txt_rows[n // len(self.img_rows)]
        j = self.img_rows[n % len(self.img_rows)]
        return IndexedPair(self.split.pair(t, j), t, j)


# ------------------------------------------------------------------ Winoground


def read_winoground_examples(path) -> List[dict]:
    """The examples of a Winoground-format ``examples.jsonl`` as dicts (validated by
    :func:`cacr.winoground.read_winoground_examples`; extra keys kept)."""
    return [{**ex.extra, **{k: getattr(ex, k) for k in EXAMPLE_FIELDS}} for ex in read_examples(path)]


def winoground_problems(examples_path, regions_path) -> List[str]:
    """Every Winoground example whose image is missing from the regions file (``[]`` if none)."""
    examples = read_winoground_examples(examples_path)
    known = set(RegionsFile(regions_path).image_ids)
    return [f"example {ex['id']!r}: image {ex[k]!r} ({k}) missing from {regions_path}"
            for ex in examples for k in ("image_0", "image_1") if ex[k] not in known]


class WinogroundSet:
    """Winoground-format examples with their regions; ``pair(e, c, i)`` = (caption_c, image_i) of example e."""

    def __init__(self, examples_path, regions_path, tokenizer, caps: Optional[RegionCaps] = RegionCaps(),
                 in_memory: bool = True):
        self.examples = read_winoground_examples(examples_path)
        problems = winoground_problems(examples_path, regions_path)
        if problems:
            raise FormatError(examples_path, problems)
        self.regions = open_regions(regions_path, caps, in_memory)
        self.texts = [[torch.tensor(tokenizer.with_specials(tokenizer.encode(ex[f"caption_{c}"])), dtype=torch.long)
                       for c in (0, 1)] for ex in self.examples]
        for ex, (t0, t1) in zip(self.examples, self.texts):
            for c, t in ((0, t0), (1, t1)):
                if t.numel() < 3:
                    raise FormatError(examples_path, [f"example {ex['id']!r}: caption_{c} has no word pieces"])

    def __len__(self) -> int:
        return len(self.examples)

    def pair(self, e: int, c: int, i: int) -> PairExample:
        feat, box = self.regions.get(self.regions.index(self.examples[e][f"image_{i}"]))
        return PairExample(self.texts[e][c], feat, box)


class WinogroundPairs(Dataset):
    """The 4 pairs of every example as ``IndexedPair(example, txt_index=2e+c, img_index=2e+i)``."""

    def __init__(self, wino: WinogroundSet, examples: Optional[Sequence[int]] = None):
        self.wino = wino
        self.rows = list(range(len(wino)) if examples is None else examples)

    def __len__(self) -> int:
        return 4 * len(self.rows)

    def __getitem__(self, n: int) -> IndexedPair:
        e = self.rows[n // 4]
        c, i = divmod(n % 4, 2)
        return IndexedPair(self.wino.pair(e, c, i), 2 * e + c, 2 * e + i)
