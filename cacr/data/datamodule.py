"""LightningDataModule for image-text retrieval on the synthetic world or converted real data.

Built from a ``conf/data/*.yaml`` group option (``RetrievalDataModule.from_config``). After
``setup()`` it exposes the splits, the training pools the module draws negatives from,
and the Winoground-format set. Loaders shard rows themselves (``shard_rows`` for
evaluation, a seeded ``DistributedSampler`` for training), so the Trainer must be built
with ``use_distributed_sampler=False``: evaluation then sees every pair exactly once.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from cacr.model import PairStore, UniterCollator, boxes_to_7d
from cacr.paths import resolve_path

from .datasets import (AllPairs, IndexedCollator, PositivePairs, RegionCaps, RegionStore, RetrievalSplit, TrainPools,
                       WinogroundPairs, WinogroundSet, build_split, open_regions, shard_rows)
from .formats import read_captions
from .negatives import NegativeSampler, SceneTruth, truth_for_split
from .synthetic import SyntheticConfig, ensure_synthetic, load_scenes
from .tokenizer import WordPieceTokenizer

log = logging.getLogger(__name__)

CONFIG_KEYS = ("name", "source", "root", "regions", "captions", "tokenizer", "winoground_examples",
               "winoground_regions", "vocab_size", "img_dim", "train_split", "val_split", "test_split",
               "conf_th", "min_bb", "max_bb", "max_txt_len", "batch_size", "eval_batch_size", "num_workers",
               "in_memory", "store_device", "val_max_images", "seed", "p_hard", "synthetic")


class RetrievalDataModule(pl.LightningDataModule):
    def __init__(self, *, name: str, source: str, root: Optional[str], regions: Optional[str],
                 captions: Optional[str], tokenizer: Optional[str], winoground_examples: Optional[str],
                 winoground_regions: Optional[str], vocab_size: int, img_dim: int, train_split: str = "train",
                 val_split: str = "val", test_split: str = "test", conf_th: float = 0.2, min_bb: int = 10,
                 max_bb: int = 100, max_txt_len: Optional[int] = 60, batch_size: int = 8,
                 eval_batch_size: int = 256, num_workers: int = 0, in_memory: bool = True,
                 store_device: str = "cpu", val_max_images: Optional[int] = None, seed: int = 42,
                 p_hard: float = 0.0, synthetic: Optional[Mapping[str, Any]] = None, collator: Optional[UniterCollator] = None):
        super().__init__()
        if source not in ("synthetic", "files"):
            raise ValueError(f"data.source must be 'synthetic' or 'files', got {source!r}")
        self.name, self.source = name, source
        self.root = resolve_path(root)
        self.paths = {k: resolve_path(v) for k, v in dict(regions=regions, captions=captions,
                                                            winoground_examples=winoground_examples,
                                                            winoground_regions=winoground_regions).items()}
        self.tokenizer_spec = tokenizer
        self.vocab_size, self.img_dim = int(vocab_size), int(img_dim)
        self.split_names = dict(train=train_split, val=val_split, test=test_split)
        self.caps = RegionCaps(conf_th, min_bb, max_bb)
        self.max_txt_len = max_txt_len
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.in_memory, self.store_device = in_memory, store_device
        self.val_max_images = val_max_images
        self.seed = seed
        self.p_hard = float(p_hard)
        self.synthetic_cfg = SyntheticConfig(img_dim=self.img_dim, vocab_size=self.vocab_size,
                                             **dict(synthetic or {})) if source == "synthetic" else None
        self.collator = IndexedCollator(collator or UniterCollator(img_dim=self.img_dim))
        self.splits: dict = {}
        self.train_pools: Optional[TrainPools] = None
        self.winoground: Optional[WinogroundSet] = None
        self.train_truth: Optional[SceneTruth] = None  # synthetic worlds: which captions are true of which images
        self.tokenizer: Optional[WordPieceTokenizer] = None
        self.regions = self.mining_regions = None
        self._ready = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], collator: Optional[UniterCollator] = None) -> "RetrievalDataModule":
        cfg = dict(cfg)
        unknown = sorted(set(cfg) - set(CONFIG_KEYS))
        missing = sorted(set(CONFIG_KEYS) - set(cfg))
        if unknown or missing:
            raise ValueError(f"data config: unknown keys {unknown}, missing keys {missing}")
        return cls(**cfg, collator=collator)

    # ---------------------------------------------------------------- setup
    def prepare_data(self) -> None:
        if self.source == "synthetic":
            ensure_synthetic(self.synthetic_cfg, self.root)

    def _resolve_files(self) -> None:
        if self.source == "synthetic":
            sp = ensure_synthetic(self.synthetic_cfg, self.root)
            self.paths = dict(regions=sp.regions, captions=sp.captions, winoground_examples=sp.winoground_examples,
                              winoground_regions=sp.winoground_regions, scenes=sp.scenes)
            self.tokenizer_spec = str(sp.vocab)
        for k in ("regions", "captions"):
            if self.paths[k] is None:
                raise ValueError(f"data.{k} is not set: give the path of the {k} HDF5 file (see data/README.md)")
            if not self.paths[k].is_file():
                raise FileNotFoundError(f"data.{k}: {self.paths[k]} not found (see data/README.md to make it)")

    def setup(self, stage: Optional[str] = None) -> None:
        if self._ready:
            return
        self._resolve_files()
        regions = open_regions(self.paths["regions"], self.caps, self.in_memory)
        self.regions = regions
        # the copy the training module gathers mined candidates from (GPU if store_device says so)
        self.mining_regions = regions.to(self.store_device) if self.in_memory else regions
        if regions.feature_dim != self.img_dim:
            raise ValueError(f"{self.paths['regions']}: features have width {regions.feature_dim}, "
                             f"data.img_dim is {self.img_dim}")
        captions = read_captions(self.paths["captions"])
        if len(captions.vocab) > self.vocab_size:
            raise ValueError(f"{self.paths['captions']}: tokenizer vocabulary of {len(captions.vocab)} exceeds "
                             f"data.vocab_size={self.vocab_size}")
        self.tokenizer = (WordPieceTokenizer.load(self.tokenizer_spec) if self.tokenizer_spec else
                          WordPieceTokenizer(captions.vocab, name=str(captions.attrs.get("tokenizer")),
                                             do_lower_case=bool(captions.attrs.get("do_lower_case", False))))
        present = set(captions.splits)
        for role, split in self.split_names.items():
            if split in present:
                self.splits[role] = build_split(self.name, captions, regions, split)
        if "train" in self.splits:
            self.train_pools = TrainPools(self.splits["train"], self.max_txt_len)
            scenes_path = self.paths.get("scenes")
            if scenes_path is not None:
                text_of = dict(zip(captions.caption_ids, captions.texts))
                self.train_truth = truth_for_split(self.splits["train"], text_of, load_scenes(scenes_path),
                                                   where=str(scenes_path))
        we, wr = self.paths["winoground_examples"], self.paths["winoground_regions"]
        if we is not None and wr is not None:
            self.winoground = WinogroundSet(we, wr, self.tokenizer, self.caps, self.in_memory)
        self._ready = True

    # ---------------------------------------------------------------- access
    def split(self, role: str) -> RetrievalSplit:
        """``role`` in train / val / test; validation is cut to ``val_max_images`` images."""
        if role not in self.splits:
            raise ValueError(f"data {self.name!r}: no {role} split "
                             f"({self.split_names[role]!r} not among the captions' splits)")
        s = self.splits[role]
        return s.subset(self.val_max_images) if role == "val" else s

    def negative_sampler(self) -> NegativeSampler:
        """How training draws negative candidates: never a true match (with a scene truth), and
        compositional hard negatives with probability ``p_hard`` (:mod:`cacr.data.negatives`)."""
        if self.train_pools is None:
            raise ValueError(f"data {self.name!r}: no training split")
        pools = self.train_pools
        return NegativeSampler(pools.txt2img, pools.positives, pools.num_images, self.train_truth, self.p_hard)

    def txt2img(self, role: str) -> torch.Tensor:
        """``(N_txt,)`` long: the image index (within the split) of every caption of ``role``."""
        return self.split(role).txt2img

    def pair_store(self, role: str, layout: str = "compact") -> PairStore:
        """Every caption and image of ``role`` as a ``cacr.model.PairStore`` on the CPU (captions
        padded, regions flat); caption ``t`` / image ``j`` are the split's indices."""
        s = self.split(role)
        return _pair_store(s.texts, s.regions, s.image_rows, layout)

    def winoground_store(self, layout: str = "compact") -> PairStore:
        """The Winoground-format set as a ``PairStore``: caption ``2e + c`` is example ``e``'s
        ``caption_c`` and image ``2e + i`` its ``image_i`` (as in ``WinogroundPairs``)."""
        if self.winoground is None:
            raise ValueError(f"data {self.name!r}: no Winoground-format set configured")
        w = self.winoground
        texts = [t for pair in w.texts for t in pair]
        rows = torch.tensor([w.regions.index(ex[f"image_{i}"]) for ex in w.examples for i in (0, 1)])
        return _pair_store(texts, w.regions, rows, layout)

    def _rank(self):
        t = getattr(self, "trainer", None)
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _loader(self, ds, batch_size, shuffle: bool, sampler=None) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=self.collator,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        if self.train_pools is None:
            raise ValueError(f"data {self.name!r}: no training split")
        rank, world = self._rank()
        ds = PositivePairs(self.train_pools)
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return self._loader(ds, self.batch_size, False, sampler)

    def eval_pairs(self, role: str) -> AllPairs:
        """This rank's caption rows of ``role`` against every image (each pair on exactly one rank)."""
        s = self.split(role)
        rank, world = self._rank()
        return AllPairs(s, shard_rows(s.num_texts, rank, world))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_pairs("val"), self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_pairs("test"), self.eval_batch_size, False)

    def winoground_dataloader(self) -> DataLoader:
        if self.winoground is None:
            raise ValueError(f"data {self.name!r}: no Winoground-format set configured")
        rank, world = self._rank()
        return self._loader(WinogroundPairs(self.winoground, shard_rows(len(self.winoground), rank, world)),
                            self.eval_batch_size, False)

    def state_dict(self):
        return {"seed": self.seed}

    def load_state_dict(self, state) -> None:
        self.seed = state["seed"]


