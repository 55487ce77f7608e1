"""Run the evaluation engine in 2 gloo processes on CPU and save what every rank got.

Usage: python eval_ddp.py OUT_DIR [WORLD_SIZE]. Rank r writes OUT_DIR/rank{r}.pt.
"""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))


def worker(rank: int, world_size: int, out_dir: str, init_file: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    from cacr.evaluation import all_gather_objects, all_gather_rows, gather_shards, shard_range
    from cacr.evaluation.engine import score_matrix, score_winoground
    from cacr.evaluation.multiple_choice import score_items
    from eval_problem import ragged_data, tiny_model

    model = tiny_model(0)
    captions, images = ragged_data(11, 7)
    out = {"rows": list(shard_range(11))}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        out[name] = {
            "matrix": score_matrix(model.score, captions, images, batch_size=8, bf16=bf16),
            "winoground": score_winoground(model.score, captions[:6], images[:6], 3, batch_size=5, bf16=bf16),
            "items": score_items(model.score, captions, [0, 3, 5, 9, 11], [0, 2, 4, 6], images, batch_size=3,
                                 bf16=bf16),
        }
    # variable lengths (rank 0: 1 row, rank 1: 4 rows) with a trailing shape
    local = torch.arange(2 * (1 + 3 * rank), dtype=torch.float64).view(-1, 2) + 100 * rank
    out["ragged"] = all_gather_rows(local)
    # fewer rows than ranks: the last rank owns nothing
    rows = shard_range(1)
    out["tiny"] = gather_shards(torch.full((len(rows), 3), 7, dtype=torch.long), 1)
    out["objects"] = all_gather_objects({"rank": rank})
    try:
        all_gather_rows(torch.zeros(2, 3 + rank))
        out["mismatch"] = None
    except ValueError as e:
        out["mismatch"] = str(e)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    out_dir = sys.argv[1]
    world_size = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    init_file = str(Path(out_dir).resolve() / "pg_init")
    mp.spawn(worker, args=(world_size, out_dir, init_file), nprocs=world_size, join=True)
