"""Parameter Golf (README): train a GPT, export it quantized and compressed, score the reloaded artifact in BPB."""
import copy
import difflib
import functools
import glob
import json
import math
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

# ------------- HYPERPARAMETERS
# Env vars (README "Configuration"); SMOKE=1: tiny, for a CPU.

KNOWN_ENV, ENV_ERRORS, RANGES = {}, [], {}  # name -> value; parse errors; name -> rule
IN_RANGE = {">= 1": lambda v: not v < 1, ">= 0": lambda v: not v < 0, "> 0": lambda v: v > 0,
            "in [0, 1)": lambda v: 0 <= v < 1}


class ConfigError(ValueError):
    """An impossible setting, caught before any compute."""


class DataError(ValueError):
    """A missing, corrupt or mismatched shard, tokenizer or artifact."""


def env(name, default, must=None):
    """Env var `name`, typed as `default` (the PRESET's if set); `must`: an IN_RANGE key."""
    default = KNOWN_ENV[name] = PRESETS.get(PRESET, {}).get(name, default)
    if must:
        RANGES[name] = must
    if (raw := os.environ.get(name)) is not None:
        try:
            KNOWN_ENV[name] = (type(default)(raw) if not isinstance(default, bool)
                               else {"0": False, "1": True, "false": False, "true": True}[raw.strip().lower()])
        except (KeyError, ValueError):
            ENV_ERRORS.append(f"{name}={raw!r} is not a valid {type(default).__name__}")
    return KNOWN_ENV[name]


PRESET, PRESETS = os.environ.get("PRESET", "seeds"), {}
SMOKE = env("SMOKE", False)


def S(full, smoke):
    return smoke if SMOKE else full


# PRESET sets defaults only (README).
PRESETS["naive_baseline"] = dict(
    MLP_MULT=2.0, LEAKY_RELU_SLOPE=0.0, LN_SCALE=False, XSA_LAST_N=0, BIGRAM_VOCAB_SIZE=0, SMEAR_ENABLED=False,
    VE_ENABLED=False, MATRIX_LR=0.04, SCALAR_LR=0.04, TIED_EMBED_LR=0.05, MUON_MOMENTUM=0.95,
    MUON_MOMENTUM_WARMUP_START=0.85, MUON_MOMENTUM_WARMUP_STEPS=S(500, 10), WARMDOWN_ITERS=S(1200, 15), MUON_WD=0.0,
    ADAM_WD=0.0, GRAD_CLIP_NORM=0.0, EMA_ENABLED=False, LATE_QAT_THRESHOLD=0.0, QUANT_METHOD="rtn", ATTN_BITS=8,
    MLP_BITS=8, QUANT_CLIP_RATIOS="1.0", FINAL_EVAL="roundtrip",
    **S(dict(NUM_LAYERS=9, ROPE_DIMS=64, TRAIN_SEQ_LEN=1024, TRAIN_BATCH_TOKENS=524_288), {}))
PRESETS["top"] = dict(
    MLP_MULT=4.0, QK_GAIN_INIT=5.25, MUON_MOMENTUM=0.97, MUON_ROW_NORM=True, MUON_WD=0.095, MIN_LR=0.1,
    EMA_HALF_LIFE_FRAC=0.04, LOOP_LAYERS=S("3-5", "1-1"), LOOP_REPEATS=2, LOOP_START_FRAC=0.35,
    PARALLEL_FROM=S(7, 2), ATTN_GATE_DIMS=S(12, 8), EMBED_GPTQ=True, EMBED_BITS=7, EMBED_CLIP_SIGMAS=14.0,
    ATTN_CLIP_SIGMAS=13.0, MLP_CLIP_SIGMAS=11.5, LQER_RANK=4,
    **S(dict(VOCAB_SIZE=8192, DATA_PATH="./data/datasets/fineweb10B_sp8192",
             TOKENIZER_PATH="./data/tokenizers/fineweb_8192_bpe.model"), {}))


# Data and run.
env("DATA_PATH", "./data/datasets/fineweb10B_sp1024")
env("TOKENIZER_PATH", "./data/tokenizers/fineweb_1024_bpe.model")
env("VOCAB_SIZE", S(1024, 512))
env("RUN_ID", str(uuid.uuid4()))
env("SEED", 1337)

# Schedule.
env("ITERATIONS", S(20000, 40), ">= 0")
env("WARMUP_STEPS", S(20, 2), ">= 0")  # compile priming, undone
env("WARMDOWN_ITERS", S(3500, 15), ">= 0")
env("MAX_WALLCLOCK_SECONDS", S(600.0, 0.0), ">= 0")
env("TRAIN_BATCH_TOKENS", S(786_432, 4096), ">= 1")
env("GRAD_ACCUM_STEPS", 0, ">= 0")  # 0: 8 // WORLD_SIZE, as officially
train_seq_len = env("TRAIN_SEQ_LEN", S(2048, 128), ">= 1")
eval_seq_len = env("EVAL_SEQ_LEN", train_seq_len, ">= 1")
env("EVAL_STRIDE", S(64, 32), ">= 1")
env("VAL_BATCH_SIZE", S(524_288, 16384), ">= 1")
env("VAL_LOSS_EVERY", S(4000, 20), ">= 0")
env("TRAIN_LOG_EVERY", S(200, 10), ">= 1")

# Model.
env("NUM_LAYERS", S(11, 3), ">= 1")
env("MODEL_DIM", S(512, 64), ">= 1")
env("NUM_HEADS", S(8, 4), ">= 1")
env("NUM_KV_HEADS", S(4, 2), ">= 1")
env("MLP_MULT", 3.0, "> 0")
env("LEAKY_RELU_SLOPE", 0.5)
env("TIE_EMBEDDINGS", True)
env("TIED_EMBED_INIT_STD", 0.005, "> 0")
env("ROPE_BASE", 10000.0, "> 0")
env("ROPE_DIMS", S(16, 8))
env("LOGIT_SOFTCAP", 30.0, "> 0")
env("QK_GAIN_INIT", 1.5)
env("LN_SCALE", True)
env("XSA_LAST_N", 11, ">= 0")
env("BIGRAM_VOCAB_SIZE", S(2048, 256))
env("BIGRAM_DIM", S(128, 32), ">= 1")
env("SMEAR_ENABLED", True)
env("UNET_SKIPS", True)
env("VE_ENABLED", True)
env("VE_DIM", S(128, 32), ">= 1")
env("VE_LAYERS", "-2,-1")  # python indices

# Optimizers.
env("MATRIX_LR", 0.025, ">= 0")
env("SCALAR_LR", 0.025, ">= 0")
env("TIED_EMBED_LR", 0.035, ">= 0")
env("EMBED_LR", 0.6, ">= 0")
env("HEAD_LR", 0.008, ">= 0")
env("MUON_MOMENTUM", 0.99, "in [0, 1)")
env("MUON_MOMENTUM_WARMUP_START", 0.92, "in [0, 1)")
env("MUON_MOMENTUM_WARMUP_STEPS", S(1500, 10), ">= 0")
env("MUON_BACKEND_STEPS", 5, ">= 1")
env("MUON_NS_COEFFS", "3.4445,-4.7750,2.0315")
env("MUON_WD", 0.04, ">= 0")
env("ADAM_WD", 0.04, ">= 0")
env("BETA1", 0.9, "in [0, 1)")
env("BETA2", 0.95, "in [0, 1)")
env("ADAM_EPS", 1e-8, "> 0")
env("GRAD_CLIP_NORM", 0.3, ">= 0")

# Weight averaging.
env("EMA_ENABLED", True)
env("EMA_DECAY", S(0.997, 0.9), "in [0, 1)")
env("SWA_ENABLED", False)
env("SWA_EVERY", S(50, 5), ">= 1")
env("SWA_START_SCALE", 0.2)

# Export.
env("ATTN_BITS", 6)
env("MLP_BITS", 6)
env("EMBED_BITS", 8)  # 16: fp16
# SMOKE also quantizes its small matrices.
env("QUANT_OVERRIDES", S("", r"\.(c_q|c_k|c_v|proj|fc)\.weight$:6"))
env("QUANT_METHOD", "gptq")
env("QUANT_CLIP_RATIOS", "1.0,0.995,0.99,0.98,0.97,0.95,0.92,0.9")
env("GPTQ_BLOCK_SIZE", 128, ">= 1")
env("GPTQ_DAMP", 0.01, "> 0")
env("GPTQ_CALIB_BATCHES", S(8, 4), ">= 1")
env("GPTQ_RESERVE_SECONDS", S(10.0, 0.0), ">= 0")
env("LATE_QAT_THRESHOLD", 0.15, ">= 0")
env("PRUNE_FRAC", 0.0)
env("COMPRESSOR", "zstd")
env("ZSTD_LEVEL", 22, ">= 1")
env("ARTIFACT_CAP", 16_000_000, ">= 1")
env("FIT_MAX_PRUNE_FRAC", 0.5)
env("EVAL_ONLY", "")
env("QUANT_ONLY", "")
env("RESUME", "")


