"""The one reader of a data config (a ``conf/data/*.yaml`` option): the files it names and
those files opened.

Training's datamodule, the evaluators (``eval_winoground.py``, ``eval_retrieval.py``,
``eval_multiple_choice.py``) and the analysis tools all read their data through
:func:`open_data`, so they see the same synthetic world (generated on first use), region
caps, tokenizer, splits and Winoground-format set. Each file is opened and checked the
first time it is asked for, so a command reads only what it uses. No Lightning import: the
evaluators run without it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from cacr.paths import resolve_path

from .datasets import RegionCaps, RegionSource, RetrievalSplit, WinogroundSet, build_split, open_regions
from .formats import CaptionsTable, read_captions
from .synthetic import SyntheticConfig, ensure_synthetic
from .tokenizer import WordPieceTokenizer

SPLIT_ROLES = ("train", "val", "test")


@dataclass(frozen=True)
class DataFiles:
    """The files of a data config; ``None`` where the config names none."""

    regions: Optional[Path]
    captions: Optional[Path]
    tokenizer: Optional[str]  # vocab.txt path or a name; None: the vocabulary stored in the captions file
    winoground_examples: Optional[Path]
    winoground_regions: Optional[Path]
    scenes: Optional[Path] = None  # synthetic worlds: the scenes, which say which captions are true of which images


def synthetic_config(cfg: Mapping[str, Any]) -> SyntheticConfig:
    """The generator parameters of a synthetic data config (``data.synthetic`` with its
    ``img_dim`` and ``vocab_size``)."""
    return SyntheticConfig(img_dim=int(cfg["img_dim"]), vocab_size=int(cfg["vocab_size"]),
                           **dict(cfg.get("synthetic") or {}))


def data_files(cfg: Mapping[str, Any]) -> DataFiles:
    """The files of data config ``cfg``: ``source=files`` names them; ``source=synthetic``
    generates the world into ``root`` on first use and returns its files."""
    source = cfg["source"]
    if source == "synthetic":
        sp = ensure_synthetic(synthetic_config(cfg), resolve_path(cfg["root"]))
        return DataFiles(sp.regions, sp.captions, str(sp.vocab), sp.winoground_examples, sp.winoground_regions,
                         sp.scenes)
    if source != "files":
        raise ValueError(f"data.source must be 'synthetic' or 'files', got {source!r}")
    return DataFiles(resolve_path(cfg.get("regions")), resolve_path(cfg.get("captions")), cfg.get("tokenizer"),
                     resolve_path(cfg.get("winoground_examples")), resolve_path(cfg.get("winoground_regions")))


def region_caps(cfg: Mapping[str, Any]) -> RegionCaps:
    return RegionCaps(float(cfg["conf_th"]), int(cfg["min_bb"]), int(cfg["max_bb"]))


class OpenedData:
    """The files of a data config, each opened (and checked) on first use: ``regions``,
    ``captions``, ``tokenizer``, :meth:`split` and :meth:`winoground`."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.name = str(cfg["name"])
        self.files = data_files(cfg)
        self.caps = region_caps(cfg)
        self.in_memory = bool(cfg["in_memory"])
        self.split_names = {role: str(cfg[f"{role}_split"]) for role in SPLIT_ROLES}

    def _existing(self, key: str) -> Path:
        path = getattr(self.files, key)
        if path is None:
            raise ValueError(f"data.{key} is not set: give the path of the {key} HDF5 file (see data/README.md)")
        if not path.is_file():
            raise FileNotFoundError(f"data.{key}: {path} not found (see data/README.md to make it)")
        return path

    @functools.cached_property
    def regions(self) -> RegionSource:
        """The regions of the splits (in memory or read lazily, as ``data.in_memory`` says)."""
        return open_regions(self._existing("regions"), self.caps, self.in_memory)

    @functools.cached_property
    def captions(self) -> CaptionsTable:
        return read_captions(self._existing("captions"))

    @functools.cached_property
    def tokenizer(self) -> WordPieceTokenizer:
        """``data.tokenizer``, else the vocabulary stored in the captions file."""
        if self.files.tokenizer:
            return WordPieceTokenizer.load(self.files.tokenizer)
        if "captions" in self.__dict__:  # already read in full: no second read
            captions = self.captions
        else:
            path = self.files.captions
            if path is None:
                raise ValueError("no tokenizer: set data.tokenizer=vocab.txt (or data.captions, whose vocabulary "
                                 "is used)")
            if not path.is_file():
                raise FileNotFoundError(f"data.captions: {path} not found (its vocabulary is the tokenizer; "
                                        f"or set data.tokenizer=vocab.txt)")
            captions = read_captions(path, check=False)
        return WordPieceTokenizer(captions.vocab, name=str(captions.attrs.get("tokenizer")),
                                  do_lower_case=bool(captions.attrs.get("do_lower_case", False)))

    def has_split(self, role: str) -> bool:
        return self.split_names[role] in set(self.captions.splits)

    def split(self, role: str) -> RetrievalSplit:
        """Split ``role`` (train / val / test, named by ``data.<role>_split``): all of its
        captions, in file order, and their images."""
        if role not in SPLIT_ROLES:
            raise ValueError(f"split={role!r}: expected one of {list(SPLIT_ROLES)} (the data config names each)")
        return build_split(self.name, self.captions, self.regions, self.split_names[role])

    def winoground(self, examples: Optional[Path] = None, regions: Optional[Path] = None,
                   in_memory: Optional[bool] = None) -> Optional[WinogroundSet]:
        """The Winoground-format set: ``examples`` / ``regions`` or the config's
        ``winoground_examples`` / ``winoground_regions``; ``None`` when either is not set."""
        examples = examples or self.files.winoground_examples
        regions = regions or self.files.winoground_regions
        if examples is None or regions is None:
            return None
        return WinogroundSet(examples, regions, self.tokenizer, self.caps,
                             self.in_memory if in_memory is None else in_memory)


def open_data(cfg: Mapping[str, Any]) -> OpenedData:
    """The files of data config ``cfg`` (a ``conf/data`` option), opened on first use."""
    return OpenedData(cfg)
