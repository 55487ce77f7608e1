"""Faults and bad input (docs/faults.md lists every case and its outcome): each case ends in a
clear one-line error or an exact continuation, and no pre-existing file is lost or altered
(checked by comparing SHA-256 sums of every file before and after)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from cacr import rundir
from cacr.checks import SettingsError, check_data, settings_problems
from cacr.data.formats import FormatError, RegionsFile, check_regions_file, read_captions
from cacr.errors import CacrError, one_line
from cacr.config import job_dirname
from cacr.train import RunFinished, run

from .conftest import REPO

WORLD = {"n_train": 40, "n_val": 8, "n_test": 8, "n_winoground": 8}
TINY = [f"data.synthetic.{k}={v}" for k, v in WORLD.items()] + [
    "data.batch_size=4", "data.eval_batch_size=64", "model.config.hidden_size=32", "model.config.num_hidden_layers=2",
    "model.config.intermediate_size=64", "train.num_candidates=6", "module.num_negatives=2", "logger=csv",
    "trainer.enable_progress_bar=false", "eval.n_boot=20", "module.warmup_steps=2", "trainer.log_every_n_steps=1",
    "recipe=none",
]
RUN = ["train.max_steps=8", "eval.val_every_n_steps=4"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CACR_DEBUG="", HYDRA_FULL_ERROR="")


# --------------------------------------------------------------------------- helpers


def sums(*roots) -> dict:
    """SHA-256 of every file under ``roots`` (the pre-existing files a fault must not touch;
    a run directory's ``.lock`` says which process holds it, and is left out)."""
    out = {}
    for root in map(Path, roots):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            if p.name != rundir.LOCK_NAME:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def unchanged(before: dict, *roots) -> bool:
    """Every file of ``before`` still there with the same content (new files allowed)."""
    after = sums(*roots)
    return {k: after.get(k) for k in before} == before


def compose_train(world, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[*TINY, f"data.root={world}", *overrides])


def train_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def driver(point, step, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "tests.fault_driver", point, str(step), *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def last_line(proc) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def error_lines(proc, prog="train.py") -> list:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith(f"{prog}:")]


def no_traceback(proc) -> bool:
    return "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from .conftest import synthetic_world

    root = tmp_path_factory.mktemp("world")
    paths, _ = synthetic_world(root, WORLD, config="train")
    return root, paths


# --------------------------------------------------------------------------- settings (before step 0)

BAD_SETTINGS = [
    (["train.num_candidates=0"], "train.num_candidates=0"),
    (["train.max_steps=0"], "train.max_steps=0"),
    (["data.batch_size=0"], "data.batch_size=0"),
    (["eval.val_every_n_steps=0"], "eval.val_every_n_steps=0"),
    (["data.val_max_images=0"], "data.val_max_images=0"),
    (["module.lr=-1"], "module.lr=-1"),
    (["train.num_candidates=2", "module.num_negatives=3"], "train.num_candidates=2: fewer than module.num_negatives=3"),
    (["data.eval_batch_size=0"], "data.eval_batch_size=0"),
    (["module.mining_batch_size=0"], "module.mining_batch_size=0: expected an integer >= 1 or auto"),
    (["module.train_chunk_size=-1"], "module.train_chunk_size=-1: expected an integer >= 0 or auto"),
    (["module.train_chunk_size=big"], "module.train_chunk_size=big"),
    (["module.betas=[0.9,1.5]"], "module.betas=[0.9, 1.5]"),
    (["eval.n_boot=0"], "eval.n_boot=0"),
    (["data.tokenizer=bert-base-cased"], "data.tokenizer=bert-base-cased: the synthetic world"),
    (["trainer=gpu"], "trainer.accelerator=gpu: no CUDA device is visible"),
]


@pytest.mark.parametrize("overrides,key", BAD_SETTINGS, ids=[k.split(":")[0] for _, k in BAD_SETTINGS])
def test_bad_setting_is_named_before_step_0(tmp_path, overrides, key):
    problems, _ = settings_problems(compose_train(tmp_path, *overrides), cuda_available=False)
    assert len(problems) == 1 and problems[0].startswith(key), problems
    assert "\n" not in problems[0]


def test_default_settings_have_no_problem(tmp_path):
    assert settings_problems(compose_train(tmp_path), cuda_available=False) == ([], [])


@pytest.mark.parametrize("overrides,key", [(["module.warmup_steps=50", "train.max_steps=10", "eval.val_every_n_steps=5"],
                                            "module.warmup_steps=50"),
                                           (["eval.val_every_n_steps=20", "train.max_steps=10"],
                                            "eval.val_every_n_steps=20")])
def test_meaningless_but_possible_settings_are_warnings(tmp_path, overrides, key):
    problems, warnings = settings_problems(compose_train(tmp_path, *overrides), cuda_available=False)
    assert problems == [] and len(warnings) == 1 and warnings[0].startswith(key)


def test_train_py_prints_one_line_per_bad_setting(tmp_path, world):
    proc = train_cli(*TINY, f"data.root={world[0]}", "data.batch_size=0", "module.lr=-1", f"run_dir={tmp_path / 'r'}")
    assert proc.returncode == 1 and no_traceback(proc)
    lines = error_lines(proc)
    assert len(lines) == 2 and lines[0].startswith("train.py: data.batch_size=0") and "module.lr=-1" in lines[1]
    assert not (tmp_path / "r" / "checkpoints").exists()


# --------------------------------------------------------------------------- run directories


def test_second_run_on_a_claimed_directory_is_refused(tmp_path, world):
    rd = tmp_path / "run"
    rundir.claim(rd)
    try:
        before = sums(rd)
        proc = train_cli(*TINY, f"data.root={world[0]}", *RUN, f"run_dir={rd}")
        assert proc.returncode == 1 and no_traceback(proc)
        assert last_line(proc).startswith(f"train.py: run_dir={rd}: in use by another run (pid {os.getpid()}")
        assert sums(rd) == before  # Hydra's files were not written either
    finally:
        rundir.release(rd)


def test_a_killed_holder_leaves_no_stale_claim(tmp_path):
    rd = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"from cacr import rundir; rundir.claim({str(rd)!r}); "
                               "print('held', flush=True); import time; time.sleep(60)"],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(rundir.RunDirInUse, match="in use by another run"):
        rundir.claim(rd)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    rundir.claim(rd)  # the kernel released the lock with the process
    rundir.release(rd)


