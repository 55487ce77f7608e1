"""DDP training on the CPU (2 gloo processes), started through ``train.py`` as a user would,
in subprocesses (so pytest itself is never re-executed): a single run and a Hydra multirun
of DDP jobs (no relaunched sweep, one wandb run per job), validation equal to the
single-process evaluator on the saved checkpoints, resume of a 2-process checkpoint in one
process, one process with the global batch against two; the SLURM launcher config and the
detection of cluster-started processes without a cluster."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cacr.config import ConfigError
from cacr.distributed import (is_script_ddp, num_local_processes, processes_created_externally,
                              trainer_global_rank)
from cacr.launch import DDPWorkers, job_processes
from cacr.train import WORKER_COMMAND, run

from .conftest import REPO
from .test_training import TINY_WORLD
from .wandb_log import wandb_records

# Step-indexed global batch of 4 positives: 2 per process on 2 processes, 4 on one. With
# the warmup longer than the run and a constant regularizer weight, the first 2 steps of a
# 4-step run are the 2 steps of a 2-step run. The in-batch alignment loss is on (the default):
# its negatives are the whole global batch, gathered across processes.
COMMON = [o for o in TINY_WORLD if not o.startswith(("data.batch_size", "logger"))] + [
    "loss.schedule=constant", "module.warmup_steps=4", "module.lr=3e-3", "trainer.log_every_n_steps=1",
    "eval.val_every_n_steps=2", "module.align_weight=1",
]
METRICS = ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "rsum")


def _train_py(*args, timeout=400):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def data(tmp):
    """The tiny world, generated once before the processes start, and its data module."""
    from cacr.train_data import TrainingDataModule

    cfg = _compose(*COMMON, f"data.root={tmp / 'world'}")
    dm = TrainingDataModule.from_config(cfg.data, num_candidates=cfg.train.num_candidates)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def single(tmp, data):
    """``python train.py trainer=ddp_cpu``: 2 processes, 2 steps, Hydra's own run directory."""
    run_dir = tmp / "single"
    proc = _train_py("trainer=ddp_cpu", "data.batch_size=2", "train.max_steps=2", "logger=csv", *COMMON,
                     f"data.root={tmp / 'world'}", f"hydra.run.dir={run_dir}")
    return run_dir, proc


@pytest.fixture(scope="module")
def sweep(tmp, data):
    """``python train.py -m loss=cacr,none trainer=ddp_cpu``: two 4-step jobs of 2 processes, wandb offline."""
    sweep_dir = tmp / "sweep-ddp"
    proc = _train_py("-m", "loss=cacr,none", "trainer=ddp_cpu", "data.batch_size=2", "train.max_steps=4",
                     "logger=wandb", "eval.winoground=false", *COMMON, f"data.root={tmp / 'world'}",
                     f"hydra.sweep.dir={sweep_dir}")
    jobs = {d.name.split("_", 1)[0]: d for d in sweep_dir.iterdir() if d.is_dir()}
    return sweep_dir, proc, jobs


def _model_of(ckpt):
    from cacr.model.checkpoint import build_uniter

    hp = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    from cacr.model import UniterConfig

    return build_uniter(UniterConfig(**hp["model_config"]), checkpoint=str(ckpt)).eval()


def _single_process_val(ckpt, dm, role="val"):
    from cacr.evaluation.evaluators import evaluate_retrieval

    return evaluate_retrieval(_model_of(ckpt), dm.split(role), batch_size=64)


def _state(ckpt):
    return torch.load(ckpt, map_location="cpu", weights_only=True)


# Every score shares this bias, so the softmax ranking loss gives it a zero gradient up to
# rounding, and Adam's normalised step turns that rounding into moves of up to ~lr per step.
NOISE_ONLY = {"model.rank_output.bias"}


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a if k not in NOISE_ONLY)




