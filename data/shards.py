"""Shard files and SentencePiece training in the challenge's format.

A shard is 256 little-endian int32 (magic, version, token count, zeros) followed by
`count` little-endian uint16 tokens. A CaseOps byte sidecar (`fineweb_valbytes_NNNNNN.bin`, beside
`fineweb_val_NNNNNN.bin`) has the same layout with magic VAL_BYTES_MAGIC and one uint16 per token
of its shard: the original UTF-8 bytes charged to that token. Every exporter in data/ writes through
`write_shard` / `ShardWriter`, and every SentencePiece model comes from
`train_sentencepiece`, so the format and the tokenizer settings live in one place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from itertools import chain
from typing import Iterable

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_LIMIT = 1 << 16  # uint16 storage: ids must be < 65536, never wrapped
BOS_ID = 1
# A different magic: a sidecar can never be read as a token shard, nor a shard as a sidecar.
VAL_BYTES_MAGIC = 20240521
VAL_BYTES_SPLIT = "valbytes"  # fineweb_valbytes_*.bin: the val glob fineweb_val_*.bin never matches it

# The challenge's SentencePiece settings (data/download_hf_docs_and_tokenize.py upstream),
# except that we keep sentencepiece's default hard_vocab_limit=True: a model trained for
# vocab N must have exactly N ids, or training fails loudly.
SENTENCEPIECE_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
)
# CaseOps tokenizers: the case controls are always one piece each, and no normalization, so that
# decode(encode(text)) == text exactly (nmt_nfkc keeps private-use characters but folds ligatures,
# collapses whitespace runs and newlines, and drops leading spaces: the original bytes would be lost).
CASEOPS_SETTINGS = dict(normalization_rule_name="identity", remove_extra_whitespaces=False)
# sentencepiece's default: documents longer than this many bytes are left out of tokenizer
# training (with a warning), as they were for the challenge's published tokenizers.
MAX_SENTENCE_BYTES = 4192
NO_LENGTH_LIMIT = 1 << 30  # max_sentence_bytes that keeps every document


class NoTrainingText(ValueError):
    """train_sentencepiece was given no non-empty document."""


def shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


def shard_nbytes(num_tokens: int) -> int:
    return HEADER_BYTES + 2 * num_tokens


def write_shard(path, tokens, magic: int = MAGIC) -> int:
    """Write `tokens` (array or iterable of ints) as one shard; return the token count.

    Raises ValueError naming `path` if any token is outside [0, 65536). The file is
    written under a temporary name and renamed, so a crash never leaves a truncated
    shard under the final name.
    """
    path = Path(path)
    arr = np.asarray(tokens if hasattr(tokens, "__len__") else list(tokens))
    if arr.ndim != 1:
        raise ValueError(f"{path}: tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size and arr.dtype != np.uint16:
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{path}: tokens must be integers, got dtype {arr.dtype}")
        bad = (arr < 0) | (arr >= TOKEN_LIMIT)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{path}: token {int(arr[first])} at position {first} does not fit uint16 [0, {TOKEN_LIMIT})"
            )
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (magic, VERSION, arr.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(arr.astype("<u2", copy=False).tobytes())
    os.replace(tmp, path)
    return int(arr.size)


class ShardWriter:
    """Cut a stream of token arrays into `fineweb_{split}_NNNNNN.bin` shards of `shard_tokens`."""

    def __init__(self, dataset_dir, split: str, shard_tokens: int, magic: int = MAGIC):
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.dataset_dir = Path(dataset_dir)
        self.split, self.magic = split, magic
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.files: list[dict] = []  # {"name", "split", "tokens", "bytes"} per written shard

    def add(self, tokens: np.ndarray) -> None:
        """Append tokens (already checked to be < vocab size) and flush every full shard."""
        pos = 0
        while pos < len(tokens):
            take = min(len(self.buffer) - self.fill, len(tokens) - pos)
            self.buffer[self.fill : self.fill + take] = tokens[pos : pos + take]
            self.fill += take
            pos += take
            if self.fill == len(self.buffer):
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        name = shard_name(self.split, len(self.files))
        write_shard(self.dataset_dir / name, self.buffer[: self.fill], self.magic)
        self.files.append({"name": name, "split": self.split, "tokens": self.fill, "bytes": shard_nbytes(self.fill)})
        self.fill = 0


def export_documents(
    encoded_docs: Iterable,
    dataset_dir,
    *,
    vocab_size: int,
    val_docs: int,
    shard_tokens: int,
    max_train_tokens: int | None = None,
    byte_sidecar: bool = False,
) -> dict:
    """Write BOS-prefixed documents to val shards (the first `val_docs`) then train shards.

    `encoded_docs` yields one token sequence per document (without BOS). It is consumed
    lazily and abandoned once `max_train_tokens` train tokens are written (the last
    document is cut there). With `byte_sidecar` it yields (tokens, original bytes per token)
    and the val documents' bytes go to `fineweb_valbytes_*.bin`, cut exactly as the val shards
    (BOS is charged 0 bytes). Returns the split statistics and the list of files written.
    """
    if vocab_size > TOKEN_LIMIT:
        raise ValueError(f"vocab_size={vocab_size} does not fit uint16 shards (at most {TOKEN_LIMIT})")
    dataset_dir = Path(dataset_dir)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    (dataset_dir / "manifest.json").unlink(missing_ok=True)
    for stale in dataset_dir.glob("fineweb_*_*.bin"):
        stale.unlink()  # a shorter re-export must not leave old shards behind
    writers = {split: ShardWriter(dataset_dir, split, shard_tokens) for split in ("val", "train")}
    if byte_sidecar:
        writers[VAL_BYTES_SPLIT] = ShardWriter(dataset_dir, VAL_BYTES_SPLIT, shard_tokens, VAL_BYTES_MAGIC)
    stats = {"docs_val": 0, "docs_train": 0, "tokens_val": 0, "tokens_train": 0}
    for doc in encoded_docs:
        split = "val" if stats["docs_val"] < val_docs else "train"
        if byte_sidecar:
            doc, nbytes = doc
            if split == "val":
                writers[VAL_BYTES_SPLIT].add(sidecar_entries(nbytes, len(doc), stats["docs_val"]))
        tokens = np.empty(len(doc) + 1, dtype=np.int64)
        tokens[0] = BOS_ID
        tokens[1:] = doc
        check_token_range(tokens, vocab_size, f"document {stats['docs_val'] + stats['docs_train']}")
        if split == "train" and max_train_tokens is not None:
            tokens = tokens[: max_train_tokens - stats["tokens_train"]]
        writers[split].add(tokens)
        stats[f"docs_{split}"] += 1
        stats[f"tokens_{split}"] += len(tokens)
        if split == "train" and max_train_tokens is not None and stats["tokens_train"] >= max_train_tokens:
            break
    for writer in writers.values():
        writer.flush()
    return {**stats, "files": [f for writer in writers.values() for f in writer.files]}


def sidecar_entries(nbytes, num_tokens: int, doc_index: int) -> np.ndarray:
    """A document's sidecar values: 0 for its BOS, then its tokens' original bytes."""
    nbytes = np.asarray(nbytes, dtype=np.int64)
    if len(nbytes) != num_tokens or (nbytes < 0).any() or (nbytes >= TOKEN_LIMIT).any():
        raise ValueError(f"val document {doc_index}: {len(nbytes)} byte counts for {num_tokens} tokens, "
                         f"or a count outside [0, {TOKEN_LIMIT})")
    return np.concatenate(([0], nbytes)).astype(np.uint16)


def check_token_range(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bad.any():
        raise ValueError(f"{where}: token id {int(tokens[bad][0])} outside vocab_size={vocab_size}")


def write_manifest(dataset_dir, manifest: dict) -> Path:
    """Write `manifest.json` last, so its presence marks a complete export."""
    path = Path(dataset_dir) / "manifest.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def clean_for_sentencepiece(texts: Iterable[str]):
    """NULs confuse sentencepiece's C++ strings; blank documents carry no statistics."""
    for text in texts:
        text = text.replace("\x00", " ").strip()
        if text:
            yield text


