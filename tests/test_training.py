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
from cacr.config import ConfigError
from cacr.module import RetrievalModule, warmup_linear_decay
from cacr.train import run
from cacr.train_data import TrainBatches, TrainingDataModule

from .conftest import REPO

TINY_WORLD = [
    "data.synthetic.n_train=40", "data.synthetic.n_val=8", "data.synthetic.n_test=8",
    "data.synthetic.n_winoground=8", "data.batch_size=4", "data.eval_batch_size=64",
    "model.config.hidden_size=32", "model.config.num_hidden_layers=2", "model.config.intermediate_size=64",
    "train.num_candidates=6", "module.num_negatives=2", "logger=none", "trainer.enable_progress_bar=false",
    "eval.n_boot=50", "recipe=none",  # the bare defaults: the default run's recipe has its own test
]


def compose_train(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[*TINY_WORLD, f"data.root={tmp_path / 'world'}",
                                            f"run_dir={tmp_path / 'run'}", *overrides])


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


@pytest.mark.parametrize("plan,chunk", [(False, 0), (True, 0), (True, 3)],
                         ids=["padded-mining", "length-planned-mining", "chunked-training-forward"])
def test_batched_training_step_equals_a_loop_over_positives(tiny_dm, plan, chunk):
    """Mining (in fixed batches padded to the bounds, or in the length-sorted plan made on the
    host), the packed training batch (one batch, or the negatives sorted by width in batches
    of 3: module.train_chunk_size) and both losses, against one positive at a time through collate."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model.config.hidden_dropout_prob=0", "model.config.attention_probs_dropout_prob=0",
                                          "model.config.hidden_size=32", "model.config.num_hidden_layers=2",
                                          "model.config.intermediate_size=64",
                                          # a wide init: scores far apart, so mining picks definite negatives
                                          "model.config.initializer_range=0.3"])
    model = instantiate(cfg.model)
    reg = instantiate(cfg.loss, schedule="constant")
    module = RetrievalModule(model, reg, num_negatives=2, mining=True, mining_batch_size=5, train_chunk_size=chunk)
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

    ranks, regs, chosen = [], [], []
    for b in range(4):
        c, j = int(batch["cap_idx"][b]), int(batch["img_idx"][b])
        with torch.no_grad():
            s_img = model.score(pairs([c] * 6, batch["neg_img"][b].tolist()))
            s_cap = model.score(pairs(batch["neg_cap"][b].tolist(), [j] * 6))
        hard_img = batch["neg_img"][b][s_img.topk(2).indices].tolist()
        hard_cap = batch["neg_cap"][b][s_cap.topk(2).indices].tolist()
        chosen.append(hard_img != batch["neg_img"][b][:2].tolist() or hard_cap != batch["neg_cap"][b][:2].tolist())
        assert s_img.topk(3).values.diff().abs().min() > 1e-4  # no near-ties: the chosen set is well defined
        out = model(pairs([c] + [c, c] + hard_cap, [j] + hard_img + [j, j]), score_rows=torch.tensor([0]))
        s = out.rank_logits.sigmoid()
        ranks.append((0.2 + s[1:] - s[0]).clamp(min=0))
        pb = pairs([c], [j])
        blocks = relation_blocks(out.last_scores, pb.word_index, pb.word_mask, pb.region_index, pb.region_mask)
        regs.append(reg(*blocks).loss)
    assert any(chosen)  # mining chose other negatives than the first random ones, and the losses still agree
    assert got["rank_loss"] == pytest.approx(torch.cat(ranks).mean().item(), abs=1e-5)
    assert got["reg_loss"] == pytest.approx(torch.stack(regs).mean().item(), abs=1e-5)
    assert got["loss"] == pytest.approx(got["rank_loss"] + got["reg_loss"], abs=1e-5)


@pytest.mark.parametrize("chunk", [0, 3], ids=["one-batch", "chunked"])
def test_box_swapped_negatives_equal_a_loop_over_positives(tiny_dm, chunk):
    """data.p_swap: each caption's first image negative is its own image with the two named
    objects' boxes exchanged, built inside the packed batch; checked against collate pairs whose
    boxes are exchanged by hand, one positive at a time."""
    from cacr.data.negatives import NegativeSampler

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model.config.hidden_dropout_prob=0", "model.config.attention_probs_dropout_prob=0",
                                          "model.config.hidden_size=32", "model.config.num_hidden_layers=2",
                                          "model.config.intermediate_size=64", "model.config.initializer_range=0.3"])
    model = instantiate(cfg.model)
    module = RetrievalModule(model, instantiate(cfg.loss), num_negatives=2, mining=False, ranking="softmax",
                             train_chunk_size=chunk)
    module.stores["train"] = tiny_dm.pair_store("train")
    pools, split = tiny_dm.train_pools, tiny_dm.split("train")
    sampler = NegativeSampler(pools.txt2img, pools.positives, pools.num_images, tiny_dm.train_truth, 0.0, "bag",
                              0.5, tiny_dm.swap_rows())
    batches = TrainBatches(pools, batch_size=4, num_candidates=6, seed=3, sampler=sampler,
                           txt_lens=torch.tensor([t.numel() for t in split.texts]),
                           num_bbs=torch.as_tensor(tiny_dm.regions.num_regions)[split.image_rows])
    step = next(s for s in range(50) if 0 < int((batches[s]["swap_rows"][:, 0] >= 0).sum()) < 4)  # some, not all
    batch = batches[step]
    got = float(module.compute_losses(batch, step=step, total_steps=10)["rank_loss"].detach())

    def pair(c, j, swap=(-1, -1)):
        p = split.pair(c, j)
        if swap[0] >= 0:
            box = p.img_pos_feat.clone()
            box[[swap[0], swap[1]]] = box[[swap[1], swap[0]]]
            p = type(p)(p.input_ids, p.img_feat, box)
        return p

    losses = []
    for b in range(4):
        c, j = int(batch["cap_idx"][b]), int(batch["img_idx"][b])
        swap = tuple(batch["swap_rows"][b].tolist())
        img_negs = [pair(c, int(batch["neg_img"][b][0]), swap), pair(c, int(batch["neg_img"][b][1]))]
        with torch.no_grad():
            s_pos = model.score(collate([pair(c, j)]))
            s_img = model.score(collate(img_negs))
            s_cap = model.score(collate([pair(int(t), j) for t in batch["neg_cap"][b][:2]]))
        if swap[0] >= 0:
            assert int(batch["neg_img"][b][0]) == j and not torch.allclose(s_img[0], s_pos)
        for group in (s_img, s_cap):
            losses.append(torch.nn.functional.cross_entropy(torch.cat([s_pos, group])[None], torch.tensor([0])))
    assert got == pytest.approx(torch.stack(losses).mean().item(), abs=1e-5)
    module.hparams.mining = True  # mined candidates would lose the swaps: refused
    with pytest.raises(ValueError, match="cannot be mined"):
        module.compute_losses(batch, step=step, total_steps=10)


@pytest.mark.parametrize("loss", ["cacr", "cacr loss.layers=all", "iais_singular", "none"])
def test_chunked_training_forward_gives_the_one_batch_logits_losses_and_gradients(tiny_dm, loss):
    """module.train_chunk_size: the negatives sorted by width in small batches give every
    pair the logit the one padded batch gives it (in the pairs' order), hence the same losses
    and gradients, on random ragged steps."""
    import copy

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"loss={loss.split()[0]}", *loss.split()[1:], "model.config.hidden_dropout_prob=0",
                                          "model.config.attention_probs_dropout_prob=0",
                                          "model.config.hidden_size=32", "model.config.num_hidden_layers=2",
                                          "model.config.intermediate_size=64", "model.config.initializer_range=0.3"])
    model = instantiate(cfg.model)
    one = RetrievalModule(model, instantiate(cfg.loss, schedule="constant"), num_negatives=3, mining=False)
    chunked = RetrievalModule(copy.deepcopy(model), instantiate(cfg.loss, schedule="constant"), num_negatives=3,
                              mining=False, train_chunk_size=5)
    store = tiny_dm.pair_store("train")
    one.stores["train"] = chunked.stores["train"] = store
    batches = _batches(tiny_dm, batch_size=3)
    for step in (1, 8, 17):
        batch = batches[step]
        B, k = 3, 3
        caps = torch.cat([batch["cap_idx"], batch["cap_idx"].repeat_interleave(k), batch["neg_cap"][:, :k].flatten()])
        imgs = torch.cat([batch["img_idx"], batch["neg_img"][:, :k].flatten(), batch["img_idx"].repeat_interleave(k)])
        widths = store.txt_lens_cpu[caps] + store.num_bbs_cpu[imgs]
        assert len(set(widths.tolist())) > 3  # ragged
        want = model(store.batch(caps, imgs)).rank_logits
        got, _, pos = chunked._chunked_forward(store, caps, imgs, None, B, 5, False, None)
        assert pos.attn_mask.shape[0] == B
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        grads = []
        for m in (one, chunked):
            m.model.zero_grad(set_to_none=True)
            losses = m.compute_losses(batch, step=step, total_steps=20)
            losses["loss"].backward()
            grads.append((losses, {n: p.grad.clone() for n, p in m.model.named_parameters() if p.grad is not None}))
        (la, ga), (lb, gb) = grads
        for key in la:
            torch.testing.assert_close(lb[key].float(), la[key].float(), atol=1e-5, rtol=1e-4)
        assert ga.keys() == gb.keys() and ga
        for n in ga:
            torch.testing.assert_close(gb[n], ga[n], atol=1e-5, rtol=1e-4, msg=n)


def test_train_chunk_size_auto_chunks_wide_models_on_a_cpu_only():
    from cacr.model import UniterConfig, UniterForImageTextRetrieval

    tiny = UniterForImageTextRetrieval(UniterConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=64, img_dim=16))
    wide = UniterForImageTextRetrieval(UniterConfig(hidden_size=512, num_hidden_layers=1, num_attention_heads=8,
                                                    intermediate_size=64, vocab_size=64, img_dim=16))
    assert RetrievalModule(tiny, _none(), train_chunk_size="auto").train_chunk_size == 0
    assert RetrievalModule(wide, _none(), train_chunk_size="auto").train_chunk_size == 4
    assert RetrievalModule(wide, _none(), train_chunk_size=0).train_chunk_size == 0
    assert RetrievalModule(tiny, _none(), train_chunk_size=4).train_chunk_size == 4
    with_wra = RetrievalModule(wide, _none(), train_chunk_size=4, wra_weight=0.5)
    assert with_wra.train_chunk_size == 0 and "wra_weight" in with_wra._train_chunk()[1]  # needs one width
    for bad in (-1, "big", True, 2.5):
        with pytest.raises(ValueError, match="train_chunk_size"):
            RetrievalModule(tiny, _none(), train_chunk_size=bad)


def _none():
    from cacr.regularizers import Regularizer

    return Regularizer("none")


def test_p_swap_with_mining_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="data.p_swap=0.5 with module.mining=true"):
        run(compose_train(tmp_path, "data.p_swap=0.5", "module.mining=true"))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.ckpt"))


def test_mining_starts_at_its_step(tiny_dm):
    """Before ``mining_start`` a step trains on the first candidates (random), from it on the hardest."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model.config.hidden_size=32", "model.config.intermediate_size=64",
                                          "model.config.initializer_range=0.3"])  # scores that depend on the pair
    model = instantiate(cfg.model)
    reg = instantiate(cfg.loss, schedule="constant")
    make = lambda **kw: RetrievalModule(model, reg, num_negatives=2, ranking="softmax", **kw)  # noqa: E731
    late, never, always = make(mining=True, mining_start=5), make(mining=False), make(mining=True)
    for m in (late, never, always):
        m.stores["train"] = tiny_dm.pair_store("train")
    batches = _batches(tiny_dm)
    for step, twin in ((4, never), (5, always), (9, always)):
        batch = late.prepare_batch(batches[step], late.stores["train"])
        assert ("mine_chunks" in batch) == (step >= 5)
        got = late.compute_losses(batch, step=step, total_steps=10)
        want = twin.compute_losses(batches[step], step=step, total_steps=10)
        assert float(got["pairs"]) == float(want["pairs"]) == 4 + 2 * 4 * 2 + (2 * 4 * 6 if step >= 5 else 0)
        assert float(got["rank_loss"]) == pytest.approx(float(want["rank_loss"]), abs=1e-5)
    random_at_5 = never.compute_losses(batches[5], step=5, total_steps=10)["rank_loss"]
    assert float(random_at_5) != pytest.approx(float(always.compute_losses(batches[5], 5, 10)["rank_loss"]), abs=1e-4)


