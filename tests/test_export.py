"""Tests of the April-records export (issue 15): SDClip per class, LQER, COMPRESSOR=pergroup
and the fit_to_cap headroom line; the artifact loader's checks of the new fields. CPU, tiny."""
import re
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import train_gpt as tg  # noqa: E402
from test_train_gpt import craft, final_value, randomized_model, run_script, tiny_args  # noqa: E402

CPU = torch.device("cpu")
# The tiny model's matrices are under SMALL_TENSOR_NUMEL: quantize them anyway, at int5.
EXPORT = dict(quant_overrides=r"\.(c_q|c_k|c_v|proj|fc)\.weight$:5", attn_bits=5, mlp_bits=5, embed_bits=8,
              lqer_rank=2, lqer_top_k=3, lqer_bits=4)


def export_args(**over):
    return tiny_args(**EXPORT | over)


def calibrated(args, seed=0):
    """A randomized model and the Hessians of its quantized layers on random tokens."""
    model = randomized_model(args, seed)
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, args.vocab_size, (2, 16), generator=g) for _ in range(2)]
    return model, tg.collect_hessians(model, batches, args, CPU, 1)


@pytest.fixture(scope="module")
def exported():
    """(args, model, qstate) of an export with LQER through GPTQ."""
    args = export_args()
    model, hessians = calibrated(args)
    qstate = tg.quantize_state_dict(model.state_dict(), args, hessians)
    return args, model, qstate


def first_with(qstate, *fields):
    return next(n for n, e in qstate.items() if all(f in e for f in fields))


def with_entry(qstate, name, **arrays):
    """A copy of qstate whose entry `name` has some arrays replaced."""
    return dict(qstate, **{name: dict(qstate[name], **arrays)})


def load_blob(data):
    return tg.deserialize_quantized(tg.decompress_artifact(data))


def pergroup_artifact(body):
    """An artifact of codec 4 around a hand-made section body, its CRC recomputed as compress_artifact does."""
    full = bytes([4]) + body
    return tg.ARTIFACT_MAGIC + full[:1] + struct.pack("<I", zlib.crc32(full)) + full[1:]


def sections(body):
    """[(codec id, payload)] of a pergroup body."""
    out, i = [], 0
    while i < len(body):
        cid, n = struct.unpack_from("<BI", body, i)
        out.append((cid, body[i + 5:i + 5 + n]))
        i += 5 + n
    return out


# ----------------------------------------------------------------------------- round trip

def test_lqer_pergroup_artifact_round_trips_bit_for_bit(exported, tmp_path):
    args, model, qstate = exported
    lqer = [n for n, e in qstate.items() if "lqer" in e]
    assert len(lqer) == args.lqer_top_k, lqer  # the export exercises every new field
    assert all(qstate[n]["lqer"] == [args.lqer_rank, args.lqer_bits] for n in lqer)
    data = tg.compress_artifact(tg.serialize_quantized(qstate), "pergroup", 3)
    assert data[4] == 4
    back = load_blob(data)
    assert back.keys() == qstate.keys()
    for name, e in qstate.items():
        assert back[name].keys() == e.keys(), name
        for key, v in e.items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == back[name][key].dtype and torch.equal(back[name][key], v), (name, key)
            else:
                assert back[name][key] == v and type(back[name][key]) is type(v), (name, key)
    before, after = tg.dequantize_state_dict(qstate), tg.dequantize_state_dict(back)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The LQER term changes the weights the model gets.
    plain = {k: e["q"].float() * e["scale"].float()[:, None] for k, e in qstate.items() if e["bits"]}
    assert all(not torch.equal(before[k], plain[k]) for k in lqer)
    path = tmp_path / "m.ptz"
    path.write_bytes(data)
    fresh = tg.GPT(args)
    tg.load_artifact(path, fresh)
    assert all(torch.equal(fresh.state_dict()[k], before[k].to(fresh.state_dict()[k].dtype)) for k in before)


# ----------------------------------------------------------------------------- pergroup

