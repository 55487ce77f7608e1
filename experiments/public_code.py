"""Run the public UNITER code itself, from a local checkout given by path, on this project's
weights and inputs: for ``benchmark.py --public-code PATH`` (timing and score agreement).

Nothing is downloaded and nothing of the public code is copied here: the checkout is
imported as it is. What this module adds around it:

- **Import without its environment.** The checkout's ``model/`` directory is imported as a
  package under a private name (``uniter_public``), so its relative imports work and it
  cannot clash with anything named ``model``. Its layers import ``FusedLayerNorm`` from NVIDIA
  apex; when apex is not installed, a stand-in module maps that name to ``torch.nn.LayerNorm``
  (the same function: a LayerNorm over the last dimension with the given eps and an affine
  weight and bias). :func:`import_public` says which one was used.
- **The same weights.** This project's model is exported with
  ``cacr.model.export.official_state_dict`` (the official key names and shapes) and loaded
  into the public ``UniterForImageTextRetrieval`` with ``strict=True``.
- **The public evaluation's batching.** One caption against consecutive chunks of images,
  the images sorted by region count once, each chunk padded to its largest image; the inputs
  built the way the public collate function defines them: ``input_ids`` and ``position_ids``
  of the caption, zero-padded features and 7-d boxes, an attention mask of ones over the
  caption and each image's own regions, and the gather index (each image's regions right
  after the caption, the pad positions behind them). Scores are the public
  model's ``rank_output`` logits (``compute_loss=False``), in fp32, under ``no_grad``.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
from pathlib import Path
from typing import Sequence, Tuple

import torch

PACKAGE = "uniter_public"


class PublicCodeError(RuntimeError):
    """The path given is not a usable checkout of the public UNITER code."""


def _apex_stand_in() -> str:
    """Install ``apex.normalization.fused_layer_norm.FusedLayerNorm`` = ``torch.nn.LayerNorm``
    when apex is absent; return which LayerNorm the public code will use."""
    stand_in = "torch.nn.LayerNorm (apex not installed)"
    if getattr(sys.modules.get("apex"), "_cacr_stand_in", False):
        return stand_in
    try:
        from apex.normalization.fused_layer_norm import FusedLayerNorm  # noqa: F401
        return "apex FusedLayerNorm"
    except ImportError:
        pass
    names = ["apex", "apex.normalization", "apex.normalization.fused_layer_norm"]
    mods = {n: types.ModuleType(n) for n in names}
    mods["apex.normalization.fused_layer_norm"].FusedLayerNorm = torch.nn.LayerNorm
    mods["apex"]._cacr_stand_in = True
    mods["apex"].normalization = mods["apex.normalization"]
    mods["apex.normalization"].fused_layer_norm = mods["apex.normalization.fused_layer_norm"]
    for n, m in mods.items():
        sys.modules[n] = m
    return stand_in


def import_public(path) -> Tuple[types.ModuleType, types.ModuleType, str]:
    """Import ``model/model.py`` and ``model/itm.py`` of the checkout at ``path``. Returns
    ``(model_module, itm_module, layer_norm)``; a clear error when the files are missing."""
    root = Path(path).expanduser().resolve()
    pkg_dir = root / "model"
    for f in ("model.py", "itm.py", "layer.py"):
        if not (pkg_dir / f).is_file():
            raise PublicCodeError(f"--public-code {path}: no model/{f} there; expected a checkout of the public "
                                  "UNITER code (github.com/ChenRocks/UNITER or a fork with its model/ directory)")
    layer_norm = _apex_stand_in()
    old = sys.modules.get(PACKAGE)
    if old is not None and list(getattr(old, "__path__", [])) != [str(pkg_dir)]:
        raise PublicCodeError(f"--public-code {path}: another checkout ({list(old.__path__)}) is already imported "
                              "in this process")
    if old is None:
        spec = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
        pkg = importlib.util.module_from_spec(spec)
        pkg.__path__ = [str(pkg_dir)]
        sys.modules[PACKAGE] = pkg
    try:
        model_mod = importlib.import_module(f"{PACKAGE}.model")
        itm_mod = importlib.import_module(f"{PACKAGE}.itm")
    except Exception as e:  # noqa: BLE001 - re-raised naming the checkout
        raise PublicCodeError(f"--public-code {path}: importing its model/ failed: {type(e).__name__}: {e}") from e
    for mod, name in ((model_mod, "UniterConfig"), (itm_mod, "UniterForImageTextRetrieval")):
        if not hasattr(mod, name):
            raise PublicCodeError(f"--public-code {path}: {mod.__file__} defines no {name}")
    return model_mod, itm_mod, layer_norm


def public_model(path, model) -> Tuple[torch.nn.Module, str]:
    """The public ``UniterForImageTextRetrieval`` holding the weights of this project's
    ``model`` (official names, every key checked), in eval mode, fp32, on the model's device."""
    from cacr.model.export import official_config, official_state_dict

    model_mod, itm_mod, layer_norm = import_public(path)
    cfg = model.config
    pub_cfg = model_mod.UniterConfig.from_dict(official_config(cfg))
    pub = itm_mod.UniterForImageTextRetrieval(pub_cfg, img_dim=cfg.img_dim)
    state = official_state_dict(cfg, model.state_dict(), where="benchmark model")
    missing, unexpected = pub.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PublicCodeError(f"--public-code {path}: the official state dict does not fit its model: missing "
                              f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
    device = next(model.parameters()).device
    return pub.to(device).float().eval(), layer_norm


def public_inputs(caption: torch.Tensor, images: Sequence[Tuple[torch.Tensor, torch.Tensor]], device) -> dict:
    """The public evaluation batch of one caption against ``images`` (``(features, 7-d boxes)``
    each): the dictionary its ``UniterForImageTextRetrieval.forward`` reads."""
    n, t = len(images), caption.numel()
    nbb = [f.shape[0] for f, _ in images]
    width = max(nbb)
    feat = torch.zeros(n, width, images[0][0].shape[1])
    pos = torch.zeros(n, width, 7)
    attn = torch.zeros(n, t + width, dtype=torch.long)
    for i, ((f, b), m) in enumerate(zip(images, nbb)):
        feat[i, :m] = f.float()
        pos[i, :m] = b.float()
        attn[i, :t + m] = 1
    # The public gather index puts each example's regions right after its own text, reading
    # them from after the longest text of the batch. With one caption (no text padding)
    # they already sit there, so the index is the identity; the pads stay behind them.
    gather = torch.arange(t + width).repeat(n, 1)
    ids = caption.long().view(1, -1).expand(n, -1)
    return {"input_ids": ids.to(device), "position_ids": torch.arange(t).view(1, -1).to(device),
            "img_feat": feat.to(device), "img_pos_feat": pos.to(device), "attn_masks": attn.to(device),
            "gather_index": gather.to(device)}


def public_code_scores(pub, caps, imgs, cap_rows, chunk, device) -> torch.Tensor:
    """Scores of ``cap_rows`` x all images through the public model, with the public
    evaluation's batching (images sorted by region count once, chunks of ``chunk``)."""
    from cacr.model.batch import boxes_to_7d

    n_img = len(imgs)
    by_regions = sorted(range(n_img), key=lambda i: imgs[i][0].shape[0])
    boxes = [boxes_to_7d(b) for _, b in imgs]
    out = torch.empty(len(cap_rows), n_img)
    with torch.no_grad():
        for r, c in enumerate(cap_rows):
            for s in range(0, n_img, chunk):
                ids = by_regions[s:s + chunk]
                batch = public_inputs(caps[c], [(imgs[i][0], boxes[i]) for i in ids], device)
                out[r, ids] = pub(batch, compute_loss=False).float().view(-1).cpu()
    return out