# Evaluation.
env("FINAL_EVAL", "roundtrip,sliding_window,lora+ngram")
# 400 s leaves the other passes room in 600 s.
env("TTT_MAX_SECONDS", S(400.0, 0.0), ">= 0")
env("TTT_CHUNK_TOKENS", S(32768, 512), ">= 1")
env("TTT_EPOCHS", S(3, 1), ">= 0")
env("TTT_LR", 0.002, ">= 0")
env("TTT_MOMENTUM", 0.9, ">= 0")
env("TTT_BATCH_SEQS", S(32, 4), ">= 1")
env("TTT_GRAD_CLIP", 1.0, ">= 0")
env("TTT_LORA_RANK", 8, ">= 1")
env("TTT_LORA_LR", 0.01, ">= 0")
ttt_lora_seq_len = env("TTT_LORA_SEQ_LEN", eval_seq_len, ">= 1")
env("TTT_LORA_CHUNK", max(1, min(256, ttt_lora_seq_len // 4)), ">= 1")  # a chunk has >= 3/4 window of context
env("TTT_LORA_BATCH", S(64, 8), ">= 1")
env("TTT_LORA_TARGETS", "k,o,mlp,head")  # of q, k, v, o, mlp, head
env("TTT_SHORT_CHUNKS", "")  # "256:8,2000:24": documents of up to 256 tokens in chunks of 8, ...
env("TTT_ASYM_SOFTCAP", False)
env("PHASED_TTT_PREFIX_DOCS", S(2000, 8), ">= 1")
env("PHASED_TTT_NUM_PHASES", 3, ">= 1")
env("TTT_LOCAL_LR_MULT", 1.0, ">= 0")
env("TTT_WARM_START_A", False)
env("TILT_ORDERS", "16")
env("TILT_MIN_COUNT", 2, ">= 1")
env("TILT_THRESHOLD", 0.8, "> 0")
env("TILT_BOOST", 2.625, ">= 0")
env("NGRAM_ORDER", 8)
env("NGRAM_PRIOR", 3.0, "> 0")
env("NGRAM_ETA", 0.01, ">= 0")
env("NGRAM_INIT_WEIGHT", 0.1)
env("NGRAM_ENTROPY_BINS", 8, ">= 1")
env("NGRAM_CHUNK", 512, ">= 1")


# The April stack (PRESET=top). Progress: step / ITERATIONS or time / cap.
env("PRESET", "seeds")
env("LOOP_LAYERS", "")
env("LOOP_REPEATS", 2, ">= 1")
env("LOOP_START_FRAC", 0.0, "in [0, 1)")
env("PARALLEL_FROM", 0, ">= 0")
env("ATTN_GATE_DIMS", 0, ">= 0")
env("MUON_ROW_NORM", False)
env("NORMUON", False)
env("NORMUON_BETA2", 0.95, "in [0, 1)")
env("MIN_LR", 0.0, "in [0, 1)")
env("MUON_WD_TAPER_START", 1.0, ">= 0")
env("MUON_WD_FINAL", 0.0, ">= 0")
env("EMA_HALF_LIFE_FRAC", 0.0, ">= 0")
env("SEQ_LEN_SCHEDULE", "")
env("EMBED_CLIP_SIGMAS", 0.0, ">= 0")
env("EMBED_GPTQ", False)

# The April export: SDClip per class (0: clip search), LQER.
env("ATTN_CLIP_SIGMAS", 0.0, ">= 0")
env("MLP_CLIP_SIGMAS", 0.0, ">= 0")
env("LQER_RANK", 0, ">= 0")
env("LQER_TOP_K", 3, ">= 1")
env("LQER_BITS", 4)

# Runtime.
env("COMPILE", True)
env("ATTN_BACKEND", "auto")


class Hyperparameters:  # each env("NAME", ...) as attribute name.lower()
    train_files = property(lambda self: os.path.join(self.data_path, "fineweb_train_*.bin"))
    val_files = property(lambda self: os.path.join(self.data_path, "fineweb_val_*.bin"))


for name, value in KNOWN_ENV.items():
    setattr(Hyperparameters, name.lower(), value)


def misspelt_env_warnings():
    out = []
    for name in sorted(os.environ):
        if name != name.upper() and name.upper() in KNOWN_ENV:
            out.append((name, "settings are upper case", name.upper()))
        elif name.isupper() and name not in KNOWN_ENV:  # torchrun's RANK etc. match none
            out += [(name, "not a setting", c) for c in difflib.get_close_matches(name, KNOWN_ENV, n=1, cutoff=0.85)]
    return [f"WARNING: env {name} ignored: {why}, did you mean {close}?" for name, why, close in out]


def ve_layer_indices(args):
    if not args.ve_enabled:
        return []
    try:
        idx = [int(s) for s in args.ve_layers.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"VE_LAYERS={args.ve_layers} must be comma-separated layer indices") from None
    if any(not -args.num_layers <= i < args.num_layers for i in idx):
        raise ConfigError(f"VE_LAYERS={args.ve_layers} has a layer outside 0..{args.num_layers - 1}")
    return sorted({i % args.num_layers for i in idx})


def loop_range(args):
    if not args.loop_layers.strip():
        return None
    a, _, b = args.loop_layers.partition("-")
    a, b = int(a), int(b or a)
    if not 0 <= a <= b < args.num_layers:
        raise ValueError(args.loop_layers)
    return a, b


def final_modes(args):
    return [m.strip() for m in args.final_eval.split(",") if m.strip()]


CHOICES = dict(PRESET=("seeds", *PRESETS), QUANT_METHOD=("gptq", "rtn"), COMPRESSOR=("zstd", "lzma", "brotli", "pergroup", "auto"),
               ATTN_BACKEND=("auto", "fa3", "fa2", "sdpa"))


def raise_config_errors(err):
    if err:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(err))


def validate_config(args, world_size, grad_accum_steps):
    value = {n: getattr(args, n.lower()) for n in KNOWN_ENV}
    err = ENV_ERRORS + [f"{n}={value[n]} must be a finite number" for n, d in KNOWN_ENV.items()
                        if isinstance(d, float) and not math.isfinite(value[n])]
    err += [f"{n}={value[n]} must be {rule}" for n, rule in RANGES.items() if not IN_RANGE[rule](value[n])]
    err += [f"{n}={value[n]} must be one of {', '.join(c)}" for n, c in CHOICES.items() if value[n] not in c]
    if args.vocab_size < 4:
        err.append(f"VOCAB_SIZE={args.vocab_size} must be >= 4 (ids 0-2 are special)")
    raise_config_errors(err)  # the checks below assume these
    if args.model_dim % args.num_heads:
        err.append(f"NUM_HEADS={args.num_heads} must divide MODEL_DIM={args.model_dim}")
    elif args.num_heads % args.num_kv_heads:
        err.append(f"NUM_KV_HEADS={args.num_kv_heads} must divide NUM_HEADS={args.num_heads}")
    else:
        head_dim = args.model_dim // args.num_heads
        if head_dim % 2:
            err.append(f"MODEL_DIM/NUM_HEADS={head_dim} must be even for RoPE")
        if args.rope_dims % 2 or not 0 < args.rope_dims <= head_dim:
            err.append(f"ROPE_DIMS={args.rope_dims} must be even and in 2..head dim {head_dim}")
    if 8 % world_size and not args.grad_accum_steps:
        err.append(f"WORLD_SIZE={world_size} must divide 8, or set GRAD_ACCUM_STEPS")
    elif grad_accum_steps < 1 or args.train_batch_tokens % (world_size * grad_accum_steps * args.train_seq_len):
        err.append(f"TRAIN_BATCH_TOKENS={args.train_batch_tokens} must be divisible by WORLD_SIZE x "
                   f"GRAD_ACCUM_STEPS x TRAIN_SEQ_LEN = {world_size}x{grad_accum_steps}x{args.train_seq_len}")
    if args.eval_stride > args.eval_seq_len:  # >= 1 is checked above
        err.append(f"EVAL_STRIDE={args.eval_stride} must be in 1..EVAL_SEQ_LEN={args.eval_seq_len}")
    if int(args.mlp_mult * args.model_dim) < 1:
        err.append(f"MLP_MULT={args.mlp_mult} x MODEL_DIM={args.model_dim} leaves the MLP no hidden unit")
    if 0 != args.bigram_vocab_size < 2:
        err.append(f"BIGRAM_VOCAB_SIZE={args.bigram_vocab_size} must be 0 (off) or >= 2")
    if any(not 2 <= b <= 8 for b in {args.attn_bits, args.mlp_bits, args.embed_bits} - {16} | {args.lqer_bits}):
        err.append("ATTN_BITS, MLP_BITS, EMBED_BITS (or 16: fp16) and LQER_BITS must be in 2..8")
    try:
        quant_overrides(args)
        if not all(0 < r <= 1 for r in clip_ratios(args)):
            raise ValueError
    except ValueError as e:
        err.append(str(e) if isinstance(e, ConfigError) else f"QUANT_CLIP_RATIOS={args.quant_clip_ratios} must be in (0, 1]")
    if not 0 <= args.prune_frac < args.fit_max_prune_frac < 1:
        err.append("0 <= PRUNE_FRAC < FIT_MAX_PRUNE_FRAC < 1 is required")
    err += [f"{n}={value[n]}: no such file" for n in ("EVAL_ONLY", "QUANT_ONLY") if value[n] and not os.path.isfile(value[n])]
    if args.resume and not os.path.isdir(args.resume):
        err.append(f"RESUME={args.resume}: no such checkpoint folder (saved as checkpoints/<RUN_ID>)")
    modes = final_modes(args)
    if not modes or not all(re.fullmatch(f"({'|'.join(NETWORK_MODES)})(\\+tilt)?(\\+ngram)?", m) for m in modes):
        err.append(f"FINAL_EVAL={args.final_eval}: modes must be {', '.join(NETWORK_MODES)}, each maybe +tilt, +ngram")
    try:
        if not all(0 < c <= args.ttt_lora_seq_len for _, c in short_chunks(args) + [(0, args.ttt_lora_chunk)]) \
                or not all(0 < int(o) <= 64 for o in args.tilt_orders.split(",")):
            raise ValueError
    except ValueError:
        err.append("TTT_LORA_CHUNK, TTT_SHORT_CHUNKS (LEN:CHUNK,...) need chunks in 1..TTT_LORA_SEQ_LEN; TILT_ORDERS 1..64")
    if not set(args.ttt_lora_targets.split(",")) <= {*LORA_SITES, "head"}:
        err.append(f"TTT_LORA_TARGETS={args.ttt_lora_targets} must be some of {', '.join(LORA_SITES)}, head")
    if not 1 <= args.ngram_order <= 8 or not 0 < args.ngram_init_weight < 1:
        err.append("NGRAM_ORDER must be in 1..8 and NGRAM_INIT_WEIGHT in (0, 1)")
    try:
        coeffs = ns_coefficients(args.muon_ns_coeffs)
        if coeffs is not POLAR_EXPRESS and (len(coeffs) != 3 or not all(map(math.isfinite, coeffs))):
            raise ValueError
    except ValueError:
        err.append(f"MUON_NS_COEFFS={args.muon_ns_coeffs} must be a,b,c (three numbers) or polar")
    try:
        ve_layer_indices(args)
    except ValueError as e:
        err.append(str(e))
    try:
        loop_range(args)
    except ValueError:
        err.append(f"LOOP_LAYERS={args.loop_layers} must be A-B with 0 <= A <= B < NUM_LAYERS")
    if args.parallel_from >= args.num_layers or args.attn_gate_dims > args.model_dim or args.muon_wd_taper_start > 1:
        err.append("PARALLEL_FROM < NUM_LAYERS, ATTN_GATE_DIMS <= MODEL_DIM, MUON_WD_TAPER_START <= 1 are required")
    local = args.train_batch_tokens // (world_size * max(grad_accum_steps, 1))
    try:
        lens, until = zip(*seq_len_schedule(args))
        if any(local % n or not 0 < n <= args.train_seq_len for n in lens) or list(until) != sorted(set(until)) \
                or not all(0 < u < 1 for u in until[:-1]):
            raise ValueError
    except ValueError:
        err.append(f"SEQ_LEN_SCHEDULE={args.seq_len_schedule} must be LEN:PROGRESS,... (PROGRESS rising in (0, 1), "
                   f"LEN <= TRAIN_SEQ_LEN dividing {local})")
    raise_config_errors(err)


# ------------- MUON OPTIMIZER
# Momentum, then each matrix update orthogonalized (Newton-Schulz).

# Polar Express (Amsel et al. 2025): each quintic optimal for the spectrum the last leaves.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def ns_coefficients(spec):
    return POLAR_EXPRESS if spec.strip() == "polar" else tuple(float(c) for c in spec.split(","))


def zeropower_via_newtonschulz5(G, steps, coeffs):
    """~U V^T of G = U S V^T; coeffs (a, b, c), or one per step (the last repeats)."""
    table = coeffs if isinstance(coeffs[0], tuple) else (coeffs,)
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    X = X / (X.norm() + 1e-7)
    transposed = X.size(0) > X.size(1)
    if transposed:  # the smaller Gram matrix
        X = X.T
    for i in range(steps):
        a, b, c = table[min(i, len(table) - 1)]
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if transposed else X


class Muon(torch.optim.Optimizer):
    """Rank r orthogonalizes params r, r + world, ...; each round's all-reduce overlaps the next."""

    def __init__(self, params, row_norm=False, normuon_beta2=0.0, **group):
        super().__init__(params, group)  # group: lr, base_lr, momentum, backend_steps, coeffs, weight_decay
        self.row_norm, self.normuon_beta2 = row_norm, normuon_beta2

    def orthogonalize(self, p, g, group):
        if self.row_norm:  # MuonEq-R
            g = g / (g.norm(dim=1, keepdim=True) + 1e-7)
        g = zeropower_via_newtonschulz5(g, group["backend_steps"], group["coeffs"])
        if self.normuon_beta2:  # NorMuon: rows over their running RMS, norm kept
            g, v = g.float(), self.state[p].setdefault("row_second_moment", torch.zeros(g.size(0), 1, device=g.device))
            v.lerp_(g.square().mean(dim=1, keepdim=True), 1 - self.normuon_beta2)
            n, g = g.norm(), g / (v.sqrt() + 1e-8)
            g = g * (n / (g.norm() + 1e-8))
        return g * max(1.0, p.size(0) / p.size(1)) ** 0.5  # equal RMS for tall matrices

    @torch.no_grad()
    def step(self):
        distributed = dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        params = [(group, p) for group in self.param_groups for p in group["params"]]
        if not params:
            return
        flat = torch.zeros(sum(p.numel() for _, p in params), device=params[0][1].device)
        offset, pending = 0, []
        for group in self.param_groups:
            m, round_start = group["momentum"], offset
            for i, p in enumerate(group["params"]):
                if i % world == rank and p.grad is not None:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    buf.mul_(m).add_(p.grad)
                    g = self.orthogonalize(p, p.grad.add(buf, alpha=m), group)  # Nesterov
                    flat[offset:offset + p.numel()] = g.flatten()
                offset += p.numel()
                if distributed and (i % world == world - 1 or i == len(group["params"]) - 1):
                    pending.append(dist.all_reduce(flat[round_start:offset], async_op=True))
                    round_start = offset
        for work in pending:
            work.wait()
        for (group, p), update in zip(params, flat.split([p.numel() for _, p in params])):
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update.view_as(p).to(p.dtype), alpha=-group["lr"])


# ------------- TOKENIZER-AGNOSTIC EVALUATION SETUP
# val_bpb = nats / (ln 2 x the targets' UTF-8 bytes); a leading "\u2581" is a space byte, except after BOS.

def build_sentencepiece_luts(sp, vocab_size, device):
    pieces = int(sp.vocab_size())
    table = max(pieces, vocab_size)
    base_bytes, has_leading_space, is_boundary = np.zeros(table, np.int16), np.zeros(table, bool), np.ones(table, bool)
    for t in range(pieces):
        if sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t):
            continue
        is_boundary[t], piece = False, sp.id_to_piece(t)  # byte pieces: "<0x..>"
        has_leading_space[t] = piece.startswith("\u2581")
        base_bytes[t] = 1 if sp.is_byte(t) else len(piece.removeprefix("\u2581").encode())
    return tuple(torch.tensor(a, device=device) for a in (base_bytes, has_leading_space, is_boundary))


# CaseOps controls (data/caseops.py).
CASEOPS_CONTROLS = "\ue000\ue001\ue002\ue003"


def is_caseops_tokenizer(sp):
    return any(sp.piece_to_id(c) != sp.unk_id() for c in CASEOPS_CONTROLS)


def target_bytes(tokens, luts):
    """UTF-8 bytes of each target tokens[1:]; `luts`: tokenizer tables or byte sidecar."""
    if isinstance(luts, Tensor):
        if luts.numel() != tokens.numel():
            raise DataError(f"byte sidecar has {luts.numel()} counts for {tokens.numel()} tokens")
        return luts[1:].double()  # on the host: only summed
    base_bytes, has_space, is_boundary = luts
    x, y = tokens[:-1], tokens[1:]
    return base_bytes[y].double() + (has_space[y] & ~is_boundary[x]).double()


# ------------- DATA LOADING
# Shard: 256 int32 header (magic, version, token count), uint16 tokens; little-endian.

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
VAL_BYTES_MAGIC = 20240521  # CaseOps byte sidecars: never read as token shards


def shard_token_count(path, magic=SHARD_MAGIC):
    size, header = os.path.getsize(path), np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size != HEADER_INTS or header[0] != magic:
        raise DataError(f"{path}: not a {'shard' if magic == SHARD_MAGIC else 'byte sidecar'} "
                        f"(magic {header[0] if header.size else None}, expected {magic})")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: shard version {header[1]}, expected {SHARD_VERSION}")
    n = int(header[2])
    if n < 0 or size != (expected := HEADER_INTS * 4 + 2 * n):
        raise DataError(f"{path}: {size} bytes but the header says {n} tokens ({expected} bytes): "
                        "truncated or corrupt, download or export it again")
    return n


def load_data_shard(path, vocab_size=None, magic=SHARD_MAGIC):
    n = shard_token_count(path, magic)
    tokens = np.fromfile(path, dtype="<u2", count=n, offset=HEADER_INTS * 4)
    if vocab_size is not None and n and (top := int(tokens.max())) >= vocab_size:
        raise DataError(f"{path}: token id {top} >= VOCAB_SIZE={vocab_size}: shards and tokenizer differ")
    return tokens


def shard_files(pattern, what):
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {what} shards match {pattern}: download them "
                                "(data/cached_challenge_fineweb.py) or set DATA_PATH")
    return files


