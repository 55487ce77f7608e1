"""Faults of issue 30 around files (docs/faults.md lists every case): ids that become file
names never leave their output folder, run directories holding someone else's files are
not claimed, a copied run uses its own checkpoints, write errors are one line naming the
path. Every case checks that pre-existing files keep their SHA-256 sums."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cacr.errors import CacrError
from cacr.outputs import WriteError, atomic_write, atomic_write_text, file_stem, item_path

from .conftest import REPO, synthetic_world
from .test_faults import ENV, last_line, no_traceback, sums, unchanged

WORLD = dict(n_train=20, n_val=8, n_test=8, n_winoground=8)
HOSTILE = ["/../../TRAVERSAL", "../../TRAVERSAL", "..", ".", "a/b\\c", "%2F..%2F", "~", ".hidden", "x\x00y"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic_world(tmp_path_factory.mktemp("world"), WORLD)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from cacr.model import UniterConfig, build_uniter

    torch.manual_seed(0)
    model = build_uniter(UniterConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64, img_dim=64)).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model_config": model.config.to_dict()}, "global_step": 3}, path)
    return path


def files_under(root: Path) -> set:
    return {p for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- ids as file names


def test_file_stems_of_hostile_ids_stay_in_their_folder_and_never_collide(tmp_path):
    stems = [file_stem(i) for i in HOSTILE + ["ex_0_img_0", "TRAVERSAL", "a%2Fb%5Cc"]]
    assert len(set(stems)) == len(stems)  # one-to-one: two ids never share a file
    assert file_stem("ex_0_img_0") == "ex_0_img_0"
    for s in stems:
        assert "/" not in s and "\\" not in s and "\x00" not in s and not s.startswith(".")
        assert item_path(tmp_path, s + ".png").parent == tmp_path
    with pytest.raises(CacrError, match="would leave the output folder"):
        item_path(tmp_path, "../x.png")
    with pytest.raises(CacrError, match="empty"):
        file_stem("")


def test_attention_example_id_with_a_path_never_writes_outside_out(tmp_path, world, ckpt):
    """Issue 30, 1: ``--example /../../TRAVERSAL`` replaced a file outside ``--out``."""
    paths, overrides = world
    lines = paths.winoground_examples.read_text().splitlines()
    first = json.loads(lines[0])
    hostile = "/../../TRAVERSAL"
    examples = tmp_path / "examples.jsonl"
    examples.write_text("\n".join([json.dumps({**first, "id": hostile}), *lines[1:]]) + "\n")
    out = tmp_path / "a" / "b" / "out"
    out.mkdir(parents=True)
    for victim in (tmp_path / "a" / "b" / "TRAVERSAL_c0_i0_attention.npz",
                   tmp_path / "a" / "TRAVERSAL_c0_i0_attention.npz"):
        victim.write_bytes(b"the user's file")
    before = sums(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "cacr.analysis.attention", "--ckpt", str(ckpt), "--example", hostile,
                           "--figures", "heatmap", "--direction", "LV", "--out", str(out), *overrides,
                           f"examples={examples}", f"regions={paths.winoground_regions}"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert unchanged(before, tmp_path)
    new = files_under(tmp_path) - {Path(p) for p in before}
    assert new and all(out in p.parents for p in new), sorted(map(str, new))
    assert (out / f"ex{file_stem(hostile)}_c0_i0_attention.npz").is_file()


def test_render_image_id_with_a_path_never_writes_outside_out(tmp_path, world):
    """Issue 30, 2: an image id ``../../RENDER_TRAV`` in scenes.jsonl replaced a PNG outside ``--out``."""
    paths, _ = world
    lines = paths.winoground_scenes.read_text().splitlines()
    hostile = "../../RENDER_TRAV"
    scenes = tmp_path / "scenes.jsonl"
    scenes.write_text("\n".join([json.dumps({**json.loads(lines[0]), "image_id": hostile}), *lines[1:]]) + "\n")
    out = tmp_path / "a" / "b" / "out"
    out.mkdir(parents=True)
    victim = tmp_path / "a" / "RENDER_TRAV.png"
    victim.write_bytes(b"the user's picture")
    before = sums(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "cacr.data.render", "--scenes", str(scenes), "--image-id", hostile,
                           "--out", str(out), "--size", "32"], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert unchanged(before, tmp_path)
    assert files_under(tmp_path) - {Path(p) for p in before} == {out / f"{file_stem(hostile)}.png"}


# --------------------------------------------------------------------------- write errors


def test_write_error_names_the_path_and_leaves_no_temporary_file(tmp_path):
    """Issue 30, 5: ``[Errno 27] File too large`` named no path; the old output stays."""
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")

    def too_large(f):
        f.write(b"partial")
        raise OSError(errno.EFBIG, "File too large")

    with pytest.raises(WriteError) as e:
        atomic_write(target, too_large)
    assert str(e.value) == f"{target}: cannot write (File too large); existing content kept, no temporary file left"
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def file_size_limit(n_bytes):
    """``preexec_fn`` of a child whose files may not grow past ``n_bytes`` (EFBIG, even for root)."""
    def limit():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death by signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
    return limit


def test_export_past_the_file_size_limit_is_one_line(tmp_path, ckpt):
    """Issue 30, 5: a write error of ``python -m cacr.model.export`` was a traceback (PermissionError, EFBIG)."""
    out = tmp_path / "out.pt"
    out.write_bytes(b"old export")
    before = sums(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "cacr.model.export", str(ckpt), str(out), "--overwrite"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120,
                          preexec_fn=file_size_limit(4096))
    assert proc.returncode != 0 and no_traceback(proc), proc.stderr
    assert last_line(proc) == f"cacr.model.export: {out}: cannot write (File too large); existing content kept, " \
                              f"no temporary file left"
    assert sums(tmp_path) == before  # the old output, and no temporary file


# --------------------------------------------------------------------------- run directories


@pytest.fixture(scope="module")
def train_world(tmp_path_factory):
    from .test_faults import WORLD as TRAIN_WORLD

    root = tmp_path_factory.mktemp("train_world")
    synthetic_world(root, TRAIN_WORLD, config="train")
    return root


def test_run_dir_with_the_users_own_files_is_refused(tmp_path, train_world):
    """Issue 30, 3: ``run_dir=DIR`` holding the user's ``metrics.csv`` and ``winoground_scores.jsonl``
    overwrote both."""
    from .test_faults import RUN, TINY, error_lines, train_cli

    rd = tmp_path / "mine"
    rd.mkdir()
    (rd / "metrics.csv").write_text("step,my_metric\n0,1.0\n")
    (rd / "winoground_scores.jsonl").write_text('{"label": "0_c0_i0", "score": 1.0}\n')
    before = sums(rd)
    proc = train_cli(*TINY, f"data.root={train_world}", *RUN, f"run_dir={rd}")
    assert proc.returncode == 1 and no_traceback(proc), proc.stderr[-2000:]
    assert error_lines(proc) == [f"train.py: run_dir={rd}: holds files not made by a run of this project (metrics.csv, "
                                 f"winoground_scores.jsonl); choose an empty or new folder, or pass run_dir_reuse=true "
                                 f"to run there (a file of the same name is replaced)"]
    assert sums(rd) == before and sorted(p.name for p in rd.iterdir()) == ["metrics.csv", "winoground_scores.jsonl"]


def test_run_dir_reuse_flag_claims_a_foreign_folder(tmp_path):
    from cacr import rundir

    rd = tmp_path / "mine"
    rd.mkdir()
    (rd / "notes.txt").write_text("mine")
    with pytest.raises(CacrError, match="holds files not made by a run of this project"):
        rundir.hydra_run_dir(str(rd), None, str(tmp_path / "default"), False)
    assert rundir.hydra_run_dir(str(rd), None, str(tmp_path / "default"), True) == str(rd)
    rundir.release(rd)
    assert (rd / "notes.txt").read_text() == "mine"


def test_earlier_run_advice_names_a_checkpoint_that_exists(tmp_path):
    """Issue 30, misleading: after a DDP rank died (only ``last.ckpt.tmp-*``) or a run failed before its
    first checkpoint, the advice named ``checkpoints/last.ckpt``, which did not exist."""
    from cacr import rundir

    failed = tmp_path / "failed"  # stopped on a bad setting: Hydra's files and the claim only
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "config.yaml").write_text("train: {max_steps: 0}\n")
    rundir.claim(failed)
    rundir.release(failed)
    assert rundir.hydra_run_dir(str(failed), None, str(tmp_path / "d"), False) == str(failed)  # nothing to keep
    rundir.release(failed)

    died = tmp_path / "died"
    (died / "checkpoints").mkdir(parents=True)
    (died / "checkpoints" / "last.ckpt.tmp-12345").write_bytes(b"half")
    with pytest.raises(CacrError) as e:
        rundir.hydra_run_dir(str(died), None, str(tmp_path / "d"), False)
    assert str(e.value) == (f"run_dir={died}: holds an earlier run that left no complete checkpoint to resume "
                            f"from; choose another run_dir")
    (died / "checkpoints" / "best-step4.ckpt").write_bytes(b"a checkpoint")
    with pytest.raises(CacrError) as e:
        rundir.hydra_run_dir(str(died), None, str(tmp_path / "d"), False)
    assert f"resume it with ckpt_path={died / 'checkpoints' / 'best-step4.ckpt'} " in str(e.value)
    assert not rundir.holds(died)


# --------------------------------------------------------------------------- a run knows its own files


@pytest.fixture(scope="module")
def trained(train_world, tmp_path_factory):
    """A finished 8-step run of the fault suite's tiny setting."""
    from cacr.train import run

    from .test_faults import RUN, compose_train

    rd = tmp_path_factory.mktemp("trained") / "orig"
    torch.set_num_threads(1)
    run(compose_train(train_world, *RUN, f"run_dir={rd}"))
    return rd


def test_a_copied_run_evaluates_its_own_checkpoints(trained, train_world, tmp_path):
    """Issue 30, 4: after ``cp -a runs/orig runs/copy``, ``rerun_eval=true`` on the copy evaluated
    orig's best checkpoint through its stored absolute path."""
    import shutil

    from cacr.train import run

    from .test_faults import RUN, compose_train

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy, symlinks=True)
    before = sums(trained)
    res = run(compose_train(train_world, *RUN, f"run_dir={copy}", f"ckpt_path={copy / 'checkpoints' / 'last.ckpt'}",
                            "rerun_eval=true"))
    assert Path(res["best_checkpoint"]).parent == copy / "checkpoints", res["best_checkpoint"]
    assert Path(res["best_checkpoint"]).is_file() and unchanged(before, trained)
    saved = json.loads((copy / "results.json").read_text())
    assert [r["resumed_at_step"] for r in saved["resumes"]] == [8]  # every resume is listed


def test_resume_on_changed_data_is_refused_then_recorded(trained, train_world, tmp_path):
    """Issue 30, 5: ``captions.h5`` replaced between a kill and the resume went unnoticed."""
    import shutil

    import h5py

    from cacr.train import run

    from .test_faults import RUN, compose_train

    moved = tmp_path / "data"
    shutil.copytree(train_world, moved)
    (captions,) = moved.rglob("captions.h5")
    with h5py.File(captions, "r+") as f:
        f.attrs["edited"] = "by hand"  # still a valid captions file, other bytes
    src = trained / "checkpoints" / "last.ckpt"
    before = sums(trained)
    with pytest.raises(CacrError) as e:
        run(compose_train(moved, *RUN, f"ckpt_path={src}", f"run_dir={tmp_path / 'r'}", "rerun_eval=true"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"ckpt_path={src}: the data differs from the run's: captions changed (")
    assert "resume_override=true" in msg and "regions" not in msg  # the moved but unchanged files are the same data
    res = run(compose_train(moved, *RUN, f"ckpt_path={src}", f"run_dir={tmp_path / 'r2'}", "rerun_eval=true",
                            "resume_override=true"))
    assert [c.split(" (")[0] for c in res["resumes"][-1]["data_changes"]] == ["captions changed"]
    assert json.loads((tmp_path / "r2" / "results.json").read_text())["resumes"] == res["resumes"]
    assert unchanged(before, trained)


def test_resume_with_other_weight_shapes_is_refused_before_loading(trained, train_world, tmp_path):
    """Issue 30, 5: ``model.config.hidden_size`` changed with ``resume_override=true`` ended in a
    ``size mismatch`` traceback."""
    from cacr.train import run

    from .test_faults import RUN, compose_train

    src = trained / "checkpoints" / "last.ckpt"
    with pytest.raises(CacrError) as e:
        run(compose_train(train_world, *RUN, "model.config.hidden_size=64", "train.max_steps=10",
                          f"ckpt_path={src}", f"run_dir={tmp_path / 'r'}", "resume_override=true"))
    assert str(e.value).startswith(f"ckpt_path={src}: model.config.hidden_size: 32 -> 64 changes the shapes of the "
                                   f"checkpoint's weights, which resume_override=true cannot accept")
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- score files


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_truncated_score_matrix_is_refused_like_a_truncated_checkpoint(tmp_path, suffix):
    """Issue 30, 5: ``eval_retrieval.py scores=<truncated .pt>`` ended in a PytorchStreamReader traceback."""
    from cacr.evaluation.scorefile import load_score_matrix, save_score_matrix

    path = tmp_path / f"scores{suffix}"
    save_score_matrix(path, torch.randn(10, 2), [f"c{i}" for i in range(10)], ["a", "b"], torch.arange(10) % 2)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError) as e:
        load_score_matrix(path)
    assert str(e.value).startswith(f"{path}: not a readable score matrix") and "\n" not in str(e.value)


# --------------------------------------------------------------------------- SIGINT

SLOW_EVALUATOR = """
import runpy, sys, time
import cacr.evaluation.cli as c
def slow(cfg):
    print("scoring", flush=True)
    time.sleep(120)
c.run_retrieval = slow
sys.argv = ["eval_retrieval.py", *sys.argv[1:]]
runpy.run_path("eval_retrieval.py", run_name="__main__")
"""


def test_sigint_during_an_evaluation_is_one_line_and_exit_130(tmp_path):
    """Issue 30, 5: SIGINT during ``eval_retrieval.py`` ended in a KeyboardInterrupt traceback."""
    import signal

    proc = subprocess.Popen([sys.executable, "-c", SLOW_EVALUATOR, f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "scoring"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "eval_retrieval.py: interrupted (stopped by signal SIGINT); no partial " \
                                           "file left"


# --------------------------------------------------------------------------- DDP faults


class _Rank0:
    is_global_zero = True


def test_a_checkpoint_written_whole_before_a_rank_died_keeps_its_final_name(tmp_path):
    """Issue 30, 6: a DDP rank killed at the first validation left only ``last.ckpt.tmp-*``, complete but
    never renamed (rank 0 wrote it, then the barrier failed)."""
    from cacr.resume import _tmp, save_then_rename

    final = str(tmp_path / "last.ckpt")
    tmp = _tmp(final)

    def whole_then_barrier_fails():
        torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 4}, tmp)
        raise RuntimeError("[gloo] Connection closed by peer")  # the barrier after the save

    with pytest.raises(RuntimeError, match="Connection closed"):
        save_then_rename(_Rank0(), whole_then_barrier_fails, tmp, final)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.load(final, weights_only=True)["global_step"] == 4

    def half_written():
        torch.save({"w": torch.zeros(10_000)}, tmp + ".x")
        Path(tmp).write_bytes(Path(tmp + ".x").read_bytes()[:5000])
        os.unlink(tmp + ".x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_then_rename(_Rank0(), half_written, tmp, str(tmp_path / "best-step8.ckpt"))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the partial file is gone, the old one kept


def test_a_dead_rank_is_one_line_naming_a_checkpoint_that_exists(tmp_path, train_world, monkeypatch):
    """Issue 30, 6: a dead DDP rank ended in rank 0's traceback; the advice must name an existing file."""
    import cacr.train as train
    from cacr.launch import WorkerFailed

    from .test_faults import RUN, compose_train

    rd = tmp_path / "run"

    def dies(cfg, run_dir, *args):
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / "best-step4.ckpt").write_bytes(b"complete")
        (run_dir / "checkpoints" / "last.ckpt.tmp-99999").write_bytes(b"half")
        raise WorkerFailed("DDP worker local rank 1 (pid 99999) exited with code -9")

    monkeypatch.setattr(train, "_fit_and_evaluate", dies)
    with pytest.raises(CacrError) as e:
        train.run(compose_train(train_world, *RUN, f"run_dir={rd}"))
    assert str(e.value) == (f"DDP worker local rank 1 (pid 99999) exited with code -9; resume with "
                            f"ckpt_path={rd / 'checkpoints' / 'best-step4.ckpt'}")


def test_a_checkpoint_write_error_names_the_checkpoint(tmp_path):
    """Issue 30, vague: ``train.py: [Errno 27] File too large`` named no path."""
    from cacr.resume import _tmp, save_then_rename

    final = str(tmp_path / "last.ckpt")
    tmp = _tmp(final)

    def too_large():
        Path(tmp).write_bytes(b"PK partial")
        raise OSError(errno.EFBIG, "File too large")

    with pytest.raises(WriteError) as e:
        save_then_rename(_Rank0(), too_large, tmp, final)
    assert str(e.value) == f"{final}: cannot write (File too large); nothing written, no temporary file left"
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- small ones


class Payload:  # a pickled object of a class: code a checkpoint must not carry
    def __reduce__(self):
        return (print, ("ran",))


def test_a_pickle_payload_is_named_as_refused_code(tmp_path, train_world):
    """Issue 30, small: a pickle payload was reported as "truncated or not written by torch.save"."""
    from cacr.train import run

    from .test_faults import RUN, compose_train

    ck = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "x": Payload()}, ck)
    with pytest.raises(CacrError) as e:
        run(compose_train(train_world, *RUN, f"ckpt_path={ck}", f"run_dir={tmp_path / 'r'}"))
    assert str(e.value).startswith(f"ckpt_path={ck}: holds pickled code or objects other than tensors, which are "
                                   f"refused and were not run")


