"""Data side: HDF5 region / caption formats, tokenizer, converters, synthetic world, datasets, datamodule."""
from .datasets import (LazyRegions, RegionCaps, RegionStore, RetrievalSplit, TrainPools, WinogroundSet, build_split,
                       open_regions, winoground_problems)
from .formats import (FORMAT_VERSION, CaptionsTable, FormatError, RegionsFile, RegionsWriter, check_captions_file,
                      check_regions_file, read_captions, write_captions)
from .sources import DataFiles, OpenedData, data_files, open_data
from .synthetic import SyntheticConfig, SyntheticPaths, ensure_synthetic, load_scenes
from .tokenizer import WordPieceTokenizer

__all__ = [
    "LazyRegions", "RegionCaps", "RegionStore", "RetrievalSplit", "TrainPools", "WinogroundSet", "build_split",
    "open_regions", "winoground_problems", "FORMAT_VERSION", "CaptionsTable", "FormatError", "RegionsFile",
    "RegionsWriter", "check_captions_file", "check_regions_file", "read_captions", "write_captions", "DataFiles",
    "OpenedData", "data_files", "open_data", "SyntheticConfig", "SyntheticPaths", "ensure_synthetic", "load_scenes",
    "WordPieceTokenizer",
]