def train_sentencepiece(texts: Iterable[str], model_prefix, vocab_size: int,
                        max_sentence_bytes: int = MAX_SENTENCE_BYTES, caseops_pieces: str = "") -> str:
    """Train a BPE model with the challenge's settings; return the path of `<model_prefix>.model`.

    `texts` is any iterable of documents (held in memory by sentencepiece while training);
    those longer than `max_sentence_bytes` are skipped. Raises ValueError if the text
    cannot support exactly `vocab_size` pieces. `caseops_pieces` (CaseOps text): these
    characters become user-defined pieces and normalization is switched off (CASEOPS_SETTINGS).
    """
    import sentencepiece as spm

    if not 0 < vocab_size <= TOKEN_LIMIT:
        raise ValueError(f"vocab_size must be in (0, {TOKEN_LIMIT}], got {vocab_size}")
    prefix = Path(model_prefix)
    docs = clean_for_sentencepiece(texts)
    first = next(docs, None)
    if first is None:  # sentencepiece's own message for this is an internal assertion
        raise NoTrainingText(f"no non-empty documents to train {prefix} on")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=chain([first], docs),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            num_threads=os.cpu_count() or 1,
            max_sentence_length=max_sentence_bytes,
            minloglevel=1,  # warnings and errors only: the info log is thousands of lines
            **{**SENTENCEPIECE_SETTINGS, **(CASEOPS_SETTINGS if caseops_pieces else {})},
            **({"user_defined_symbols": list(caseops_pieces)} if caseops_pieces else {}),
        )
    except RuntimeError as exc:
        raise ValueError(f"sentencepiece could not train vocab_size={vocab_size} for {prefix}: {exc}") from exc
    return str(prefix) + ".model"


def read_manifest_if_complete(dataset_dir, expect_source: dict | None = None) -> dict | None:
    """The dataset's manifest if every shard it lists is present at its listed size
    (and its `source` equals `expect_source` when given); otherwise None."""
    dataset_dir = Path(dataset_dir)
    try:
        manifest = json.loads((dataset_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if expect_source is not None and manifest.get("source") != expect_source:
        return None
    for entry in manifest.get("files", []):
        path = dataset_dir / entry["name"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            return None
    return manifest
