"""The LightningDataModule of a ``conf/data/*.yaml`` option: the synthetic world or converted
real data, opened through :func:`cacr.data.sources.open_data` (the reader the evaluators use).

Built with ``RetrievalDataModule.from_config``; ``setup()`` opens and checks every file before
step 0 and exposes the splits (``split``, ``pair_store``), the training pools and the
negative sampler, the tokenizer and the Winoground-format set (``winoground``). Its loaders
are those of ``cacr.train_data.TrainingDataModule``: step-indexed index batches for
training, whose features the training module gathers from a ``PairStore``; validation and
the final test score whole splits through ``cacr.evaluation.evaluators``, rows sharded
exactly across DDP ranks there.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import pytorch_lightning as pl
import torch

from cacr.model import PairStore, boxes_to_7d
from cacr.paths import resolve_path

from .datasets import RegionStore, RetrievalSplit, TrainPools, WinogroundSet
from .negatives import HARD_POOLS, NegativeSampler, SceneTruth, scene_layout, truth_for_split
from .sources import open_data, synthetic_config
from .synthetic import SyntheticConfig, SyntheticPaths, ensure_synthetic, load_scenes
from .tokenizer import WordPieceTokenizer

log = logging.getLogger(__name__)

CONFIG_KEYS = ("name", "source", "root", "regions", "captions", "tokenizer", "winoground_examples",
               "winoground_regions", "vocab_size", "img_dim", "train_split", "val_split", "test_split",
               "conf_th", "min_bb", "max_bb", "max_txt_len", "batch_size", "eval_batch_size", "num_workers",
               "in_memory", "val_max_images", "seed", "p_hard", "hard_pool", "p_swap", "synthetic")


class RetrievalDataModule(pl.LightningDataModule):
    def __init__(self, *, name: str, source: str, root: Optional[str], regions: Optional[str],
                 captions: Optional[str], tokenizer: Optional[str], winoground_examples: Optional[str],
                 winoground_regions: Optional[str], vocab_size: int, img_dim: int, train_split: str = "train",
                 val_split: str = "val", test_split: str = "test", conf_th: float = 0.2, min_bb: int = 10,
                 max_bb: int = 100, max_txt_len: Optional[int] = 60, batch_size: int = 8,
                 eval_batch_size: int = 256, num_workers: int = 0, in_memory: bool = True,
                 val_max_images: Optional[int] = None, seed: int = 42, p_hard: float = 0.0,
                 hard_pool: str = "bag", p_swap: float = 0.0, synthetic: Optional[Mapping[str, Any]] = None):
        super().__init__()
        if source not in ("synthetic", "files"):
            raise ValueError(f"data.source must be 'synthetic' or 'files', got {source!r}")
        # what open_data reads: the data config's keys that name and open the files
        self.data_config = dict(name=name, source=source, root=root, regions=regions, captions=captions,
                                tokenizer=tokenizer, winoground_examples=winoground_examples,
                                winoground_regions=winoground_regions, vocab_size=vocab_size, img_dim=img_dim,
                                train_split=train_split, val_split=val_split, test_split=test_split,
                                conf_th=conf_th, min_bb=min_bb, max_bb=max_bb, in_memory=in_memory,
                                synthetic=dict(synthetic or {}) if source == "synthetic" else None)
        self.name, self.source = name, source
        self.root = resolve_path(root)
        self.paths = {k: resolve_path(v) for k, v in dict(regions=regions, captions=captions,
                                                            winoground_examples=winoground_examples,
                                                            winoground_regions=winoground_regions).items()}
        self.vocab_size, self.img_dim = int(vocab_size), int(img_dim)
        self.split_names = dict(train=train_split, val=val_split, test=test_split)
        self.max_txt_len = max_txt_len
        self.batch_size, self.num_workers = batch_size, num_workers  # data.eval_batch_size is module.eval_batch_size's
        self.val_max_images = val_max_images
        self.seed = seed
        self.p_hard = float(p_hard)
        if hard_pool not in HARD_POOLS:
            raise ValueError(f"data.hard_pool must be one of {list(HARD_POOLS)}, got {hard_pool!r}")
        self.hard_pool = hard_pool
        self.p_swap = float(p_swap)
        if not 0.0 <= self.p_swap <= 1.0:
            raise ValueError(f"data.p_swap must be in [0, 1], got {p_swap}")
        if self.p_swap > 0 and source != "synthetic":
            raise ValueError(f"data.p_swap={p_swap}: box-swapped images need a synthetic world's scenes "
                             f"(data.source={source!r})")
        self._swap_rows = None
        self._scenes = None  # synthetic worlds: the training scenes by image id
        self.synthetic_cfg: Optional[SyntheticConfig] = (synthetic_config(self.data_config)
                                                         if source == "synthetic" else None)
        self.splits: dict = {}
        self.train_pools: Optional[TrainPools] = None
        self.winoground: Optional[WinogroundSet] = None
        self.train_truth: Optional[SceneTruth] = None  # synthetic worlds: which captions are true of which images
        self.tokenizer: Optional[WordPieceTokenizer] = None
        self.regions = None
        self._ready = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "RetrievalDataModule":
        cfg = dict(cfg)
        unknown = sorted(set(cfg) - set(CONFIG_KEYS))
        missing = sorted(set(CONFIG_KEYS) - set(cfg))
        if unknown or missing:
            raise ValueError(f"data config: unknown keys {unknown}, missing keys {missing}")
        return cls(**cfg)

    # ---------------------------------------------------------------- setup
    def prepare_data(self) -> None:
        if self.source == "synthetic":
            ensure_synthetic(self.synthetic_cfg, self.root)

    def setup(self, stage: Optional[str] = None) -> None:
        if self._ready:
            return
        data = open_data(self.data_config)
        files = data.files
        self.paths = dict(regions=files.regions, captions=files.captions,
                          winoground_examples=files.winoground_examples,
                          winoground_regions=files.winoground_regions)
        if files.scenes is not None:
            self.paths["scenes"] = files.scenes
        self.regions = data.regions
        if self.regions.feature_dim != self.img_dim:
            raise ValueError(f"{files.regions}: features have width {self.regions.feature_dim}, "
                             f"data.img_dim is {self.img_dim}")
        captions = data.captions
        if len(captions.vocab) > self.vocab_size:
            raise ValueError(f"{files.captions}: tokenizer vocabulary of {len(captions.vocab)} exceeds "
                             f"data.vocab_size={self.vocab_size}")
        self.tokenizer = data.tokenizer
        for role in self.split_names:
            if data.has_split(role):
                self.splits[role] = data.split(role)
        if "train" in self.splits:
            self.train_pools = TrainPools(self.splits["train"], self.max_txt_len)
            if files.scenes is not None:
                text_of = dict(zip(captions.caption_ids, captions.texts))
                self._scenes = load_scenes(files.scenes)
                self.train_truth = truth_for_split(self.splits["train"], text_of, self._scenes,
                                                   where=str(files.scenes))
        self.winoground = data.winoground()
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
        compositional hard negatives from pool ``hard_pool`` with probability ``p_hard``
        (:mod:`cacr.data.negatives`)."""
        if self.train_pools is None:
            raise ValueError(f"data {self.name!r}: no training split")
        pools = self.train_pools
        return NegativeSampler(pools.txt2img, pools.positives, pools.num_images, self.train_truth, self.p_hard,
                               self.hard_pool, self.p_swap, self.swap_rows() if self.p_swap > 0 else None)

    def swap_rows(self):
        """``(Nc, 2)``: the region rows of each training caption's box swap (``SceneTruth.swap_rows``),
        never a layout of the Winoground-format set; computed once."""
        if self._swap_rows is None:
            if self.train_truth is None:
                raise ValueError(f"data {self.name!r}: data.p_swap needs the scenes of a synthetic world")
            wscenes = SyntheticPaths.under(self.paths["scenes"].parent).winoground_scenes
            held_out = {scene_layout(s) for s in load_scenes(wscenes).values()}
            split = self.splits["train"]
            self._swap_rows = self.train_truth.swap_rows(split.txt2img, [self._scenes[i] for i in split.image_ids],
                                                         held_out)
            n = int((self._swap_rows[:, 0] >= 0).sum())
            log.info("data.p_swap=%s: %d of %d training captions have a box-swapped negative", self.p_swap, n,
                     len(self._swap_rows))
        return self._swap_rows

    def pair_store(self, role: str, layout: str = "compact") -> PairStore:
        """Every caption and image of ``role`` as a ``cacr.model.PairStore`` on the CPU (captions
        padded, regions flat); caption ``t`` / image ``j`` are the split's indices."""
        s = self.split(role)
        return _pair_store(s.texts, s.regions, s.image_rows, layout)

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
