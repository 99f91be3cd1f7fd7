"""Tests for data/: shard format, sample builder, exporter, downloader, verifier (CPU, offline)."""

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data import cached_challenge_fineweb as hub  # noqa: E402
from data.byte_tokenizer import ByteTokenizer, load_tokenizer  # noqa: E402
from data.export_shards import main as export_main  # noqa: E402
from data.sample import build_sample  # noqa: E402
from data.shards import HEADER_BYTES, shard_nbytes, write_shard  # noqa: E402
from train_gpt import load_data_shard as read_shard  # noqa: E402
from data.verify_dataset import byte_counts, training_script, verify  # noqa: E402

WORDS = ("the of and model token byte shard train value loss data text word golf parameter small compress "
         "night river stone light quick brown fox jumps over lazy dog people water early garden number "
         "between through because language window summer winter library").split()
EXTRAS = ["café", "naïve", "€5", "日本語", "🙂", "Zürich", "3.14159", "2026", "x²", "ﬁne"]  # ﬁ: NFKC folds it


def make_docs(n, seed=0):
    """Deterministic pseudo-English documents with digits, non-ASCII, odd whitespace."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        paragraphs = []
        for _ in range(rng.randint(1, 3)):
            words = [rng.choice(WORDS) if rng.random() > 0.08 else rng.choice(EXTRAS) for _ in range(rng.randint(8, 60))]
            paragraphs.append(" ".join(words).capitalize() + ".")
        docs.append("\n\n".join(paragraphs) + ("  \ttrailing " if rng.random() < 0.2 else ""))
    return docs


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def split_docs(tokens):
    starts = list(np.flatnonzero(tokens == 1)) + [len(tokens)]
    return [tokens[a + 1:b] for a, b in zip(starts[:-1], starts[1:])]


def split_tokens(dataset_dir, split):
    return np.concatenate([read_shard(p) for p in sorted(Path(dataset_dir).glob(f"fineweb_{split}_*.bin"))])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = make_docs(300)
    return docs, write_jsonl(root / "docs.jsonl", docs)


@pytest.fixture(scope="module")
def sp_export(corpus, tmp_path_factory):
    """sp400 export of the synthetic corpus: 20 val docs, small shards, 2 workers."""
    docs, path = corpus
    data_dir = tmp_path_factory.mktemp("export")
    assert export_main(["--variant", "sp400", "--input", str(path), "--val-docs", "20", "--shard-tokens", "3000",
                        "--workers", "2", "--data-dir", str(data_dir)]) == 0
    return data_dir / "datasets" / "custom_sp400", data_dir / "tokenizers" / "custom_sp400_bpe.model"


# ----------------------------------------------------------------------------- shard format

def test_write_shard_layout(tmp_path):
    path = tmp_path / "s.bin"
    assert write_shard(path, [1, 5, 65535, 0]) == 4
    raw = path.read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert list(header[:3]) == [20240520, 1, 4] and not header[3:].any()
    assert list(np.frombuffer(raw[HEADER_BYTES:], dtype="<u2")) == [1, 5, 65535, 0]
    assert len(raw) == shard_nbytes(4)
    assert list(read_shard(path)) == [1, 5, 65535, 0]


@pytest.mark.parametrize("bad", [65536, -1, 70000])
def test_write_shard_refuses_out_of_range_tokens(tmp_path, bad):
    path = tmp_path / "bad.bin"
    with pytest.raises(ValueError, match="bad.bin"):
        write_shard(path, np.array([1, 2, bad, 3]))
    assert not path.exists() and not list(tmp_path.iterdir())


def test_read_shard_rejects_truncated_file(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(100))
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="s.bin"):
        read_shard(path)


# ----------------------------------------------------------------------------- sample

def test_build_sample_is_complete_and_cached(tmp_path):
    kwargs = dict(vocab_size=384, train_tokens=30_000, val_docs=6, shard_tokens=16_000)
    dataset_dir, tokenizer = build_sample(tmp_path, **kwargs)
    names = sorted(p.name for p in Path(dataset_dir).glob("*.bin"))
    assert names == ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"]
    train = split_tokens(dataset_dir, "train")
    assert len(train) == 30_000 and train[0] == 1 and train.max() < 384
    assert int((split_tokens(dataset_dir, "val") == 1).sum()) == 6
    assert load_tokenizer(tokenizer).vocab_size() == 384
    mtimes = {p: p.stat().st_mtime_ns for p in Path(dataset_dir).iterdir()}
    assert build_sample(tmp_path, **kwargs) == (dataset_dir, tokenizer)
    assert {p: p.stat().st_mtime_ns for p in Path(dataset_dir).iterdir()} == mtimes  # not rebuilt
    assert verify(dataset_dir, tokenizer) == []


def test_build_sample_rebuilds_after_damage(tmp_path):
    kwargs = dict(vocab_size=384, train_tokens=10_000, val_docs=4, shard_tokens=16_000)
    dataset_dir, tokenizer = build_sample(tmp_path, **kwargs)
    shard = Path(dataset_dir) / "fineweb_train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    build_sample(tmp_path, **kwargs)
    assert len(read_shard(shard)) == 10_000


# ----------------------------------------------------------------------------- export

def test_export_round_trip(corpus, sp_export):
    docs, _ = corpus
    dataset_dir, tokenizer_path = sp_export
    sp = load_tokenizer(tokenizer_path)
    assert sp.vocab_size() == 400
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    assert (manifest["docs_val"], manifest["docs_train"]) == (20, 280)
    train_files = [f for f in manifest["files"] if f["split"] == "train"]
    assert [f["name"] for f in train_files] == [f"fineweb_train_{i:06d}.bin" for i in range(len(train_files))]
    assert len(train_files) > 2 and all(f["tokens"] == 3000 for f in train_files[:-1])  # all full but the last
    shard_docs = split_docs(split_tokens(dataset_dir, "val")) + split_docs(split_tokens(dataset_dir, "train"))
    assert len(shard_docs) == len(docs)
    for original, ids in zip(docs, shard_docs):
        assert sp.decode(ids.tolist()) == sp.decode(sp.encode(original))
        assert sp.decode(ids.tolist()) == sp.normalize(original).replace("\u2581", " ")


def test_export_parallel_equals_serial(corpus, sp_export, tmp_path):
    _, path = corpus
    dataset_dir, tokenizer_path = sp_export
    assert export_main(["--variant", "sp400", "--input", str(path), "--val-docs", "20", "--shard-tokens", "3000",
                        "--workers", "1", "--reuse-model", str(tokenizer_path), "--data-dir", str(tmp_path)]) == 0
    serial = tmp_path / "datasets" / "custom_sp400"
    for shard in dataset_dir.glob("*.bin"):
        assert (serial / shard.name).read_bytes() == shard.read_bytes()


def test_export_byte260_is_lossless(tmp_path):
    docs = make_docs(30) + ["", "tab\there\r\nCRLF and a lone surrogate \ud800 replaced"]
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    assert export_main(["--variant", "byte260", "--input", str(path), "--val-docs", "5",
                        "--data-dir", str(tmp_path / "out")]) == 0
    dataset_dir = tmp_path / "out" / "datasets" / "custom_byte260"
    tok = load_tokenizer(tmp_path / "out" / "tokenizers" / "fineweb_pure_byte_260.json")
    decoded = [tok.decode(d.tolist()) for d in split_docs(np.concatenate(
        [split_tokens(dataset_dir, "val"), split_tokens(dataset_dir, "train")]))]
    assert decoded == [d.encode("utf-8", errors="replace").decode("utf-8") for d in docs]
    assert verify(dataset_dir, tmp_path / "out" / "tokenizers" / "fineweb_pure_byte_260.json") == []


def test_export_reads_txt_and_gzip_directories(tmp_path):
    import gzip

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("first document", encoding="utf-8")
    with gzip.open(src / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "second"}) + "\n" + json.dumps({"text": "third"}) + "\n")
    (src / "ignored.csv").write_text("x,y")
    assert export_main(["--variant", "byte260", "--input", str(src), "--val-docs", "1",
                        "--data-dir", str(tmp_path / "out")]) == 0
    tok = ByteTokenizer()
    dataset_dir = tmp_path / "out" / "datasets" / "custom_byte260"
    assert [tok.decode(d.tolist()) for d in split_docs(split_tokens(dataset_dir, "train"))] == ["second", "third"]


@pytest.mark.parametrize("line, why", [("{not json", "d.jsonl:2"), ('{"txt": "x"}', "d.jsonl:2"),
                                       ('{"text": 5}', "d.jsonl:2")])
def test_export_refuses_bad_jsonl(tmp_path, capsys, line, why):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    assert export_main(["--variant", "byte260", "--input", str(path), "--val-docs", "0",
                        "--data-dir", str(tmp_path / "out")]) == 1
    assert why in capsys.readouterr().err


def test_export_refuses_wrong_vocab(tmp_path, corpus, sp_export, capsys):
    _, path = corpus
    common = ["--input", str(path), "--val-docs", "2", "--data-dir", str(tmp_path)]
    assert export_main(["--variant", "sp512", "--reuse-model", str(sp_export[1]), *common]) == 1
    assert "vocab size 400" in capsys.readouterr().err
    assert export_main(["--variant", "sp60000", *common]) == 1  # far more pieces than this text has
    assert "vocab_size=60000" in capsys.readouterr().err
    too_many_val = ["--input", str(path), "--val-docs", "999", "--data-dir", str(tmp_path)]
    assert export_main(["--variant", "sp400", *too_many_val]) == 1
    assert "no documents after the first 999 (the validation split)" in capsys.readouterr().err
    assert export_main(["--variant", "byte260", *too_many_val]) == 1
    assert "fewer than --val-docs 999" in capsys.readouterr().err


def test_export_refuses_to_replace_existing(corpus, tmp_path, capsys):
    _, path = corpus
    args = ["--variant", "sp400", "--input", str(path), "--val-docs", "20", "--data-dir", str(tmp_path)]
    assert export_main(args) == 0
    model = tmp_path / "tokenizers" / "custom_sp400_bpe.model"
    before = model.read_bytes()
    assert export_main(args) == 1
    assert "custom_sp400_bpe.model already exists" in capsys.readouterr().err
    assert model.read_bytes() == before
    assert export_main([*args, "--overwrite"]) == 0


def test_export_keep_long_docs(tmp_path, capsys):
    long_docs = [" ".join(make_docs(40, seed=i)) for i in range(6)]  # each far over 4192 bytes
    path = write_jsonl(tmp_path / "long.jsonl", long_docs)
    common = ["--variant", "sp400", "--input", str(path), "--val-docs", "1", "--data-dir", str(tmp_path)]
    assert export_main(common) == 1  # upstream's setting skips every one of them
    assert "sentencepiece could not train" in capsys.readouterr().err
    assert export_main([*common, "--keep-long-docs"]) == 0


# ----------------------------------------------------------------------------- byte accounting

@pytest.mark.parametrize("kind", ["sentencepiece", "byte260"])
def test_byte_accounting_equals_utf8_length_of_normalized_text(corpus, sp_export, kind):
    train_gpt = training_script()
    tok = load_tokenizer(sp_export[1]) if kind == "sentencepiece" else ByteTokenizer()
    luts = tuple(t.numpy() for t in train_gpt.build_sentencepiece_luts(tok, tok.vocab_size(), "cpu"))
    docs, _ = corpus
    for text in docs + ["  leading spaces", "digits 1234567890", "\u00a0nbsp and ﬁ ligature", "🙂🙂 x"]:
        tokens = np.array([1, *tok.encode(text)])
        normalized = tok.normalize(text).replace("\u2581", " ")
        assert byte_counts(tokens, luts).sum() == len(normalized.encode("utf-8")), text


# ----------------------------------------------------------------------------- verify

def copy_dataset(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_verify_accepts_good_export(sp_export, capsys):
    from data.verify_dataset import main as verify_main

    assert verify_main([str(sp_export[0]), str(sp_export[1])]) == 0
    out = capsys.readouterr().out
    assert "bytes/token" in out and "decoded sample" in out and out.strip().endswith("OK")


@pytest.mark.parametrize("damage, message", [
    ("truncate", "bytes but the header says"),
    ("magic", "not a shard"),
    ("token", ">= VOCAB_SIZE=400"),
    ("drop_bos", "BOS count"),
    ("gap", "not numbered"),
])
def test_verify_catches_corrupt_shard(sp_export, tmp_path, capsys, damage, message):
    from data.verify_dataset import main as verify_main

    dataset_dir = copy_dataset(sp_export[0], tmp_path / "ds")
    shard = dataset_dir / "fineweb_train_000001.bin"
    raw = bytearray(shard.read_bytes())
    tokens = np.frombuffer(raw, dtype="<u2", offset=HEADER_BYTES)
    if damage == "truncate":
        raw = raw[:-7]
    elif damage == "magic":
        raw[0] ^= 0xFF
    elif damage == "token":
        raw[HEADER_BYTES + 20:HEADER_BYTES + 22] = np.array([400], dtype="<u2").tobytes()
    elif damage == "drop_bos":
        at = HEADER_BYTES + 2 * int(np.flatnonzero(tokens == 1)[0])
        raw[at:at + 2] = np.array([5], dtype="<u2").tobytes()
    if damage == "gap":
        shard.rename(dataset_dir / "fineweb_train_000009.bin")
    else:
        shard.write_bytes(bytes(raw))
    assert verify_main([str(dataset_dir), str(sp_export[1])]) == 1
    assert message in capsys.readouterr().err


def test_verify_refuses_tokenizer_with_smaller_vocab(sp_export, tmp_path):
    problems = verify(sp_export[0], ByteTokenizer().save(tmp_path / "b.json"))
    assert any("VOCAB_SIZE=260" in p for p in problems)


# ----------------------------------------------------------------------------- downloader (hub mocked)

@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A published export of one dataset (1 val + 3 train shards of 1000 tokens, the last 500)
    served by a stand-in for hub_download that records what it was asked for."""
    remote = tmp_path / "remote"
    name = "fineweb10B_sp1024"
    for split, sizes in (("val", [1000]), ("train", [1000, 1000, 500])):
        for i, n in enumerate(sizes):
            write_shard(remote / "datasets" / name / f"fineweb_{split}_{i:06d}.bin", np.full(n, 7))
    (remote / "tokenizers").mkdir()
    (remote / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"model")
    manifest = {
        "shard_size": 1000,
        "datasets": [{"name": name, "tokenizer_name": "sp_bpe_1024",
                      "stats": {"files_val": 1, "files_train": 3, "tokens_val": 1000, "tokens_train": 2500}}],
        "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model"}],
    }
    (remote / "manifest.json").write_text(json.dumps(manifest))
    requested = []

    def fake_download(relative_path):
        requested.append(relative_path)
        source = remote / relative_path
        if not source.is_file():
            raise FileNotFoundError(f"404 {relative_path}")
        return source

    monkeypatch.setattr(hub, "hub_download", fake_download)
    local = tmp_path / "data"
    local.mkdir()
    return local, requested, name