def test_a_directory_holding_a_run_is_not_reused(tmp_path, world):
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "results.json").write_text('{"retrieval": {}}\n')
    before = sums(rd)
    with pytest.raises(ValueError, match="holds an earlier run that left no complete checkpoint"):
        run(compose_train(world[0], *RUN, f"run_dir={rd}"))
    assert unchanged(before, rd) and not rundir.holds(rd)


def test_same_second_default_directories_never_collide(tmp_path):
    base = tmp_path / "outputs" / "2026-01-01" / "12-00-00"
    with ThreadPoolExecutor(4) as pool:
        dirs = list(pool.map(lambda _: rundir.unique_dir(base), range(8)))
    assert len(set(dirs)) == 8 and dirs.count(base) <= 1 and all(d.is_dir() for d in dirs)


def test_sweep_job_names_keep_the_swept_overrides():
    overrides = ",".join([f"data.synthetic.n_train={10 ** 6}", "loss=iais_distributed", "model.config.hidden_size=512",
                          "module.align_temperature=0.05", "module.lr=0.001", "seed=2", "train.max_steps=5000"])
    argv = ["-m", "loss=cacr,iais_distributed", "seed=0,1,2", "module.lr=0.001"]
    name = job_dirname(overrides, limit=60, argv=argv)
    assert name.startswith("loss=iais_distributed,seed=2,") and len(name) <= 60
    other = job_dirname(overrides.replace("seed=2", "seed=1"), limit=60, argv=argv)
    assert other != name and "seed=1" in other


# --------------------------------------------------------------------------- converters


@pytest.fixture()
def npz_folder(tmp_path):
    folder = tmp_path / "npz"
    folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(4):
        np.savez(folder / f"img{i}.npz", features=g.standard_normal((3, 8)).astype(np.float32),
                 norm_bb=np.array([[0.1, 0.1, 0.5, 0.5]] * 3, dtype=np.float32))
    return folder


class Done:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


@pytest.fixture()
def convert(capsys):
    """``python -m cacr.data.convert ARGS`` in this process (the signal tests use a real one)."""
    import cacr.data.convert as c

    def call(*args):
        old = signal.getsignal(signal.SIGTERM)
        try:
            rc = c.main([str(a) for a in args])
        finally:
            signal.signal(signal.SIGTERM, old)
        return Done(rc, capsys.readouterr().err)

    return call


