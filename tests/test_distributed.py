"""cacr/distributed.py (the rank helpers) and the import structure it takes part in: no
cycle between training and the launcher, losses that import nothing of the project but the
rank helpers."""
import os
import subprocess
import sys

import torch

from cacr.distributed import (all_gather_no_grad, all_gather_with_grad, is_main_process, primary_process,
                              rank_and_world_size)

from .conftest import REPO


def test_primary_process_reads_every_launcher_rank_variable():
    assert primary_process({})
    assert primary_process({"RANK": "0", "LOCAL_RANK": "0", "NODE_RANK": "0", "SLURM_PROCID": ""})
    for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        assert not primary_process({k: "1"}), k


def test_one_process_is_rank_zero_of_one_and_gathers_are_identities(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert rank_and_world_size() == (0, 1) and is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "2")  # a torchrun rank 1 that joined no process group
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1234")
    assert not is_main_process()
    x = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(x) is x and all_gather_no_grad(x) is x


def _project_modules_after(statement: str):
    code = (f"import sys; {statement}; "
            "print(' '.join(sorted(m for m in sys.modules if m == 'cacr' or m.startswith('cacr.'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_the_launcher_does_not_import_training_and_losses_only_the_rank_helpers():
    assert "cacr.train" not in _project_modules_after("import cacr.launch")
    assert _project_modules_after("import cacr.losses") == {"cacr", "cacr.losses", "cacr.distributed", "cacr.config",
                                                            "cacr.errors"}
    assert _project_modules_after("import cacr.regularizers") == {"cacr", "cacr.regularizers"}


JOIN = """
import os, torch, torch.distributed as dist
from cacr.distributed import all_gather_no_grad, is_main_process, join_process_group, rank_and_world_size
seen = []
device = join_process_group(lambda local: seen.append(local) or torch.device("cpu"))
rank, world = rank_and_world_size()
got = all_gather_no_grad(torch.tensor([rank * 10]))
print(rank, world, seen, is_main_process(), got.tolist())
dist.destroy_process_group()
"""


def test_processes_started_like_torchrun_join_one_group():
    """What an evaluator started by torchrun does first (cacr.evaluation.cli.setup_distributed)."""
    from cacr.launch import _free_port

    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, "-c", JOIN], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    assert [o.strip() for o, _ in outs] == ["0 2 [0] True [0, 10]", "1 2 [1] False [0, 10]"]