def test_alignment_term_equals_a_loop_over_caption_image_pairs(tiny_dm):
    """The align-before-fuse term inside the training step: embedding-layer words and regions of
    each positive through collate, every caption against every image of the batch, another
    caption of the same image left out of the negatives."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model.config.hidden_size=32", "model.config.intermediate_size=64"])
    model = instantiate(cfg.model)
    module = RetrievalModule(model, instantiate(cfg.loss, schedule="constant"), num_negatives=2, mining=False,
                             ranking="softmax", align_weight=0.5, align_temperature=0.2)
    module.stores["train"] = tiny_dm.pair_store("train")
    batch = dict(_batches(tiny_dm, batch_size=6)[2])
    batch["img_idx"][1] = batch["img_idx"][0]  # a second caption of image 0 (a true match: not a negative)
    batch["cap_idx"][1] = int(tiny_dm.split("train").img2txts[int(batch["img_idx"][0])][-1])
    got = module.compute_losses(batch, step=4, total_steps=10)
    got = {k: float(v.detach()) for k, v in got.items()}
    assert got["loss"] == pytest.approx(got["rank_loss"] + got["reg_loss"] + 0.5 * got["align_loss"],
                                               abs=1e-5)

    split = tiny_dm.split("train")
    words, regions = [], []
    for c, j in zip(batch["cap_idx"].tolist(), batch["img_idx"].tolist()):
        pb = collate([split.pair(c, j)])
        x = model.uniter.embed(pb)[0]
        words.append(x[pb.word_index[0][pb.word_mask[0]]])
        regions.append(x[pb.region_index[0][pb.region_mask[0]]])
    B = len(words)
    cos = torch.nn.functional.cosine_similarity
    logits = torch.tensor([[cos(words[a][:, None], regions[b][None], dim=-1).amax(1).mean().item() / 0.2
                            for b in range(B)] for a in range(B)])
    imgs = batch["img_idx"].tolist()
    terms = []
    for a in range(B):
        keep = [b for b in range(B) if b == a or imgs[b] != imgs[a]]
        assert len(keep) == (B - 1 if a < 2 else B)
        terms.append(-torch.log_softmax(logits[a, keep], 0)[keep.index(a)])
        terms.append(-torch.log_softmax(logits[keep, a], 0)[keep.index(a)])
    assert float(got["align_loss"]) == pytest.approx(torch.stack(terms).mean().item(), abs=1e-4)


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


def test_stop_at_binding_stops_at_the_first_validation_that_reaches_it_and_a_resume_trains_no_further(tmp_path):
    from cacr.train import RunFinished

    common = ["train.max_steps=6", "eval.val_every_n_steps=2", "eval.test=false", "module.warmup_steps=1",
              "module.val_winoground=true"]
    with pytest.raises(ConfigError, match="stop_at_binding=0.0: needs module.val_winoground=true"):
        run(compose_train(tmp_path / "refused", *common, "module.val_winoground=false", "train.stop_at_binding=0.0"))
    res = run(compose_train(tmp_path / "a", *common, "train.stop_at_binding=0.0"))  # any binding reaches 0
    last = tmp_path / "a" / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 2
    assert res["stopped_at_binding"]["step"] == 2 and res["stopped_at_binding"]["threshold"] == 0.0
    assert res["best_checkpoint"] == str(last)  # the stopped model is evaluated, not the best by R-sum
    assert "winoground" in res
    # killed after the stop, before its results: the resume evaluates, and trains no step
    (tmp_path / "a" / "run" / "results.json").unlink()
    again = run(compose_train(tmp_path / "a", *common, "train.stop_at_binding=0.0", f"ckpt_path={last}"))
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert again["stopped_at_binding"]["step"] == 2
    with pytest.raises(RunFinished, match="finished at step 2"):
        run(compose_train(tmp_path / "a", *common, "train.stop_at_binding=0.0", f"ckpt_path={last}"))


SYNTHETIC_EXPERIMENTS = {"synthetic_study", "binding_pilot", "binding_pretrain", "binding_finetune", "binding_acquire"}
PAPER_EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")
                           if p.stem not in SYNTHETIC_EXPERIMENTS)


def test_experiment_configs_are_the_paper_settings_or_the_synthetic_studies():
    names = {p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")}
    assert names - set(PAPER_EXPERIMENTS) == SYNTHETIC_EXPERIMENTS
    assert {f"{m}_{size}" for m in ("uniter", "cacr") for size in ("base", "large")} <= set(PAPER_EXPERIMENTS)


@pytest.mark.parametrize("name", PAPER_EXPERIMENTS)
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
    assert cfg.module.ranking == "hinge" and cfg.module.mining is True and cfg.module.align_weight == 0


@pytest.mark.parametrize("name", ["binding_pilot", "binding_pretrain", "binding_finetune"])
def test_binding_study_configs_compose_and_build(name):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={name}", "loss=cacr", "seed=3"])
    assert instantiate(cfg.loss).name == "cacr" and cfg.data.source == "synthetic"
    with torch.device("meta"):
        assert instantiate(cfg.model).config.hidden_size == 256
    if name == "binding_finetune":  # the paper's objective only; the seed varies the data
        assert cfg.data.p_hard == 0 and cfg.module.mlm_weight == 0 and cfg.module.align_weight == 0
        assert cfg.module.mining and cfg.data.seed == 3 and cfg.eval.val_every_n_steps == cfg.train.max_steps
    else:  # pre-training: MLM and compositional hard negatives, dev-half curves
        assert cfg.data.p_hard > 0 and cfg.module.mlm_weight > 0 and cfg.module.val_winoground


@pytest.mark.parametrize("loss", ["none", "iais_singular", "iais_distributed", "cacr"])
def test_synthetic_study_config_composes_for_every_loss(loss):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=synthetic_study", f"loss={loss}", "seed=2"])
    assert instantiate(cfg.loss).name == loss
    assert cfg.data.source == "synthetic" and cfg.data.seed == 2 and cfg.module.mining is False
    assert cfg.eval.val_every_n_steps == cfg.train.max_steps and cfg.logger.kind == "csv"
    with torch.device("meta"):
        assert instantiate(cfg.model).config.hidden_size == 256


def test_config_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "loss=nonexistent"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "loss" in proc.stderr and "nonexistent" in proc.stderr
    proc = subprocess.run([sys.executable, "train.py", f"ckpt_path={tmp_path}/nope.ckpt", f"run_dir={tmp_path}/r"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"train.py: ckpt_path={tmp_path}/nope.ckpt: checkpoint not found"


BAD_SETTINGS_WITHOUT_LIGHTNING = """
import sys
from hydra import compose, initialize_config_dir
from cacr.checks import SettingsError
from cacr.config import ConfigError, register_resolvers
from cacr.train import run
register_resolvers()
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    for overrides in (["train.max_steps=-3"], ["ckpt_path=/nonexistent/last.ckpt"]):
        try:
            run(compose(config_name="train", overrides=overrides + ["run_dir=" + sys.argv[2]]))
        except (SettingsError, ConfigError) as e:
            print(type(e).__name__)
