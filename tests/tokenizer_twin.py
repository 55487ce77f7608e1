"""The slow, obvious twin of ``cacr.data.tokenizer``: the project's former pure-Python BERT
WordPiece, written from the rules of the Python BERT tokenizer that UNITER's preprocessing
ran on each whitespace word of a caption. Kept only for the tests, which compare the
Rust-backed tokenizer to it on many random Unicode-heavy texts.

Rules: drop NUL, U+FFFD and Cc/Cf characters except tab/newline/return; tab, newline,
return and Zs are spaces; spaces around CJK ideographs; split on whitespace; a token that is
a special token is kept whole; otherwise (uncased) ``str.lower()`` then NFD without Mn; split
on punctuation (ASCII punctuation or a P* category); greedy longest-match-first WordPiece,
``[UNK]`` for a word without a full cover or longer than ``max_input_chars_per_word``.
"""
from __future__ import annotations

import unicodedata
from typing import Dict, List, Sequence

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


class PythonWordPiece:
    def __init__(self, vocab: Sequence[str], *, do_lower_case: bool = False, unk_token: str = "[UNK]",
                 max_input_chars_per_word: int = 100):
        self.vocab = list(vocab)
        self.token_to_id: Dict[str, int] = {t: i for i, t in enumerate(self.vocab)}
        self.do_lower_case = do_lower_case
        self.unk_token = unk_token
        self.max_input_chars_per_word = max_input_chars_per_word

    def basic(self, text: str) -> List[str]:
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
            if word in SPECIAL_TOKENS:
                out.append(word)
                continue
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

    def wordpiece(self, word: str) -> List[str]:
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
        return [p for w in self.basic(text) for p in self.wordpiece(w)]

    def encode(self, text: str) -> List[int]:
        """UNITER's preprocessing: the tokenizer on each ``str.split()`` word in turn."""
        return [self.token_to_id[p] for word in text.strip().split() for p in self.tokenize(word)]
