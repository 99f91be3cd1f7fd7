"""Tests of CaseOps (data/caseops.py), its byte sidecars, their proof (data/verify_dataset.py) and
their use by train_gpt.py (CPU, offline, data made here)."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import train_gpt as tg  # noqa: E402
from data import caseops  # noqa: E402
from data.byte_tokenizer import load_tokenizer  # noqa: E402
from data.export_shards import main as export_main  # noqa: E402
from data.shards import HEADER_BYTES, VAL_BYTES_MAGIC, write_shard  # noqa: E402
from data.verify_dataset import main as verify_main, verify  # noqa: E402

# Pieces of adversarial text: every case style, scripts with and without case, letters whose case
# mapping is not one-to-one, the reserved characters themselves, whitespace runs, emoji, marks.
PIECES = [
    "the", "Hello", "WORLD", "iPhone", "McDonald", "camelCaseWord", "HTTPServer", "A", "I", "a", "xY", "ABCdef",
    "Αθήνα", "ΟΔΟΣ", "σς", "Москва", "МГУ", "ǅemal", "Ǆ", "İstanbul", "STRAßE", "ẞ", "\u212a", "Ⱥⱥ", "ﬁne",
    "Ⅻ", "µ", "ſ", "ΐ", "日本語", "한국어", "Ֆ", "ᏣᎳᎩ", "Ꭰ", "𐐀𐐨", "e\u0301", "E\u0301COLE", "\u0301", "123",
    "4ABC5", "x²", "½", "🙂", "👍🏽", "👩\u200d💻", "\ue000", "\ue001", "\ue002", "\ue003", "\ue004", "\u2581",
    "\u2581\u2581", "\ue001 ", " \ue002x", "<s>", "\x00", "\t", "\n\n", "\r\n", "\u00a0", "\u3000", "  ", "",
    "'", "-", "_", ".",
]
SEPARATORS = ["", " ", "  ", "\n", "-", "\u2581", "_"]


def adversarial_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "\u2581", "\ue000", caseops.CONTROLS, "".join(PIECES)]
    for _ in range(n):
        parts = [rng.choice(PIECES) for _ in range(rng.randint(1, 12))]
        out.append("".join(p + rng.choice(SEPARATORS) for p in parts))
    return out


def mixed_case_docs(n: int, seed: int = 0) -> list[str]:
    """Pseudo-English documents with every case style, some non-Latin text and reserved characters."""
    rng = random.Random(seed)
    words = ("the of and model token byte shard train value loss data text word golf parameter small river "
             "stone light quick brown fox jumps over lazy dog").split()
    styles = [str.lower] * 6 + [str.title, str.upper, lambda w: w[:-1] + w[-1].upper()]
    docs = []
    for _ in range(n):
        words_ = [rng.choice(styles)(rng.choice(words)) if rng.random() > 0.1 else rng.choice(PIECES)
                  for _ in range(rng.randint(10, 80))]
        docs.append(" ".join(words_).capitalize() + ".")
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- the transform

@pytest.mark.parametrize("seed", range(4))
def test_round_trip_of_adversarial_strings(seed):
    for text in adversarial_strings(500, seed):
        encoded = caseops.encode(text)
        assert caseops.decode(encoded) == text, (text, encoded)
        assert caseops.SP_SPACE not in encoded  # SentencePiece would decode it as a space
        assert int(caseops.original_char_bytes(encoded).sum()) == len(text.encode("utf-8")), text
        # Lowercased: no capital the inverse could restore is left in the text.
        assert not any(caseops.folded(c) for c in encoded), (text, encoded)


def test_round_trip_of_every_bmp_character():
    chars = [chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000]
    for text in ("".join(chars), "A".join(chars), " ".join(chars), "".join(c + c.upper() + "x" for c in chars)):
        encoded = caseops.encode(text)
        assert caseops.decode(encoded) == text
        assert int(caseops.original_char_bytes(encoded).sum()) == len(text.encode("utf-8"))


@pytest.mark.parametrize("text, expected", [
    ("Hello World", "\ue001hello\ue001 world"),
    ("NASA and McDonald", "\ue002nasa and\ue001 mc\ue003donald"),
    ("iPhone 4S", "i\ue003phone 4\ue001s"),
    ("ΟΔΟΣ", "\ue002οδοσ"),  # per-letter lowercase (σ, not the final ς), so ALLCAPS restores Σ
    ("İ ß \u212a", "İ ß \u212a"),  # no one-to-one lowercase: left as they are
    ("a\u2581b \ue001", "a\ue000 b \ue000\ue001"),  # reserved characters are escaped
])
def test_encoding_is_as_documented(text, expected):
    assert caseops.encode(text) == expected


@pytest.mark.parametrize("bad", ["\ue001", "x\ue002", "\ue001 ", "\ue0011", "\ue003ß", "\ue003A", "\ue000a",
                                 "\ue002ab\ue003", "\ue001\u0301"])
def test_decode_refuses_text_encode_cannot_produce(bad):
    with pytest.raises(caseops.CaseOpsError, match="offset"):
        caseops.decode(bad)


def test_original_bytes_follow_the_original_characters():
    # Ⱥ (2 bytes) lowercases to ⱥ (3 bytes); U+2581 (3 bytes) is carried by a 1-byte space.
    encoded = caseops.encode("Ⱥx\u2581")
    assert encoded == "\ue001ⱥx\ue000 "
    assert caseops.original_char_bytes(encoded).tolist() == [0, 2, 1, 0, 3]


# ----------------------------------------------------------------------------- tokenizer and sidecar

@pytest.fixture(scope="module")
def caseops_export(tmp_path_factory):
    """A --caseops sp640 export: 12 val documents (with adversarial ones), small shards, 2 workers."""
    root = tmp_path_factory.mktemp("caseops")
    docs = adversarial_strings(6, seed=9)[-6:] + mixed_case_docs(300)
    docs_path = write_jsonl(root / "docs.jsonl", docs)
    assert export_main(["--variant", "sp640", "--input", str(docs_path), "--val-docs", "12", "--shard-tokens", "250",
                        "--workers", "2", "--data-dir", str(root), "--caseops"]) == 0
    return root / "datasets" / "custom_sp640_caseops", root / "tokenizers" / "custom_sp640_caseops_bpe.model", docs


def test_sidecar_sums_to_utf8_length_on_real_tokenizer_output(caseops_export):
    _, tokenizer_path, docs = caseops_export
    sp = load_tokenizer(tokenizer_path)
    piece_bytes = caseops.piece_byte_lengths(sp)
    controls = {sp.piece_to_id(c) for c in caseops.CONTROLS}
    assert len(controls) == 4 and sp.unk_id() not in controls
    byte_fallback_seen = False
    for text in docs[:40] + adversarial_strings(300, seed=5):
        transformed = caseops.encode(text)
        ids = sp.encode(transformed)
        assert sp.decode(ids) == transformed  # identity normalization: the tokens spell the text exactly
        nbytes = caseops.token_original_bytes(ids, transformed, piece_bytes)
        assert int(nbytes.sum()) == len(text.encode("utf-8")), text
        if not set(text) & set(caseops.CONTROLS):  # (an escaped control is the original's own character)
            assert all(n == 0 for i, n in zip(ids, nbytes) if i in controls)
        byte_fallback_seen |= any(sp.is_byte(i) for i in ids)
    assert byte_fallback_seen  # the byte-fallback path was exercised


def test_split_character_is_charged_once_to_its_last_byte_token(caseops_export):
    sp = load_tokenizer(caseops_export[1])
    text = "\U0001f600"  # not in the vocabulary: four byte-fallback tokens
    ids = sp.encode(caseops.encode(text))
    assert [sp.is_byte(i) for i in ids] == [True] * 4
    assert caseops.token_original_bytes(ids, text, caseops.piece_byte_lengths(sp)).tolist() == [0, 0, 0, 4]


def test_sidecar_refuses_tokens_that_do_not_spell_the_text(caseops_export):
    sp = load_tokenizer(caseops_export[1])
    with pytest.raises(caseops.CaseOpsError, match="does not reproduce"):
        caseops.token_original_bytes(sp.encode("abc"), "abcd", caseops.piece_byte_lengths(sp))


def test_export_writes_aligned_sidecars(caseops_export):
    dataset_dir, tokenizer_path, docs = caseops_export
    vals = sorted(dataset_dir.glob("fineweb_val_*.bin"))
    assert len(vals) > 1  # the sidecar must be cut exactly where the val shards are
    for val in vals:
        sidecar = dataset_dir / val.name.replace("fineweb_val_", "fineweb_valbytes_")
        header = np.frombuffer(sidecar.read_bytes()[:12], dtype="<i4")
        assert header.tolist() == [VAL_BYTES_MAGIC, 1, len(tg.load_data_shard(val))]
        with pytest.raises(tg.DataError, match="not a shard"):
            tg.load_data_shard(sidecar)  # a sidecar is never read as tokens
        with pytest.raises(tg.DataError, match="not a byte sidecar"):
            tg.load_data_shard(val, magic=tg.VAL_BYTES_MAGIC)
    tokens = tg.load_validation_tokens(str(dataset_dir / "fineweb_val_*.bin"), 640)
    counts = tg.load_validation_bytes(str(dataset_dir / "fineweb_val_*.bin"))
    assert counts.shape == tokens.shape and (counts[tokens == tg.BOS_ID] == 0).all()
    assert int(counts.sum()) == sum(len(caseops.valid_unicode(d).encode("utf-8")) for d in docs[:12])
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    assert manifest["caseops"]["version"] == caseops.CASEOPS_VERSION
    assert sum(f["split"] == "valbytes" for f in manifest["files"]) == len(vals)


def test_training_script_and_data_tools_agree_on_the_format():
    assert tg.CASEOPS_CONTROLS == caseops.CONTROLS
    assert tg.VAL_BYTES_MAGIC == VAL_BYTES_MAGIC
    assert not Path("fineweb_valbytes_000000.bin").match("fineweb_val_*.bin")


def test_export_refuses_caseops_without_a_caseops_tokenizer(tmp_path, caseops_export, capsys):
    docs = write_jsonl(tmp_path / "d.jsonl", mixed_case_docs(60))
    common = ["--input", str(docs), "--val-docs", "2", "--data-dir", str(tmp_path), "--caseops"]
    assert export_main(["--variant", "byte260", *common]) == 1
    assert "--caseops needs a SentencePiece variant" in capsys.readouterr().err
    assert export_main(["--variant", "sp640", *common[:-1]]) == 0  # a plain tokenizer ...
    plain = tmp_path / "tokenizers" / "custom_sp640_bpe.model"
    assert export_main(["--variant", "sp640", "--reuse-model", str(plain), "--name", "x", *common]) == 1
    assert "is not a CaseOps tokenizer" in capsys.readouterr().err  # ... cannot export CaseOps text


# ----------------------------------------------------------------------------- verify

def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_verify_proves_a_caseops_export(caseops_export, capsys):
    dataset_dir, tokenizer_path, _ = caseops_export
    assert verify_main([str(dataset_dir), str(tokenizer_path)]) == 0
    out = capsys.readouterr().out
    assert "12 validation documents proven" in out and "0 found in both" in out and out.strip().endswith("OK")


def rewrite(path: Path, change, magic: int = tg.SHARD_MAGIC) -> None:
    values = tg.load_data_shard(path, magic=magic).astype(np.int64)
    write_shard(path, change(values), magic)


def test_verify_catches_a_planted_byte_miscount(caseops_export, tmp_path, capsys):
    dataset_dir = copy_dataset(caseops_export[0], tmp_path / "ds")
    sidecar = dataset_dir / "fineweb_valbytes_000000.bin"
    tokens = tg.load_data_shard(dataset_dir / "fineweb_val_000000.bin")
    third_doc = int(np.flatnonzero(tokens == tg.BOS_ID)[2])

    def overcount(counts):
        counts[third_doc + 3] += 1  # one byte too many on one token of document 2
        return counts

    rewrite(sidecar, overcount, VAL_BYTES_MAGIC)
    assert verify_main([str(dataset_dir), str(caseops_export[1])]) == 1
    err = capsys.readouterr().err
    assert "validation document 2 " in err and "byte sidecar charges" in err


def test_verify_catches_a_document_that_does_not_decode_to_the_original(caseops_export, tmp_path, capsys):
    dataset_dir = copy_dataset(caseops_export[0], tmp_path / "ds")
    tokens = tg.load_data_shard(dataset_dir / "fineweb_val_000000.bin")
    second_doc = int(np.flatnonzero(tokens == tg.BOS_ID)[1])
    sp = load_tokenizer(caseops_export[1])
    title = sp.piece_to_id(caseops.TITLE)

    def drop_a_capital(values):
        at = second_doc + int(np.flatnonzero(values[second_doc:] == title)[0])
        values[at] = sp.piece_to_id("<0x78>")  # the TITLE of a word becomes an "x"
        return values

    rewrite(dataset_dir / "fineweb_val_000000.bin", drop_a_capital)
    assert verify_main([str(dataset_dir), str(caseops_export[1])]) == 1
    assert "validation document 1 " in capsys.readouterr().err


def test_verify_catches_validation_documents_in_training(tmp_path, capsys):
    docs = mixed_case_docs(80, seed=3)
    leaked = docs + docs[2:5]  # upstream #2127: validation documents exported again as training data
    path = write_jsonl(tmp_path / "d.jsonl", leaked)
    for flags in ([], ["--caseops"]):
        assert export_main(["--variant", "sp640", "--input", str(path), "--val-docs", "10", "--shard-tokens", "2000",
                            "--data-dir", str(tmp_path), "--workers", "1", "--overwrite", *flags]) == 0
        name = "custom_sp640" + ("_caseops" if flags else "")
        assert verify_main([str(tmp_path / "datasets" / name), str(tmp_path / "tokenizers" / f"{name}_bpe.model")]) == 1
        err = capsys.readouterr().err
        assert "3 training documents are validation documents (first: validation document 2 is" in err


def test_verify_needs_the_originals_and_names_a_wrong_one(caseops_export, tmp_path, capsys):
    dataset_dir, tokenizer_path, docs = caseops_export
    other = write_jsonl(tmp_path / "other.jsonl", docs[:5] + ["Not the sixth document."] + docs[6:])
    assert verify_main([str(dataset_dir), str(tokenizer_path), "--docs", str(other)]) == 1
    err = capsys.readouterr().err
    assert "validation document 5 " in err and "first difference at byte 0" in err


def test_verify_refuses_caseops_tokenizer_without_sidecars(caseops_export, tmp_path):
    dataset_dir = copy_dataset(caseops_export[0], tmp_path / "ds")
    for sidecar in dataset_dir.glob("fineweb_valbytes_*.bin"):
        sidecar.unlink()
    problems = verify(dataset_dir, caseops_export[1])
    assert any("without fineweb_valbytes_*.bin byte sidecars" in p for p in problems)


# ----------------------------------------------------------------------------- train_gpt

def test_sidecar_evaluation_equals_table_evaluation_where_both_apply(tmp_path):
    """A plain (nmt_nfkc) tokenizer on text it does not change beyond normalization: every target's
    sidecar count is the tables' count, so both give the same val_bpb."""
    reserved = set(caseops.CONTROLS + caseops.SP_SPACE)  # only CaseOps text has controls
    path = write_jsonl(tmp_path / "d.jsonl", [d for d in mixed_case_docs(120, seed=4) if not reserved & set(d)])
    assert export_main(["--variant", "sp640", "--input", str(path), "--val-docs", "20", "--data-dir", str(tmp_path),
                        "--workers", "1"]) == 0
    sp = load_tokenizer(tmp_path / "tokenizers" / "custom_sp640_bpe.model")
    val = tmp_path / "datasets" / "custom_sp640" / "fineweb_val_000000.bin"
    tokens = tg.load_data_shard(val).astype(np.int64)
    piece_bytes, counts = caseops.piece_byte_lengths(sp), []
    bounds = np.flatnonzero(tokens == tg.BOS_ID).tolist() + [len(tokens)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        counts += [0, *caseops.token_original_bytes(tokens[a + 1:b], sp.decode(tokens[a + 1:b].tolist()), piece_bytes)]
    write_shard(val.with_name("fineweb_valbytes_000000.bin"), counts, VAL_BYTES_MAGIC)

    tokens_t = torch.from_numpy(tokens)
    luts = tg.build_sentencepiece_luts(sp, 640, "cpu")
    sidecar = tg.load_validation_bytes(str(val.parent / "fineweb_val_*.bin"))
    from_luts, from_sidecar = tg.target_bytes(tokens_t, luts), tg.target_bytes(tokens_t, sidecar)
    # Target by target they agree, except inside a character spelled by byte-fallback tokens: the
    # tables count 1 per byte token, the sidecar charges the whole character to its last byte.
    whole = torch.tensor([not sp.is_byte(int(t)) for t in tokens[1:]])
    assert torch.equal(from_luts[whole], from_sidecar[whole]) and (~whole).any()
    assert from_luts.sum() == from_sidecar.sum()
    sheet = tg.ScoreSheet(len(tokens) - 1, torch.device("cpu"))
    sheet.nats = torch.rand(len(tokens) - 1, generator=torch.Generator().manual_seed(0))
    sheet.hits += 1
    assert sheet.result(tokens_t, luts) == sheet.result(tokens_t, sidecar)


def run_train_gpt(cwd, dataset_dir, tokenizer_path, vocab_size):
    env = {k: v for k, v in os.environ.items() if k not in tg.KNOWN_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    settings = dict(DATA_PATH=dataset_dir, TOKENIZER_PATH=tokenizer_path, VOCAB_SIZE=vocab_size, NUM_LAYERS=2,
                    MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, ROPE_DIMS=8, TRAIN_SEQ_LEN=32, TRAIN_BATCH_TOKENS=512,
                    BIGRAM_VOCAB_SIZE=64, BIGRAM_DIM=8, VE_DIM=8, ITERATIONS=1, WARMUP_STEPS=0, EVAL_STRIDE=16,
                    VAL_LOSS_EVERY=0, MAX_WALLCLOCK_SECONDS=0, VAL_BATCH_SIZE=4096, FINAL_EVAL="roundtrip",
                    QUANT_METHOD="rtn")
    env.update({k: str(v) for k, v in settings.items()})
    return subprocess.run([sys.executable, str(REPO / "train_gpt.py")], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_training_script_scores_caseops_with_the_sidecar(caseops_export, tmp_path):
    dataset_dir, tokenizer_path, docs = caseops_export
    out = run_train_gpt(tmp_path, dataset_dir, tokenizer_path, 640)
    assert out.returncode == 0, out.stderr[-3000:]
    original = sum(len(caseops.valid_unicode(d).encode("utf-8")) for d in docs[:12])
    assert f"val_bytes:source=sidecar files={dataset_dir}/fineweb_valbytes_*.bin bytes:{original}" in out.stdout
    assert re.search(r"^final_\w+_roundtrip val_loss:\S+ val_bpb:\S+", out.stdout, re.M), out.stdout[-2000:]

    no_sidecars = copy_dataset(dataset_dir, tmp_path / "no_sidecars")
    for sidecar in no_sidecars.glob("fineweb_valbytes_*.bin"):
        sidecar.unlink()
    refused = run_train_gpt(tmp_path, no_sidecars, tokenizer_path, 640)
    assert refused.returncode != 0 and "is a CaseOps tokenizer but" in refused.stderr

    (no_sidecars / "fineweb_valbytes_000000.bin").write_bytes((dataset_dir / "fineweb_valbytes_000000.bin").read_bytes())
    partial = run_train_gpt(tmp_path, no_sidecars, tokenizer_path, 640)
    assert partial.returncode != 0 and "fineweb_valbytes_000001.bin is missing" in partial.stderr
