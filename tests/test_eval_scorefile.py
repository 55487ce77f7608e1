"""Winoground examples / score / tag files, results JSON and markdown, saved score matrices."""
import json

import pytest
import torch

from cacr.evaluation.retrieval_metrics import retrieval_metrics
from cacr.evaluation.scorefile import (
    example_tag_sets, load_score_matrix, read_score_file, read_tag_file,
    read_winoground_examples, results_markdown, save_score_matrix, write_results_json, write_score_file,
)
from cacr.evaluation.winoground_metrics import winoground_results
from cacr.outputs import atomic_write_text


def example(i, **over):
    d = {"id": i, "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1",
         "caption_0": f"a dog bites man {i}", "caption_1": f"a man bites dog {i}", "tag": "Noun",
         "secondary_tag": "Symbolic" if i % 4 == 0 else "", "num_main_preds": 1 + i % 2,
         "collapsed_tag": ["Object", "Relation", "Both"][i % 3]}
    d.update(over)
    return d


def write_lines(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


@pytest.fixture
def examples_file(tmp_path):
    return write_lines(tmp_path / "examples.jsonl", [example(i) for i in range(8)])


def test_examples_roundtrip_fields(examples_file):
    exs = read_winoground_examples(examples_file)
    assert [e.id for e in exs] == list(range(8))
    assert exs[3].collapsed_tag == "Object" and exs[3].num_main_preds == 2 and exs[3].secondary_tag == ""
    sets = example_tag_sets(exs)
    assert sets["secondary_tag"][0] == ["Symbolic"] and sets["secondary_tag"][1] == ["none"]
    assert sets["num_main_preds"][:2] == [["1"], ["2"]]


@pytest.mark.parametrize("bad,match", [
    ("{not json", r"examples.jsonl:3: malformed JSON"),
    ('[1, 2]', r"examples.jsonl:3: expected a JSON object"),
    ({k: v for k, v in example(9).items() if k != "caption_1"}, r"examples.jsonl:3: missing field\(s\) \['caption_1'\]"),
    (example(0), r"examples.jsonl:3: duplicate id 0 \(first on line 1\)"),
    (example(9, num_main_preds=3), r"examples.jsonl:3 \(id 9\): 'num_main_preds' must be the integer 1 or 2"),
    (example(9, num_main_preds="1"), r"'num_main_preds' must be the integer 1 or 2"),
    (example(9, collapsed_tag="Verb"), r"examples.jsonl:3 \(id 9\): 'collapsed_tag' must be one of"),
    (example(9, caption_0=""), r"'caption_0' must be a non-empty string"),
    (example(9, id=True), r"'id' must be an integer or a non-empty string"),
])
def test_examples_errors_name_the_line(tmp_path, bad, match):
    path = write_lines(tmp_path / "examples.jsonl", [example(0), example(1), bad])
    with pytest.raises(ValueError, match=match):
        read_winoground_examples(path)


def test_score_file_roundtrip_and_order(tmp_path, examples_file):
    exs = read_winoground_examples(examples_file)
    scores = torch.randn(8, 2, 2, dtype=torch.float64)
    path = write_score_file(tmp_path / "scores.jsonl", exs, scores)
    lines = path.read_text().splitlines()
    assert len(lines) == 32 and json.loads(lines[1]) == {"label": "0_c0_i1", "score": float(scores[0, 0, 1])}
    # shuffled lines, blank line tolerated
    shuffled = lines[::-1]
    shuffled.insert(5, "")
    (tmp_path / "shuffled.jsonl").write_text("\n".join(shuffled) + "\n")
    got = read_score_file(tmp_path / "shuffled.jsonl", exs)
    assert torch.equal(got, scores)
    assert not list(tmp_path.glob(".*tmp"))


def score_lines(n=3):
    return [{"label": f"{i}_c{k}_i{j}", "score": float(i + k - j)} for i in range(n) for k in (0, 1) for j in (0, 1)]


@pytest.mark.parametrize("mutate,match", [
    (lambda L: L[:4] + ["{\"label\": "] + L[4:], r"s.jsonl:5: malformed JSON"),
    (lambda L: L[:2] + [{"score": 1.0}] + L[2:], r"s.jsonl:3: missing 'label'"),
    (lambda L: L[:2] + [{"label": "0_c0_i0"}] + L[2:], r"s.jsonl:3: missing 'score' for label '0_c0_i0'"),
    (lambda L: L + [L[6]], r"s.jsonl:13: duplicate label '1_c1_i0' \(first on line 7\)"),
    (lambda L: L[:5] + L[6:], r"no score for label\(s\) \['1_c0_i1'\] \(1 of 12 missing\)"),
    (lambda L: L + [{"label": "7_c0_i0", "score": 1.0}], r"s.jsonl:13: label '7_c0_i0': id '7' is not an id"),
    (lambda L: L + [{"label": "0_c2_i0", "score": 1.0}], r"s.jsonl:13: label '0_c2_i0' is not of the form"),
    (lambda L: [{"label": "0_c0_i0", "score": "high"}] + L[1:], r"s.jsonl:1: score of '0_c0_i0' must be a finite number"),
    (lambda L: [{"label": "0_c0_i0", "score": True}] + L[1:], r"must be a finite number"),
])
def test_score_file_errors_name_the_line(tmp_path, mutate, match):
    path = write_lines(tmp_path / "s.jsonl", mutate(score_lines()))
    with pytest.raises(ValueError, match=match):
        read_score_file(path, [0, 1, 2])


def test_string_ids_with_underscores(tmp_path):
    ids = ["a_1", "b"]
    scores = torch.arange(8.0).view(2, 2, 2)
    path = write_score_file(tmp_path / "s.jsonl", ids, scores)
    assert torch.equal(read_score_file(path, ids), scores.double())


def test_tag_file(tmp_path, examples_file):
    exs = read_winoground_examples(examples_file)
    (tmp_path / "tags.json").write_text(json.dumps({"0": ["Visually Difficult"], "3": ["Visually Difficult", "Unusual Text"]}))
    tags = read_tag_file(tmp_path / "tags.json", exs)
    sets = example_tag_sets(exs, {"diwan": tags})
    assert sets["diwan"][0] == ["Visually Difficult"] and sets["diwan"][1] == []
    assert sets["diwan"][3] == ["Visually Difficult", "Unusual Text"]
    (tmp_path / "bad.json").write_text(json.dumps({"11": ["x"]}))
    with pytest.raises(ValueError, match=r"bad.json: id '11' is not an id of the examples file"):
        read_tag_file(tmp_path / "bad.json", exs)
    (tmp_path / "bad.json").write_text(json.dumps({"1": "x"}))
    with pytest.raises(ValueError, match=r"bad.json: id '1': expected a list of non-empty tag strings"):
        read_tag_file(tmp_path / "bad.json", exs)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"bad.json: malformed JSON"):
        read_tag_file(tmp_path / "bad.json", exs)
    with pytest.raises(ValueError, match="clashes with a built-in"):
        example_tag_sets(exs, {"collapsed_tag": tags})