def test_converter_refuses_an_existing_output(tmp_path, npz_folder, convert):
    out = tmp_path / "regions.h5"
    out.write_bytes(b"precious")
    proc = convert("npz-dir", npz_folder, out)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: out={out}: exists; pass --overwrite to replace it"
    assert out.read_bytes() == b"precious"


def test_converter_overwrites_only_when_told(tmp_path, npz_folder, convert):
    out = tmp_path / "regions.h5"
    out.write_bytes(b"old")
    assert convert("npz-dir", npz_folder, out, "--overwrite").returncode == 0
    assert len(RegionsFile(out)) == 4


def test_converter_never_writes_onto_its_input(tmp_path, world, convert):
    regions = tmp_path / "regions.h5"
    shutil.copy(world[1].regions, regions)
    kp = tmp_path / "karpathy.json"
    kp.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train",
                                          "sentences": [{"sentid": 1, "raw": "a red cube"}]}]}))
    before = sums(regions)
    proc = convert("karpathy", kp, regions, "--tokenizer", world[1].vocab, "--regions", regions, "--overwrite")
    assert proc.returncode == 1 and "is also an input of this command" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and sums(regions) == before


def test_converter_names_a_corrupt_npz(tmp_path, npz_folder, convert):
    (npz_folder / "img2.npz").write_bytes((npz_folder / "img2.npz").read_bytes()[:40])
    proc = convert("npz-dir", npz_folder, tmp_path / "r.h5")
    assert proc.returncode == 1 and no_traceback(proc)
    assert last_line(proc).startswith(f"error: {npz_folder / 'img2.npz'}: not a readable .npz")
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error")] == [last_line(proc)]
    assert not list(tmp_path.glob("r.h5*"))  # neither the output nor a temporary file


def test_converter_names_malformed_json(tmp_path, world, convert):
    kp = tmp_path / "karpathy.json"
    kp.write_text('{"images": [\n  {"filename": "a.jpg",}\n]}')
    proc = convert("karpathy", kp, tmp_path / "c.h5", "--tokenizer", world[1].vocab)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {kp}: malformed JSON")
    assert "line 2" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_stale_temporary_file_of_a_killed_converter_is_removed(tmp_path, npz_folder, convert):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"regions.h5.tmp-{dead.pid}"
    stale.write_bytes(b"half a file")
    assert convert("npz-dir", npz_folder, tmp_path / "regions.h5").returncode == 0
    assert not stale.exists() and (tmp_path / "regions.h5").is_file()


