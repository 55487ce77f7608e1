"""UNITER configuration: the official BERT-style config JSON fields plus the image side."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

ATTN_IMPLS = ("sdpa", "eager")


@dataclass
class UniterConfig:
    # The official config files (uniter-base.json, uniter-large.json) hold exactly these
    # eleven BERT fields.
    vocab_size: int = 28996
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    # Not in the official JSON: the region feature width (2048 for the bottom-up features)
    # and which attention kernel runs where the probabilities are not needed.
    img_dim: int = 2048
    attn_impl: str = "sdpa"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act={self.hidden_act!r}: only the exact erf 'gelu' of UNITER is supported")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.type_vocab_size < 2:
            raise ValueError(f"type_vocab_size={self.type_vocab_size}: UNITER needs 2 (text, image)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "config") -> "UniterConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{where}: unknown UNITER config field(s) {unknown}; known: {sorted(names)}")
        return cls(**dict(d))

    @classmethod
    def from_json(cls, path: str | Path, **overrides) -> "UniterConfig":
        """Read an official UNITER/BERT config JSON (e.g. ``uniter-base.json``)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"UNITER config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object of config fields, got {type(d).__name__}")
        d.update(overrides)
        return cls.from_dict(d, where=str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


BASE = UniterConfig()
LARGE = UniterConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