def test_results_json_and_markdown(tmp_path, examples_file):
    exs = read_winoground_examples(examples_file)
    scores = torch.tensor([[[1., 0.], [0., 1.]]] * 4 + [[[0., 1.], [1., 0.]]] * 4)
    r = winoground_results(scores, example_tag_sets(exs), n_boot=100)
    path = write_results_json(tmp_path / "out" / "results.json", r)
    back = json.loads(path.read_text())
    assert back["text"] == 50.0 and back["n"] == 8
    assert back["by_tag"]["collapsed_tag"]["Object"]["n"] == 3
    md = results_markdown({"ours": r, "other": r})
    lines = md.splitlines()
    assert lines[0] == "| model | n | text | image | group | binding |"
    assert lines[2].startswith("| ours | 8 | 50.00 [")
    assert "By `secondary_tag`:" in md and "| other | Symbolic | 2 | 50.00 [0.0, 100.0] |" in md
    r_old = {k: v for k, v in r.items() if k != "binding"}  # a record from before the binding score
    assert results_markdown({"old": r_old, "ours": r}).splitlines()[0] == "| model | n | text | image | group |"


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.txt"
    atomic_write_text(target, "old")

    class Boom(Exception):
        pass

    from cacr.outputs import atomic_write

    def fail(f):
        f.write(b"partial")
        raise Boom

    with pytest.raises(Boom):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_score_matrix_roundtrip_recomputes_metrics(tmp_path, suffix):
    g = torch.Generator().manual_seed(0)
    txt2img = torch.arange(6).repeat_interleave(3)
    scores = torch.randn(18, 6, generator=g)
    cap_ids = [f"cap{i}" for i in range(18)]
    img_ids = [f"{i}.jpg" for i in range(6)]
    path = save_score_matrix(tmp_path / f"m{suffix}", scores, cap_ids, img_ids, txt2img)
    m = load_score_matrix(path)
    assert torch.equal(m.scores, scores) and torch.equal(m.txt2img, txt2img)
    assert m.caption_ids == cap_ids and m.image_ids == img_ids
    assert retrieval_metrics(m.scores, m.txt2img) == retrieval_metrics(scores, txt2img)


def test_score_matrix_errors(tmp_path):
    with pytest.raises(ValueError, match=r"3 caption ids and 2 image ids for a \(2, 2\) score matrix"):
        save_score_matrix(tmp_path / "m.pt", torch.zeros(2, 2), [1, 2, 3], [1, 2], [0, 1])
    with pytest.raises(ValueError, match="end in .pt or .npz"):
        save_score_matrix(tmp_path / "m.csv", torch.zeros(2, 2), [1, 2], [1, 2], [0, 1])
    torch.save({"scores": torch.zeros(2, 2)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad.pt: expected a dict with keys"):
        load_score_matrix(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="score matrix file not found"):
        load_score_matrix(tmp_path / "none.pt")
