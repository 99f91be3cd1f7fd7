"""Download the challenge's published FineWeb shards and tokenizer from the Hugging Face hub.

    python3 data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80

Driven by the export's `manifest.json` (downloaded first, kept in data/). Files land in
data/datasets/<dataset>/ and data/tokenizers/ (data/docs_selected.jsonl with --with-docs).
Resumable: a file already present at the size the manifest implies is skipped; a
missing, partial or wrong-size file is downloaded again. The hub location can be changed
with MATCHED_FINEWEB_REPO_ID and MATCHED_FINEWEB_REMOTE_ROOT_PREFIX, as upstream.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python3 data/cached_challenge_fineweb.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.shards import shard_name, shard_nbytes

REPO_ID = os.environ.get("MATCHED_FINEWEB_REPO_ID", "willdepueoai/parameter-golf")
REMOTE_ROOT_PREFIX = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "datasets")
DATA_DIR = Path(__file__).resolve().parent
DOCS_FILES = ("docs_selected.jsonl", "docs_selected.source_manifest.json")


class DownloadError(RuntimeError):
    pass


def dataset_name_for_variant(variant: str) -> str:
    if variant == "byte260" or (variant.startswith("sp") and variant[2:].isdigit()):
        return f"fineweb10B_{variant}"
    raise ValueError(f"unsupported variant {variant!r}; expected byte260 or sp<VOCAB_SIZE> (sp1024, sp4096, ...)")


def hub_download(relative_path: str) -> Path:
    """Fetch `<remote root>/<relative_path>` into the hub cache; return the cached file."""
    from huggingface_hub import hf_hub_download

    remote = Path(REMOTE_ROOT_PREFIX, relative_path) if REMOTE_ROOT_PREFIX else Path(relative_path)
    parent = remote.parent.as_posix()
    cached = hf_hub_download(repo_id=REPO_ID, filename=remote.name, subfolder=None if parent == "." else parent,
                             repo_type="dataset")
    return Path(cached).resolve(strict=True)  # cache entries can be symlinks into blobs/


def is_complete(path: Path, expected_size: int | None) -> bool:
    if not path.is_file():
        return False
    return path.stat().st_size == expected_size if expected_size is not None else path.stat().st_size > 0


def place(source: Path, destination: Path) -> None:
    """Hard-link (or copy) the cached file under a temporary name, then rename into place."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(destination.name + ".part")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, destination)


def fetch_files(wanted: list[tuple[str, int | None]], data_dir: Path = DATA_DIR) -> int:
    """Make every (relative path, expected size or None) present under `data_dir`.

    Returns how many files were downloaded. Raises DownloadError naming every file still
    missing if the hub fails (unreachable, file absent, wrong size).
    """
    missing = [(rel, size) for rel, size in wanted if not is_complete(data_dir / rel, size)]
    for done, (rel, size) in enumerate(missing):
        try:
            place(hub_download(rel), data_dir / rel)
            if not is_complete(data_dir / rel, size):
                got = (data_dir / rel).stat().st_size
                (data_dir / rel).unlink()
                raise DownloadError(f"got {got} bytes, the manifest implies {size}")
        except Exception as exc:  # any failure (network, auth, missing entry) stops the run the same way
            still = "\n  ".join(r for r, _ in missing[done:])
            raise DownloadError(
                f"could not download {rel} from hub dataset {REPO_ID} (root {REMOTE_ROOT_PREFIX!r}): "
                f"{type(exc).__name__}: {exc}\n{len(missing) - done} file(s) still missing under {data_dir}:\n  {still}"
            ) from exc
    return len(missing)


def load_manifest(data_dir: Path, skip_download: bool) -> dict:
    path = data_dir / "manifest.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if skip_download:
            raise DownloadError(f"--skip-manifest given but {path} does not exist") from None
    except ValueError:
        if skip_download:
            raise DownloadError(f"{path} is not valid JSON; run without --skip-manifest to fetch it again") from None
    path.unlink(missing_ok=True)  # absent or unreadable: fetch it again
    fetch_files([("manifest.json", None)], data_dir)
    return json.loads(path.read_text(encoding="utf-8"))