SLOW_CONVERTER = """
import sys, time
import cacr.data.convert as c
read = c.read_npz
def slow(p):
    print("reading", p, flush=True)
    time.sleep(0.5)
    return read(p)
c.read_npz = slow
sys.exit(c.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_conversion_removes_the_temporary_file(tmp_path, npz_folder, sig):
    out = tmp_path / "regions.h5"
    # preexec: SIGINT back to its default in the child (a suite started as a background job
    # hands its children SIGINT ignored, and Python then keeps ignoring it)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERTER, "npz-dir", str(npz_folder), str(out)], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for _ in range(3):  # the writer is open after the first image
        assert proc.stdout.readline().startswith("reading")
    assert list(tmp_path.glob("regions.h5.tmp-*"))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; no output written" in err
    assert list(tmp_path.glob("regions.h5*")) == []


# --------------------------------------------------------------------------- integrity


def test_written_files_carry_checksums(world):
    with h5py.File(world[1].regions, "r") as f:
        assert all(f[k].fletcher32 for k in ("features", "boxes", "offsets"))
        assert len(f["image_ids"].attrs["sha256"]) == 64
    with h5py.File(world[1].captions, "r") as f:
        assert f["token_ids"].fletcher32 and all(len(f[k].attrs["sha256"]) == 64 for k in ("text", "caption_ids"))


def _flip_feature_byte(path: Path) -> None:
    with h5py.File(path, "r") as f:
        ds = f["features"]
        offset = ds.id.get_chunk_info(0).byte_offset + 100
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x10]))


def test_corrupted_feature_bytes_are_detected_and_named(tmp_path, world):
    bad = tmp_path / "regions.h5"
    shutil.copy(world[1].regions, bad)
    _flip_feature_byte(bad)
    from cacr.data.datasets import RegionStore

    with pytest.raises(FormatError, match="checksum mismatch") as e:
        RegionStore.from_file(bad)
    assert e.value.path == str(bad)
    problems = check_regions_file(bad)
    assert len(problems) == 1 and "checksum mismatch" in problems[0] and problems[0].startswith("images 'syn_")


def test_edited_caption_text_fails_its_digest(tmp_path, world):
    bad = tmp_path / "captions.h5"
    shutil.copy(world[1].captions, bad)
    with h5py.File(bad, "r+") as f:
        f["text"][0] = "a caption someone edited"
    with pytest.raises(FormatError, match="'text': content differs from its stored SHA-256"):
        read_captions(bad)


def test_validator_groups_repeated_problems(tmp_path, world):
    bad = tmp_path / "regions.h5"
    shutil.copy(world[1].regions, bad)
    with h5py.File(bad, "r+") as f:
        offsets = f["offsets"][:]
        for i in range(30):
            f["features"][offsets[i]] = np.nan
    problems = check_regions_file(bad)
    assert len(problems) == 4 and problems[-1].startswith("... and 27 more image(s) with the same problem")
    assert one_line(FormatError(bad, problems)).startswith(f"{bad}: image 'syn_")


# --------------------------------------------------------------------------- data checked up front


def _files_world(tmp_path, world, edit=None, wino_edit=None, drop_split=None):
    """A copy of the tiny world as data.source=files, optionally edited."""
    paths = world[1]
    d = tmp_path / "files"
    d.mkdir()
    for name, src in (("regions.h5", paths.regions), ("captions.h5", paths.captions),
                      ("wino_regions.h5", paths.winoground_regions), ("examples.jsonl", paths.winoground_examples)):
        shutil.copy(src, d / name)
    if edit:
        with h5py.File(d / "regions.h5", "r+") as f:
            edit(f)
    if wino_edit:
        with h5py.File(d / "wino_regions.h5", "r+") as f:
            wino_edit(f)
    if drop_split:
        from cacr.data.formats import write_captions

        c = read_captions(d / "captions.h5")
        keep = [i for i, s in enumerate(c.splits) if s != drop_split]
        write_captions(d / "captions.h5", caption_ids=[c.caption_ids[i] for i in keep],
                       image_ids=[c.image_ids[i] for i in keep], texts=[c.texts[i] for i in keep],
                       token_ids=[c.tokens(i).tolist() for i in keep], splits=[c.splits[i] for i in keep],
                       vocab=c.vocab, tokenizer="synthetic", do_lower_case=False, cls_id=c.cls_id,
                       sep_id=c.sep_id, pad_id=int(c.attrs["pad_id"]), unk_id=int(c.attrs["unk_id"]))
    return ["data.source=files", f"data.regions={d / 'regions.h5'}", f"data.captions={d / 'captions.h5'}",
            f"data.winoground_regions={d / 'wino_regions.h5'}", f"data.winoground_examples={d / 'examples.jsonl'}"], d


def _datamodule(cfg):
    from cacr.train_data import TrainingDataModule

    dm = TrainingDataModule.from_config(cfg.data, num_candidates=6)
    dm.setup()
    return dm


def _nan_image(f, i, column="features"):
    f[column][f["offsets"][i]] = np.nan


def test_nan_features_are_named_with_file_and_image_before_training(tmp_path, world):
    over, d = _files_world(tmp_path, world, edit=lambda f: _nan_image(f, 3))
    cfg = compose_train(world[0], *over, *RUN)
    with pytest.raises(SettingsError) as e:
        check_data(_datamodule(cfg), cfg)
    image = RegionsFile(d / "regions.h5").image_ids[3]
    assert e.value.lines == [f"data.regions={d / 'regions.h5'}: NaN or Inf in the features or boxes of 1 image(s): "
                             f"{image!r}; expected finite values"]


def test_inf_boxes_of_the_winoground_set_are_found_before_training(tmp_path, world):
    over, d = _files_world(tmp_path, world, wino_edit=lambda f: _nan_image(f, 5, "boxes"))
    cfg = compose_train(world[0], *over, *RUN)
    image = RegionsFile(d / "wino_regions.h5").image_ids[5]
    with pytest.raises(SettingsError) as e:
        check_data(_datamodule(cfg), cfg)
    assert e.value.lines == [f"data.winoground_regions={d / 'wino_regions.h5'}: NaN or Inf in the features or boxes "
                             f"of 1 image(s): {image!r}; expected finite values"]


def test_a_missing_validation_split_is_found_before_training(tmp_path, world):
    over, d = _files_world(tmp_path, world, drop_split="val")
    cfg = compose_train(world[0], *over, *RUN)
    with pytest.raises(SettingsError, match=r"captions.h5: no captions of split 'val' \(data.val_split\)"):
        check_data(_datamodule(cfg), cfg)


def test_unknown_words_are_counted_per_file(tmp_path, world, caplog):
    over, d = _files_world(tmp_path, world)
    with h5py.File(d / "captions.h5", "r+") as f:
        unk = int(f.attrs["unk_id"])
        ids = f["token_ids"][:]
        ids[:5] = unk
        f["token_ids"][:] = ids
    cfg = compose_train(world[0], *over, *RUN)
    with caplog.at_level(logging.WARNING, logger="cacr.checks"):
        check_data(_datamodule(cfg), cfg)
    assert any(f"{d / 'captions.h5'}: 5 of " in r.message and "are [UNK]" in r.message for r in caplog.records)


def test_train_py_stops_on_bad_data_in_one_line_before_step_0(tmp_path, world):
    over, d = _files_world(tmp_path, world, edit=lambda f: _nan_image(f, 0))
    proc = train_cli(*TINY, f"data.root={world[0]}", *over, *RUN, f"run_dir={tmp_path / 'r'}")
    assert proc.returncode == 1 and no_traceback(proc)
    assert last_line(proc).startswith(f"train.py: data.regions={d / 'regions.h5'}: NaN or Inf")
    assert not (tmp_path / "r" / "checkpoints").exists()


# --------------------------------------------------------------------------- evaluators


def _score_file(path: Path, examples: Path) -> Path:
    ids = [json.loads(x)["id"] for x in examples.read_text().splitlines() if x.strip()]
    path.write_text("".join(json.dumps({"label": f"{i}_c{c}_i{j}", "score": float(c == j)}) + "\n"
                            for i in ids for c in (0, 1) for j in (0, 1)))
    return path


def _eval_winoground(world, *overrides):
    from cacr.evaluation.cli import guarded, run_winoground

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("winoground", overrides=[f"data.root={world[0]}",
                                               *[f"data.synthetic.{k}={v}" for k, v in WORLD.items()],
                                               "scorer=file", "n_boot=10", "progress=false", *overrides])
    return guarded("eval_winoground.py", run_winoground, cfg)


def test_evaluator_refuses_existing_results_before_scoring(tmp_path, world):
    scores = _score_file(tmp_path / "s.jsonl", world[1].winoground_examples)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}\n")
    before = sums(tmp_path)
    with pytest.raises(SystemExit) as e:
        _eval_winoground(world, f"scores={scores}", f"output={out}")
    assert str(e.value.code) == (f"eval_winoground.py: output={out / 'results.json'}: exists; pass overwrite=true "
                                 f"to replace it, or give another output=DIR")
    assert sums(tmp_path) == before


def test_evaluator_never_writes_onto_its_score_file(tmp_path, world):
    out = tmp_path / "out"
    out.mkdir()
    scores = _score_file(out / "winoground_scores.jsonl", world[1].winoground_examples)
    before = sums(tmp_path)
    with pytest.raises(SystemExit, match="is also an input of this command"):
        _eval_winoground(world, f"scores={scores}", f"output={out}", "overwrite=true")
    assert sums(tmp_path) == before


def test_evaluator_checks_the_output_is_writable_first(tmp_path, world, monkeypatch):
    scores = _score_file(tmp_path / "s.jsonl", world[1].winoground_examples)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    import cacr.evaluation.scorefile as scorefile

    monkeypatch.setattr(scorefile, "read_score_file", lambda *a: pytest.fail("scored before checking the output"))
    with pytest.raises(SystemExit, match=rf"output={blocker / 'sub'}: cannot write there"):
        _eval_winoground(world, f"scores={scores}", f"output={blocker / 'sub'}")


def test_evaluator_replaces_results_when_told_and_files_are_0644(tmp_path, world):
    scores = _score_file(tmp_path / "s.jsonl", world[1].winoground_examples)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}\n")
    res = _eval_winoground(world, f"scores={scores}", f"output={out}", "overwrite=true")
    assert res["text"] == 100.0 and json.loads((out / "results.json").read_text())["n"] == WORLD["n_winoground"]
    for name in ("results.json", "winoground_scores.jsonl", "results.md"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~rundir_umask()


def rundir_umask() -> int:
    from cacr.outputs import umask

    return umask()


# --------------------------------------------------------------------------- resume


# (mid-validation kills resume like "step": both restart from the last.ckpt of step 4)
KILLS = [("step", 6), ("before_last", 8), ("writing_last", 8), ("final_eval", 0)]


@pytest.fixture(scope="module")
def killed_and_resumed(world, tmp_path_factory):
    """The uninterrupted run, and for every kill point a run SIGKILLed there then resumed
    with the README's command (in its own directory) - run three at a time."""
    root = tmp_path_factory.mktemp("kills")
    common = [*TINY, f"data.root={world[0]}", *RUN]

    def reference():
        return driver("none", 0, *common, f"run_dir={root / 'full'}")

    def kill_then_resume(point, step):
        rd = root / point
        killed = driver(point, step, *common, f"run_dir={rd}")
        files = sums(rd / "checkpoints") if (rd / "checkpoints").exists() else {}
        resumed = train_cli(*common, f"ckpt_path={rd / 'checkpoints' / 'last.ckpt'}")
        return killed, files, resumed

    with ThreadPoolExecutor(3) as pool:
        ref = pool.submit(reference)
        runs = {p: pool.submit(kill_then_resume, p, s) for p, s in KILLS}
        assert ref.result().returncode == 0, ref.result().stderr[-2000:]
        return root, {p: f.result() for p, f in runs.items()}