def test_pergroup_sections_round_trip_and_record_their_codec(exported):
    _, _, qstate = exported
    blob = tg.serialize_quantized(qstate)
    body = tg.compress_sections(blob, 3)
    assert tg.decompress_sections(body) == blob
    cuts, parts = tg.section_cuts(blob), sections(body)
    assert len(parts) == len(cuts) - 1 >= 4  # the header, then runs of arrays by key and role
    codecs = {cid: (c, d) for cid, c, d in list(tg._codecs().values())[:-1]} | {0: (lambda b, lvl: b, bytes)}
    for (cid, z), a, b in zip(parts, cuts, cuts[1:]):
        assert cid in codecs, cid
        assert codecs[cid][1](z) == blob[a:b]  # decoded by the codec its id names
        assert len(z) == min(len(c(blob[a:b], 3)) for c, _ in codecs.values())  # the best codec won (stored included)
    assert tg.decompress_artifact(tg.compress_artifact(blob, "pergroup", 3)) == blob
    assert tg.decompress_artifact(pergroup_artifact(body)) == blob  # the crafted wrapper reaches the section parser


def test_pergroup_refuses_unknown_codec_and_overlong_sections(exported):
    _, _, qstate = exported
    body = tg.compress_sections(tg.serialize_quantized(qstate), 3)
    (first, n), rest = struct.unpack_from("<BI", body), body[5:]
    bad = {"unknown codec id 9": struct.pack("<BI", 9, n) + rest,
           "nested pergroup id 4": struct.pack("<BI", 4, n) + rest,
           "length past the end": struct.pack("<BI", first, len(body)) + rest,
           "last section cut short": body[:-1],
           "a partial section header at the end": body + b"\x00\x01"}
    for what, b in bad.items():
        with pytest.raises(tg.DataError, match="pergroup"):
            tg.decompress_artifact(pergroup_artifact(b))
        with pytest.raises(tg.DataError):  # what EVAL_ONLY sees
            load_blob(pergroup_artifact(b))


# ----------------------------------------------------------------------------- LQER

def error_with_and_without_lqer(W, bits, rank, **over):
    args = export_args(quant_overrides=rf"fc\.weight$:{bits}", lqer_rank=0, lqer_top_k=1, **over)
    state = {"blocks.0.mlp.fc.weight": W}
    q0 = tg.quantize_state_dict(state, args)["blocks.0.mlp.fc.weight"]
    args.lqer_rank = rank
    q1 = tg.quantize_state_dict(state, args)["blocks.0.mlp.fc.weight"]
    assert "lqer" not in q0 and q1["lqer"] == [rank, args.lqer_bits]
    assert torch.equal(q0["q"], q1["q"]) and torch.equal(q0["scale"], q1["scale"])  # LQER only adds the factors
    err = lambda e: float((tg.dequantize_entry(e) - W).square().sum())  # noqa: E731
    return err(q0), err(q1)


@pytest.mark.parametrize("bits", [3, 4])
def test_lqer_lowers_the_error_of_a_low_rank_plus_noise_matrix(bits):
    torch.manual_seed(0)
    W = torch.randn(64, 4) @ torch.randn(4, 96) / 2 + 0.01 * torch.randn(64, 96)
    without, with_lqer = error_with_and_without_lqer(W, bits, 4)
    assert with_lqer < 0.8 * without, (without, with_lqer)


