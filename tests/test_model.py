"""UNITER model: official names and shapes, fused vs explicit attention, layouts, parity, bad input."""
import json
import math

import pytest
import torch

from cacr.model import (
    PairExample,
    UniterConfig,
    UniterForImageTextRetrieval,
    boxes_to_7d,
    collate,
    load_checkpoint,
)
from cacr.model.config import BASE, LARGE

from .conftest import FIXTURES

TINY = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=40, img_dim=16)


def random_examples(n, *, vocab=50, img_dim=16, max_t=12, max_m=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = int(torch.randint(1, max_t - 1, (1,), generator=g))
        m = int(torch.randint(1, max_m + 1, (1,), generator=g))
        ids = torch.cat([torch.tensor([1]), torch.randint(3, vocab, (t,), generator=g), torch.tensor([2])])
        xy = torch.rand(m, 2, generator=g) * 0.5
        wh = torch.rand(m, 2, generator=g) * 0.5 + 0.01
        boxes = torch.cat([xy, xy + wh], dim=1)
        out.append(PairExample(ids, torch.randn(m, img_dim, generator=g), boxes_to_7d(boxes)))
    return out


def tiny_model(**kw):
    return UniterForImageTextRetrieval(UniterConfig(**{**TINY, **kw})).eval()


def parity_examples(d):
    i = d["inputs"]
    return [
        PairExample(i["input_ids"][b, :t], i["img_feat"][b, :m], i["img_pos_feat"][b, :m])
        for b, (t, m) in enumerate(zip(d["txt_lens"], d["num_bbs"]))
    ]


@pytest.mark.parametrize("size,cfg", [("base", BASE), ("large", LARGE)])
def test_every_official_name_and_shape(size, cfg):
    want = json.loads((FIXTURES / "uniter_state_dict_shapes.json").read_text())[size]
    with torch.device("meta"):
        model = UniterForImageTextRetrieval(cfg)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == want
    assert not list(model.buffers())


@pytest.mark.parametrize("layout", ["compact", "padded"])
def test_fused_and_explicit_attention_agree(layout):
    model = tiny_model()
    batch = collate(random_examples(7), layout=layout)
    with torch.no_grad():
        fused = model(batch, score_rows=torch.tensor([0, 3, 6]))
        model.set_attn_impl("eager")
        explicit = model(batch, score_rows=torch.tensor([0, 3, 6]))
    valid = batch.attn_mask[..., None]
    assert (fused.last_hidden - explicit.last_hidden).mul(valid).abs().max() < 1e-5
    assert (fused.rank_logits - explicit.rank_logits).abs().max() < 1e-5
    assert (fused.itm_logits - explicit.itm_logits).abs().max() < 1e-5
    assert torch.allclose(fused.last_scores, explicit.last_scores, atol=1e-5)


def test_scores_of_chosen_rows_leave_outputs_alone_and_match_a_manual_computation():
    model = tiny_model()
    batch = collate(random_examples(5))
    rows = torch.tensor([4, 1])
    with torch.no_grad():
        plain = model(batch)
        with_scores = model(batch, score_rows=rows)
    assert plain.last_scores is None
    assert torch.equal(plain.last_hidden, with_scores.last_hidden)
    assert with_scores.last_scores.shape == (2, 4, batch.attn_mask.shape[1], batch.attn_mask.shape[1])
    assert with_scores.last_scores.dtype == torch.float32

    # Recompute the last layer's QK^T / sqrt(d) from the hidden states entering it.
    captured = {}
    last = model.uniter.encoder.layer[-1]
    h = last.register_forward_pre_hook(lambda mod, args: captured.update(x=args[0]))
    with torch.no_grad():
        model(batch)
        h.remove()
        x = captured["x"][rows]
        att = last.attention.self
        q = att.query(x).view(2, -1, 4, 8).transpose(1, 2)
        k = att.key(x).view(2, -1, 4, 8).transpose(1, 2)
        ref = q @ k.transpose(-1, -2) / math.sqrt(8)
    assert torch.allclose(with_scores.last_scores, ref, atol=1e-5)


def test_compact_and_padded_layouts_give_the_same_outputs():
    model = tiny_model()
    long_text, many_regions = random_examples(2, max_t=30, max_m=2, seed=7)[0], random_examples(1, max_t=4, max_m=20)[0]
    examples = random_examples(9, seed=3) + [long_text, many_regions]
    compact, padded = collate(examples, layout="compact"), collate(examples, layout="padded")
    assert compact.attn_mask.shape[1] < padded.attn_mask.shape[1]
    with torch.no_grad():
        a, b = model(compact), model(padded)
    assert torch.allclose(a.rank_logits, b.rank_logits, atol=1e-5)
    assert torch.allclose(a.pooled, b.pooled, atol=1e-5)
    # The same words and regions sit at word_index / region_index in either layout.
    for idx, mask in (("word_index", "word_mask"), ("region_index", "region_mask")):
        ha = torch.gather(a.last_hidden, 1, getattr(compact, idx)[..., None].expand(-1, -1, 32))
        hb = torch.gather(b.last_hidden, 1, getattr(padded, idx)[..., None].expand(-1, -1, 32))
        assert torch.equal(getattr(compact, mask), getattr(padded, mask))
        assert (ha - hb).mul(getattr(compact, mask)[..., None]).abs().max() < 1e-5


def test_batch_index_tensors_point_at_each_examples_words_and_regions():
    examples = random_examples(6, seed=5)
    for layout in ("compact", "padded"):
        batch = collate(examples, layout=layout)
        # Rebuild the joint sequence of token ids (regions as -1 - region number).
        Lt = batch.input_ids.shape[1]
        joint_src = torch.cat([batch.input_ids, -1 - torch.arange(batch.img_feat.shape[1]).expand(len(examples), -1)], 1)
        joint = joint_src if batch.gather_index is None else torch.gather(joint_src, 1, batch.gather_index)
        for b, ex in enumerate(examples):
            m = ex.img_feat.shape[0]
            assert joint[b][batch.attn_mask[b]].tolist() == ex.input_ids.tolist() + [-1 - r for r in range(m)]
            words = joint[b, batch.word_index[b][batch.word_mask[b]]]
            assert words.tolist() == ex.input_ids[1:-1].tolist()
            regions = joint[b, batch.region_index[b][batch.region_mask[b]]]
            assert regions.tolist() == [-1 - r for r in range(m)]
        assert Lt == max(ex.input_ids.numel() for ex in examples)


@pytest.mark.parametrize("layout", ["compact", "padded"])
def test_parity_with_the_public_code(parity, tmp_path, layout):
    d = parity
    path = tmp_path / "parity_model.pt"
    torch.save(d["state_dict"], path)
    model = UniterForImageTextRetrieval(UniterConfig(**d["config"], img_dim=d["img_dim"])).eval()
    report = load_checkpoint(model, path)
    assert report.ok and not report.rank_from_itm
    batch = collate(parity_examples(d), layout=layout)
    with torch.no_grad():
        out = model(batch)
    e = d["expected"]
    assert (out.rank_logits - e["rank_scores"]).abs().max() < 1e-5
    assert (out.itm_logits - e["itm_logits"]).abs().max() < 1e-5
    assert (out.pooled - e["pooled"]).abs().max() < 1e-5
    if layout == "compact":
        assert torch.equal(batch.attn_mask, d["inputs"]["attn_masks"].bool())
        valid = batch.attn_mask[..., None]
        assert ((out.last_hidden - e["last_hidden"]) * valid).abs().max() < 1e-5
    with torch.no_grad():
        assert torch.allclose(model.score(batch), e["rank_scores"], atol=1e-5)
        itm = e["itm_logits"]
        assert torch.allclose(model.score(batch, head="itm"), itm[:, 1] - itm[:, 0], atol=1e-5)


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    model = tiny_model()
    batch = collate(random_examples(6))
    with torch.no_grad():
        ref = model(batch, score_rows=torch.arange(6))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(batch, score_rows=torch.arange(6))
    assert low.last_scores.dtype == torch.float32
    assert torch.isfinite(low.rank_logits.float()).all()
    assert (low.rank_logits.float() - ref.rank_logits).abs().max() < 0.05
    assert (low.pooled.float() - ref.pooled).abs().max() < 0.05


@pytest.mark.parametrize("head", ["rank", "itm"])
def test_scores_are_not_rounded_to_bf16_under_autocast(head):
    # Winoground outcomes and rankings turn on score differences of ~0.01 at logits of ~5,
    # where bf16 steps are 1/32: the pooler and heads run in the weights' precision, so only
    # the encoder's rounding reaches the scores.
    model = tiny_model()
    with torch.no_grad():
        model.rank_output.bias.fill_(5.0)
        model.itm_output.bias.copy_(torch.tensor([-2.5, 2.5]))
    batch = collate(random_examples(64))
    with torch.no_grad():
        ref = model.score(batch, head=head)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.score(batch, head=head)
            out = model(batch)
    assert low.dtype == out.rank_logits.dtype == out.itm_logits.dtype == out.pooled.dtype == torch.float32
    on_bf16_grid = low == low.to(torch.bfloat16).float()
    assert on_bf16_grid.float().mean() < 0.2  # a bf16 head output would lie on the grid everywhere
    assert (low - ref).abs().max() < 2e-3  # half a bf16 step at 5 is 1.6e-2


def test_gradients_reach_every_used_parameter():
    model = tiny_model().train()
    out = model(collate(random_examples(4)), score_rows=torch.arange(4))
    (out.rank_logits.sum() + out.itm_logits.sum() + out.last_scores.mean()).backward()
    unused = {"uniter.img_embeddings.mask_embedding.weight"}
    for name, p in model.named_parameters():
        if name not in unused:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_boxes_4d_and_6d_are_completed_to_7d():
    b4 = torch.tensor([[0.1, 0.2, 0.5, 0.6]])
    want = torch.tensor([[0.1, 0.2, 0.5, 0.6, 0.4, 0.4, 0.16]])
    assert torch.allclose(boxes_to_7d(b4), want)
    assert torch.allclose(boxes_to_7d(want[:, :6]), want)
    assert torch.equal(boxes_to_7d(want), want)


def _one(ids=(1, 5, 2), m=3, dim=16, box_dim=7):
    return PairExample(torch.tensor(ids), torch.randn(m, dim), torch.rand(m, box_dim))


@pytest.mark.parametrize(
    "bad,message",
    [
        (_one(dim=12), "example 1: region features have width 12, expected img_dim=16"),
        (_one(box_dim=5), "example 1: expected boxes of shape (m, 7), (m, 6) or (m, 4)"),
        (_one(ids=list(range(41))), "example 1: text of 41 tokens is longer than max_position_embeddings=40"),
        (_one(ids=(1, 2)), "example 1: empty text"),
        (_one(m=0), "example 1: zero regions"),
    ],
)
def test_bad_input_names_the_example(bad, message):
    with pytest.raises(ValueError) as err:
        collate([_one(), bad], img_dim=16, max_txt_positions=40)
    assert message in str(err.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_features_are_rejected(value):
    bad = _one()
    bad.img_feat[2, 4] = value
    with pytest.raises(ValueError, match=r"example 1: NaN or Inf in region features \(rows \[2\]\)"):
        collate([_one(), bad])


def test_model_rejects_a_batch_of_the_wrong_width_or_length():
    model = tiny_model()
    with pytest.raises(ValueError, match="img_dim=16"):
        model(collate([_one(dim=8)]))
    with pytest.raises(ValueError, match="max_position_embeddings=40"):
        model(collate([_one(ids=list(range(45)))]))


def test_config_reads_an_official_json(tmp_path):
    official = {
        "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 4096,
        "max_position_embeddings": 512, "num_attention_heads": 16, "num_hidden_layers": 24,
        "type_vocab_size": 2, "vocab_size": 28996,
    }
    path = tmp_path / "uniter-large.json"
    path.write_text(json.dumps(official))
    assert UniterConfig.from_json(path) == LARGE
    path.write_text(json.dumps({**official, "hidden_szie": 3}))
    with pytest.raises(ValueError, match=r"uniter-large.json: unknown UNITER config field\(s\) \['hidden_szie'\]"):
        UniterConfig.from_json(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_fused_and_explicit_attention_agree_on_gpu_in_bf16():
    model = tiny_model().cuda()
    batch = collate(random_examples(16)).to("cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fused = model(batch).rank_logits.float()
        model.set_attn_impl("eager")
        explicit = model(batch).rank_logits.float()
    assert (fused - explicit).abs().max() < 2e-2


def test_scorer_gives_score_with_its_head_and_caches_the_compiled_one():
    model = tiny_model()
    batch = collate(random_examples(6, seed=3))
    with torch.no_grad():
        for head in ("rank", "itm"):
            assert torch.equal(model.scorer(head)(batch), model.score(batch, head=head))
    # Compilation is lazy (first call) and happens once per model and head; its numerics are
    # checked on a GPU by experiments/benchmark.py --compile (compiling on 2 CPU cores takes minutes).
    assert model.scorer(compile=True) is model.scorer(compile=True)
    assert model.scorer("itm", compile=True) is not model.scorer("rank", compile=True)
    with pytest.raises(ValueError, match="head must be 'rank' or 'itm'"):
        model.scorer("match")
