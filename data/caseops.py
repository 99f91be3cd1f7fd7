"""CaseOps: a reversible case transform, and the byte sidecar that scores its tokens on the original text.

`encode(text)` lowercases the text and records the case with control characters from the Unicode
private-use area (never assigned, never changed by normalization), reserved as SentencePiece
user-defined pieces so each is always one token:

    TITLE   U+E001  the next word starts with a capital:        "Hello" -> TITLE "hello"
    ALLCAPS U+E002  every letter of the next word is a capital: "NASA"  -> ALLCAPS "nasa"
    CAPNEXT U+E003  the next letter (inside a word) is a capital: "McDonald" -> TITLE "mc" CAPNEXT "donald"
    ESC     U+E000  the next character is literal: the original text's own U+E000..U+E003 are
                    written ESC + itself, and U+2581 ESC + " " (SentencePiece decodes U+2581 as
                    a space, so it could not survive tokenization as itself).

A word is a maximal run of letters (regex `[^\\W\\d_]`, any script). A TITLE or ALLCAPS marker goes
before the single space that precedes its word, so " Hello" becomes TITLE " hello" and the word
keeps its usual "\u2581hello" piece. Only letters whose lowercase is one letter that uppercases back
to them are folded (A/a, Σ/σ, Ⱥ/ⱥ); anything else (İ, ß, the Kelvin sign, titlecase digraphs)
stays as it is, so `decode(encode(text)) == text` for every string. `decode` is strict: text
`encode` cannot produce raises CaseOpsError naming the offset.

Byte attribution (the sidecar): every character of the transformed text stands for zero or one
original character; a control stands for none (0 bytes), any other character for the original one
it decodes to (its UTF-8 length, which can differ from the lowercase one: Ⱥ is 2 bytes, ⱥ 3). A
token is charged the original bytes of the characters whose last UTF-8 byte it spells, so a
character split over byte-fallback tokens is charged once and a document's tokens add up to
exactly the UTF-8 length of the original document.
"""

from __future__ import annotations

import functools
import re

import numpy as np

ESC, TITLE, ALLCAPS, CAPNEXT = "\ue000", "\ue001", "\ue002", "\ue003"
CONTROLS = ESC + TITLE + ALLCAPS + CAPNEXT
SP_SPACE = "\u2581"  # SentencePiece's whitespace symbol
ESCAPED = {**{c: c for c in CONTROLS}, SP_SPACE: " "}  # original character -> what follows ESC
UNESCAPED = {v: k for k, v in ESCAPED.items()}
CASEOPS_VERSION = 1

_LETTERS = r"[^\W\d_]"
_LETTER = re.compile(_LETTERS)
_ENCODE = re.compile(rf"([{CONTROLS}{SP_SPACE}])|( ?)({_LETTERS}+)")
_DECODE = re.compile(rf"{ESC}(.)|([{TITLE}{ALLCAPS}])( ?)({_LETTERS}+)|{CAPNEXT}({_LETTERS})|([{CONTROLS}])", re.S)


class CaseOpsError(ValueError):
    """Text that is not the output of `encode`, or tokens that do not spell their text."""


@functools.lru_cache(maxsize=None)
def folded(c: str) -> str | None:
    """c's lowercase when the inverse restores c from it exactly (one letter to one letter), else None."""
    low = c.lower()
    if len(low) == 1 and low != c and low.upper() == c and _LETTER.fullmatch(low):
        return low
    return None


def _encode_word(space: str, word: str) -> str:
    if word.lower() == word:  # no capital: most words
        return space + word
    low = [folded(c) for c in word]
    if len(word) > 1 and all(low):
        return ALLCAPS + space + "".join(low)
    head = TITLE + space + low[0] if low[0] else space + word[0]
    return head + "".join(CAPNEXT + f if f else c for c, f in zip(word[1:], low[1:]))


def _encode_match(m: re.Match) -> str:
    reserved, space, word = m.groups()
    return ESC + ESCAPED[reserved] if reserved else _encode_word(space, word)


