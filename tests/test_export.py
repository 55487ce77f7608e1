"""Export to the official UNITER retrieval state dict (cacr/model/export.py): names and shapes
against the official shapes file, a plain strict load, the project's official-format loader
gives the same scores, dtypes, formats, atomic writes and refusal to overwrite."""
import json
import os
from pathlib import Path

import pytest
import torch

from cacr.model import UniterConfig, build_uniter, collate
from cacr.model.batch import PairExample
from cacr.model.config import BASE, LARGE
from cacr.model.export import (ExportError, export, main, official_config, official_shapes,
                               read_run_checkpoint)
from cacr.model.uniter import UniterForImageTextRetrieval

FIXTURES = Path(__file__).parent / "fixtures"
CFG = UniterConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   max_position_embeddings=40, img_dim=24, initializer_range=0.3)


@pytest.fixture(scope="module")
def run_ckpt(tmp_path_factory):
    """A .ckpt as train.py writes it: Lightning's keys, the model under 'model.', a trained
    rank head that differs from the ITM head's match row."""
    torch.manual_seed(3)
    model = build_uniter(CFG)
    path = tmp_path_factory.mktemp("run") / "best-step7.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model_config": CFG.to_dict(), "lr": 3e-4}, "global_step": 7,
                "optimizer_states": [{"state": {}}]}, path)
    return path, model.eval()


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ex = []
    for i in range(n):
        L, m = 3 + i % 4, 2 + i % 3
        xy = torch.rand(m, 2, generator=g) * 0.5
        wh = torch.rand(m, 2, generator=g) * 0.5 + 0.05
        ex.append(PairExample(torch.randint(5, CFG.vocab_size, (L,), generator=g),
                              torch.randn(m, CFG.img_dim, generator=g), torch.cat([xy, xy + wh, wh], 1)))
    return collate(ex, img_dim=CFG.img_dim)


def test_official_shapes_equal_the_shapes_file():
    ref = json.loads((FIXTURES / "uniter_state_dict_shapes.json").read_text())
    for name, cfg in (("base", BASE), ("large", LARGE)):
        got = {k: list(v) for k, v in official_shapes(cfg).items()}
        assert got == ref[name]
        assert list(got) == list(ref[name])  # the official order too
        # and this project's model has exactly those parameters
        assert {k: list(v.shape) for k, v in UniterForImageTextRetrieval(CFG).state_dict().items()} == \
            {k: list(v) for k, v in official_shapes(CFG).items()}


@pytest.mark.parametrize("dtype,fmt,atol", [("float32", "legacy", 0.0), ("float16", "zip", 2e-2),
                                            ("bfloat16", "legacy", 1.5e-1)])
def test_export_loads_back_with_the_same_scores(run_ckpt, tmp_path, dtype, fmt, atol):
    path, model = run_ckpt
    out = tmp_path / "cacr-tiny.pt"
    info = export(path, out, dtype=dtype, fmt=fmt)
    assert info["tensors"] == len(official_shapes(CFG))
    assert (out.read_bytes()[:2] == b"PK") == (fmt == "zip")  # legacy: PyTorch's pre-1.6 serialization

    sd = torch.load(out, map_location="cpu", weights_only=True)
    assert type(sd).__name__ in ("OrderedDict", "dict")
    assert {k: tuple(v.shape) for k, v in sd.items()} == dict(official_shapes(CFG))
    assert list(sd) == list(official_shapes(CFG))
    assert {v.dtype for v in sd.values()} == {getattr(torch, dtype)}
    cfg_json = json.loads((tmp_path / "cacr-tiny.json").read_text())
    assert cfg_json == official_config(CFG) and "img_dim" not in cfg_json

    # what the public code does: build from its config JSON, load the dict as it is
    plain = UniterForImageTextRetrieval(UniterConfig(**cfg_json, img_dim=CFG.img_dim)).eval()
    result = plain.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # the project's official-format loader
    loaded = build_uniter(config_json=tmp_path / "cacr-tiny.json", checkpoint=out, img_dim=CFG.img_dim).eval()
    assert not loaded.load_report.rank_from_itm  # the fine-tuned rank head is kept
    b = batch()
    with torch.no_grad():
        want = {h: model.score(b, head=h) for h in ("rank", "itm")}
        for m in (plain, loaded):
            for h in ("rank", "itm"):
                torch.testing.assert_close(m.score(b, head=h), want[h], atol=atol, rtol=0)