class DistributedTokenLoader:
    def __init__(self, pattern, vocab_size, rank, world_size, device):
        self.files, self.vocab_size = shard_files(pattern, "training"), vocab_size
        self.rank, self.world_size, self.device = rank, world_size, device
        for f in self.files:  # a bad shard found mid-run wastes it
            shard_token_count(f)
        self.seek(0, 0)

    def seek(self, file_idx, pos):
        self.file_idx, self.pos = file_idx, pos
        self.tokens = load_data_shard(self.files[file_idx], self.vocab_size)

    def next_batch(self, local_tokens, seq_len):
        span, parts = local_tokens + 1, []
        n = span * self.world_size
        while n > 0:
            if self.pos >= len(self.tokens):
                self.seek((self.file_idx + 1) % len(self.files), 0)
            k = min(n, len(self.tokens) - self.pos)
            parts.append(self.tokens[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        local = torch.from_numpy(np.concatenate(parts)[self.rank * span:(self.rank + 1) * span].astype(np.int64))
        if self.device.type == "cuda":
            local = local.pin_memory().to(self.device, non_blocking=True)
        return local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)


def load_validation_tokens(pattern, vocab_size):
    tokens = np.concatenate([load_data_shard(f, vocab_size) for f in shard_files(pattern, "validation")])
    if len(tokens) < 2:
        raise DataError(f"validation split {pattern} holds {len(tokens)} tokens: nothing to score")
    return torch.from_numpy(tokens.astype(np.int64))


def load_validation_bytes(pattern):
    """Each val token's original bytes (CaseOps sidecars), or None."""
    shards = shard_files(pattern, "validation")
    sidecars = [os.path.join(d, b.replace("fineweb_val_", "fineweb_valbytes_", 1)) for d, b in map(os.path.split, shards)]
    present = [os.path.isfile(f) for f in sidecars]
    if not any(present):
        return None
    if not all(present):
        raise DataError(f"{sidecars[present.index(False)]} is missing (all val shards have one or none): re-export")
    counts = []
    for shard, sidecar in zip(shards, sidecars):
        counts.append(c := load_data_shard(sidecar, magic=VAL_BYTES_MAGIC))
        if len(c) != shard_token_count(shard):
            raise DataError(f"{sidecar} has {len(c)} counts, {shard} another token count: re-export the dataset")
    return torch.from_numpy(np.concatenate(counts).astype(np.int64))


# ------------- MODEL

BOS_ID = 1


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """fp32 weights, used in the activation dtype; late QAT adds `qat_delta` = fake_quantize(w) - w (w gets grads)."""

    def __init__(self, in_features, out_features, zero_init=False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init
        self.register_buffer("qat_delta", None, persistent=False)

    def forward(self, x):
        w = self.weight if self.qat_delta is None else self.weight + self.qat_delta
        return F.linear(x, w.to(x.dtype))


def prepare_qat(model, args):
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, CastedLinear) and (bits := quant_bits_for(name + ".weight", m.weight, args)):
            m.qat_bits, m.qat_delta = bits, torch.zeros_like(m.weight)
            m.qat_sigmas = getattr(args, tensor_class(name + ".weight") + "_clip_sigmas")  # as in the export
            layers.append(m)
    return layers


@torch.no_grad()
def refresh_qat(layers, ratios):
    for m in layers:
        m.qat_delta.copy_(fake_quantize(m.weight, m.qat_bits, ratios, m.qat_sigmas) - m.weight)


ATTN_IMPL = {"fn": None}  # FlashAttention's function; None: SDPA


def select_attention(requested, device):
    modules = {"fa3": "flash_attn_interface", "fa2": "flash_attn"}
    for name in [n for n in modules if requested == n or requested == "auto" and device.type == "cuda"]:
        try:
            ATTN_IMPL["fn"] = __import__(modules[name]).flash_attn_func
            return name
        except ImportError:
            if requested != "auto":
                raise ConfigError(f"ATTN_BACKEND={requested} but {modules[name]} is not importable")
    ATTN_IMPL["fn"] = None
    return "sdpa"


def causal_attention(q, k, v):
    """q: (B,T,H,D), k/v: (B,T,Hkv,D) -> (B,T,H,D); each backend does GQA."""
    if ATTN_IMPL["fn"] is not None:
        out = ATTN_IMPL["fn"](q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


class Rotary(nn.Module):
    """RoPE on a head's first `dims` dims, NTK-scaled past the training length."""

    def __init__(self, dims, base, train_seq_len):
        super().__init__()
        self.dims, self.base, self.train_seq_len = dims, base, train_seq_len

    def forward(self, T, device):
        base = self.base
        if T > self.train_seq_len and self.dims > 2:
            base *= (T / self.train_seq_len) ** (self.dims / (self.dims - 2))
        inv_freq = base ** (-torch.arange(0, self.dims, 2, device=device, dtype=torch.float32) / self.dims)
        freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)
        return freqs.cos()[:, None], freqs.sin()[:, None]  # (T, 1, dims / 2)


def apply_rotary(x, cos, sin):
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, args, xsa):
        super().__init__()
        dim, self.head_dim = args.model_dim, args.model_dim // args.num_heads
        kv_dim = args.num_kv_heads * self.head_dim
        self.c_q, self.c_k, self.c_v = CastedLinear(dim, dim), CastedLinear(dim, kv_dim), CastedLinear(dim, kv_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((args.num_heads,), args.qk_gain_init))
        self.rotary, self.xsa = Rotary(args.rope_dims, args.rope_base, args.train_seq_len), xsa
        # Per-head output gate 2 sigmoid(W x[:ATTN_GATE_DIMS]); zero init: identity.
        self.gate = nn.Parameter(torch.zeros(args.num_heads, args.attn_gate_dims)) if args.attn_gate_dims else None

    def forward(self, x, ve):
        B, T, _ = x.shape
        q, k, v = [f(x).view(B, T, -1, self.head_dim) for f in (self.c_q, self.c_k, self.c_v)]
        if ve is not None:
            v = v + ve.view_as(v)
        cos, sin = self.rotary(T, x.device)
        q = apply_rotary(rms_norm(q), cos, sin) * self.q_gain.to(x.dtype)[:, None]
        k = apply_rotary(rms_norm(k), cos, sin)
        # FlashAttention needs bf16/fp16: undo any fp32 promotion.
        y = causal_attention(q.to(x.dtype), k.to(x.dtype), v.to(x.dtype))
        if self.xsa:  # XSA: drop each head output's component along the token's own value
            yg = y.view(B, T, v.size(2), -1, self.head_dim)
            vn = F.normalize(v, dim=-1).unsqueeze(3)
            y = (yg - (yg * vn).sum(-1, keepdim=True) * vn).view_as(y)
        if self.gate is not None:
            y = y * 2 * torch.sigmoid(F.linear(x[..., :self.gate.size(1)], self.gate.to(x.dtype)))[..., None]
        return self.proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim, mult, slope):
        super().__init__()
        hidden = int(mult * dim)
        self.fc, self.proj, self.slope = CastedLinear(dim, hidden), CastedLinear(hidden, dim, zero_init=True), slope

    def forward(self, x):
        return self.proj(F.leaky_relu(self.fc(x), self.slope).square())


class Block(nn.Module):
    def __init__(self, args, layer_idx, xsa):
        super().__init__()
        dim = args.model_dim
        self.attn, self.mlp = Attention(args, xsa), MLP(dim, args.mlp_mult, args.leaky_relu_slope)
        self.attn_scale, self.mlp_scale = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))  # (stream, x0) weights
        self.in_scale = 1.0 / math.sqrt(layer_idx + 1) if args.ln_scale else 1.0
        self.parallel = 0 < args.parallel_from <= layer_idx

    def forward(self, x, x0, ve):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x_in, x = x, x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.in_scale, ve)
        mlp_in = x_in if self.parallel else x  # parallel: both read the input
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(mlp_in) * self.in_scale)


class SmearGate(nn.Module):
    """Blend each position with the previous by a per-dim gate; a BOS keeps its own."""

    def __init__(self, dim):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x, ids):
        g = torch.sigmoid(self.gate.to(x.dtype)) * (ids != BOS_ID).unsqueeze(-1).to(x.dtype)
        return x + g * (F.pad(x[:, :-1], (0, 0, 1, 0)) - x)  # x[t - 1], zero at t = 0


