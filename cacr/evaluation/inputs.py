"""The inputs of an evaluation, shared by the evaluators' command lines and the analysis
tools (which read ``conf/winoground.yaml``): the model of a config on a device, the score
head, the precision, the Winoground-format examples and regions, and the checks that the
inputs fit the model. The data config's files are read by :func:`cacr.data.sources.open_data`.

The model comes from ``ckpt_path`` (a ``.ckpt`` of this project's ``train.py``, read by
:func:`cacr.model.export.read_run_checkpoint`: its model config and ``model.*`` weights) or
from a model group option with ``model.checkpoint`` (an official UNITER ``.pt``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Set, Tuple

import torch
from omegaconf import DictConfig
from torch import nn

from cacr.config import ConfigError
from cacr.data.sources import OpenedData, open_data
from cacr.paths import resolve_path
from cacr.precision import resolve_bf16

HEADS = ("rank", "itm")

log = logging.getLogger(__name__)


def select_device(pref: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA if visible, else CPU), ``cpu``, ``cuda`` (this process's local GPU) or ``cuda:N``."""
    pref = str(pref or "auto")
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(pref)
    except RuntimeError:
        raise ConfigError(f"device={pref!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={pref}: no CUDA device is visible")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"device={pref!r}: expected auto, cpu, cuda or cuda:N")
    return device


def scoring_bf16(setting, device: torch.device, flags: Optional[Set[str]] = None) -> Tuple[bool, str]:
    """``(use bf16, why)`` for the ``bf16`` option (``true``, ``false`` or ``auto``) on
    ``device`` (:func:`cacr.precision.resolve_bf16`; ``flags``: the CPU's, for tests), logged."""
    try:
        use, why = resolve_bf16(setting, device, flags)
    except ValueError:
        raise ConfigError(f"bf16={setting!r}: expected true, false or auto (bf16 on CUDA and on CPUs with "
                          f"AVX-512 BF16 or AMX, fp32 elsewhere)") from None
    log.info("scoring in %s (%s)", "bf16" if use else "fp32", why)
    return use, why


def auto_batch_size(device: torch.device, model: nn.Module) -> Tuple[int, str]:
    """``(pairs per forward, why)`` that measured fastest for the device and model width
    (experiments/BENCHMARKS.md): 512 on a GPU; on a CPU 16 for hidden >= 512 and 64 below."""
    if device.type == "cuda":
        return 512, "GPU"
    if getattr(getattr(model, "config", None), "hidden_size", 768) >= 512:
        return 16, "CPU, hidden >= 512"
    return 64, "CPU, hidden < 512"


def scoring_batch_size(setting, device: torch.device, model: nn.Module) -> int:
    """Pairs per forward for the ``batch_size`` option: an int, or ``auto`` = the size that
    measured fastest for the device and model width (experiments/BENCHMARKS.md): 512 on a GPU;
    on a CPU 16 for UNITER-base/large widths (at 512, 2.5x slower: the attention and FFN
    intermediates of a big batch fall out of cache) and 64 for small models; logged."""
    if isinstance(setting, str) and setting == "auto":
        size, why = auto_batch_size(device, model)
        log.info("scoring %d pairs per forward (auto: %s)", size, why)
        return size
    try:
        size = int(setting)
    except (TypeError, ValueError):
        size = 0
    if size < 1:
        raise ConfigError(f"batch_size={setting!r}: expected a positive number of pairs or auto")
    return size


def model_file(cfg: DictConfig) -> Optional[Path]:
    """The checkpoint a config scores with (``ckpt_path`` or ``model.checkpoint``), if any."""
    if cfg.get("ckpt_path"):
        return resolve_path(cfg.ckpt_path)
    m = cfg.get("model")
    return resolve_path(m.checkpoint) if m and m.get("checkpoint") else None


