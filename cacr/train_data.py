"""Step-indexed training batches: which positives and negative candidates optimizer step ``s``
sees on rank ``r`` is a pure function of ``(seed, s, r, world size)``.

The global batch of step ``s`` is the next ``G = batch_size * world_size`` training captions
of a stream of per-epoch permutations (seeded by ``(seed, epoch)``); rank ``r`` takes
positions ``r, r + W, r + 2W, ...`` of it. The negative candidates of the positive at global
position ``j`` are drawn with a generator seeded by ``(seed, s, j)``, so the global batch,
negatives included, depends only on ``(seed, s, G)``: the same ``G`` on 1 process or on
``W`` (``batch_size = G / W`` each) trains on the same pairs, and a run resumed at step
``s`` (``ckpt_path=...``), on any number of processes, continues with the batches of the
uninterrupted run. Each rank only draws for its own positives, from the full candidate pools.

Items are index batches only (a few hundred integers); features are gathered on the
device from a :class:`cacr.model.PairStore` by the training module.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from cacr.data.datamodule import RetrievalDataModule
from cacr.data.negatives import NegativeSampler


class StepRange(Sampler):
    """Yields the steps ``start, ..., total - 1`` but claims ``total`` of them: a resumed fit
    restores Lightning's batch counter to ``start``, and a loader that claimed only the
    remaining ``total - start`` batches made Lightning end the epoch early and start it again
    from the first batch (training steps ``start, start+1, ...`` twice, under later numbers)."""

    def __init__(self, start: int, total: int):
        self.start, self.total = int(start), int(total)

    def __iter__(self):
        return iter(range(self.start, self.total))

    def __len__(self) -> int:
        return self.total


def _mix(*xs: int) -> int:
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class TrainBatches(Dataset):
    """Item ``s``: the batch of step ``s`` for this rank, a dict of CPU tensors and ints:

    ``cap_idx`` (B,), ``img_idx`` (B,): the positives (caption and its image, split indices);
    ``neg_img`` (B, K): candidate images for each caption, never its own (nor, with a scene
    truth, any image the caption is true of);
    ``neg_cap`` (B, K): candidate captions for each image, never one of its own (nor one true of it);
    ``swap_rows`` (B, 2), only with ``data.p_swap > 0``: where the sampler drew the box-swapped
    image, the rows of the caption's own image whose boxes the first image candidate exchanges
    (it then is the own image); ``-1`` elsewhere;
    ``max_txt_len``, ``max_regions``: widths covering every caption and image named, so the
    module can build any batch of these pairs without a device synchronisation.
    """

    def __init__(self, pools, *, batch_size: int, num_candidates: int, seed: int,
                 txt_lens: Tensor, num_bbs: Tensor, rank: int = 0, world_size: int = 1,
                 sampler: Optional[NegativeSampler] = None):
        if batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, got {batch_size}")
        self.pools = pools
        self.sampler = sampler or NegativeSampler(pools.txt2img, pools.positives, pools.num_images)
        self.batch_size = batch_size
        self.num_candidates = num_candidates
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.txt_lens = txt_lens.long().cpu()
        self.num_bbs = num_bbs.long().cpu()
        self.positives = pools.positives.long().cpu()  # (P,) caption indices
        if len(self.positives) < batch_size * world_size:
            raise ValueError(f"{len(self.positives)} training captions cannot fill a global batch of "
                             f"{batch_size} x {world_size} processes")
        self._perm_cache: Dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 2:
                self._perm_cache.clear()
            g = torch.Generator().manual_seed(_mix(self.seed, epoch))
            self._perm_cache[epoch] = torch.randperm(len(self.positives), generator=g)
        return self._perm_cache[epoch]

    def positions(self, step: int) -> Tensor:
        """Indices into ``positives`` of the global batch of ``step`` (all ranks)."""
        P, G = len(self.positives), self.batch_size * self.world_size
        flat = torch.arange(step * G, (step + 1) * G)
        epochs, offsets = flat // P, flat % P
        return torch.stack([self._perm(int(e))[int(o)] for e, o in zip(epochs, offsets)]) \
            if int(epochs[0]) != int(epochs[-1]) else self._perm(int(epochs[0]))[offsets]

    def __len__(self) -> int:
        return 2**62  # indexed by step; the sampler bounds it

    def __getitem__(self, step: int):
        G = self.batch_size * self.world_size
        slots = range(self.rank, G, self.world_size)  # this rank's positions in the global batch
        pos = self.positions(step)[self.rank::self.world_size]
        cap = self.positives[pos]
        img = self.pools.txt2img[cap]
        neg_img, neg_cap = [], []
        swap_rows = torch.full((len(cap), 2), -1, dtype=torch.long)
        for b, (j, c, i) in enumerate(zip(slots, cap, img)):
            g = torch.Generator().manual_seed(_mix(self.seed, step, j, 7))
            neg_img.append(self.sampler.images(int(c), self.num_candidates, g))
            neg_cap.append(self.sampler.texts(int(i), self.num_candidates, g))
            swap = self.sampler.swap(int(c), g)
            if swap is not None:  # the first image candidate: the own image, two boxes exchanged
                neg_img[-1][0] = i
                swap_rows[b] = torch.tensor(swap)
        neg_img, neg_cap = torch.stack(neg_img), torch.stack(neg_cap)  # (B, K) each
        out = {
            "cap_idx": cap,
            "img_idx": img,
            "neg_img": neg_img,
            "neg_cap": neg_cap,
            "max_txt_len": int(self.txt_lens[torch.cat([cap, neg_cap.flatten()])].max()),
            "max_regions": int(self.num_bbs[torch.cat([img, neg_img.flatten()])].max()),
            "step": step,
        }
        if self.sampler.p_swap > 0:
            out["swap_rows"] = swap_rows
        return out



class TrainingDataModule(RetrievalDataModule):
    """The data module with the loaders that :class:`cacr.module.RetrievalModule` consumes:
    step-indexed index batches for training, and a one-item loader per rank for validation
    (the module scores the whole validation split at the end of the validation loop, rows
    sharded exactly across ranks by the evaluator)."""

    def __init__(self, *args, num_candidates: int = 31, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_candidates = num_candidates

    @classmethod
    def from_config(cls, cfg, num_candidates: int = 31) -> "TrainingDataModule":
        dm = super().from_config(cfg)
        dm.num_candidates = num_candidates
        return dm

    def train_dataloader(self) -> DataLoader:
        if self.train_pools is None:
            raise ValueError(f"data {self.name!r}: no training split")
        trainer = self.trainer
        if trainer is None or trainer.max_steps is None or trainer.max_steps < 0:
            raise ValueError("training needs trainer.max_steps (train.max_steps) to lay out its batches")
        split = self.split("train")
        txt_lens = torch.tensor([t.numel() for t in split.texts])
        num_bbs = torch.as_tensor(self.regions.num_regions)[split.image_rows]
        batches = TrainBatches(self.train_pools, batch_size=self.batch_size, num_candidates=self.num_candidates,
                               seed=self.seed, txt_lens=txt_lens, num_bbs=num_bbs,
                               rank=trainer.global_rank, world_size=trainer.world_size,
                               sampler=self.negative_sampler())
        return DataLoader(batches, batch_size=None, sampler=StepRange(trainer.global_step, trainer.max_steps),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([0], batch_size=None)