def _pair_store(texts, regions, image_rows: torch.Tensor, layout: str) -> PairStore:
    """Captions padded to the longest; the images' regions flat, one image after another."""
    T = max(t.numel() for t in texts)
    ids = torch.zeros(len(texts), T, dtype=torch.long)
    for i, t in enumerate(texts):
        ids[i, : t.numel()] = t
    txt_lens = torch.tensor([t.numel() for t in texts], dtype=torch.long)
    if isinstance(regions, RegionStore):
        rows = image_rows.to(regions.offsets.device)
        num = regions.offsets[rows + 1] - regions.offsets[rows]  # (N,)
        first = torch.repeat_interleave(regions.offsets[rows] - (torch.cumsum(num, 0) - num), num)  # (R,)
        flat = first + torch.arange(int(num.sum()), device=first.device)  # region rows, image by image
        feat, box = regions.features.index_select(0, flat), regions.boxes.index_select(0, flat)  # (R, D), (R, 6)
    else:
        imgs = [regions.get(int(r)) for r in image_rows]
        num = torch.tensor([f.shape[0] for f, _ in imgs], dtype=torch.long)
        feat = torch.cat([torch.as_tensor(f) for f, _ in imgs]).to(torch.float16)
        box = torch.cat([torch.as_tensor(b) for _, b in imgs]).float()
    return PairStore.from_flat(ids, txt_lens, feat, boxes_to_7d(box), num.cpu(), layout=layout)
