"""The DDP processes of one training job on one node, started from the job itself.

Lightning's own launcher starts ranks > 0 by re-executing ``sys.argv``. Under a Hydra
multirun (``python train.py -m loss=cacr,none trainer=ddp``) that is the whole sweep, and
under a single Hydra run each process would pick its own ``${now:}`` run directory. Here the
process that runs the job (local rank 0) instead writes the job's fully resolved config,
with ``run_dir`` pinned to its own run directory, to ``<run_dir>/ddp_config.yaml`` and
starts the job's worker command with that file (``python -m cacr.train
<run_dir>/ddp_config.yaml``: the same :func:`cacr.train.run` as rank 0) per extra local rank,
with ``MASTER_ADDR``, ``MASTER_PORT`` (a free port per job), ``NODE_RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE`` set. Lightning then sees externally created processes and only joins them
into a process group. When the job ends, the workers are joined, the environment is
restored and the process group destroyed, so the next job of a sweep starts afresh.

Nothing is started where a cluster already created the processes (SLURM's ``srun``,
``torchrun``, LSF, MPI, or ``LOCAL_RANK`` set): each of those processes runs the job itself.
This module only manages processes: it knows nothing of the job it runs; which processes a
config asks for is decided by the rank helpers of :mod:`cacr.distributed`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from cacr.config import ConfigError
from cacr.distributed import is_script_ddp, num_local_processes, processes_created_externally

log = logging.getLogger(__name__)

WORKER_CONFIG = "ddp_config.yaml"
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_dir() -> str:
    """Where the job was launched from (relative paths in configs are taken from there)."""
    try:
        from hydra.utils import get_original_cwd

        return get_original_cwd()
    except (ImportError, ValueError):
        return os.getcwd()


def write_worker_config(cfg: DictConfig, run_dir: Path) -> Path:
    """The job's config with every interpolation resolved (so ``${now:}`` and Hydra's own
    values are those of rank 0) and ``run_dir`` pinned; written atomically."""
    from cacr.outputs import atomic_write_text

    container = OmegaConf.to_container(cfg, resolve=True)
    container["run_dir"] = str(run_dir.resolve())
    path = run_dir / WORKER_CONFIG
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(container)))
    return path


class DDPWorkers:
    """Context manager run by local rank 0 around a whole training job: starts ranks
    ``1 .. num_processes - 1`` of this node on entry (each runs ``worker_command`` followed
    by the path of the job's resolved config), joins them on exit."""

    def __init__(self, cfg: DictConfig, run_dir: Path, num_processes: int, num_nodes: int = 1, *,
                 worker_command: Sequence[str], join_timeout_s: float = 600.0):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.worker_command = list(worker_command)
        self.num_processes, self.num_nodes = num_processes, num_nodes
        self.join_timeout_s = join_timeout_s
        self.procs: List[subprocess.Popen] = []
        self._saved_env: Dict[str, Optional[str]] = {}
        self._done = threading.Event()
        self._lock = threading.Lock()
        self.failed: Optional[str] = None
        self._interrupt = signal.SIGINT  # the signal the watcher sends rank 0's main thread
        self._restore: Optional[tuple] = None

    def _environment(self) -> Dict[str, str]:
        if self.num_nodes > 1 and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
            raise ConfigError(f"trainer.num_nodes={self.num_nodes} outside SLURM/torchrun: set MASTER_ADDR and "
                              f"MASTER_PORT (and NODE_RANK on each node) in the environment, or submit with "
                              f"hydra/launcher=slurm")
        return {
            "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": os.environ.get("MASTER_PORT") or str(_free_port()),
            "NODE_RANK": os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")),
            "LOCAL_RANK": "0",
            "WORLD_SIZE": str(self.num_processes * self.num_nodes),
        }

    def __enter__(self) -> "DDPWorkers":
        env = self._environment()
        config = write_worker_config(self.cfg, self.run_dir)
        self._saved_env = {k: os.environ.get(k) for k in _DDP_ENV}
        os.environ.update(env)
        package_root = str(Path(__file__).resolve().parents[1])
        for local_rank in range(1, self.num_processes):
            child = dict(os.environ, LOCAL_RANK=str(local_rank))
            child["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
            self.procs.append(subprocess.Popen([*self.worker_command, str(config)], env=child,
                                               cwd=_launch_dir()))
        log.info("DDP: started local ranks 1..%d (pids %s) on node %s, master %s:%s, run dir %s",
                 self.num_processes - 1, [p.pid for p in self.procs], env["NODE_RANK"], env["MASTER_ADDR"],
                 env["MASTER_PORT"], self.run_dir)
        self._arm_interrupt()
        threading.Thread(target=self._watch, name="ddp-worker-watch", daemon=True).start()
        return self

    def _arm_interrupt(self) -> None:
        """How the watcher interrupts rank 0: with SIGINT where SIGINT raises KeyboardInterrupt
        (an interactive job). A shell starts background jobs with SIGINT ignored (`nohup python
        train.py ... &`); SIGINT is then left as it is and the job's own SIGUSR2 raises the
        KeyboardInterrupt instead (restored on exit), so a dead worker still ends the job at once
        with its rank named rather than after the 60 s last resort."""
        if callable(signal.getsignal(signal.SIGINT)) or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGUSR2) not in (signal.SIG_DFL, None):
            return  # somebody else's: leave it (the 60 s last resort still ends the job)
        self._restore = (signal.SIGUSR2, signal.signal(signal.SIGUSR2, signal.default_int_handler))
        self._interrupt = signal.SIGUSR2

    def _watch(self) -> None:
        """A worker that dies makes rank 0 stop too (it would wait in a collective for it)."""
        while not self._done.wait(0.5):
            for rank, p in enumerate(self.procs, start=1):
                if p.poll() not in (None, 0):
                    with self._lock:
                        if self._done.is_set():  # the job already ended; __exit__ reports it
                            return
                        self.failed = f"DDP worker local rank {rank} (pid {p.pid}) exited with code {p.returncode}"
                        if callable(signal.getsignal(self._interrupt)):  # KeyboardInterrupt, also out of a wait
                            signal.pthread_kill(threading.main_thread().ident, self._interrupt)
                    log.error("%s; stopping the job", self.failed)
                    self._stop_workers()
                    if not self._done.wait(60.0):  # stuck in a collective: nothing else will end it
                        os.kill(os.getpid(), signal.SIGKILL)
                    return

    def _stop_workers(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10.0
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __exit__(self, exc_type, exc, tb) -> bool:
        with self._lock:
            self._done.set()
        try:
            if exc_type is None:
                deadline = time.monotonic() + self.join_timeout_s
                for rank, p in enumerate(self.procs, start=1):
                    try:
                        code = p.wait(timeout=max(0.1, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        self._stop_workers()
                        raise RuntimeError(f"DDP worker local rank {rank} (pid {p.pid}) did not finish within "
                                           f"{self.join_timeout_s:.0f} s of rank 0")
                    if code != 0:
                        raise WorkerFailed(f"DDP worker local rank {rank} (pid {p.pid}) exited with code {code}")
            else:
                dead = [(r, p) for r, p in enumerate(self.procs, start=1) if p.poll() not in (None, 0)]
                if dead and not self.failed:  # e.g. rank 0's collective failed because a worker died
                    r, p = dead[0]
                    self.failed = f"DDP worker local rank {r} (pid {p.pid}) exited with code {p.returncode}"
                self._stop_workers()
        finally:
            if self._restore is not None:
                signal.signal(*self._restore)
                self._restore = None
            for k, v in self._saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            _destroy_process_group()
        if exc_type is not None and self.failed:  # Lightning turns an interrupt into SystemExit
            raise WorkerFailed(self.failed) from exc
        return False


class WorkerFailed(RuntimeError):
    """A DDP worker of the job ended with an error or was killed (the message names its rank)."""


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def job_processes(cfg: DictConfig, run_dir: Path, worker_command: Sequence[str]):
    """The context a training job runs in: :class:`DDPWorkers` (starting ``worker_command``
    for each other local rank) where this process must start them itself, else one that only
    tears the process group down."""
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if is_script_ddp(tcfg) and not processes_created_externally():
        n = num_local_processes(tcfg)
        return DDPWorkers(cfg, run_dir, n, int(tcfg.get("num_nodes", 1)), worker_command=worker_command)
    return _teardown_only()


@contextlib.contextmanager
def _teardown_only():
    try:
        yield None
    finally:
        _destroy_process_group()
