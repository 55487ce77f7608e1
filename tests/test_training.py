"""Training: the ranking loss and schedules, step-indexed batches, the batched training step
against a per-positive loop, one short run per loss option, resume, and every config."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from cacr.model import collate
from cacr.module import RetrievalModule, ranking_loss, softmax_ranking_loss, warmup_linear_decay
from cacr.train import run
from cacr.train_data import TrainBatches, TrainingDataModule

from .conftest import REPO

TINY_WORLD = [
    "data.synthetic.n_train=40", "data.synthetic.n_val=8", "data.synthetic.n_test=8",
    "data.synthetic.n_winoground=8", "data.batch_size=4", "data.eval_batch_size=64",
    "model.config.hidden_size=32", "model.config.num_hidden_layers=2", "model.config.intermediate_size=64",
    "train.num_candidates=6", "module.num_negatives=2", "logger=none", "trainer.enable_progress_bar=false",
    "eval.n_boot=50",
]


def compose_train(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[*TINY_WORLD, f"data.root={tmp_path / 'world'}",
                                            f"run_dir={tmp_path / 'run'}", *overrides])


def test_ranking_loss_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(5, generator=g), torch.randn(5, 2, 3, generator=g)
    want = []
    for b in range(5):
        for d in range(2):
            for j in range(3):
                want.append(max(0.0, 0.2 + torch.sigmoid(neg[b, d, j]).item() - torch.sigmoid(pos[b]).item()))
    assert ranking_loss(pos, neg, 0.2).item() == pytest.approx(sum(want) / len(want), abs=1e-6)


def test_softmax_ranking_loss_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(4, generator=g), torch.randn(4, 2, 3, generator=g)
    want = [-torch.log_softmax(torch.cat([pos[b:b + 1], neg[b, d]]), 0)[0] for b in range(4) for d in range(2)]
    assert softmax_ranking_loss(pos, neg).item() == pytest.approx(torch.stack(want).mean().item(), abs=1e-6)


def test_learning_rate_warms_up_then_decays_to_zero():
    f = [warmup_linear_decay(s, 10, 100) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.5) and f[100] == 0.0
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


@pytest.fixture(scope="module")
def tiny_dm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dm")
    cfg = compose_train(tmp)
    dm = TrainingDataModule.from_config(cfg.data, num_candidates=6)
    dm.setup()
    return dm


def _batches(dm, rank=0, world=1, batch_size=4):
    split = dm.split("train")
    return TrainBatches(dm.train_pools, batch_size=batch_size, num_candidates=6, seed=3,
                        txt_lens=torch.tensor([t.numel() for t in split.texts]),
                        num_bbs=torch.as_tensor(dm.regions.num_regions)[split.image_rows], rank=rank, world_size=world)


def test_step_batches_are_pure_functions_of_the_step_and_never_hold_a_true_match(tiny_dm):
    a, b = _batches(tiny_dm), _batches(tiny_dm)
    txt2img = tiny_dm.train_pools.txt2img
    for step in (0, 7, 49, 50, 123):  # 200 captions / 4 = 50 steps per epoch
        x, y = a[step], b[step]
        assert all(torch.equal(x[k], y[k]) for k in ("cap_idx", "img_idx", "neg_img", "neg_cap"))
        assert torch.equal(x["img_idx"], txt2img[x["cap_idx"]])
        assert not (x["neg_img"] == x["img_idx"][:, None]).any()
        assert not (txt2img[x["neg_cap"]] == x["img_idx"][:, None]).any()
        assert x["max_txt_len"] >= int(torch.tensor([len(t) for t in tiny_dm.split("train").texts])[x["neg_cap"]].max())
    # One epoch visits every training caption exactly once.
    seen = torch.cat([a[s]["cap_idx"] for s in range(50)])
    assert sorted(seen.tolist()) == sorted(tiny_dm.train_pools.positives.tolist())


def test_ranks_split_the_global_batch(tiny_dm):
    one = _batches(tiny_dm, batch_size=4)
    r0, r1 = _batches(tiny_dm, 0, 2, batch_size=2), _batches(tiny_dm, 1, 2, batch_size=2)
    for step in (0, 5):
        both = torch.cat([r0[step]["cap_idx"], r1[step]["cap_idx"]])
        assert sorted(both.tolist()) == sorted(one[step]["cap_idx"].tolist())


@pytest.mark.parametrize("plan", [False, True], ids=["padded-mining", "length-planned-mining"])
def test_batched_training_step_equals_a_loop_over_positives(tiny_dm, plan):
    """Mining (in fixed batches padded to the bounds, or in the length-sorted plan made on the
    host), the packed training batch and both losses, against one positive at a time through collate."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model.config.hidden_dropout_prob=0", "model.config.attention_probs_dropout_prob=0",
                                          "model.config.hidden_size=32", "model.config.num_hidden_layers=2",
                                          "model.config.intermediate_size=64"])
    model = instantiate(cfg.model)
    reg = instantiate(cfg.loss, schedule="constant")
    module = RetrievalModule(model, reg, num_negatives=2, mining=True, mining_batch_size=5)
    module.stores["train"] = tiny_dm.pair_store("train")
    batch = _batches(tiny_dm)[3]
    if plan:
        batch = module.prepare_batch(batch, module.stores["train"])
        assert len(batch["mine_chunks"]) == 10  # 48 candidate pairs in batches of 5
    got = {k: float(v) for k, v in module.compute_losses(batch, step=4, total_steps=10).items()}
    assert got["pairs"] == 4 + 2 * 4 * 2 + 2 * 4 * 6

    split = tiny_dm.split("train")
    model.eval()
    pairs = lambda cs, js: collate([split.pair(c, j) for c, j in zip(cs, js)])  # noqa: E731
    from cacr.regularizers import relation_blocks

    ranks, regs = [], []
    for b in range(4):
        c, j = int(batch["cap_idx"][b]), int(batch["img_idx"][b])
        with torch.no_grad():
            s_img = model.score(pairs([c] * 6, batch["neg_img"][b].tolist()))
            s_cap = model.score(pairs(batch["neg_cap"][b].tolist(), [j] * 6))
        hard_img = batch["neg_img"][b][s_img.topk(2).indices].tolist()
        hard_cap = batch["neg_cap"][b][s_cap.topk(2).indices].tolist()
        out = model(pairs([c] + [c, c] + hard_cap, [j] + hard_img + [j, j]), score_rows=torch.tensor([0]))
        s = out.rank_logits.sigmoid()
        ranks.append((0.2 + s[1:] - s[0]).clamp(min=0))
        pb = pairs([c], [j])
        blocks = relation_blocks(out.last_scores, pb.word_index, pb.word_mask, pb.region_index, pb.region_mask)
        regs.append(reg(*blocks).loss)
    assert got["rank_loss"] == pytest.approx(torch.cat(ranks).mean().item(), abs=1e-5)
    assert got["reg_loss"] == pytest.approx(torch.stack(regs).mean().item(), abs=1e-5)
    assert got["loss"] == pytest.approx(got["rank_loss"] + got["reg_loss"], abs=1e-5)


