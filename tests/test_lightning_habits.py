"""Lightning and Hydra habits (issue 29, part 3): ``RetrievalModule.load_from_checkpoint`` on a
run's ``.ckpt``, the ``callbacks`` config group, loggers as ``_target_`` configs, the best
checkpoint as a wandb artifact, the config logged once; a tiny run, offline."""
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from cacr.train import run

from .conftest import REPO, in_one_thread
from .wandb_log import wandb_records

TINY_WORLD = [
    "data.synthetic.n_train=40", "data.synthetic.n_val=8", "data.synthetic.n_test=8",
    "data.synthetic.n_winoground=8", "data.batch_size=4", "data.eval_batch_size=64",
    "model.config.hidden_size=32", "model.config.num_hidden_layers=2", "model.config.intermediate_size=64",
    "train.num_candidates=6", "module.num_negatives=2", "trainer.enable_progress_bar=false", "eval.n_boot=50",
    "train.max_steps=4", "eval.val_every_n_steps=2", "trainer.log_every_n_steps=1", "module.warmup_steps=2",
    "recipe=none",  # the bare defaults (the default run's recipe: tests/test_default_recipe.py)
]


def compose_train(tmp: Path, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[*TINY_WORLD, f"data.root={tmp / 'world'}", *overrides])


def _offline(mp, tmp: Path):
    for k, v in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp / "wandb_dir")), ("WANDB_SILENT", "true"),
                 ("WANDB_DISABLE_GIT", "true")):
        mp.setenv(k, v)


_one_thread = in_one_thread


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("habits")
    cfg = compose_train(tmp, "logger=csv", "loss=cacr", f"run_dir={tmp / 'run'}")
    return tmp, cfg, _one_thread(run, cfg)


def test_load_from_checkpoint_rebuilds_the_module_and_scores_as_the_run(csv_run):
    from cacr.module import RetrievalModule
    from cacr.train_data import TrainingDataModule

    _, cfg, results = csv_run
    best = Path(results["best_checkpoint"])
    module = RetrievalModule.load_from_checkpoint(best, map_location="cpu")
    assert module.regularizer.name == "cacr" and module.regularizer.stop_grad is True
    assert module.model.config.hidden_size == 32 and module.hparams.num_negatives == 2
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    dm = TrainingDataModule.from_config(cfg.data, num_candidates=cfg.train.num_candidates)
    dm.setup()
    module.attach(test_split=dm.split("test"), winoground=dm.winoground, tokenizer=dm.tokenizer)
    again = _one_thread(module.final_evaluation, True, True, cfg.eval.n_boot)
    assert again["retrieval"] == results["retrieval"]  # the run's test recalls, from the loaded module
    assert again["winoground"] == results["winoground"]


def test_load_from_checkpoint_without_model_config_is_one_line(tmp_path):
    from cacr.module import RetrievalModule

    with pytest.raises(ValueError, match=r"give model=, or model_config="):
        RetrievalModule()
    with pytest.raises(ValueError, match=r"regularizer record has unknown field\(s\) \['bogus'\]"):
        RetrievalModule(model_config={"vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 1,
                                      "num_attention_heads": 2, "intermediate_size": 16, "img_dim": 8},
                        regularizer={"name": "cacr", "bogus": 1})


# --------------------------------------------------------------------------- callbacks and loggers


class _Seen:
    """Records the trainer's callbacks and loggers at the start of training."""

    def __new__(cls):
        import pytorch_lightning as pl

        class Seen(pl.Callback):
            callbacks, loggers = [], []

            def on_train_start(self, trainer, pl_module):
                Seen.callbacks = [type(c).__name__ for c in trainer.callbacks]
                Seen.loggers = [type(lg).__name__ for lg in trainer.loggers]
        return Seen()


def _records(run_dir: Path, timeout: float = 30.0):
    import time

    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(log))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return log.parent, records
        time.sleep(0.2)


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("habits_wandb")
    seen = _Seen()
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp, tmp)
        cfg = compose_train(tmp, "logger=wandb", "callbacks=[default,early_stopping,lr_monitor]",
                            "callbacks.early_stopping.patience=5", f"run_dir={tmp / 'run'}")
        results = _one_thread(run, cfg, [seen])
    return cfg, results, type(seen), _records(Path(results["run_dir"]))