def test_download_skips_complete_and_replaces_partial(fake_hub):
    local, requested, name = fake_hub
    val = local / "datasets" / name / "fineweb_val_000000.bin"
    write_shard(val, np.full(1000, 7))  # complete: kept
    partial = local / "datasets" / name / "fineweb_train_000001.bin"
    partial.write_bytes(b"\0" * 100)  # interrupted earlier: replaced
    assert hub.main(["--variant", "sp1024", "--train-shards", "2"], data_dir=local) == 0
    assert requested == ["manifest.json", f"datasets/{name}/fineweb_train_000000.bin",
                         f"datasets/{name}/fineweb_train_000001.bin", "tokenizers/fineweb_1024_bpe.model"]
    assert len(read_shard(partial)) == 1000
    assert not (local / "datasets" / name / "fineweb_train_000002.bin").exists()
    requested.clear()
    assert hub.main(["--variant", "sp1024", "--train-shards", "3"], data_dir=local) == 0
    assert requested == [f"datasets/{name}/fineweb_train_000002.bin"]  # the short last shard
    assert len(read_shard(local / "datasets" / name / "fineweb_train_000002.bin")) == 500


def test_download_unreachable_hub_names_missing_files(fake_hub, monkeypatch, capsys):
    local, _, name = fake_hub
    assert hub.main(["--variant", "sp1024", "--train-shards", "1"], data_dir=local) == 0
    (local / "datasets" / name / "fineweb_train_000000.bin").unlink()

    def offline(relative_path):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(hub, "hub_download", offline)
    assert hub.main(["--variant", "sp1024", "--train-shards", "2"], data_dir=local) == 1
    err = capsys.readouterr().err
    assert "ConnectionError" in err and "2 file(s) still missing" in err
    assert "fineweb_train_000000.bin" in err and "fineweb_train_000001.bin" in err
    assert "fineweb_val_000000.bin" not in err  # complete, so not missing