class BigramHash(nn.Module):
    """Hashed (previous, current) token pair embedding; slot `size - 1`: no previous."""

    def __init__(self, size, dim, model_dim):
        super().__init__()
        self.size, self.embed = size, nn.Embedding(size, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.proj = CastedLinear(dim, model_dim, zero_init=True)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def bucket(self, ids):
        prev = F.pad(ids[:, :-1], (1, 0))
        h = torch.remainder((ids * 92821) ^ (prev * 689287), self.size - 1)
        start = (torch.arange(ids.size(1), device=ids.device) == 0) | (ids == BOS_ID)
        return torch.where(start, self.size - 1, h)

    def forward(self, ids):
        return self.proj(self.embed(self.bucket(ids))) * self.scale


class ValueEmbedding(nn.Module):
    """A token embedding added to some layers' attention values."""

    def __init__(self, vocab_size, dim, kv_dim, n_layers):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.proj = CastedLinear(dim, kv_dim, zero_init=True)
        self.layer_scales = nn.Parameter(torch.ones(n_layers))

    def forward(self, ids, dtype):
        return self.proj(self.embed(ids).to(dtype))


class GPT(nn.Module):
    def __init__(self, args, act_dtype=torch.float32):
        super().__init__()
        L, dim = args.num_layers, args.model_dim
        self.act_dtype, self.logit_softcap = act_dtype, args.logit_softcap
        self.tok_emb = nn.Embedding(args.vocab_size, dim)
        self.bigram = BigramHash(args.bigram_vocab_size, args.bigram_dim, dim) if args.bigram_vocab_size else None
        self.smear = SmearGate(dim) if args.smear_enabled else None
        self.blocks = nn.ModuleList(Block(args, i, xsa=i >= L - args.xsa_last_n) for i in range(L))
        self.ve_layers, kv_dim = ve_layer_indices(args), args.num_kv_heads * (dim // args.num_heads)
        self.ve = ValueEmbedding(args.vocab_size, args.ve_dim, kv_dim, len(self.ve_layers)) if self.ve_layers else None
        self.num_encoder = L // 2 if args.unet_skips else 0  # U-Net: first half feeds the second
        self.skip_weights = nn.Parameter(torch.ones(self.num_encoder, dim))  # L // 2 <= L - L // 2
        self.lm_head = None if args.tie_embeddings else CastedLinear(dim, args.vocab_size, zero_init=True)
        self.head_input = nn.Identity()  # for GPTQ of tied embeddings
        self.register_parameter("asym_softcap", None)  # TTT_ASYM_SOFTCAP's (positive, negative) caps
        self.loop_range = loop_range(args)
        self.loop_passes = 1 + args.loop_repeats if self.loop_range else 1  # an int: one graph per value
        if args.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, std=args.tied_embed_init_std)
        for m in self.modules():
            if isinstance(m, CastedLinear):
                nn.init.zeros_(m.weight) if m.zero_init else nn.init.orthogonal_(m.weight)

    def layer_order(self):
        order = list(range(len(self.blocks)))
        if self.loop_passes > 1:
            a, b = self.loop_range
            order = order[:b + 1] + list(range(a, b + 1)) * (self.loop_passes - 1) + order[b + 1:]
        return order

    def logits(self, ids, head_delta=None):
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(ids)
        x = rms_norm(x.to(self.act_dtype))
        if self.smear is not None:
            x = self.smear(x, ids)
        x0, skips = x, {}
        ve = self.ve(ids, x.dtype) if self.ve is not None else None
        for i in self.layer_order():  # skips and VE follow the physical block
            if 0 <= i - self.num_encoder < len(self.skip_weights):
                x = x + self.skip_weights[i - self.num_encoder].to(x.dtype) * skips[2 * self.num_encoder - 1 - i]
            ve_i = ve * self.ve.layer_scales[self.ve_layers.index(i)].to(x.dtype) if i in self.ve_layers else None
            x = self.blocks[i](x, x0, ve_i)
            if i < self.num_encoder:
                skips[i] = x
        x = self.head_input(rms_norm(x))
        logits = F.linear(x, self.tok_emb.weight.to(x.dtype)) if self.lm_head is None else self.lm_head(x)
        if head_delta is not None:
            logits = logits + head_delta(x)
        cap = self.logit_softcap if self.asym_softcap is None else torch.where(logits > 0, *self.asym_softcap)
        return cap * torch.tanh(logits.float() / cap)

    def forward(self, ids, targets=None):
        logits = self.logits(ids)
        return logits if targets is None else F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


# ------------- EVALUATION
# The FINAL_EVAL modes, each filling a ScoreSheet, and the causality audit (README).

NETWORK_MODES = ("roundtrip", "sliding_window", "lora", "phased")
AUDIT_PROBES = 4  # projections of an audited distribution
AUDIT_MAX_NOISE = 1e-2  # nats: a noisier mode hides leaks in its noise


class EvalError(RuntimeError):
    """A mode broke its contract (a target scored twice or never, a leak)."""


@dataclass
class Evaluation:
    """`model` (maybe compiled) scores; TTT adapts and LoRA hooks `base_model`."""
    args: object
    model: nn.Module
    base_model: nn.Module
    device: torch.device
    rank: int = 0
    world_size: int = 1
    log: object = print
    val_targets: int = 0

    def share(self, items):  # this rank's contiguous part
        n = len(items)
        return items[n * self.rank // self.world_size:n * (self.rank + 1) // self.world_size]


@functools.cache
def audit_probes(vocab, device):
    return torch.randn(vocab, AUDIT_PROBES, generator=torch.Generator().manual_seed(vocab)).to(device)


class ScoreSheet:
    """Per target: loss, entropy, hits; audited, the distribution's fingerprint, loss, normalization. `used`:
    targets an update trained on (scoring one after: score-adapt-rescore)."""

    def __init__(self, total, device, audit=False):
        self.nats, self.ent = torch.zeros(total, device=device), torch.zeros(total, device=device)
        self.hits = torch.zeros(total, dtype=torch.int32, device=device)
        self.fp, self.row_nats = (
            (torch.zeros(total, AUDIT_PROBES, device=device), torch.zeros(total, device=device)) if audit else (None, None))
        self.norm_err, self.late = torch.zeros((), device=device), torch.zeros((), device=device)
        self.used = torch.zeros(total, dtype=torch.bool, device=device)
        self.net_nats, self.hint = self.nats, None  # `nats` before a mixture; the tilt's hinted tokens

    @torch.no_grad()
    def record(self, pos, logits, y):
        logits = logits.float()
        if self.hint is not None:  # the tilt: p(a) exp(boost [a = hint]) / Z, over the whole vocabulary
            h = self.hint[pos]
            logits = logits.scatter_add(1, h.clamp(min=0)[:, None], self.boost * (h >= 0).float()[:, None])
        self.late += self.used[pos].sum()
        logp = F.log_softmax(logits, dim=-1)
        nats = -logp.gather(1, y[:, None]).squeeze(1)
        self.nats.index_add_(0, pos, nats)
        self.ent.index_add_(0, pos, -(logp.exp() * logp).sum(1))
        self.hits.index_add_(0, pos, torch.ones_like(pos, dtype=torch.int32))
        if self.fp is not None and len(pos):
            self.fp.index_add_(0, pos, logp.exp() @ audit_probes(logp.size(1), logp.device))
            self.row_nats.index_add_(0, pos, nats)
            self.norm_err = torch.maximum(self.norm_err, logp.logsumexp(1).abs().max())

    def reduce(self, names=("nats", "ent", "hits", "fp", "row_nats", "late")):
        if dist.is_initialized():
            for t in (getattr(self, k) for k in names):
                if t is not None:
                    dist.all_reduce(t)
            dist.all_reduce(self.norm_err, op=dist.ReduceOp.MAX)

    def check_once(self):
        bad = (self.hits != 1).nonzero()
        if len(bad):
            raise EvalError(f"{len(bad)} of {self.hits.numel()} targets not scored exactly once "
                            f"(target {int(bad[0])} scored {int(self.hits[bad[0]])} times)")
        if self.late:
            raise EvalError(f"{int(self.late)} targets scored after an update that trained on them (not one pass)")

    def result(self, tokens, luts):
        self.check_once()
        nbytes = target_bytes(tokens.to(self.nats.device), luts)
        nats = self.nats.double().sum().item()
        if not math.isfinite(nats):
            raise EvalError(f"non-finite validation loss {nats}: check the training log and the artifact")
        return nats / nbytes.numel(), nats / (math.log(2) * nbytes.sum().item())


def autocast_ctx(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def window_plan(total, seq_len, stride):
    """Window starts, and each window's first scored target."""
    starts = np.arange(0, max(total - seq_len, 0) + 1, stride, dtype=np.int64)
    if starts[-1] + seq_len < total:
        starts = np.append(starts, total - seq_len)
    return starts, np.concatenate(([0], starts[:-1] + seq_len))


@torch.no_grad()
def score_windows(ev, tokens, starts, score_from, seq_len, sheet):
    offsets = torch.arange(seq_len + 1)
    batch = max(1, ev.args.val_batch_size // (ev.world_size * seq_len))
    for b in range(0, len(starts), batch):
        s, f = torch.from_numpy(starts[b:b + batch]), torch.from_numpy(score_from[b:b + batch])
        pad = batch - len(s)  # last window again, unscored: one shape, one graph
        s, f = torch.cat((s, s[-1:].expand(pad))), torch.cat((f, (s[-1:] + seq_len).expand(pad)))
        win = tokens[s[:, None] + offsets].to(ev.device, non_blocking=True)
        pos = (s[:, None] + offsets[:-1]).to(ev.device)
        keep = pos >= f.to(ev.device)[:, None]
        with autocast_ctx(ev.device):
            logits = ev.model(win[:, :-1])
        sheet.record(pos[keep], logits[keep], win[:, 1:][keep])


def eval_windows(ev, tokens, sheet, stride):
    seq_len = min(ev.args.eval_seq_len, tokens.numel() - 1)
    starts, score_from = window_plan(tokens.numel() - 1, seq_len, stride)
    score_windows(ev, tokens, ev.share(starts), ev.share(score_from), seq_len, sheet)


class Budget:
    """TTT_MAX_SECONDS, scoring included: adaptation stops in time to score the rest."""

    def __init__(self, seconds):
        self.seconds, self.t0, self.score_s, self.step_s, self.skipped = seconds, time.perf_counter(), 0.0, 0.0, 0

    def adapt_ok(self, frac_scored):
        rest = self.score_s / max(frac_scored, 1e-9) * (1 - frac_scored)
        return self.seconds <= 0 or time.perf_counter() - self.t0 + 1.2 * rest + self.step_s < self.seconds


def sgd_on_prefix(ev, tokens, end, sheet, budget, frac_scored):
    """Phased TTT's global phase: TTT_EPOCHS of SGD on the targets before `end` (now marked used), chunk by chunk,
    TTT_LR cosine-decayed over the chunks, TTT_BATCH_SEQS a rank a step."""
    t, args, model, world_size = time.perf_counter(), ev.args, ev.base_model, ev.world_size
    ok = torch.tensor(float(not budget.skipped and budget.adapt_ok(frac_scored)), device=ev.device)
    if world_size > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # all ranks adapt, or none
    if not ok.item():
        budget.skipped += 1
        return
    params = list(model.parameters())
    model.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=args.ttt_lr, momentum=args.ttt_momentum)
    C, B = args.ttt_chunk_tokens, args.ttt_batch_seqs * world_size
    sheet.used[:end] = True
    for c in range(n := -(-end // C)):
        hi = min((c + 1) * C, end)
        n_tok = min(args.eval_seq_len, hi)  # windows end by hi: never past the scored targets
        seq_starts = np.unique(np.append(np.arange(c * C, hi - n_tok + 1, n_tok), hi - n_tok))
        for g in opt.param_groups:
            g["lr"] = args.ttt_lr * 0.5 * (1 + math.cos(math.pi * c / max(n - 1, 1)))
        for i in list(range(0, len(seq_starts), B)) * args.ttt_epochs:
            s = torch.from_numpy(seq_starts[i:i + B][ev.rank::world_size])
            opt.zero_grad(set_to_none=False)
            if len(s):
                win = tokens[s[:, None] + torch.arange(n_tok + 1)].to(ev.device)
                with autocast_ctx(ev.device):
                    loss = ev.model(win[:, :-1], win[:, 1:]).sum() / (min(B, len(seq_starts) - i) * n_tok)
                loss.backward()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if world_size > 1:
                    dist.all_reduce(p.grad)
            if args.ttt_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.ttt_grad_clip)
            opt.step()
    model.requires_grad_(False)
    budget.step_s = time.perf_counter() - t


def doc_spans(tokens):
    """Documents as target ranges [start, end), BOS to BOS."""
    starts = np.union1d(0, np.flatnonzero(tokens[:-1].numpy() == BOS_ID))  # and one at 0
    return starts, np.append(starts[1:], tokens.numel() - 1)


LORA_SITES = dict(q=lambda b: b.attn.c_q, k=lambda b: b.attn.c_k, v=lambda b: b.attn.c_v, o=lambda b: b.attn.proj,
                  mlp=lambda b: b.mlp)


class DocLoRA(nn.Module):
    """Per-document rank-r adapters on TTT_LORA_TARGETS (`mlp`: beside the MLP); B starts at 0, A the same for all
    (seeded, or warm): scores independent of batching."""

    def __init__(self, model, n_docs, args, device, warm_a=None):
        super().__init__()
        names = args.ttt_lora_targets.split(",")
        self.targets = [LORA_SITES[n](blk) for blk in model.blocks for n in names if n != "head"]
        dims = [(m.fc.in_features, m.proj.out_features) if isinstance(m, MLP) else (m.in_features, m.out_features)
                for m in self.targets] + [tuple(model.tok_emb.weight.shape[::-1])] * ("head" in names)
        g, r = torch.Generator().manual_seed(0), args.ttt_lora_rank
        warm_a = warm_a or [torch.randn(1, i, r, generator=g) / math.sqrt(i) for i, _ in dims]
        self.A = nn.ParameterList(a.repeat(n_docs, 1, 1).to(device) for a in warm_a)
        self.B = nn.ParameterList(torch.zeros(n_docs, r, o, device=device) for _, o in dims)
        self.head = (lambda x: self.delta(len(self.targets), x)) if "head" in names else None

    def delta(self, k, x):
        return (x @ self.A[k].to(x.dtype)) @ self.B[k].to(x.dtype)

    def attach(self):
        return [m.register_forward_hook(lambda mod, inp, out, k=k: out + self.delta(k, inp[0]))
                for k, m in enumerate(self.targets)]


def short_chunks(args):
    return sorted(tuple(map(int, x.split(":"))) for x in args.ttt_short_chunks.split(",") if x.strip())


def eval_lora(ev, tokens, sheet, budget, docs=None, lr_scale=1.0, warm_a=None, frac=(0.0, 1.0)):
    """Per-document score-first LoRA TTT of `docs` (all), longest first over the ranks, eager (hooks change the
    graph). `frac`: share of all targets scored before and after. Returns the sum of the final A."""
    args, model, device = ev.args, ev.base_model, ev.device
    starts, ends = doc_spans(tokens)
    docs = np.arange(len(starts)) if docs is None else docs
    lens = ends - starts
    mine = docs[np.argsort(-lens[docs], kind="stable")][ev.rank::ev.world_size]
    L, scored_tokens, my_tokens = args.ttt_lora_seq_len, 0, max(int(lens[mine].sum()), 1)
    a_sum = [a.detach().sum(0, keepdim=True) for a in DocLoRA(model, 0, args, device, warm_a).A]
    model.requires_grad_(False)
    for b in range(0, len(mine), args.ttt_lora_batch):
        batch = mine[b:b + args.ttt_lora_batch]
        s0, n = torch.from_numpy(starts[batch]), torch.from_numpy(lens[batch])
        C = torch.full_like(n, args.ttt_lora_chunk)
        for most, c in reversed(short_chunks(args)):  # short documents: smaller chunks
            C = torch.where(n <= most, c, C)
        lora = DocLoRA(model, len(batch), args, device, warm_a)
        opt = torch.optim.Adam(lora.parameters(), lr=args.ttt_lora_lr * lr_scale, betas=(0.9, 0.95))
        hooks, last_a = lora.attach(), [a.detach().clone() for a in lora.A]  # A at each document's last update
        for i in range(int((-(-n // C)).max())):
            t = time.perf_counter()
            q0, qe = i * C, torch.minimum(n, (i + 1) * C)  # doc-relative targets [q0, qe)
            w0 = torch.clamp(qe - L, min=0)
            q = w0[:, None] + torch.arange(int((qe - w0).max()))
            pos = s0[:, None] + torch.minimum(q, qe[:, None] - 1)
            x, y, pos = tokens[pos].to(device), tokens[pos + 1].to(device), pos.to(device)
            scored = ((q < qe[:, None]) & (q >= q0[:, None])).to(device)
            train = (n > (i + 1) * C).to(device)  # documents with chunks left to score
            done = frac[0] + (frac[1] - frac[0]) * scored_tokens / my_tokens
            learn = bool(train.any() and budget.adapt_ok(done))
            with autocast_ctx(device), torch.set_grad_enabled(learn):
                logits = model.logits(x, head_delta=lora.head)
            sheet.record(pos[scored], logits[scored], y[scored])
            budget.score_s += time.perf_counter() - t
            scored_tokens += int(scored.sum())
            if learn:
                t, w = time.perf_counter(), scored & train[:, None]
                sheet.used[pos[w]] = True
                nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
                loss = ((nll * w).sum(1) / w.sum(1).clamp_min(1)).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()  # Adam's momentum moves finished documents' A too: not theirs
                for kept, a in zip(last_a, lora.A):
                    kept[train] = a.detach()[train]
                budget.step_s = time.perf_counter() - t
            else:
                budget.skipped += int(train.sum())
        for h in hooks:
            h.remove()
        a_sum = [s + a.sum(0, keepdim=True) for s, a in zip(a_sum, last_a)]
    return a_sum


def eval_phased(ev, tokens, sheet, budget):
    """Phased TTT (README): per-document LoRA in stream order; after each phase of the first documents, SGD on
    all targets scored so far."""
    args, (starts, ends) = ev.args, doc_spans(tokens)
    n_docs, total = len(starts), tokens.numel() - 1
    prefix, phases = min(args.phased_ttt_prefix_docs, n_docs), args.phased_ttt_num_phases
    bounds, lo, warm = sorted({prefix * (k + 1) // phases for k in range(phases)} - {0} | {n_docs}), 0, None
    for hi in bounds:
        frac = (ends[lo - 1] / total if lo else 0.0, ends[hi - 1] / total)
        a_sum = eval_lora(ev, tokens, sheet, budget, np.arange(lo, hi), args.ttt_local_lr_mult, warm, frac)
        if hi < n_docs:
            if args.ttt_warm_start_a:
                for a in a_sum if ev.world_size > 1 else ():
                    dist.all_reduce(a)
                warm = [a / (hi - lo) for a in a_sum]
            sgd_on_prefix(ev, tokens, int(ends[hi - 1]), sheet, budget, frac[1])
        lo = hi


@torch.no_grad()
def count_before(key, nxt, V):
    """Exact prefix counts by sorting (context, then time): the sort, each context run's start, and per position
    the earlier ones with its context `key` (`seen`) and also its next token `nxt` (`pair`)."""
    idx = torch.arange(key.numel(), device=key.device)

    def run_start(sorted_key):
        new = F.pad(sorted_key[1:] != sorted_key[:-1], (1, 0), value=True)
        return torch.cummax(torch.where(new, idx, 0), 0).values

    order = torch.argsort(key, stable=True)
    start = run_start(key[order])
    pair_key = start * V + nxt[order]
    pair = torch.argsort(pair_key, stable=True)  # by context and next token, in time
    return order, start, idx - start, unsort(pair, idx - run_start(pair_key[pair]))


def unsort(order, values):
    """Scatter `values` back to the positions `order` took them from."""
    out = torch.empty_like(values)
    out[order] = values
    return out


class NgramMixer:
    """Online n-gram experts of orders 0..NGRAM_ORDER-1 (contexts stop at a BOS), each smoothed towards the order
    below, mixed with the network by weights per entropy bin (online EM)."""

    def __init__(self, args, device):
        self.V, self.order, self.prior = args.vocab_size, args.ngram_order, args.ngram_prior
        self.eta, self.bins = args.ngram_eta, args.ngram_entropy_bins
        w0 = torch.tensor([1.0 - args.ngram_init_weight] + [args.ngram_init_weight / self.order] * self.order)
        self.w = w0.to(device).repeat(self.bins, 1)  # (bins, 1 + order), network first

    def contexts(self, x):
        """Each order's context at each input x[t]: the last k inputs, those before a BOS a pad (V)."""
        V, idx = self.V, torch.arange(len(x), device=x.device)
        last_bos = torch.cummax(torch.where(x == BOS_ID, idx, -1), 0).values
        yield (code := torch.zeros_like(x))
        for j in range(self.order - 1):  # context token x[t - j]
            code = code * (V + 1) + torch.where(idx - j >= last_bos, F.pad(x, (j, 0), value=V)[:len(x)], V)
            yield code  # past 6 tokens of 1024 it wraps: a 64-bit hash

    def experts(self, x, y, probes=None):
        """(order, n): each expert's probability of each target from the earlier ones; for an audit also its rows
        times `probes` (order, n, P), and the probabilities with a sample's counts redone by brute force."""
        n, dev = len(y), y.device
        p = check = torch.full((n,), 1.0 / self.V, device=dev)
        probs, rows, checks = [], [], []
        if probes is not None:
            row = probes.double().mean(0).expand(n, -1)
            S = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:64].to(dev)
        for key in self.contexts(x):
            order, start, seen, pair = count_before(key, y, self.V)
            cnt, tot = unsort(order, pair.float()), unsort(order, seen.float())
            p = (cnt + self.prior * p) / (tot + self.prior)
            probs.append(p)
            if probes is not None:
                P = probes.double()[y[order]]
                before = torch.cumsum(P, 0) - P
                row = (unsort(order, before - before[start]) + self.prior * row) / (tot.double() + self.prior)[:, None]
                rows.append(row.float())
                same = (key == key[S, None]) & (torch.arange(n, device=dev) < S[:, None])
                cnt[S], tot[S] = (same & (y == y[S, None])).sum(1).float(), same.sum(1).float()
                checks.append(check := (cnt + self.prior * check) / (tot + self.prior))
        return torch.stack(probs), (torch.stack(rows), torch.stack(checks)) if rows else (None, None)

    def step(self, p_y, ent):
        """Mixture probability of a chunk's targets (p_y: network's, experts') and the weights; then online EM."""
        b = torch.clamp((ent / math.log(self.V) * self.bins).long(), 0, self.bins - 1)
        w = self.w[b]  # (T, 1 + order)
        mix = (w * p_y).sum(1)
        share = torch.zeros_like(self.w).index_add_(0, b, w * p_y / mix[:, None])
        self.w = (self.w + self.eta * share) / (1 + self.eta * torch.bincount(b, minlength=self.bins))[:, None]
        return mix, w


def ngram_mix(ev, sheet, tokens):
    """The mixture's losses replace the sheet's (kept as `net_nats`); weights afresh per rank."""
    args, t0, audit, V = ev.args, time.perf_counter(), sheet.fp is not None, ev.args.vocab_size
    seg = ev.share(range(tokens.numel() - 1))
    u = tokens[:seg.stop + 1].to(ev.device)  # this rank's targets and those before them
    mixer = NgramMixer(args, ev.device)
    probes = torch.cat((audit_probes(V, ev.device), torch.ones(V, 1, device=ev.device)), 1) if audit else None
    pk, (rows, checked) = mixer.experts(u[:-1], u[1:], probes)
    net_fp, net_row_nats = sheet.fp, sheet.row_nats
    sheet.nats = torch.zeros_like(sheet.nats)  # each rank fills its share: reduce() sums
    if audit:
        sheet.fp, sheet.row_nats = torch.zeros_like(net_fp), torch.zeros_like(net_row_nats)
    for p0 in range(seg.start, seg.stop, args.ngram_chunk):
        c = slice(p0, min(p0 + args.ngram_chunk, seg.stop))
        mix, w = mixer.step(torch.cat((torch.exp(-sheet.net_nats[c])[:, None], pk[:, c].T), 1), sheet.ent[c])
        sheet.nats[c] = -torch.log(mix)
        if audit:
            mixed = torch.einsum("to,otk->tk", w[:, 1:], rows[:, c])  # (T, probes, then the mass)
            sheet.fp[c] = w[:, :1] * net_fp[c] + mixed[:, :-1]
            sheet.norm_err = torch.maximum(sheet.norm_err, (w[:, 0] + mixed[:, -1] - 1).abs().max())
            sheet.row_nats[c] = -torch.log(w[:, 0] * torch.exp(-net_row_nats[c]) + (w[:, 1:] * checked[:, c].T).sum(1))
    sheet.reduce(("nats", "fp", "row_nats"))
    ev.log(f"ngram_mix order:{args.ngram_order} time:{time.perf_counter() - t0:.1f}s", console=False)


@torch.no_grad()
def tilt_hints(tokens, args, device):
    """Per target t, a hinted token or -1: of its contexts of TILT_ORDERS tokens (longest first), the first seen
    >= TILT_MIN_COUNT times before t whose most frequent next token followed it >= TILT_THRESHOLD of those times."""
    u, n, V = tokens.to(device), tokens.numel() - 1, args.vocab_size
    hint = torch.full((n,), -1, dtype=torch.int64, device=device)
    for k in sorted({int(o) for o in args.tilt_orders.split(",")}, reverse=True):
        m = n - k + 1  # targets k-1..n-1 have k tokens of context
        if m < 2:
            continue
        key = u[:m]
        for i in range(1, k):
            key = key * 1000003 + u[i:i + m]  # wraps: a hash
        order, start, seen, pair = count_before(key, u[k:k + m], V)
        best, d = (pair + 1) * V + u[k:k + m][order], 1
        while d < m:  # running max of (count, token) within each context: doubling scan
            best[d:] = torch.where(start[d:] == start[:-d], torch.maximum(best[d:], best[:-d]), best[d:])
            d *= 2
        prev = torch.roll(best, 1)  # the context's best before this target
        fire = (seen >= args.tilt_min_count) & (prev // V >= args.tilt_threshold * seen)
        hint[k - 1:] = torch.where(hint[k - 1:] >= 0, hint[k - 1:], unsort(order, torch.where(fire, prev % V, -1)))
    return hint


def run_eval_mode(ev, mode, tokens, audit=False):
    """Score `tokens` with a FINAL_EVAL mode; the weights are left as they were."""
    (net, *mix), args, model = mode.split("+"), ev.args, ev.base_model
    sheet, budget = ScoreSheet(tokens.numel() - 1, ev.device, audit), Budget(args.ttt_max_seconds)
    if "tilt" in mix:
        sheet.hint, sheet.boost = tilt_hints(tokens, args, ev.device), args.tilt_boost
    snapshot = {k: v.clone() for k, v in model.state_dict().items()} if net == "phased" else None
    if args.ttt_asym_softcap and net == "phased":  # adapted by its SGD, from symmetric
        model.asym_softcap = nn.Parameter(torch.full((2,), args.logit_softcap, device=ev.device))
    if net in ("roundtrip", "sliding_window"):
        eval_windows(ev, tokens, sheet, args.eval_seq_len if net == "roundtrip" else args.eval_stride)
    else:
        (eval_lora if net == "lora" else eval_phased)(ev, tokens, sheet, budget)
    if model.asym_softcap is not None:
        ev.log(f"{net}:asym_softcap positive:{model.asym_softcap[0]:.4f} negative:{model.asym_softcap[1]:.4f}",
               console=False)
        model.asym_softcap = None
    if snapshot is not None:  # only phased's global SGD changes the weights
        model.load_state_dict(snapshot)
    model.requires_grad_(True)  # TTT froze them
    if budget.skipped:
        ev.log(f"{net}:budget TTT_MAX_SECONDS={budget.seconds:.0f} reached on rank {ev.rank}: {budget.skipped} "
               "adaptation steps skipped")
    sheet.reduce()
    if "ngram" in mix:
        ngram_mix(ev, sheet, tokens)
    return sheet


def random_documents(min_tokens, min_docs, args, g):
    """>= min_tokens + 1 tokens of >= min_docs random documents of 1 token to 3 windows."""
    lens, top = [], math.log(3 * args.eval_seq_len)
    while sum(lens) < min_tokens + 1 or len(lens) < min_docs:
        lens.append(max(1, int(math.exp(float(torch.rand((), generator=g)) * top))))
    tokens = torch.randint(2, args.vocab_size, (sum(lens),), generator=g)
    tokens[np.cumsum([0] + lens[:-1])] = BOS_ID
    return tokens


def gap(a, b):
    """Largest |a - b|; inf for a NaN or inf (every check fails)."""
    d = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    return d if math.isfinite(d) else math.inf


def audit_eval_mode(mode, run, args, log, world_size=1):
    """The causality audit (README) of run: tokens -> audit ScoreSheet. Returns its seconds per target."""
    def scored(tokens, **settings):  # no time budget: scores would depend on the clock
        saved = {k: getattr(args, k) for k in ("ttt_max_seconds", "phased_ttt_prefix_docs", *settings)}
        vars(args).update(dict(phased_ttt_prefix_docs=docs // 2) | settings, ttt_max_seconds=0.0)
        try:
            t = time.perf_counter()
            out = run(tokens)
            seconds.append((time.perf_counter() - t) / tokens.numel())
            return out
        finally:
            vars(args).update(saved)

    t0, net, seconds = time.perf_counter(), mode.partition("+")[0], []
    g = torch.Generator().manual_seed(args.seed)
    min_tokens = max(4 * args.eval_seq_len, 5 * args.ttt_chunk_tokens // 2 if net == "phased" else 0)
    many = net in ("lora", "phased")  # documents for several batches (phases)
    tokens = random_documents(min_tokens, 2 * args.ttt_lora_batch * world_size + 1 if many else 0, args, g)
    n, docs = tokens.numel() - 1, int((tokens == BOS_ID).sum())
    t = n // 2
    future = torch.cat((tokens[:t + 1], random_documents(n, 0, args, g)[t + 1:n + 1]))
    a, again, b = sheets = scored(tokens), scored(tokens), scored(future)
    for s in sheets:
        s.check_once()
    noise = max(gap(a.nats, again.nats), gap(a.fp, again.fp))
    tol, batch_noise = 4 * noise + 1e-6, 0.0
    if many:  # the redraw changes the batches: rebatching noise sets the tolerance
        rebatched = scored(tokens, ttt_lora_batch=args.ttt_lora_batch // 2 or 2)
        batch_noise = max(gap(a.nats, rebatched.nats), gap(a.fp, rebatched.fp))
    # No loss before t, nor the distribution scored at t, may move.
    leak = max(gap(a.nats[:t], b.nats[:t]), gap(a.fp[:t + 1], b.fp[:t + 1]))
    mismatch = max(gap(s.nats, s.row_nats) for s in sheets)
    norm = max(s.norm_err.item() for s in sheets)
    problems = [msg for ok, msg in (
        (all(torch.isfinite(s.nats).all() and torch.isfinite(s.fp).all() for s in sheets),
         "a loss or a scored distribution is not finite"),
        (noise <= AUDIT_MAX_NOISE, f"not repeatable: the same tokens scored twice differ by {noise:.2e} nats "
                                   f"(> {AUDIT_MAX_NOISE}): state kept between runs, or nondeterministic kernels"),
        (leak <= 4 * max(noise, batch_noise) + 1e-6,
         f"the scores up to target {t} moved by {leak:.2e} when only later tokens changed"),
        (mismatch <= tol, f"a loss differs by {mismatch:.2e} nats from -log of the checked distribution at its target"),
        (norm <= 1e-3, f"a scored distribution sums to exp({norm:.2e}) != 1")) if not ok]
    isolation = "n/a"
    if net == "lora":  # nothing may cross a document start
        doc_of = torch.cumsum(tokens == BOS_ID, 0) - 1  # tokens[0] is a BOS
        redrawn = torch.rand(docs, generator=g) < 0.5
        changed = redrawn[doc_of] & (tokens != BOS_ID)
        c = scored(torch.where(changed, torch.randint(2, args.vocab_size, tokens.shape, generator=g), tokens))
        kept = ~redrawn[doc_of[:-1]]  # targets in documents kept
        cross = gap(a.net_nats[kept], c.net_nats[kept])
        isolation = f"{cross:.1e}"
        if not cross <= tol:
            problems.append(f"network losses moved by {cross:.2e} nats in documents left as they were "
                            f"({int(redrawn.sum())} of {docs} redrawn)")
    if problems:
        raise EvalError(f"FINAL_EVAL mode {mode} fails the causality audit: " + "; ".join(problems))
    log(f"eval_audit:{mode} ok tokens:{n} docs:{docs} causal_diff:{leak:.1e} noise:{noise:.1e} "
        f"batch_noise:{batch_noise:.1e} loss_diff:{mismatch:.1e} norm_err:{norm:.1e} bos_diff:{isolation} scored_once:ok "
        f"one_pass:ok time:{time.perf_counter() - t0:.1f}s")
    return min(seconds)


# ------------- QUANTIZATION AND THE ARTIFACT
# Per-row intN (RTN or GPTQ); late QAT uses the export's quantizer.

ARTIFACT_MAGIC, BLOB_MAGIC = b"PGA3", b"PGQ2"
SMALL_TENSOR_NUMEL = 65_536
EMBED_NAMES = ("tok_emb.weight", "bigram.embed.weight", "ve.embed.weight", "lm_head.weight")
DTYPES = {k: getattr(torch, k) for k in ("int8", "float16", "float32")}


def quant_overrides(args):
    out = []
    for item in filter(None, map(str.strip, args.quant_overrides.split(","))):
        pattern, _, bits = item.rpartition(":")
        if not (pattern and bits.isdigit() and int(bits) in (*range(2, 9), 16)):
            raise ConfigError(f"QUANT_OVERRIDES item {item!r} must be REGEX:BITS with BITS in 2..8 or 16")
        out.append((pattern, int(bits)))
    return out


def tensor_class(name):
    return "embed" if name in EMBED_NAMES else "mlp" if ".mlp." in name else "attn"


def quant_bits_for(name, t, args):
    """A tensor's export bits; None: fp16 (2-D) / fp32."""
    if not t.is_floating_point() or t.ndim != 2:
        return None
    bits = getattr(args, tensor_class(name) + "_bits") if name in EMBED_NAMES or t.numel() > SMALL_TENSOR_NUMEL else None
    for pattern, b in quant_overrides(args):
        if re.search(pattern, name):
            bits = b
    return None if bits is None or bits >= 16 else bits


def clip_ratios(args):
    return tuple(map(float, args.quant_clip_ratios.split(",")))


def round_to_grid(w, scale, qmax):
    return torch.clamp(torch.round(w / scale), -qmax, qmax)


def row_scales(w, bits, ratios, sigmas=0.0):
    """Per-row fp16 scales (rows, 1) at the clip ratio of least error; SDClip: clamp at sigmas x std."""
    qmax, amax = 2 ** (bits - 1) - 1, w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)
    if sigmas:
        amax, ratios = (sigmas * w.std(dim=1, keepdim=True)).clamp_min(1e-8), (1.0,)
    scales = torch.stack([(amax * r / qmax).half().float().clamp_min(6e-8) for r in ratios])
    err = (round_to_grid(w, scales, qmax) * scales - w).square().sum(dim=2, keepdim=True)
    return scales.gather(0, err.argmin(0, keepdim=True))[0]  # ties: the first


def quantize_per_row(w, bits, ratios=(1.0,), sigmas=0.0):
    scale = row_scales(w := w.float(), bits, ratios, sigmas)
    return round_to_grid(w, scale, 2 ** (bits - 1) - 1).to(torch.int8), scale.squeeze(1).half()


def from_grid(q, scale):
    return q.float() * scale.float()[:, None]


def fake_quantize(w, bits, ratios, sigmas=0.0):
    return from_grid(*quantize_per_row(w, bits, ratios, sigmas))


def gptq_quantize(w, H, bits, ratios, block, damp, sigmas=0.0):
    """GPTQ: each column's rounding error goes onto later columns via the inverse Hessian E[x x^T]."""
    W, cols, qmax = w.float().clone(), w.size(1), 2 ** (bits - 1) - 1
    scale = row_scales(W, bits, ratios, sigmas)
    H = H.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(H.diagonal(), descending=True)  # act order
    W, H = W[:, perm], H[perm][:, perm]
    for attempt in range(5):  # damp more until the Hessian factors
        L, info = torch.linalg.cholesky_ex(H + torch.eye(cols, device=H.device) * damp * 10 ** attempt * H.diagonal().mean())
        if info == 0:
            break
    else:
        return None
    Hinv, Q = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True), torch.zeros_like(W)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hb, E = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2], torch.zeros_like(W[:, i1:i2])
        for j in range(i2 - i1):
            q = round_to_grid(W1[:, j:j + 1], scale, qmax)
            Q[:, i1 + j] = q[:, 0]
            err = (W1[:, j:j + 1] - q * scale) / Hb[j, j]
            W1[:, j:] -= err * Hb[j:j + 1, j:]
            E[:, j:j + 1] = err
        W[:, i2:] -= E @ Hinv[i1:i2, i2:]
    return dict(q=Q[:, torch.argsort(perm)].to(torch.int8), scale=scale.squeeze(1).half())


@torch.no_grad()
def collect_hessians(model, batches, args, device, world_size):
    """E[x x^T] of each quantized layer's inputs, on training batches (never val)."""
    hessians, counts, hooks = {}, {}, []
    targets = [(n, m, m.in_features) for n, m in model.named_modules() if isinstance(m, CastedLinear)
               and quant_bits_for(n + ".weight", m.weight, args)]
    if args.embed_gptq and model.lm_head is None and quant_bits_for("tok_emb.weight", model.tok_emb.weight, args):
        targets.append(("tok_emb", model.head_input, model.tok_emb.weight.size(1)))  # the tied head's inputs
    for name, m, width in targets:
        hessians[name], counts[name] = torch.zeros(width, width, device=device), 0

        def hook(mod, inp, out, name=name):
            x = inp[0].reshape(-1, inp[0].size(-1)).float()
            hessians[name].addmm_(x.T, x)
            counts[name] += x.size(0)
        hooks.append(m.register_forward_hook(hook))
    for x in batches:
        with autocast_ctx(device):
            model.logits(x)
    for h in hooks:
        h.remove()
    for name, H in hessians.items():
        if world_size > 1:
            dist.all_reduce(H)
        H /= max(counts[name] * world_size, 1)
    return hessians


def quantize_state_dict(state, args, hessians=None):
    out, ratios, hessians = {}, clip_ratios(args), hessians or {}
    for name, t in state.items():
        bits, H, t = quant_bits_for(name, t, args), hessians.get(name.removesuffix(".weight")), t.detach()
        if bits is None:
            out[name] = dict(bits=None, data=t.cpu().to(torch.float16 if t.ndim == 2 else torch.float32))
            continue
        sigmas = getattr(args, tensor_class(name) + "_clip_sigmas")
        e = H is not None and gptq_quantize(t.to(H.device), H, bits, ratios, args.gptq_block_size, args.gptq_damp, sigmas)
        e = e or dict(zip(("q", "scale"), quantize_per_row(t, bits, ratios, sigmas)))
        out[name] = dict(bits=bits) | {k: v.cpu() for k, v in e.items()}
    if args.lqer_rank:
        add_lqer(out, state, args, hessians)
    return out


def add_lqer(qstate, state, args, hessians):
    """LQER: rank-r SVD of W - W_q at LQER_BITS, on the LQER_TOP_K tensors of most Hessian-weighted gain per byte."""
    gains = []
    for name, e in qstate.items():
        if not e["bits"] or (hessians and name.removesuffix(".weight") not in hessians):
            continue  # only GPTQ's: one error unit
        W = state[name].detach().float().cpu()
        E = W - dequantize_entry(e)
        U, S, Vh = torch.linalg.svd(E, full_matrices=False)
        r = min(args.lqer_rank, S.numel())
        a, a_s = quantize_per_row(U[:, :r] * S[:r], args.lqer_bits)
        b, b_s = quantize_per_row(Vh[:r], args.lqer_bits)
        fix = dict(lqer=[r, args.lqer_bits], lqer_a=a, lqer_as=a_s, lqer_b=b, lqer_bs=b_s)
        H = hessians[name.removesuffix(".weight")].float().cpu() if hessians else torch.eye(W.size(1))
        err = lambda X: float(((X @ H) * X).sum())  # output error
        nbytes = (a.numel() + b.numel()) * args.lqer_bits / 8 + 2 * (r + W.size(0))
        gains.append(((err(E) - err(E - low_rank(fix))) / nbytes, name, fix))
    for gain, name, fix in sorted(gains, key=lambda g: g[0])[-args.lqer_top_k:]:
        if gain > 0:
            qstate[name] |= fix


def low_rank(e):
    return from_grid(e["lqer_a"], e["lqer_as"]) @ from_grid(e["lqer_b"], e["lqer_bs"])


def dequantize_entry(e):
    if not e["bits"]:
        return e["data"].float()
    w = from_grid(e["q"], e["scale"])
    return w + low_rank(e) if "lqer" in e else w


def prune_quantized(qstate, frac):
    if frac <= 0:
        return qstate
    out = dict(qstate)
    for name, e in qstate.items():
        if e["bits"] and (k := int(frac * e["q"].numel())) > 0:
            mag = from_grid(e["q"].abs(), e["scale"])
            out[name] = dict(e, q=torch.where(mag <= mag.flatten().kthvalue(k).values, 0, e["q"]).to(torch.int8))
    return out


def dequantize_state_dict(qstate):
    return {name: dequantize_entry(e) for name, e in qstate.items()}


def shuffle_bytes(raw, itemsize, undo=False):
    """Byte planes: exponent bytes compress well together."""
    planes = (itemsize, -1) if undo else (-1, itemsize)
    return np.frombuffer(raw, dtype=np.uint8).reshape(planes).T.tobytes() if itemsize > 1 else raw


def serialize_quantized(qstate):
    arrays = sorted(((name, key, t) for name, e in qstate.items() for key, t in e.items() if isinstance(t, Tensor)),
                    key=lambda a: (a[2].dtype.itemsize, a[1]))  # int8, then fp16 scales, then the rest
    header = {n: {k: v for k, v in e.items() if not isinstance(v, Tensor)} | {"arrays": {}} for n, e in qstate.items()}
    chunks = []
    for name, key, t in arrays:
        raw = shuffle_bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), t.dtype.itemsize)
        header[name]["arrays"][key] = dict(
            dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape), offset=sum(map(len, chunks)), nbytes=len(raw))
        chunks.append(raw)
    head = json.dumps(dict(format=2, layout="grouped,byteshuffle", tensors=header), separators=(",", ":")).encode()
    return BLOB_MAGIC + struct.pack("<I", len(head)) + head + b"".join(chunks)


def deserialize_quantized(blob):
    """Every field validated before reading a byte, every weight after."""
    if blob[:4] != BLOB_MAGIC or len(blob) < 8:
        raise DataError("not an artifact of this script (no valid header)")
    (hlen,) = struct.unpack("<I", blob[4:8])
    try:
        header, payload = json.loads(blob[8:8 + hlen]), memoryview(blob)[8 + hlen:]
        return {name: parse_tensor_entry(name, entry, payload) for name, entry in header["tensors"].items()}
    except DataError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        raise DataError(f"artifact header is corrupt ({type(exc).__name__}: {exc})") from None


def is_bits(b):
    return type(b) is int and 2 <= b <= 8


def check_grid(name, q, scale, bits, rows, cols=None):
    if q.dtype != torch.int8 or q.ndim != 2 or len(q) != rows or cols not in (None, q.shape[1]) \
            or scale.dtype != torch.float16 or scale.shape != (rows,):
        raise DataError(f"artifact tensor {name}: int8 q ({rows}, {cols or 'cols'}) and fp16 scale ({rows},) expected")
    if q.numel() and int(q.int().abs().max()) > 2 ** (bits - 1) - 1:  # int8: abs(-128) is -128
        raise DataError(f"artifact tensor {name}: a value outside the int{bits} range")


def parse_tensor_entry(name, entry, payload):
    bits, lqer = entry["bits"], entry.get("lqer")
    if not (bits is None or is_bits(bits)):
        raise DataError(f"artifact tensor {name}: bits={bits!r} is not 2..8 or null")
    keys = {"q", "scale", *(("lqer_a", "lqer_as", "lqer_b", "lqer_bs") if lqer else ())} if bits else {"data"}
    if set(entry["arrays"]) != keys or set(entry) - {"bits", "arrays", *(["lqer"] if bits else [])}:
        raise DataError(f"artifact tensor {name}: fields {sorted(entry)}, arrays {sorted(entry['arrays'])}: "
                        f"expected {sorted(keys)}")
    e = dict(bits=bits)
    for key, a in entry["arrays"].items():
        dtype, shape, off, n = DTYPES[a["dtype"]], a["shape"], a["offset"], a["nbytes"]
        if not all(type(v) is int and v >= 0 for v in (*shape, off, n)):
            raise DataError(f"artifact tensor {name}.{key}: shape {shape}, offset {off}, size {n}: not integers >= 0")
        if off + n > len(payload) or n != math.prod(shape) * dtype.itemsize:
            raise DataError(f"artifact tensor {name}.{key} extends past the payload or has a wrong size")
        raw = shuffle_bytes(bytes(payload[off:off + n]), dtype.itemsize, undo=True)
        e[key] = torch.frombuffer(bytearray(raw), dtype=dtype).view(shape) if n else torch.zeros(shape, dtype=dtype)
    if bits:
        q = e["q"]
        check_grid(name, q, e["scale"], bits, len(q))
        if lqer:  # [rank, bits]: W += (a x as) @ (b x bs)
            if not (type(lqer) is list and len(lqer) == 2 and type(lqer[0]) is int and lqer[0] >= 1 and is_bits(lqer[1])):
                raise DataError(f"artifact tensor {name}: lqer={lqer!r} is out of range")
            r, lqer_bits = e["lqer"] = lqer
            check_grid(f"{name} (lqer a)", e["lqer_a"], e["lqer_as"], lqer_bits, len(q), r)
            check_grid(f"{name} (lqer b)", e["lqer_b"], e["lqer_bs"], lqer_bits, r, q.shape[1])
    elif not e["data"].is_floating_point():
        raise DataError(f"artifact tensor {name}: unquantized data must be fp16 or fp32")
    for key, t in e.items():
        if isinstance(t, Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise DataError(f"artifact tensor {name}: non-finite {key} values")
    return e


def whole_blob_codecs():
    import lzma
    import zstandard
    codecs = {"zstd": (1, lambda b, lvl: zstandard.ZstdCompressor(level=lvl).compress(b), zstandard.ZstdDecompressor().decompress),
              "lzma": (2, lambda b, lvl: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress)}
    try:
        import brotli
        codecs["brotli"] = (3, lambda b, lvl: brotli.compress(b, quality=11), brotli.decompress)
    except ImportError:
        pass
    return codecs


def _codecs():
    return whole_blob_codecs() | {"pergroup": (4, compress_sections, decompress_sections)}


def section_cuts(blob):
    """Cuts after the header and where the arrays' key (q, scale, ...) changes."""
    start = 8 + struct.unpack("<I", blob[4:8])[0]
    arrays = sorted((a["offset"], a["dtype"], key) for t in json.loads(blob[8:start])["tensors"].values()
                    for key, a in t["arrays"].items())
    return [0, start] + [start + a[0] for a, b in zip(arrays[1:], arrays) if a[1:] != b[1:]] + [len(blob)]


def compress_sections(blob, level):
    """COMPRESSOR=pergroup: each section by its best codec (0: stored) as [id, u32 size, bytes]."""
    codecs = [(0, lambda b, lvl: b, None), *whole_blob_codecs().values()]
    cuts, out = section_cuts(blob), []
    for a, b in zip(cuts, cuts[1:]):
        cid, z = min(((cid, c(blob[a:b], level)) for cid, c, _ in codecs), key=lambda x: len(x[1]))
        out.append(struct.pack("<BI", cid, len(z)) + z)
    return b"".join(out)


def decompress_sections(body):
    codecs, out, i = {cid: d for cid, _, d in whole_blob_codecs().values()} | {0: bytes}, [], 0
    while i < len(body):
        cid, n = struct.unpack_from("<BI", body, i)
        if cid not in codecs or i + 5 + n > len(body):
            raise ValueError(f"section at byte {i}: codec id {cid} unknown or not installed, or {n} bytes too long")
        out.append(codecs[cid](body[i + 5:i + 5 + n]))
        i += 5 + n
    return b"".join(out)


def compress_artifact(blob, compressor, level):
    """Magic, codec id, CRC-32 (decompressors miss bit flips), compressed blob."""
    codecs = _codecs()
    if compressor not in [*codecs, "auto"]:
        raise ConfigError(f"COMPRESSOR={compressor} is not available (have: {', '.join(codecs)}, auto)")
    names = list(codecs) if compressor == "auto" else [compressor]
    body = min((bytes([codecs[n][0]]) + codecs[n][1](blob, level) for n in names), key=len)
    return ARTIFACT_MAGIC + body[:1] + struct.pack("<I", zlib.crc32(body)) + body[1:]


def decompress_artifact(data):
    if data[:4] == b"PGA2":
        raise DataError("artifact made by an older version of this script: re-export with QUANT_ONLY=final_model.pt")
    if data[:4] != ARTIFACT_MAGIC or len(data) < 9:
        raise DataError("not an artifact of this script (bad magic)")
    body = data[4:5] + data[9:]
    if struct.unpack("<I", data[5:9])[0] != zlib.crc32(body):
        raise DataError(f"artifact is damaged or truncated (CRC-32 mismatch over {len(data)} bytes): copy or re-export it")
    codecs = {cid: (name, dec) for name, (cid, _, dec) in _codecs().items()}
    if data[4] not in codecs:
        raise DataError(f"artifact codec id {data[4]} is unknown or not installed")
    name, decompress = codecs[data[4]]
    try:
        return decompress(data[9:])
    except Exception as exc:  # each codec has its own error types
        raise DataError(f"artifact is truncated or corrupt ({name}: {exc})") from None


def load_artifact(path, model):
    state = dequantize_state_dict(deserialize_quantized(decompress_artifact(Path(path).read_bytes())))
    expected = model.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
        raise DataError(f"{path}: tensors do not match this model's configuration")
    model.load_state_dict(state)


class ArtifactOverCap(Exception):
    pass


def build_artifact(qstate, args, code_bytes, log):
    """(artifact, state) at PRUNE_FRAC, or at the least pruning that fits."""
    def make(frac):
        pruned = prune_quantized(qstate, frac)
        data = compress_artifact(serialize_quantized(pruned), args.compressor, args.zstd_level)
        return data, pruned, len(data) + code_bytes
    lo, hi, cap = args.prune_frac, args.fit_max_prune_frac, args.artifact_cap
    data, state, total = make(lo)
    if total <= cap:
        log(f"fit_to_cap: headroom {cap - total} bytes under ARTIFACT_CAP={cap} (records/size_planner.py spend: what it buys)")
        return data, state
    log(f"fit_to_cap: {total} bytes > ARTIFACT_CAP={cap} at prune_frac {lo}: searching the least pruning")
    if (best := make(hi))[2] > cap:
        raise ArtifactOverCap(f"pruning {hi:.0%} of the quantized weights leaves {best[2]} bytes")
    for _ in range(7):  # bisection to 1/128 of the range
        if (trial := make(mid := (lo + hi) / 2))[2] <= cap:
            hi, best = mid, trial
        else:
            lo = mid
    log(f"fit_to_cap: pruned the smallest {hi:.4%} of quantized weights -> {best[2]} bytes")
    return best[:2]


# ------------- TRAINING

def build_optimizers(model, args, fused):
    embeds = [model.tok_emb.weight] + [m.embed.weight for m in (model.bigram, model.ve) if m is not None]
    matrices = [m.weight for m in model.modules() if isinstance(m, CastedLinear) and m is not model.lm_head]
    head = [] if model.lm_head is None else [model.lm_head.weight]
    taken = {id(p) for p in embeds + matrices + head}
    scalars = [p for p in model.parameters() if id(p) not in taken]
    adam = lambda params, lr: torch.optim.AdamW(
        [dict(params=params, lr=lr, base_lr=lr)], betas=(args.beta1, args.beta2), eps=args.adam_eps,
        weight_decay=args.adam_wd, fused=fused)
    optimizers = [adam(embeds, args.tied_embed_lr if args.tie_embeddings else args.embed_lr), adam(scalars, args.scalar_lr)]
    muon = Muon(matrices, lr=args.matrix_lr, base_lr=args.matrix_lr, momentum=args.muon_momentum,
                backend_steps=args.muon_backend_steps, coeffs=ns_coefficients(args.muon_ns_coeffs), weight_decay=args.muon_wd,
                row_norm=args.muon_row_norm, normuon_beta2=args.normuon_beta2 if args.normuon else 0.0)
    return optimizers + ([adam(head, args.head_lr)] if head else []) + [muon], muon


def forward_backward(model, loader, args, grad_accum_steps, local_tokens, device, seq_len=0):
    total = torch.zeros((), device=device)
    for micro in range(grad_accum_steps):
        if isinstance(model, DDP):
            model.require_backward_grad_sync = micro == grad_accum_steps - 1
        x, y = loader.next_batch(local_tokens, seq_len or args.train_seq_len)
        with autocast_ctx(device):
            loss = model(x, y).mean()
        (loss / grad_accum_steps).backward()
        total += loss.detach() / grad_accum_steps
    return total


def optimizer_step(base_model, optimizers, muon, args, step, scale):
    frac = min(step / args.muon_momentum_warmup_steps, 1.0) if args.muon_momentum_warmup_steps > 0 else 1.0
    for g in muon.param_groups:
        g["momentum"] = (1 - frac) * args.muon_momentum_warmup_start + frac * args.muon_momentum
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * scale
    if args.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(base_model.parameters(), args.grad_clip_norm)
    for opt in optimizers:
        opt.step()
        opt.zero_grad()


def lr_scale(args, step, elapsed_ms, cap_ms):
    """1, then linear to 0 at ITERATIONS or the cap (paced by the mean step)."""
    if args.warmdown_iters <= 0:
        return 1.0
    if cap_ms is None:
        left = max(args.iterations - step, 0) / args.warmdown_iters
    else:
        left = max(cap_ms - elapsed_ms, 0.0) / max(args.warmdown_iters * elapsed_ms / max(step, 1), 1e-9)
    return max(args.min_lr, min(1.0, left))


def seq_len_schedule(args):
    """[(length, until progress), ...], TRAIN_SEQ_LEN last."""
    items = [item.split(":") for item in args.seq_len_schedule.replace(" ", "").split(",") if item]
    return [(int(n), float(until)) for n, until in items] + [(args.train_seq_len, math.inf)]


def graph_variants(args):
    """Each (loop passes, training length): a graph, primed in warm-up."""
    passes = [1] + ([1 + args.loop_repeats] if loop_range(args) else [])
    return [(p, n) for p in passes for n, _ in seq_len_schedule(args)]


def apply_schedules(model, muon, args, step, progress, seq_len, log):
    if args.muon_wd_taper_start < 1:
        t = min(max((progress - args.muon_wd_taper_start) / (1 - args.muon_wd_taper_start), 0.0), 1.0)
        for g in muon.param_groups:
            g["weight_decay"] = args.muon_wd + t * (args.muon_wd_final - args.muon_wd)
    passes = 1 + args.loop_repeats if model.loop_range and progress >= args.loop_start_frac else 1
    if passes != model.loop_passes:
        model.loop_passes = passes
        if passes > 1:
            log(f"layer_loop:enabled step:{step} progress:{progress:.3f} virtual_layers:{len(model.layer_order())}")
    new_len = next(n for n, until in seq_len_schedule(args) if progress < until)
    if new_len != seq_len:
        log(f"train_seq_len:{new_len} step:{step} progress:{progress:.3f}")
    return new_len


def ema_decay(args, step, elapsed_ms, cap_ms):
    """EMA_DECAY, or a half-life of EMA_HALF_LIFE_FRAC x expected steps."""
    if args.ema_half_life_frac <= 0:
        return args.ema_decay
    expected = args.iterations if cap_ms is None else min(args.iterations, cap_ms * max(step, 1) / max(elapsed_ms, 1e-9))
    return 0.5 ** (1 / max(args.ema_half_life_frac * expected, 1.0))


class WeightAverager:
    def __init__(self, model, args):
        self.args, self.model, self.swa, self.swa_count = args, model, None, 0
        self.ema = self.fp32_state() if args.ema_enabled else None

    def fp32_state(self):
        return {k: v.float().clone() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def update(self, step, scale, decay):
        state = self.model.state_dict()
        if self.ema is not None:
            torch._foreach_lerp_(list(self.ema.values()), [state[k].float() for k in self.ema], 1 - decay)
        if self.args.swa_enabled and scale < self.args.swa_start_scale and step % self.args.swa_every == 0:
            src = self.ema if self.ema is not None else {k: v.float() for k, v in state.items()}
            self.swa = {k: v.clone() if self.swa is None else self.swa[k].add_(v) for k, v in src.items()}
            self.swa_count += 1

    def final(self):
        if self.swa is not None:
            return f"swa({self.swa_count}{',ema' if self.ema is not None else ''})", \
                {k: v / self.swa_count for k, v in self.swa.items()}
        if self.ema is not None:
            return "ema", self.ema
        return "raw", self.fp32_state()


class Logger:
    """Rank 0: each line to logs/<RUN_ID>.txt at once (kept on a crash)."""

    path = None

    def open(self, path):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return self

    def __call__(self, msg, console=True):
        if self.path:
            if console:
                print(msg, flush=True)
            with open(self.path, "a", encoding="utf-8") as f:
                print(msg, file=f)


LOG = Logger()


class HostCopy:
    """A tensor copied to the host behind queued work: read a step later, never waits."""

    def __init__(self, t):
        self.host = t.to("cpu", non_blocking=True)  # from CUDA: into pinned memory
        self.event = torch.cuda.Event() if t.is_cuda else None
        if self.event:
            self.event.record()

    def get(self):
        if self.event:
            self.event.synchronize()
        return self.host.tolist()


class Trainer:
    """Per-rank checkpoints resume exactly; SIGTERM/SIGINT stop all ranks at one step."""

    def __init__(self, ev, model, qat_layers, loader, grad_accum_steps, local_tokens):
        args, self.base_model, self.model, self.qat_layers = ev.args, ev.base_model, model, qat_layers
        self.args, self.device, self.rank, self.world_size, self.log = args, ev.device, ev.rank, ev.world_size, ev.log
        self.loader, self.grad_accum_steps, self.local_tokens = loader, grad_accum_steps, local_tokens
        self.optimizers, self.muon = build_optimizers(ev.base_model, args, fused=ev.device.type == "cuda")
        self.averager = WeightAverager(ev.base_model, args)
        self.step, self.train_ms, self.qat_on, self.signal = 0, 0.0, False, None
        reserve_s = args.gptq_reserve_seconds if args.quant_method == "gptq" else 0.0
        self.cap_ms = 1000 * (args.max_wallclock_seconds - reserve_s) if args.max_wallclock_seconds > 0 else None

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(self, step, scale, seq_len):
        loss = forward_backward(
            self.model, self.loader, self.args, self.grad_accum_steps, self.local_tokens, self.device, seq_len)
        optimizer_step(self.base_model, self.optimizers, self.muon, self.args, step, scale)
        return loss

    def warmup(self):
        """Compile and prime every path, then restore weights, optimizers, data."""
        if self.args.warmup_steps <= 0:
            return
        init = copy.deepcopy(dict(model=self.base_model.state_dict(), optimizers=[o.state_dict() for o in self.optimizers],
                                  data=(0, 0)))
        variants = graph_variants(self.args)
        for ws in range(self.args.warmup_steps):
            self.base_model.loop_passes, seq_len = variants[ws % len(variants)]
            self.train_step(0, 1.0, seq_len)
            self.log(f"warmup_step:{ws + 1}/{self.args.warmup_steps}")
        self.restore(init)

    def restore(self, st):
        self.base_model.load_state_dict(st["model"])
        for opt, o in zip(self.optimizers, st["optimizers"]):
            opt.load_state_dict(o)
        self.loader.seek(*st["data"])

    def save(self, why):
        a, loader = self.averager, self.loader
        folder = Path("checkpoints") / self.args.run_id
        state = dict(model=self.base_model.state_dict(), optimizers=[o.state_dict() for o in self.optimizers],
                     averager=(a.ema, a.swa, a.swa_count), data=(loader.file_idx, loader.pos), step=self.step,
                     train_ms=self.train_ms, qat_on=self.qat_on, world_size=self.world_size, config=config_dict(self.args))
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(state, folder / f"rank{self.rank}.pt")
        if self.rank == 0:
            torch.save(a.final()[1], "final_model.pt")
        self.log(f"checkpoint: {why} at step {self.step}: saved {folder} and final_model.pt; RESUME={folder} continues")

    def resume(self, path):
        file = Path(path) / f"rank{self.rank}.pt"
        if not file.is_file():
            raise DataError(f"RESUME={path}: no {file.name}: resume with as many processes as saved it")
        st = torch.load(file, map_location=self.device, weights_only=True)
        if st["world_size"] != self.world_size:
            raise DataError(f"RESUME={path} was saved by {st['world_size']} processes, not {self.world_size}")
        changed = sorted(k for k, v in config_dict(self.args).items() if st["config"].get(k) != v and k not in ("run_id", "resume"))
        if changed:
            self.log(f"WARNING: settings changed since the checkpoint: {', '.join(changed)}")
        self.restore(st)
        self.averager.ema, self.averager.swa, self.averager.swa_count = st["averager"]
        self.step, self.train_ms, self.qat_on = st["step"], st["train_ms"], st["qat_on"]
        if self.qat_on:
            refresh_qat(self.qat_layers, clip_ratios(self.args))
        self.log(f"resume: {path} step:{self.step} train_time:{self.train_ms:.0f}ms")

    def on_signal(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def run(self, evaluate):
        args, log = self.args, self.log
        handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        stop_after_step, seq_len, pending = None, args.train_seq_len, None  # pending: the last step's flags
        self.sync()
        t0 = time.perf_counter()
        ms = lambda: self.train_ms + 1000 * (time.perf_counter() - t0)  # reads t0 at each call
        try:
            while True:
                step = self.step
                last_step = step == args.iterations or (stop_after_step is not None and step >= stop_after_step)
                if last_step or (args.val_loss_every > 0 and step % args.val_loss_every == 0):
                    self.sync()
                    self.train_ms = ms()
                    val_loss, val_bpb = evaluate("roundtrip")
                    log(f"step:{step}/{args.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                        f"train_time:{self.train_ms:.0f}ms step_avg:{self.train_ms / max(step, 1):.2f}ms")
                    self.sync()
                    t0 = time.perf_counter()
                if last_step:
                    if self.signal is None and stop_after_step is not None and step < args.iterations:
                        log(f"stopping_early: wallclock_cap train_time:{self.train_ms:.0f}ms step:{step}/{args.iterations}")
                    break
                elapsed_ms = ms()
                scale = lr_scale(args, step, elapsed_ms, self.cap_ms)
                progress = step / max(args.iterations, 1) if self.cap_ms is None else elapsed_ms / self.cap_ms
                seq_len = apply_schedules(self.base_model, self.muon, args, step, progress, seq_len, log)
                loss = self.train_step(step, scale, seq_len)
                if self.qat_layers and scale < args.late_qat_threshold:
                    if not self.qat_on:
                        log(f"late_qat:enabled step:{step} lr_scale:{scale:.4f} layers:{len(self.qat_layers)}")
                        self.qat_on = True
                    refresh_qat(self.qat_layers, clip_ratios(args))
                self.averager.update(step, scale, ema_decay(args, step, elapsed_ms, self.cap_ms))
                self.step = step = step + 1
                approx_ms = ms()
                if pending is not None:  # ready during this step
                    stop_after_step = self.act_on(step - 1, pending.get(), stop_after_step)
                # torch.full launches a fill; torch.tensor(x, device=cuda) syncs.
                flags = torch.stack([loss.float()] + [torch.full((), float(f), device=self.device) for f in (
                    self.cap_ms is not None and approx_ms >= self.cap_ms, self.signal is not None)])
                if self.world_size > 1:
                    dist.all_reduce(flags)  # a NaN or signal anywhere: all stop together
                pending = HostCopy(flags)
                if step <= 10 or step % args.train_log_every == 0 or stop_after_step is not None:
                    remaining = f" remaining:{max(self.cap_ms - approx_ms, 0) / 1000:.0f}s" if self.cap_ms is not None else ""
                    log(f"step:{step}/{args.iterations} train_loss:{flags[0].item() / self.world_size:.4f} "
                        f"train_time:{approx_ms:.0f}ms step_avg:{approx_ms / step:.2f}ms{remaining}")
            if pending is not None:
                self.act_on(self.step, pending.get(), stop_after_step)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        if self.signal is not None:
            self.save(f"stopped by signal {signal.Signals(self.signal).name}")
            raise SystemExit(128 + self.signal)
        if self.device.type == "cuda":
            log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")

    def act_on(self, done_step, flags, stop_after_step):
        """[loss sum, ranks at the cap, ranks signalled] -> step to stop after."""
        loss, capped, signalled = flags
        if not math.isfinite(loss):
            self.log(f"error: non-finite training loss ({loss}) at step {done_step}: lower MATRIX_LR, SCALAR_LR, "
                     "TIED_EMBED_LR or check the data")
            raise SystemExit(4)
        if signalled and self.signal is None:
            self.signal = signal.SIGTERM  # another rank was signalled
        return self.step if (capped or signalled) and stop_after_step is None else stop_after_step


def config_dict(args):
    return {k.lower(): getattr(args, k.lower()) for k in KNOWN_ENV}


def load_tokenizer_tables(args, device, log):
    """The val targets' bytes: CaseOps sidecars, else the tokenizer's tables."""
    import sentencepiece as spm
    if not os.path.isfile(args.tokenizer_path):
        raise FileNotFoundError(f"tokenizer {args.tokenizer_path} not found: set TOKENIZER_PATH or download it")
    try:
        sp = spm.SentencePieceProcessor(model_file=args.tokenizer_path)
    except (OSError, RuntimeError) as exc:
        raise DataError(f"tokenizer {args.tokenizer_path} is not a readable SentencePiece model ({exc}): "
                        "download it again or set TOKENIZER_PATH") from None
    if (pieces := int(sp.vocab_size())) != args.vocab_size:
        raise ConfigError(f"VOCAB_SIZE={args.vocab_size} but {args.tokenizer_path} has {pieces} pieces")
    val_bytes = load_validation_bytes(args.val_files)
    if val_bytes is not None:
        log(f"val_bytes:source=sidecar files={args.val_files.replace('fineweb_val_', 'fineweb_valbytes_')} "
            f"bytes:{int(val_bytes[1:].sum())}")
        return val_bytes
    if is_caseops_tokenizer(sp):
        raise DataError(f"{args.tokenizer_path} is a CaseOps tokenizer but {args.data_path} has no byte sidecars: "
                        "export it with `data/export_shards.py --caseops`")
    log("val_bytes:source=sentencepiece_luts")
    return build_sentencepiece_luts(sp, args.vocab_size, device)


def main():
    code, args = Path(__file__).read_text(encoding="utf-8"), Hyperparameters()
    for name in ("sentencepiece", "zstandard") + (("brotli",) if args.compressor == "brotli" else ()):
        try:
            __import__(name)
        except ImportError:
            raise SystemExit(f"error: the python package `{name}` is required: pip install -r requirements.txt")

    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank, warnings, master = int(os.environ.get("LOCAL_RANK", 0)), misspelt_env_warnings(), rank == 0
    if master:
        for w in warnings:
            print(w, file=sys.stderr)
    grad_accum_steps = args.grad_accum_steps or (8 // world_size if 8 % world_size == 0 else 1)
    validate_config(args, world_size, grad_accum_steps)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if distributed:
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    log = LOG.open(f"logs/{args.run_id}.txt" if master else None)

    if SMOKE and "DATA_PATH" not in os.environ:
        # Rank 0 builds it from text Python ships with; other ranks wait.
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from data.sample import build_sample
        if master:
            build_sample("data/smoke_sample", vocab_size=args.vocab_size)
        if distributed:
            dist.barrier()
        args.data_path, args.tokenizer_path = build_sample("data/smoke_sample", vocab_size=args.vocab_size)

    log(code, console=False)
    log("=" * 100, console=False)
    log(f"Running Python {sys.version.split()[0]} PyTorch {torch.__version__} device:{device.type}", console=False)
    if cuda:
        log(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout, console=False)
        log(f"gpus:{world_size}x {torch.cuda.get_device_name(device)}")
    log("config " + json.dumps(config_dict(args), sort_keys=True))
    for w in warnings:
        log(w, console=False)

    luts = load_tokenizer_tables(args, device, log)  # data checks before any compute
    val_tokens = load_validation_tokens(args.val_files, args.vocab_size)
    log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={args.tokenizer_path}")
    if not args.eval_only:
        log(f"train_loader:dataset:{Path(args.data_path).name} train_shards:{len(shard_files(args.train_files, 'training'))}")
    log(f"val_loader:shards pattern={args.val_files} tokens:{val_tokens.numel() - 1}")

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    act_dtype = torch.bfloat16 if cuda else torch.float32
    base_model = GPT(args, act_dtype).to(device)
    qat_layers = prepare_qat(base_model, args) if args.late_qat_threshold > 0 else []
    backend = select_attention(args.attn_backend, device)
    torch._dynamo.config.recompile_limit = 64  # a graph per loop count, train length, eval shape
    compiled = torch.compile(base_model, dynamic=False, fullgraph=True) if cuda and args.compile else base_model
    model = DDP(compiled, device_ids=[local_rank] if cuda else None, broadcast_buffers=False) if distributed else compiled
    log(f"model_params:{sum(p.numel() for p in base_model.parameters())}")
    log(f"world_size:{world_size} grad_accum_steps:{grad_accum_steps}")
    log(f"attention_backend:{backend} compile:{compiled is not base_model} act_dtype:{str(act_dtype).removeprefix('torch.')}")
    log(f"attention_mode:gqa num_heads:{args.num_heads} num_kv_heads:{args.num_kv_heads}")
    log(f"tie_embeddings:{args.tie_embeddings} embed_lr:{args.tied_embed_lr if args.tie_embeddings else args.embed_lr} "
        f"head_lr:{args.head_lr if not args.tie_embeddings else 0.0} matrix_lr:{args.matrix_lr} scalar_lr:{args.scalar_lr}")
    log(f"train_batch_tokens:{args.train_batch_tokens} train_seq_len:{args.train_seq_len} iterations:{args.iterations} "
        f"warmup_steps:{args.warmup_steps} max_wallclock_seconds:{args.max_wallclock_seconds:.3f}")
    log(f"seed:{args.seed}")

    ev = Evaluation(args, compiled, base_model, device, rank, world_size, log, val_tokens.numel() - 1)

    def evaluate(mode, tokens=None, audit=False):
        """(val_loss, val_bpb) on the val set; on other tokens, the ScoreSheet."""
        sheet = run_eval_mode(ev, mode, val_tokens if tokens is None else tokens, audit)
        return sheet if tokens is not None else sheet.result(val_tokens, luts)

    label, val_bpb = f"int{max(args.attn_bits, args.mlp_bits)}_{args.compressor}", None  # names the final log lines
    local_tokens = args.train_batch_tokens // (world_size * grad_accum_steps)
    if args.eval_only:
        load_artifact(args.eval_only, base_model)
        log(f"eval_only: {args.eval_only}")
    else:
        loader = DistributedTokenLoader(args.train_files, args.vocab_size, rank, world_size, device)
        if args.quant_only:
            try:
                base_model.load_state_dict(torch.load(args.quant_only, map_location=device, weights_only=True))
            except Exception as exc:
                raise DataError(f"QUANT_ONLY={args.quant_only}: not a checkpoint of this config: {exc}") from None
            source = f"checkpoint {args.quant_only}"
        else:
            trainer = Trainer(ev, model, qat_layers, loader, grad_accum_steps, local_tokens)
            trainer.warmup()
            if args.resume:
                trainer.resume(args.resume)
            try:
                trainer.run(evaluate)
            except Exception:  # keep what was learnt
                trainer.save("failure")
                raise
            source, averaged = trainer.averager.final()
            base_model.load_state_dict(averaged)
        for m in qat_layers:  # evaluated as exported: no QAT delta
            m.qat_delta.zero_()
        t = time.perf_counter()
        val_loss, val_bpb = evaluate("roundtrip")
        log(f"final_weights:{source} pre_quant val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
            f"eval_time:{1000 * (time.perf_counter() - t):.0f}ms")
        if master and not args.quant_only:
            torch.save(base_model.state_dict(), "final_model.pt")
            log(f"Serialized model: {os.path.getsize('final_model.pt')} bytes")
        # Export: quantize, fit ARTIFACT_CAP, reload the artifact.
        calib = (loader.next_batch(local_tokens, args.train_seq_len)[0] for _ in range(args.gptq_calib_batches))
        t = time.perf_counter()
        gptq = args.quant_method == "gptq"
        hessians = collect_hessians(base_model, calib, args, device, world_size) if gptq else None
        qstate = quantize_state_dict(base_model.state_dict(), args, hessians)
        quant_s = time.perf_counter() - t
        over = gptq and args.max_wallclock_seconds > 0 and quant_s > args.gptq_reserve_seconds
        log(f"quantize:{args.quant_method} time:{quant_s:.1f}s reserve:{args.gptq_reserve_seconds:.0f}s"
            + (" WARNING: over the reserve: raise GPTQ_RESERVE_SECONDS" if over else "")
            + "".join(f" lqer:{n}" for n, e in qstate.items() if "lqer" in e))
        code_bytes, artifact, name = len(code.encode()), f"final_model.{label.split('_')[0]}.ptz", label.replace("_", "+")
        try:
            data, final_state = build_artifact(qstate, args, code_bytes, log)
        except ArtifactOverCap as exc:
            log(f"error: artifact over the cap: {exc} > ARTIFACT_CAP={args.artifact_cap}: lower ATTN_BITS/MLP_BITS/"
                "EMBED_BITS and re-quantize with QUANT_ONLY=final_model.pt")
            raise SystemExit(3)
        if master:
            Path(artifact).write_bytes(data)
        log(f"Serialized model {name}: {len(data)} bytes")
        log(f"Code size: {code_bytes} bytes")
        log(f"Total submission size {name}: {len(data) + code_bytes} bytes")
        if final_state is not qstate:  # pruned: measure what it cost
            base_model.load_state_dict(dequantize_state_dict(qstate))
            log(f"fit_to_cap: round-trip val_bpb before pruning {evaluate('roundtrip')[1]:.4f}")
        if distributed:
            dist.barrier()
        load_artifact(artifact, base_model)
    final_evaluation(ev, label, evaluate, val_bpb)
    if distributed:  # together: an early gloo teardown aborts slow ranks
        dist.barrier()
        dist.destroy_process_group()


def final_evaluation(ev, label, evaluate, pre_quant_bpb):
    """Every FINAL_EVAL mode, audited first, and its time at the audit's speed; the final lines."""
    args, log, t0, modes = ev.args, ev.log, time.perf_counter(), final_modes(ev.args)
    plan = {mode: audit_eval_mode(mode, lambda toks: evaluate(mode, toks, audit=True), args, log, ev.world_size)
            * ev.val_targets / ev.world_size for mode in modes}
    total = sum(plan.values()) + time.perf_counter() - t0
    log("eval_plan: " + " ".join(f"{m}:{s:.0f}s" for m, s in plan.items()) + f" total:{total:.0f}s with the audits, "
        "at their speed (small streams: a rough guide)"
        + (" WARNING: over 600s: set TTT_MAX_SECONDS or drop a mode" if total > 600 else ""))
    for mode in modes:
        t = time.perf_counter()
        loss, bpb = evaluate(mode)
        name = mode.replace("+", "_")
        stride = {"roundtrip": f" stride:{args.eval_seq_len}", "sliding_window": f" stride:{args.eval_stride}"}
        log(f"final_{label}_{name} val_loss:{loss:.4f} val_bpb:{bpb:.4f}{stride.get(mode, '')} "
            f"eval_time:{1000 * (time.perf_counter() - t):.0f}ms")
        log(f"final_{label}_{name}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
        if mode == "roundtrip" and pre_quant_bpb is not None:
            log(f"quant_gap val_bpb:{bpb - pre_quant_bpb:+.5f}")
    log(f"final_eval:done total_eval_time:{time.perf_counter() - t0:.1f}s")  # missing if killed while evaluating


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, EvalError, FileNotFoundError) as e:
        LOG(f"error: {e}", console=False)
        sys.exit(f"error: {e}")