def test_callbacks_group_composes_from_the_command_line(tmp_path):
    base = compose_train(tmp_path)
    assert set(base.callbacks) == {"checkpoint", "congruence"}
    assert set(compose_train(tmp_path, "callbacks=with_early_stopping").callbacks) == \
        {"checkpoint", "congruence", "early_stopping"}
    assert set(compose_train(tmp_path, "callbacks=with_lr_monitor").callbacks) == {"checkpoint", "congruence", "lr_monitor"}
    added = compose_train(tmp_path, "+callbacks.lr_monitor={_target_:pytorch_lightning.callbacks.LearningRateMonitor}")
    assert added.callbacks.lr_monitor._target_ == "pytorch_lightning.callbacks.LearningRateMonitor"
    for kind, target in (("csv", "cacr.loggers.csv_logger"), ("wandb", "cacr.loggers.wandb_logger"),
                         ("tensorboard", "pytorch_lightning.loggers.TensorBoardLogger"),
                         ("mlflow", "pytorch_lightning.loggers.MLFlowLogger")):
        c = compose_train(tmp_path, f"logger={kind}")
        assert c.logger.kind == kind and [n._target_ for n in c.loggers.values()] == [target]
    assert dict(compose_train(tmp_path, "logger=none").loggers) == {}
    w = compose_train(tmp_path, "logger=wandb", "logger.project=p", "logger.offline=false")
    assert (w.loggers.wandb.project, w.loggers.wandb.offline) == ("p", False)  # the short keys still set it


def test_the_run_builds_the_configured_callbacks_and_loggers(wandb_run):
    _, results, seen, _ = wandb_run
    assert {"BestCheckpoint", "LastCheckpoint", "CongruencePictures", "EarlyStopping",
            "LearningRateMonitor"} <= set(seen.callbacks)
    assert seen.loggers == ["WandbLogger"] and results["training"]["steps"] == 4


