"""The GPU check: everything GPU-related in one run of a few minutes (issue #8).

1. the CUDA tests (``pytest -m gpu``: the public code's outputs and losses in fp32 and bf16,
   fused vs explicit attention, bf16 vs CPU scoring, a training step with no host sync);
2. ``experiments/benchmark.py --device cuda`` (evaluation and training throughput,
   utilisation, regularizer share, peak memory, against the plain reference);
3. a short ``python train.py trainer=gpu`` run on the synthetic world (bf16-mixed), which
   must end with its results.json.

Without CUDA it runs what a CPU can: the tests (the CUDA ones skip) and a one-layer
benchmark, so the script itself is checked anywhere. Everything printed is also written to
``<out>/gpu_check.log``, with the benchmark's JSON beside it; paste the log into
experiments/BENCHMARKS.md with the card's name and the date.

Run: ``python experiments/gpu_check.py [--out DIR] [--skip train]``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


class Log:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = path.open("w")

    def __call__(self, text: str = ""):
        print(text, flush=True)
        self.f.write(text + "\n")
        self.f.flush()


def step(log, title, cmd, timeout, env=None):
    log(f"\n=== {title}\n$ {' '.join(cmd)}")
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc = "timeout"
    lines = out.rstrip().splitlines()
    for line in lines[-60:]:
        log(line)
    log(f"--- {title}: exit {rc} after {time.time() - t0:.0f} s")
    return rc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", str(REPO / "experiments" / "gpu_check_out")))
    ap.add_argument("--skip", default="", help="comma list of steps to skip: tests, bench, train")
    args = ap.parse_args(argv)
    out = Path(args.out)
    log = Log(out / "gpu_check.log")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    cuda = torch.cuda.is_available()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1"}

    log(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    log(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA available: {cuda}")
    if cuda:
        p = torch.cuda.get_device_properties(0)
        log(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
            f"capability {p.major}.{p.minor}, CUDA {torch.version.cuda}")
    status = {}
    if "tests" not in skip:
        status["tests"] = step(log, "CUDA tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                   "-m", "gpu", "tests/test_cuda.py", "tests/test_model.py",
                                                   "tests/test_eval_engine.py"], 300, env)
    if "bench" not in skip:
        cmd = [sys.executable, "experiments/benchmark.py", "--json", str(out / "benchmark.json")]
        cmd += ["--device", "cuda", "--captions", "50", "--compile", "--train-chunk", "64"] if cuda else ["--device", "cpu", "--layers", "1"]
        status["bench"] = step(log, "benchmark", cmd, 420, env)
    if "train" not in skip:
        run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"cacr_gpu_check_{os.getpid()}"
        cmd = [sys.executable, "train.py", f"run_dir={run_dir}", "logger=csv", "trainer.enable_progress_bar=false",
               "eval.n_boot=100"]
        cmd += ["trainer=gpu", "train.max_steps=300", "eval.val_every_n_steps=300"] if cuda else \
               ["train.max_steps=4", "eval.val_every_n_steps=4", "data.synthetic.n_train=40", "data.synthetic.n_val=8",
                "data.synthetic.n_test=8", "data.synthetic.n_winoground=8", f"data.root={out / 'world'}"]
        status["train"] = step(log, "train.py on the synthetic world", cmd, 240, env)
        res = run_dir / "results.json"
        if res.is_file():
            r = json.loads(res.read_text())
            log(f"results.json: retrieval rsum {r['retrieval']['rsum']:.1f}, winoground text/image/group "
                f"{r['winoground']['text']}/{r['winoground']['image']}/{r['winoground']['group']}")
            (out / "train_results.json").write_text(res.read_text())
    log("\n=== summary: " + ", ".join(f"{k} {'ok' if v == 0 else v}" for k, v in status.items()))
    return 0 if all(v == 0 for v in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
