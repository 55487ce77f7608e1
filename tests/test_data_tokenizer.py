"""WordPiece tokenizer: basic tokenization, greedy longest-match-first pieces, special ids from the vocab."""
import pytest

from cacr.data.tokenizer import WordPieceTokenizer

# specials deliberately not at the synthetic world's positions: ids must come from the vocab
VOCAB = ["[PAD]"] + [f"[unused{i}]" for i in range(3)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]",
         "a", "dog", "Dog", "un", "##aff", "##able", "##s", "play", "##ing", ",", ".", "!", "do", "##g", "the",
         "caf", "##é", "cafe", "中", "'", "s"]


@pytest.fixture
def tok(tmp_path):
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(VOCAB) + "\n")
    return WordPieceTokenizer.from_vocab_file(p)


def test_special_ids_read_from_vocab(tok):
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 4, 5, 6, 7)
    assert tok.with_specials([9, 10]) == [5, 9, 10, 6]


def test_greedy_longest_match_first(tok):
    assert tok.tokenize("unaffable") == ["un", "##aff", "##able"]
    assert tok.tokenize("dogs") == ["dog", "##s"]
    assert tok.tokenize("playing") == ["play", "##ing"]
    # "do" + "##g" would also match, longest first takes "dog"
    assert tok.tokenize("dog") == ["dog"]
    assert tok.tokenize("unknownword") == ["[UNK]"]  # no full cover -> the whole word is [UNK]


def test_basic_tokenization_is_cased_and_splits_punctuation(tok):
    assert tok.tokenize("Dog, a dog!") == ["Dog", ",", "a", "dog", "!"]
    assert tok.tokenize("DOG") == ["[UNK]"]  # cased: no lower-casing
    assert tok.tokenize("dog's") == ["dog", "'", "s"]
    assert tok.tokenize("  a\tdog\n") == ["a", "dog"]
    assert tok._basic("a\x00d\u200bog") == ["adog"]  # NUL and format characters are removed
    assert tok.tokenize("中a") == ["中", "a"]  # CJK characters are split off
    assert tok.tokenize("café") == ["caf", "##é"]  # cased: accents kept


def test_lower_case_vocab_strips_accents(tmp_path):
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(VOCAB) + "\n")
    t = WordPieceTokenizer.from_vocab_file(p, do_lower_case=True)
    assert t.tokenize("CAFÉ DOG") == ["cafe", "dog"]


def test_max_chars_per_word(tmp_path):
    t = WordPieceTokenizer(VOCAB + ["x", "##x"], max_input_chars_per_word=5)
    assert t.tokenize("xxxxx") == ["x", "##x", "##x", "##x", "##x"]
    assert t.tokenize("xxxxxx") == ["[UNK]"]


def test_encode_per_whitespace_word_matches_slow_twin(tok):
    text = "the Dog, playing! unaffable dogs"
    slow = [tok.token_to_id[p] for w in text.split() for p in tok.tokenize(w)]
    assert tok.encode(text) == slow
    assert tok.decode(tok.encode("unaffable dogs")) == "unaffable dogs"


def test_vocab_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        WordPieceTokenizer.from_vocab_file(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"special token \[CLS\] missing"):
        WordPieceTokenizer([t for t in VOCAB if t != "[CLS]"])
    with pytest.raises(ValueError, match="'a' appears twice"):
        WordPieceTokenizer(VOCAB + ["a"])


def test_load_by_name_needs_transformers_or_says_so():
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="optional package `transformers`"):
            WordPieceTokenizer.load("bert-base-cased")
    else:
        pytest.skip("transformers is installed; loading by name would need its cache")
