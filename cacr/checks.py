"""Everything a training run needs, checked before step 0.

- :func:`settings_problems`: one line per impossible or meaningless setting of
  ``conf/train.yaml`` (and its groups), naming the key and what was expected; warnings
  (e.g. a warmup longer than the run) are logged, not raised.
- :func:`data_problems`: the data module after ``setup()``: the splits the run uses, the
  Winoground-format set, a vectorised finite-values scan of every regions source (features
  and boxes; file and image ids named), and the ``[UNK]`` word pieces of every text source
  (logged per file).
"""
from __future__ import annotations

import logging
import math
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cacr.errors import CacrError

log = logging.getLogger(__name__)

SHOWN = 5  # items named per problem before a count of the rest


class SettingsError(CacrError):
    """Several settings that cannot run; ``lines`` has one line per problem."""

    def __init__(self, lines: Sequence[str]):
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def settings_problems(cfg: DictConfig, cuda_available: Optional[bool] = None) -> Tuple[List[str], List[str]]:
    """``(problems, warnings)``: each a line ``key=value: what was expected``."""
    problems: List[str] = []
    warnings: List[str] = []

    def need_int(key: str, lo: int, what: str, allow_none: bool = False) -> Optional[int]:
        v = _get(cfg, key)
        if v is None and allow_none:
            return None
        if not _is_int(v) or v < lo:
            none = "null or " if allow_none else ""
            problems.append(f"{key}={v}: expected {none}an integer >= {lo} ({what})")
            return None
        return v

    def need_num(key: str, lo: float, what: str, strict: bool = False, hi: Optional[float] = None) -> Optional[float]:
        v = _get(cfg, key)
        ok = _is_num(v) and math.isfinite(v) and (v > lo if strict else v >= lo) and (hi is None or v < hi)
        if not ok:
            rng = f"> {lo:g}" if strict else f">= {lo:g}"
            rng += f" and < {hi:g}" if hi is not None else ""
            problems.append(f"{key}={v}: expected a finite number {rng} ({what})")
            return None
        return float(v)

    need_int("seed", 0, "seeds the model, dropout and data order")
    steps = need_int("train.max_steps", 1, "optimizer steps; 0 would report the random initialisation")
    K = need_int("train.num_candidates", 1, "negative candidates per positive and direction")
    k = need_int("module.num_negatives", 1, "negatives trained on per positive and direction")
    if K is not None and k is not None and K < k:
        problems.append(f"train.num_candidates={K}: fewer than module.num_negatives={k}; expected at least as many "
                        f"candidates as negatives kept")
    need_int("data.batch_size", 1, "positive pairs per device per step")

    def need_batch(key: str, what: str, lo: int = 1) -> None:
        v = _get(cfg, key)
        if v != "auto" and (not _is_int(v) or v < lo):
            problems.append(f"{key}={v}: expected an integer >= {lo} or auto ({what})")

    need_batch("data.eval_batch_size", "pairs per evaluation batch; auto: 512 on a GPU, on a CPU 16 for "
                                       "hidden >= 512 and 64 below")
    if _get(cfg, "module.eval_batch_size") is not None and not OmegaConf.is_interpolation(cfg.module, "eval_batch_size"):
        need_batch("module.eval_batch_size", "pairs per evaluation forward")
    need_batch("module.mining_batch_size", "pairs per no-grad mining forward; auto: 1024 on a GPU, on a CPU as "
                                           "data.eval_batch_size's auto")
    if _get(cfg, "module.train_chunk_size") is not None:  # absent from configs older than the setting
        need_batch("module.train_chunk_size", "trained negatives per forward after sorting by width; 0: one batch; "
                                              "auto: 4 on a CPU from hidden 512, else 0", lo=0)
    need_int("data.num_workers", 0, "DataLoader worker processes")
    need_int("data.val_max_images", 1, "validation images; null validates on all", allow_none=True)
    if _get(cfg, "data.max_txt_len") is not None:
        need_int("data.max_txt_len", 1, "word pieces of the longest training caption; null keeps all")
    need_int("module.mining_start", 0, "steps of random negatives before mining")
    val = need_int("eval.val_every_n_steps", 1, "steps between retrieval validations")
    if val is not None and steps is not None and val > steps:
        warnings.append(f"eval.val_every_n_steps={val} > train.max_steps={steps}: no validation runs, so the final "
                        f"weights are evaluated as the best checkpoint")
    if _get(cfg, "eval.winoground"):
        need_int("eval.n_boot", 1, "bootstrap resamples for the Winoground confidence intervals")
    which = _get(cfg, "eval.checkpoint")
    if which is not None and which not in ("best", "last"):
        problems.append(f"eval.checkpoint={which}: expected best (by validation R-sum) or last (the final weights)")
    need_num("module.lr", 0.0, "learning rate", strict=True)
    need_num("module.weight_decay", 0.0, "AdamW weight decay")
    need_num("module.eps", 0.0, "AdamW epsilon", strict=True)
    need_num("module.margin", 0.0, "hinge margin")
    need_num("module.align_weight", 0.0, "weight of the align-before-fuse loss")
    need_num("module.align_temperature", 0.0, "softmax temperature", strict=True)
    if _get(cfg, "loss.weight") is not None:
        need_num("loss.weight", 0.0, "regularizer weight")
    betas = _get(cfg, "module.betas")
    if betas is None or len(betas) != 2 or not all(_is_num(b) and 0 <= b < 1 for b in betas):
        problems.append(f"module.betas={betas}: expected two numbers in [0, 1)")
    warm = need_int("module.warmup_steps", 0, "linear warmup steps")
    if warm is not None and steps is not None and warm > steps:
        warnings.append(f"module.warmup_steps={warm} > train.max_steps={steps}: the learning rate never reaches "
                        f"module.lr={_get(cfg, 'module.lr')}")
    ranking = _get(cfg, "module.ranking")
    if ranking not in ("hinge", "softmax"):
        problems.append(f"module.ranking={ranking}: expected hinge or softmax")
    head = _get(cfg, "module.score_head")
    if head not in ("rank", "itm"):
        problems.append(f"module.score_head={head}: expected rank or itm")
    if _get(cfg, "data.source") == "synthetic" and _get(cfg, "data.tokenizer"):
        problems.append(f"data.tokenizer={_get(cfg, 'data.tokenizer')}: the synthetic world tokenizes with its own "
                        f"vocabulary; expected null with data=synthetic")
    problems += _trainer_problems(cfg, cuda_available)
    return problems, warnings