def _normalised_results(rd: Path, name: str) -> dict:
    text = (rd / "results.json").read_text().replace(str(rd), "<run>")
    res = json.loads(text)
    res["config"].pop("run_dir", None)
    res.pop("resumes", None)  # a resumed run lists its resumes; the rest is the uninterrupted run's
    res.get("training", {}).pop("wall_s", None)  # seconds differ; steps, budget and the reason do not
    return res


@pytest.mark.slow
@pytest.mark.parametrize("point", [p for p, _ in KILLS])
def test_a_run_killed_anywhere_resumes_exactly(killed_and_resumed, point):
    root, runs = killed_and_resumed
    killed, _, resumed = runs[point]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full, rd = root / "full", root / point
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(rd / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k  # bitwise, on one thread
    assert sorted(p.name for p in (rd / "checkpoints").iterdir()) == sorted(
        p.name for p in (full / "checkpoints").iterdir())  # the same best checkpoint, no temporary file left
    assert _normalised_results(rd, point) == _normalised_results(full, "full")
    assert list((rd / ".hydra").rglob("config.yaml"))  # the resume's Hydra record, beside the run


@pytest.mark.slow
def test_resuming_a_finished_run_says_so_in_one_line(killed_and_resumed, world, capsys):
    root, _ = killed_and_resumed
    full = root / "full"
    before = sums(full)
    from cacr.train import main_entry

    assert main_entry(compose_train(world[0], *RUN, f"run_dir={full}",
                                    f"ckpt_path={full / 'checkpoints' / 'last.ckpt'}")) == {}
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"train.py: the run of {full / 'checkpoints' / 'last.ckpt'} finished at step 8 of train.max_steps=8; its "
        f"results are in {full / 'results.json'} (rerun_eval=true evaluates it again)")
    assert unchanged(before, full)


