"""Compositional multiple-choice evaluation: one image, its true caption and one or more foils.

Benchmarks read in their published formats, scored by their own rules (each file's items
keep the benchmark's categories as tags):

- ARO (Yuksekgonul et al., 2023). VG-Relation (``visual_genome_relation.json``) and
  VG-Attribution (``visual_genome_attribution.json``): a JSON list of
  ``{"image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption", "false_caption", ...}``
  with ``relation_name`` (tag ``relation``) or ``attributes`` (two strings, tag
  ``attributes`` = ``"<a0>_<a1>"``). ARO scores the image cropped to the item's box: with
  ``region_key="item"`` the regions are looked up under the item's key, where
  ``python -m cacr.data.crops`` stores each item's crop. ARO's VG-Relation number is the
  macro accuracy over relations without its symmetric ones (:data:`ARO_SYMMETRIC_RELATIONS`),
  VG-Attribution's over attribute pairs with at least 25 items. COCO-Order / Flickr30k-Order:
  ARO builds them in memory from the Karpathy test captions with spaCy / NLTK
  perturbations; a JSON list of its test cases ``{"image", "caption_options": [true,
  perturbed, ...]}`` is read (the Karpathy file itself is refused with that instruction),
  and a tie counts as correct (ARO's argmax with the true caption first).
- SugarCrepe (Hsieh et al., 2023): one JSON object per category file (``replace_obj.json``,
  ``swap_att.json``, ``add_rel.json``, ...), ``{id: {"filename", "caption",
  "negative_caption"}}``; tags ``category`` (the file name), ``type`` (replace / swap /
  add) and ``target`` (obj / att / rel); accuracy per category, ties wrong.
- VALSE (Parcalabescu et al., 2022): one JSON object per piece file (``existence.json``,
  ``counting-hard.json``, ...), ``{id: {"image_file", "caption", "foil", "mturk", ...}}``
  (one foil, a string); only the valid items (``mturk["caption"] >= 2``) by default, the
  counts kept in the results; VALSE's ``acc_r`` and, with the ITM head, ``acc``, ``p_c``,
  ``p_f`` (:func:`valse_metrics`); tags ``piece`` (the file name) and ``phenomenon``
  (``linguistic_phenomena``, if given).
- This project's format (``.jsonl``, the synthetic world's set, see
  ``cacr/data/synthetic_mc.py``): ``{"id", "image", "caption", "foils": [...], "tags": {...}}``.

The image of an item is looked up in a regions HDF5 file (the project's format, made with
the converters) by the file name's stem (``image_key=stem``; ``name`` keeps the suffix,
``path`` the string as given, and a template such as ``flickr30k_{stem:0>12}`` maps the
benchmark's names to UNITER's feature keys).

An item is correct when its true caption scores strictly higher than every foil (ties are
wrong, as ARO's VG argmax with the foil first and SugarCrepe's strict comparison make them;
the order sets excepted, above). Accuracy is the percentage of correct items, overall and
per category of every tag, each with a BCa bootstrap 95% interval over items
(:mod:`cacr.evaluation.bootstrap`); ``macro`` is the mean accuracy over the categories of a
tag; ``benchmark`` holds the numbers the benchmark's own script reports. Scoring uses the
same engine as Winoground (``score_pairs`` on a ``PairStore``, the model's ``rank`` or
``itm`` head), shares one batch plan among DDP ranks (the same scores on any process count)
and, in bf16, decides in fp32 every item whose outcome bf16 rounding could change
(:mod:`cacr.evaluation.exact`).
"""
from __future__ import annotations

import functools
import glob
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .distributed import rank_and_world_size
from .engine import score_pairs

FORMATS = ("aro_relation", "aro_attribution", "aro_order", "sugarcrepe", "valse", "jsonl")
IMAGE_KEYS = ("stem", "name", "path")  # or a template such as "flickr30k_{stem:0>12}"
REGION_KEYS = ("image", "item")  # regions looked up by the item's image, or by the item's own key (crops)
MACRO_MIN_COUNT = {"aro_attribution": 25}  # ARO's VG-Attribution table keeps pairs with >= 25 items
TIES_CORRECT = frozenset({"aro_order"})  # ARO's order sets: argmax with the true caption first
VALSE_MIN_VOTES = 2  # VALSE's valid set: mturk["caption"] >= 2 (2 of 3 annotators chose the caption only)
VALSE_ITM_THRESHOLD = 0.0  # p_c / p_f: ITM match minus no-match logit > 0 <=> match probability > 1/2
_SUGARCREPE = re.compile(r"^(?P<type>replace|swap|add)_(?P<target>obj|att|rel)$")