def build_model(cfg: DictConfig, device: torch.device) -> Tuple[nn.Module, str]:
    """The scoring model in eval mode on ``device`` and a short name for the tables."""
    from hydra.utils import instantiate

    from cacr.model import build_uniter, load_checkpoint
    from cacr.model.export import read_run_checkpoint

    ckpt, mcfg = cfg.get("ckpt_path"), cfg.get("model")
    if ckpt and mcfg:
        raise ConfigError("give either ckpt_path=... (a .ckpt of this project, which carries its model config) "
                          "or model=<option> model.checkpoint=..., not both")
    if ckpt:
        path = resolve_path(ckpt)
        config, state = read_run_checkpoint(path, label=f"ckpt_path={ckpt}",
                                            official_hint=f"for an official UNITER file use "
                                                          f"model=uniter_base model.checkpoint={ckpt}")
        model = build_uniter(config)
        load_checkpoint(model, state, strict=True)
        name = f"{path.parent.parent.name}/{path.stem}" if path.parent.name == "checkpoints" else path.stem
    elif mcfg:
        if not mcfg.get("checkpoint"):
            raise ConfigError("model.checkpoint is not set: a randomly initialised UNITER has nothing to evaluate; "
                              "give model.checkpoint=uniter-base.pt (or use ckpt_path=... for this project's .ckpt)")
        path = resolve_path(mcfg.checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"model.checkpoint={mcfg.checkpoint}: checkpoint not found")
        model = instantiate(mcfg, checkpoint=str(path))
        name = path.stem
    else:
        raise ConfigError("no model: give ckpt_path=outputs/.../checkpoints/best-stepN.ckpt, or "
                          "model=uniter_base model.checkpoint=uniter-base.pt")
    return model.to(device).eval(), str(cfg.get("name") or name)


def check_head(head: str) -> str:
    if head not in HEADS:
        raise ConfigError(f"head={head!r}: expected rank (retrieval logit, fine-tuned models) or itm "
                          f"(ITM head, zero-shot UNITER)")
    return head


def check_inputs(model: nn.Module, texts: Sequence[torch.Tensor], names: Sequence[str], feature_dim: int,
                 what: str, regions_what: Optional[str] = None) -> None:
    """Token ids inside the model's vocabulary, texts within its positions, regions of its width
    (a width error names ``regions_what``, the regions file, where given)."""
    cfg = model.config
    if feature_dim != cfg.img_dim:
        raise ConfigError(f"{regions_what or what}: region features have width {feature_dim}, the model expects "
                          f"img_dim={cfg.img_dim}")
    for t, name in zip(texts, names):
        if int(t.max()) >= cfg.vocab_size:
            raise ConfigError(f"{what}: {name} has token id {int(t.max())}, the model embeds only "
                              f"{cfg.vocab_size} (wrong tokenizer for this model?)")
        if t.numel() > cfg.max_position_embeddings:
            raise ConfigError(f"{what}: {name} has {t.numel()} tokens with [CLS]/[SEP], more than the model's "
                              f"max_position_embeddings={cfg.max_position_embeddings}")


def check_regions(regions, what: str) -> None:
    """The region checks ``train.py`` runs before step 0 (:func:`cacr.checks.region_source_problems`:
    NaN or Inf, images with no regions, boxes not ordered or outside the image), before any
    scoring; the first problem in one line, with the count of the others."""
    from cacr.checks import region_source_problems

    problems = region_source_problems(regions, what)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)


def existing_file(p, what: str) -> Path:
    path = resolve_path(p)
    if not path.is_file():
        raise FileNotFoundError(f"{what}={p}: file not found")
    return path


def winoground_inputs(cfg: DictConfig, need_regions: bool) -> Tuple[Path, Optional[Path], Optional[OpenedData]]:
    """``(examples, regions, data)``: ``examples=null`` takes the data config's
    Winoground-format set (the synthetic world's by default) with its regions; explicit
    examples need explicit regions when a model scores them (the data config then gives
    only the tokenizer and region caps, and is not read at all for ``scorer=file``)."""
    if cfg.get("examples"):
        examples = existing_file(cfg.examples, "examples")
        if cfg.get("regions"):
            regions = existing_file(cfg.regions, "regions")
        elif need_regions:
            raise ConfigError(f"examples={cfg.examples} needs regions=PATH (the regions HDF5 holding "
                              f"ex_{{id}}_img_{{0|1}}) to be scored by a model")
        else:
            regions = None
        return examples, regions, open_data(cfg.data) if need_regions else None
    data = open_data(cfg.data)
    files = data.files
    if files.winoground_examples is None:
        raise ConfigError("no Winoground examples: give examples=PATH or a data config with winoground_examples")
    if not files.winoground_examples.is_file():
        raise FileNotFoundError(f"data.winoground_examples: {files.winoground_examples} not found")
    regions = resolve_path(cfg.regions) if cfg.get("regions") else files.winoground_regions
    if need_regions:
        if regions is None:
            raise ConfigError("no Winoground regions: give regions=PATH or set data.winoground_regions")
        if not regions.is_file():
            raise FileNotFoundError(f"Winoground regions file {regions} not found")
    return files.winoground_examples, regions, data
