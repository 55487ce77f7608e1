"""Load UNITER weights: official ``.pt`` state dicts, fine-tuned retrieval checkpoints, and
this project's Lightning ``.ckpt`` files, into :class:`UniterForImageTextRetrieval`.

Key normalisation (what the official loader accepts, docs/reference.md §1):
- LayerNorm ``gamma`` / ``beta`` are renamed ``weight`` / ``bias``;
- a ``bert.`` prefix, or no prefix at all on backbone keys, becomes ``uniter.``;
- ``module.`` (saved from DDP) and the Lightning module's ``model.`` prefix are stripped;
- fp16 / bf16 tensors are cast to the model's dtype;
- heads of the pre-training model (``cls.*``, ``feat_regress.*``, ``region_classifier.*``,
  and the other pre-training heads listed in ``PRETRAIN_HEADS``) are skipped and reported.

``rank_output`` is initialised from row 1 of ``itm_output`` only when the checkpoint has no
``rank_output`` (a pre-trained checkpoint); a fine-tuned one keeps its own. Every load
uses ``torch.load(..., weights_only=True)``: a checkpoint cannot run code.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

PRETRAIN_HEADS = ("cls.", "feat_regress.", "region_classifier.", "itm_output_pretrain.", "wra_output.")
BACKBONE_PARTS = ("embeddings.", "img_embeddings.", "encoder.", "pooler.")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model (lists every missing, unexpected or mis-shaped key)."""


@dataclass
class LoadReport:
    source: str
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)  # (key, checkpoint shape, model shape)
    skipped_heads: list = field(default_factory=list)
    renamed: int = 0
    cast_from: dict = field(default_factory=dict)  # dtype name -> number of tensors cast
    rank_from_itm: bool = False

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        lines = [f"checkpoint {self.source}:"]
        if self.missing:
            lines.append(f"  missing from the checkpoint ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected in the checkpoint ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for k, got, want in self.mismatched:
            lines.append(f"  shape mismatch {k}: checkpoint {tuple(got)}, model {tuple(want)}")
        if self.skipped_heads:
            lines.append(f"  pre-training heads skipped ({len(self.skipped_heads)}): {', '.join(self.skipped_heads)}")
        if self.cast_from:
            lines.append("  cast to the model's dtype: " + ", ".join(f"{n} {d}" for d, n in self.cast_from.items()))
        if self.rank_from_itm:
            lines.append("  rank_output initialised from itm_output row 1 (no rank_output in the checkpoint)")
        return "\n".join(lines)


def read_state_dict(path: Union[str, Path]) -> dict:
    """Read a state dict from an official ``.pt``, a fine-tuned checkpoint or a Lightning ``.ckpt``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only PyTorch checkpoint ({type(e).__name__}: {e})"
        ) from e
    return extract_state_dict(obj, where=str(path))


def extract_state_dict(obj, *, where: str = "checkpoint") -> dict:
    """The tensor dict inside a loaded checkpoint object (plain, ``{'state_dict': ...}`` or ``{'model': ...}``)."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # Lightning .ckpt
    elif isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{where}: expected a non-empty dict of tensors, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{where}: entries that are not tensors: {bad[:10]}")
    return dict(obj)


def normalize_key(key: str) -> str:
    for prefix in ("module.", "model."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    if key.startswith("bert."):
        key = "uniter." + key[len("bert."):]
    elif key.startswith(BACKBONE_PARTS):
        key = "uniter." + key
    parts = key.split(".")
    if parts[-1] == "gamma":
        parts[-1] = "weight"
    elif parts[-1] == "beta":
        parts[-1] = "bias"
    return ".".join(parts)


def load_checkpoint(
    model: nn.Module,
    source: Union[str, Path, Mapping[str, Tensor]],
    *,
    strict: bool = True,
) -> LoadReport:
    """Load ``source`` (a path or a state dict) into ``model`` (a ``UniterForImageTextRetrieval``).

    With ``strict=True`` any missing, unexpected or mis-shaped key raises
    :class:`CheckpointError` listing all of them, and the model is left unchanged. With
    ``strict=False`` the matching tensors are loaded and the report lists the rest.
    """
    name = str(source) if isinstance(source, (str, Path)) else "<state dict>"
    raw = read_state_dict(source) if isinstance(source, (str, Path)) else extract_state_dict(source, where=name)
    report = LoadReport(source=name)

    state: dict[str, Tensor] = {}
    for k, v in raw.items():
        nk = normalize_key(k)
        if nk != k:
            report.renamed += 1
        if nk.startswith(PRETRAIN_HEADS):
            report.skipped_heads.append(k)
            continue
        if nk in state:
            raise CheckpointError(f"{name}: keys {k!r} and another key both map to {nk!r}")
        state[nk] = v

    own = model.state_dict()
    for k, v in state.items():
        if k not in own:
            report.unexpected.append(k)
        elif tuple(v.shape) != tuple(own[k].shape):
            report.mismatched.append((k, tuple(v.shape), tuple(own[k].shape)))
    has_rank = any(k.startswith("rank_output.") for k in state)
    can_init_rank = not has_rank and all(f"itm_output.{p}" in state for p in ("weight", "bias"))
    for k in own:
        if k not in state and not (can_init_rank and k.startswith("rank_output.")):
            report.missing.append(k)

    if strict and not report.ok:
        raise CheckpointError(report.describe() + "\n(pass strict=False to load what matches and get this report)")

    to_load = {}
    for k, v in state.items():
        if k in own and tuple(v.shape) == tuple(own[k].shape):
            if v.dtype != own[k].dtype and v.is_floating_point():
                report.cast_from[str(v.dtype)] = report.cast_from.get(str(v.dtype), 0) + 1
                v = v.to(own[k].dtype)
            to_load[k] = v
    model.load_state_dict(to_load, strict=False)
    if can_init_rank:
        model.init_rank_from_itm()
        report.rank_from_itm = True
    if report.skipped_heads or not report.ok:
        log.info(report.describe())
    return report


def build_uniter(
    config=None,
    *,
    config_json: Optional[Union[str, Path]] = None,
    checkpoint: Optional[Union[str, Path]] = None,
    strict: bool = True,
    **overrides,
):
    """Build a ``UniterForImageTextRetrieval`` from a config (object, mapping or official JSON
    file) and optionally load a checkpoint. The Hydra ``conf/model/*.yaml`` target this."""
    from .config import UniterConfig
    from .uniter import UniterForImageTextRetrieval

    if config_json is not None:
        cfg = UniterConfig.from_json(config_json, **overrides)
    elif isinstance(config, UniterConfig):
        cfg = UniterConfig.from_dict({**config.to_dict(), **overrides})
    else:
        cfg = UniterConfig.from_dict({**dict(config or {}), **overrides})
    model = UniterForImageTextRetrieval(cfg)
    if checkpoint:
        model.load_report = load_checkpoint(model, checkpoint, strict=strict)
    return model