def encode(text: str) -> str:
    """Lowercased `text` with case controls; `decode` inverts it exactly."""
    return _ENCODE.sub(_encode_match, text)


def _upper(c: str, m: re.Match) -> str:
    up = c.upper()
    if len(up) != 1 or folded(up) != c:
        raise CaseOpsError(f"offset {m.start()}: {c!r} after a case control is not the lowercase of a capital")
    return up


def _decode_match(m: re.Match) -> str:
    escaped, marker, space, word, capital, stray = m.groups()
    if escaped is not None:
        if escaped not in UNESCAPED:
            raise CaseOpsError(f"offset {m.start()}: ESC followed by {escaped!r}, which is never escaped")
        return UNESCAPED[escaped]
    if marker == TITLE:
        return space + _upper(word[0], m) + word[1:]
    if marker == ALLCAPS:
        return space + "".join(_upper(c, m) for c in word)
    if capital is not None:
        return _upper(capital, m)
    raise CaseOpsError(f"offset {m.start()}: control U+{ord(stray):04X} is not followed by what it applies to")


def decode(text: str) -> str:
    """The original text of `encode`'s output; CaseOpsError on text `encode` cannot produce."""
    return _DECODE.sub(_decode_match, text)


# ----------------------------------------------------------------------------- byte accounting

def utf8_lengths(text: str) -> np.ndarray:
    """UTF-8 length of each character of `text` (which must be valid Unicode: no lone surrogates)."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    return 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)


def original_char_bytes(transformed: str) -> np.ndarray:
    """For each character of `encode`'s output: the UTF-8 bytes of the original character it stands
    for (0 for a control). Every control match is one control followed by the characters it decodes
    to one for one, so the sum is len(decode(transformed).encode())."""
    n = utf8_lengths(transformed)
    controls, fixed, fixes = [], [], []
    for m in _DECODE.finditer(transformed):
        controls.append(m.start())
        decoded, span = _decode_match(m), transformed[m.start() + 1:m.end()]
        if not (decoded.isascii() and span.isascii()):  # ASCII is 1 byte either way: skip the slow path
            fixed += range(m.start() + 1, m.end())
            fixes += [len(c.encode("utf-8")) for c in decoded]
    n[controls] = 0
    n[fixed] = fixes
    return n


def piece_byte_lengths(sp) -> np.ndarray:
    """UTF-8 bytes each id spells in the tokenizer's output text: a byte piece 1, a control 0,
    otherwise its piece with every U+2581 read as a space (identity normalization writes a
    space as U+2581 wherever it occurs, leading runs included)."""
    lengths = np.zeros(int(sp.vocab_size()), dtype=np.int64)
    for i in range(len(lengths)):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        lengths[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace(SP_SPACE, " ").encode("utf-8"))
    return lengths


def token_original_bytes(ids, transformed: str, piece_bytes: np.ndarray) -> np.ndarray:
    """Original UTF-8 bytes charged to each token of `ids`, the encoding of `transformed`: each
    character's original bytes go to the token that spells its last UTF-8 byte."""
    ids = np.asarray(ids, dtype=np.int64)
    char_ends = np.cumsum(utf8_lengths(transformed))
    token_ends = np.cumsum(piece_bytes[ids])
    total = int(char_ends[-1]) if len(char_ends) else 0
    if (int(token_ends[-1]) if len(ids) else 0) != total:
        raise CaseOpsError(f"the tokens spell {int(token_ends[-1]) if len(ids) else 0} bytes but the text has {total}: "
                           "the tokenizer does not reproduce its input (a CaseOps export needs the identity-"
                           "normalization tokenizer that `export_shards.py --caseops` trains)")
    charged = np.zeros(total + 1, dtype=np.int64)
    charged[char_ends] = original_char_bytes(transformed)
    return np.diff(np.cumsum(charged)[token_ends], prepend=0)


def valid_unicode(text: str) -> str:
    """`text` as the UTF-8 it can be written as: a lone surrogate (possible in JSON) becomes U+FFFD.
    This is the original text whose bytes are scored."""
    return text.encode("utf-8", errors="replace").decode("utf-8")