print("pytorch_lightning" in sys.modules)
"""


def test_bad_settings_are_found_before_lightning_is_imported(tmp_path):
    """Lightning's import takes seconds; a user's mistyped setting must not wait for it."""
    proc = subprocess.run([sys.executable, "-c", BAD_SETTINGS_WITHOUT_LIGHTNING, str(REPO / "conf"),
                           str(tmp_path / "r")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["SettingsError", "ConfigError", "False"]

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


STUDY_WORLD = {"seed": 1, "n_train": 4, "n_val": 2, "n_test": 2, "n_winoground": 4}


def _fake_job(root, world_root, loss, seed, text, relation_text, r1, good_examples):
    job = root / f"{loss}_{seed}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(json.dumps({
        "seed": seed, "loss": {"name": loss},
        "data": {"img_dim": 64, "vocab_size": 64, "root": str(world_root), "synthetic": STUDY_WORLD}}))
    tags = {t: {"text": relation_text if t == "Relation" else 0.0, "image": 1.0, "group": 0.5, "n": 2}
            for t in ("Relation", "Object")}
    (job / "results.json").write_text(json.dumps({
        "retrieval": {"ir_r1": r1, "tr_r1": 2 * r1, "rsum": 3 * r1},
        "winoground": {"text": text, "image": 1.0, "group": 0.5, "n": 4, "by_tag": {"collapsed_tag": tags}}}))
    rows = ["step,train/rank_loss,train/reg_loss,train/reg_weight"] + [f"{s},{1 / (s + 1)},{seed},0.5" for s in (9, 19)]
    (job / "metrics.csv").write_text("\n".join(rows) + "\n")
    # Caption 1 scores higher on both images (Winoground's text score fails), yet the
    # interaction s00 - s01 - s10 + s11 favours the true pairs in ``good_examples`` only.
    lines = []
    for ex in range(4):
        inter = 1.0 if ex in good_examples else -1.0
        for c, i, v in ((0, 0, inter), (0, 1, 0.0), (1, 0, 5.0), (1, 1, 5.0)):
            lines.append(json.dumps({"label": f"{ex}_c{c}_i{i}", "score": v}))
    (job / "winoground_scores.jsonl").write_text("\n".join(lines) + "\n")


def test_study_report_tables_means_and_stds_per_loss(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("study_report", REPO / "experiments/synthetic_study/report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    from cacr.data.synthetic import SyntheticConfig, ensure_synthetic

    world = ensure_synthetic(SyntheticConfig(**STUDY_WORLD), tmp_path / "world")
    tags = [json.loads(x)["collapsed_tag"] for x in open(world.winoground_examples)]
    assert tags == ["Relation", "Object", "Relation", "Object"]
    for seed, (text, rel, r1, good) in enumerate([(10.0, 20.0, 30.0, {0, 1, 2, 3}), (20.0, 40.0, 50.0, {0, 1})]):
        _fake_job(tmp_path / "a", tmp_path / "world", "cacr", seed, text, rel, r1, good)
    _fake_job(tmp_path / "b", tmp_path / "world", "none", 0, 5.0, 6.0, 7.0, set())
    assert report.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out")]) == 0
    lines = (tmp_path / "out" / "table.md").read_text().splitlines()
    none_row, cacr_row = lines[2].split(" | "), lines[3].split(" | ")  # rows in the study's loss order
    assert none_row[0] == "| none" and cacr_row[0] == "| cacr" and cacr_row[1] == "0,1"
    header = lines[0].split(" | ")
    assert cacr_row[header.index("all text")] == "15.0 ± 7.1"  # mean and sample std of 10 and 20
    assert cacr_row[header.index("Relation text")] == "30.0 ± 14.1"
    assert cacr_row[header.index("Object text")] == "0.0 ± 0.0"
    assert cacr_row[header.index("ir_r1")] == "40.0 ± 14.1" and none_row[header.index("ir_r1")] == "7.0"
    assert cacr_row[header.index("all binding")] == "75.0 ± 35.4"  # 100 and 50 percent
    assert cacr_row[header.index("Relation binding")] == "75.0 ± 35.4"  # examples 0 and 2
    assert none_row[header.index("all binding")] == "0.0"
    assert (tmp_path / "out" / "scores.png").stat().st_size > 0 and (tmp_path / "out" / "curves.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="no job folders"):
        report.main([str(tmp_path / "empty")])
    (tmp_path / "b" / "running" / ".hydra").mkdir(parents=True)
    with pytest.raises(SystemExit, match="running: missing results.json"):
        report.main([str(tmp_path / "b")])
    assert report.main([str(tmp_path / "b"), "--allow-missing", "--out", str(tmp_path / "part")]) == 0
    assert len((tmp_path / "part" / "table.md").read_text().splitlines()) == 3  # header, rule, the finished job


# ------------------------------------------------------------------ pre-training objective and ablations


def _small_module(**kw):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model.config.hidden_size=32", "model.config.intermediate_size=64",
                                          "model.config.initializer_range=0.3", "recipe=none"])
    model = instantiate(cfg.model)
    reg_kw = kw.pop("reg", {})
    reg = instantiate(cfg.loss, schedule="constant", **reg_kw)
    return RetrievalModule(model, reg, num_negatives=2, mining=False, ranking="softmax", **kw)


MASK_ID = 4  # the synthetic vocabulary's [MASK]


def _with_tokenizer(module):
    module._mask_token_id = MASK_ID  # no trainer to read it from
    return module


def test_mask_words_corrupts_only_words_at_the_rate_asked(tiny_dm):
    module = _with_tokenizer(_small_module(mlm_weight=1.0, mlm_prob=0.15))
    store = tiny_dm.pair_store("train")
    caps = torch.arange(0, 600) % store.input_ids.shape[0]
    pos = store.batch(caps, tiny_dm.split("train").txt2img[caps])
    torch.manual_seed(0)
    masked, chosen = module.mask_words(pos)
    n = chosen.shape[1]
    assert not (chosen & ~pos.word_mask).any() and chosen.any(1).all()  # words only; >= 1 per caption
    before, after = pos.input_ids, masked.input_ids
    assert torch.equal(before[:, 0], after[:, 0]) and torch.equal(before[:, 1 + n:], after[:, 1 + n:])
    assert torch.equal(before[:, 1:1 + n][~chosen], after[:, 1:1 + n][~chosen])  # [SEP], padding, unchosen words
    rate = chosen.sum() / pos.word_mask.sum()
    assert 0.15 < rate < 0.30  # 15%, plus the forced one in captions that drew none
    to_mask = (after[:, 1:1 + n][chosen] == MASK_ID).float().mean()
    assert 0.72 < to_mask < 0.88


def _positives(dm, captions):
    """Training captions, their images and the batch of those positive pairs."""
    caps = torch.tensor(captions)
    imgs = dm.split("train").txt2img[caps]
    return caps, imgs, dm.pair_store("train").batch(caps, imgs)


def test_masked_lm_equals_one_caption_at_a_time(tiny_dm):
    module = _with_tokenizer(_small_module(mlm_weight=1.0, mlm_prob=0.3))
    module.eval()
    caps, imgs, pos = _positives(tiny_dm, [0, 7, 13, 21])
    torch.manual_seed(5)
    masked, chosen = module.mask_words(pos)
    torch.manual_seed(5)
    loss, acc = module.masked_lm(pos)
    split = tiny_dm.split("train")
    nll, hits = [], []
    for b in range(4):
        ex = split.pair(int(caps[b]), int(imgs[b]))
        t = ex.input_ids.numel()
        ids = masked.input_ids[b, :t]  # this caption's corrupted tokens, [CLS] .. [SEP]
        one = collate([ex._replace(input_ids=ids)])
        hidden, _, _ = module.model.uniter(one)
        for j in chosen[b].nonzero().flatten().tolist():
            logits = module.cls(hidden[0, 1 + j][None]).float()
            target = ex.input_ids[1 + j][None]
            nll.append(torch.nn.functional.cross_entropy(logits, target))
            hits.append(float(logits.argmax(-1) == target))
    assert float(loss.detach()) == pytest.approx(float(torch.stack(nll).mean().detach()), abs=1e-5)
    assert float(acc) == pytest.approx(sum(hits) / len(hits))


def test_regularizing_all_layers_averages_the_per_layer_losses(tiny_dm):
    batch = _batches(tiny_dm)[2]
    got = {}
    for layers in ("all", "last", "penultimate"):
        torch.manual_seed(0)
        m = _small_module(reg={"layers": layers})
        m.stores["train"] = tiny_dm.pair_store("train")
        m.eval()
        got[layers] = float(m.compute_losses(batch, step=3, total_steps=10)["reg_loss"])
    assert got["last"] != pytest.approx(got["penultimate"])
    assert got["all"] == pytest.approx((got["last"] + got["penultimate"]) / 2, abs=1e-6)


def test_mlm_focus_words_are_always_masked(tiny_dm):
    module = _with_tokenizer(_small_module(mlm_weight=1.0, mlm_prob=0.15, mlm_focus=["left", "right"]))
    vocab = tiny_dm.tokenizer.token_to_id
    module._focus_ids = torch.tensor([vocab["left"], vocab["right"]])  # no trainer to read the vocabulary from
    store = tiny_dm.pair_store("train")
    caps = torch.arange(store.input_ids.shape[0])
    pos = store.batch(caps, tiny_dm.split("train").txt2img[caps])
    torch.manual_seed(1)
    _, chosen = module.mask_words(pos)
    words = pos.input_ids[:, 1:1 + chosen.shape[1]]
    focus = (words == vocab["left"]) | (words == vocab["right"])
    assert focus.any() and chosen[focus].all()
    others = pos.word_mask & ~focus
    assert chosen[others].float().mean() < 0.3  # the rest at about mlm_prob


# ------------------------------------------------------------------ explicit inputs, validation


def test_the_module_needs_its_data_given_explicitly(tiny_dm):
    module = _small_module()
    with pytest.raises(ValueError, match=r"no train pairs; give them with attach\(train_store=\.\.\.\)"):
        module.store("train")
    with pytest.raises(ValueError, match=r"attach\(val_split=\.\.\.\)"):
        module.on_validation_epoch_end()
    with pytest.raises(ValueError, match=r"attach\(tokenizer=\.\.\.\)"):
        module.mask_token_id
    module.attach(train_store=tiny_dm.pair_store("train"), tokenizer=tiny_dm.tokenizer)
    assert module.store("train").input_ids.shape == tiny_dm.pair_store("train").input_ids.shape
    assert module.mask_token_id == tiny_dm.tokenizer.mask_id == MASK_ID


def test_validation_scores_only_the_dev_half_of_winoground(tiny_dm, monkeypatch):
    """The validation's Winoground metrics are the evaluator's on the dev examples, scored
    alone, and equal those of the whole set's scores restricted to the dev examples (what
    validation computed before it scored the dev half only)."""
    import cacr.module as module_file
    from cacr.evaluation.evaluators import evaluate_winoground
    from cacr.evaluation.winoground_metrics import METRICS, breakdown, winoground_correct
    from cacr.module import dev_examples

    wino = tiny_dm.winoground
    index = [e for e, ex in enumerate(wino.examples) if ex.extra["split"] == "dev"]
    assert 0 < len(index) < len(wino)
    module = _small_module(val_winoground=True).attach(winoground=wino)
    scored = []

    def spy(model, subset, **kw):
        scored.append([ex.key for ex in subset.examples])
        return evaluate_winoground(model, subset, **kw)

    monkeypatch.setattr(module_file, "evaluate_winoground", spy)
    got = module.winoground_dev_metrics()
    assert scored == [[wino.examples[e].key for e in index]]  # the dev examples only, once

    dev = dev_examples(wino)
    for j, e in enumerate(index):  # the subset holds the dev examples' captions and images
        for c in (0, 1):
            assert torch.equal(dev.texts[j][c], wino.texts[e][c])
            assert all(torch.equal(a, b) for a, b in zip(dev.image(2 * j + c), wino.image(2 * e + c)))
    module.model.eval()
    _, res = evaluate_winoground(module.model, dev, n_boot=0)
    assert {k: got[f"val/wino_{k}"] for k in METRICS} == {k: res[k] for k in METRICS}

    scores, _ = evaluate_winoground(module.model, wino, n_boot=0)  # the whole set, dev rows kept
    correct = {m: v[index] for m, v in winoground_correct(scores).items()}
    want = {f"val/wino_{m}": 100.0 * correct[m].double().mean().item() for m in METRICS}
    tags = [[wino.examples[e].collapsed_tag] for e in index]
    for tag, r in breakdown(correct, tags, n_boot=0).items():
        want.update({f"val/wino_{tag}_{m}": float(r[m]) for m in METRICS})
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


# ------------------------------------------------------------------ training precision


def test_training_precision_auto_follows_the_device_and_cpu_flags(tmp_path, monkeypatch):
    import cacr.precision as precision
    from cacr.train import build_trainer, training_precision

    cpu = {"accelerator": "cpu", "precision": "auto"}
    monkeypatch.setattr(precision, "cpu_flags", lambda cpuinfo=None: {"avx2", "avx512f"})
    assert training_precision(cpu) == ("32-true", "auto: CPU without AVX-512 BF16 or AMX (bf16 would be "
                                                  "emulated, slower than fp32)")
    trainer = build_trainer(compose_train(tmp_path, "trainer.precision=auto"), tmp_path, [], [])
    assert trainer.precision == "32-true"
    monkeypatch.setattr(precision, "cpu_flags", lambda cpuinfo=None: {"avx2", "amx_bf16", "amx_tile"})
    use, why = training_precision(cpu)
    assert use == "bf16-mixed" and "amx_bf16" in why
    assert build_trainer(compose_train(tmp_path, "trainer.precision=auto"), tmp_path, [], []).precision == "bf16-mixed"
    assert training_precision({"accelerator": "gpu", "precision": "auto"}) == ("bf16-mixed", "auto: CUDA device")
    assert training_precision({"accelerator": "cpu", "precision": "32-true"}) == ("32-true", "set explicitly")
    assert compose_train(tmp_path).trainer.precision == "32-true"  # the default is unchanged
    with pytest.raises(ConfigError, match="trainer.precision=auto: decided for the cpu, gpu, cuda and auto "):
        training_precision({"accelerator": "tpu", "precision": "auto"})


def test_masked_region_regression_equals_one_image_at_a_time(tiny_dm):
    module = _small_module(mrfr_weight=1.0, mrfr_prob=0.3).eval()
    caps, imgs, pos = _positives(tiny_dm, [1, 8, 15, 22])
    torch.manual_seed(6)
    masked, chosen = module.mask_regions(pos)
    torch.manual_seed(6)
    loss = module.masked_region_regression(pos)
    assert (chosen.sum(1) >= 1).all() and not (chosen & ~pos.region_mask).any()
    assert (masked.img_feat[chosen] == 0).all() and torch.equal(masked.img_feat[~chosen], pos.img_feat[~chosen])
    split = tiny_dm.split("train")
    errors = []
    for b in range(4):
        ex = split.pair(int(caps[b]), int(imgs[b]))
        m = ex.img_feat.shape[0]
        feat = ex.img_feat.clone()
        feat[chosen[b, :m]] = 0
        hidden, _, _ = module.model.uniter(collate([ex._replace(img_feat=feat)]))
        t = ex.input_ids.numel()
        for j in chosen[b].nonzero().flatten().tolist():  # region j sits after the t text tokens
            pred = module.feat_regress(hidden[0, t + j][None]).float()
            errors.append(((pred - ex.img_feat[j][None].float()) ** 2).mean())
    assert float(loss.detach()) == pytest.approx(float(torch.stack(errors).mean().detach()), rel=1e-4)


def test_word_region_ot_pulls_positives_and_pushes_negatives(tiny_dm):
    from cacr.ot import ot_distance

    batch = _batches(tiny_dm)[4]
    module = _small_module(wra_weight=0.5).eval()
    module.stores["train"] = tiny_dm.pair_store("train")
    torch.manual_seed(0)
    losses = module.compute_losses(batch, step=3, total_steps=10)
    torch.manual_seed(0)
    plain = _small_module().eval()
    plain.load_state_dict(module.state_dict())
    plain.stores["train"] = module.stores["train"]
    base = plain.compute_losses(batch, step=3, total_steps=10)
    assert float(losses["loss"]) == pytest.approx(float(base["loss"] + 0.5 * losses["wra_loss"]), abs=1e-5)
    # the WRA term is mean OT distance of the positives minus that of the negatives, pair by pair
    B, k = batch["cap_idx"].shape[0], 2
    cap, img = batch["cap_idx"], batch["img_idx"]
    caps = torch.cat([cap, cap.repeat_interleave(k), batch["neg_cap"][:, :k].flatten()])
    imgs = torch.cat([img, batch["neg_img"][:, :k].flatten(), img.repeat_interleave(k)])
    split = tiny_dm.split("train")
    d = []
    for c, i in zip(caps.tolist(), imgs.tolist()):
        ex = split.pair(c, i)
        hidden = module.model(collate([ex])).last_hidden[0]
        t, m = ex.input_ids.numel(), ex.img_feat.shape[0]
        ones = torch.ones(1, t - 2, dtype=torch.bool), torch.ones(1, m, dtype=torch.bool)
        d.append(ot_distance(hidden[None, 1:t - 1], hidden[None, t:t + m], *ones)[0])
    d = torch.stack(d)
    assert float(losses["wra_loss"]) == pytest.approx(float(d[:B].mean() - d[B:].mean()), abs=1e-4)


def test_the_optimizer_trains_the_pretraining_heads():
    module = _small_module(mlm_weight=1.0, mrfr_weight=1.0)
    params = {id(p) for g in _optimizer(module).param_groups for p in g["params"]}
    heads = [p for h in (module.cls, module.feat_regress) for p in h.parameters()]
    assert heads and all(id(p) in params for p in heads)
    assert params == {id(p) for p in module.parameters() if p.requires_grad}  # each once, tied ones too
    # Without heads the groups are the model's parameters in the order and split that
    # checkpoints written before the heads were trained hold (so those runs still resume).
    plain = _small_module()
    old_rule = ([], [])
    for name, p in plain.model.named_parameters():
        old_rule[name.endswith(".bias") or "LayerNorm." in name or "layer_norm." in name].append(id(p))
    assert [[id(p) for p in g["params"]] for g in _optimizer(plain).param_groups] == list(old_rule)


def _optimizer(module):
    class _Trainer:  # configure_optimizers reads the schedule length from the trainer
        max_steps = 10
    module._trainer = _Trainer()
    try:
        out = module.configure_optimizers()
    finally:
        module._trainer = None
    return out[0][0] if isinstance(out, tuple) else (out["optimizer"] if isinstance(out, dict) else out)


def test_eval_batch_size_auto_follows_the_device_and_width():
    from cacr.model import UniterConfig, UniterForImageTextRetrieval
    from cacr.module import RetrievalModule
    from cacr.regularizers import Regularizer

    def module(hidden, setting):
        cfg = UniterConfig(vocab_size=16, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=32, img_dim=8)
        return RetrievalModule(UniterForImageTextRetrieval(cfg), Regularizer("none", weight=0.0), eval_batch_size=setting)

    assert module(64, "auto").eval_batch_size == 64  # the evaluators' CPU choice for small models
    assert module(512, "auto").eval_batch_size == 16  # ... and for UNITER-base widths
    assert module(64, 33).eval_batch_size == 33
    assert module(64, 33).mining_batch_size == 1024  # the module's own default
    m = module(512, 33)
    m.hparams.mining_batch_size = "auto"
    assert m.mining_batch_size == 16  # on a CPU: as eval_batch_size's auto, whatever eval_batch_size is set to
    for bad in (0, "big", True):
        with pytest.raises(ValueError, match="module.eval_batch_size"):
            module(64, bad)
