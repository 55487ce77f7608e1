"""UNITER backbone, retrieval heads, batches and checkpoint loading (no data or training imports)."""
from .batch import LAYOUTS, PairExample, UniterBatch, boxes_to_7d, collate
from .checkpoint import CheckpointError, LoadReport, build_uniter, load_checkpoint, read_state_dict
from .config import UniterConfig
from .heads import MlmHead
from .pair_store import PairStore, pair_batch_from_padded
from .uniter import UniterForImageTextRetrieval, UniterModel, UniterOutput

__all__ = [
    "LAYOUTS", "PairExample", "UniterBatch", "boxes_to_7d", "collate",
    "UniterConfig", "MlmHead", "PairStore", "pair_batch_from_padded", "CheckpointError", "LoadReport", "build_uniter", "load_checkpoint", "read_state_dict", "UniterForImageTextRetrieval", "UniterModel", "UniterOutput",
]
