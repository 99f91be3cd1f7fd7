"""Check an exported dataset against its tokenizer, with the training script's own code.

    python3 data/verify_dataset.py data/datasets/fineweb10B_sp1024 data/tokenizers/fineweb_1024_bpe.model

Checks every shard's header and size and that its ids are < vocab size (train_gpt's
`load_data_shard`), that shards are numbered without gaps and each split starts with
BOS, that BOS counts and token counts match manifest.json when there is one, and that
the BPB byte accounting (train_gpt's `build_sentencepiece_luts`) gives exactly the
UTF-8 length of the decoded (normalized) text of every sampled document. Prints a
decoded sample and bytes per token. Exits 1 listing every problem found.

Every dataset: no validation document appears in the training shards (a hash of every
document's tokens, from its BOS to the next; the same text always has the same tokens).

A CaseOps dataset (data/caseops.py; manifest `caseops`, fineweb_valbytes_* sidecars or a
tokenizer with the case controls) is checked against its original documents (--docs, default
the export's inputs listed in manifest.json): for every validation document, the inverse
transform of its decoded tokens equals the original text byte for byte, and its byte sidecar
(read with train_gpt's `load_validation_bytes`) sums to the original's UTF-8 length. The first
mismatch stops the check and names the document.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as `python3 data/verify_dataset.py`
    sys.path.insert(0, str(REPO_ROOT))

from data import caseops
from data.byte_tokenizer import load_tokenizer
from data.shards import BOS_ID, VAL_BYTES_SPLIT, shard_name

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
                problems: list[str], on_shard=None) -> dict:
    """Headers, numbering, BOS, byte accounting of sampled documents (`luts` None: not checked);
    `on_shard(tokens, path)` sees every shard that loads."""
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
        if on_shard is not None:
            on_shard(tokens, path)
        if luts is None:
            continue
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


class DocumentStream:
    """Whole documents (BOS up to the next BOS) of one split, fed shard by shard in order: a document
    that runs on into the next shard is completed there. Yields (where, tokens)."""

    def __init__(self):
        self.tail, self.where = None, None

    def feed(self, tokens: np.ndarray, name: str):
        bounds = np.flatnonzero(tokens == BOS_ID)
        head_end = int(bounds[0]) if len(bounds) else len(tokens)
        if self.tail is not None:
            self.tail = np.concatenate((self.tail, tokens[:head_end]))
            if not len(bounds):
                return
            yield self.where, self.tail
        for a, b in zip(bounds[:-1], bounds[1:]):
            yield f"{name} token {a}", tokens[a:b]
        if len(bounds):
            self.tail, self.where = tokens[bounds[-1]:], f"{name} token {bounds[-1]}"

    def finish(self):
        if self.tail is not None:
            yield self.where, self.tail


def digest(doc: np.ndarray) -> bytes:
    return hashlib.blake2b(doc.astype("<u2").tobytes(), digest_size=16).digest()


class OverlapCheck:
    """Hashes every validation document, then every training document: a training document with the
    tokens of a validation document is a validation document leaked into training."""

    def __init__(self):
        self.val, self.train = DocumentStream(), DocumentStream()
        self.val_digests: dict[bytes, int] = {}
        self.leaks, self.first_leak, self.train_docs = 0, None, 0

    def on_val(self, tokens: np.ndarray, path: Path) -> None:
        for _, doc in self.val.feed(tokens, path.name):
            self.val_digests.setdefault(digest(doc), len(self.val_digests))

    def on_train(self, tokens: np.ndarray, path: Path) -> None:
        self.check(self.train.feed(tokens, path.name))

    def check(self, docs) -> None:
        for where, doc in docs:
            self.train_docs += 1
            val_index = self.val_digests.get(digest(doc))
            if val_index is not None:
                self.leaks += 1
                leak = f"validation document {val_index} is the training document at {where}"
                self.first_leak = self.first_leak or leak

    def report(self, problems: list[str]) -> None:
        for _, doc in self.val.finish():
            self.val_digests.setdefault(digest(doc), len(self.val_digests))
        self.check(self.train.finish())
        if self.leaks:
            problems.append(f"{self.leaks} training documents are validation documents (first: {self.first_leak})")
        print(f"train/val overlap: {len(self.val_digests):,} distinct validation documents hashed, "
              f"{self.train_docs:,} training documents checked, {self.leaks} found in both")


def is_caseops_dataset(dataset_dir: Path, tokenizer) -> bool:
    manifest = dataset_dir / "manifest.json"
    listed = manifest.is_file() and "caseops" in json.loads(manifest.read_text(encoding="utf-8"))
    sidecars = any(dataset_dir.glob(f"fineweb_{VAL_BYTES_SPLIT}_*.bin"))
    controls = hasattr(tokenizer, "piece_to_id") and training_script().is_caseops_tokenizer(tokenizer)
    return listed or sidecars or controls


def original_documents(dataset_dir: Path, docs):
    """The original documents, as the export read them: from `docs` or the manifest's inputs."""
    from data.export_shards import input_files, iter_documents

    manifest = dataset_dir / "manifest.json"
    if not docs and manifest.is_file():
        docs = json.loads(manifest.read_text(encoding="utf-8")).get("source", {}).get("inputs")
    if not docs:
        raise ValueError(f"{dataset_dir} does not list its input documents: pass --docs with the files it was "
                         "exported from")
    try:
        files = input_files(docs)
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"{exc}: pass --docs with the documents {dataset_dir} was exported from") from None
    return (caseops.valid_unicode(text) for text in iter_documents(files))