def split_shard_sizes(stats: dict, split: str, shard_tokens: int | None) -> list[int | None]:
    """Expected byte size of each shard of a split: all full but the last. None where unknown."""
    count, tokens = int(stats[f"files_{split}"]), stats.get(f"tokens_{split}")
    if count == 0:
        return []
    if shard_tokens is None or tokens is None:
        return [None] * count
    last = int(tokens) - (count - 1) * shard_tokens
    if not 0 < last <= shard_tokens:
        return [None] * count  # stats disagree with the shard size: fall back to presence checks
    return [shard_nbytes(shard_tokens)] * (count - 1) + [shard_nbytes(last)]


def plan_downloads(manifest: dict, variant: str, train_shards: int, with_docs: bool) -> list[tuple[str, int | None]]:
    """The (relative path, expected size) of every file this variant needs, val first."""
    name = dataset_name_for_variant(variant)
    datasets = {d.get("name"): d for d in manifest.get("datasets", [])}
    if name not in datasets:
        raise DownloadError(f"dataset {name} is not in the manifest of {REPO_ID}; it has: {', '.join(sorted(map(str, datasets)))}")
    entry = datasets[name]
    stats = entry.get("stats") or {}
    shard_tokens = manifest.get("shard_size")
    available = int(stats.get("files_train", 0))
    if not 0 <= train_shards <= available:
        raise DownloadError(f"{variant} has {available} training shards on {REPO_ID}; asked for {train_shards}")
    val_sizes = split_shard_sizes(stats, "val", shard_tokens)
    train_sizes = split_shard_sizes(stats, "train", shard_tokens)[:train_shards]
    wanted = [(f"datasets/{name}/{shard_name('val', i)}", s) for i, s in enumerate(val_sizes)]
    wanted += [(f"datasets/{name}/{shard_name('train', i)}", s) for i, s in enumerate(train_sizes)]
    tokenizer = next((t for t in manifest.get("tokenizers", []) if t.get("name") == entry.get("tokenizer_name")), None)
    if tokenizer is None:
        raise DownloadError(f"tokenizer {entry.get('tokenizer_name')!r} of {name} is not in the manifest")
    artifacts = [tokenizer[k] for k in ("model_path", "vocab_path", "path") if tokenizer.get(k)]
    if not artifacts:
        raise DownloadError(f"tokenizer entry {tokenizer.get('name')!r} lists no files")
    wanted += [(str(a), None) for a in artifacts]
    if with_docs:
        wanted += [(f, None) for f in DOCS_FILES]
    return wanted


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Download challenge FineWeb shards from the Hugging Face hub")
    parser.add_argument("train_shards_positional", nargs="?", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--train-shards", type=int, default=80,
                        help="training shards to download (100M tokens each); default 80")
    parser.add_argument("--variant", default="sp1024", help="sp1024, sp4096, sp8192, ..., or byte260")
    parser.add_argument("--skip-manifest", action="store_true", help="use the local data/manifest.json as is")
    parser.add_argument("--with-docs", action="store_true",
                        help="also fetch docs_selected.jsonl and its sidecar (for re-tokenizing)")
    return parser


def main(argv=None, data_dir: Path = DATA_DIR) -> int:
    args = build_parser().parse_args(argv)
    train_shards = args.train_shards if args.train_shards_positional is None else args.train_shards_positional
    try:
        dataset_name_for_variant(args.variant)
        manifest = load_manifest(data_dir, args.skip_manifest)
        wanted = plan_downloads(manifest, args.variant, train_shards, args.with_docs)
        fetched = fetch_files(wanted, data_dir)
    except (DownloadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.variant}: {len(wanted)} files in {data_dir} ({fetched} downloaded, {len(wanted) - fetched} already complete)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
