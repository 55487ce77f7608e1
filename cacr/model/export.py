"""Export a model fine-tuned here as an official UNITER image-text retrieval checkpoint.

    python -m cacr.model.export outputs/<date>/<time>/checkpoints/best-stepN.ckpt cacr-base.pt
    python -m cacr.model.export run.ckpt cacr-base.pt --dtype float16 --overwrite

The output is what the public UNITER code saves after ITM fine-tuning and what its
``UniterForImageTextRetrieval.from_pretrained(config_json, state_dict, img_dim=2048)``
loads: a plain ``torch.save``'d dict of tensors with the official names (``uniter.*``
backbone, ``itm_output`` H->2, ``rank_output`` H->1) and shapes, nothing else (no optimizer,
no Lightning keys, no buffers). Beside it, ``<out>.json`` holds the official BERT-style model
config (the eleven fields the public configs have), for ``--model_config``.

- ``--dtype``: ``float32`` (default), ``float16`` (the released checkpoints' dtype, half the
  size) or ``bfloat16``.
- ``--format``: ``legacy`` (default) writes PyTorch's pre-1.6 serialization, which the
  public code's Docker image (an older PyTorch) reads and every later PyTorch reads too;
  ``zip`` writes the current format.
- ``--rank-into-itm``: also copy ``rank_output`` into row 1 ("match") of ``itm_output``.
  The public inference script re-initialises ``rank_output`` from that row whenever it
  does not find a key literally named ``rank_output`` (a state dict never has one), so
  without this option it scores with the untrained ITM row instead of the fine-tuned head.
- The file is written under a temporary name beside the target and renamed when complete;
  an existing output is refused unless ``--overwrite``.

Every tensor name and shape is checked against :func:`official_shapes` of the model's
config before anything is written.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from cacr.outputs import atomic_write

from .checkpoint import CheckpointError, load_checkpoint
from .config import UniterConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMATS = ("legacy", "zip")
# the fields of the official config JSON files (uniter-base.json, uniter-large.json)
OFFICIAL_CONFIG_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                          "intermediate_size", "hidden_act", "hidden_dropout_prob",
                          "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
                          "initializer_range")
OFFICIAL_IMG_DIM = 2048  # the public code passes the region feature width as a constant


class ExportError(ValueError):
    """An export that cannot be written, explained in one message."""


def official_shapes(cfg: UniterConfig) -> "OrderedDict[str, Tuple[int, ...]]":
    """Every parameter name and shape of the official retrieval model for ``cfg``, in the
    official module order (text embeddings, image embeddings, encoder layers, pooler, heads)."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    out: "OrderedDict[str, Tuple[int, ...]]" = OrderedDict()

    def linear(name: str, n_out: int, n_in: int) -> None:
        out[f"{name}.weight"] = (n_out, n_in)
        out[f"{name}.bias"] = (n_out,)

    def norm(name: str) -> None:
        out[f"{name}.weight"] = (H,)
        out[f"{name}.bias"] = (H,)

    e = "uniter.embeddings"
    out[f"{e}.word_embeddings.weight"] = (V, H)
    out[f"{e}.position_embeddings.weight"] = (cfg.max_position_embeddings, H)
    out[f"{e}.token_type_embeddings.weight"] = (cfg.type_vocab_size, H)
    norm(f"{e}.LayerNorm")
    m = "uniter.img_embeddings"
    linear(f"{m}.img_linear", H, cfg.img_dim)
    norm(f"{m}.img_layer_norm")
    norm(f"{m}.pos_layer_norm")
    linear(f"{m}.pos_linear", H, 7)
    out[f"{m}.mask_embedding.weight"] = (2, cfg.img_dim)
    norm(f"{m}.LayerNorm")
    for n in range(cfg.num_hidden_layers):
        p = f"uniter.encoder.layer.{n}"
        for qkv in ("query", "key", "value"):
            linear(f"{p}.attention.self.{qkv}", H, H)
        linear(f"{p}.attention.output.dense", H, H)
        norm(f"{p}.attention.output.LayerNorm")
        linear(f"{p}.intermediate.dense", I, H)
        linear(f"{p}.output.dense", H, I)
        norm(f"{p}.output.LayerNorm")
    linear("uniter.pooler.dense", H, H)
    linear("itm_output", 2, H)
    linear("rank_output", 1, H)
    return out


def official_config(cfg: UniterConfig) -> Dict[str, object]:
    """The official model config JSON of ``cfg`` (its eleven BERT fields)."""
    d = cfg.to_dict()
    return {k: d[k] for k in OFFICIAL_CONFIG_FIELDS}


