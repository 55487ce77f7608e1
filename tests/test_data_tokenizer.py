"""WordPiece tokenizer on Hugging Face ``tokenizers``: BERT basic tokenization and greedy
longest-match-first pieces, special ids from the vocab; the same ids as the Python BERT
tokenizer (the slow twin in ``tokenizer_twin.py``) on random Unicode-heavy text and on every
code point of stable category; the official txt_db sample's ids survive decode + re-encode."""
import json
import random
import unicodedata
from pathlib import Path

import lmdb
import lz4.frame
import msgpack
import pytest

from cacr.data.tokenizer import SPECIAL_TOKENS, WordPieceTokenizer

from .tokenizer_twin import PythonWordPiece

FIXTURES = Path(__file__).parent / "fixtures"
TXT_DB = FIXTURES / "uniter_db_sample" / "txt_db" / "itm_flickr30k_test.db"

# specials deliberately not at the synthetic world's positions: ids must come from the vocab
VOCAB = ["[PAD]"] + [f"[unused{i}]" for i in range(3)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]",
         "a", "dog", "Dog", "un", "##aff", "##able", "##s", "play", "##ing", ",", ".", "!", "do", "##g", "the",
         "caf", "##é", "cafe", "中", "'", "s", "σ", "ς", "##ς", "##σ", "ο", "[", "]", "cls", "CLS"]


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
    assert tok.tokenize("a\x00d\u200bog") == ["[UNK]"]  # NUL and format characters are removed: "adog"
    assert tok.tokenize("do\u200bg") == ["dog"]
    assert tok.tokenize("中a") == ["中", "a"]  # CJK characters are split off
    assert tok.tokenize("café") == ["caf", "##é"]  # cased: accents kept
    # private-use characters are kept (the Python tokenizer keeps them), so the word is [UNK]
    assert tok.tokenize("do\ue000g") == ["[UNK]"]


def test_lower_case_vocab_strips_accents_and_keeps_final_sigma(tmp_path):
    p = tmp_path / "vocab.txt"
    p.write_text("\n".join(VOCAB) + "\n")
    t = WordPieceTokenizer.from_vocab_file(p, do_lower_case=True)
    assert t.tokenize("CAFÉ DOG") == ["cafe", "dog"]
    # str.lower(): a capital sigma at the end of a word is the final form, also after a
    # control character that cleaning removes
    assert t.encode("ΟΣ") == [t.token_to_id[x] for x in ("ο", "##ς")]
    assert t.encode("ΟΣΟ") == [t.unk_id]
    assert t.encode("ΟΣ\x7fΟ") == t.encode("ΟΣΟ")


def test_special_tokens_kept_whole_where_the_python_tokenizer_keeps_them(tok):
    cls = tok.cls_id
    assert tok.encode("a [CLS] dog") == [8, cls, 9]
    assert tok.encode("[CLS]中") == [cls, tok.token_to_id["中"]]  # a whole word after CJK spacing
    ids = tok.token_to_id
    assert tok.encode("a[CLS]") == [ids["a"], ids["["], ids["CLS"], ids["]"]]  # not a whole word: punctuation splits
    assert tok.encode("[CLS]") != tok.encode("[CLS]a")


def test_max_chars_per_word():
    t = WordPieceTokenizer(VOCAB + ["x", "##x"], max_input_chars_per_word=5)
    assert t.tokenize("xxxxx") == ["x", "##x", "##x", "##x", "##x"]
    assert t.tokenize("xxxxxx") == ["[UNK]"]


def test_encode_per_whitespace_word_matches_slow_twin(tok):
    text = "the Dog, playing! unaffable dogs"
    slow = [tok.token_to_id[p] for w in text.split() for p in tok.tokenize(w)]
    assert tok.encode(text) == slow
    assert tok.decode(tok.encode("unaffable dogs")) == "unaffable dogs"
    # per word: U+2028 separates words for str.split()
    assert tok.encode("a\u2028dog") == tok.encode("a dog")
    assert tok.encode("a\x1cdog") == tok.encode("a dog")  # a word separator for str.split(), not for BERT
    assert tok.encode("do\x7fg") == tok.encode("dog")  # removed inside a word
    assert tok.encode_batch([text, "", "a [CLS] dog"]) == [slow, [], tok.encode("a [CLS] dog")]


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


# --------------------------------------------------------------------------- against the Python twin


def _stable(cp: int) -> bool:
    """Assigned in Unicode 3.2 with the same category in Python's Unicode version: the Rust
    tables and Python's agree on these (characters added or re-classified later may not)."""
    c = chr(cp)
    old = unicodedata.ucd_3_2_0.category(c)
    return old not in ("Cn", "Cs") and old == unicodedata.category(c)


def _bulk(cp: int) -> bool:
    """Large blocks of one kind (CJK ideographs, Hangul syllables, Yi, private use): sampled."""
    return (0x3400 <= cp <= 0x4DBF or 0x4E00 <= cp <= 0x9FFF or 0xA000 <= cp <= 0xA48F or 0xAC00 <= cp <= 0xD7A3
            or 0xE000 <= cp <= 0xF8FF or 0x20000 <= cp <= 0x2FA1F or cp >= 0xF0000)


STABLE = [chr(cp) for cp in range(0x110000) if _stable(cp) and (not _bulk(cp) or cp % 61 == 0)]
# always unassigned (noncharacters, and holes that stay holes), private use, controls, Zl/Zp
EXTRA = list("\u0378\u0379\ufdd0\ufffe\U0010ffff\ue000\uf8ff\U000f0000\x00\x01\x0b\x1c\x7f\x85\u2028\u2029")
EXTRA += [chr(cp) for cp in (0x2B820, 0x2B8BC, 0x2B91F, 0x2B920)]  # CJK Extension E, either side of U+2B920
POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~\u00bf\u00a1\u2019\u201c\u2014\u00b7\u037e\u0387\u1fef",
    "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿÀÉÎÕÜßœŒİıŉǅǈÅ\u0300\u0301\u0308\u0327",
    "ΑΒΓΔΣσςαβγδεΩωΆΈάέ",
    "中文字漢字日本語한국어ひらがなカタカナ\uf900\ufa0e\u2f00\u3400\U00020000\U0002f800ＡＢＣ１２３！？",
    " \t\n\r\u00a0\u2000\u3000\u202f\u200b\u200d\u00ad\ufeff\ufffd",
]


ASCII = "".join(map(chr, range(128)))


def random_text(rng: random.Random) -> str:
    if rng.random() < 0.2:  # ASCII only, controls included (encoded whole, not word by word)
        return "".join(rng.choice(ASCII if rng.random() < 0.2 else POOLS[0] + "  ,.'") for _ in range(rng.randint(1, 60)))
    out = []
    for _ in range(rng.randint(1, 30)):
        r = rng.random()
        if r < 0.03:
            out.append(rng.choice(SPECIAL_TOKENS))
        elif r < 0.08:
            out.append(rng.choice(EXTRA))
        elif r < 0.3:
            out.append("".join(rng.choice(STABLE) for _ in range(rng.randint(1, 4))))
        else:
            pool = rng.choice(POOLS)
            out.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 6))))
        out.append(rng.choice(" \t"))
    return "".join(out)


def covering_vocab(texts, rng: random.Random, lower: bool):
    """Specials, most characters as words and continuations, and random substrings, so that
    words split into several pieces, some match longer pieces and some stay [UNK]."""
    basic = PythonWordPiece(list(SPECIAL_TOKENS), do_lower_case=lower).basic
    vocab = dict.fromkeys(SPECIAL_TOKENS)
    for t in texts:
        for w in basic(t):
            if rng.random() < 0.3:
                vocab.setdefault(w)
            for i in range(len(w)):
                if rng.random() < 0.85:
                    vocab.setdefault(w[i] if i == 0 else "##" + w[i])
                if rng.random() < 0.3:
                    j = rng.randint(i + 1, len(w))
                    vocab.setdefault(w[i:j] if i == 0 else "##" + w[i:j])
    return list(vocab)