def _eval(world_overrides, name, *overrides):
    from hydra import compose, initialize_config_dir

    from cacr.evaluation.cli import guarded, run_retrieval, run_winoground

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(name, overrides=[*world_overrides, "progress=false", *overrides])
    return guarded(f"eval_{name}.py", {"winoground": run_winoground, "retrieval": run_retrieval}[name], cfg)


def test_an_img_dim_mismatch_names_the_regions_file(tmp_path, world):
    """Issue 30, small: an img_dim mismatch named ``examples.jsonl`` instead of the regions file."""
    from cacr.model import UniterConfig, build_uniter

    paths, overrides = world
    model = build_uniter(UniterConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64, img_dim=48))
    ck = tmp_path / "w48.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model_config": model.config.to_dict()}, "global_step": 1}, ck)
    with pytest.raises(SystemExit) as e:
        _eval(overrides, "winoground", f"ckpt_path={ck}", f"output={tmp_path / 'out'}", "n_boot=10")
    assert str(e.value.code).startswith(f"eval_winoground.py: regions={paths.winoground_regions}: region features "
                                        f"have width 64, the model expects img_dim=48")


def test_a_failed_evaluation_leaves_no_empty_output_folder(tmp_path, world):
    """Issue 30, small: a failed evaluation left an empty output folder behind."""
    _, overrides = world
    out = tmp_path / "new" / "out"
    with pytest.raises(SystemExit, match="missing.ckpt"):
        _eval(overrides, "retrieval", f"ckpt_path={tmp_path / 'missing.ckpt'}", f"output={out}")
    assert not (tmp_path / "new").exists()


SIGINT_IN_TRAINING = """
import os, signal, sys
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from cacr import train
from cacr.config import register_resolvers

class SigintAt(pl.Callback):
    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == 3:
            print("stepping", flush=True)
            os.kill(os.getpid(), signal.SIGINT)

torch.set_num_threads(1)
register_resolvers()
run = train.run
train.run = lambda cfg: run(cfg, extra_callbacks=[SigintAt()])
with initialize_config_dir(config_dir=os.path.abspath("conf"), version_base="1.3"):
    cfg = compose("train", overrides=sys.argv[1:])
train.main_entry(cfg)
"""


def test_sigint_during_training_is_one_line_and_exit_130(tmp_path, train_world):
    """Issue 30, 5: SIGINT ends every command with one line and exit 130 (Lightning ended a fit with exit 1)."""
    import signal

    from .test_faults import RUN, TINY

    proc = subprocess.run([sys.executable, "-c", SIGINT_IN_TRAINING, *TINY, f"data.root={train_world}", *RUN,
                           f"run_dir={tmp_path / 'r'}"], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "stepping" in proc.stdout, proc.stderr[-2000:]
    assert proc.returncode == 130 and no_traceback(proc), (proc.returncode, proc.stderr[-2000:])
    assert last_line(proc) == "train.py: interrupted (stopped by signal SIGINT); no partial file left"
    assert not list((tmp_path / "r").rglob("*.tmp-*"))
