"""Train a tokenizer and export documents as challenge shards.

    python3 data/export_shards.py --variant sp4096 --input docs.jsonl.gz more_docs/ --workers 8
    python3 data/export_shards.py --variant sp8192 --from-hub      # the challenge's docs_selected.jsonl
    python3 data/export_shards.py --variant byte260 --input docs.jsonl
    python3 data/export_shards.py --variant sp8192 --from-hub --caseops  # case-factored, with byte sidecars

Documents come from `.jsonl` / `.jsonl.gz` files (one JSON object with a string `text`
per line), `.txt` files (one document per file), directories of those (sorted), or with
--from-hub the challenge's published `docs_selected.jsonl`, checked against the sha256 in
its sidecar. The first --val-docs documents become fineweb_val_*.bin, the rest
fineweb_train_*.bin; each document is prefixed with BOS (id 1). A SentencePiece
tokenizer is trained on train documents only (never on val), unless --reuse-model.
Output: <data-dir>/datasets/<name>/ with a manifest.json, and the tokenizer in
<data-dir>/tokenizers/. With --caseops the text is case-transformed first (data/caseops.py), the
tokenizer reserves the case controls and does not normalize, and each val shard gets a sidecar
fineweb_valbytes_NNNNNN.bin of the original UTF-8 bytes of each token (data/README.md).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from itertools import chain, islice
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python3 data/export_shards.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import caseops
from data.byte_tokenizer import BYTE_TOKENIZER_FILENAME, ByteTokenizer, load_tokenizer, tokenizer_kind
from data.cached_challenge_fineweb import DOCS_FILES, REPO_ID, DownloadError, dataset_name_for_variant, fetch_files
from data.shards import (BOS_ID, MAX_SENTENCE_BYTES, NO_LENGTH_LIMIT, VAL_BYTES_SPLIT, NoTrainingText,
                         export_documents, train_sentencepiece, write_manifest)

DATA_DIR = Path(__file__).resolve().parent
DEFAULT_VAL_DOCS = 50_000  # the challenge's validation split: its first 50,000 documents
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_TOKENIZER_TRAIN_DOCS = 100_000
ENCODE_BATCH_DOCS = 512


# ----------------------------------------------------------------------------- documents

def input_files(paths) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and document_format(p))
        elif path.is_file():
            if not document_format(path):
                raise ValueError(f"{path}: unsupported input (expected .jsonl, .jsonl.gz or .txt)")
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    if not files:
        raise ValueError(f"no .jsonl, .jsonl.gz or .txt documents under {', '.join(map(str, paths))}")
    return files


def document_format(path: Path) -> str | None:
    name = path.name
    return "jsonl" if name.endswith((".jsonl", ".jsonl.gz")) else "txt" if name.endswith(".txt") else None


def iter_documents(files):
    """Yield the text of every document, in file order."""
    for path in files:
        if document_format(path) == "txt":
            yield path.read_text(encoding="utf-8")
            continue
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield jsonl_text(line, path, lineno)


def jsonl_text(line: str, path: Path, lineno: int) -> str:
    try:
        text = json.loads(line)["text"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}:{lineno}: expected a JSON object with a string 'text' field ({exc!r})") from None
    if not isinstance(text, str):
        raise ValueError(f"{path}:{lineno}: 'text' is {type(text).__name__}, expected a string")
    return text


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_hub_docs(data_dir: Path) -> tuple[Path, dict]:
    """docs_selected.jsonl and its sidecar, fetched through the hub client and sha256-checked."""
    fetch_files([(name, None) for name in DOCS_FILES], data_dir)
    docs, sidecar_path = (data_dir / name for name in DOCS_FILES)
    sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    expected = sidecar.get("docs_sha256")
    if not expected:
        raise ValueError(f"{sidecar_path} has no docs_sha256 to check {docs} against")
    actual = sha256_of(docs)
    if actual != expected:
        raise ValueError(f"{docs}: sha256 {actual} but {sidecar_path.name} says {expected}; delete it and rerun")
    return docs, sidecar


# ----------------------------------------------------------------------------- tokenizer

def variant_vocab_size(variant: str) -> int:
    dataset_name_for_variant(variant)  # refuses anything but byte260 / sp<N>
    return ByteTokenizer().vocab_size() if variant == "byte260" else int(variant[2:])


def prepare_tokenizer(variant: str, train_texts, tokenizers_dir: Path, model_name: str, reuse_model,
                      keep_long_docs: bool, use_caseops: bool = False) -> Path:
    """Write the byte260 JSON, check a reused model, or train SentencePiece; return its path."""
    vocab_size = variant_vocab_size(variant)
    if variant == "byte260":
        return Path(ByteTokenizer().save(tokenizers_dir / BYTE_TOKENIZER_FILENAME))
    if reuse_model:
        tokenizer = load_tokenizer(reuse_model)
        if tokenizer.vocab_size() != vocab_size:
            raise ValueError(f"{reuse_model} has vocab size {tokenizer.vocab_size()}, "
                             f"but --variant {variant} needs {vocab_size}")
        if use_caseops:
            check_caseops_tokenizer(tokenizer, reuse_model)
        return Path(reuse_model)
    max_bytes = NO_LENGTH_LIMIT if keep_long_docs else MAX_SENTENCE_BYTES
    if use_caseops:
        train_texts = (caseops.encode(caseops.valid_unicode(t)) for t in train_texts)
    return Path(train_sentencepiece(train_texts, tokenizers_dir / model_name, vocab_size, max_sentence_bytes=max_bytes,
                                    caseops_pieces=caseops.CONTROLS if use_caseops else ""))


CASEOPS_PROBE = "\ue001 x  \ufb01\n\t y\ue000\ue000 "  # a control, a space run, a ligature, a newline


def check_caseops_tokenizer(tokenizer, path) -> None:
    """A CaseOps export needs a tokenizer with the controls as single pieces that reproduces its input."""
    single = all(tokenizer.encode(c) == [tokenizer.piece_to_id(c)] for c in caseops.CONTROLS)
    if not single or tokenizer.decode(tokenizer.encode(CASEOPS_PROBE)) != CASEOPS_PROBE:
        raise ValueError(f"{path} is not a CaseOps tokenizer (the case controls as pieces, no normalization): "
                         "train one with --caseops instead of --reuse-model")


# ----------------------------------------------------------------------------- encoding

class Encoder:
    """A tokenizer, with the CaseOps transform in front of it when `use_caseops`."""

    def __init__(self, tokenizer_path, use_caseops: bool = False):
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.piece_bytes = caseops.piece_byte_lengths(self.tokenizer) if use_caseops else None

    def encode_batch(self, texts: list[str], with_bytes: bool = False):
        """Concatenated ids, per-document lengths and (CaseOps `with_bytes`) each token's original
        bytes, else None: one array each pickles far faster than lists. One thread per process:
        parallelism comes from --workers, not from oversubscribed cores."""
        if self.piece_bytes is not None:
            texts = [caseops.encode(caseops.valid_unicode(t)) for t in texts]
        ids = self.tokenizer.encode(texts, num_threads=1)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
        if not with_bytes or self.piece_bytes is None:
            return flat, lengths, None
        nbytes = [caseops.token_original_bytes(i, t, self.piece_bytes) for i, t in zip(ids, texts)]
        return flat, lengths, np.concatenate(nbytes) if nbytes else np.zeros(0, dtype=np.int64)


_worker_encoder = None


def _init_worker(tokenizer_path: str, use_caseops: bool) -> None:
    global _worker_encoder
    _worker_encoder = Encoder(tokenizer_path, use_caseops)


def _encode_in_worker(texts: list[str], with_bytes: bool):
    return _worker_encoder.encode_batch(texts, with_bytes)


def batched(items, size: int):
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def encode_documents(texts, tokenizer_path: Path, workers: int, use_caseops: bool = False, sidecar_docs: int = 0):
    """Yield the ids of each document in input order, encoding batches in `workers` processes.
    With `use_caseops`, yield (ids, original bytes per token) pairs, the bytes computed for the
    first `sidecar_docs` documents only (None after them).

    At most 2 batches per worker are in flight, so memory stays bounded on huge inputs.
    """
    def split(result):
        ids, lengths, nbytes = result
        cuts = np.cumsum(lengths)[:-1]
        docs = np.split(ids, cuts)
        if not use_caseops:
            return docs
        return zip(docs, np.split(nbytes, cuts) if nbytes is not None else [None] * len(docs))

    batches = ((batch, i * ENCODE_BATCH_DOCS < sidecar_docs)
               for i, batch in enumerate(batched(texts, ENCODE_BATCH_DOCS)))
    if workers <= 1:
        encoder = Encoder(tokenizer_path, use_caseops)
        for batch, with_bytes in batches:
            yield from split(encoder.encode_batch(batch, with_bytes))
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_path), use_caseops)) as pool:
        pending = deque()
        for batch, with_bytes in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch, with_bytes)))
            if len(pending) >= 2 * workers:
                yield from split(pending.popleft().get())
        while pending:
            yield from split(pending.popleft().get())


# ----------------------------------------------------------------------------- export

def export_dataset(documents, tokenizer_path: Path, dataset_dir: Path, *, val_docs: int, shard_tokens: int,
                   workers: int, source: dict, use_caseops: bool = False) -> dict:
    """Encode the `documents` iterable, write its shards and manifest.json; return the manifest."""
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = int(tokenizer.vocab_size())
    start = time.perf_counter()
    encoded = encode_documents(documents, tokenizer_path, workers, use_caseops, sidecar_docs=val_docs)
    stats = export_documents(encoded, dataset_dir, vocab_size=vocab_size, val_docs=val_docs,
                             shard_tokens=shard_tokens, byte_sidecar=use_caseops)
    seconds = time.perf_counter() - start
    if stats["docs_val"] < val_docs:
        raise ValueError(f"only {stats['docs_val']} documents in the input, fewer than --val-docs {val_docs}")
    manifest = {
        "name": dataset_dir.name,
        "tokenizer": {"kind": tokenizer_kind(tokenizer), "path": os.path.relpath(tokenizer_path, dataset_dir),
                      "vocab_size": vocab_size, "bos_id": BOS_ID},
        "vocab_size": vocab_size,
        "shard_tokens": shard_tokens,
        **stats,
        "source": source,
    }
    if use_caseops:
        controls = {"esc": "U+E000", "title": "U+E001", "allcaps": "U+E002", "capnext": "U+E003"}
        manifest["caseops"] = {"version": caseops.CASEOPS_VERSION, "controls": controls,
                               "byte_sidecar": f"fineweb_{VAL_BYTES_SPLIT}_*.bin"}
    write_manifest(dataset_dir, manifest)
    total = stats["tokens_val"] + stats["tokens_train"]
    print(f"{dataset_dir}: {stats['docs_val']} val + {stats['docs_train']} train docs, {total:,} tokens "
          f"in {len(stats['files'])} shards, {seconds:.1f}s ({total / max(seconds, 1e-9):,.0f} tokens/s, "
          f"{workers} workers)")
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", required=True, help="sp<VOCAB_SIZE> (e.g. sp1024, sp8192) or byte260")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH", help=".jsonl, .jsonl.gz, .txt files or directories")
    source.add_argument("--from-hub", action="store_true",
                        help=f"use docs_selected.jsonl from hub dataset {REPO_ID} (fetched, sha256-checked)")
    parser.add_argument("--name", help="dataset directory name (default fineweb10B_<variant> with --from-hub, "
                                       "else custom_<variant>)")
    parser.add_argument("--val-docs", type=int, default=None,
                        help=f"leading documents for validation (default: the hub sidecar's docs_val, else {DEFAULT_VAL_DOCS})")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    parser.add_argument("--tokenizer-train-docs", type=int, default=DEFAULT_TOKENIZER_TRAIN_DOCS,
                        help="train documents (after the val split) to train SentencePiece on")
    parser.add_argument("--keep-long-docs", action="store_true",
                        help=f"train SentencePiece on documents over {MAX_SENTENCE_BYTES} bytes too (upstream skips them; "
                             "see records/BENCHMARKS.md)")
    parser.add_argument("--reuse-model", help="existing SentencePiece .model to export with instead of training one")
    parser.add_argument("--caseops", action="store_true",
                        help="case-factor the text (data/caseops.py), train the tokenizer on it with the controls "
                             "reserved and no normalization, and write fineweb_valbytes_*.bin byte sidecars")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset / tokenizer of that name")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="root of datasets/ and tokenizers/")
    return parser


def output_names(args, vocab_size: int) -> tuple[str, str]:
    """(dataset name, tokenizer model name): the challenge's own names for hub documents."""
    if args.name:
        return args.name, f"{args.name}_bpe"
    tag = "_caseops" if args.caseops else ""
    if args.from_hub:
        return dataset_name_for_variant(args.variant) + tag, f"fineweb_{vocab_size}{tag}_bpe"
    return f"custom_{args.variant}{tag}", f"custom_{args.variant}{tag}_bpe"


