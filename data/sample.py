"""Build a small challenge-format dataset from Python standard-library docstrings.

No download and no third-party text in the repository: the documents are the
docstrings of the stdlib modules of the running Python (one document per module, in
sorted path order), so the sample is deterministic for a given Python install.

    python3 data/sample.py OUT_DIR [--vocab-size 512] [--train-tokens N] [--val-docs K]
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import sysconfig
from itertools import chain, islice
from pathlib import Path

if __package__ in (None, ""):  # run as `python3 data/sample.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.shards import (NO_LENGTH_LIMIT, export_documents, read_manifest_if_complete, train_sentencepiece,
                         write_manifest)

DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
# Only used to decide how much text to train the tokenizer on; more documents are
# pulled afterwards if the guess was short.
BYTES_PER_TOKEN_GUESS = 4.0
SAMPLE_VERSION = 3


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]  # prune: site-packages can be huge
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def module_docstrings(path: Path) -> str:
    """All docstrings of one module (module, classes, functions) joined by blank lines."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):  # the stdlib ships a few deliberately broken files
        return ""
    return "\n\n".join(docstrings_under(tree))


def docstrings_under(node):
    """Docstrings of `node` and of the classes and functions it defines, in source order.
    Only statement bodies are walked, not every expression node: that was most of the build time."""
    doc = ast.get_docstring(node)
    if doc:
        yield doc
    for child in definitions_in(node.body):
        yield from docstrings_under(child)


def definitions_in(statements):
    """Class and function definitions, including those under `if`/`try`/`with` blocks."""
    for stmt in statements:
        if isinstance(stmt, DEFINITIONS):
            yield stmt
        elif isinstance(stmt, (ast.If, ast.Try, ast.With)):
            blocks = [stmt.body, getattr(stmt, "orelse", []), getattr(stmt, "finalbody", [])]
            blocks += [handler.body for handler in getattr(stmt, "handlers", [])]
            for block in blocks:
                yield from definitions_in(block)


def stdlib_documents():
    for path in stdlib_files():
        text = module_docstrings(path)
        if text:
            yield text


def take_until_bytes(docs, num_bytes: float) -> list[str]:
    taken, total = [], 0
    for doc in docs:
        taken.append(doc)
        total += len(doc.encode("utf-8"))
        if total >= num_bytes:
            break
    return taken


def build_sample(
    out_dir,
    vocab_size: int = 512,
    train_tokens: int = 200_000,
    val_docs: int = 32,
    shard_tokens: int = 100_000,
) -> tuple[str, str]:
    """Build (or reuse) `out_dir/datasets/stdlib_sp<V>/` and `out_dir/tokenizers/stdlib_<V>_bpe.model`.

    Val is the first `val_docs` documents; the tokenizer is trained on train documents
    only; train shards hold exactly `train_tokens` tokens. Returns (dataset_dir, tokenizer_path).
    """
    out_dir = Path(out_dir)
    dataset_dir = out_dir / "datasets" / f"stdlib_sp{vocab_size}"
    tokenizer_path = out_dir / "tokenizers" / f"stdlib_{vocab_size}_bpe.model"
    source = dict(
        kind="stdlib_docstrings",
        version=SAMPLE_VERSION,
        python=sys.version.split()[0],
        vocab_size=vocab_size,
        train_tokens=train_tokens,
        val_docs=val_docs,
        shard_tokens=shard_tokens,
    )
    if read_manifest_if_complete(dataset_dir, expect_source=source) and tokenizer_path.is_file():
        return str(dataset_dir), str(tokenizer_path)

    import sentencepiece as spm

    docs = stdlib_documents()
    val = list(islice(docs, val_docs))
    train_head = take_until_bytes(docs, train_tokens * BYTES_PER_TOKEN_GUESS)
    train_sentencepiece(train_head, tokenizer_path.with_suffix(""), vocab_size, max_sentence_bytes=NO_LENGTH_LIMIT)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    encoded = (sp.encode(text) for text in chain(val, train_head, docs))  # rest of docs: lazily
    stats = export_documents(
        encoded, dataset_dir, vocab_size=vocab_size, val_docs=val_docs,
        shard_tokens=shard_tokens, max_train_tokens=train_tokens,
    )
    if stats["docs_val"] < val_docs or stats["tokens_train"] < train_tokens:
        raise ValueError(
            f"the stdlib docstrings of this Python give only {stats['docs_val']} val documents and "
            f"{stats['tokens_train']} train tokens; asked for {val_docs} and {train_tokens}"
        )
    write_manifest(dataset_dir, {
        "name": dataset_dir.name,
        "tokenizer": {"kind": "sentencepiece_bpe", "path": os.path.relpath(tokenizer_path, dataset_dir),
                      "vocab_size": vocab_size, "bos_id": 1},
        "vocab_size": vocab_size,
        "shard_tokens": shard_tokens,
        **stats,
        "source": source,
    })
    return str(dataset_dir), str(tokenizer_path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="root that receives datasets/ and tokenizers/")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--train-tokens", type=int, default=200_000)
    parser.add_argument("--val-docs", type=int, default=32)
    parser.add_argument("--shard-tokens", type=int, default=100_000)
    args = parser.parse_args(argv)
    dataset_dir, tokenizer_path = build_sample(
        args.out_dir, args.vocab_size, args.train_tokens, args.val_docs, args.shard_tokens
    )
    print(f"dataset: {dataset_dir}\ntokenizer: {tokenizer_path}")


if __name__ == "__main__":
    main()
