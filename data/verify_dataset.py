"""Check an exported dataset against its tokenizer, with the training script's own code.

    python3 data/verify_dataset.py data/datasets/fineweb10B_sp1024 data/tokenizers/fineweb_1024_bpe.model

Checks every shard's header and size and that its ids are < vocab size (train_gpt's
`load_data_shard`), that shards are numbered without gaps and each split starts with
BOS, that BOS counts and token counts match manifest.json when there is one, and that
the BPB byte accounting (train_gpt's `build_sentencepiece_luts`) gives exactly the
UTF-8 length of the decoded (normalized) text of every sampled document. Prints a
decoded sample and bytes per token. Exits 1 listing every problem found.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as `python3 data/verify_dataset.py`
    sys.path.insert(0, str(REPO_ROOT))

from data.byte_tokenizer import load_tokenizer
from data.shards import BOS_ID, shard_name

SPLITS = ("val", "train")


def training_script():
    """train_gpt.py at the repo root: the byte accounting must be the one training uses."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import train_gpt

    return train_gpt


def byte_counts(tokens: np.ndarray, luts) -> np.ndarray:
    """Bytes credited to tokens[1:] given tokens[:-1], exactly as the training script scores them."""
    base, leading_space, boundary = luts
    prev, target = tokens[:-1], tokens[1:]
    return base[target].astype(np.int64) + (leading_space[target] & ~boundary[prev])


def documents_in(tokens: np.ndarray, last_shard: bool) -> list[np.ndarray]:
    """Documents (BOS included) that start and end inside this shard: the last one only
    ends here in the split's last shard, otherwise it runs on into the next shard."""
    bounds = np.flatnonzero(tokens == BOS_ID).tolist() + ([tokens.size] if last_shard else [])
    return [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def check_split(dataset_dir: Path, split: str, vocab_size: int, luts, tokenizer, sample_docs: int,
                problems: list[str]) -> dict:
    load_data_shard = training_script().load_data_shard
    paths = sorted(dataset_dir.glob(f"fineweb_{split}_*.bin"))
    expected = [dataset_dir / shard_name(split, i) for i in range(len(paths))]
    if paths != expected:
        problems.append(f"{split} shards are not numbered 000000..{len(paths) - 1:06d}: {[p.name for p in paths]}")
    stats = {"files": len(paths), "tokens": 0, "docs": 0, "bytes": 0, "checked_docs": 0, "sample": None}
    for index, path in enumerate(paths):
        try:
            tokens = load_data_shard(path, vocab_size).astype(np.int64)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if index == 0 and tokens.size and tokens[0] != BOS_ID:
            problems.append(f"{path.name}: first token is {tokens[0]}, expected BOS {BOS_ID}")
        stats["tokens"] += tokens.size
        stats["docs"] += int((tokens == BOS_ID).sum())
        stats["bytes"] += int(byte_counts(tokens, luts).sum()) if tokens.size else 0
        for doc in sampled(documents_in(tokens, index == len(paths) - 1), sample_docs - stats["checked_docs"]):
            stats["sample"] = stats["sample"] or tokenizer.decode(doc.tolist())
            check_document_bytes(doc, luts, tokenizer, path, problems)
            stats["checked_docs"] += 1
    return stats


def sampled(docs: list, count: int) -> list:
    """Up to `count` documents spread evenly over the list."""
    if count <= 0 or not docs:
        return []
    return [docs[i] for i in np.linspace(0, len(docs) - 1, min(count, len(docs))).astype(int)]


def check_document_bytes(doc: np.ndarray, luts, tokenizer, path: Path, problems: list[str]) -> None:
    text = tokenizer.decode(doc.tolist())
    accounted, actual = int(byte_counts(doc, luts).sum()), len(text.encode("utf-8"))
    if accounted != actual:
        problems.append(f"{path.name}: byte accounting gives {accounted} bytes for a document whose decoded "
                        f"text has {actual} UTF-8 bytes: {text[:60]!r}")


def check_manifest(dataset_dir: Path, vocab_size: int, results: dict, problems: list[str]) -> None:
    path = dataset_dir / "manifest.json"
    if not path.is_file():
        print(f"(no {path.name}: document counts not cross-checked)")
        return
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("vocab_size") not in (None, vocab_size):
        problems.append(f"manifest vocab_size {manifest['vocab_size']} but the tokenizer has {vocab_size}")
    for entry in manifest.get("files", []):
        shard = dataset_dir / entry["name"]
        if not shard.is_file() or shard.stat().st_size != entry["bytes"]:
            problems.append(f"{entry['name']}: listed in the manifest with {entry['bytes']} bytes, "
                            f"found {shard.stat().st_size if shard.is_file() else 'no file'}")
    for split in SPLITS:
        for key, found in (("docs", results[split]["docs"]), ("tokens", results[split]["tokens"])):
            listed = manifest.get(f"{key}_{split}")
            if listed is not None and listed != found:
                problems.append(f"{split}: manifest lists {listed} {key}, the shards hold {found}"
                                + (" (BOS count)" if key == "docs" else ""))


def verify(dataset_dir, tokenizer_path, sample_docs: int = 200) -> list[str]:
    """Print a report on the dataset; return the list of problems (empty when it is sound)."""
    dataset_dir = Path(dataset_dir)
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = int(tokenizer.vocab_size())
    luts = tuple(t.cpu().numpy() for t in training_script().build_sentencepiece_luts(tokenizer, vocab_size, "cpu"))
    problems: list[str] = []
    results = {split: check_split(dataset_dir, split, vocab_size, luts, tokenizer, sample_docs, problems)
               for split in SPLITS}
    for split, r in results.items():
        if r["files"] == 0:
            problems.append(f"no fineweb_{split}_*.bin shards in {dataset_dir}")
            continue
        print(f"{split}: {r['files']} shards, {r['tokens']:,} tokens, {r['docs']:,} documents, "
              f"{r['bytes'] / max(r['tokens'], 1):.4f} bytes/token; byte accounting checked on {r['checked_docs']} documents")
    check_manifest(dataset_dir, vocab_size, results, problems)
    sample = results["val"]["sample"] or results["train"]["sample"]
    if sample is not None:
        print(f"decoded sample: {sample[:300]!r}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset_dir")
    parser.add_argument("tokenizer", help="SentencePiece .model or byte260 .json")
    parser.add_argument("--sample-docs", type=int, default=200, help="documents per split to decode and check")
    args = parser.parse_args(argv)
    try:
        problems = verify(args.dataset_dir, args.tokenizer, args.sample_docs)
    except (ValueError, FileNotFoundError) as exc:
        problems = [str(exc)]
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    print("FAILED" if problems else "OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
