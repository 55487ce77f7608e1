"""Winoground's ``examples.jsonl`` (docs/reference.md §5), read by both the data layer (which pairs the
examples with their regions) and the evaluators (which score them and write score files).

One JSON object per line with ``id``, ``image_0``, ``image_1``, ``caption_0``,
``caption_1``, ``tag``, ``secondary_tag``, ``num_main_preds`` (1 or 2) and ``collapsed_tag``
(Object, Relation or Both); other keys are kept in ``extra``. The reader raises
``ValueError`` naming the file, the line, the id and what was expected.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Union

PathLike = Union[str, os.PathLike]
COLLAPSED_TAGS = ("Object", "Relation", "Both")
EXAMPLE_FIELDS = ("id", "image_0", "image_1", "caption_0", "caption_1", "tag", "secondary_tag",
                  "num_main_preds", "collapsed_tag")


@dataclass(frozen=True)
class WinogroundExample:
    id: Union[int, str]
    image_0: str
    image_1: str
    caption_0: str
    caption_1: str
    tag: str
    secondary_tag: str
    num_main_preds: int
    collapsed_tag: str
    extra: Dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def key(self) -> str:
        """The id as it appears in score-file labels and tag files."""
        return str(self.id)


def jsonl_objects(path: Path, what: str):
    """Yield ``(line number, object)`` for the non-blank lines of a JSONL file."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_winoground_examples(path: PathLike) -> List[WinogroundExample]:
    """Read and validate the official ``examples.jsonl`` (fields: docs/reference.md §5)."""
    path = Path(path)
    examples: List[WinogroundExample] = []
    seen: Dict[str, int] = {}
    for lineno, obj in jsonl_objects(path, "Winoground examples file"):
        where = f"{path}:{lineno}"
        missing = [k for k in EXAMPLE_FIELDS if k not in obj]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}; an example needs {list(EXAMPLE_FIELDS)}")
        ex_id = obj["id"]
        if isinstance(ex_id, bool) or not isinstance(ex_id, (int, str)) or ex_id == "":
            raise ValueError(f"{where}: 'id' must be an integer or a non-empty string, got {ex_id!r}")
        if str(ex_id) in seen:
            raise ValueError(f"{where}: duplicate id {ex_id!r} (first on line {seen[str(ex_id)]})")
        seen[str(ex_id)] = lineno
        for k in ("image_0", "image_1", "caption_0", "caption_1", "tag", "collapsed_tag"):
            if not isinstance(obj[k], str) or not obj[k].strip():
                raise ValueError(f"{where} (id {ex_id}): {k!r} must be a non-empty string, got {obj[k]!r}")
        if not isinstance(obj["secondary_tag"], str):
            raise ValueError(f"{where} (id {ex_id}): 'secondary_tag' must be a string, got {obj['secondary_tag']!r}")
        npred = obj["num_main_preds"]
        if isinstance(npred, bool) or npred not in (1, 2) or not isinstance(npred, int):
            raise ValueError(f"{where} (id {ex_id}): 'num_main_preds' must be the integer 1 or 2, got {npred!r}")
        if obj["collapsed_tag"] not in COLLAPSED_TAGS:
            raise ValueError(
                f"{where} (id {ex_id}): 'collapsed_tag' must be one of {list(COLLAPSED_TAGS)}, "
                f"got {obj['collapsed_tag']!r}"
            )
        examples.append(WinogroundExample(
            **{k: obj[k] for k in EXAMPLE_FIELDS},
            extra={k: v for k, v in obj.items() if k not in EXAMPLE_FIELDS},
        ))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples
