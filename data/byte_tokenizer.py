"""The challenge's pure-byte tokenizer (`byte260`) and a loader for any tokenizer file.

Layout of byte260 (as published by the challenge, `fineweb_pure_byte_260.json`):
ids 0..3 are pad, BOS, EOS, unk (specials, 0 bytes); id 4 + b is the UTF-8 byte b
(1 byte each), so vocab_size = 260. Text is encoded as UTF-8 with errors="replace".

`ByteTokenizer` answers the same questions as a `sentencepiece.SentencePieceProcessor`
(vocab_size, is_control, is_unknown, is_unused, is_byte, id_to_piece, encode, decode),
so the training script's BPB byte accounting (`build_sentencepiece_luts`) works on it
unchanged: every byte id counts 1 byte, specials count 0 and are boundaries.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
BYTE_OFFSET = 4
BYTE_COUNT = 256
BYTE_TOKENIZER_FILENAME = "fineweb_pure_byte_260.json"


class ByteTokenizer:
    def vocab_size(self) -> int:
        return BYTE_OFFSET + BYTE_COUNT

    def bos_id(self) -> int:
        return BOS_ID

    def eos_id(self) -> int:
        return EOS_ID

    def is_control(self, i: int) -> bool:
        return i in (PAD_ID, BOS_ID, EOS_ID)

    def is_unknown(self, i: int) -> bool:
        return i == UNK_ID

    def is_unused(self, i: int) -> bool:
        return False

    def is_byte(self, i: int) -> bool:
        return BYTE_OFFSET <= i < BYTE_OFFSET + BYTE_COUNT

    def id_to_piece(self, i: int) -> str:
        if self.is_byte(i):
            return f"<0x{i - BYTE_OFFSET:02X}>"  # sentencepiece's spelling of byte pieces
        return ("<pad>", "<s>", "</s>", "<unk>")[i]

    def encode(self, text, num_threads=None):
        """Token ids of `text` (or a list of ids per text, like sentencepiece; num_threads is accepted and ignored)."""
        if isinstance(text, list):
            return [self.encode(t) for t in text]
        data = np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8)
        return (data.astype(np.int32) + BYTE_OFFSET).tolist()

    def decode(self, ids) -> str:
        data = bytes(int(i) - BYTE_OFFSET for i in ids if self.is_byte(int(i)))
        return data.decode("utf-8", errors="replace")

    def normalize(self, text: str) -> str:
        return text.encode("utf-8", errors="replace").decode("utf-8")

    def save(self, path) -> str:
        """Write the challenge's JSON description of byte260."""
        payload = {
            "tokenizer_type": "pure_byte",
            "config": {"pad_id": PAD_ID, "bos_id": BOS_ID, "eos_id": EOS_ID, "unk_id": UNK_ID,
                       "byte_offset": BYTE_OFFSET, "byte_count": BYTE_COUNT},
            "vocab_size": self.vocab_size(),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return str(path)

    @classmethod
    def load(cls, path) -> "ByteTokenizer":
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        expected = cls().vocab_size()
        config = payload.get("config", {})
        if payload.get("tokenizer_type") != "pure_byte" or payload.get("vocab_size") != expected or \
                config.get("byte_offset") != BYTE_OFFSET or config.get("bos_id") != BOS_ID:
            raise ValueError(f"{path}: not a byte260 tokenizer description (pure_byte, 4 specials + 256 bytes)")
        return cls()


def load_tokenizer(path):
    """A SentencePieceProcessor for `.model`, a ByteTokenizer for byte260 `.json`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    if path.suffix == ".json":
        return ByteTokenizer.load(path)
    if path.suffix == ".model":
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(path))
    raise ValueError(f"{path}: unknown tokenizer file type (expected .model or byte260 .json)")


def tokenizer_kind(tokenizer) -> str:
    return "byte" if isinstance(tokenizer, ByteTokenizer) else "sentencepiece_bpe"