@pytest.mark.slow
def test_a_changed_config_is_refused_then_recorded_when_overridden(killed_and_resumed, world, tmp_path):
    root, _ = killed_and_resumed
    src = root / "full" / "checkpoints" / "last.ckpt"
    before = sums(root / "full")
    cfg = compose_train(world[0], *RUN, "train.max_steps=10", "loss=none", "module.lr=1e-3", f"ckpt_path={src}",
                        f"run_dir={tmp_path / 'r'}")
    with pytest.raises(CacrError) as e:
        run(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"ckpt_path={src}: the config differs from the checkpoint's: ")
    assert "module.lr: 0.0003 -> 0.001" in msg and "loss.name: 'cacr' -> 'none'" in msg
    assert "train.max_steps: 8 -> 10" in msg and "resume_override=true" in msg
    cfg = compose_train(world[0], *RUN, "train.max_steps=10", "module.lr=1e-3", f"ckpt_path={src}",
                        f"run_dir={tmp_path / 'r'}", "resume_override=true")
    res = run(cfg)
    assert res["resumes"][-1]["resumed_at_step"] == 8 and res["resumes"][-1]["config_changes"] == [
        "module.lr: 0.0003 -> 0.001", "train.max_steps: 8 -> 10", "trainer.max_steps: 8 -> 10"]
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert saved["resumes"] == res["resumes"] and saved["config"]["module"]["lr"] == 1e-3
    assert torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=True)["cacr"]["history"] == res["resumes"]
    assert unchanged(before, root / "full")  # the run resumed from is untouched


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")  # as the subprocess that ran it: the thread count changes fp32 sums
def test_rerun_eval_evaluates_a_finished_run_again(killed_and_resumed, world, tmp_path):
    root, _ = killed_and_resumed
    src = root / "full" / "checkpoints" / "last.ckpt"
    cfg = compose_train(world[0], *RUN, f"ckpt_path={src}", f"run_dir={tmp_path / 'again'}", "rerun_eval=true")
    res = run(cfg)
    full = json.loads((root / "full" / "results.json").read_text())
    assert res["retrieval"] == full["retrieval"] and res["winoground"] == full["winoground"]
    assert res["best_checkpoint"] == full["best_checkpoint"]  # the run's own best, read where it lies