@pytest.mark.parametrize("lower", [False, True], ids=["cased", "uncased"])
def test_same_ids_as_python_twin_on_random_unicode_text(lower):
    rng = random.Random(1234 + lower)
    texts = [random_text(rng) for _ in range(3000)]
    vocab = covering_vocab(texts[:1500], rng, lower)
    new, old = WordPieceTokenizer(vocab, do_lower_case=lower), PythonWordPiece(vocab, do_lower_case=lower)
    want = [old.encode(t) for t in texts]
    got = [new.encode(t) for t in texts]
    bad = [i for i in range(len(texts)) if got[i] != want[i]]
    assert not bad, f"{len(bad)} of {len(texts)} texts differ, e.g. {texts[bad[0]]!r}: {got[bad[0]]} vs {want[bad[0]]}"
    assert new.encode_batch(texts) == want
    # the test means something: pieces, continuations and [UNK] all occur
    flat = [i for ids in want for i in ids]
    assert sum(i == old.token_to_id["[UNK]"] for i in flat) > 100
    assert sum(vocab[i].startswith("##") for i in flat) > 500


@pytest.mark.parametrize("lower", [False, True], ids=["cased", "uncased"])
def test_every_stable_code_point_as_the_python_twin(lower):
    """Each character alone, inside a word and after a word: removed, spaced, split, stripped
    or kept exactly as the Python tokenizer does."""
    chars = STABLE + EXTRA
    vocab = list(dict.fromkeys(list(SPECIAL_TOKENS) + ["x", "##y", "##x", "y"] + chars + ["##" + c for c in chars]))
    new, old = WordPieceTokenizer(vocab, do_lower_case=lower), PythonWordPiece(vocab, do_lower_case=lower)
    texts = [f"{c} x{c}y x{c}" for c in chars]
    want = [old.encode(t) for t in texts]
    got = new.encode_batch(texts)
    bad = [chars[i] for i in range(len(texts)) if got[i] != want[i]]
    assert not bad, f"{len(bad)} characters tokenized differently, e.g. {[f'U+{ord(c):04X}' for c in bad[:10]]}"


# --------------------------------------------------------------------------- the official txt_db sample


