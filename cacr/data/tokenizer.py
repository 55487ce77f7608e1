"""BERT WordPiece tokenizer (bert-base-cased conventions), as UNITER's preprocessing used it.

Basic tokenization (clean control characters, split on whitespace and punctuation, space
around CJK characters, optional lower-casing and accent stripping for uncased vocabularies),
then greedy longest-match-first WordPiece with ``##`` continuations; a word longer than
``max_input_chars_per_word`` or with no match becomes ``[UNK]``. UNITER's preprocessing ran
the tokenizer on each whitespace-separated word in turn (``encode``); the ids of the special
tokens are read from the vocabulary, never assumed.
"""
from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Dict, List, Optional, Sequence

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch) in ("Cc", "Cf")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPieceTokenizer:
    """``tokenize(text) -> word pieces``; ``encode(text) -> ids`` (no specials);
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
        self.name = name
        self.do_lower_case = do_lower_case
        self.unk_token = unk_token
        self.max_input_chars_per_word = max_input_chars_per_word
        self.pad_id = self.token_to_id["[PAD]"]
        self.unk_id = self.token_to_id["[UNK]"]
        self.cls_id = self.token_to_id["[CLS]"]
        self.sep_id = self.token_to_id["[SEP]"]
        self.mask_id = self.token_to_id["[MASK]"]

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
        """Load a named vocabulary (e.g. ``bert-base-cased``) through ``transformers``' local cache.

        Needs the optional ``transformers`` package and the vocabulary in its cache (or
        network); tests and the synthetic world use ``from_vocab_file``.
        """
        try:
            from transformers import BertTokenizer  # optional
        except ImportError:
            raise ImportError(
                f"loading the tokenizer {name!r} by name needs the optional package `transformers`; "
                f"install it, or pass the path of a local vocab.txt instead") from None
        hf = BertTokenizer.from_pretrained(name)
        vocab = [t for t, _ in sorted(hf.vocab.items(), key=lambda kv: kv[1])]
        return cls(vocab, name=name, do_lower_case=bool(hf.do_lower_case))

    @classmethod
    def load(cls, spec) -> "WordPieceTokenizer":
        """A path to a vocab.txt, or a name such as ``bert-base-cased`` / ``bert-base-uncased``."""
        p = Path(str(spec))
        if p.is_file():
            return cls.from_vocab_file(p, do_lower_case="uncased" in p.name)
        if p.suffix == ".txt" or "/" in str(spec):
            raise FileNotFoundError(f"{spec}: vocabulary file not found")
        return cls.from_name(str(spec))

    def __len__(self) -> int:
        return len(self.vocab)

    # basic tokenization -------------------------------------------------
    def _basic(self, text: str) -> List[str]:
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if _is_whitespace(ch):
                chars.append(" ")
            elif _is_cjk(cp):
                chars.extend((" ", ch, " "))
            else:
                chars.append(ch)
        out = []
        for word in "".join(chars).split():
            if self.do_lower_case:
                word = "".join(c for c in unicodedata.normalize("NFD", word.lower())
                               if unicodedata.category(c) != "Mn")
            cur = ""
            for ch in word:
                if _is_punctuation(ch):
                    if cur:
                        out.append(cur)
                        cur = ""
                    out.append(ch)
                else:
                    cur += ch
            if cur:
                out.append(cur)
        return out

    def _wordpiece(self, word: str) -> List[str]:
        if len(word) > self.max_input_chars_per_word:
            return [self.unk_token]
        pieces = []
        start = 0
        while start < len(word):
            end = len(word)
            piece = None
            while start < end:
                sub = word[start:end]
                if start > 0:
                    sub = "##" + sub
                if sub in self.token_to_id:
                    piece = sub
                    break
                end -= 1
            if piece is None:
                return [self.unk_token]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> List[str]:
        return [p for w in self._basic(text) for p in self._wordpiece(w)]

    def encode(self, text: str) -> List[int]:
        """Word-piece ids of ``text`` without [CLS]/[SEP], one whitespace word at a time."""
        ids = []
        for word in text.strip().split():
            ids.extend(self.token_to_id[t] for t in self.tokenize(word))
        return ids

    def with_specials(self, ids: Sequence[int]) -> List[int]:
        return [self.cls_id, *ids, self.sep_id]

    def decode(self, ids: Sequence[int]) -> str:
        out = ""
        for i in ids:
            t = self.vocab[int(i)]
            out += t[2:] if t.startswith("##") else (" " + t if out else t)
        return out

    def save_vocab(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join(self.vocab) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    def file_attrs(self) -> dict:
        """The keyword arguments ``formats.write_captions`` needs about this tokenizer."""
        return dict(vocab=self.vocab, tokenizer=self.name, do_lower_case=self.do_lower_case,
                    cls_id=self.cls_id, sep_id=self.sep_id, pad_id=self.pad_id, unk_id=self.unk_id)