def check_caseops(dataset_dir: Path, tokenizer, docs, problems: list[str]) -> None:
    """Prove the val byte accounting document by document; stop at the first mismatch, naming it."""
    tg = training_script()
    pattern = str(dataset_dir / "fineweb_val_*.bin")
    tokens = np.concatenate([tg.load_data_shard(p) for p in tg.shard_files(pattern, "validation")]).astype(np.int64)
    try:
        sidecar = tg.load_validation_bytes(pattern)
    except ValueError as exc:
        problems.append(str(exc))
        return
    if sidecar is None:
        problems.append(f"CaseOps dataset without fineweb_{VAL_BYTES_SPLIT}_*.bin byte sidecars: val_bpb would count "
                        "the transformed text. Export it again with --caseops")
        return
    sidecar = sidecar.numpy()
    bounds = np.flatnonzero(tokens == BOS_ID).tolist() + [len(tokens)]
    originals = original_documents(dataset_dir, docs)
    checked = total = 0
    for index, (a, b), original in zip(range(len(bounds) - 1), zip(bounds[:-1], bounds[1:]), originals):
        problem = document_problem(tokenizer, tokens[a + 1:b], sidecar[a:b], original)
        if problem:
            problems.append(f"validation document {index} (val token {a}): {problem}")
            return
        checked, total = checked + 1, total + int(sidecar[a:b].sum())
    if checked != len(bounds) - 1 or bounds[0] != 0:
        problems.append(f"the val shards hold {len(bounds) - 1} documents (first BOS at {bounds[0]}) but only "
                        f"{checked} original documents were read: wrong --docs?")
        return
    luts = tuple(t.numpy() for t in tg.build_sentencepiece_luts(tokenizer, tokenizer.vocab_size(), "cpu"))
    table = int(byte_counts(tokens, luts).sum())  # what the tables would have counted
    print(f"caseops: {checked:,} validation documents proven: inverse(decode(tokens)) == original byte for byte, "
          f"byte sidecar = original UTF-8 bytes ({total:,}, {total / max(len(tokens) - checked, 1):.4f} per non-BOS "
          f"token; the tokenizer's tables would count {table:,})")


def document_problem(tokenizer, ids: np.ndarray, sidecar: np.ndarray, original: str) -> str | None:
    try:
        restored = caseops.decode(tokenizer.decode(ids.tolist()))
    except caseops.CaseOpsError as exc:
        return f"the decoded tokens are not CaseOps text ({exc})"
    want, got = original.encode("utf-8"), restored.encode("utf-8")
    if got != want:
        at = next((i for i, (x, y) in enumerate(zip(want, got)) if x != y), min(len(want), len(got)))
        return (f"decodes to {len(got)} bytes, not the original's {len(want)}; first difference at byte {at}: "
                f"original {want[max(at - 20, 0):at + 20]!r}, decoded {got[max(at - 20, 0):at + 20]!r}")
    if sidecar[0] != 0 or int(sidecar.sum()) != len(want):
        return (f"byte sidecar charges {int(sidecar.sum())} bytes (BOS {int(sidecar[0])}) but the original "
                f"has {len(want)} UTF-8 bytes")
    return None


def verify(dataset_dir, tokenizer_path, sample_docs: int = 200, docs=None) -> list[str]:
    """Print a report on the dataset; return the list of problems (empty when it is sound)."""
    dataset_dir = Path(dataset_dir)
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = int(tokenizer.vocab_size())
    use_caseops = is_caseops_dataset(dataset_dir, tokenizer)
    # A CaseOps tokenizer's tables count the transformed text: its accounting is proven by check_caseops.
    luts = None if use_caseops else tuple(
        t.cpu().numpy() for t in training_script().build_sentencepiece_luts(tokenizer, vocab_size, "cpu"))
    problems: list[str] = []
    overlap = OverlapCheck()
    results = {split: check_split(dataset_dir, split, vocab_size, luts, tokenizer, sample_docs, problems,
                                  overlap.on_val if split == "val" else overlap.on_train)
               for split in SPLITS}
    for split, r in results.items():
        if r["files"] == 0:
            problems.append(f"no fineweb_{split}_*.bin shards in {dataset_dir}")
            continue
        accounting = "" if luts is None else (f", {r['bytes'] / max(r['tokens'], 1):.4f} bytes/token; "
                                              f"byte accounting checked on {r['checked_docs']} documents")
        print(f"{split}: {r['files']} shards, {r['tokens']:,} tokens, {r['docs']:,} documents{accounting}")
    overlap.report(problems)
    if use_caseops and results["val"]["files"]:
        check_caseops(dataset_dir, tokenizer, docs, problems)
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
    parser.add_argument("--docs", nargs="+", metavar="PATH",
                        help="CaseOps: the documents the dataset was exported from (default: the manifest's inputs)")
    args = parser.parse_args(argv)
    try:
        problems = verify(args.dataset_dir, args.tokenizer, args.sample_docs, args.docs)
    except (ValueError, FileNotFoundError) as exc:
        problems = [str(exc)]
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    print("FAILED" if problems else "OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
