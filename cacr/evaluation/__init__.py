"""Evaluation: retrieval recalls and Winoground scores, their files, exact DDP sharding and
batched pair scoring (none of which imports the data layer or the training module); the
command lines (``cli``, ``inputs``, ``multiple_choice``) read their data through
:func:`cacr.data.sources.open_data`."""
from .distributed import (all_gather_objects, all_gather_rows, gather_shards, rank_and_world_size,
                          shard_bounds, shard_range)
from .engine import score_matrix, score_pairs, score_winoground
from .retrieval_metrics import recall_at, retrieval_metrics, retrieval_ranks
from .scorefile import (ScoreMatrix, WinogroundExample, example_tag_sets, load_score_matrix,
                        read_score_file, read_tag_file, read_winoground_examples, results_markdown,
                        save_score_matrix, write_results_json, write_score_file)
from .winoground_metrics import bootstrap_ci, breakdown, winoground_correct, winoground_results

__all__ = [
    "all_gather_objects", "all_gather_rows", "gather_shards", "rank_and_world_size", "shard_bounds",
    "shard_range", "score_matrix", "score_pairs", "score_winoground", "recall_at", "retrieval_metrics",
    "retrieval_ranks", "ScoreMatrix", "WinogroundExample", "example_tag_sets", "load_score_matrix",
    "read_score_file", "read_tag_file", "read_winoground_examples", "results_markdown",
    "save_score_matrix", "write_results_json", "write_score_file", "bootstrap_ci", "breakdown",
    "winoground_correct", "winoground_results",
]