# ----------------------------------------------------------------------------- single run
@pytest.mark.slow
def test_single_ddp_run_writes_once_from_rank_0_with_exact_validation(single, data):
    run_dir, proc = single
    results = json.loads((run_dir / "results.json").read_text())
    assert results["scale"] == {"world_size": 2, "num_nodes": 1, "devices_per_node": 2, "batch_per_process": 2,
                                "effective_batch": 4, "lr": 3e-3, "warmup_steps": 4, "max_steps": 2}
    log = (run_dir / "train.log").read_text()
    assert "effective batch 4 positives per optimizer step" in log and "warmup over 4 steps" in log
    # The workers ran the job's own config in the job's directory (not a ${now:} of their own).
    worker_cfg = OmegaConf.load(run_dir / "ddp_config.yaml")
    assert worker_cfg.run_dir == str(run_dir.resolve()) and worker_cfg.trainer.devices == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best-step2.ckpt", "last.ckpt"]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert _state(last)["global_step"] == 2

    rows = [r for r in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    val = [dict(zip(header, r.split(","))) for r in rows if r.split(",")[header.index("val/rsum")]]
    assert len(val) == 1
    single_process = _single_process_val(last, data)
    for k in METRICS:
        assert float(val[0][f"val/{k}"]) == pytest.approx(single_process[k], abs=1e-4), k
    test = _single_process_val(results["best_checkpoint"], data, role="test")
    for k in METRICS:
        assert results["retrieval"][k] == pytest.approx(test[k], abs=1e-4), k
    assert proc.stdout.count("test retrieval:") == 1  # the summary is printed by rank 0 only


# ----------------------------------------------------------------------------- multirun
@pytest.mark.slow
def test_multirun_of_ddp_jobs_runs_each_job_once(sweep, data):
    sweep_dir, proc, jobs = sweep
    out = proc.stdout + proc.stderr
    assert out.count("Launching 2 jobs locally") == 1
    assert sorted(p.parent.name.split("_")[0] for p in sweep_dir.glob("*/results.json")) == ["0", "1"]
    assert sorted(jobs) == ["0", "1"]
    for d in jobs.values():
        res = json.loads((d / "results.json").read_text())
        assert res["scale"]["world_size"] == 2 and res["scale"]["effective_batch"] == 4
        assert OmegaConf.load(d / "ddp_config.yaml").run_dir == str(d.resolve())
        last = d / "checkpoints" / "last.ckpt"
        assert _state(last)["global_step"] == 4
        # one wandb run per job, from rank 0, grouped by the sweep; its last validation is
        # the single-process evaluation of the final checkpoint
        runs = list((d / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1, runs
        records = list(wandb_records(runs[0]))
        (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert meta.run_group == sweep_dir.name and meta.display_name == d.name
        history = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        val = [h for h in history if "val/rsum" in h]
        assert len(val) == 2
        expected = _single_process_val(last, data)
        for k in METRICS:
            assert val[-1][f"val/{k}"] == pytest.approx(expected[k], abs=1e-4), k


# ----------------------------------------------------------------------------- world-size independence
def _one_process(tmp, name, *overrides):
    return run(_compose("trainer=cpu", "data.batch_size=4", "train.max_steps=4", "logger=none",
                        "eval.winoground=false", "eval.test=false", "loss=cacr", *COMMON,
                        f"data.root={tmp / 'world'}", f"run_dir={tmp / name}", *overrides))


@pytest.mark.slow
def test_resume_of_a_2_process_checkpoint_in_1_process(tmp, single, sweep):
    """2 steps on 2 processes (batch 2 each), then 2 more in 1 process (batch 4): the same
    parameters as 4 steps on 2 processes."""
    run_dir, _ = single
    _, _, jobs = sweep
    start = run_dir / "checkpoints" / "last.ckpt"
    # the 2-process, batch-2 layout becomes 1 process of batch 4 (the same 4 positives per step: no
    # config difference); the longer run and the evaluation switches are, so the resume says so
    results = _one_process(tmp, "resumed", f"ckpt_path={start}", "resume_override=true")
    assert results["resumes"][0]["config_changes"] == ["eval.test: True -> False", "eval.winoground: True -> False",
                                                       "train.max_steps: 2 -> 4", "trainer.max_steps: 2 -> 4"]
    resumed = _state(tmp / "resumed" / "checkpoints" / "last.ckpt")
    ddp = _state(jobs["0"] / "checkpoints" / "last.ckpt")  # job 0: loss=cacr
    assert resumed["global_step"] == ddp["global_step"] == 4
    assert resumed["lr_schedulers"][0]["last_epoch"] == 4
    assert resumed["lr_schedulers"][0]["_last_lr"] == pytest.approx(ddp["lr_schedulers"][0]["_last_lr"])
    moved = _max_diff(ddp["state_dict"], _state(start)["state_dict"])
    assert moved > 1e-3  # steps 3 and 4 changed the model ...
    assert _max_diff(resumed["state_dict"], ddp["state_dict"]) < 1e-4  # ... identically on 1 and 2 processes


@pytest.mark.slow
def test_one_process_with_the_global_batch_trains_like_two(tmp, sweep):
    _, _, jobs = sweep
    _one_process(tmp, "one")
    one = _state(tmp / "one" / "checkpoints" / "last.ckpt")
    ddp = _state(jobs["0"] / "checkpoints" / "last.ckpt")
    assert one["global_step"] == 4
    assert _max_diff(one["state_dict"], ddp["state_dict"]) < 1e-4


# ----------------------------------------------------------------------------- launching
def test_which_jobs_start_their_own_processes():
    cfg = lambda **kw: dict({"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto"}, **kw)  # noqa: E731
    assert num_local_processes(cfg(devices=3)) == 3
    assert not is_script_ddp(cfg())
    assert is_script_ddp(cfg(devices=2))                     # auto on several devices: Lightning's ddp
    assert is_script_ddp(cfg(strategy="ddp"))
    assert not is_script_ddp(cfg(devices=2, strategy="ddp_spawn"))
    assert num_local_processes(cfg(accelerator="tpu")) is None
    for name in ("cpu", "gpu", "ddp", "ddp_cpu"):  # every option composes to the same keys (they inherit them)
        keys = set(_compose(f"trainer={name}").trainer)
        assert keys == set(_compose("trainer=cpu").trainer), name


def test_processes_started_by_slurm_are_not_started_again(monkeypatch, tmp_path):
    """Under srun (rank 5 of 2 nodes x 4 tasks) the job starts no process, takes its global
    rank from SLURM and does not start a wandb run."""
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "GROUP_RANK", "NODE_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert not processes_created_externally()
    env = {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "node[1-2]", "SLURM_JOB_ID": "77"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert processes_created_externally()
    cfg = _compose("trainer=ddp_cpu", "trainer.devices=4", "trainer.num_nodes=2", "logger=wandb")
    assert not isinstance(job_processes(cfg, tmp_path, WORKER_COMMAND), DDPWorkers)
    from pytorch_lightning.plugins.environments import SLURMEnvironment

    from cacr.train import _wandb_run, build_trainer

    trainer = build_trainer(cfg, tmp_path, [], [])
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert trainer.strategy._ddp_kwargs == {"static_graph": True} and trainer.world_size == 8
    assert trainer_global_rank(trainer) == 5
    assert _wandb_run(cfg, tmp_path, trainer_global_rank(trainer)) is None
    assert not (tmp_path / "wandb").exists()


def test_a_dead_worker_stops_the_job_with_its_rank(tmp_path, request):
    """A worker that fails (here: its config names a missing checkpoint) interrupts rank 0
    instead of leaving it waiting for a collective, and the environment is restored."""
    cfg = _compose("trainer=ddp_cpu", f"ckpt_path={tmp_path / 'missing.ckpt'}")
    # A shell starts background jobs with SIGINT ignored (`nohup pytest &`): the job then has no
    # way to interrupt this sleep and, as designed, ends itself with SIGKILL after 60 s, which
    # would end the whole test session. The interrupt path is what this test checks.
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    before = {k: os.environ.get(k) for k in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"DDP worker local rank 1 \(pid \d+\) exited with code 1"):
        with DDPWorkers(cfg, tmp_path, 2, worker_command=WORKER_COMMAND):
            time.sleep(120)
    assert time.monotonic() - t0 < 100
    assert {k: os.environ.get(k) for k in before} == before
    assert (tmp_path / "ddp_config.yaml").is_file()


def test_a_dead_worker_stops_a_job_started_with_sigint_ignored(tmp_path, request):
    """`nohup python train.py trainer=ddp_cpu &` starts the job with SIGINT ignored: the launcher
    leaves SIGINT so and interrupts rank 0 with its own SIGUSR2 instead, at once and with the
    rank named, not by the 60 s SIGKILL of last resort; both handlers are as before afterwards."""
    cfg = _compose("trainer=ddp_cpu", f"ckpt_path={tmp_path / 'missing.ckpt'}")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    usr2 = signal.getsignal(signal.SIGUSR2)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"DDP worker local rank 1 \(pid \d+\) exited with code 1"):
        with DDPWorkers(cfg, tmp_path, 2, worker_command=WORKER_COMMAND):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            time.sleep(120)
    assert time.monotonic() - t0 < 55  # well before the 60 s last resort
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGUSR2) == usr2


def test_accumulating_gradients_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="accumulate_grad_batches=2"):
        run(_compose("trainer.accumulate_grad_batches=2", f"run_dir={tmp_path}"))


def test_slurm_launcher_builds_ddp_sized_jobs(tmp_path, monkeypatch):
    """hydra/launcher=slurm composes and gives submitit 2 nodes x 4 tasks x 4 GPUs, the time
    limit and the partition; the sbatch script is built but nothing is submitted."""
    import submitit
    from hydra.utils import instantiate
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun here
    seen = {}

    class Job:
        def __init__(self, args):
            self.args = args

        def results(self):
            return [self.args]

    def map_array(self, fn, *iterables):
        seen["params"] = dict(self._executor.parameters)
        seen["sbatch"] = self._executor._make_submission_file_text("COMMAND", "uid")
        return [Job(a) for a in zip(*iterables)]

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3", job_name="train"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "experiment=cacr_base", "model.checkpoint=null",
                                          "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                                          "data.batch_size=2", "hydra.launcher.partition=gpu",
                                          "hydra.launcher.timeout_min=90", f"hydra.sweep.dir={tmp_path}"],
                      return_hydra_config=True)
    # the README's command: the paper's setting (16 positives per step) on 2 nodes x 4 GPUs
    assert (cfg.trainer.strategy, cfg.trainer.precision, cfg.data.name) == ("ddp", "bf16-mixed", "flickr30k")
    assert cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes == 16
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    returned = launcher.launch([["loss=cacr"], ["loss=none"]], initial_job_idx=0)
    assert [r[0] for r in returned] == [["loss=cacr"], ["loss=none"]]
    p = seen["params"]
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"], p["time"], p["partition"]) == (2, 4, 4, 90, "gpu")
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=90", "--partition=gpu",
                 "--job-name=train", f"--output={tmp_path}/.submitit/%j/%j_0_log.out"):
        assert f"#SBATCH {line}\n" in seen["sbatch"], line
    assert "srun" in seen["sbatch"]