def test_rank_into_itm_for_the_public_inference_script(run_ckpt, tmp_path):
    path, model = run_ckpt
    export(path, tmp_path / "a.pt", rank_into_itm=True)
    sd = torch.load(tmp_path / "a.pt", weights_only=True)
    torch.testing.assert_close(sd["itm_output.weight"][1], model.rank_output.weight[0].detach(), atol=0, rtol=0)
    torch.testing.assert_close(sd["itm_output.bias"][1:], model.rank_output.bias.detach(), atol=0, rtol=0)
    torch.testing.assert_close(sd["itm_output.weight"][0], model.itm_output.weight[0].detach(), atol=0, rtol=0)
    # re-initialising rank_output from itm_output row 1 (as the public script does) changes nothing
    m = build_uniter(CFG)
    m.load_state_dict(sd)
    m.init_rank_from_itm()
    with torch.no_grad():
        torch.testing.assert_close(m.eval().score(batch()), model.score(batch()), atol=1e-6, rtol=0)


def test_refuses_to_overwrite_and_writes_atomically(run_ckpt, tmp_path):
    path, _ = run_ckpt
    out = tmp_path / "m.pt"
    export(path, out)
    before = out.read_bytes()
    with pytest.raises(ExportError, match="exists; pass --overwrite"):
        export(path, out, dtype="float16")
    with pytest.raises(ExportError, match="is the checkpoint being exported"):
        export(path, path, overwrite=True)
    assert out.read_bytes() == before
    export(path, out, dtype="float16", overwrite=True)
    assert out.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.pt"]  # no temporary files left
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # the usual mode, not mkstemp's 0600


def test_bad_input_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "none.ckpt"), str(tmp_path / "o.pt")]) == 2
    assert capsys.readouterr().err.strip() == f"cacr.model.export: {tmp_path / 'none.ckpt'}: checkpoint not found"
    plain = tmp_path / "official.pt"
    torch.save(build_uniter(CFG).state_dict(), plain)
    assert main([str(plain), str(tmp_path / "o.pt")]) == 2
    assert "no hyper_parameters['model_config']" in capsys.readouterr().err
    bad = tmp_path / "bad.ckpt"
    state = {"model." + k: v for k, v in build_uniter(CFG).state_dict().items() if "pooler" not in k}
    torch.save({"state_dict": state, "hyper_parameters": {"model_config": CFG.to_dict()}}, bad)
    with pytest.raises(ExportError, match="uniter.pooler.dense.weight"):
        export(bad, tmp_path / "o.pt")
    assert not (tmp_path / "o.pt").exists()


def test_cli_prints_summary(run_ckpt, tmp_path, capsys):
    path, _ = run_ckpt
    assert main([str(path), str(tmp_path / "x.pt"), "--dtype", "float16"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'x.pt'}" in out and "float16" in out and "img_dim=24" in out
    cfg, state = read_run_checkpoint(path)
    assert cfg == CFG and len(state) == len(official_shapes(CFG))


def _public_retrieval_class():
    """The public UNITER code's ``UniterForImageTextRetrieval`` from a checkout named by
    ``UNITER_PUBLIC_CODE`` (its repository root); ``None`` where it is absent."""
    import importlib
    import sys

    root = os.environ.get("UNITER_PUBLIC_CODE")
    if not root or not (Path(root) / "model" / "itm.py").is_file():
        return None
    sys.path.insert(0, root)
    try:
        return importlib.import_module("model.itm").UniterForImageTextRetrieval
    except ImportError as e:  # e.g. its apex or horovod imports
        pytest.skip(f"the public UNITER code at {root} does not import here: {e}")
    finally:
        sys.path.remove(root)


def test_public_inf_itm_keeps_the_fine_tuned_head_only_with_rank_into_itm(run_ckpt, tmp_path):
    """With the public code present (UNITER_PUBLIC_CODE=<checkout>): load the export as its
    inf_itm.py does (from_pretrained, then init_output(), since 'rank_output' is never a key
    of a state dict) and compare its rank head with the fine-tuned one."""
    public = _public_retrieval_class()
    if public is None:
        pytest.skip("the public UNITER code is absent (set UNITER_PUBLIC_CODE to a checkout to run this)")
    path, model = run_ckpt
    for flag in (True, False):
        out = tmp_path / f"e{flag}.pt"
        export(path, out, rank_into_itm=flag, fmt="zip")
        sd = torch.load(out, weights_only=True)
        assert "rank_output" not in sd  # so inf_itm.py always calls init_output()
        m = public.from_pretrained(str(out.with_suffix(".json")), sd, img_dim=CFG.img_dim)
        m.init_output()
        same = torch.equal(m.rank_output.weight.detach(), model.rank_output.weight.detach())
        assert same == flag
