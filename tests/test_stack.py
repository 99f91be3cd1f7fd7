"""Tests of the April-stack features (issue #14): depth recurrence, parallel residuals, attention output
gates, Muon variants, schedules, horizon-aware EMA, SDClip, PRESET and a vocabulary of 8192."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import train_gpt as tg  # noqa: E402
from data.sample import build_sample  # noqa: E402
from test_train_gpt import assert_causal, final_value, randomized_model, run_script, sample, tiny_args, tiny_run_env  # noqa: E402,F401

STACK = dict(loop_layers="1-2", loop_repeats=2, parallel_from=2, attn_gate_dims=8)


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("xsa_last_n", [0, 4])
def test_full_model_with_loops_parallel_residuals_and_gates_is_causal(xsa_last_n):
    args = tiny_args(xsa_last_n=xsa_last_n, **STACK)
    model = randomized_model(args)
    assert model.layer_order() == [0, 1, 2, 1, 2, 1, 2, 3]
    assert [b.parallel for b in model.blocks] == [False, False, True, True]
    assert_causal(model, args)


def test_features_off_keep_the_seed_model():
    """Off, no new parameter exists and the run order is the plain one; a zero gate is the identity."""
    args = tiny_args()
    model = tg.GPT(args)
    assert model.loop_range is None and model.layer_order() == [0, 1, 2, 3]
    assert not any(b.parallel or b.attn.gate is not None for b in model.blocks)
    torch.manual_seed(0)
    plain = randomized_model(args)
    gated = tg.GPT(tiny_args(attn_gate_dims=8))
    missing = gated.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.endswith("attn.gate") for k in missing)
    ids = torch.randint(0, args.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(gated.eval().logits(ids), plain.logits(ids), atol=1e-6)


def test_loop_switch_compiled_forward_equals_eager():
    args = tiny_args(**STACK)
    model = randomized_model(args)
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    ids = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    outs = {}
    with torch.no_grad():
        for passes in (1, 3, 1):
            model.loop_passes = passes
            compiled_out, eager = compiled(ids), model(ids)
            assert torch.allclose(compiled_out, eager, atol=1e-4), f"compiled != eager with {passes} passes"
            outs.setdefault(passes, compiled_out)
    assert not torch.allclose(outs[1], outs[3]), "the compiled graph ignored the loop switch"


def test_schedules_follow_progress():
    args = tiny_args(**STACK, loop_start_frac=0.5, seq_len_schedule="4:0.25,8:0.5", train_seq_len=16)
    model, lines = tg.GPT(args), []
    _, muon = tg.build_optimizers(model, args, fused=False)
    assert tg.graph_variants(args) == [(1, 4), (1, 8), (1, 16), (3, 4), (3, 8), (3, 16)]
    lens = [tg.apply_schedules(model, muon, args, s, s / 8, 16, lines.append) for s in range(8)]
    assert lens == [4, 4, 8, 8, 16, 16, 16, 16]
    assert model.loop_passes == 3 and sum("layer_loop:enabled step:4" in x for x in lines) == 1
    assert muon.param_groups[0]["weight_decay"] == args.muon_wd  # no taper unless asked
    args.muon_wd_taper_start, args.muon_wd_final, args.muon_wd = 0.5, 0.01, 0.09
    wds = []
    for progress in (0.25, 0.5, 0.75, 1.0):
        tg.apply_schedules(model, muon, args, 0, progress, 16, lines.append)
        wds.append(muon.param_groups[0]["weight_decay"])
    assert wds == pytest.approx([0.09, 0.09, 0.05, 0.01])


def test_gate_tensors_stay_small_float_and_use_adam():
    args = tiny_args(attn_gate_dims=8)
    model = tg.GPT(args)
    optimizers, muon = tg.build_optimizers(model, args, fused=False)
    gates = {id(b.attn.gate) for b in model.blocks}
    assert not gates & {id(p) for g in muon.param_groups for p in g["params"]}
    assert gates <= {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
    qstate = tg.quantize_state_dict(model.state_dict(), args)
    gate_entries = [e for k, e in qstate.items() if k.endswith("attn.gate")]
    assert len(gate_entries) == 4 and all(e["bits"] is None and e["data"].dtype == torch.float16 for e in gate_entries)


# ----------------------------------------------------------------------------- optimizer
def test_polar_express_orthogonalizes_tighter_than_the_fixed_quintic():
    torch.manual_seed(0)
    for shape in [(64, 256), (256, 64), (32, 512)]:
        G = torch.randn(shape)
        fixed = torch.linalg.svdvals(tg.zeropower_via_newtonschulz5(G, 5, tg.ns_coefficients("3.4445,-4.7750,2.0315")))
        polar = torch.linalg.svdvals(tg.zeropower_via_newtonschulz5(G, 5, tg.ns_coefficients("polar")))
        assert 0.8 < polar.min() and polar.max() < 1.2, polar
        assert polar.min() > fixed.min() + 0.1


def muon_update(p, grad, **kw):
    opt = tg.Muon([p], lr=1.0, momentum=0.0, backend_steps=5, coeffs=tg.ns_coefficients("3.4445,-4.7750,2.0315"),
                  weight_decay=0.0, **kw)
    before = p.detach().clone()
    p.grad = grad.clone()
    opt.step()
    return before - p.detach()


def test_muoneq_r_makes_the_update_blind_to_row_scales():
    torch.manual_seed(0)
    G = torch.randn(32, 64)
    scaled = G * torch.logspace(-2, 2, 32)[:, None]
    a = muon_update(torch.nn.Parameter(torch.zeros(32, 64)), G / G.norm(dim=1, keepdim=True), row_norm=True)
    b = muon_update(torch.nn.Parameter(torch.zeros(32, 64)), scaled, row_norm=True)
    c = muon_update(torch.nn.Parameter(torch.zeros(32, 64)), scaled)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(b, c, atol=1e-2)


def test_normuon_equalizes_row_rms_and_keeps_the_update_norm():
    torch.manual_seed(0)
    G = torch.randn(48, 32) * torch.logspace(-1, 1, 48)[:, None]
    plain = muon_update(torch.nn.Parameter(torch.zeros(48, 32)), G)
    nor = muon_update(torch.nn.Parameter(torch.zeros(48, 32)), G, normuon_beta2=0.95)
    rows = nor.norm(dim=1)
    assert (rows.max() / rows.min()) < 1.01 < (plain.norm(dim=1).max() / plain.norm(dim=1).min())
    assert math.isclose(nor.norm().item(), plain.norm().item(), rel_tol=1e-4)


# ----------------------------------------------------------------------------- schedules, averaging, export
def test_min_lr_floors_the_warmdown_only_when_set():
    args = tiny_args(iterations=100, warmdown_iters=50)
    assert tg.lr_scale(args, 100, 0, None) == 0.0
    args.min_lr = 0.1
    assert tg.lr_scale(args, 100, 0, None) == 0.1 and tg.lr_scale(args, 60, 0, None) == 0.8


def test_horizon_aware_ema_halves_at_the_chosen_fraction_of_the_run():
    args = tiny_args(iterations=300, ema_decay=0.997, ema_half_life_frac=0.0)
    assert tg.ema_decay(args, 10, 1000.0, None) == 0.997
    args.ema_half_life_frac = 0.05
    assert math.isclose(tg.ema_decay(args, 10, 1000.0, None) ** 15, 0.5)  # 0.05 x 300 steps
    # Under a wallclock cap: 100 ms per step so far and 10 s of cap predict 100 steps.
    assert math.isclose(tg.ema_decay(args, 10, 1000.0, 10_000.0) ** 5, 0.5)


def test_sdclip_clips_embedding_rows_at_k_standard_deviations():
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    w[:, 0] = 50.0  # one outlier per row would waste the max-scaled grid
    scale = tg.row_scales(w, 8, (1.0,), sigmas=3.0)
    expected = (3.0 * w.std(dim=1, keepdim=True) / 127).half().float()
    assert torch.allclose(scale, expected, rtol=1e-3)
    args = tiny_args(embed_clip_sigmas=3.0, embed_bits=8)
    q = tg.quantize_state_dict({"tok_emb.weight": w}, args)["tok_emb.weight"]
    assert torch.allclose(q["scale"].float()[:, None], expected, rtol=1e-3)


# ----------------------------------------------------------------------------- PRESET
def resolved(**env):
    code = "import json, train_gpt as tg; print(json.dumps({k: getattr(tg.Hyperparameters, k.lower()) for k in tg.KNOWN_ENV}))"
    clean = {k: v for k, v in os.environ.items() if k not in tg.KNOWN_ENV}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**clean, **{k: str(v) for k, v in env.items()}, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout)


def test_presets_resolve_to_their_documented_configurations():
    today, seeds, top, naive = resolved(), resolved(PRESET="seeds"), resolved(PRESET="top"), resolved(PRESET="naive_baseline")
    assert {k: v for k, v in seeds.items() if k != "RUN_ID"} == {k: v for k, v in today.items() if k != "RUN_ID"}
    assert today["LOOP_LAYERS"] == "" and today["PARALLEL_FROM"] == 0 and today["QK_GAIN_INIT"] == 1.5
    for k, v in tg.PRESETS["top"].items():
        assert top[k] == v, k
    assert (top["NUM_LAYERS"], top["VOCAB_SIZE"], top["LOOP_LAYERS"], top["PARALLEL_FROM"]) == (11, 8192, "3-5", 7)
    assert (naive["NUM_LAYERS"], naive["MODEL_DIM"], naive["MLP_MULT"], naive["TRAIN_SEQ_LEN"]) == (9, 512, 2.0, 1024)
    assert naive["EMA_ENABLED"] is False and naive["XSA_LAST_N"] == 0 and naive["LEAKY_RELU_SLOPE"] == 0.0
    assert naive["EVAL_SEQ_LEN"] == 1024  # settings derived from others follow the preset's values
    # An explicit setting always wins; SMOKE keeps its tiny shape under any preset.
    assert resolved(PRESET="top", QK_GAIN_INIT="2.0", LOOP_LAYERS="")["QK_GAIN_INIT"] == 2.0
    smoke = resolved(PRESET="top", SMOKE="1")
    assert (smoke["NUM_LAYERS"], smoke["VOCAB_SIZE"], smoke["LOOP_LAYERS"], smoke["PARALLEL_FROM"]) == (3, 512, "1-1", 2)


def test_unknown_preset_and_bad_stack_settings_stop_before_compute(sample, tmp_path):
    # A setting out of its range or choices is reported first (the later checks rely on those).
    for env, messages in ((dict(PRESET="best"), ("PRESET=best must be one of",)),
                          (dict(LOOP_LAYERS="1-5", SEQ_LEN_SCHEDULE="48:0.5"),
                           ("LOOP_LAYERS=1-5 must be A-B", "SEQ_LEN_SCHEDULE=48:0.5"))):
        out = run_script(tmp_path, tiny_run_env(sample, **env), timeout=120)
        assert out.returncode != 0 and "step:" not in out.stdout
        for message in messages:
            assert message in out.stderr, out.stderr[-2000:]


# ----------------------------------------------------------------------------- end to end
def test_loop_and_context_switch_mid_training_keep_the_loss_finite(sample, tmp_path):
    env = tiny_run_env(sample, ITERATIONS=6, WARMUP_STEPS=4, LOOP_LAYERS="0-1", LOOP_START_FRAC=0.5,
                       SEQ_LEN_SCHEDULE="32:0.5", PARALLEL_FROM=1, ATTN_GATE_DIMS=4, MUON_ROW_NORM=1, NORMUON=1,
                       MUON_NS_COEFFS="polar", MIN_LR=0.1, EMA_HALF_LIFE_FRAC=0.1, MUON_WD_TAPER_START=0.5,
                       FINAL_EVAL="roundtrip")
    out = run_script(tmp_path, env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "layer_loop:enabled step:3 progress:0.500 virtual_layers:6" in out.stdout
    assert "train_seq_len:64 step:3" in out.stdout
    config = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("config "))[7:])
    assert config["loop_layers"] == "0-1" and config["preset"] == "seeds"
    losses = [float(x.split("train_loss:")[1].split()[0]) for x in out.stdout.splitlines() if "train_loss:" in x]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert math.isfinite(final_value(out.stdout, "final_int6_zstd_roundtrip_exact")[1])


def test_vocab_8192_end_to_end(tmp_path):
    data, tok = build_sample(tmp_path / "s8192", vocab_size=8192, train_tokens=60_000, val_docs=8)
    env = tiny_run_env((data, tok), VOCAB_SIZE=8192, BIGRAM_VOCAB_SIZE=0, EMBED_CLIP_SIGMAS=20, FINAL_EVAL="roundtrip")
    out = run_script(tmp_path, env)
    assert out.returncode == 0, out.stderr[-3000:]
    loss, bpb = final_value(out.stdout, "final_int6_zstd_roundtrip_exact")
    assert math.isfinite(loss) and 0 < bpb < 20 and loss < math.log(8192) + 1


def test_gptq_of_the_tied_embedding_uses_the_head_inputs_and_beats_rounding():
    args = tiny_args(embed_gptq=True, embed_bits=4, embed_clip_sigmas=3.0, bigram_vocab_size=0, ve_enabled=False)
    model = randomized_model(args)
    batches = [torch.randint(0, args.vocab_size, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    H = tg.collect_hessians(model, batches, args, torch.device("cpu"), 1)
    assert H["tok_emb"].shape == (args.model_dim, args.model_dim)
    assert "tok_emb" not in tg.collect_hessians(model, batches, tiny_args(embed_bits=4), torch.device("cpu"), 1)
    W = model.tok_emb.weight.detach()
    gptq = tg.dequantize_state_dict(tg.quantize_state_dict({"tok_emb.weight": W}, args, H))["tok_emb.weight"]
    rtn = tg.dequantize_state_dict(tg.quantize_state_dict({"tok_emb.weight": W}, args))["tok_emb.weight"]
    err = lambda Wq: torch.trace((W - Wq) @ H["tok_emb"] @ (W - Wq).T).item()  # E||x (W - Wq)^T||^2
    assert err(gptq) < 0.9 * err(rtn)
