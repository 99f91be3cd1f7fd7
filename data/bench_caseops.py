"""Measure CaseOps against plain tokenization on the same documents.

    python3 data/bench_caseops.py --corpus /work/shared/corpus --train-mb 15 --vocab-sizes 1024 8192

Decodes an existing challenge-format dataset to text (every val document, then --train-mb MB of
train documents), writes it as one docs.jsonl, and exports it twice per vocab size with the real
exporter: plain (`sp<V>`) and `--caseops` (`sp<V>_caseops`), each tokenizer trained on the same
train documents. Reports, on the val documents, the original UTF-8 bytes per token and tokens per
document, and runs data/verify_dataset.py on every export (which proves the CaseOps accounting).
The exports stay in --out for training runs (DATA_PATH=<out>/datasets/<name>).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python3 data/bench_caseops.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.bench_tokenizers import decoded_documents
from data.byte_tokenizer import load_tokenizer
from data.export_shards import main as export_main
from data.verify_dataset import verify


def write_docs(corpus: Path, train_mb: float, path: Path) -> tuple[int, int]:
    """docs.jsonl: every val document, then train documents; returns (val docs, val UTF-8 bytes)."""
    (source_model,) = sorted((corpus / "tokenizers").glob("*.model"))[:1]
    (dataset,) = sorted((corpus / "datasets").iterdir())[:1]
    tokenizer = load_tokenizer(source_model)
    val = decoded_documents(sorted(dataset.glob("fineweb_val_*.bin")), tokenizer, float("inf"))
    train = decoded_documents(sorted(dataset.glob("fineweb_train_*.bin")), tokenizer, train_mb * 1e6)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for text in val + train:
            f.write(json.dumps({"text": text}) + "\n")
    print(f"{path}: {len(val)} val + {len(train)} train documents (decoded from {dataset} with {source_model.name})",
          flush=True)
    return len(val), sum(len(t.encode("utf-8")) for t in val)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="folder with datasets/<name>/ and tokenizers/")
    parser.add_argument("--train-mb", type=float, default=15.0)
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "datasets" / "bench_caseops")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    docs = args.out / "docs.jsonl"
    val_docs, val_bytes = write_docs(args.corpus, args.train_mb, docs)
    rows = []
    for vocab in args.vocab_sizes:
        for flag in ([], ["--caseops"]):
            name = f"webmix_sp{vocab}" + ("_caseops" if flag else "")
            code = export_main(["--variant", f"sp{vocab}", "--input", str(docs), "--val-docs", str(val_docs),
                                "--tokenizer-train-docs", "10000000", "--name", name, "--data-dir", str(args.out),
                                "--workers", str(args.workers), "--overwrite", *flag])
            if code:
                raise SystemExit(f"export of {name} failed")
            dataset_dir = args.out / "datasets" / name
            manifest = json.loads((dataset_dir / "manifest.json").read_text())
            problems = verify(dataset_dir, args.out / "tokenizers" / f"{name}_bpe.model")
            tokens = manifest["tokens_val"] - manifest["docs_val"]  # BOS is not a scored text token
            rows.append({"dataset": name, "val_docs": val_docs, "val_bytes": val_bytes, "val_tokens": tokens,
                         "bytes_per_token": round(val_bytes / tokens, 4), "tokens_per_doc": round(tokens / val_docs, 1),
                         "verify": "OK" if not problems else problems})
            print(json.dumps(rows[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
