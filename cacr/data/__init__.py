"""Data side: HDF5 region / caption formats, tokenizer, converters, synthetic world, datasets, datamodule."""
from .datasets import (AllPairs, IndexedBatch, IndexedCollator, IndexedPair, LazyRegions, PositivePairs, RegionCaps,
                       RegionStore, RetrievalSplit, TrainPools, WinogroundPairs, WinogroundSet, build_split,
                       open_regions, read_winoground_examples, shard_rows, winoground_problems)
from .formats import (FORMAT_VERSION, CaptionsTable, FormatError, RegionsFile, RegionsWriter, check_captions_file,
                      check_regions_file, read_captions, write_captions)
from .synthetic import SyntheticConfig, SyntheticPaths, ensure_synthetic, load_scenes
from .tokenizer import WordPieceTokenizer

__all__ = [
    "AllPairs", "IndexedBatch", "IndexedCollator", "IndexedPair", "LazyRegions", "PositivePairs", "RegionCaps",
    "RegionStore", "RetrievalSplit", "TrainPools", "WinogroundPairs", "WinogroundSet", "build_split",
    "open_regions", "read_winoground_examples", "shard_rows", "winoground_problems", "FORMAT_VERSION",
    "CaptionsTable", "FormatError", "RegionsFile", "RegionsWriter", "check_captions_file", "check_regions_file",
    "read_captions", "write_captions", "SyntheticConfig", "SyntheticPaths", "ensure_synthetic", "load_scenes",
    "WordPieceTokenizer",
]