def _trainer_problems(cfg: DictConfig, cuda_available: Optional[bool]) -> List[str]:
    out = []
    acc = str(_get(cfg, "trainer.accelerator", "auto"))
    devices = _get(cfg, "trainer.devices", "auto")
    nodes = _get(cfg, "trainer.num_nodes", 1)
    if not _is_int(nodes) or nodes < 1:
        out.append(f"trainer.num_nodes={nodes}: expected an integer >= 1")
    if devices != "auto" and (not _is_int(devices) or devices < 1) and not OmegaConf.is_list(devices):
        out.append(f"trainer.devices={devices}: expected auto, an integer >= 1 or a list of device indices")
    if acc in ("gpu", "cuda"):
        avail = torch.cuda.is_available() if cuda_available is None else cuda_available
        if not avail:
            out.append(f"trainer.accelerator={acc}: no CUDA device is visible (torch.cuda.is_available() is False); "
                       f"expected trainer=cpu (or ddp_cpu) on this machine")
        elif _is_int(devices) and cuda_available is None and devices > torch.cuda.device_count():
            out.append(f"trainer.devices={devices}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif acc not in ("cpu", "auto", "mps", "tpu"):
        out.append(f"trainer.accelerator={acc}: expected cpu, gpu or auto")
    if acc == "cpu" and str(_get(cfg, "trainer.precision", "")).startswith(("16", "bf16")):
        log.warning("trainer.precision=%s on the CPU: bf16 matmuls run 40-150x slower than fp32 there",
                    _get(cfg, "trainer.precision"))
    return out


def check_settings(cfg: DictConfig) -> None:
    """Raise :class:`SettingsError` listing every impossible setting; log the warnings."""
    problems, warnings = settings_problems(cfg)
    for w in warnings:
        log.warning(w)
    if problems:
        raise SettingsError(problems)


# --------------------------------------------------------------------------- data


def _ids(ids: Sequence[str], idx: np.ndarray) -> str:
    shown = ", ".join(repr(ids[int(i)]) for i in idx[:SHOWN])
    return shown + (f" and {len(idx) - SHOWN} more" if len(idx) > SHOWN else "")


def nonfinite_images(regions) -> np.ndarray:
    """Indices of the images of a region source (in-memory store or lazy file) with a NaN or
    Inf in their features or boxes; one vectorised pass (block by block for a lazy file)."""
    from cacr.data.datasets import RegionStore

    if isinstance(regions, RegionStore):
        bad = ~(torch.isfinite(regions.features).all(1) & torch.isfinite(regions.boxes).all(1))
        rows = bad.nonzero().flatten().cpu()
        offsets = regions.offsets.cpu()
    else:
        feat, box, _ = regions.file.datasets()
        offsets = torch.from_numpy(regions.file.offsets)
        found, block = [], 1 << 18
        from cacr.data.formats import read_array

        for a in range(0, feat.shape[0], block):
            rows = slice(a, min(a + block, feat.shape[0]))
            f, b = read_array(feat, regions.file.path, rows), read_array(box, regions.file.path, rows)
            bad = ~(np.isfinite(f).all(1) & np.isfinite(b).all(1))
            found.append(np.flatnonzero(bad) + a)
        regions.file.close()
        rows = torch.from_numpy(np.concatenate(found)) if found else torch.zeros(0, dtype=torch.long)
    if rows.numel() == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique((torch.searchsorted(offsets, rows, right=True) - 1).numpy())


def _boxes_and_offsets(regions) -> Tuple[np.ndarray, np.ndarray]:
    """``(boxes (R, >= 4), offsets (N+1,))`` of a region source (in-memory store or lazy file)."""
    from cacr.data.datasets import RegionStore
    from cacr.data.formats import read_array

    if isinstance(regions, RegionStore):
        return regions.boxes.cpu().numpy(), regions.offsets.cpu().numpy()
    _, box, _ = regions.file.datasets()
    try:
        return read_array(box, regions.file.path), np.asarray(regions.file.offsets)
    finally:
        regions.file.close()


def region_layout_problems(regions, what: str) -> List[str]:
    """Images with no regions, and boxes not ordered or outside the image
    (:func:`cacr.data.formats.box_faults`, as the validator checks them), one line each."""
    from cacr.data.formats import box_faults

    boxes, offsets = _boxes_and_offsets(regions)
    ids = regions.image_ids
    out = []
    empty = np.flatnonzero(np.diff(offsets) == 0)
    if len(empty):
        out.append(f"{what}: {len(empty)} image(s) with no regions: {_ids(ids, empty)}; expected at least one region "
                   f"per image")
    outside, flipped = box_faults(boxes)
    for mask, fault in ((flipped, "boxes with x2 < x1 or y2 < y1"), (outside, "box corners outside [0, 1]")):
        if mask.any():
            images = np.unique(np.searchsorted(offsets, np.flatnonzero(mask), side="right") - 1)
            out.append(f"{what}: {fault} in {len(images)} image(s): {_ids(ids, images)}; expected "
                       f"0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1")
    return out


def region_source_problems(regions, what: str) -> List[str]:
    """Every problem of a region source that ``train.py`` and the evaluators refuse: NaN or
    Inf, images with no regions, boxes not ordered or outside the image."""
    bad = nonfinite_images(regions)
    out = [] if len(bad) == 0 else [
        f"{what}: NaN or Inf in the features or boxes of {len(bad)} image(s): {_ids(regions.image_ids, bad)}; "
        f"expected finite values"]
    return out + region_layout_problems(regions, what)


def unk_count(texts: Sequence[torch.Tensor], unk_id: int) -> Tuple[int, int, int]:
    """``([UNK] word pieces, texts holding one, word pieces)`` of token tensors."""
    if not texts:
        return 0, 0, 0
    flat = torch.cat([t.flatten() for t in texts])
    lens = torch.tensor([t.numel() for t in texts])
    per = torch.zeros(len(texts), dtype=torch.long).index_add_(
        0, torch.repeat_interleave(torch.arange(len(texts)), lens), (flat == unk_id).long())
    return int(per.sum()), int((per > 0).sum()), int(flat.numel())


def position_problems(dm, max_positions: int, max_txt_len: Optional[int]) -> List[str]:
    """Captions of every split (training: those ``data.max_txt_len`` keeps) and of the
    Winoground-format set with more tokens ([CLS]/[SEP] included) than the model has text
    positions: found before step 0, not at the first validation or after training."""
    out = []
    captions = dm.paths.get("captions")
    for role, split in dm.splits.items():
        lens = np.array([t.numel() for t in split.texts], dtype=np.int64)
        long = lens > max_positions
        if role == "train" and max_txt_len is not None:
            long &= lens - 2 <= max_txt_len  # longer ones are dropped from training
        if long.any():
            idx = np.flatnonzero(long)
            out.append(f"{captions}: {len(idx)} caption(s) of split {split.name!r} longer than "
                       f"model.config.max_position_embeddings={max_positions} tokens ([CLS]/[SEP] included; longest "
                       f"{int(lens[idx].max())}): {_ids(split.caption_ids, idx)}; expected shorter captions or more "
                       f"positions")
    wino = dm.winoground
    if wino is not None:
        long = [(ex.key, c) for ex, pair in zip(wino.examples, wino.texts) for c, t in enumerate(pair)
                if t.numel() > max_positions]
        if long:
            shown = ", ".join(f"example {k!r} caption_{c}" for k, c in long[:SHOWN])
            out.append(f"{dm.paths.get('winoground_examples')}: {len(long)} caption(s) longer than "
                       f"model.config.max_position_embeddings={max_positions} tokens: {shown}"
                       + (f" and {len(long) - SHOWN} more" if len(long) > SHOWN else ""))
    return out


def leakage_problems(dm) -> List[str]:
    """Images that have captions in two of the run's splits (train / val / test): a test image
    seen in training. A caption id is unique within its file, so a caption in two splits is
    one of these."""
    out = []
    roles = list(dm.splits)
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            sa, sb = dm.splits[a], dm.splits[b]
            if sa.name == sb.name:
                continue  # the same split in two roles (e.g. validating on the test split) is a choice
            shared = sorted(set(sa.image_ids) & set(sb.image_ids))
            if shared:
                shown = ", ".join(repr(x) for x in shared[:SHOWN]) + (
                    f" and {len(shared) - SHOWN} more" if len(shared) > SHOWN else "")
                out.append(f"{dm.paths.get('captions')}: {len(shared)} image(s) with captions in both split "
                           f"{sa.name!r} and split {sb.name!r}: {shown}; expected every image in one split only")
    return out


def data_problems(dm, cfg: DictConfig) -> List[str]:
    """Problems of a data module after ``setup()`` for the run ``cfg`` describes (``[]`` if
    none); the ``[UNK]`` counts are logged, one line per file."""
    out: List[str] = []
    steps, val_every = _get(cfg, "train.max_steps"), _get(cfg, "eval.val_every_n_steps")
    need = {"train": True, "val": val_every <= steps, "test": bool(_get(cfg, "eval.test"))}
    captions = dm.paths.get("captions")
    for role, needed in need.items():
        if needed and role not in dm.splits:
            key = f"data.{role}_split"
            out.append(f"{captions}: no captions of split {dm.split_names[role]!r} ({key}), which the run needs "
                       f"for {'training' if role == 'train' else 'validation' if role == 'val' else 'the test'}")
    if _get(cfg, "eval.winoground") and dm.winoground is None and (
            _get(cfg, "data.winoground_examples") or _get(cfg, "data.source") == "synthetic"):
        out.append("data.winoground_examples: the Winoground-format set could not be opened")
    out += region_source_problems(dm.regions, f"data.regions={dm.paths.get('regions')}")
    if dm.winoground is not None:
        out += region_source_problems(dm.winoground.regions,
                                      f"data.winoground_regions={dm.paths.get('winoground_regions')}")
    max_positions = _get(cfg, "model.config.max_position_embeddings")
    if max_positions is not None:
        out += position_problems(dm, int(max_positions), _get(cfg, "data.max_txt_len"))
    out += leakage_problems(dm)
    tok = dm.tokenizer
    unk_id = getattr(tok, "unk_id", None)
    if unk_id is not None:
        texts = [t for s in dm.splits.values() for t in s.texts]
        n, c, total = unk_count(texts, unk_id)
        if n:
            log.warning("%s: %d of %d word pieces are [UNK], in %d caption(s) (words outside the tokenizer's "
                        "vocabulary)", captions, n, total, c)
        if dm.winoground is not None:
            n, c, total = unk_count([t for pair in dm.winoground.texts for t in pair], unk_id)
            if n:
                log.warning("%s: %d of %d word pieces are [UNK], in %d caption(s)",
                            dm.paths.get("winoground_examples"), n, total, c)
    return out


def check_data(dm, cfg: DictConfig) -> None:
    problems = data_problems(dm, cfg)
    if problems:
        raise SettingsError(problems)


def identical_foils(items, where: str) -> List[str]:
    """Multiple-choice items (``.key``, ``.captions``: the true caption first, then the foils)
    with a foil equal to their caption, ignoring case and spacing: always scored wrong (a tie
    is wrong), so they are warned about, one line per set, and their keys returned for the
    evaluator to count (``identical_foils`` in its results)."""
    def norm(text: str) -> str:
        return " ".join(str(text).lower().split())

    keys = [it.key for it in items if any(norm(f) == norm(it.captions[0]) for f in it.captions[1:])]
    if keys:
        shown = ", ".join(repr(k) for k in keys[:SHOWN]) + (
            f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")
        log.warning("%s: %d item(s) whose foil equals the caption, always scored wrong: %s", where, len(keys), shown)
    return keys