# The relations ARO's VG-Relation macro accuracy leaves out (the list of its published
# notebook, "Replicate ARO! VG-Relation, VG-Attribution"): relations whose swapped caption
# can be as true as the original ("near", "next to", "with", ...), or that the authors
# judged ambiguous. The per-relation accuracies still list them.
ARO_SYMMETRIC_RELATIONS = frozenset("""
adjusting|around|attached to|beside|between|bigger than|biting|boarding|brushing|by|chewing|cleaning|climbing|
close to|coming from|coming out of|contain|crossing|dragging|draped over|drinking|drinking from|driving|
driving down|driving on|eating from|eating in|enclosing|exiting|facing|filled with|floating in|floating on|
flying|flying above|flying in|flying over|flying through|full of|going down|going into|going through|grazing in|
growing in|growing on|guiding|hanging from|hanging in|hanging off|hanging over|higher than|holding onto|hugging|
in between|jumping off|jumping on|jumping over|kept in|larger than|leading|leaning over|leaving|licking|
longer than|looking in|looking into|looking out|looking over|looking through|lying next to|lying on top of|making|
mixed with|mounted on|moving|near|next to|of|on the back of|on the edge of|on the front of|on the other side of|
on the side of|opening|painted on|parked at|parked beside|parked by|parked in|parked in front of|parked near|
parked next to|perched on|petting|piled on|playing|playing in|playing on|playing with|pouring|reaching for|
reading|reflected on|riding on|running in|running on|running through|seen through|sitting behind|sitting beside|
sitting by|sitting in front of|sitting near|sitting next to|sitting under|skiing down|skiing on|sleeping in|
sleeping on|smiling at|sniffing|splashing|sprinkled on|stacked on|standing against|standing around|
standing behind|standing beside|standing in front of|standing near|standing next to|staring at|stuck in|
surrounding|swimming in|swinging|talking to|topped with|touching|traveling down|traveling on|tying|typing on|
underneath|wading in|waiting for|walking across|walking by|walking down|walking next to|walking through|
with|working in|working on|worn on|wrapped around|wrapped in""".replace("\n", "").split("|"))
MACRO_EXCLUDE = {"aro_relation": {"relation": ARO_SYMMETRIC_RELATIONS}}


@dataclass(frozen=True)
class Item:
    key: str  # "<file stem>/<id or index>", unique within a set
    image: str  # image id in the regions file
    captions: Tuple[str, ...]  # the true caption first, then the foils
    tags: Dict[str, str] = field(default_factory=dict, compare=False)
    valid: bool = field(default=True, compare=False)  # VALSE: mturk["caption"] >= 2
    box: Optional[Tuple[float, float, float, float]] = field(default=None, compare=False)  # ARO VG: x, y, w, h


@dataclass
class MultipleChoiceSet:
    name: str
    format: str
    files: List[Path]
    items: List[Item]
    kept: Optional[Dict[str, Any]] = None  # VALSE's validity filter: {"rule", "kept", "of"}


# --------------------------------------------------------------------------- readers


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def check_image_key(image_key: str) -> str:
    """``stem`` | ``name`` | ``path``, or a template of them (``"flickr30k_{stem:0>12}"``):
    ``ValueError`` in one line otherwise."""
    if image_key in IMAGE_KEYS:
        return image_key
    if "{" not in image_key:
        raise ValueError(f"image_key={image_key!r}: expected one of {list(IMAGE_KEYS)} or a template "
                         f"such as 'flickr30k_{{stem:0>12}}' (fields {{stem}}, {{name}}, {{path}})")
    try:
        image_key.format(stem="0", name="0.jpg", path="a/0.jpg")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"image_key={image_key!r}: not a template of {{stem}}, {{name}}, {{path}} ({e!r})") from None
    return image_key


def _image_id(value: str, image_key: str) -> str:
    """The regions-file id of a benchmark's image name: its stem, name, path, or a template
    of them (``"flickr30k_{stem:0>12}"`` maps ``1007129816.jpg`` to ``flickr30k_001007129816``)."""
    if image_key == "stem":
        return Path(value).stem
    if image_key == "name":
        return Path(value).name
    if image_key == "path":
        return value
    return image_key.format(stem=Path(value).stem, name=Path(value).name, path=value)