def run(args) -> dict:
    vocab_size = variant_vocab_size(args.variant)
    if (args.val_docs or 0) < 0 or args.shard_tokens <= 0 or args.workers <= 0:
        raise ValueError("--val-docs must be >= 0, --shard-tokens and --workers > 0")
    if args.caseops and args.variant == "byte260":
        raise ValueError("--caseops needs a SentencePiece variant (sp<VOCAB_SIZE>): byte260 already scores every byte")
    name, model_name = output_names(args, vocab_size)
    dataset_dir = args.data_dir / "datasets" / name
    model_path = args.data_dir / "tokenizers" / f"{model_name}.model"
    if not args.overwrite:
        refuse_to_replace(dataset_dir, None if args.reuse_model or args.variant == "byte260" else model_path)
    if args.from_hub:
        docs_path, sidecar = fetch_hub_docs(args.data_dir)
        files = [docs_path]
        val_docs = args.val_docs if args.val_docs is not None else int(sidecar.get("docs_val", DEFAULT_VAL_DOCS))
        source = {"kind": "hub_docs", "repo_id": REPO_ID, "docs_sha256": sidecar["docs_sha256"], "inputs": [str(docs_path)]}
    else:
        files = input_files(args.input)
        val_docs = args.val_docs if args.val_docs is not None else DEFAULT_VAL_DOCS
        source = {"kind": "files", "inputs": [str(f) for f in files]}
    train_texts = islice(iter_documents(files), val_docs, val_docs + args.tokenizer_train_docs)
    try:
        tokenizer_path = prepare_tokenizer(args.variant, train_texts, model_path.parent, model_name,
                                           args.reuse_model, args.keep_long_docs, args.caseops)
    except NoTrainingText as exc:
        raise ValueError(f"{exc}: the input has no documents after the first {val_docs} (the validation split)") from None
    return export_dataset(iter_documents(files), tokenizer_path, dataset_dir, val_docs=val_docs,
                          shard_tokens=args.shard_tokens, workers=args.workers, source=source, use_caseops=args.caseops)


def refuse_to_replace(dataset_dir: Path, model_path: Path | None) -> None:
    """Exports default to the names of downloaded data (fineweb10B_sp1024, fineweb_1024_bpe.model):
    never replace existing shards or a tokenizer unless asked to."""
    existing = [p for p in (model_path,) if p is not None and p.exists()]
    existing += sorted(dataset_dir.glob("fineweb_*.bin"))[:1]
    if existing:
        raise ValueError(f"{existing[0]} already exists; pass --overwrite to replace it, or choose --name")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, DownloadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