def test_wandb_logs_the_config_once_and_the_best_checkpoint_as_an_artifact(wandb_run):
    _, results, _, (files, records) = wandb_run
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds.count("run") == 1
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    assert summary["retrieval/rsum"] == pytest.approx(results["retrieval"]["rsum"])
    assert not [k for k in summary if k.startswith("config")]  # the config is the run's config, not 112 keys
    (art,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"]
    assert art.name.startswith("model-") and set(art.aliases) >= {"best", "latest"}
    best = Path(results["best_checkpoint"]).name
    assert [e.path for e in art.manifest.contents] == [best]
    lr = [r for r in records if r.WhichOneof("record_type") == "history"
          and any((i.key or "/".join(i.nested_key)).startswith("lr-AdamW") for i in r.history.item)]
    assert lr  # the LR monitor's scalars


def test_tensorboard_logger_writes_event_files(tmp_path):
    cfg = compose_train(tmp_path, "logger=tensorboard", "eval.winoground=false", f"run_dir={tmp_path / 'run'}")
    results = _one_thread(run, cfg)
    assert list((Path(results["run_dir"]) / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("overrides, message", [
    (["logger=mlflow"], "loggers.mlflow: pytorch_lightning.loggers.MLFlowLogger needs a package that is not "
                        "installed"),
    (["callbacks.checkpoint=null"], "callbacks.checkpoint: required"),
    (["logger=none", "callbacks=with_lr_monitor"], "callbacks.lr_monitor: needs a logger"),
    (["+callbacks.x={_target_:no.such.Callback}"], "callbacks.x (no.such.Callback): "),
    (["+loggers.x={_target_:no.such.Logger}"], "loggers.x._target_=no.such.Logger: cannot be imported"),
])
def test_bad_callbacks_and_loggers_are_one_line(tmp_path, overrides, message):
    from cacr.config import ConfigError

    if overrides == ["logger=mlflow"]:
        try:
            import mlflow  # noqa: F401
            pytest.skip("mlflow is installed here")
        except ImportError:
            pass
    cfg = compose_train(tmp_path, *overrides, f"run_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- evaluation commands log too


def _evaluate(tmp: Path, name: str, *overrides):
    from cacr.evaluation.cli import guarded, run_retrieval, run_winoground
    from cacr.evaluation.multiple_choice import run_multiple_choice

    world = [o for o in TINY_WORLD if o.startswith("data.synthetic.")] + [f"data.root={tmp / 'world'}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(name, overrides=[*world, "progress=false", "device=cpu", *overrides])
    fn = {"winoground": run_winoground, "retrieval": run_retrieval, "multiple_choice": run_multiple_choice}[name]
    return _one_thread(guarded, f"eval_{name}.py", fn, cfg)


def _history_keys(records):
    return {i.key or "/".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "history"
            for i in r.history.item}


def test_evaluation_commands_log_metrics_table_and_pictures_to_wandb(csv_run, tmp_path, monkeypatch):
    tmp, _, results = csv_run
    _offline(monkeypatch, tmp_path)
    ckpt = results["best_checkpoint"]
    out = _evaluate(tmp, "winoground", f"ckpt_path={ckpt}", "logger=wandb", "logger.project=cacr-eval",
                    f"output={tmp_path / 'wino'}", "n_boot=20")
    files, records = _records(tmp_path / "wino")
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert meta.project == "cacr-eval" and meta.job_type == "eval_winoground"
    keys = _history_keys(records)
    assert {"winoground/text", "winoground/image", "winoground/group", "winoground/binding"} <= keys
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            history.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    assert history["winoground/group"] == pytest.approx(out["group"])
    assert history["winoground/examples/nrows"] == out["n"]  # the per-example table
    assert history["winoground/congruence/count"] == 2  # the fixed example's matched pairs
    assert all((files / "files" / f).is_file() for f in history["winoground/congruence/filenames"])

    mc = _evaluate(tmp, "multiple_choice", f"ckpt_path={ckpt}", "logger=wandb", f"output={tmp_path / 'mc'}",
                   "n_boot=20")
    _, records = _records(tmp_path / "mc")
    keys = _history_keys(records)
    assert "multiple_choice/synthetic/accuracy" in keys and "multiple_choice/items/nrows" in keys
    assert mc["sets"]["synthetic"]["n"] > 0

    rt = _evaluate(tmp, "retrieval", f"ckpt_path={ckpt}", "logger=wandb", f"output={tmp_path / 'rt'}")
    _, records = _records(tmp_path / "rt")
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            history.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    assert history["retrieval/rsum"] == pytest.approx(rt["rsum"])
    assert history["retrieval/captions/nrows"] == rt["n_captions"]  # one row per caption


def test_the_per_caption_table_agrees_with_the_recalls():
    """retrieval_rows: ranks and hits against a slow twin on random ragged scores with ties."""
    import torch

    from cacr.evaluation.cli import retrieval_rows
    from cacr.evaluation.retrieval_metrics import retrieval_metrics

    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 6, (13, 5), generator=g).float()  # many ties
    txt2img = torch.arange(13) % 5
    rows = retrieval_rows(scores, txt2img, [f"c{c}" for c in range(13)], [f"i{i}" for i in range(5)])
    for c, (cid, iid, rank, r1, r5, r10) in enumerate(rows):
        true = scores[c, txt2img[c]]
        wrong = [scores[c, i] for i in range(5) if i != txt2img[c]]
        assert (cid, iid) == (f"c{c}", f"i{int(txt2img[c])}")
        assert rank == 1 + sum(float(w) >= float(true) for w in wrong)
        assert (r1, r5, r10) == (int(rank <= 1), int(rank <= 5), int(rank <= 10))
    m = retrieval_metrics(scores, txt2img)
    assert 100.0 * sum(r[3] for r in rows) / 13 == pytest.approx(m["ir_r1"])


def test_evaluation_with_logger_csv_writes_metrics_csv(csv_run, tmp_path):
    import csv

    tmp, _, results = csv_run
    out = _evaluate(tmp, "retrieval", f"ckpt_path={results['best_checkpoint']}", "logger=csv",
                    f"output={tmp_path / 'r'}")
    with open(tmp_path / "r" / "metrics.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["retrieval/rsum"]) == pytest.approx(out["rsum"]) == pytest.approx(results["retrieval"]["rsum"])
    with pytest.raises(SystemExit, match="overwrite"):  # metrics.csv is an output: not replaced silently
        (tmp_path / "r" / "results.json").unlink()
        _evaluate(tmp, "retrieval", f"ckpt_path={results['best_checkpoint']}", "logger=csv", f"output={tmp_path / 'r'}")


def test_output_dir_keeps_hydras_files_with_the_outputs(csv_run, tmp_path):
    """``output=DIR``: Hydra's .hydra folder and log are written there, not under outputs/eval_*; an
    earlier run's .hydra files are kept; a failed run in a new DIR leaves nothing behind."""
    import subprocess
    import sys

    import yaml

    tmp, _, results = csv_run
    world = [o for o in TINY_WORLD if o.startswith("data.synthetic.")] + [f"data.root={tmp / 'world'}"]
    out = tmp_path / "new" / "r"
    cmd = [sys.executable, "eval_retrieval.py", *world, f"ckpt_path={results['best_checkpoint']}", "progress=false",
           "device=cpu", f"output={out}"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    hydra = yaml.safe_load((out / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert Path(hydra["runtime"]["output_dir"]) == out and (out / "eval_retrieval.log").is_file()
    assert (out / "results.json").is_file() and (out / ".hydra" / "config.yaml").is_file()
    first = (out / ".hydra" / "config.yaml").read_text()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)  # refused: results.json exists
    assert proc.returncode == 1 and "overwrite" in proc.stderr
    assert (out / ".hydra" / "config.yaml").read_text() == first  # the earlier run's files kept
    bad = tmp_path / "new2" / "r"
    proc = subprocess.run([*cmd[:2], *world, f"ckpt_path={tmp_path / 'missing.ckpt'}", f"output={bad}"], cwd=REPO,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "missing.ckpt" in proc.stderr
    assert not (tmp_path / "new2").exists()
