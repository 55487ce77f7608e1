"""Inputs of the analysis command lines: the model, the pairs and the pictures behind them.

Everything is read from the configuration ``eval_winoground.py`` reads
(``conf/winoground.yaml`` and its data config, with the same ``key=value`` overrides) and
through the same readers: the model from ``ckpt_path`` (a ``.ckpt`` of ``train.py``) or a
model option (:mod:`cacr.evaluation.inputs`), the tokenizer and region caps of the data
config (:func:`cacr.data.sources.open_data`), and its Winoground-format set (the synthetic
world's by default). A pair is a
Winoground-format example's (caption, image), or any caption with any image of a regions
file. Its background picture is an image file when given, else, for the synthetic world,
its scene rendered by ``cacr.data.render`` after checking that the scene's boxes are the
regions file's boxes.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from cacr.data.sources import OpenedData
from cacr.model import PairExample
from cacr.outputs import file_stem, item_path

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BOX_TOLERANCE = 1e-4  # scenes.jsonl rounds boxes to 6 decimals, the regions file holds fp32


@dataclass
class Sources:
    """A model with the data configuration it is analysed on."""

    cfg: DictConfig
    model: nn.Module
    name: str
    device: torch.device
    head: str  # rank | itm: the score shown with each pair
    data: OpenedData  # the data config's files
    tokenizer: object


@dataclass
class Pair:
    """One (caption, image) pair to analyse."""

    example: PairExample
    words: List[str]  # word pieces without [CLS]/[SEP]
    label: str
    stem: str  # file name stem
    image_id: str
    scene: Optional[List[dict]] = None  # synthetic scene, regions in the regions file's row order
    scene_source: Optional[str] = None

    @property
    def region_labels(self) -> Optional[List[str]]:
        if self.scene is None:
            return None
        return [f"{k}:{g['colour']} {g['category']}" if g["kind"] == "object" else f"{k}:({g['category']})"
                for k, g in enumerate(self.scene)]


def compose_config(ckpt: Optional[str], overrides: Sequence[str]) -> DictConfig:
    """``conf/winoground.yaml`` with ``overrides`` (and ``ckpt_path=ckpt``)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    ov = list(overrides) + ([f"ckpt_path={ckpt}"] if ckpt else [])
    bad = [o for o in ov if "=" not in o]
    if bad:
        raise ValueError(f"overrides must be key=value, got {bad}")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("winoground", overrides=ov)
    except HydraException as e:
        raise ValueError(f"configuration: {e}") from None


def open_sources(ckpt: Optional[str], overrides: Sequence[str], device: str = "auto") -> Sources:
    from cacr.data.sources import open_data
    from cacr.evaluation.inputs import build_model, check_head, select_device

    cfg = compose_config(ckpt, overrides)
    dev = select_device(device)
    model, name = build_model(cfg, dev)
    data = open_data(cfg.data)
    return Sources(cfg, model, name, dev, check_head(cfg.head), data, data.tokenizer)


def synthetic_scenes(cfg: DictConfig, which: str) -> Optional[Path]:
    """The synthetic world's ``scenes.jsonl`` (``which``: winoground | main), None for other data."""
    if cfg.data.source != "synthetic":
        return None
    from cacr.data.sources import data_files
    from cacr.data.synthetic import SyntheticPaths

    paths = SyntheticPaths.under(data_files(cfg.data).regions.parent)
    return paths.winoground_scenes if which == "winoground" else paths.scenes


def _scene(scenes: Optional[Path], image_id: str, boxes: torch.Tensor) -> Optional[List[dict]]:
    """The scene of ``image_id``, checked against the regions file's boxes ``(m, >=4)``."""
    if scenes is None:
        return None
    from cacr.data.render import check_scene, scene_regions

    regions = scene_regions(scenes, image_id)
    check_scene(regions, f"{scenes} {image_id}")
    got = np.array([g["box"] for g in regions], dtype=np.float64)
    want = boxes[:, :4].double().numpy()
    if got.shape != want.shape or np.abs(got - want).max() > BOX_TOLERANCE:
        raise ValueError(f"{scenes}: scene {image_id!r} ({len(regions)} regions) does not match the regions file's "
                         f"{want.shape[0]} boxes: the scenes belong to another world or regions file")
    return regions


def _words(tokenizer, ids: Sequence[int]) -> List[str]:
    return [tokenizer.vocab[int(i)] for i in ids[1:-1]]