def _text(path: Path, where: str, obj: Mapping, key: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{path}: {where}: {key!r} must be a non-empty string, got {v!r}")
    return v


def _texts(path: Path, where: str, obj: Mapping, key: str, at_least: int) -> List[str]:
    v = obj.get(key)
    if not isinstance(v, list) or len(v) < at_least or not all(isinstance(s, str) and s.strip() for s in v):
        raise ValueError(f"{path}: {where}: {key!r} must be a list of at least {at_least} non-empty "
                         f"string(s), got {v!r}")
    return v


def _entries(path: Path, obj: Any, fmt: str):
    """``(id, where, entry)`` of a list (ids are indices) or an object (ids are its keys) file."""
    if fmt in ("aro_relation", "aro_attribution", "aro_order"):
        if not isinstance(obj, list):
            raise ValueError(f"{path}: expected a JSON list of items ({fmt}), got {type(obj).__name__}")
        pairs = [(str(i), f"item {i}", e) for i, e in enumerate(obj)]
    else:
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a JSON object {{id: item}} ({fmt}), got {type(obj).__name__}")
        pairs = [(str(k), f"item {k!r}", e) for k, e in obj.items()]
    for i, where, e in pairs:
        if not isinstance(e, dict):
            raise ValueError(f"{path}: {where}: expected a JSON object, got {type(e).__name__}")
        yield i, where, e


KARPATHY_HINT = ("a Karpathy caption file (image + caption list, no perturbed captions): ARO builds "
                 "COCO-Order / Flickr30k-Order from it with spaCy and NLTK models; save ARO's test cases "
                 "as a JSON list of {image, caption_options} and give that file (docs/evaluation.md, ARO order sets)")


def detect_format(path: Path, obj: Any = None) -> str:
    """The benchmark format of ``path`` from its suffix and first item."""
    if path.suffix == ".jsonl":
        return "jsonl"
    obj = _load_json(path) if obj is None else obj
    first = obj[0] if isinstance(obj, list) and obj else (next(iter(obj.values()), None) if isinstance(obj, dict) else None)
    if isinstance(first, dict):
        if "caption_options" in first:
            return "aro_order"
        if "true_caption" in first and "relation_name" in first:
            return "aro_relation"
        if "true_caption" in first and "attributes" in first:
            return "aro_attribution"
        if "negative_caption" in first:
            return "sugarcrepe"
        if "image_file" in first and ("foil" in first or "foils" in first or "mturk" in first):
            return "valse"
        if isinstance(obj, list) and "image" in first and isinstance(first.get("caption"), list):
            raise ValueError(f"{path}: item 0: 'caption_options' missing: {KARPATHY_HINT}")
    raise ValueError(f"{path}: cannot tell the format from its first item (expected ARO VG-Relation / "
                     f"VG-Attribution / order, SugarCrepe, VALSE or .jsonl); give format=<one of {list(FORMATS)}>")


def _read_jsonl(path: Path, image_key: str) -> List[Item]:
    from cacr.winoground import jsonl_objects

    items, seen = [], {}
    for lineno, obj in jsonl_objects(path, "multiple-choice file"):
        where = f"line {lineno}"
        if "id" not in obj or isinstance(obj["id"], bool) or not isinstance(obj["id"], (int, str)) or obj["id"] == "":
            raise ValueError(f"{path}: {where}: 'id' must be an integer or a non-empty string, got {obj.get('id')!r}")
        key = str(obj["id"])
        if key in seen:
            raise ValueError(f"{path}: {where}: duplicate id {key!r} (first on line {seen[key]})")
        seen[key] = lineno
        where = f"{where} (id {key!r})"
        tags = obj.get("tags", {})
        if not isinstance(tags, dict) or not all(isinstance(v, (str, int)) for v in tags.values()):
            raise ValueError(f"{path}: {where}: 'tags' must be an object of strings, got {tags!r}")
        items.append(Item(f"{path.stem}/{key}", _image_id(_text(path, where, obj, "image"), image_key),
                          (_text(path, where, obj, "caption"), *_texts(path, where, obj, "foils", 1)),
                          {str(k): str(v) for k, v in tags.items()}))
    return items


def _number(path: Path, where: str, obj: Mapping, key: str) -> float:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise ValueError(f"{path}: {where}: {key!r} must be a number (ARO's box, in pixels), got {v!r}")
    return float(v)


def _aro_box(path: Path, where: str, e: Mapping) -> Tuple[float, float, float, float]:
    box = tuple(_number(path, where, e, k) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
    if box[2] <= 0 or box[3] <= 0:
        raise ValueError(f"{path}: {where}: 'bbox_w' and 'bbox_h' must be positive, got {box[2]!r} x {box[3]!r}")
    return box


def _valse_votes(path: Path, where: str, e: Mapping) -> int:
    """``mturk["caption"]``: how many of VALSE's three annotators chose the caption only."""
    m = e.get("mturk")
    v = m.get("caption") if isinstance(m, dict) else None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{path}: {where}: 'mturk' must be an object with an integer 'caption' (VALSE's "
                         f"annotator votes), got {m!r}; give valse_valid_only=false to score every item")
    return v


def read_file(path, fmt: str = "auto", image_key: str = "stem", *, valse_votes: bool = True) -> Tuple[str, List[Item]]:
    """``(format, items)`` of one benchmark file, every item (VALSE's ``valid`` flag set from
    ``mturk``, required unless ``valse_votes=False``); ``ValueError`` naming the file, item and field."""
    path = Path(path)
    check_image_key(image_key)
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: expected auto or one of {list(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    if fmt == "jsonl" or (fmt == "auto" and path.suffix == ".jsonl"):
        items = _read_jsonl(path, image_key)
        fmt = "jsonl"
    else:
        obj = _load_json(path)
        fmt = detect_format(path, obj) if fmt == "auto" else fmt
        items = []
        stem = path.stem
        for i, where, e in _entries(path, obj, fmt):
            key = f"{stem}/{i}"
            valid, box = True, None
            if fmt in ("aro_relation", "aro_attribution"):
                caps = (_text(path, where, e, "true_caption"), _text(path, where, e, "false_caption"))
                image = _text(path, where, e, "image_path")
                box = _aro_box(path, where, e)
                if fmt == "aro_relation":
                    tags = {"relation": _text(path, where, e, "relation_name")}
                else:
                    attrs = _texts(path, where, e, "attributes", 2)
                    tags = {"attributes": f"{attrs[0]}_{attrs[1]}"}
            elif fmt == "aro_order":
                if "caption_options" not in e and isinstance(e.get("caption"), list):
                    raise ValueError(f"{path}: {where}: 'caption_options' missing: {KARPATHY_HINT}")
                caps = tuple(_texts(path, where, e, "caption_options", 2))
                image, tags = _text(path, where, e, "image"), {}
            elif fmt == "sugarcrepe":
                caps = (_text(path, where, e, "caption"), _text(path, where, e, "negative_caption"))
                image = _text(path, where, e, "filename")
                m = _SUGARCREPE.match(stem)
                tags = {"category": stem, **({"type": m["type"], "target": m["target"]} if m else {})}
            else:  # valse: one foil per item, "foil" (a string) as published
                if "foil" not in e and "foils" in e:
                    raise ValueError(f"{path}: {where}: 'foil' must be a non-empty string (VALSE's field: one foil "
                                     f"per item), got no 'foil' but 'foils' = {e['foils']!r}")
                caps = (_text(path, where, e, "caption"), _text(path, where, e, "foil"))
                image = _text(path, where, e, "image_file")
                tags = {"piece": stem}
                if isinstance(e.get("linguistic_phenomena"), str) and e["linguistic_phenomena"]:
                    tags["phenomenon"] = e["linguistic_phenomena"]
                if valse_votes:
                    valid = _valse_votes(path, where, e) >= VALSE_MIN_VOTES
            items.append(Item(key, _image_id(image, image_key), tuple(caps), tags, valid, box))
    if not items:
        raise ValueError(f"{path}: no items")
    return fmt, items


def read_set(name: str, spec, fmt: str = "auto", image_key: str = "stem", resolve=Path, *,
             valse_valid_only: bool = True) -> MultipleChoiceSet:
    """A set of one or more files of one format: ``spec`` is a path, a glob or a list of them.
    VALSE sets keep only the valid items (``mturk["caption"] >= 2``, as VALSE reports) unless
    ``valse_valid_only=False``; ``kept`` records how many."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    files: List[Path] = []
    for s in specs:
        p = resolve(str(s))
        if any(ch in str(s) for ch in "*?["):
            matched = sorted(Path(m) for m in glob.glob(str(p)))
            if not matched:
                raise FileNotFoundError(f"sets.{name}={s}: no file matches")
            files += matched
        else:
            files.append(p)
    if not files:
        raise ValueError(f"sets.{name}: no files")
    formats, items = set(), []
    for p in files:
        f, its = read_file(p, fmt, image_key, valse_votes=valse_valid_only)
        formats.add(f)
        items += its
    if len(formats) > 1:
        raise ValueError(f"sets.{name}: its files have different formats {sorted(formats)}; give each its own set")
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        seen = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise ValueError(f"sets.{name}: item {dup!r} appears twice (two files of the same name?)")
    fmt = formats.pop()
    kept = None
    if fmt == "valse" and valse_valid_only:
        valid = [it for it in items if it.valid]
        kept = {"rule": f"mturk.caption >= {VALSE_MIN_VOTES}", "kept": len(valid), "of": len(items)}
        if not valid:
            raise ValueError(f"sets.{name}: none of its {len(items)} items is valid (mturk.caption >= "
                             f"{VALSE_MIN_VOTES}); give valse_valid_only=false to score them all")
        items = valid
    return MultipleChoiceSet(name, fmt, files, items, kept)


# --------------------------------------------------------------------------- data


class MultipleChoiceData:
    """A set's captions tokenized (``[CLS] w.. [SEP]``) and its images' rows in a regions file."""

    def __init__(self, mc: MultipleChoiceSet, regions_path, tokenizer, caps=None, in_memory: bool = True,
                 region_key: str = "image"):
        from cacr.data.datasets import RegionCaps, open_regions

        if region_key not in REGION_KEYS:
            raise ValueError(f"region_key={region_key!r}: expected one of {list(REGION_KEYS)}")
        self.set = mc
        self.region_key = region_key
        self.regions = open_regions(regions_path, RegionCaps() if caps is None else caps, in_memory)
        known = set(self.regions.image_ids)
        ids = [region_id(it, region_key) for it in mc.items]
        missing = [(it, r) for it, r in zip(mc.items, ids) if r not in known]
        if missing:
            what = "region id" if region_key == "item" else "image"
            shown = ", ".join(f"{it.key} ({what} {r!r})" for it, r in missing[:5])
            hint = " (region_key=item: a crops file of python -m cacr.data.crops)" if region_key == "item" else ""
            raise ValueError(f"{regions_path}: no regions for {len(missing)} of {len(mc.items)} items of set "
                             f"{mc.name!r}: {shown}{' ...' if len(missing) > 5 else ''}{hint}")
        self.image_rows = [self.regions.index(r) for r in ids]
        flat = [c for it in mc.items for c in it.captions]
        ids = tokenizer.encode_batch(flat)
        self.texts = [torch.tensor(tokenizer.with_specials(x), dtype=torch.long) for x in ids]
        offsets = [0]
        for it in mc.items:
            offsets.append(offsets[-1] + len(it.captions))
        self.offsets = offsets
        for n, it in enumerate(mc.items):
            for k in range(len(it.captions)):
                if self.texts[offsets[n] + k].numel() < 3:
                    what = "the caption" if k == 0 else f"foil {k}"
                    raise ValueError(f"set {mc.name!r}: item {it.key}: {what} has no word pieces ({it.captions[k]!r})")

    def caption_names(self) -> List[str]:
        return [f"item {it.key} {'caption' if k == 0 else f'foil {k}'}"
                for it in self.set.items for k in range(len(it.captions))]


def region_id(item: Item, region_key: str = "image") -> str:
    """The id an item's regions have in the regions file: its image's id, or (``item``) the
    item's own key, under which ``python -m cacr.data.crops`` stores the regions of its box."""
    return item.key if region_key == "item" else item.image


def item_pairs(offsets: Sequence[int], image_rows: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """``(pairs (P, 2), where (P, 2))``: caption ``c`` of item ``n`` against the item's image,
    and its place ``[n, k]`` in the ``(N, K)`` score table."""
    pairs, where = [], []
    for n in range(len(offsets) - 1):
        for k, c in enumerate(range(offsets[n], offsets[n + 1])):
            pairs.append((c, image_rows[n]))
            where.append((n, k))
    return torch.tensor(pairs, dtype=torch.long).view(-1, 2), torch.tensor(where, dtype=torch.long).view(-1, 2)


def score_items(score_fn, texts: Sequence[Tensor], offsets: Sequence[int], image_rows: Sequence[int], images,
                *, group=None, progress: bool = False, **kwargs) -> Tensor:
    """``(N, K)`` scores of N items, ``[n, k]`` = caption ``k`` of item ``n`` (0 the true one)
    against its image, NaN where an item has fewer than K captions. Under DDP the ranks share
    the batches of one plan (``score_pairs(shard=True)``); every rank gets the whole table."""
    N = len(offsets) - 1
    K = max(offsets[n + 1] - offsets[n] for n in range(N))
    rank, _ = rank_and_world_size(group)
    pairs, where = item_pairs(offsets, image_rows)
    s = score_pairs(score_fn, pairs, texts, images, progress=progress and rank == 0, desc="multiple choice",
                    shard=True, group=group, **kwargs)
    out = torch.full((N, K), float("nan"))
    out[where[:, 0], where[:, 1]] = s
    return out


# --------------------------------------------------------------------------- metrics


def correct_items(scores: Tensor, ties_correct: bool = False) -> Tensor:
    """``(N,)`` bool: the true caption (column 0) strictly above every foil (NaN = no caption);
    with ``ties_correct`` (ARO's order sets: argmax with the true caption first) at least as
    high as every foil."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores: expected (items, >= 2 captions), got shape {tuple(scores.shape)}")
    if torch.isnan(scores[:, :2]).any():
        raise ValueError(f"scores: item(s) {torch.isnan(scores[:, :2]).any(1).nonzero().flatten()[:10].tolist()} "
                         f"lack a score for the caption or the first foil")
    best_foil = scores[:, 1:].nan_to_num(nan=float("-inf")).max(1).values
    return scores[:, 0] >= best_foil if ties_correct else scores[:, 0] > best_foil


def _pct(ci: Sequence[float]) -> List[float]:
    return [100.0 * ci[0], 100.0 * ci[1]]


def accuracy_summary(correct: Tensor, *, n_boot: int = 10000, level: float = 0.95, seed: int = 0) -> Dict[str, Any]:
    """``{"accuracy" (percent), "n", "ci95"}``; the interval is BCa over items
    (:mod:`cacr.evaluation.bootstrap`; Wilson where every item has the same outcome)."""
    from .bootstrap import mean_interval

    correct = torch.as_tensor(correct, dtype=torch.bool)
    n = correct.numel()
    if n == 0:
        raise ValueError("no items to score")
    out: Dict[str, Any] = {"accuracy": 100.0 * correct.double().mean().item(), "n": n}
    if n_boot:
        out[f"ci{round(level * 100)}"] = _pct(mean_interval(correct.double().numpy(), n_boot=n_boot, level=level,
                                                            seed=seed))
    return out


def macro_summary(correct: Tensor, labels: Sequence[str], *, min_count: int = 1, exclude=(), n_boot: int = 10000,
                  level: float = 0.95, seed: int = 0) -> Optional[Dict[str, Any]]:
    """Mean per-category accuracy over the categories with at least ``min_count`` items and
    not in ``exclude``, and its BCa interval (the items of those categories resampled, a
    category counted in a resample when drawn at least once); ``None`` if there are none."""
    from .bootstrap import macro_interval, macro_mean

    counts: Dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    excluded = sorted(c for c in counts if c in exclude)
    kept = sorted(c for c, k in counts.items() if k >= min_count and c not in exclude)
    if not kept:
        return None
    code = {c: i for i, c in enumerate(kept)}
    rows = [i for i, lab in enumerate(labels) if lab in code]
    cats = np.array([code[labels[i]] for i in rows], dtype=np.int64)
    corr = torch.as_tensor(correct, dtype=torch.bool)[torch.tensor(rows, dtype=torch.long)].double().numpy()
    point = float(macro_mean(corr, cats, num_cats=len(kept)))
    out: Dict[str, Any] = {"accuracy": 100.0 * point, "n_categories": len(kept), "n": len(rows),
                           "min_count": min_count}
    if excluded:
        out["excluded_categories"] = len(excluded)
        out["excluded_items"] = sum(counts[c] for c in excluded)
    if n_boot:
        out[f"ci{round(level * 100)}"] = _pct(macro_interval(corr, cats, n_boot=n_boot, level=level, seed=seed))
    return out


def valse_metrics(scores: Tensor, *, threshold: Optional[float] = 0.0, n_boot: int = 10000, level: float = 0.95,
                  seed: int = 0) -> Dict[str, Dict[str, Any]]:
    """VALSE's four numbers (Parcalabescu et al., 2022, Sec. 5), in percent, each with its
    interval: ``acc_r``, the caption scored above its foil; with a match threshold (the ITM
    head's match minus no-match logit, 0 = probability 1/2), ``p_c``: captions classified as
    matching (score > threshold), ``p_f``: foils classified as not matching (score <=
    threshold), and ``acc = (p_c + p_f) / 2`` (its interval over the per-item means)."""
    from .bootstrap import mean_interval

    scores = torch.as_tensor(scores, dtype=torch.float64)
    per_item = {"acc_r": (scores[:, 0] > scores[:, 1]).double()}
    if threshold is not None:
        p_c = (scores[:, 0] > threshold).double()
        p_f = (scores[:, 1] <= threshold).double()
        per_item.update(acc=(p_c + p_f) / 2, p_c=p_c, p_f=p_f)
    out = {}
    for k in ("acc", "acc_r", "p_c", "p_f"):
        if k in per_item:
            v = per_item[k].numpy()
            out[k] = {"value": 100.0 * float(v.mean())}
            if n_boot:
                out[k][f"ci{round(level * 100)}"] = _pct(mean_interval(v, n_boot=n_boot, level=level, seed=seed))
    return out


def _value(r: Mapping[str, Any]) -> Dict[str, Any]:
    return {"value": r["accuracy"], **({"ci95": r["ci95"]} if "ci95" in r else {})}


def set_results(mc: MultipleChoiceSet, scores: Tensor, *, n_boot: int = 10000, seed: int = 0,
                threshold: Optional[float] = None) -> Dict[str, Any]:
    """The results record of one set: accuracy, CI, chance, by tag (per category), macro, and
    ``benchmark``: the numbers the benchmark's own scoring reports, by its rules (ARO: the
    VG-Relation macro over its non-symmetric relations, the VG-Attribution macro over pairs
    with >= 25 items, the order sets' precision@1 with ties correct; SugarCrepe: accuracy
    per category file; VALSE: ``acc_r``, and with ``threshold`` (the ITM head) ``acc``,
    ``p_c``, ``p_f``, over the valid items, also per piece)."""
    correct = correct_items(scores, ties_correct=mc.format in TIES_CORRECT)
    out = accuracy_summary(correct, n_boot=n_boot, seed=seed)
    out["chance"] = 100.0 * sum(1.0 / len(it.captions) for it in mc.items) / len(mc.items)
    out.update(format=mc.format, files=[str(p) for p in mc.files])
    if mc.kept is not None:
        out["kept"] = dict(mc.kept)
    tags = sorted({t for it in mc.items for t in it.tags})
    out["by_tag"], out["macro"] = {}, {}
    members_of: Dict[str, Dict[str, List[int]]] = {}
    for t in tags:
        labels = [it.tags.get(t) for it in mc.items]
        members: Dict[str, List[int]] = {}
        for i, lab in enumerate(labels):
            if lab is not None:
                members.setdefault(lab, []).append(i)
        members_of[t] = members
        out["by_tag"][t] = {c: accuracy_summary(correct[torch.tensor(ix)], n_boot=n_boot, seed=seed)
                            for c, ix in sorted(members.items())}
        have = [i for i, lab in enumerate(labels) if lab is not None]
        macro = macro_summary(correct[torch.tensor(have)], [labels[i] for i in have],
                              min_count=MACRO_MIN_COUNT.get(mc.format, 1),
                              exclude=MACRO_EXCLUDE.get(mc.format, {}).get(t, ()), n_boot=n_boot, seed=seed)
        if macro is not None:
            out["macro"][t] = macro
    bench: Dict[str, Any] = {}
    if mc.format in ("aro_relation", "aro_attribution"):
        m = out["macro"].get("relation" if mc.format == "aro_relation" else "attributes")
        if m is not None:
            bench["macro_accuracy"] = _value(m)
    elif mc.format == "aro_order":
        bench["precision_at_1"] = _value(out)
    elif mc.format == "sugarcrepe":
        bench.update({c: _value(r) for c, r in out["by_tag"].get("category", {}).items()})
    elif mc.format == "valse":
        scores = torch.as_tensor(scores, dtype=torch.float64)[:, :2]
        bench.update(valse_metrics(scores, threshold=threshold, n_boot=n_boot, seed=seed))
        bench["by_piece"] = {c: valse_metrics(scores[torch.tensor(ix)], threshold=threshold, n_boot=n_boot, seed=seed)
                             for c, ix in sorted(members_of.get("piece", {}).items())}
    else:
        bench["accuracy"] = _value(out)
    out["benchmark"] = bench
    return out


def _cell(r: Mapping[str, Any]) -> str:
    cell = f"{r['accuracy']:.2f}"
    if r.get("ci95"):
        lo, hi = r["ci95"]
        cell += f" [{lo:.1f}, {hi:.1f}]"
    return cell


def _bench_cells(b: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {_cell({'accuracy': v['value'], **v})}" for k, v in b.items() if k != "by_piece")


def results_markdown(name: str, results: Mapping[str, Mapping[str, Any]]) -> str:
    """The overall table (a row per set), each set's own metrics, and per set a table per
    tag; cells ``accuracy [95% CI]``."""
    out = ["| model | set | format | n | accuracy | chance |", "|---|---|---|---:|---:|---:|"]
    for s, r in results.items():
        out.append(f"| {name} | {s} | {r['format']} | {r['n']} | {_cell(r)} | {r['chance']:.2f} |")
    for s, r in results.items():
        b = r.get("benchmark") or {}
        if b and r["format"] != "jsonl":
            kept = r.get("kept")
            note = f" ({kept['kept']} of {kept['of']} items valid, {kept['rule']})" if kept else ""
            out += ["", f"`{s}`, {r['format']}'s own metrics{note}: {_bench_cells(b)}"]
    for s, r in results.items():
        same = (r.get("identical_foils") or {}).get("n", 0)
        if same:
            out += ["", f"`{s}`: {same} item(s) whose foil equals the caption, always scored wrong "
                        f"(results.json: identical_foils)"]
    for s, r in results.items():
        for t, cats in r.get("by_tag", {}).items():
            m = r.get("macro", {}).get(t)
            macro = (f" (macro {_cell(m)} over {m['n_categories']} categories"
                     + (f" with >= {m['min_count']} items" if m["min_count"] > 1 else "") + ")") if m else ""
            out += ["", f"`{s}` by `{t}`{macro}:", "", f"| {t} | n | accuracy |", "|---|---:|---:|"]
            out += [f"| {c} | {v['n']} | {_cell(v)} |" for c, v in cats.items()]
    return "\n".join(out) + "\n"


def evaluate_multiple_choice(model, data: MultipleChoiceData, *, head: str = "rank", batch_size: int = 512,
                             device=None, bf16: bool = False, progress: bool = False, n_boot: int = 10000,
                             seed: int = 0, exact: bool = True) -> Tuple[Tensor, Dict[str, Any]]:
    """Scores ``(N, K)`` and the results record of one set, with a model in eval mode; in bf16
    (unless ``exact=False``) every item bf16 could decide wrongly is re-scored in fp32
    (:mod:`cacr.evaluation.exact`), recorded under ``scoring``. With ``head="itm"`` VALSE's
    ``p_c`` / ``p_f`` threshold the match logit at 0 (match probability 1/2), and in bf16
    scores near it are decided in fp32 as well."""
    if model.training:
        raise ValueError("evaluation needs the model in eval mode (dropout off): call model.eval()")
    from .engine import memoized
    from .exact import exact_choices, plain_record

    device = device or next(model.parameters()).device
    threshold = VALSE_ITM_THRESHOLD if head == "itm" and data.set.format == "valse" else None
    fn = functools.partial(model.score, head=head)
    scores = score_items(fn, data.texts, data.offsets, data.image_rows, data.regions.get, batch_size=batch_size,
                         device=device, bf16=bf16, progress=progress)
    record = plain_record(bf16)
    if bf16 and exact:
        pairs, where = item_pairs(data.offsets, data.image_rows)
        flat = where[:, 0] * scores.shape[1] + where[:, 1]  # pair row -> [n, k] flat
        row_of = torch.full((scores.numel(),), -1, dtype=torch.long)
        row_of[flat] = torch.arange(len(pairs))
        kw = dict(batch_size=batch_size, device=device, bf16=False, shard=True)
        regions = memoized(data.regions.get)  # each image read once for every re-scoring

        def rescore(idx):
            return score_pairs(fn, pairs[row_of[idx]], data.texts, regions, **kw)

        def replan(idx):
            out = torch.full((scores.numel(),), float("nan"))
            out[flat] = score_pairs(fn, pairs, data.texts, regions, only=row_of[idx], **kw)
            return out
        scores, record = exact_choices(scores, rescore, replan, threshold=threshold)
    results = set_results(data.set, scores, n_boot=n_boot, seed=seed, threshold=threshold)
    results["scoring"] = record
    return scores, results


# --------------------------------------------------------------------------- command line


def default_synthetic_set(examples_jsonl: Path, image_key: str = "stem") -> MultipleChoiceSet:
    """The synthetic world's multiple-choice set: ``multiple_choice.jsonl`` beside its
    Winoground ``examples.jsonl`` if the generator wrote it, else derived from the examples."""
    from cacr.data.synthetic_mc import multiple_choice_items

    path = examples_jsonl.parent / "multiple_choice.jsonl"
    if path.is_file():
        return read_set("synthetic", str(path), "jsonl", image_key)
    items = [Item(f"multiple_choice/{d['id']}", d["image"], (d["caption"], *d["foils"]), dict(d["tags"]))
             for d in multiple_choice_items(examples_jsonl)]
    return MultipleChoiceSet("synthetic", "jsonl", [examples_jsonl], items)


def run_multiple_choice(cfg) -> Dict[str, Any]:
    """``eval_multiple_choice.py``: score every set with a model, results on rank 0."""
    from cacr.data.sources import open_data
    from cacr.outputs import atomic_write_text
    from cacr.paths import resolve_path

    from cacr.checks import identical_foils

    from .cli import ConfigError, check_outputs, eval_loggers, is_rank_zero, log_evaluation, logged_files, setup_distributed
    from .scorefile import write_results_json
    from .inputs import build_model, check_head, check_inputs, model_file, scoring_batch_size, scoring_bf16

    head = check_head(cfg.head)
    n_boot, seed = int(cfg.n_boot), int(cfg.seed)
    if n_boot < 1:
        raise ConfigError(f"n_boot must be >= 1, got {cfg.n_boot}")
    image_key = str(cfg.image_key)
    try:
        check_image_key(image_key)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    valse_valid_only = bool(cfg.get("valse_valid_only", True))
    data = open_data(cfg.data)
    files = data.files
    regions_cfg = cfg.get("regions")
    specs = dict(cfg.get("sets") or {})
    if specs:
        sets = [read_set(str(k), v if isinstance(v, str) else list(v), str(cfg.format), image_key, resolve_path,
                         valse_valid_only=valse_valid_only) for k, v in specs.items()]
        if not regions_cfg:
            raise ConfigError("sets=... need regions=PATH (the regions HDF5 of their images), or "
                              "'+regions.<set>=PATH' per set")
    else:
        if files.winoground_examples is None or not files.winoground_examples.is_file():
            raise ConfigError("no sets: give '+sets.<name>=FILE' (ARO, SugarCrepe, VALSE or .jsonl) and regions=PATH")
        sets = [default_synthetic_set(files.winoground_examples, image_key)]
        regions_cfg = regions_cfg or str(files.winoground_regions)
    if isinstance(regions_cfg, str):
        regions = {s.name: resolve_path(regions_cfg) for s in sets}
    else:
        regions = {str(k): resolve_path(v) for k, v in dict(regions_cfg).items()}
        lacking = [s.name for s in sets if s.name not in regions]
        if lacking:
            raise ConfigError(f"regions.{lacking[0]} is not set (regions per set: give one for every set)")
    for s in sets:
        if not regions[s.name].is_file():
            raise FileNotFoundError(f"regions file {regions[s.name]} (set {s.name!r}) not found")
    rk_cfg = cfg.get("region_key", "image") or "image"
    if isinstance(rk_cfg, str):
        region_keys = {s.name: str(rk_cfg) for s in sets}
    else:
        region_keys = {s.name: str(dict(rk_cfg).get(s.name, "image")) for s in sets}
        unknown = sorted(set(map(str, dict(rk_cfg))) - {s.name for s in sets})
        if unknown:
            raise ConfigError(f"region_key.{unknown[0]}: no set of that name (sets: {[s.name for s in sets]})")
    for name, rk in region_keys.items():
        if rk not in REGION_KEYS:
            raise ConfigError(f"region_key={rk!r} (set {name!r}): expected one of {list(REGION_KEYS)}")
    inputs = [p for s in sets for p in s.files] + list(regions.values()) + [model_file(cfg)]
    out_dir = check_outputs(cfg, ("results.json", "multiple_choice_scores.jsonl", "results.md", *logged_files(cfg)),
                            inputs)

    device = setup_distributed(cfg.device)
    bf16, bf16_reason = scoring_bf16(cfg.bf16, device)
    model, name = build_model(cfg, device)
    tokenizer = data.tokenizer
    results, lines = {}, []
    for s in sets:
        # an item with a foil equal to its caption is always scored wrong (a tie is wrong): warned, counted
        same = identical_foils(s.items, f"set {s.name!r} ({', '.join(str(f) for f in s.files[:3])}"
                                        f"{', ...' if len(s.files) > 3 else ''})")
        mc = MultipleChoiceData(s, regions[s.name], tokenizer, data.caps, in_memory=True,
                                region_key=region_keys[s.name])
        check_inputs(model, mc.texts, mc.caption_names(), mc.regions.feature_dim, f"set {s.name!r}")
        scores, res = evaluate_multiple_choice(model, mc, head=head, batch_size=scoring_batch_size(cfg.batch_size, device, model), device=device,
                                               bf16=bf16, progress=bool(cfg.progress) and is_rank_zero(),
                                               n_boot=n_boot, seed=seed, exact=bool(cfg.get("exact", True)))
        res["regions"] = str(regions[s.name])
        res["region_key"] = region_keys[s.name]
        res["identical_foils"] = {"n": len(same), "items": same}
        results[s.name] = res
        correct = correct_items(scores, ties_correct=s.format in TIES_CORRECT).tolist()
        for it, row, ok in zip(s.items, scores.tolist(), correct):
            lines.append(json.dumps({"set": s.name, "id": it.key, "image": region_id(it, region_keys[s.name]),
                                     "scores": row[:len(it.captions)], "correct": ok}))
    record = {"model": name, "head": head,
              "checkpoint": str(resolve_path(cfg.ckpt_path or cfg.model.checkpoint)),
              "sets": results, "n_boot": n_boot, "seed": seed, "bf16": bf16, "bf16_reason": bf16_reason}
    if is_rank_zero():
        markdown = results_markdown(name, results)
        write_results_json(out_dir / "results.json", record)
        atomic_write_text(out_dir / "multiple_choice_scores.jsonl", "\n".join(lines) + "\n")
        atomic_write_text(out_dir / "results.md", markdown)
        print(markdown, end="")
        print(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'multiple_choice_scores.jsonl'}, "
              f"{out_dir / 'results.md'}")
        rows = [[d["set"], d["id"], d["image"], d["correct"], json.dumps(d["scores"])] for d in map(json.loads, lines)]
        log_evaluation(eval_loggers(cfg, out_dir, "multiple_choice"), "multiple_choice", results,
                       table=("multiple_choice/items", ("set", "id", "image", "correct", "scores"), rows))
    return record