@pytest.mark.parametrize("loss", ["none", "cacr", "iais_singular", "iais_distributed"])
def test_a_short_run_for_every_loss(tmp_path, loss, monkeypatch):
    mining = loss in ("cacr", "iais_distributed")
    planned = []
    original = RetrievalModule.mine

    def spy(self, store, batch, *args):
        planned.append("mine_chunks" in batch)
        return original(self, store, batch, *args)

    monkeypatch.setattr(RetrievalModule, "mine", spy)
    cfg = compose_train(tmp_path, f"loss={loss}", "train.max_steps=2", "eval.val_every_n_steps=2",
                        f"module.mining={str(mining).lower()}")
    results = run(cfg)
    assert planned == ([True, True] if mining else [])  # Lightning's batch hook made the mining plan
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["best_checkpoint"].endswith(".ckpt") and Path(saved["best_checkpoint"]).is_file()
    for k in ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "rsum"):
        assert 0.0 <= saved["retrieval"][k] <= (600.0 if k == "rsum" else 100.0)
    for k in ("text", "image", "group"):
        assert 0.0 <= saved["winoground"][k] <= 100.0
    assert saved["winoground"]["n"] == 8
    assert results["retrieval"] == saved["retrieval"]
    ckpt = torch.load(saved["best_checkpoint"], weights_only=True, map_location="cpu")
    assert ckpt["hyper_parameters"]["regularizer"]["name"] == loss
    assert ckpt["global_step"] == 2


def test_resume_continues_exactly(tmp_path):
    common = ["train.max_steps=6", "eval.val_every_n_steps=3", "eval.test=false", "eval.winoground=false",
              "module.warmup_steps=2", "loss.schedule=linear"]
    full = run(compose_train(tmp_path / "full", *common))
    import pytorch_lightning as pl

    class Stop(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step >= 3:
                trainer.should_stop = True

    run(compose_train(tmp_path / "cut", *common), extra_callbacks=[Stop()])
    last = tmp_path / "cut" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    resumed = run(compose_train(tmp_path / "cut", *common, f"ckpt_path={last}", f"run_dir={tmp_path / 'resumed'}"))
    a = torch.load(tmp_path / "full" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (a["global_step"], b["global_step"]) == (6, 6)
    for k in a["state_dict"]:
        assert torch.allclose(a["state_dict"][k], b["state_dict"][k], atol=1e-6), k
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]
    del full, resumed


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_config_composes_and_builds(name):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={name}", "model.checkpoint=null"])
    reg = instantiate(cfg.loss)
    assert reg.name == cfg.loss.name
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert model.config.hidden_size in (768, 1024)
    assert cfg.module.num_negatives == 31 and cfg.train.num_candidates == 399 and cfg.module.lr == 5e-5
    assert cfg.trainer.precision == "bf16-mixed" and cfg.data.name == "flickr30k"
    assert cfg.module.ranking == "hinge" and cfg.module.mining is True


def test_config_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "loss=nonexistent"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "loss" in proc.stderr and "nonexistent" in proc.stderr
    proc = subprocess.run([sys.executable, "train.py", f"ckpt_path={tmp_path}/nope.ckpt", f"run_dir={tmp_path}/r"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"train.py: ckpt_path={tmp_path}/nope.ckpt: checkpoint not found"


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_directory(tmp_path):
    args = [sys.executable, "train.py", "-m", "loss=cacr,none", "train.max_steps=2", "eval.val_every_n_steps=2",
            f"data.root={tmp_path / 'world'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
            *[a for a in TINY_WORLD]]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(results) == 2
    names = sorted(json.loads(p.read_text())["best_checkpoint"] for p in results)
    assert len(set(names)) == 2