def grid_plus_low_rank(rows, cols, rank, size, seed, qmax=3, step=2 ** -5):
    """W = (a matrix on the int grid) + a rank-`rank` term under half a step: its rounding error is that term."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.randint(1 - qmax, qmax, (rows, cols), generator=g).float()
    Q[:, 0] = qmax  # every row's max |w|, so its scale is `step`
    P = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    P[:, 0] = 0
    return Q * step + P * (size * step / P.abs().max())


@pytest.mark.parametrize("bits", [3, 4])
def test_lqer_removes_a_low_rank_quantization_error_by_a_clear_factor(bits):
    W = grid_plus_low_rank(64, 96, 4, 0.45, seed=1, qmax=2 ** (bits - 1) - 1)
    without, with_lqer = error_with_and_without_lqer(W, bits, 4, quant_clip_ratios="1.0")
    assert with_lqer < without / 10, (without, with_lqer)


def test_lqer_goes_to_the_top_k_tensors_of_most_error_removed_per_byte():
    """a: small, low-rank error; b: 4x its rows, more error removed in all but less per byte; c, d: noise."""
    torch.manual_seed(0)
    state = {"blocks.0.mlp.fc.weight": grid_plus_low_rank(32, 96, 2, 0.45, seed=2),
             "blocks.1.mlp.fc.weight": grid_plus_low_rank(128, 96, 2, 0.45, seed=3),
             "blocks.2.mlp.fc.weight": 0.01 * torch.randn(64, 96),  # about the same step as a and b
             "blocks.3.mlp.fc.weight": 0.01 * torch.randn(48, 96)}
    names = list(state)

    def lqer_of(k):
        args = export_args(quant_overrides=r"fc\.weight$:3", quant_clip_ratios="1.0", lqer_rank=2, lqer_top_k=k)
        qstate = tg.quantize_state_dict(state, args)
        return qstate, [n for n in names if "lqer" in qstate[n]]

    everything, chosen = lqer_of(4)
    assert chosen == names
    removed, per_byte = {}, {}
    for n in names:  # by hand, from the factors: identity Hessian without calibration
        e = everything[n]
        E = state[n] - (e["q"].float() * e["scale"].float()[:, None])
        removed[n] = float(E.square().sum() - (E - tg.low_rank(e)).square().sum())
        nbytes = (e["lqer_a"].numel() + e["lqer_b"].numel()) * 4 / 8 + 2 * (2 + e["q"].size(0))
        per_byte[n] = removed[n] / nbytes
    assert max(removed, key=removed.get) == names[1] and max(per_byte, key=per_byte.get) == names[0], (removed, per_byte)
    by_gain = sorted(names, key=per_byte.get, reverse=True)
    for k in (1, 2, 3):
        qstate, chosen = lqer_of(k)
        assert sorted(chosen) == sorted(by_gain[:k]), (k, chosen)
        for n in chosen:  # the same factors whatever k
            assert all(torch.equal(qstate[n][key], everything[n][key]) for key in ("lqer_a", "lqer_as", "lqer_b", "lqer_bs"))


# ----------------------------------------------------------------------------- SDClip per class

@pytest.mark.parametrize("attn_sigmas,mlp_sigmas", [(0.0, 2.5), (2.0, 0.0)])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_clip_sigmas_apply_per_class(attn_sigmas, mlp_sigmas, method):
    args = export_args(attn_clip_sigmas=attn_sigmas, mlp_clip_sigmas=mlp_sigmas, lqer_rank=0)
    model, hessians = calibrated(args)
    state = model.state_dict()
    qstate = tg.quantize_state_dict(state, args, hessians if method == "gptq" else None)
    ratios, clipped = tg.clip_ratios(args), {"attn": 0, "mlp": 0}
    for name, e in qstate.items():
        if not e["bits"]:
            continue
        w, qmax, cls = state[name].float(), 2 ** (e["bits"] - 1) - 1, tg.tensor_class(name)
        k = dict(attn=attn_sigmas, mlp=mlp_sigmas, embed=0.0)[cls]
        amax = w.abs().amax(1)
        if k:
            expected = (k * w.std(1) / qmax).half()  # the grid spans k std, beyond clamped
            clipped[cls] += int((k * w.std(1) < amax).sum())
        else:  # the clip-ratio search, as without SDClip
            expected = tg.row_scales(w, e["bits"], ratios).squeeze(1).half()
            assert not torch.equal(expected, (amax / qmax).half()) or cls == "embed", name  # the search chose clips
        assert torch.equal(e["scale"], expected), name
        assert e["q"].abs().max() <= qmax
    on = "mlp" if mlp_sigmas else "attn"
    assert clipped[on] > 0  # k x std was below max |w| on some rows: the clip was exercised


# ----------------------------------------------------------------------------- tampered fields

def array_edit(key, **fields):
    """An edit of one array's header record; callables get the record."""
    def edit(e):
        a = e["arrays"][key]
        a.update({k: v(a) if callable(v) else v for k, v in fields.items()})
    return edit


