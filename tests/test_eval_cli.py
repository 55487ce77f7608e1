"""The evaluation command lines (cacr/evaluation/cli.py, eval_winoground.py, eval_retrieval.py)
end to end on a tiny synthetic world and a tiny random UNITER saved as this project's .ckpt:
scores against a per-pair slow twin, hand-made score files, bad input, 1 vs 2 processes."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from cacr.data import WinogroundSet, WordPieceTokenizer, open_data
from cacr.evaluation import cli
from cacr.evaluation.retrieval_metrics import retrieval_metrics
from cacr.evaluation.scorefile import load_score_matrix, read_score_file, read_winoground_examples, results_markdown
from cacr.model import UniterConfig, build_uniter, collate, load_checkpoint

from .conftest import REPO, synthetic_world
WORLD = dict(n_train=20, n_val=10, n_test=10, n_winoground=16)


def tiny_config(**kw) -> UniterConfig:
    # a wide init so that a random model's scores are far from additive (non-trivial Winoground scores)
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=64, img_dim=64, initializer_range=0.3)
    return UniterConfig(**{**base, **kw})


def save_ckpt(path: Path, cfg: UniterConfig, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_uniter(cfg)
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model_config": cfg.to_dict()}, "global_step": 7}, path)
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic_world(tmp_path_factory.mktemp("world"), WORLD)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_ckpt(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", tiny_config())


def make_cfg(name: str, overrides):
    """The evaluator's config; scoring in fp32 unless ``bf16=`` is given (``auto`` would pick
    bf16 on a CPU with AMX, and the scores are compared with fp32 twins)."""
    overrides = list(overrides)
    if not any(o.startswith("bf16=") for o in overrides):
        overrides.append("bf16=false")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def load_model(ckpt_path: Path):
    obj = torch.load(ckpt_path, weights_only=True)
    model = build_uniter(UniterConfig.from_dict(obj["hyper_parameters"]["model_config"]))
    load_checkpoint(model, obj["state_dict"])
    return model.eval()


def slow_score(model, pairs, head):
    """One forward per pair through the collate path (the obvious twin of the batched engine)."""
    with torch.no_grad():
        return torch.tensor([float(model.score(collate([p], img_dim=model.config.img_dim), head=head)) for p in pairs])


def strict_counts(s):
    """Text/image/group percentages by the definitions of docs/reference.md §5, one example at a time."""
    text = image = group = 0
    for (c0i0, c0i1), (c1i0, c1i1) in s.tolist():
        t = c0i0 > c1i0 and c1i1 > c0i1
        i = c0i0 > c0i1 and c1i1 > c1i0
        text, image, group = text + t, image + i, group + (t and i)
    return [100.0 * x / len(s) for x in (text, image, group)]


# --------------------------------------------------------------------------- Winoground with a model


@pytest.mark.parametrize("head", ["rank", "itm"])
def test_winoground_checkpoint_matches_slow_twin(world, ckpt, tmp_path, head, capsys):
    paths, data = world
    out = tmp_path / "out"
    cfg = make_cfg("winoground", data + [f"ckpt_path={ckpt}", f"head={head}", f"output={out}", "n_boot=200",
                                         "progress=false", "device=cpu", "batch_size=7"])
    res = cli.run_winoground(cfg)
    printed = capsys.readouterr().out

    examples = read_winoground_examples(paths.winoground_examples)
    scores = read_score_file(out / "winoground_scores.jsonl", examples)
    tok = WordPieceTokenizer.from_vocab_file(paths.vocab)
    wino = WinogroundSet(paths.winoground_examples, paths.winoground_regions, tok)
    model = load_model(ckpt)
    pairs = [wino.pair(e, c, i) for e in range(len(wino)) for c in (0, 1) for i in (0, 1)]
    slow = slow_score(model, pairs, head).view(-1, 2, 2)
    torch.testing.assert_close(scores.float(), slow, atol=1e-5, rtol=0)

    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert [saved[m] for m in ("text", "image", "group")] == pytest.approx(strict_counts(scores))
    assert 0 < saved["binding"] < 100  # a non-trivial outcome for this tiny model (on exact swaps, text and
    # image are often 0: each caption's and image's own effect outweighs the pair's)
    assert saved["n"] == len(examples) == 16 and saved["model"] == "tiny" and saved["head"] == head
    assert (saved["bf16"], saved["bf16_reason"]) == (False, "set explicitly")
    assert set(saved["ci95"]) == {"text", "image", "group", "binding"}
    assert set(saved["by_tag"]) == {"collapsed_tag", "num_main_preds", "secondary_tag"}
    assert sum(v["n"] for v in saved["by_tag"]["collapsed_tag"].values()) == 16
    table = (out / "results.md").read_text()
    assert table == results_markdown({"tiny": res})
    assert printed.startswith(table)


def test_winoground_official_file_through_model_group(world, tmp_path):
    """model=<option> model.checkpoint=<official-style .pt> with the zero-shot ITM head: a
    pre-training state dict (``bert.`` keys, ``gamma``/``beta``, fp16, no rank_output)."""
    paths, data = world
    small = ["model.config.hidden_size=32", "model.config.num_hidden_layers=2", "model.config.num_attention_heads=2",
             "model.config.intermediate_size=64", "model.config.initializer_range=0.3"]
    torch.manual_seed(1)
    model = build_uniter(tiny_config())
    official = {}
    for k, v in model.state_dict().items():
        if k.startswith("rank_output."):
            continue
        k = "bert." + k[len("uniter."):] if k.startswith("uniter.") else k
        k = k[: -len(".weight")] + ".gamma" if "LayerNorm.weight" in k else k
        k = k[: -len(".bias")] + ".beta" if "LayerNorm.bias" in k else k
        official[k] = v.half()
    torch.save(official, tmp_path / "uniter-tiny.pt")
    out = tmp_path / "out"
    cfg = make_cfg("winoground", data + small + ["model=uniter_tiny", f"model.checkpoint={tmp_path / 'uniter-tiny.pt'}",
                                                 "head=itm", f"output={out}", "n_boot=10", "progress=false",
                                                 "device=cpu"])
    res = cli.run_winoground(cfg)
    assert res["model"] == "uniter-tiny" and res["head"] == "itm"
    examples = read_winoground_examples(paths.winoground_examples)
    scores = read_score_file(out / "winoground_scores.jsonl", examples)
    reference = build_uniter(tiny_config())
    load_checkpoint(reference, {k: v.float() for k, v in official.items()})
    wino = WinogroundSet(paths.winoground_examples, paths.winoground_regions,
                         WordPieceTokenizer.from_vocab_file(paths.vocab))
    pairs = [wino.pair(e, c, i) for e in range(len(wino)) for c in (0, 1) for i in (0, 1)]
    torch.testing.assert_close(scores.float(), slow_score(reference.eval(), pairs, "itm").view(-1, 2, 2),
                               atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- Winoground from score files


def write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hand_examples(path: Path):
    tags = ["Object", "Relation", "Relation", "Both"]
    return write_jsonl(path, [dict(id=n, image_0=f"ex_{n}_img_0", image_1=f"ex_{n}_img_1", caption_0=f"a {n}",
                                   caption_1=f"{n} a", tag="t", secondary_tag="Symbolic" if n == 3 else "",
                                   num_main_preds=1 + (n == 2), collapsed_tag=tags[n]) for n in range(4)])


# [[s(c0,i0), s(c0,i1)], [s(c1,i0), s(c1,i1)]]: all correct, text only, image only, all ties
HAND = [[[2, 0], [0, 2]], [[3, 4], [0, 5]], [[3, 0], [4, 5]], [[1, 1], [1, 1]]]


def hand_scores(path: Path, s):
    return write_jsonl(path, [{"label": f"{n}_c{k}_i{j}", "score": s[n][k][j]}
                              for n in range(len(s)) for k in (0, 1) for j in (0, 1)])


def test_scorer_file_hand_made_cases(tmp_path, capsys):
    ex = hand_examples(tmp_path / "examples.jsonl")
    scores = hand_scores(tmp_path / "mine.jsonl", HAND)
    perfect = hand_scores(tmp_path / "perfect.jsonl", [[[1, 0], [0, 1]]] * 4)
    (tmp_path / "tags.json").write_text(json.dumps({"0": ["a"], "1": ["a", "b"]}))
    out = tmp_path / "out"
    cfg = make_cfg("winoground", ["scorer=file", f"scores={scores}", f"examples={ex}", f"output={out}",
                                  "n_boot=100", f"+tag_files.mine={tmp_path / 'tags.json'}",
                                  f"+compare.perfect={perfect}", "data.root=/nonexistent/never/read"])
    res = cli.run_winoground(cfg)
    assert (res["text"], res["image"], res["group"], res["n"]) == (50.0, 50.0, 25.0, 4)
    rel = res["by_tag"]["collapsed_tag"]["Relation"]
    assert (rel["text"], rel["image"], rel["group"], rel["n"]) == (50.0, 50.0, 0.0, 2)
    assert res["by_tag"]["secondary_tag"]["Symbolic"]["text"] == 0.0
    assert res["by_tag"]["num_main_preds"]["2"]["image"] == 100.0
    mine = res["by_tag"]["mine"]
    assert (mine["a"]["text"], mine["a"]["image"], mine["a"]["group"], mine["a"]["n"]) == (100.0, 50.0, 50.0, 2)
    assert (mine["b"]["text"], mine["b"]["image"], mine["b"]["n"]) == (100.0, 0.0, 1)
    assert [res["compare"]["perfect"][m] for m in ("text", "image", "group")] == [100.0, 100.0, 100.0]
    assert res["model"] == "mine" and res["scorer"] == "file"
    assert torch.equal(read_score_file(out / "winoground_scores.jsonl", list(range(4))),
                       torch.tensor(HAND, dtype=torch.float64))
    printed = capsys.readouterr().out
    assert "| mine | 4 | 50.00" in printed and "| perfect | 4 | 100.00" in printed and "By `mine`:" in printed


# --------------------------------------------------------------------------- bad input


def exit_message(name, overrides) -> str:
    cfg = make_cfg(name, overrides)
    fn = cli.run_winoground if name == "winoground" else cli.run_retrieval
    with pytest.raises(SystemExit) as e:
        cli.guarded(f"eval_{name}.py", fn, cfg)
    return str(e.value.code)


def test_bad_input_one_line_errors(world, ckpt, tmp_path):
    _, data = world
    ex = hand_examples(tmp_path / "examples.jsonl")
    rbase = data + [f"output={tmp_path / 'out'}", "progress=false", "device=cpu"]
    base = rbase + ["n_boot=10"]
    missing = tmp_path / "nope.ckpt"
    assert exit_message("winoground", base + [f"ckpt_path={missing}"]) == \
        f"eval_winoground.py: ckpt_path={missing}: checkpoint not found"
    assert exit_message("winoground", base + [f"ckpt_path={ckpt}", f"examples={tmp_path / 'no.jsonl'}"]) == \
        f"eval_winoground.py: examples={tmp_path / 'no.jsonl'}: file not found"
    assert "needs regions=PATH" in exit_message("winoground", base + [f"ckpt_path={ckpt}", f"examples={ex}"])
    assert "no model: give ckpt_path=" in exit_message("winoground", base)
    assert "head='best'" in exit_message("winoground", base + [f"ckpt_path={ckpt}", "head=best"])
    assert "model.checkpoint is not set" in exit_message("winoground", base + ["model=uniter_tiny"])
    assert "not both" in exit_message("winoground", base + [f"ckpt_path={ckpt}", "model=uniter_tiny",
                                                            f"model.checkpoint={ckpt}"])

    # an official-style state dict given as ckpt_path: no model config in it
    plain = tmp_path / "plain.pt"
    torch.save(build_uniter(tiny_config()).state_dict(), plain)
    assert "no hyper_parameters['model_config']" in exit_message("winoground", base + [f"ckpt_path={plain}"])
    small_vocab = save_ckpt(tmp_path / "v.ckpt", tiny_config(vocab_size=8))
    assert "the model embeds only 8" in exit_message("winoground", base + [f"ckpt_path={small_vocab}"])
    narrow = save_ckpt(tmp_path / "w.ckpt", tiny_config(img_dim=32))
    assert "width 64, the model expects img_dim=32" in exit_message("winoground", base + [f"ckpt_path={narrow}"])

    # score files: a missing label, a duplicate, malformed JSON (messages from scorefile.py, one line)
    short = hand_scores(tmp_path / "short.jsonl", HAND)
    short.write_text("".join(short.read_text().splitlines(keepends=True)[:-1]))
    msg = exit_message("winoground", ["scorer=file", f"scores={short}", f"examples={ex}", f"output={tmp_path}"])
    assert msg.startswith(f"eval_winoground.py: {short}: no score for label(s) ['3_c1_i1']")
    dup = hand_scores(tmp_path / "dup.jsonl", HAND)
    dup.write_text(dup.read_text() + json.dumps({"label": "0_c0_i0", "score": 1.0}) + "\n")
    assert "duplicate label '0_c0_i0' (first on line 1)" in exit_message(
        "winoground", ["scorer=file", f"scores={dup}", f"examples={ex}", f"output={tmp_path}"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"label": "0_c0_i0", "score": 1}\n{"label": \n')
    assert f"{bad}:2: malformed JSON" in exit_message(
        "winoground", ["scorer=file", f"scores={bad}", f"examples={ex}", f"output={tmp_path}"])
    assert "scorer=file needs scores=PATH" in exit_message(
        "winoground", ["scorer=file", f"examples={ex}", f"output={tmp_path}"])
    (tmp_path / "tags.json").write_text(json.dumps({"9": ["x"]}))
    assert "id '9' is not an id of the examples file" in exit_message(
        "winoground", ["scorer=file", f"scores={dup}", f"examples={ex}", f"output={tmp_path}",
                       f"+tag_files.t={tmp_path / 'tags.json'}"])

    assert "split='dev'" in exit_message("retrieval", rbase + [f"ckpt_path={ckpt}", "split=dev"])
    assert "end in .pt or .npz" in exit_message("retrieval", rbase + [f"ckpt_path={ckpt}", "save_scores=m.txt"])
    assert f"scores={tmp_path / 'm.pt'}: file not found" in exit_message("retrieval", rbase + [f"scores={tmp_path / 'm.pt'}"])
    assert "drop ckpt_path" in exit_message("retrieval", rbase + [f"scores={ex}", f"ckpt_path={ckpt}"])


def test_bad_input_exits_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "eval_winoground.py"), f"ckpt_path={tmp_path / 'x.ckpt'}",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=_env())
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"eval_winoground.py: ckpt_path={tmp_path / 'x.ckpt'}: checkpoint not found"
    assert "Traceback" not in proc.stderr


def test_distributed_env():
    assert cli.distributed_env({}) is None
    assert cli.distributed_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    master = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    torchrun = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", **master}
    assert cli.distributed_env(torchrun) == (3, 4, 1)
    lightning = {"WORLD_SIZE": "2", "LOCAL_RANK": "1", "NODE_RANK": "0", **master}
    assert cli.distributed_env(lightning) == (1, 2, 1)
    assert cli.distributed_env({"WORLD_SIZE": "4", "LOCAL_RANK": "1", "NODE_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                                **master}) == (3, 4, 1)
    with pytest.raises(cli.ConfigError, match="set RANK or LOCAL_WORLD_SIZE"):
        cli.distributed_env({"WORLD_SIZE": "4", "LOCAL_RANK": "1", "NODE_RANK": "1", **master})
    with pytest.raises(cli.ConfigError, match="MASTER_ADDR and MASTER_PORT not set"):
        cli.distributed_env({"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(cli.ConfigError, match="neither RANK nor LOCAL_RANK"):
        cli.distributed_env({"WORLD_SIZE": "2", **master})
    with pytest.raises(cli.ConfigError, match=r"rank 2 is outside \[0, WORLD_SIZE=2\)"):
        cli.distributed_env({"WORLD_SIZE": "2", "RANK": "2", **master})
    assert cli.select_device("cpu") == torch.device("cpu")
    with pytest.raises(cli.ConfigError, match="expected auto, cpu, cuda or cuda:N"):
        cli.select_device("tpu")


# --------------------------------------------------------------------------- retrieval


def test_retrieval_checkpoint_saved_matrix_and_recompute(world, ckpt, tmp_path, capsys):
    _, data = world
    matrix = tmp_path / "m.pt"
    cfg = make_cfg("retrieval", data + [f"ckpt_path={ckpt}", f"output={tmp_path / 'a'}", f"save_scores={matrix}",
                                        "progress=false", "device=cpu", "batch_size=33"])
    res = cli.run_retrieval(cfg)
    m = load_score_matrix(matrix)
    split = open_data(cfg.data).split("test")
    assert m.caption_ids == split.caption_ids and m.image_ids == split.image_ids
    assert m.scores.shape == (50, 10)
    model = load_model(ckpt)
    pairs = [split.pair(t, j) for t in range(split.num_texts) for j in range(split.num_images)]
    torch.testing.assert_close(m.scores, slow_score(model, pairs, "rank").view(50, 10), atol=1e-5, rtol=0)
    expected = retrieval_metrics(m.scores, split.txt2img)
    assert {k: res[k] for k in expected} == expected
    assert res["split"] == "test" and res["model"] == "tiny"
    assert res["batch_size"] == 33 and res["device"] == "cpu" and res["processes"] == 1 and res["pairs"] == 500
    secs = res["scoring_seconds"]  # rounded to 1 ms: at tens of ms that alone moves the rate by a few percent
    assert secs > 0 and res["pairs_per_s"] == pytest.approx(500 / secs, rel=1e-2 + 0.0006 / secs)
    assert json.loads((tmp_path / "a" / "results.json").read_text()) == json.loads(json.dumps(res))

    again = cli.run_retrieval(make_cfg("retrieval", [f"scores={matrix}", f"output={tmp_path / 'b'}"]))
    assert {k: again[k] for k in expected} == expected and again["model"] == "m"
    printed = capsys.readouterr().out
    assert printed.count("| model | captions | images | IR R@1 |") == 2
    assert f"| m | 50 | 10 | {expected['ir_r1']:.2f} |" in printed


# --------------------------------------------------------------------------- precision, output folders


def test_bf16_option_resolved_with_the_cpu_flags():
    from cacr.evaluation.inputs import scoring_bf16

    cpu = torch.device("cpu")
    assert scoring_bf16("auto", cpu, flags={"avx2", "fma"}) == \
        (False, "auto: CPU without AVX-512 BF16 or AMX (bf16 would be emulated, slower than fp32)")
    assert scoring_bf16("auto", cpu, flags={"avx2", "avx512_bf16"}) == \
        (True, "auto: CPU with native bf16 matrix support (avx512_bf16)")
    assert scoring_bf16("auto", cpu, flags={"amx_bf16"})[0] is True
    assert scoring_bf16("auto", torch.device("cuda", 0), flags=set()) == (True, "auto: CUDA device")
    assert scoring_bf16(True, cpu, flags=set()) == (True, "set explicitly")
    assert scoring_bf16("false", cpu, flags={"amx_bf16"}) == (False, "set explicitly")
    with pytest.raises(cli.ConfigError, match="bf16='fast': expected true, false or auto"):
        scoring_bf16("fast", cpu)


def test_batch_size_auto_follows_the_device_and_the_model_width():
    from cacr.evaluation.inputs import scoring_batch_size

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    base, small = build_uniter(tiny_config(hidden_size=768, num_attention_heads=12, intermediate_size=64)), \
        build_uniter(tiny_config())
    assert scoring_batch_size("auto", cpu, base) == 16 and scoring_batch_size("auto", cpu, small) == 64
    assert scoring_batch_size("auto", gpu, base) == scoring_batch_size("auto", gpu, small) == 512
    assert scoring_batch_size(7, cpu, base) == scoring_batch_size("7", cpu, base) == 7
    for bad in (0, -3, "big"):
        with pytest.raises(cli.ConfigError, match=f"batch_size={bad!r}: expected a positive number of pairs or auto"):
            scoring_batch_size(bad, cpu, base)
    for name in ("winoground", "retrieval", "multiple_choice"):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            assert compose(config_name=name).batch_size == "auto"


def test_bf16_auto_is_the_default_and_recorded(world, ckpt, tmp_path, caplog):
    from cacr.precision import resolve_bf16

    _, data = world
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="retrieval", overrides=data + [f"ckpt_path={ckpt}", f"output={tmp_path}",
                                                                 "progress=false", "device=cpu"])
    assert cfg.bf16 == "auto"
    with caplog.at_level("INFO"):
        res = cli.run_retrieval(cfg)
    use, why = resolve_bf16("auto", "cpu")  # this machine's CPU flags
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (res["bf16"], res["bf16_reason"]) == (saved["bf16"], saved["bf16_reason"]) == (use, why)
    assert f"scoring in {'bf16' if use else 'fp32'} ({why})" in caplog.text
    assert "scoring 64 pairs per forward (auto: CPU, hidden < 512)" in caplog.text


def test_overwrite_key_replaces_earlier_outputs(tmp_path):
    ex = hand_examples(tmp_path / "examples.jsonl")
    scores = hand_scores(tmp_path / "mine.jsonl", HAND)
    run = ["scorer=file", f"scores={scores}", f"examples={ex}", f"output={tmp_path / 'out'}", "n_boot=10"]
    cli.run_winoground(make_cfg("winoground", run))
    assert exit_message("winoground", run) == (
        f"eval_winoground.py: output={tmp_path / 'out' / 'results.json'}: exists; pass overwrite=true to replace it, "
        f"or give another output=DIR")
    assert cli.run_winoground(make_cfg("winoground", run + ["overwrite=true"]))["n"] == 4


def test_default_output_dirs_never_collide(tmp_path, monkeypatch):
    """Two evaluator runs started in the same second get two folders (``-1``), made as
    train.py makes its default run directories; every evaluator config resolves through it."""
    from cacr import outputs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(outputs, "_fresh", {})
    first = outputs.fresh_dir("outputs/eval_winoground/d/t")
    assert outputs.fresh_dir("outputs/eval_winoground/d/t") == first  # Hydra resolves it more than once
    monkeypatch.setattr(outputs, "_fresh", {})  # a second process, the same second
    second = outputs.fresh_dir("outputs/eval_winoground/d/t")
    assert first == str(tmp_path / "outputs/eval_winoground/d/t") and second == first + "-1"
    assert Path(first).is_dir() and Path(second).is_dir()

    outputs.register_output_dir_resolver()
    for name in ("winoground", "retrieval", "multiple_choice"):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name=name, return_hydra_config=True)
        run_dir = Path(cfg.hydra.run.dir)
        assert run_dir.is_dir() and run_dir.parent.parent == tmp_path / "outputs" / f"eval_{name}"
        assert cfg.overwrite is False and cfg.bf16 == "auto"


def test_two_runs_started_together_write_two_folders(tmp_path):
    """The default output folder of two evaluator runs started at once (the same second,
    most likely): two folders, both complete, none refused as taken."""
    ex = hand_examples(tmp_path / "examples.jsonl")
    scores = hand_scores(tmp_path / "mine.jsonl", HAND)
    cmd = [sys.executable, str(REPO / "eval_winoground.py"), "scorer=file", f"scores={scores}", f"examples={ex}",
           "n_boot=10"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
    runs = sorted((tmp_path / "outputs" / "eval_winoground").glob("*/*/results.json"))
    assert len(runs) == 2 and runs[0].parent != runs[1].parent


# --------------------------------------------------------------------------- 1 vs 2 processes


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script, args, nproc, cwd):
    cmd = [sys.executable, str(REPO / script), *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", str(REPO / script), *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=180, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_two_processes_match_one(world, ckpt, tmp_path):
    """The evaluators at their defaults with bf16 forced (what ``auto`` picks on a GPU or an
    AVX-512 BF16 CPU): 1 and 2 processes write the same bits, and report fp32's numbers."""
    _, data = world
    common = data + [f"ckpt_path={ckpt}", "device=cpu", "progress=false", "batch_size=8"]
    out = {}
    for nproc, bf16 in ((1, "true"), (2, "true"), (1, "false")):
        d = tmp_path / f"p{nproc}{bf16}"
        _launch("eval_winoground.py", common + ["n_boot=300", f"bf16={bf16}", f"output={d}/wino",
                                                f"hydra.run.dir={d}/h1"], nproc, tmp_path)
        _launch("eval_retrieval.py", common + [f"bf16={bf16}", f"save_scores={d}/m.pt", f"output={d}/ret",
                                               f"hydra.run.dir={d}/h2"], nproc, tmp_path)
        out[nproc, bf16] = d
    one, two, fp32 = (json.loads((out[k] / "wino" / "results.json").read_text())
                      for k in ((1, "true"), (2, "true"), (1, "false")))
    assert one == two and one["bf16"] is True and one["scoring"]["precision"].startswith("bf16")
    assert 0 < one["text"] + one["image"] < 200
    how = {"bf16", "bf16_reason", "scoring"}
    assert {k: v for k, v in one.items() if k not in how} == {k: v for k, v in fp32.items() if k not in how}
    files = [(out[k] / "wino" / "winoground_scores.jsonl").read_bytes() for k in ((1, "true"), (2, "true"))]
    assert files[0] == files[1]  # bitwise the same score file
    r1, r2, r32 = (json.loads((out[k] / "ret" / "results.json").read_text())
                   for k in ((1, "true"), (2, "true"), (1, "false")))
    how = {"saved_scores", "processes", "scoring_seconds", "pairs_per_s"}  # how it ran, not what it found
    assert {k: v for k, v in r1.items() if k not in how} == {k: v for k, v in r2.items() if k not in how}
    assert (r1["processes"], r2["processes"]) == (1, 2) and r1["pairs"] == r2["pairs"]
    assert torch.equal(load_score_matrix(out[1, "true"] / "m.pt").scores, load_score_matrix(out[2, "true"] / "m.pt").scores)
    metrics = [k for k in r32 if k.startswith(("ir_", "tr_", "r_")) or k == "rsum"]
    assert {k: r1[k] for k in metrics} == {k: r32[k] for k in metrics} and len(metrics) == 10
    out[2] = out[2, "true"]
    assert sorted(p.name for p in (out[2] / "wino").iterdir()) == \
        ["results.json", "results.md", "winoground_scores.jsonl"]
