"""Exact sharding and gathering: pure checks, and a real 2-process gloo run on CPU that
must give the numbers of one process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cacr.evaluation.distributed import (all_gather_objects, all_gather_rows, gather_shards, rank_and_world_size,
                                         shard_bounds, shard_range)

SCRIPTS = Path(__file__).parent / "ddp_scripts"
sys.path.insert(0, str(SCRIPTS))
from eval_problem import ragged_data, tiny_model  # noqa: E402


@pytest.mark.parametrize("n", [0, 1, 2, 7, 10, 5000])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_cover_every_row_once(n, world):
    blocks = [range(*shard_bounds(n, world, r)) for r in range(world)]
    rows = [i for b in blocks for i in b]
    assert rows == list(range(n))
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_single_process_defaults():
    assert rank_and_world_size() == (0, 1)
    assert shard_range(5) == range(5)
    x = torch.randn(4, 3)
    assert all_gather_rows(x) is x
    assert torch.equal(gather_shards(x, 4), x)
    assert all_gather_objects("a") == ["a"]
    with pytest.raises(ValueError, match=r"rank 0 owns rows \[0, 5\) but holds 4"):
        gather_shards(x, 5)
    with pytest.raises(ValueError, match="need n >= 0"):
        shard_bounds(3, 2, 2)


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(SCRIPTS / "eval_ddp.py"), str(tmp_path), "2"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)

    from cacr.evaluation.engine import score_matrix, score_winoground
    from cacr.evaluation.multiple_choice import score_items
    model = tiny_model(0)
    captions, images = ragged_data(11, 7)
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the thread count changes fp32 sums
    try:
        single = {name: {"matrix": score_matrix(model.score, captions, images, batch_size=8, bf16=bf16),
                         "winoground": score_winoground(model.score, captions[:6], images[:6], 3, batch_size=5,
                                                        bf16=bf16),
                         "items": score_items(model.score, captions, [0, 3, 5, 9, 11], [0, 2, 4, 6], images,
                                              batch_size=3, bf16=bf16)}
                  for name, bf16 in (("fp32", False), ("bf16", True))}
    finally:
        torch.set_num_threads(n)

    assert r0["rows"] == list(range(0, 5)) and r1["rows"] == list(range(5, 11))
    assert not torch.equal(single["fp32"]["matrix"], single["bf16"]["matrix"])  # bf16 really ran
    for r in (r0, r1):
        assert r["fp32"]["matrix"].shape == (11, 7) and r["fp32"]["items"].shape == (4, 4)
        for name in ("fp32", "bf16"):  # one batch plan: the same bits as one process, in both precisions
            for what in ("matrix", "winoground", "items"):
                torch.testing.assert_close(r[name][what], single[name][what], rtol=0, atol=0, equal_nan=True,
                                           msg=lambda m: f"{name} {what}: {m}")
        expected = torch.cat([torch.arange(2.0, dtype=torch.float64).view(1, 2),
                              torch.arange(8.0, dtype=torch.float64).view(4, 2) + 100])
        assert torch.equal(r["ragged"], expected)
        assert torch.equal(r["tiny"], torch.full((1, 3), 7))
        assert r["objects"] == [{"rank": 0}, {"rank": 1}]
        assert "rank 0 holds torch.float32 rows of shape [3]" in r["mismatch"] or \
               "rank 1 holds torch.float32 rows of shape [4]" in r["mismatch"]