def test_truncated_checkpoint_is_refused_naming_the_file(tmp_path, world):
    ck = tmp_path / "last.ckpt"
    buf = tmp_path / "full.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 3}, buf)
    ck.write_bytes(buf.read_bytes()[:300])
    with pytest.raises(CacrError, match=rf"^ckpt_path={ck}: not a readable checkpoint, truncated"):
        run(compose_train(world[0], *RUN, f"ckpt_path={ck}", f"run_dir={tmp_path / 'r'}"))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("obj", [{"model": 1}, {"uniter.embeddings.word_embeddings.weight": torch.zeros(2, 2)}],
                         ids=["foreign-dict", "official-weights"])
def test_foreign_checkpoint_is_refused_naming_the_file(tmp_path, world, obj):
    ck = tmp_path / "other.ckpt"
    torch.save(obj, ck)
    with pytest.raises(CacrError, match=rf"^ckpt_path={ck}: not a training checkpoint of this project's train.py"):
        run(compose_train(world[0], *RUN, f"ckpt_path={ck}", f"run_dir={tmp_path / 'r'}"))


def test_finished_run_message_is_raised_by_run(tmp_path, world, monkeypatch):
    """The same check in-process: RunFinished, not a training run."""
    import cacr.resume as resume

    info = resume.ResumeInfo(path=tmp_path / "run" / "checkpoints" / "last.ckpt", step=8, finished=True, config=None)
    monkeypatch.setattr(resume, "inspect_resume", lambda cfg, resolved: info)
    info.path.parent.mkdir(parents=True)
    info.path.write_bytes(b"")
    (tmp_path / "run" / "results.json").write_text("{}")
    with pytest.raises(RunFinished, match="finished at step 8 of train.max_steps=8"):
        run(compose_train(world[0], *RUN, f"ckpt_path={info.path}", f"run_dir={tmp_path / 'run'}"))


def test_one_line_of_a_multi_line_error():
    assert one_line(ValueError("first\nsecond\nthird")) == "first second (and 1 more lines)"
    assert one_line(KeyError("caption 'x'")) == "caption 'x'"
    assert one_line(FormatError("f.h5", ["a", "b"])).startswith("f.h5: a (and 1 more")


def test_retired_and_new_settings_do_not_block_a_resume():
    # A checkpoint written before a setting existed resumes with its default; a retired setting
    # (data.store_device) is not a config change. A real change still is.
    from cacr.resume import config_diff

    old = {"data.store_device": "cpu", "module.lr": 3e-4, "loss.name": "cacr"}
    assert config_diff(old, {"module.lr": 3e-4, "loss.name": "cacr", "module.wra_weight": 0.0}) == []
    assert config_diff(old, {"module.lr": 1e-3, "loss.name": "cacr"}) == ["module.lr: 0.0003 -> 0.001"]
