"""Measure tokenizer bytes/token and shard-export throughput on local shards.

    python3 data/bench_tokenizers.py --corpus /work/shared/corpus --train-mb 30 --vocab-sizes 1024 4096 8192

Text comes from decoding an existing challenge-format dataset with its tokenizer
(`<corpus>/datasets/*/fineweb_{train,val}_*.bin` + `<corpus>/tokenizers/*.model`):
the first --train-mb MB of train documents train the tokenizers, the val documents
(capped at --eval-mb MB) measure bytes/token. Bytes are counted with the training
script's BPB accounting (train_gpt.build_sentencepiece_luts); BOS tokens are excluded
from token counts. Export throughput is timed through the real exporter on the
training text, with 1 and with all CPU workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python3 data/bench_tokenizers.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.byte_tokenizer import ByteTokenizer, load_tokenizer
from data.export_shards import export_dataset
from data.shards import BOS_ID, MAX_SENTENCE_BYTES, NO_LENGTH_LIMIT, train_sentencepiece
from train_gpt import load_data_shard
from data.verify_dataset import byte_counts, training_script


def decoded_documents(shards, tokenizer, max_bytes: float) -> list[str]:
    """Whole documents decoded from shards, in order, until `max_bytes` of UTF-8."""
    docs, total = [], 0
    for shard in shards:
        tokens = np.asarray(load_data_shard(shard))
        bounds = np.flatnonzero(tokens == BOS_ID).tolist() + [tokens.size]
        for a, b in zip(bounds[:-1], bounds[1:]):
            text = tokenizer.decode(tokens[a + 1:b].tolist())
            docs.append(text)
            total += len(text.encode("utf-8"))
            if total >= max_bytes:
                return docs
    return docs  # the last document of a shard may run on into the next one: a short tail, kept


def bytes_per_token(tokenizer, docs: list[str]) -> tuple[float, int, int]:
    luts = tuple(t.numpy() for t in training_script().build_sentencepiece_luts(tokenizer, tokenizer.vocab_size(), "cpu"))
    n_bytes = n_tokens = 0
    for ids in tokenizer.encode(docs):
        n_bytes += int(byte_counts(np.array([BOS_ID, *ids]), luts).sum())
        n_tokens += len(ids)
    return n_bytes / n_tokens, n_bytes, n_tokens


def time_export(docs: list[str], tokenizer_path: Path, workers: int, workdir: Path) -> dict:
    start = time.perf_counter()
    manifest = export_dataset(iter(docs), tokenizer_path, workdir / f"export_{tokenizer_path.stem}_{workers}",
                              val_docs=0, shard_tokens=100_000_000, workers=workers, source={"kind": "bench"})
    seconds = time.perf_counter() - start
    tokens = manifest["tokens_train"]
    return {"workers": workers, "tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="folder with datasets/<name>/ and tokenizers/")
    parser.add_argument("--train-mb", type=float, default=30.0)
    parser.add_argument("--eval-mb", type=float, default=8.0)
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--keep-long-docs", action="store_true",
                        help="also train each vocab size with no document left out for length "
                             f"(the challenge's setting skips documents over {MAX_SENTENCE_BYTES} bytes)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch space (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_tokenizers_"))
    (source_model,) = sorted((args.corpus / "tokenizers").glob("*.model"))[:1]
    (dataset,) = sorted((args.corpus / "datasets").iterdir())[:1]
    source = load_tokenizer(source_model)
    train_docs = decoded_documents(sorted(dataset.glob("fineweb_train_*.bin")), source, args.train_mb * 1e6)
    eval_docs = decoded_documents(sorted(dataset.glob("fineweb_val_*.bin")), source, args.eval_mb * 1e6)
    mb = lambda docs: sum(len(d.encode("utf-8")) for d in docs) / 1e6  # noqa: E731
    results = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "train_text": {"docs": len(train_docs), "mb": round(mb(train_docs), 2)},
               "eval_text": {"docs": len(eval_docs), "mb": round(mb(eval_docs), 2)}, "tokenizers": []}
    print(f"train text: {len(train_docs)} docs, {mb(train_docs):.1f} MB; eval text: {len(eval_docs)} docs, "
          f"{mb(eval_docs):.1f} MB (decoded from {dataset} with {source_model.name})", flush=True)

    long_bytes = sum(len(d.encode("utf-8")) for d in train_docs if len(d.encode("utf-8")) > MAX_SENTENCE_BYTES)
    results["train_text"]["mb_in_docs_over_max_sentence_bytes"] = round(long_bytes / 1e6, 2)
    print(f"{long_bytes / 1e6:.1f} MB of the train text is in documents over {MAX_SENTENCE_BYTES} bytes", flush=True)
    candidates = [(f"{source_model.name} (the corpus's own)", source_model, None)]
    for vocab_size in args.vocab_sizes:
        for keep_long in (False, True) if args.keep_long_docs else (False,):
            start = time.perf_counter()
            path = Path(train_sentencepiece(train_docs, workdir / f"bench_{vocab_size}{'_long' * keep_long}_bpe",
                                            vocab_size, max_sentence_bytes=NO_LENGTH_LIMIT if keep_long else MAX_SENTENCE_BYTES))
            label = f"sp{vocab_size} trained here" + (", long docs kept" if keep_long else "")
            candidates.append((label, path, round(time.perf_counter() - start, 1)))
    candidates.append(("byte260", Path(ByteTokenizer().save(workdir / "byte260.json")), None))

    for label, path, train_seconds in candidates:
        bpt, n_bytes, n_tokens = bytes_per_token(load_tokenizer(path), eval_docs)
        row = {"tokenizer": label, "train_seconds": train_seconds, "eval_bytes": n_bytes, "eval_tokens": n_tokens,
               "bytes_per_token": round(bpt, 4)}
        if label.endswith("trained here") or label == "byte260":
            row["export"] = [time_export(train_docs, path, w, workdir) for w in sorted({1, os.cpu_count() or 1})]
        results["tokenizers"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