def field(key, value):
    """An edit of a header field; a callable value gets the entry."""
    return lambda e: e.update({key: value(e) if callable(value) else value})


TAMPER = [  # (what, entry edited: with lqer / quantized / unquantized, edit, message)
    ("an awq field (AWQ-lite is gone)", "quantized", field("awq", [0, 8, 8]), "expected"),
    ("lqer rank above the factors'", "lqer", field("lqer", lambda e: [e["lqer"][0] + 1, e["lqer"][1]]), r"\(lqer a\)"),
    ("lqer rank below the factors'", "lqer", field("lqer", lambda e: [1, e["lqer"][1]]), r"\(lqer a\)"),
    ("lqer rank 0", "lqer", field("lqer", lambda e: [0, e["lqer"][1]]), "lqer="),
    ("lqer bits 9", "lqer", field("lqer", lambda e: [e["lqer"][0], 9]), "lqer="),
    ("lqer bits 1", "lqer", field("lqer", lambda e: [e["lqer"][0], 1]), "lqer="),
    ("lqer bits a float", "lqer", field("lqer", lambda e: [e["lqer"][0], 4.0]), "lqer="),
    ("lqer wrong length", "lqer", field("lqer", lambda e: e["lqer"][:1]), "lqer="),
    ("lqer bits below the factors'", "lqer", field("lqer", lambda e: [e["lqer"][0], 2]), r"\(lqer a\).*int2 range"),
    ("lqer_b transposed", "lqer", array_edit("lqer_b", shape=lambda a: a["shape"][::-1]), r"\(lqer b\)"),
    ("lqer_bs wrong shape", "lqer", array_edit("lqer_bs", shape=lambda a: [1, a["shape"][0]]), r"\(lqer b\)"),
    ("lqer factor stored as float", "lqer", array_edit("lqer_a", dtype="float16", shape=lambda a: [a["nbytes"] // 2]),
     r"\(lqer a\)"),
    ("lqer field dropped", "lqer", lambda e: e.pop("lqer"), "expected"),
    ("lqer array dropped", "lqer", lambda e: e["arrays"].pop("lqer_b"), "expected"),
    ("unknown extra field", "lqer", field("gain", 1.5), "gain"),
    ("lqer on an fp16 tensor", "plain", field("lqer", [1, 4]), "lqer"),
]


@pytest.mark.parametrize("what,target,edit,message", TAMPER, ids=[t[0] for t in TAMPER])
def test_a_tampered_lqer_field_is_refused_with_a_clear_error(exported, what, target, edit, message):
    _, _, qstate = exported
    name = {"plain": next(n for n, e in qstate.items() if not e["bits"]),
            "quantized": next(n for n, e in qstate.items() if e["bits"] and "lqer" not in e)}.get(target)
    name = name or first_with(qstate, target)
    with pytest.raises(tg.DataError, match=message) as refused:
        load_blob(craft(qstate, lambda tensors: edit(tensors[name])))
    assert f"artifact tensor {name}" in str(refused.value)  # names the tensor


def test_bad_values_in_lqer_arrays_are_refused(exported):
    _, _, qstate = exported
    a, lqer_qmax = first_with(qstate, "lqer"), 2 ** (qstate[first_with(qstate, "lqer")]["lqer"][1] - 1) - 1

    def changed(name, key, at, value):
        t = qstate[name][key].clone()
        t[at] = value
        return with_entry(qstate, name, **{key: t})
    cases = [(changed(a, "lqer_as", 0, float("nan")), "non-finite lqer_as"),
             (changed(a, "scale", 1, float("inf")), "non-finite scale"),
             (changed(a, "lqer_a", (0, 0), lqer_qmax + 1), r"\(lqer a\).*int4 range"),
             (changed(a, "lqer_b", (-1, -1), -lqer_qmax - 1), r"\(lqer b\).*int4 range"),
             (changed(a, "q", (0, 1), 2 ** (qstate[a]["bits"] - 1)),
              f"{re.escape(a)}: a value outside the int{qstate[a]['bits']} range")]
    for state, message in cases:
        with pytest.raises(tg.DataError, match=message):
            load_blob(tg.compress_artifact(tg.serialize_quantized(state), "pergroup", 3))


def test_minus_128_in_q_or_a_factor_is_refused(exported):
    """int8 -128 is outside every intN grid (|q| <= 2^(N-1) - 1, N <= 8). FAILS at b4cd8a3: check_grid's
    int(q.abs().max()) takes the int8 abs, which wraps -128 to -128, so the value loads silently as -128 x scale."""
    _, _, qstate = exported
    a = first_with(qstate, "lqer")
    for key in ("lqer_a", "q"):
        t = qstate[a][key].clone()
        t[0, 0] = -128
        with pytest.raises(tg.DataError, match="range"):
            load_blob(tg.compress_artifact(tg.serialize_quantized(with_entry(qstate, a, **{key: t})), "zstd", 3))


def test_a_one_dimensional_lqer_factor_is_refused_not_a_crash(exported):
    """A factor stored 1-D with the right first dimension (b4cd8a3: check_grid read q.shape[1] before checking
    q.ndim, and that IndexError escaped deserialize_quantized as a crash)."""
    _, _, qstate = exported
    a = first_with(qstate, "lqer")
    rows, rank = qstate[a]["lqer_a"].shape
    for key, n in (("lqer_a", rows), ("lqer_b", rank)):
        with pytest.raises(tg.DataError):
            load_blob(craft(qstate, lambda tensors: array_edit(key, shape=[n], nbytes=n)(tensors[a])))


# ----------------------------------------------------------------------------- the script end to end

def test_eval_only_of_an_lqer_pergroup_artifact_reproduces_the_run(tmp_path):
    env = dict(SMOKE=1, ITERATIONS=4, FINAL_EVAL="roundtrip", LQER_RANK=2, COMPRESSOR="pergroup")
    out = run_script(tmp_path, env, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    key = "final_int6_pergroup_roundtrip_exact"
    line = re.search(rf"^{key} .*$", out.stdout, re.M).group(0)
    total = int(re.search(r"Total submission size int6\+pergroup: (\d+) bytes", out.stdout).group(1))
    headroom = int(re.search(r"^fit_to_cap: headroom (\d+) bytes under ARTIFACT_CAP=16000000", out.stdout, re.M).group(1))
    assert headroom == 16_000_000 - total
    lqer_logged = re.search(r"^quantize:gptq .*$", out.stdout, re.M).group(0).split(" lqer:")[1:]
    assert len(lqer_logged) == 3  # LQER_TOP_K's default
    data = (tmp_path / "final_model.int6.ptz").read_bytes()
    assert data[4] == 4
    qstate = load_blob(data)
    assert sorted(n for n, e in qstate.items() if "lqer" in e) == sorted(lqer_logged)
    assert all(qstate[n]["lqer"] == [2, 4] for n in lqer_logged)
    again = run_script(tmp_path, env | dict(EVAL_ONLY="final_model.int6.ptz"), timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step:" not in again.stdout and "eval_only: final_model.int6.ptz" in again.stdout
    assert re.search(rf"^{key} .*$", again.stdout, re.M).group(0) == line
    assert final_value(again.stdout, key) == final_value(out.stdout, key)


def test_late_qat_fake_quantizes_like_the_export_with_sdclip():
    """One quantizer: with MLP_CLIP_SIGMAS the QAT weights are the round-to-nearest export's, bit for bit."""
    args = export_args(mlp_clip_sigmas=3.0, attn_clip_sigmas=0.0, lqer_rank=0, quant_method="rtn")
    model = tg.GPT(args)
    layers = tg.prepare_qat(model, args)
    tg.refresh_qat(layers, tg.clip_ratios(args))
    exported = tg.dequantize_state_dict(tg.quantize_state_dict(model.state_dict(), args))
    checked = 0
    for name, m in model.named_modules():
        if m in layers:
            assert m.qat_sigmas == (3.0 if ".mlp." in name else 0.0), name
            assert torch.equal(m.weight + m.qat_delta, exported[name + ".weight"]), name
            checked += 1
    assert checked and any(m.qat_sigmas for m in layers)
