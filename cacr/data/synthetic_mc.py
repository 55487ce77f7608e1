"""A multiple-choice set derived from a Winoground-format ``examples.jsonl`` (the synthetic
world's), so that ``eval_multiple_choice.py`` runs on a fresh clone.

Each example gives two items: image ``k`` with caption ``k`` as the true caption and
caption ``1-k`` (the same words, swapped) as the foil. The file is the project's generic
multiple-choice format (``cacr/evaluation/multiple_choice.py``), one JSON object a line:
``{"id", "image", "caption", "foils": [...], "tags": {name: value}}``; the tags carry the
example's ``collapsed_tag`` and, where the examples have them, ``relation`` and ``split``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from cacr.outputs import atomic_write_text
from cacr.winoground import read_winoground_examples

TAG_FIELDS = ("collapsed_tag",)
EXTRA_TAG_FIELDS = ("relation", "split")


def multiple_choice_items(examples_jsonl) -> List[Dict]:
    """The two items of every example of ``examples_jsonl``, in file order."""
    items = []
    for ex in read_winoground_examples(examples_jsonl):
        tags = {k: str(getattr(ex, k)) for k in TAG_FIELDS}
        tags.update({k: str(ex.extra[k]) for k in EXTRA_TAG_FIELDS if k in ex.extra})
        for k in (0, 1):
            items.append({"id": f"{ex.id}_i{k}", "image": getattr(ex, f"image_{k}"),
                          "caption": getattr(ex, f"caption_{k}"), "foils": [getattr(ex, f"caption_{1 - k}")],
                          "tags": tags})
    return items


def write_multiple_choice(examples_jsonl, out_path) -> Path:
    """Write the multiple-choice set of ``examples_jsonl`` to ``out_path`` (JSONL; written
    under a temporary name and renamed)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(item) + "\n" for item in multiple_choice_items(examples_jsonl))
    atomic_write_text(out_path, text)
    return out_path