def test_download_refuses_bad_requests(fake_hub, capsys):
    local, _, _ = fake_hub
    assert hub.main(["--variant", "sp1024", "--train-shards", "4"], data_dir=local) == 1
    assert "has 3 training shards" in capsys.readouterr().err
    assert hub.main(["--variant", "sp4096"], data_dir=local) == 1
    assert "fineweb10B_sp4096 is not in the manifest" in capsys.readouterr().err
    assert hub.main(["--variant", "gpt2"], data_dir=local) == 1
    assert "unsupported variant" in capsys.readouterr().err


def test_hub_docs_are_sha256_checked(tmp_path, monkeypatch):
    from data import export_shards

    remote = tmp_path / "remote"
    remote.mkdir()
    docs = write_jsonl(remote / "docs_selected.jsonl", make_docs(12))
    sidecar = {"docs_sha256": export_shards.sha256_of(docs), "docs_val": 2}
    (remote / "docs_selected.source_manifest.json").write_text(json.dumps(sidecar))
    monkeypatch.setattr(hub, "hub_download", lambda rel: remote / rel)
    out = tmp_path / "data"
    assert export_main(["--variant", "byte260", "--from-hub", "--data-dir", str(out)]) == 0
    manifest = json.loads((out / "datasets" / "fineweb10B_byte260" / "manifest.json").read_text())
    assert manifest["docs_val"] == 2 and manifest["source"]["docs_sha256"] == sidecar["docs_sha256"]
    (out / "docs_selected.jsonl").write_text("tampered\n")
    with pytest.raises(ValueError, match="sha256"):
        export_shards.fetch_hub_docs(out)