def read_run_checkpoint(path: Union[str, Path], *, label: Optional[str] = None,
                        official_hint: str = "an official UNITER file needs no export"
                        ) -> Tuple[UniterConfig, Dict[str, Tensor]]:
    """The model config and the ``model.*`` weights (prefix stripped) of a ``.ckpt`` of this
    project's ``train.py``. Errors are one line starting with ``label`` (default: the path,
    e.g. ``ckpt_path=...`` for a command line); ``official_hint`` says what to do with an
    official UNITER file instead."""
    path = Path(path)
    label = label or str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{label}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised as one line naming the file
        raise ExportError(f"{label}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    hp = obj.get("hyper_parameters") if isinstance(obj, Mapping) else None
    if not isinstance(hp, Mapping) or not isinstance(hp.get("model_config"), Mapping):
        raise ExportError(f"{label}: no hyper_parameters['model_config'], so not a .ckpt of this project's "
                          f"train.py ({official_hint})")
    state = obj.get("state_dict")
    state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")} \
        if isinstance(state, Mapping) else {}
    if not state:
        raise ExportError(f"{label}: its state_dict holds no 'model.' weights")
    return UniterConfig.from_dict(hp["model_config"], where=f"{path} model_config"), state


def official_state_dict(cfg: UniterConfig, state: Mapping[str, Tensor], *, dtype: torch.dtype = torch.float32,
                        rank_into_itm: bool = False, where: str = "checkpoint") -> "OrderedDict[str, Tensor]":
    """The official retrieval state dict of the model ``(cfg, state)``: loaded into this
    project's model first (every key checked), then read back in the official order, cast
    to ``dtype``, contiguous CPU tensors; names and shapes equal :func:`official_shapes`."""
    from .uniter import UniterForImageTextRetrieval

    model = UniterForImageTextRetrieval(cfg)
    try:
        load_checkpoint(model, dict(state), strict=True)
    except CheckpointError as e:
        raise ExportError(f"{where}: {e}") from None
    own = model.state_dict()
    want = official_shapes(cfg)
    extra = sorted(set(own) - set(want))
    missing = sorted(set(want) - set(own))
    wrong = [(k, tuple(own[k].shape), s) for k, s in want.items() if k in own and tuple(own[k].shape) != s]
    if extra or missing or wrong:
        raise ExportError(f"{where}: the model does not have the official layout: extra {extra[:5]}, "
                          f"missing {missing[:5]}, shapes {wrong[:5]}")
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    for k in want:
        out[k] = own[k].detach().to("cpu", dtype).contiguous().clone()
    if rank_into_itm:
        out["itm_output.weight"][1] = out["rank_output.weight"][0]
        out["itm_output.bias"][1] = out["rank_output.bias"][0]
    return out


def config_path_for(out: Path) -> Path:
    return out.with_suffix(".json") if out.suffix != ".json" else out.with_name(out.name + ".config.json")


def export(ckpt: Union[str, Path], out: Union[str, Path], *, dtype: str = "float32", fmt: str = "legacy",
           rank_into_itm: bool = False, overwrite: bool = False, config_out: Optional[Union[str, Path]] = None) -> dict:
    """Write the official state dict of the run checkpoint ``ckpt`` to ``out`` and its model
    config to ``config_out`` (default ``out`` with ``.json``); returns a summary."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype}: expected one of {list(DTYPES)}")
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: expected one of {list(FORMATS)}")
    out = Path(out)
    config_out = Path(config_out) if config_out else config_path_for(out)
    for p in (out, config_out):
        if Path(ckpt).resolve() == p.resolve():
            raise ExportError(f"{p} is the checkpoint being exported; give another output path")
    if not overwrite:
        for p in (out, config_out):
            if p.exists():
                raise ExportError(f"{p} exists; pass --overwrite to replace it")
    cfg, state = read_run_checkpoint(ckpt)
    sd = official_state_dict(cfg, state, dtype=DTYPES[dtype], rank_into_itm=rank_into_itm, where=str(ckpt))
    legacy = fmt == "legacy"
    atomic_write(out, lambda f: torch.save(sd, f, _use_new_zipfile_serialization=not legacy))
    config = official_config(cfg)
    atomic_write(config_out, lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()))
    n = sum(t.numel() for t in sd.values())
    return {"checkpoint": str(ckpt), "out": str(out), "config": str(config_out), "tensors": len(sd),
            "parameters": n, "dtype": dtype, "format": fmt, "img_dim": cfg.img_dim,
            "rank_into_itm": rank_into_itm, "bytes": out.stat().st_size}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cacr.model.export",
                                 description="Write a .ckpt of this project as an official UNITER retrieval state dict.")
    ap.add_argument("ckpt", help="a .ckpt of train.py (e.g. outputs/<date>/<time>/checkpoints/best-stepN.ckpt)")
    ap.add_argument("out", help="the .pt to write (its model config goes to the same name with .json)")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--format", dest="fmt", default="legacy", choices=list(FORMATS),
                    help="legacy: pre-1.6 serialization, readable by the public code's PyTorch (default); zip")
    ap.add_argument("--rank-into-itm", action="store_true",
                    help="copy rank_output into itm_output row 1 (the public inference script scores with it)")
    ap.add_argument("--config-out", default=None, help="where to write the model config JSON (default: OUT with .json)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = ap.parse_args(argv)
    try:
        info = export(args.ckpt, args.out, dtype=args.dtype, fmt=args.fmt, rank_into_itm=args.rank_into_itm,
                      overwrite=args.overwrite, config_out=args.config_out)
    except (ValueError, OSError) as e:  # OSError: a read or write error names its path
        from cacr.errors import one_line

        print(f"cacr.model.export: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cacr.model.export: interrupted; no partial file left", file=sys.stderr)
        return 130
    print(f"wrote {info['out']} ({info['tensors']} tensors, {info['parameters']:,} parameters, {info['dtype']}, "
          f"{info['format']} format) and {info['config']}")
    if info["img_dim"] != OFFICIAL_IMG_DIM:
        print(f"note: region features of width {info['img_dim']}; the public code's IMG_DIM is "
              f"{OFFICIAL_IMG_DIM}, pass img_dim={info['img_dim']} to from_pretrained")
    return 0


if __name__ == "__main__":
    sys.exit(main())