def test_txt_db_sample_ids_survive_decode_and_reencode():
    """The sample's captions are placeholders with random ids in bert-base-cased's range, so
    the test builds a vocabulary of bert-base-cased's size and special ids in which pieces
    that only ever follow another piece are ``##`` continuations (every other one), decodes
    each stored caption to text and re-tokenizes it: the stored ids come back."""
    env = lmdb.open(str(TXT_DB), readonly=True, lock=False)
    with env.begin() as txn:
        stored = {k.decode(): msgpack.loads(lz4.frame.decompress(v), raw=False)["input_ids"] for k, v in txn.cursor()}
    env.close()
    meta = json.loads((TXT_DB / "meta.json").read_text())
    assert meta["toker"] == "bert-base-cased" and len(stored) == 30
    first = {ids[0] for ids in stored.values()}
    later = sorted({i for ids in stored.values() for i in ids[1:]} - first)
    continuation = set(later[::2])
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    code = lambda i: "".join("abcdefghijklmnopqrstuvwxyz"[(i // 26 ** k) % 26] for k in range(4))  # noqa: E731
    vocab += [("##" if i in continuation else "") + code(i) for i in range(len(vocab), 28996)]
    tok = WordPieceTokenizer(vocab, name="bert-base-cased-shaped")
    assert (tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (meta["UNK"], meta["CLS"], meta["SEP"], meta["MASK"])
    merged = 0
    for cid, ids in stored.items():
        text = tok.decode(ids)
        merged += len(ids) - len(text.split())
        assert tok.encode(text) == ids, f"caption {cid}: {text!r}"
    assert merged > 50  # many continuation pieces were merged into words and split again


# --------------------------------------------------------------------------- tokenizer.json

# captions of the kinds the converters tokenize: plain ASCII, punctuation, accents, CJK, digits
FILE_TEXTS = ["A dog, running.", "the Dog's café!", "Two dogs playing in the un-affable park",
              "Café CAFÉ cafe", "中 dog 中中", "a [MASK] dog", "[CLS] Dog [SEP]", "  spaced\tout\nwords  ",
              "Ωmega σ ς ΣΟΣ", "numbers 12 and 3.5", "unaffable unaffables", ""]


def bert_like_vocab():
    """A small BERT-like vocab.txt: specials at BERT's places, [unused*], words, ## pieces."""
    words = sorted({w for t in FILE_TEXTS for w in t.replace(",", " ").replace(".", " ").split()} |
                   {"a", "dog", "the", "un", "café", "cafe", "two", "in", "park", "and", "3", "5", "12"})
    pieces = ["##s", "##ing", "##aff", "##able", "##é", "##og", "##s", ",", ".", "!", "'", "-", "中", "σ", "ς", "ω"]
    return (["[PAD]"] + [f"[unused{i}]" for i in range(5)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            + words + [p for p in dict.fromkeys(pieces)] + [w.lower() for w in words if w.lower() not in words])


@pytest.mark.parametrize("kind", ["synthetic", "cased", "uncased"])
def test_tokenizer_json_read_by_tokenizers_as_is_same_ids(kind, tmp_path):
    from tokenizers import Tokenizer

    from cacr.data.synthetic import synthetic_vocab

    if kind == "synthetic":
        tok = WordPieceTokenizer(synthetic_vocab(120), name="synthetic")
        texts = ["a red mug is left of a blue ball .", "the green cube is above the red mug .", "a ball ."]
    else:
        vocab = tmp_path / f"bert-base-{kind}-vocab.txt"
        vocab.write_text("\n".join(dict.fromkeys(bert_like_vocab())) + "\n")
        tok = WordPieceTokenizer.load(vocab)  # vocab.txt stays accepted
        assert tok.do_lower_case == (kind == "uncased")
        texts = [t for t in FILE_TEXTS if "Σ" not in t]  # final sigma: a documented difference
    path = tok.save(tmp_path / "tokenizer.json")
    rust = Tokenizer.from_file(str(path))  # the file as it is, without this package
    for t in texts:
        assert rust.encode(t, add_special_tokens=False).ids == tok.encode(t), t
        assert rust.encode(t).ids == tok.with_specials(tok.encode(t)), t
    back = WordPieceTokenizer.load(path)
    assert (back.vocab, back.do_lower_case, back.unk_id, back.cls_id) == (tok.vocab, tok.do_lower_case, tok.unk_id,
                                                                          tok.cls_id)
    assert back.encode_batch(FILE_TEXTS) == tok.encode_batch(FILE_TEXTS)  # every text, the module's own ids
    assert tok.save(tmp_path) == tmp_path / "tokenizer.json"  # a folder: tokenizer.json inside
    assert not list(tmp_path.glob("*.tmp"))


def test_tokenizer_json_of_random_texts_round_trips(tmp_path):
    """The saved file, read back, gives the ids of the vocab.txt on the Unicode-heavy texts."""
    rng = random.Random(5)
    for lower in (False, True):
        texts = [random_text(rng) for _ in range(150)]
        tok = WordPieceTokenizer(covering_vocab(texts, rng, lower), do_lower_case=lower)
        back = WordPieceTokenizer.load(tok.save(tmp_path / f"t{lower}.json"))
        assert back.encode_batch(texts) == tok.encode_batch(texts)


def test_tokenizer_json_errors_name_file_and_field(tmp_path):
    tok = WordPieceTokenizer(VOCAB)
    obj = json.loads(tok.save(tmp_path / "tokenizer.json").read_text())
    obj["model"]["type"] = "BPE"
    bad = tmp_path / "bpe.json"
    bad.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=r"bpe.json: 'model.type' must be 'WordPiece' \(a BERT tokenizer\), got 'BPE'"):
        WordPieceTokenizer.load(bad)
    obj["model"]["type"] = "WordPiece"
    obj["model"]["vocab"]["dog"] = 10_000
    bad.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=r"bpe.json: 'model.vocab': ids must be the integers 0\.\.\d+, each once"):
        WordPieceTokenizer.load(bad)
    bad.write_text("{")
    with pytest.raises(ValueError, match=r"bpe.json: malformed JSON"):
        WordPieceTokenizer.load(bad)
