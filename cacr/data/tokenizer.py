"""BERT WordPiece tokenization (bert-base-cased conventions) on Hugging Face ``tokenizers``.

UNITER's preprocessing ran the Python BERT tokenizer of ``pytorch_pretrained_bert`` on each
whitespace-separated word of a caption in turn (``str.split()``), dropping words that give
no piece. This module reproduces those ids with the field's Rust tokenizer: a
``tokenizers.Tokenizer`` built from the vocabulary file, with

- a cleaning step that removes NUL, U+FFFD and control / format characters (Unicode ``Cc``
  and ``Cf`` except tab, newline and carriage return) and maps tab, newline, carriage
  return and space separators (``Zs``) to a space, as the Python tokenizer does. The
  ``BertNormalizer``'s own cleaning also removes private-use (``Co``) and unassigned
  (``Cn``) characters, which the Python tokenizer keeps (a word holding one becomes
  ``[UNK]``), so it is switched off and this step runs in its place;
- ``BertNormalizer`` for the rest: spaces around CJK ideographs, and for uncased
  vocabularies lower-casing and accent stripping (``NFD``, drop ``Mn``);
- ``BertPreTokenizer``: split on whitespace and punctuation;
- ``WordPiece``: greedy longest-match-first pieces with ``##`` continuations; a word longer
  than ``max_input_chars_per_word`` or with no full cover becomes ``[UNK]``.

A special token (``[UNK]``, ``[CLS]``, ...) that stands as a whole word after cleaning and
CJK spacing is kept whole, as the Python tokenizer's ``never_split`` list does. Lower-casing is done by Python's
``str.lower()`` on each cleaned word before the rest of the Rust pipeline (the Rust one maps
characters one by one and so misses the final-sigma rule). The ids of the special tokens are read from the
vocabulary, never assumed. A named vocabulary (``bert-base-cased``) comes through the
optional ``transformers`` package and its cache.

As a file: :meth:`WordPieceTokenizer.save` writes a ``tokenizer.json`` that the ``tokenizers``
library reads as it is (``Tokenizer.from_file``): the same normalizer, pre-tokenizer and
WordPiece model, with lower-casing inside it for uncased vocabularies, the special tokens
as added special tokens and a ``[CLS] $A [SEP]`` post-processor, so its ``encode(text).ids``
are ``with_specials(encode(text))``. :meth:`WordPieceTokenizer.load` reads such a file (or any
WordPiece ``tokenizer.json``, e.g. a BERT one of Hugging Face) back: the vocabulary, casing,
unknown token and word-length limit come from the file, and encoding is this module's, so
the ids are those of the vocabulary file. Where the Rust pipeline alone, read by another
program, gives other ids than this module: a special token written inside a word
(``a[MASK]b``: the Rust added-token matcher splits it out, the Python tokenizer does not), a
capital sigma at a word's end in uncased text (Rust lower-cases it to ``σ``, Python to
``ς``), and the ASCII separators ``\x0b \x0c \x1c-\x1f`` (``str.split()`` splits words on
them before the cleaning removes them).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# the Python BERT tokenizer's text cleaning: drop NUL, U+FFFD and Cc/Cf (but tab, newline,
# carriage return), then map tab, newline, carriage return and Zs to a space
_DROP = Regex(r"(?![\t\n\r])[\x00\x{FFFD}\p{Cc}\p{Cf}]")
_SPACE = Regex(r"[\t\n\r\p{Zs}]")
# CJK Extension E starts at U+2B820; the BertNormalizer's CJK ranges start it at U+2B920,
# so the ideographs in between are split off here, each on its own
_CJK_GAP = Regex(r"[\x{2B820}-\x{2B91F}]")
# ASCII controls that str.split() treats as whitespace while the cleaning removes them
_SPLIT_CONTROLS = re.compile(r"[\x0b\x0c\x1c-\x1f]")


class WordPieceTokenizer:
    """``tokenize(text) -> word pieces``; ``encode(text) -> ids`` (no specials, one
    whitespace word at a time, as UNITER's preprocessing); ``encode_batch(texts)``;
    ``with_specials(ids) -> [CLS] ids [SEP]``."""

    def __init__(self, vocab: Sequence[str], *, name: str = "custom", do_lower_case: bool = False,
                 unk_token: str = "[UNK]", max_input_chars_per_word: int = 100):
        self.vocab: List[str] = [str(v) for v in vocab]
        self.token_to_id: Dict[str, int] = {}
        for i, t in enumerate(self.vocab):
            if t in self.token_to_id:
                raise ValueError(f"vocabulary {name!r}: token {t!r} appears twice (lines {self.token_to_id[t] + 1} and {i + 1})")
            self.token_to_id[t] = i
        for t in SPECIAL_TOKENS:
            if t not in self.token_to_id:
                raise ValueError(f"vocabulary {name!r}: special token {t} missing")
        if unk_token not in self.token_to_id:
            raise ValueError(f"vocabulary {name!r}: unknown-word token {unk_token!r} missing")
        self.name = name
        self.do_lower_case = bool(do_lower_case)
        self.unk_token = unk_token
        self.max_input_chars_per_word = int(max_input_chars_per_word)
        self.pad_id = self.token_to_id["[PAD]"]
        self.unk_id = self.token_to_id["[UNK]"]
        self.cls_id = self.token_to_id["[CLS]"]
        self.sep_id = self.token_to_id["[SEP]"]
        self.mask_id = self.token_to_id["[MASK]"]
        self.never_split = frozenset(SPECIAL_TOKENS)
        self.backend = self._build_backend()
        # cleaning and CJK spacing only: where the Python tokenizer looks for special tokens
        self._cleaner = normalizers.Sequence([
            normalizers.Replace(_DROP, ""), normalizers.Replace(_SPACE, " "),
            normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=True, strip_accents=False,
                                       lowercase=False),
        ])
        self._splitter = pre_tokenizers.Sequence([pre_tokenizers.Split(_CJK_GAP, behavior="isolated"),
                                                  pre_tokenizers.WhitespaceSplit()])

    def _build_backend(self, lowercase: bool = False) -> Tokenizer:
        tk = Tokenizer(models.WordPiece(vocab=self.token_to_id, unk_token=self.unk_token,
                                        max_input_chars_per_word=self.max_input_chars_per_word))
        tk.normalizer = normalizers.Sequence([
            normalizers.Replace(_DROP, ""),
            normalizers.Replace(_SPACE, " "),
            # lower-casing itself is done in Python (str.lower, final sigma included) in _prepare;
            # the saved tokenizer.json (lowercase=True) does it here, for programs that read it alone
            normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=True,
                                       strip_accents=self.do_lower_case, lowercase=lowercase),
        ])
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(_CJK_GAP, behavior="isolated"),
            pre_tokenizers.BertPreTokenizer(),
        ])
        tk.decoder = decoders.WordPiece(prefix="##")
        return tk

    @classmethod
    def from_vocab_file(cls, path, *, name: Optional[str] = None, do_lower_case: bool = False,
                        **kw) -> "WordPieceTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: vocabulary file not found")
        vocab = path.read_text(encoding="utf-8").splitlines()
        while vocab and vocab[-1] == "":
            vocab.pop()
        return cls(vocab, name=name or str(path), do_lower_case=do_lower_case, **kw)

    @classmethod
    def from_name(cls, name: str) -> "WordPieceTokenizer":
        """Load a named vocabulary (e.g. ``bert-base-cased``) through ``transformers``' cache.

        Needs the optional ``transformers`` package and the vocabulary in its cache (or
        network); tests and the synthetic world use ``from_vocab_file``. Lower-casing
        follows the named tokenizer's own setting.
        """
        try:
            from transformers import AutoTokenizer  # optional
        except ImportError:
            raise ImportError(
                f"loading the tokenizer {name!r} by name needs the optional package `transformers`; "
                f"install it, or pass the path of a local vocab.txt instead") from None
        hf = AutoTokenizer.from_pretrained(name)
        vocab = [t for t, _ in sorted(hf.get_vocab().items(), key=lambda kv: kv[1])]
        lower = getattr(hf, "do_lower_case", None)
        if lower is None:
            lower = dict(getattr(hf, "init_kwargs", None) or {}).get("do_lower_case", False)
        return cls(vocab, name=name, do_lower_case=bool(lower))

    @classmethod
    def from_tokenizer_json(cls, path, *, name: Optional[str] = None) -> "WordPieceTokenizer":
        """Read a WordPiece ``tokenizer.json`` (this module's :meth:`save`, or e.g. a BERT one
        of Hugging Face): its vocabulary, casing (a lower-casing ``BertNormalizer`` or
        ``Lowercase`` step), ``unk_token`` and ``max_input_chars_per_word``; encoding is this
        module's. ``ValueError`` naming the file and the field otherwise."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        model = obj.get("model") if isinstance(obj, dict) else None
        if not isinstance(model, dict) or model.get("type") != "WordPiece":
            got = model.get("type") if isinstance(model, dict) else model
            raise ValueError(f"{path}: 'model.type' must be 'WordPiece' (a BERT tokenizer), got {got!r}")
        vocab = model.get("vocab")
        if not isinstance(vocab, dict) or not vocab:
            raise ValueError(f"{path}: 'model.vocab' must be an object {{token: id}}, got {type(vocab).__name__}")
        ids = sorted(vocab.values()) if all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()) else None
        if ids != list(range(len(vocab))):
            raise ValueError(f"{path}: 'model.vocab': ids must be the integers 0..{len(vocab) - 1}, each once")
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]

        def lowercases(n) -> bool:
            if not isinstance(n, dict):
                return False
            if n.get("type") == "Sequence":
                return any(lowercases(x) for x in n.get("normalizers") or [])
            return n.get("type") == "Lowercase" or (n.get("type") == "BertNormalizer" and bool(n.get("lowercase")))
        return cls(tokens, name=name or str(path), do_lower_case=lowercases(obj.get("normalizer")),
                   unk_token=str(model.get("unk_token", "[UNK]")),
                   max_input_chars_per_word=int(model.get("max_input_chars_per_word", 100)))

    @classmethod
    def load(cls, spec) -> "WordPieceTokenizer":
        """A path to a vocab.txt (lower-cased when its file name says ``uncased``), to a
        ``tokenizer.json`` (:meth:`from_tokenizer_json`), or a name such as
        ``bert-base-cased`` / ``bert-base-uncased``."""
        p = Path(str(spec))
        if p.is_file() and p.suffix == ".json":
            return cls.from_tokenizer_json(p)
        if p.is_file():
            return cls.from_vocab_file(p, do_lower_case="uncased" in p.name)
        if p.suffix == ".txt" or "/" in str(spec):
            raise FileNotFoundError(f"{spec}: vocabulary file not found")
        return cls.from_name(str(spec))

    def __len__(self) -> int:
        return len(self.vocab)

    # --------------------------------------------------------------- tokenizing

    def _prepare(self, word: str) -> str:
        # uncased: str.lower() after cleaning (a removed control character must not end a
        # word for the final-sigma rule), as the Python tokenizer lower-cases cleaned tokens
        if not self.do_lower_case:
            return word
        # str.lower() depends on context only for a capital sigma (final form or not)
        return (self._cleaner.normalize_str(word) if "\u03a3" in word else word).lower()

    def tokenize(self, text: str) -> List[str]:
        """Word pieces of ``text`` as one string (whitespace and punctuation splits inside)."""
        return self.backend.encode(self._prepare(text), add_special_tokens=False).tokens

    def _encode_words(self, words: Sequence[str]) -> List[int]:
        ids: List[int] = []
        run: List[str] = []  # consecutive ordinary words, encoded in one call

        def flush():
            if run:
                ids.extend(self.backend.encode(run, is_pretokenized=True, add_special_tokens=False).ids)
                run.clear()

        for w in words:
            if "[" in w and any(t in w for t in self.never_split):
                # a special token stays whole where it is a whole word after cleaning and
                # the spaces put around CJK ideographs, as in the Python tokenizer
                for piece, _ in self._splitter.pre_tokenize_str(self._cleaner.normalize_str(w)):
                    if piece in self.never_split:
                        flush()
                        ids.append(self.token_to_id[piece])
                    else:
                        run.append(self._prepare(piece))
            else:
                run.append(self._prepare(w))
        flush()
        return ids

    def _has_special(self, text: str) -> bool:
        return "[" in text and any(t in text for t in self.never_split)

    @staticmethod
    def _whole(text: str) -> bool:
        """ASCII text without the control characters that ``str.split()`` splits on but the
        BERT cleaning removes: encoding it whole gives the ids of encoding it word by word."""
        return text.isascii() and _SPLIT_CONTROLS.search(text) is None

    def encode(self, text: str) -> List[int]:
        """Word-piece ids of ``text`` without [CLS]/[SEP], one whitespace word at a time."""
        if self._whole(text) and not self._has_special(text):
            return self.backend.encode(self._prepare(text), add_special_tokens=False).ids
        return self._encode_words(text.split())

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """``[encode(t) for t in texts]``, the plain texts in parallel calls."""
        out: List[Optional[List[int]]] = [None] * len(texts)
        whole, words = [], []
        for i, t in enumerate(texts):
            if not self._has_special(t):
                (whole if self._whole(t) else words).append(i)
        if whole:
            for i, e in zip(whole, self.backend.encode_batch([self._prepare(texts[i]) for i in whole],
                                                             add_special_tokens=False)):
                out[i] = e.ids
        if words:
            encs = self.backend.encode_batch([[self._prepare(w) for w in texts[i].split()] for i in words],
                                             is_pretokenized=True, add_special_tokens=False)
            for i, e in zip(words, encs):
                out[i] = e.ids
        for i, ids in enumerate(out):
            if ids is None:
                out[i] = self._encode_words(texts[i].split())
        return out  # type: ignore[return-value]

    def with_specials(self, ids: Sequence[int]) -> List[int]:
        return [self.cls_id, *ids, self.sep_id]

    def decode(self, ids: Sequence[int]) -> str:
        out = ""
        for i in ids:
            t = self.vocab[int(i)]
            out += t[2:] if t.startswith("##") else (" " + t if out else t)
        return out

    # --------------------------------------------------------------- files

    def save_vocab(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join(self.vocab) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    def to_tokenizers(self) -> Tokenizer:
        """A standalone ``tokenizers.Tokenizer`` of this pipeline: lower-casing inside it (for an
        uncased vocabulary), the special tokens as added special tokens, ``[CLS] $A [SEP]``
        (and ``[CLS] $A [SEP] $B [SEP]``) added by ``encode``. Its ids are :meth:`encode`'s
        except in the cases the module notes list."""
        tk = self._build_backend(lowercase=self.do_lower_case)
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", self.cls_id), ("[SEP]", self.sep_id)])
        return tk

    def save(self, path) -> Path:
        """Write ``tokenizer.json`` (``path``, or ``path/tokenizer.json`` for a folder), which
        ``tokenizers.Tokenizer.from_file`` and :meth:`load` read; written under a temporary
        name and renamed."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_tokenizers().to_str(pretty=True), encoding="utf-8")
        tmp.replace(path)
        return path

    def file_attrs(self) -> dict:
        """The keyword arguments ``formats.write_captions`` needs about this tokenizer."""
        return dict(vocab=self.vocab, tokenizer=self.name, do_lower_case=self.do_lower_case,
                    cls_id=self.cls_id, sep_id=self.sep_id, pad_id=self.pad_id, unk_id=self.unk_id)