def winoground_pairs(src: Sources, example_id: str, which: str = "matched",
                     scenes: Optional[str] = None) -> List[Pair]:
    """The pairs of Winoground-format example ``example_id``: matched (c0, i0), (c1, i1) or all four."""
    from cacr.evaluation.inputs import check_inputs, winoground_inputs

    if which not in ("matched", "all"):
        raise ValueError(f"pairs must be 'matched' or 'all', got {which!r}")
    examples_path, regions_path, _ = winoground_inputs(src.cfg, need_regions=True)
    wino = src.data.winoground(examples_path, regions_path, in_memory=False)
    ids = [ex.key for ex in wino.examples]
    if str(example_id) not in ids:
        raise KeyError(f"{examples_path}: no example with id {example_id!r} (ids {', '.join(ids[:5])}, ...)")
    e = ids.index(str(example_id))
    ex = wino.examples[e]
    check_inputs(src.model, wino.texts[e], [f"example {example_id!r} caption_{c}" for c in (0, 1)],
                 wino.regions.feature_dim, str(examples_path), regions_what=str(regions_path))
    if scenes is None and not src.cfg.get("examples") and not src.cfg.get("regions"):
        scenes = synthetic_scenes(src.cfg, "winoground")
    combos = [(0, 0), (1, 1)] if which == "matched" else [(0, 0), (0, 1), (1, 0), (1, 1)]
    out = []
    for c, i in combos:
        pair = wino.pair(e, c, i)
        image_id = getattr(ex, f"image_{i}")
        out.append(Pair(pair, _words(src.tokenizer, pair.input_ids.tolist()),
                        label=f"example {example_id}: caption_{c} {getattr(ex, f'caption_{c}')!r} / image_{i} "
                              f"({image_id})",
                        stem=f"ex{file_stem(example_id, '--example')}_c{c}_i{i}", image_id=image_id,
                        scene=_scene(Path(scenes) if scenes else None, image_id, pair.img_pos_feat),
                        scene_source=str(scenes) if scenes else None))
    return out


def free_pair(src: Sources, text: str, image_id: str, regions: Optional[str] = None,
              scenes: Optional[str] = None) -> Pair:
    """Any caption with image ``image_id`` of ``regions`` (default: the data config's regions file)."""
    from cacr.data import open_regions
    from cacr.evaluation.inputs import check_inputs
    from cacr.paths import resolve_path

    if not text.strip():
        raise ValueError("--text is empty")
    path = resolve_path(regions) if regions else src.data.files.regions
    if path is None:
        raise ValueError("no regions file: give --regions PATH or a data config with data.regions")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: regions file not found")
    store = open_regions(path, src.data.caps, in_memory=False)
    feat, box = store.get(store.index(image_id))
    tok = src.tokenizer
    ids = torch.tensor(tok.with_specials(tok.encode(text)), dtype=torch.long)
    if ids.numel() < 3:
        raise ValueError(f"--text {text!r} has no word pieces")
    check_inputs(src.model, [ids], [f"--text {text!r}"], store.feature_dim, str(path))
    if scenes is None and not regions:
        scenes = synthetic_scenes(src.cfg, "main")
    stem = "pair_" + file_stem(image_id, "--image-id")
    return Pair(PairExample(ids, feat, box), _words(tok, ids.tolist()), label=f"{text!r} / {image_id}", stem=stem,
                image_id=image_id, scene=_scene(Path(scenes) if scenes else None, image_id, box),
                scene_source=str(scenes) if scenes else None)


def load_image(path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of a PNG or JPEG file."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def background(pair: Pair, image_file: Optional[str] = None,
               image_dir: Optional[str] = None) -> Tuple[Optional[np.ndarray], str]:
    """The picture the boxes are drawn on and where it came from (None: a blank canvas)."""
    if image_file:
        return load_image(image_file), f"file {image_file}"
    if image_dir:
        for suffix in IMAGE_SUFFIXES:
            p = item_path(image_dir, f"{pair.image_id}{suffix}", f"image id {pair.image_id!r}")  # read in it only
            if p.is_file():
                return load_image(p), f"file {p}"
        raise FileNotFoundError(f"{image_dir}: no {pair.image_id}{{{','.join(IMAGE_SUFFIXES)}}}")
    if pair.scene is not None:
        from cacr.data.render import render_scene

        return render_scene(pair.scene, where=f"{pair.scene_source} {pair.image_id}"), \
            f"synthetic scene rendered from {pair.scene_source}"
    return None, "none: boxes on a blank canvas"


def add_common_arguments(p: argparse.ArgumentParser, pictures: str) -> None:
    """The options every analysis command shares: device, wandb logging of ``pictures``,
    the output folder and trailing ``key=value`` overrides of conf/winoground.yaml."""
    p.add_argument("--device", default="auto", help="auto (CUDA if visible) | cpu | cuda | cuda:N")
    p.add_argument("--wandb", action="store_true",
                   help=f"log {pictures} to the active wandb run, or to a new offline run in --out")
    p.add_argument("--wandb-project", default="cacr")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("overrides", nargs="*", help="key=value overrides of conf/winoground.yaml")


def run_command(prog: str, parser: argparse.ArgumentParser, run, argv=None) -> None:
    """Parse ``argv``, check the output folder is writable, and call ``run(args)``; bad input
    exits with one line naming ``prog`` (``CACR_DEBUG=1``: the traceback)."""
    from cacr.errors import EXPECTED, exit_interrupted, exit_on_error, raise_on_termination
    from cacr.outputs import check_writable_dir

    args = parser.parse_args(argv)
    raise_on_termination()
    try:
        if getattr(args, "out", None):
            check_writable_dir(args.out, "--out")
        run(args)
    except EXPECTED as e:
        exit_on_error(prog, e)
    except KeyboardInterrupt as e:
        exit_interrupted(prog, e)
