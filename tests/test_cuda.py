"""CUDA checks (skipped without a GPU; run by experiments/gpu_check.py): the public code's
outputs and losses on the GPU in fp32 and under bf16 autocast, fused against explicit
attention, and a training step (mining plan, packed batch, regularizer, backward) that never
synchronises with the host."""
import warnings

import pytest
import torch

from cacr.model import PairExample, PairStore, UniterConfig, UniterForImageTextRetrieval, collate
from cacr.module import RetrievalModule
from cacr.regularizers import Regularizer

from .test_model import random_examples

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LOSS_KEYS = {"cacr": "soft", "iais_singular": "singular", "iais_distributed": "distributed"}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def parity_model_and_examples(d):
    model = UniterForImageTextRetrieval(UniterConfig(**d["config"], img_dim=d["img_dim"]))
    model.load_state_dict(d["state_dict"])
    i = d["inputs"]
    examples = [PairExample(i["input_ids"][b, :t], i["img_feat"][b, :m], i["img_pos_feat"][b, :m])
                for b, (t, m) in enumerate(zip(d["txt_lens"], d["num_bbs"]))]
    return model.cuda().eval(), examples


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["compact", "padded"])
def test_public_code_outputs_and_losses_on_cuda(parity, bf16, layout):
    model, examples = parity_model_and_examples(parity)
    batch = collate(examples, layout=layout).to("cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = model(batch, score_rows=torch.arange(len(examples), device="cuda"))
    assert out.last_scores.dtype == torch.float32  # the regularizers always get fp32 scores
    tol = 0.1 if bf16 else 1e-4  # bf16 keeps ~3 digits; the ITM logits (|x| ~ 1) moved by up to 0.063 on an H200
    exp = parity["expected"]
    assert (out.rank_logits.float().cpu() - exp["rank_scores"]).abs().max() < tol
    assert (out.itm_logits.float().cpu() - exp["itm_logits"]).abs().max() < tol
    for name, key in LOSS_KEYS.items():
        reg = Regularizer(name)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = reg(*reg.blocks(out.last_scores, batch.word_index, batch.word_mask, batch.region_index,
                                   batch.region_mask)).loss
        assert loss.dtype == torch.float32
        want = parity["expected_losses"][key]
        assert abs(loss.item() - want) < (0.05 * abs(want) if bf16 else 1e-4), (name, bf16, loss.item(), want)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_fused_and_explicit_attention_agree_on_cuda(bf16):
    model = UniterForImageTextRetrieval(UniterConfig(vocab_size=50, hidden_size=64, num_hidden_layers=3,
                                                     num_attention_heads=4, intermediate_size=128, img_dim=16,
                                                     max_position_embeddings=40)).cuda().eval()
    batch = collate(random_examples(32, seed=5)).to("cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        fused = model(batch).rank_logits.float()
        model.set_attn_impl("eager")
        explicit = model(batch).rank_logits.float()
    assert (fused - explicit).abs().max() < (2e-2 if bf16 else 1e-5)


def _store_and_batch(B=4, K=12, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ex = random_examples(n, seed=seed, max_t=14, max_m=10)
    store = PairStore.from_examples([e.input_ids for e in ex], [(e.img_feat, e.img_pos_feat) for e in ex])
    cap = torch.randperm(n, generator=g)[:B]
    neg = torch.randint(0, n - 1, (2, B, K), generator=g)
    neg = neg + (neg >= cap[None, :, None]).long()
    batch = {"cap_idx": cap, "img_idx": cap.clone(), "neg_img": neg[0], "neg_cap": neg[1],
             "max_txt_len": torch.tensor(14), "max_regions": torch.tensor(10)}
    return store, batch


@pytest.mark.parametrize("reg", ["cacr", "iais_singular", "iais_distributed"])
def test_training_step_never_synchronises_on_cuda(reg):
    store, batch = _store_and_batch()
    model = UniterForImageTextRetrieval(UniterConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=128, img_dim=16,
                                                     max_position_embeddings=40))
    module = RetrievalModule(model, Regularizer(reg), num_negatives=3, mining=True, mining_batch_size=16).cuda()
    module.stores["train"] = store.to("cuda")
    batch = module.prepare_batch(batch, module.stores["train"])
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    step = lambda: module.compute_losses(batch, step=5, total_steps=100)["loss"]  # noqa: E731
    with torch.autocast("cuda", dtype=torch.bfloat16):
        step().backward()  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step()
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # Each synchronising call warns "called a synchronizing CUDA operation" (the mode's own
    # notice that it is a prototype is not one).
    syncs = [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]
    assert not syncs, syncs
    assert torch.isfinite(loss).item()


def test_chunked_training_forward_matches_one_batch_on_cuda():
    """module.train_chunk_size set on a GPU (auto leaves it off there): the same losses and
    gradients as one padded batch, the widths read from device indices."""
    import copy

    store, batch = _store_and_batch()
    model = UniterForImageTextRetrieval(UniterConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=128, img_dim=16,
                                                     max_position_embeddings=40, hidden_dropout_prob=0.0,
                                                     attention_probs_dropout_prob=0.0))
    assert RetrievalModule(copy.deepcopy(model), Regularizer("cacr"), train_chunk_size="auto").cuda().train_chunk_size == 0
    grads = []
    for chunk in (0, 4):
        module = RetrievalModule(copy.deepcopy(model), Regularizer("cacr"), num_negatives=3, mining=True,
                                 mining_batch_size=16, train_chunk_size=chunk).cuda()
        module.stores["train"] = store.to("cuda")
        b = module.prepare_batch(batch, module.stores["train"])
        b = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        loss = module.compute_losses(b, step=5, total_steps=100)["loss"]
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in module.model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-4, rtol=1e-4)
    for n, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][n], g, atol=1e-4, rtol=1e-3, msg=n)


def test_compiled_scorer_matches_eager_on_cuda():
    """model.scorer(compile=True) (torch.compile, dynamic shapes) on batches of two widths."""
    model = UniterForImageTextRetrieval(UniterConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=128, img_dim=16,
                                                     max_position_embeddings=40)).cuda().eval()
    compiled = model.scorer(compile=True)
    with torch.no_grad():
        for seed, n in ((7, 24), (8, 9)):
            batch = collate(random_examples(n, seed=seed)).to("cuda")
            assert (compiled(batch) - model.score(batch)).abs().max() < 1e-4
