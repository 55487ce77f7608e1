"""experiments/command_bench.py: the user's eval_retrieval.py command on a Flickr-like split in the
project's formats, timed and checked against the public evaluation's batching on the same files."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import command_bench  # noqa: E402


def test_the_command_scores_what_the_public_practice_scores(tmp_path, capsys):
    from cacr.precision import resolve_bf16

    rep = command_bench.main(["--captions", "4", "--images", "3", "--repeats", "1", "--work", str(tmp_path),
                              "--model", "hidden_size=64", "num_hidden_layers=2", "num_attention_heads=4",
                              "intermediate_size=128"])
    assert rep["pairs"] == 12
    cmd = rep["paths"]["command, defaults"]
    bf16, _ = resolve_bf16("auto", torch.device("cpu"))
    assert cmd["bf16"] == bf16 and cmd["batch_size"] == 64  # the CPU defaults for a small model
    assert cmd["max_abs_diff"] < (0.05 if bf16 else 1e-4) and cmd["r1_agreement"] == 1.0
    assert cmd["pairs_per_s"] > 0 and cmd["wall_seconds"][0] >= cmd["seconds"][0]
    assert rep["paths"]["public practice (re-implemented)"]["x_public_practice"] == 1.0
    printed = capsys.readouterr().out
    assert "flags:" in printed and "| command, defaults |" in printed
    # the split is the project's format, as the converters write it: the checker finds nothing wrong
    from cacr.data.formats import check_captions_file, check_regions_file

    assert check_regions_file(tmp_path / "split" / "regions.h5") == []
    assert check_captions_file(tmp_path / "split" / "captions.h5", regions_path=tmp_path / "split" / "regions.h5") == []
