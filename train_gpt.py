"""
Parameter Golf trainer: one file, configured by environment variables.

  torchrun --standalone --nproc_per_node=8 train_gpt.py      # 8xH100, the record setting
  SMOKE=1 python3 train_gpt.py                                # whole pipeline, tiny, on a CPU

Trains a GPT (GQA, partial RoPE, XSA, SmearGate, BigramHash, value embeddings, U-Net skips) with
Muon + Adam, averages it (EMA / SWA), exports it as int6 per-row + zstd-22, reloads the artifact
and scores it on the validation split in bits per byte (plain and sliding-window).
"""
from __future__ import annotations

import copy
import difflib
import glob
import json
import math
import os
import random
import re
import struct
import subprocess
import sys
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------------------------------------------------------
# HYPERPARAMETERS
# Every setting is an env var; the defaults are the strongest known 8xH100 stack.
# SMOKE=1 swaps in a tiny model and a sample dataset built locally (see main()).
# -----------------------------------------------------------------------------

KNOWN_ENV: dict[str, object] = {}
ENV_ERRORS: list[str] = []  # unparsable values, reported with the other configuration errors


class ConfigError(ValueError):
    """An impossible or inconsistent setting: reported before any compute."""


class DataError(ValueError):
    """A missing, corrupt or mismatched shard, tokenizer or artifact."""


def env(name: str, default):
    """Read env var `name`, parsed as the type of `default`, and register it as a known setting."""
    KNOWN_ENV[name] = default
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        if isinstance(default, bool):
            if raw.strip().lower() not in ("0", "1", "true", "false"):
                raise ValueError
            return raw.strip().lower() in ("1", "true")
        return type(default)(raw)
    except ValueError:
        ENV_ERRORS.append(f"{name}={raw!r} is not a valid {type(default).__name__}")
        return default


SMOKE = env("SMOKE", False)


def S(full, smoke):
    return smoke if SMOKE else full


class Hyperparameters:
    smoke = SMOKE
    # Data and run.
    data_path = env("DATA_PATH", "./data/datasets/fineweb10B_sp1024")
    tokenizer_path = env("TOKENIZER_PATH", "./data/tokenizers/fineweb_1024_bpe.model")
    vocab_size = env("VOCAB_SIZE", S(1024, 512))
    run_id = env("RUN_ID", str(uuid.uuid4()))
    seed = env("SEED", 1337)

    # Schedule. The LR warmdown is wallclock-aware: it ends when MAX_WALLCLOCK_SECONDS runs out.
    iterations = env("ITERATIONS", S(20000, 40))
    warmup_steps = env("WARMUP_STEPS", S(20, 2))  # compile-priming steps, undone afterwards
    warmdown_iters = env("WARMDOWN_ITERS", S(3500, 15))
    max_wallclock_seconds = env("MAX_WALLCLOCK_SECONDS", S(600.0, 0.0))
    train_batch_tokens = env("TRAIN_BATCH_TOKENS", S(786_432, 4096))
    grad_accum_steps = env("GRAD_ACCUM_STEPS", 0)  # micro-batches per step; 0: 8 // WORLD_SIZE, as officially
    train_seq_len = env("TRAIN_SEQ_LEN", S(2048, 128))
    eval_seq_len = env("EVAL_SEQ_LEN", train_seq_len)
    eval_stride = env("EVAL_STRIDE", S(64, 32))
    val_batch_size = env("VAL_BATCH_SIZE", S(524_288, 16384))
    val_loss_every = env("VAL_LOSS_EVERY", S(4000, 20))
    train_log_every = env("TRAIN_LOG_EVERY", S(200, 10))

    # Model.
    num_layers = env("NUM_LAYERS", S(11, 3))
    model_dim = env("MODEL_DIM", S(512, 64))
    num_heads = env("NUM_HEADS", S(8, 4))
    num_kv_heads = env("NUM_KV_HEADS", S(4, 2))
    mlp_mult = env("MLP_MULT", 3.0)
    leaky_relu_slope = env("LEAKY_RELU_SLOPE", 0.5)  # MLP act = leaky_relu(x)^2; 0 gives relu^2
    tie_embeddings = env("TIE_EMBEDDINGS", True)
    tied_embed_init_std = env("TIED_EMBED_INIT_STD", 0.005)
    rope_base = env("ROPE_BASE", 10000.0)
    rope_dims = env("ROPE_DIMS", S(16, 8))  # rotated dims per head; the rest carry no position
    logit_softcap = env("LOGIT_SOFTCAP", 30.0)
    qk_gain_init = env("QK_GAIN_INIT", 1.5)
    ln_scale = env("LN_SCALE", True)  # scale block inputs by 1/sqrt(layer+1)
    xsa_last_n = env("XSA_LAST_N", 11)  # exclusive self-attention on the last N layers (>= layers: all)
    bigram_vocab_size = env("BIGRAM_VOCAB_SIZE", S(2048, 256))  # 0 disables BigramHash
    bigram_dim = env("BIGRAM_DIM", S(128, 32))
    smear_enabled = env("SMEAR_ENABLED", True)
    unet_skips = env("UNET_SKIPS", True)
    ve_enabled = env("VE_ENABLED", True)
    ve_dim = env("VE_DIM", S(128, 32))
    ve_layers = env("VE_LAYERS", "-2,-1")  # python-style indices: the last two layers

    # Optimizers.
    matrix_lr = env("MATRIX_LR", 0.025)
    scalar_lr = env("SCALAR_LR", 0.025)
    tied_embed_lr = env("TIED_EMBED_LR", 0.035)
    embed_lr = env("EMBED_LR", 0.6)  # untied input embedding
    head_lr = env("HEAD_LR", 0.008)  # untied output head
    muon_momentum = env("MUON_MOMENTUM", 0.99)
    muon_momentum_warmup_start = env("MUON_MOMENTUM_WARMUP_START", 0.92)
    muon_momentum_warmup_steps = env("MUON_MOMENTUM_WARMUP_STEPS", S(1500, 10))
    muon_backend_steps = env("MUON_BACKEND_STEPS", 5)
    muon_ns_coeffs = env("MUON_NS_COEFFS", "3.4445,-4.7750,2.0315")
    muon_wd = env("MUON_WD", 0.04)
    adam_wd = env("ADAM_WD", 0.04)
    beta1 = env("BETA1", 0.9)
    beta2 = env("BETA2", 0.95)
    adam_eps = env("ADAM_EPS", 1e-8)
    grad_clip_norm = env("GRAD_CLIP_NORM", 0.3)  # 0 disables

    # Weight averaging: EMA every step; tight SWA collects late checkpoints (of the EMA by default).
    ema_enabled = env("EMA_ENABLED", True)
    ema_decay = env("EMA_DECAY", S(0.997, 0.9))
    swa_enabled = env("SWA_ENABLED", False)
    swa_every = env("SWA_EVERY", S(50, 5))
    swa_start_scale = env("SWA_START_SCALE", 0.2)  # collect once the LR scale is below this
    swa_from_ema = env("SWA_FROM_EMA", True)

    # Export (see QUANTIZATION AND THE ARTIFACT).
    attn_bits = env("ATTN_BITS", 6)
    mlp_bits = env("MLP_BITS", 6)
    embed_bits = env("EMBED_BITS", 8)  # 16 keeps embeddings in fp16
    # "REGEX:BITS,..." on tensor names, applied last; 16 = fp16. The smoke model's matrices are all under
    # the small-tensor size: forcing them in makes the smoke run exercise GPTQ and late QAT.
    quant_overrides = env("QUANT_OVERRIDES", S("", r"\.(c_q|c_k|c_v|proj|fc)\.weight$:6"))
    quant_method = env("QUANT_METHOD", "gptq")  # gptq | rtn (round to nearest)
    quant_clip_ratios = env("QUANT_CLIP_RATIOS", "1.0,0.995,0.99,0.98,0.97,0.95,0.92,0.9")  # per-row clip search
    gptq_block_size = env("GPTQ_BLOCK_SIZE", 128)
    gptq_damp = env("GPTQ_DAMP", 0.01)
    gptq_act_order = env("GPTQ_ACT_ORDER", True)
    gptq_calib_batches = env("GPTQ_CALIB_BATCHES", S(8, 4))  # training micro-batches per rank
    gptq_reserve_seconds = env("GPTQ_RESERVE_SECONDS", S(10.0, 0.0))  # taken from the training wallclock
    late_qat_threshold = env("LATE_QAT_THRESHOLD", 0.15)  # fake-quantize once the LR scale is below; 0: off
    prune_frac = env("PRUNE_FRAC", 0.0)  # zero the smallest quantized weights before compression
    compressor = env("COMPRESSOR", "zstd")  # zstd | lzma | brotli | auto (smallest)
    zstd_level = env("ZSTD_LEVEL", 22)
    artifact_cap = env("ARTIFACT_CAP", 16_000_000)
    fit_max_prune_frac = env("FIT_MAX_PRUNE_FRAC", 0.5)  # fit-to-cap never prunes more than this
    eval_only = env("EVAL_ONLY", "")  # path of an artifact: load it and evaluate, no training
    quant_only = env("QUANT_ONLY", "")  # path of final_model.pt: re-quantize, export, evaluate

    # Runtime.
    compile = env("COMPILE", True)  # torch.compile on CUDA (never on CPU)
    attn_backend = env("ATTN_BACKEND", "auto")  # auto | fa3 | fa2 | sdpa

    @property
    def train_files(self):
        return os.path.join(self.data_path, "fineweb_train_*.bin")

    @property
    def val_files(self):
        return os.path.join(self.data_path, "fineweb_val_*.bin")


# Variables that torchrun, CUDA and friends set: never flagged as misspellings.
FOREIGN_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
               "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS"}


def misspelt_env_warnings() -> list[str]:
    out = []
    for name in sorted(os.environ):
        if name in KNOWN_ENV or name in FOREIGN_ENV or not name.isupper():
            continue
        close = difflib.get_close_matches(name, KNOWN_ENV, n=1, cutoff=0.85)
        if close:
            out.append(f"WARNING: env {name} is not a setting; did you mean {close[0]}? (ignored)")
    return out


def ve_layer_indices(args) -> list[int]:
    if not args.ve_enabled or not args.ve_layers.strip():
        return []
    idx = [int(s) for s in args.ve_layers.split(",") if s.strip()]
    if any(not -args.num_layers <= i < args.num_layers for i in idx):
        raise ConfigError(f"VE_LAYERS={args.ve_layers} has a layer outside 0..{args.num_layers - 1}")
    return sorted({i % args.num_layers for i in idx})


def validate_config(args, world_size: int, grad_accum_steps: int) -> None:
    """Refuse impossible settings before any data is read or compute spent."""
    err = list(ENV_ERRORS)
    if args.model_dim % args.num_heads:
        err.append(f"NUM_HEADS={args.num_heads} must divide MODEL_DIM={args.model_dim}")
    elif args.num_heads % args.num_kv_heads:
        err.append(f"NUM_KV_HEADS={args.num_kv_heads} must divide NUM_HEADS={args.num_heads}")
    else:
        head_dim = args.model_dim // args.num_heads
        if head_dim % 2:
            err.append(f"head dim MODEL_DIM/NUM_HEADS={head_dim} must be even for RoPE")
        if args.rope_dims % 2 or not 0 < args.rope_dims <= head_dim:
            err.append(f"ROPE_DIMS={args.rope_dims} must be even and in 2..head dim {head_dim}")
    if 8 % world_size and not args.grad_accum_steps:
        err.append(f"WORLD_SIZE={world_size} must divide 8 (gradient accumulation keeps the 8-GPU batch), "
                   "or set GRAD_ACCUM_STEPS")
    elif grad_accum_steps < 1 or args.train_batch_tokens % (world_size * grad_accum_steps * args.train_seq_len):
        err.append(f"TRAIN_BATCH_TOKENS={args.train_batch_tokens} must be divisible by world size x "
                   f"grad accumulation x TRAIN_SEQ_LEN = {world_size}x{grad_accum_steps}x{args.train_seq_len}")
    if not 0 < args.eval_stride <= args.eval_seq_len:
        err.append(f"EVAL_STRIDE={args.eval_stride} must be in 1..EVAL_SEQ_LEN={args.eval_seq_len}")
    if args.num_layers < 1 or args.iterations < 0 or args.warmup_steps < 0 or args.mlp_mult <= 0:
        err.append("NUM_LAYERS >= 1, ITERATIONS >= 0, WARMUP_STEPS >= 0 and MLP_MULT > 0 are required")
    if args.bigram_vocab_size == 1 or args.bigram_vocab_size < 0:
        err.append(f"BIGRAM_VOCAB_SIZE={args.bigram_vocab_size} must be 0 (off) or >= 2")
    if not 0 <= args.ema_decay < 1:
        err.append(f"EMA_DECAY={args.ema_decay} must be in [0, 1)")
    if args.logit_softcap <= 0 or args.swa_every < 1 or args.val_batch_size < 1 or args.train_log_every < 1:
        err.append("LOGIT_SOFTCAP > 0, SWA_EVERY >= 1, VAL_BATCH_SIZE >= 1 and TRAIN_LOG_EVERY >= 1 are required")
    if any(not (2 <= b <= 8 or b == 16) for b in (args.attn_bits, args.mlp_bits, args.embed_bits)):
        err.append("ATTN_BITS, MLP_BITS and EMBED_BITS must be in 2..8 (or 16: fp16)")
    if args.quant_method not in ("gptq", "rtn"):
        err.append(f"QUANT_METHOD={args.quant_method} must be gptq or rtn")
    try:
        quant_overrides(args)
        if not all(0 < r <= 1 for r in clip_ratios(args)):
            raise ValueError
    except ValueError as e:
        err.append(str(e) if isinstance(e, ConfigError) else f"QUANT_CLIP_RATIOS={args.quant_clip_ratios} must be numbers in (0, 1]")
    if not 0 <= args.prune_frac < args.fit_max_prune_frac < 1:
        err.append("0 <= PRUNE_FRAC < FIT_MAX_PRUNE_FRAC < 1 is required")
    if args.compressor not in ("zstd", "lzma", "brotli", "auto"):
        err.append(f"COMPRESSOR={args.compressor} must be zstd, lzma, brotli or auto")
    for name in ("eval_only", "quant_only"):
        if getattr(args, name) and not os.path.isfile(getattr(args, name)):
            err.append(f"{name.upper()}={getattr(args, name)}: no such file")
    if args.attn_backend not in ("auto", "fa3", "fa2", "sdpa"):
        err.append(f"ATTN_BACKEND={args.attn_backend} must be auto, fa3, fa2 or sdpa")
    if len(args.muon_ns_coeffs.split(",")) != 3:
        err.append(f"MUON_NS_COEFFS={args.muon_ns_coeffs} must be three comma-separated numbers a,b,c")
    try:
        ve_layer_indices(args)
    except (ConfigError, ValueError) as e:
        err.append(str(e))
    if err:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(err))


# -----------------------------------------------------------------------------
# MUON OPTIMIZER
# Momentum, then orthogonalize each matrix update with a Newton-Schulz iteration.
# Each rank orthogonalizes its share of the matrices; one all-reduce shares the results.
# -----------------------------------------------------------------------------

def zeropower_via_newtonschulz5(G: Tensor, steps: int, coeffs: tuple[float, float, float], eps: float = 1e-7) -> Tensor:
    """Approximate U V^T of G = U S V^T: a quintic iteration that pushes singular values towards 1."""
    a, b, c = coeffs
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    X = X / (X.norm() + eps)
    transposed = X.size(0) > X.size(1)
    if transposed:  # iterate on the smaller Gram matrix
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if transposed else X


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float, backend_steps: int, coeffs, weight_decay: float):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      coeffs=tuple(coeffs), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        params = [p for g in self.param_groups for p in g["params"]]
        if not params:
            return
        flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=torch.float32)
        offset = 0
        for group in self.param_groups:
            m = group["momentum"]
            for i, p in enumerate(group["params"]):
                n = p.numel()
                if i % world == rank and p.grad is not None:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    buf.mul_(m).add_(p.grad)
                    g = p.grad.add(buf, alpha=m)  # Nesterov
                    g = zeropower_via_newtonschulz5(g, group["backend_steps"], group["coeffs"])
                    g = g * max(1.0, p.size(0) / p.size(1)) ** 0.5  # equal RMS for tall matrices
                    flat[offset:offset + n] = g.flatten().float()
                offset += n
        if distributed:
            dist.all_reduce(flat)
        offset = 0
        for group in self.param_groups:
            for p in group["params"]:
                n = p.numel()
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(flat[offset:offset + n].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += n


# -----------------------------------------------------------------------------
# TOKENIZER-AGNOSTIC EVALUATION SETUP
# val_bpb = total nats / (ln 2 x total UTF-8 bytes of the text the targets decode to).
# A piece's leading "\u2581" is one space byte, except right after a boundary token (BOS).
# -----------------------------------------------------------------------------

def build_sentencepiece_luts(sp, vocab_size: int, device) -> tuple[Tensor, Tensor, Tensor]:
    table = max(int(sp.vocab_size()), vocab_size)
    base_bytes = np.zeros(table, dtype=np.int16)
    has_leading_space = np.zeros(table, dtype=np.bool_)
    is_boundary = np.ones(table, dtype=np.bool_)
    for t in range(int(sp.vocab_size())):
        if sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t):
            continue
        is_boundary[t] = False
        if sp.is_byte(t):
            base_bytes[t] = 1
            continue
        piece = sp.id_to_piece(t)
        if piece.startswith("\u2581"):
            has_leading_space[t] = True
            piece = piece[1:]
        base_bytes[t] = len(piece.encode("utf-8"))
    return (torch.tensor(base_bytes, device=device), torch.tensor(has_leading_space, device=device),
            torch.tensor(is_boundary, device=device))


# -----------------------------------------------------------------------------
# DATA LOADING
# Shard = 256 little-endian int32 header (magic, version, token count) + uint16 tokens.
# -----------------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256


def load_data_shard(path, vocab_size: int | None = None) -> np.ndarray:
    path = str(path)
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size != HEADER_INTS or header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: not a shard (magic {header[0] if header.size else None}, expected {SHARD_MAGIC})")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: shard version {header[1]}, expected {SHARD_VERSION}")
    n = int(header[2])
    if size != HEADER_INTS * 4 + 2 * n:
        raise DataError(f"{path}: {size} bytes but the header says {n} tokens ({HEADER_INTS * 4 + 2 * n} bytes): "
                         "truncated or corrupt, download or export it again")
    tokens = np.fromfile(path, dtype="<u2", count=n, offset=HEADER_INTS * 4)
    if vocab_size is not None and n and int(tokens.max()) >= vocab_size:
        raise DataError(f"{path}: token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size}: "
                         "shards and tokenizer do not match")
    return tokens


def shard_files(pattern: str, what: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {what} shards match {pattern}: download them with "
                                "`python3 data/cached_challenge_fineweb.py --variant sp1024` or set DATA_PATH")
    return files


class TokenStream:
    """Reads the shards in order, forever, handing out contiguous token spans."""

    def __init__(self, pattern: str, vocab_size: int):
        self.files, self.vocab_size = shard_files(pattern, "training"), vocab_size
        self.file_idx, self.pos = 0, 0
        self.tokens = load_data_shard(self.files[0], vocab_size)

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos >= len(self.tokens):
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens, self.pos = load_data_shard(self.files[self.file_idx], self.vocab_size), 0
                continue
            k = min(n, len(self.tokens) - self.pos)
            parts.append(self.tokens[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(parts)


class DistributedTokenLoader:
    """Each micro-step, every rank takes its own slice of one shared chunk (plus one token for targets)."""

    def __init__(self, pattern: str, vocab_size: int, rank: int, world_size: int, device):
        self.stream, self.rank, self.world_size, self.device = TokenStream(pattern, vocab_size), rank, world_size, device

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)
        local = torch.from_numpy(chunk[self.rank * span:(self.rank + 1) * span].astype(np.int64))
        if self.device.type == "cuda":
            local = local.pin_memory().to(self.device, non_blocking=True)
        return local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)


def load_validation_tokens(pattern: str, vocab_size: int, seq_len: int) -> Tensor:
    tokens = np.concatenate([load_data_shard(f, vocab_size) for f in shard_files(pattern, "validation")])
    if len(tokens) < 2:
        raise DataError(f"validation split {pattern} holds {len(tokens)} tokens: nothing to score")
    return torch.from_numpy(tokens.astype(np.int64))


# -----------------------------------------------------------------------------
# MODEL
# -----------------------------------------------------------------------------

BOS_ID = 1


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """fp32 master weights, computed in the activation dtype; `zero_init` marks output projections.
    Late QAT: `qat_delta` (a buffer, so a compiled graph reads its current value; a Python flag
    would be frozen at compile time) holds fake_quantize(w) - w, refreshed after each optimizer
    step; adding it is a straight-through estimator: forward sees quantized weights, gradients
    reach w unchanged. It stays zero until QAT starts."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init, self.qat_bits = zero_init, None
        self.register_buffer("qat_delta", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight if self.qat_delta is None else self.weight + self.qat_delta
        return F.linear(x, w.to(x.dtype))


def prepare_qat(model: nn.Module, args) -> list[CastedLinear]:
    """Give every linear layer that the export quantizes a zero QAT delta; returns those layers."""
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, CastedLinear) and (bits := quant_bits_for(name + ".weight", m.weight, args)):
            m.qat_bits, m.qat_delta = bits, torch.zeros_like(m.weight)
            layers.append(m)
    return layers


@torch.no_grad()
def refresh_qat(layers: list[CastedLinear], ratios) -> None:
    for m in layers:
        m.qat_delta.copy_(fake_quantize(m.weight, m.qat_bits, ratios) - m.weight)


ATTN_IMPL = {"name": "sdpa", "fn": None}


def select_attention(requested: str, device) -> str:
    """Pick FlashAttention 3, then 2, then SDPA (CPU always SDPA). An explicit request must be met."""
    candidates = {"fa3": ("flash_attn_interface", "flash_attn_func"), "fa2": ("flash_attn", "flash_attn_func")}
    order = [requested] if requested != "auto" else (["fa3", "fa2", "sdpa"] if device.type == "cuda" else ["sdpa"])
    for name in order:
        if name == "sdpa":
            ATTN_IMPL.update(name="sdpa", fn=None)
            return name
        try:
            module = __import__(candidates[name][0])
            ATTN_IMPL.update(name=name, fn=getattr(module, candidates[name][1]))
            return name
        except ImportError:
            if requested != "auto":
                raise ConfigError(f"ATTN_BACKEND={requested} but {candidates[name][0]} is not importable")
    raise AssertionError("unreachable")


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q: (B,T,H,D), k/v: (B,T,Hkv,D) -> (B,T,H,D). GQA handled natively by every backend."""
    if ATTN_IMPL["fn"] is not None:
        out = ATTN_IMPL["fn"](q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


class Rotary(nn.Module):
    """Partial RoPE on the first `dims` dims of each head. Past the training length the base is
    NTK-scaled so that the slowest frequencies still span the longer context."""

    def __init__(self, dims: int, base: float, train_seq_len: int):
        super().__init__()
        self.dims, self.base, self.train_seq_len = dims, base, train_seq_len

    def forward(self, T: int, device) -> tuple[Tensor, Tensor]:
        base = self.base
        if T > self.train_seq_len:
            base *= (T / self.train_seq_len) ** (self.dims / (self.dims - 2)) if self.dims > 2 else 1.0
        inv_freq = base ** (-torch.arange(0, self.dims, 2, device=device, dtype=torch.float32) / self.dims)
        freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, dims: int) -> Tensor:
    half = dims // 2
    x1, x2, rest = x[..., :half], x[..., half:dims], x[..., dims:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest), dim=-1)


def exclusive_self_attention(y: Tensor, v: Tensor) -> Tensor:
    """XSA: drop from each head's output its component along the token's own value vector.
    y: (B,T,H,D), v: (B,T,Hkv,D); heads are grouped onto their KV head without repeating v."""
    B, T, H, D = y.shape
    yg = y.view(B, T, v.size(2), H // v.size(2), D)
    vn = F.normalize(v, dim=-1).unsqueeze(3)
    return (yg - (yg * vn).sum(-1, keepdim=True) * vn).view(B, T, H, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_dims: int, rope_base: float,
                 train_seq_len: int, qk_gain_init: float, xsa: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, num_kv_heads * self.head_dim)
        self.c_v = CastedLinear(dim, num_kv_heads * self.head_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init))
        self.rotary, self.rope_dims, self.xsa = Rotary(rope_dims, rope_base, train_seq_len), rope_dims, xsa

    def forward(self, x: Tensor, ve: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.num_heads, self.head_dim)
        k = self.c_k(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).view(B, T, self.num_kv_heads, self.head_dim)
        if ve is not None:
            v = v + ve.view_as(v)
        cos, sin = self.rotary(T, x.device)
        q = apply_rotary(rms_norm(q), cos, sin, self.rope_dims) * self.q_gain.to(x.dtype)[:, None]
        k = apply_rotary(rms_norm(k), cos, sin, self.rope_dims)
        # FlashAttention needs bf16/fp16 inputs exactly: nothing upstream may have promoted to fp32.
        y = causal_attention(q.to(x.dtype), k.to(x.dtype), v.to(x.dtype))
        if self.xsa:
            y = exclusive_self_attention(y, v)
        return self.proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, mult: float, slope: float):
        super().__init__()
        hidden = int(mult * dim)
        self.fc, self.proj, self.slope = CastedLinear(dim, hidden), CastedLinear(hidden, dim, zero_init=True), slope

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x), self.slope).square())


class Block(nn.Module):
    def __init__(self, args, layer_idx: int, xsa: bool):
        super().__init__()
        dim = args.model_dim
        self.attn = Attention(dim, args.num_heads, args.num_kv_heads, args.rope_dims, args.rope_base,
                              args.train_seq_len, args.qk_gain_init, xsa)
        self.mlp = MLP(dim, args.mlp_mult, args.leaky_relu_slope)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))  # (stream, x0) weights
        self.in_scale = 1.0 / math.sqrt(layer_idx + 1) if args.ln_scale else 1.0

    def forward(self, x: Tensor, x0: Tensor, ve: Tensor | None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.in_scale, ve)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.in_scale)


class SmearGate(nn.Module):
    """Blend each position with the previous one through a learned per-dim gate, never across a
    document boundary: a BOS position (and position 0) keeps its own vector."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate.to(x.dtype))
        prev = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1)
        g = g * (ids != BOS_ID).unsqueeze(-1).to(x.dtype)
        return x + g * (prev - x)


class BigramHash(nn.Module):
    """Hashed (previous, current) token pair embedding, projected to the model width. Slot
    `size - 1` stands for "no previous token" (position 0 and document starts)."""

    def __init__(self, size: int, dim: int, model_dim: int):
        super().__init__()
        self.size = size
        self.embed = nn.Embedding(size, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.proj = CastedLinear(dim, model_dim, zero_init=True)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def bucket(self, ids: Tensor) -> Tensor:
        prev = F.pad(ids[:, :-1], (1, 0))
        h = (ids * 92821) ^ (prev * 689287)
        h = torch.remainder(h, self.size - 1)
        start = (torch.arange(ids.size(1), device=ids.device) == 0) | (ids == BOS_ID)
        return torch.where(start, self.size - 1, h)

    def forward(self, ids: Tensor) -> Tensor:
        return self.proj(self.embed(self.bucket(ids))) * self.scale


class ValueEmbedding(nn.Module):
    """One token embedding shared by several layers and added to their attention values."""

    def __init__(self, vocab_size: int, dim: int, kv_dim: int, n_layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.proj = CastedLinear(dim, kv_dim, zero_init=True)
        self.layer_scales = nn.Parameter(torch.ones(n_layers))

    def forward(self, ids: Tensor, dtype) -> Tensor:
        return self.proj(self.embed(ids).to(dtype))


class GPT(nn.Module):
    def __init__(self, args, act_dtype=torch.float32):
        super().__init__()
        L, dim = args.num_layers, args.model_dim
        self.act_dtype, self.logit_softcap, self.tie_embeddings = act_dtype, args.logit_softcap, args.tie_embeddings
        self.tok_emb = nn.Embedding(args.vocab_size, dim)
        self.bigram = BigramHash(args.bigram_vocab_size, args.bigram_dim, dim) if args.bigram_vocab_size else None
        self.smear = SmearGate(dim) if args.smear_enabled else None
        self.blocks = nn.ModuleList(Block(args, i, xsa=i >= L - args.xsa_last_n) for i in range(L))
        self.ve_layers = ve_layer_indices(args)
        kv_dim = args.num_kv_heads * (dim // args.num_heads)
        self.ve = ValueEmbedding(args.vocab_size, args.ve_dim, kv_dim, len(self.ve_layers)) if self.ve_layers else None
        # U-Net: the first half's outputs feed, in reverse order, the second half's inputs.
        self.num_encoder = L // 2 if args.unet_skips else 0
        self.skip_weights = nn.Parameter(torch.ones(min(self.num_encoder, L - self.num_encoder), dim))
        self.lm_head = None if args.tie_embeddings else CastedLinear(dim, args.vocab_size, zero_init=True)
        self._init_weights(args)

    def _init_weights(self, args) -> None:
        if args.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, std=args.tied_embed_init_std)
        for m in self.modules():
            if isinstance(m, CastedLinear):
                nn.init.zeros_(m.weight) if m.zero_init else nn.init.orthogonal_(m.weight)

    def logits(self, ids: Tensor) -> Tensor:
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(ids)
        x = rms_norm(x.to(self.act_dtype))
        if self.smear is not None:
            x = self.smear(x, ids)
        x0, skips = x, []
        ve = self.ve(ids, x.dtype) if self.ve is not None else None
        for i, block in enumerate(self.blocks):
            if i >= self.num_encoder and skips:
                x = x + self.skip_weights[i - self.num_encoder].to(x.dtype) * skips.pop()
            ve_i = None
            if i in self.ve_layers:
                ve_i = ve * self.ve.layer_scales[self.ve_layers.index(i)].to(x.dtype)
            x = block(x, x0, ve_i)
            if i < self.num_encoder:
                skips.append(x)
        x = rms_norm(x)
        logits = F.linear(x, self.tok_emb.weight.to(x.dtype)) if self.lm_head is None else self.lm_head(x)
        logits = logits.float()
        return self.logit_softcap * torch.tanh(logits / self.logit_softcap)

    def forward(self, ids: Tensor, targets: Tensor) -> Tensor:
        """Per-token cross-entropy in nats, shape (B, T)."""
        logits = self.logits(ids)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


# -----------------------------------------------------------------------------
# EVALUATION
# Sliding windows of EVAL_SEQ_LEN tokens every EVAL_STRIDE tokens. Window k scores the targets
# from where window k-1 stopped to its own end, so every target is scored exactly once, each
# with at least EVAL_SEQ_LEN - EVAL_STRIDE tokens of context (except the first window's).
# Stride = sequence length is the plain evaluation.
# -----------------------------------------------------------------------------

def window_plan(total: int, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """For `total` targets: window starts and the first target index each window scores."""
    if total <= seq_len:
        return np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
    starts = np.arange(0, total - seq_len + 1, stride, dtype=np.int64)
    if starts[-1] + seq_len < total:
        starts = np.append(starts, total - seq_len)
    score_from = np.concatenate(([0], starts[:-1] + seq_len))
    return starts, score_from


@torch.no_grad()
def eval_val(args, model, val_tokens: Tensor, luts, rank: int, world_size: int, device,
             seq_len: int, stride: int) -> tuple[float, float]:
    base_bytes, has_space, is_boundary = luts
    total = val_tokens.numel() - 1
    seq_len = min(seq_len, total)
    starts, score_from = window_plan(total, seq_len, stride)
    lo, hi = len(starts) * rank // world_size, len(starts) * (rank + 1) // world_size
    batch = max(1, args.val_batch_size // (world_size * seq_len))
    offsets = torch.arange(seq_len + 1)
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # nats, tokens, bytes
    was_training = model.training
    model.eval()
    for b in range(lo, hi, batch):
        idx = np.arange(b, min(b + batch, hi))
        pad = batch - len(idx)  # pad the last batch with a repeat, unscored, to keep shapes static
        idx = np.concatenate((idx, np.full(pad, idx[-1])))
        win = val_tokens[torch.from_numpy(starts[idx])[:, None] + offsets].to(device, non_blocking=True)
        x, y = win[:, :-1], win[:, 1:]
        pos = torch.from_numpy(starts[idx])[:, None] + torch.arange(seq_len)
        scored = (pos >= torch.from_numpy(score_from[idx])[:, None]).to(device)
        scored[len(idx) - pad:] = False
        with autocast_ctx(device):
            nats = model(x, y).double()
        nbytes = base_bytes[y].double() + (has_space[y] & ~is_boundary[x]).double()
        sums += torch.stack(((nats * scored).sum(), scored.sum().double(), (nbytes * scored).sum()))
    if world_size > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    nats, tokens, nbytes = sums.tolist()
    assert int(tokens) == total, f"scored {int(tokens)} of {total} targets"
    return nats / tokens, nats / (math.log(2) * nbytes)


def autocast_ctx(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


# -----------------------------------------------------------------------------
# QUANTIZATION AND THE ARTIFACT
# Matrices: symmetric per-row intN (bits by tensor class, overridable by name pattern), rounded
# either to nearest or by GPTQ (Hessian-aware error propagation, Hessians from training data),
# each row's clip chosen by search. One quantizer serves late QAT and the export.
# The artifact is a self-describing byte layout (JSON header + raw arrays, never a pickle),
# arrays grouped by kind and 16/32-bit ones byte-shuffled, then compressed (zstd-22 default).
# Loading validates every field before touching the bytes.
# -----------------------------------------------------------------------------

ARTIFACT_MAGIC, BLOB_MAGIC = b"PGA2", b"PGQ2"
SMALL_TENSOR_NUMEL = 65_536
EMBED_NAMES = ("tok_emb.weight", "bigram.embed.weight", "ve.embed.weight", "lm_head.weight")
DTYPES = {"int8": torch.int8, "float16": torch.float16, "float32": torch.float32}


def quant_overrides(args) -> list[tuple[str, int]]:
    out = []
    for item in filter(None, (s.strip() for s in args.quant_overrides.split(","))):
        pattern, _, bits = item.rpartition(":")
        if not pattern or not bits.isdigit() or not (2 <= int(bits) <= 8 or int(bits) == 16):
            raise ConfigError(f"QUANT_OVERRIDES item {item!r} must be REGEX:BITS with BITS in 2..8 or 16")
        out.append((pattern, int(bits)))
    return out


def quant_bits_for(name: str, t: Tensor, args) -> int | None:
    """Export bits of a tensor, or None to keep it as fp16 (2-D) / fp32 (control tensors)."""
    if not t.is_floating_point() or t.ndim != 2:
        return None
    bits = None
    if name in EMBED_NAMES:
        bits = args.embed_bits
    elif t.numel() > SMALL_TENSOR_NUMEL:
        bits = args.mlp_bits if ".mlp." in name else args.attn_bits
    for pattern, b in quant_overrides(args):
        if re.search(pattern, name):
            bits = b
    return None if bits is None or bits >= 16 else bits


def clip_ratios(args) -> tuple[float, ...]:
    return tuple(float(r) for r in args.quant_clip_ratios.split(","))


def round_to_grid(w: Tensor, scale: Tensor, qmax: int) -> Tensor:
    return torch.clamp(torch.round(w / scale), -qmax, qmax)


def row_scales(w: Tensor, bits: int, ratios: tuple[float, ...]) -> Tensor:
    """Per-row scale (fp16-representable, shape (rows, 1)): the clip ratio of the row's max |w|
    whose round-to-nearest error is lowest."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)
    best_scale, best_err = None, None
    for r in ratios:
        scale = (amax * r / qmax).half().float().clamp_min(6e-8)
        err = (round_to_grid(w, scale, qmax) * scale - w).square().sum(dim=1, keepdim=True)
        if best_scale is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale, best_err = torch.where(better, scale, best_scale), torch.minimum(err, best_err)
    return best_scale


def quantize_per_row(w: Tensor, bits: int, ratios: tuple[float, ...] = (1.0,)) -> tuple[Tensor, Tensor]:
    """Round-to-nearest: w ~ q * scale[:, None], |q| <= 2^(bits-1) - 1."""
    w = w.float()
    scale = row_scales(w, bits, ratios)
    return round_to_grid(w, scale, 2 ** (bits - 1) - 1).to(torch.int8), scale.squeeze(1).half()


def fake_quantize(w: Tensor, bits: int, ratios: tuple[float, ...]) -> Tensor:
    q, scale = quantize_per_row(w, bits, ratios)
    return q.float() * scale.float()[:, None]


def gptq_quantize(w: Tensor, H: Tensor, bits: int, ratios, block: int, damp: float, act_order: bool):
    """GPTQ: quantize columns in order, pushing each column's rounding error onto the columns not yet
    quantized through the inverse Hessian of the layer's inputs (H = E[x x^T])."""
    W = w.float().clone()
    qmax, cols = 2 ** (bits - 1) - 1, W.size(1)
    scale = row_scales(W, bits, ratios)
    H = H.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    for attempt in range(5):  # raise the damping until the Hessian factors
        Hd = H + torch.eye(cols, device=H.device) * damp * (10 ** attempt) * H.diagonal().mean()
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            break
    else:
        return None
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    Q = torch.zeros_like(W)
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
    return Q[:, torch.argsort(perm)].to(torch.int8), scale.squeeze(1).half()


@torch.no_grad()
def collect_hessians(model: nn.Module, batches, args, device, world_size: int) -> dict[str, Tensor]:
    """E[x x^T] of the inputs of every quantized linear layer, over training batches (never val)."""
    hessians, counts, hooks = {}, {}, []
    for name, m in model.named_modules():
        if isinstance(m, CastedLinear) and quant_bits_for(name + ".weight", m.weight, args):
            hessians[name] = torch.zeros(m.in_features, m.in_features, device=device)
            counts[name] = 0

            def hook(mod, inp, out, name=name):
                x = inp[0].detach().reshape(-1, inp[0].size(-1)).float()
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


def quantize_state_dict(state: dict[str, Tensor], args, hessians: dict[str, Tensor] | None = None) -> dict[str, dict]:
    out, ratios = {}, clip_ratios(args)
    for name, t in state.items():
        bits = quant_bits_for(name, t, args)
        H = hessians.get(name.removesuffix(".weight")) if hessians else None
        if bits is None:
            out[name] = dict(bits=None, data=t.detach().cpu().to(torch.float16 if t.ndim == 2 else torch.float32))
            continue
        qs = gptq_quantize(t.detach().to(H.device), H, bits, ratios, args.gptq_block_size, args.gptq_damp,
                           args.gptq_act_order) if H is not None else None
        q, scale = qs if qs is not None else quantize_per_row(t.detach(), bits, ratios)
        out[name] = dict(bits=bits, q=q.cpu(), scale=scale.cpu())
    return out


def prune_quantized(qstate: dict[str, dict], frac: float) -> dict[str, dict]:
    """Zero the `frac` smallest-magnitude (|q| x row scale) entries of every quantized matrix:
    zeros compress well. Returns a new state; the input is untouched."""
    if frac <= 0:
        return qstate
    out = dict(qstate)
    for name, e in qstate.items():
        if e["bits"]:
            mag = e["q"].abs().float() * e["scale"].float()[:, None]
            k = int(frac * mag.numel())
            if k > 0:
                thr = mag.flatten().kthvalue(k).values
                out[name] = dict(e, q=torch.where(mag <= thr, 0, e["q"]).to(torch.int8))
    return out


def dequantize_state_dict(qstate: dict[str, dict]) -> dict[str, Tensor]:
    return {name: (e["q"].float() * e["scale"].float()[:, None]) if e["bits"] else e["data"].float()
            for name, e in qstate.items()}


def shuffle_bytes(raw: bytes, itemsize: int) -> bytes:
    """Byte planes (all first bytes, then all second bytes, ...): exponent bytes compress well together."""
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize).T.tobytes() if itemsize > 1 else raw


def unshuffle_bytes(raw: bytes, itemsize: int) -> bytes:
    return np.frombuffer(raw, dtype=np.uint8).reshape(itemsize, -1).T.tobytes() if itemsize > 1 else raw


def serialize_quantized(qstate: dict[str, dict]) -> bytes:
    arrays = [(name, key, e[key]) for name, e in qstate.items() for key in (("q", "scale") if e["bits"] else ("data",))]
    arrays.sort(key=lambda a: (a[2].dtype.itemsize, a[1]))  # int8 weights, then fp16 scales, then the rest
    header, chunks, offset = {n: dict(bits=e["bits"], arrays={}) for n, e in qstate.items()}, [], 0
    for name, key, t in arrays:
        raw = shuffle_bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), t.dtype.itemsize)
        header[name]["arrays"][key] = dict(dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape),
                                           offset=offset, nbytes=len(raw))
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(dict(format=2, layout="grouped,byteshuffle", tensors=header), separators=(",", ":")).encode()
    return BLOB_MAGIC + struct.pack("<I", len(head)) + head + b"".join(chunks)


def deserialize_quantized(blob: bytes) -> dict[str, dict]:
    if blob[:4] != BLOB_MAGIC or len(blob) < 8:
        raise DataError("artifact payload has no valid header: not an artifact of this script")
    (hlen,) = struct.unpack("<I", blob[4:8])
    try:
        header = json.loads(blob[8:8 + hlen])
        payload, out = memoryview(blob)[8 + hlen:], {}
        for name, entry in header["tensors"].items():
            e = dict(bits=entry["bits"])
            for key, a in entry["arrays"].items():
                dtype, shape, off, n = DTYPES[a["dtype"]], [int(s) for s in a["shape"]], int(a["offset"]), int(a["nbytes"])
                if off < 0 or off + n > len(payload) or n != math.prod(shape) * dtype.itemsize:
                    raise DataError(f"tensor {name} extends past the payload or has a wrong size")
                raw = unshuffle_bytes(bytes(payload[off:off + n]), dtype.itemsize)
                e[key] = torch.frombuffer(bytearray(raw), dtype=dtype).view(shape)
            out[name] = e
        return out
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"artifact header is corrupt ({type(exc).__name__}: {exc})") from None


def _codecs():
    import lzma
    import zstandard
    codecs = {"zstd": (1, lambda b, lvl: zstandard.ZstdCompressor(level=lvl).compress(b),
                       lambda b: zstandard.ZstdDecompressor().decompress(b)),
              "lzma": (2, lambda b, lvl: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress)}
    try:
        import brotli
        codecs["brotli"] = (3, lambda b, lvl: brotli.compress(b, quality=11), brotli.decompress)
    except ImportError:
        pass
    return codecs


def compress_artifact(blob: bytes, compressor: str, level: int) -> bytes:
    """ARTIFACT_MAGIC + codec id + compressed blob; `auto` keeps the smallest of the available codecs."""
    codecs = _codecs()
    names = list(codecs) if compressor == "auto" else [compressor]
    if any(n not in codecs for n in names):
        raise ConfigError(f"COMPRESSOR={compressor} is not available (have: {', '.join(codecs)}, auto)")
    outs = [ARTIFACT_MAGIC + bytes([codecs[n][0]]) + codecs[n][1](blob, level) for n in names]
    return min(outs, key=len)


def decompress_artifact(data: bytes) -> bytes:
    if data[:4] != ARTIFACT_MAGIC or len(data) < 5:
        raise DataError("not an artifact of this script (bad magic)")
    codecs = {cid: (name, dec) for name, (cid, _, dec) in _codecs().items()}
    if data[4] not in codecs:
        raise DataError(f"artifact uses codec id {data[4]}, which is not installed or unknown")
    name, decompress = codecs[data[4]]
    try:
        return decompress(data[5:])
    except Exception as exc:  # each codec raises its own error type on bad input
        raise DataError(f"artifact is truncated or corrupt ({name}: {exc})") from None


def load_artifact(path, model: nn.Module) -> None:
    """Read, validate, dequantize and load an artifact into `model` (shapes must match)."""
    state = dequantize_state_dict(deserialize_quantized(decompress_artifact(Path(path).read_bytes())))
    expected = model.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
        raise DataError(f"{path}: tensors do not match this model's configuration")
    model.load_state_dict(state)


class ArtifactOverCap(Exception):
    pass


FIT_SEARCH_STEPS = 7  # bisection steps: the pruning found is within 1/128 of the range of the least that fits


def build_artifact(qstate: dict[str, dict], args, code_bytes: int, log) -> tuple[bytes, dict[str, dict]]:
    """Compress at PRUNE_FRAC; if code + artifact exceeds ARTIFACT_CAP, prune the least extra fraction
    that fits (bisection on the compressed size). Returns the artifact and the state it holds."""
    def make(frac):
        pruned = prune_quantized(qstate, frac)
        return compress_artifact(serialize_quantized(pruned), args.compressor, args.zstd_level), pruned
    data, state = make(args.prune_frac)
    if len(data) + code_bytes <= args.artifact_cap:
        return data, state
    log(f"fit_to_cap: {len(data) + code_bytes} bytes > ARTIFACT_CAP={args.artifact_cap} at prune_frac "
        f"{args.prune_frac}: searching the least pruning that fits")
    lo, hi = args.prune_frac, args.fit_max_prune_frac
    best = make(hi)
    if len(best[0]) + code_bytes > args.artifact_cap:
        raise ArtifactOverCap(f"even pruning {hi:.0%} of the quantized weights leaves {len(best[0]) + code_bytes} bytes")
    for _ in range(FIT_SEARCH_STEPS):
        mid = (lo + hi) / 2
        trial = make(mid)
        if len(trial[0]) + code_bytes <= args.artifact_cap:
            hi, best = mid, trial
        else:
            lo = mid
    log(f"fit_to_cap: pruned the smallest {hi:.4%} of quantized weights -> {len(best[0]) + code_bytes} bytes")
    return best


# -----------------------------------------------------------------------------
# TRAINING
# -----------------------------------------------------------------------------

def build_optimizers(model: GPT, args, fused: bool):
    embeds = [model.tok_emb.weight] + [m.embed.weight for m in (model.bigram, model.ve) if m is not None]
    matrices = [p for n, p in model.named_parameters()
                if p.ndim == 2 and not any(n.startswith(e) for e in EMBED_NAMES) and not n.startswith("lm_head")
                and not n.startswith("skip_weights") and not n.endswith("resid_mix")]
    taken = {id(p) for p in embeds + matrices} | ({id(model.lm_head.weight)} if model.lm_head is not None else set())
    scalars = [p for p in model.parameters() if id(p) not in taken]
    adam = lambda params, lr: torch.optim.AdamW([dict(params=params, lr=lr, base_lr=lr)], betas=(args.beta1, args.beta2),
                                                 eps=args.adam_eps, weight_decay=args.adam_wd, fused=fused)
    optimizers = [adam(embeds, args.tied_embed_lr if args.tie_embeddings else args.embed_lr), adam(scalars, args.scalar_lr)]
    if model.lm_head is not None:
        optimizers.append(adam([model.lm_head.weight], args.head_lr))
    muon = Muon(matrices, lr=args.matrix_lr, momentum=args.muon_momentum, backend_steps=args.muon_backend_steps,
                coeffs=[float(c) for c in args.muon_ns_coeffs.split(",")], weight_decay=args.muon_wd)
    for g in muon.param_groups:
        g["base_lr"] = args.matrix_lr
    return optimizers + [muon], muon


def lr_scale(args, step: int, elapsed_ms: float, cap_ms: float | None) -> float:
    """1 until the warmdown, then linear to 0 at ITERATIONS or, with a wallclock cap, at the cap
    (the warmdown length in time estimated from the mean step time so far)."""
    if args.warmdown_iters <= 0:
        return 1.0
    if cap_ms is None:
        return min(1.0, max(args.iterations - step, 0) / args.warmdown_iters)
    warmdown_ms = args.warmdown_iters * elapsed_ms / max(step, 1)
    return min(1.0, max(cap_ms - elapsed_ms, 0.0) / max(warmdown_ms, 1e-9))


class WeightAverager:
    """EMA in fp32 after every step; optional tight SWA of late (EMA) weights."""

    def __init__(self, model: nn.Module, args):
        self.args, self.model = args, model
        self.ema = {k: v.detach().float().clone() for k, v in model.state_dict().items()} if args.ema_enabled else None
        self.swa, self.swa_count = None, 0

    @torch.no_grad()
    def update(self, step: int, scale: float) -> None:
        state = self.model.state_dict()
        if self.ema is not None:
            torch._foreach_lerp_(list(self.ema.values()), [state[k].float() for k in self.ema], 1 - self.args.ema_decay)
        if self.args.swa_enabled and scale < self.args.swa_start_scale and step % self.args.swa_every == 0:
            src = self.ema if (self.ema is not None and self.args.swa_from_ema) else {k: v.float() for k, v in state.items()}
            if self.swa is None:
                self.swa = {k: v.clone() for k, v in src.items()}
            else:
                for k, v in src.items():
                    self.swa[k].add_(v)
            self.swa_count += 1

    def final(self) -> tuple[str, dict[str, Tensor]]:
        if self.swa is not None:
            return f"swa({self.swa_count}{',ema' if self.ema is not None and self.args.swa_from_ema else ''})", \
                {k: v / self.swa_count for k, v in self.swa.items()}
        if self.ema is not None:
            return "ema", self.ema
        return "raw", {k: v.detach().float().clone() for k, v in self.model.state_dict().items()}


class Logger:
    """Appends each line to logs/<RUN_ID>.txt at once (nothing lost on a crash); rank 0 only."""

    path: str | None = None

    def open(self, path: str | None) -> "Logger":
        self.path = path
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return self

    def __call__(self, msg: str, console: bool = True) -> None:
        if console and self.path:
            print(msg, flush=True)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                print(msg, file=f)


LOG = Logger()


def require_packages(args) -> None:
    for name in ("sentencepiece", "zstandard") + (("brotli",) if args.compressor == "brotli" else ()):
        try:
            __import__(name)
        except ImportError:
            raise SystemExit(f"error: the python package `{name}` is required: pip install -r requirements.txt")


def main() -> None:
    code = Path(__file__).read_text(encoding="utf-8")
    args = Hyperparameters()
    require_packages(args)
    import sentencepiece as spm

    # Distributed + device setup.
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    warnings = misspelt_env_warnings()
    if rank == 0:
        for w in warnings:
            print(w, file=sys.stderr)
    grad_accum_steps = args.grad_accum_steps or (8 // world_size if 8 % world_size == 0 else 1)
    validate_config(args, world_size, grad_accum_steps)
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    master = rank == 0
    log = LOG.open(f"logs/{args.run_id}.txt" if master else None)

    if SMOKE and "DATA_PATH" not in os.environ:
        # Built once per machine by rank 0, from text Python ships with; other ranks wait.
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
    if device.type == "cuda":
        log(subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=False).stdout, console=False)
        log(f"gpus:{world_size}x {torch.cuda.get_device_name(device)}")
    log("config " + json.dumps({k.lower(): getattr(args, k.lower()) for k in KNOWN_ENV}, sort_keys=True))
    for w in warnings:
        log(w, console=False)

    # Tokenizer and data checks, before any compute.
    if not os.path.isfile(args.tokenizer_path):
        raise FileNotFoundError(f"tokenizer {args.tokenizer_path} not found: set TOKENIZER_PATH or download the data")
    sp = spm.SentencePieceProcessor(model_file=args.tokenizer_path)
    if int(sp.vocab_size()) != args.vocab_size:
        raise ConfigError(f"VOCAB_SIZE={args.vocab_size} but {args.tokenizer_path} has {int(sp.vocab_size())} pieces")
    luts = build_sentencepiece_luts(sp, args.vocab_size, device)
    val_tokens = load_validation_tokens(args.val_files, args.vocab_size, args.eval_seq_len)
    log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={args.tokenizer_path}")
    if not args.eval_only:  # training and GPTQ calibration read training data
        train_loader = DistributedTokenLoader(args.train_files, args.vocab_size, rank, world_size, device)
        log(f"train_loader:dataset:{Path(args.data_path).name} train_shards:{len(train_loader.stream.files)}")
    log(f"val_loader:shards pattern={args.val_files} tokens:{val_tokens.numel() - 1}")

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    act_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base_model = GPT(args, act_dtype).to(device)
    qat_layers = prepare_qat(base_model, args) if args.late_qat_threshold > 0 else []
    backend = select_attention(args.attn_backend, device)
    compiled = torch.compile(base_model, dynamic=False, fullgraph=True) if device.type == "cuda" and args.compile else base_model
    model = DDP(compiled, device_ids=[local_rank] if device.type == "cuda" else None, broadcast_buffers=False) if distributed else compiled
    optimizers, muon = build_optimizers(base_model, args, fused=device.type == "cuda")

    n_params = sum(p.numel() for p in base_model.parameters())
    log(f"model_params:{n_params}")
    log(f"world_size:{world_size} grad_accum_steps:{grad_accum_steps}")
    log(f"attention_backend:{backend} compile:{compiled is not base_model} act_dtype:{str(act_dtype).removeprefix('torch.')}")
    log(f"attention_mode:gqa num_heads:{args.num_heads} num_kv_heads:{args.num_kv_heads}")
    log(f"tie_embeddings:{args.tie_embeddings} embed_lr:{args.tied_embed_lr if args.tie_embeddings else args.embed_lr} "
        f"head_lr:{args.head_lr if not args.tie_embeddings else 0.0} matrix_lr:{args.matrix_lr} scalar_lr:{args.scalar_lr}")
    log(f"train_batch_tokens:{args.train_batch_tokens} train_seq_len:{args.train_seq_len} iterations:{args.iterations} "
        f"warmup_steps:{args.warmup_steps} max_wallclock_seconds:{args.max_wallclock_seconds:.3f}")
    log(f"seed:{args.seed}")

    local_tokens = args.train_batch_tokens // (world_size * grad_accum_steps)

    def train_step(step: int, scale: float) -> Tensor:
        """One optimizer step over grad_accum_steps micro-batches; returns the mean loss (on device)."""
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for micro in range(grad_accum_steps):
            if distributed:
                model.require_backward_grad_sync = micro == grad_accum_steps - 1
            x, y = train_loader.next_batch(local_tokens, args.train_seq_len)
            with autocast_ctx(device):
                loss = model(x, y).mean()
            (loss / grad_accum_steps).backward()
            total += loss.detach() / grad_accum_steps
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
        return total

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def validate(stride) -> tuple[float, float]:
        return eval_val(args, compiled, val_tokens, luts, rank, world_size, device, args.eval_seq_len, stride)

    label = f"int{max(args.attn_bits, args.mlp_bits)}_{args.compressor}"  # names the final log lines
    if args.eval_only:
        load_artifact(args.eval_only, base_model)
        log(f"eval_only: {args.eval_only}")
        final_evaluation(label, validate, log, args, None)
        if distributed:
            dist.destroy_process_group()
        return
    if args.quant_only:
        try:
            base_model.load_state_dict(torch.load(args.quant_only, map_location=device, weights_only=True))
        except Exception as exc:
            raise DataError(f"QUANT_ONLY={args.quant_only} is not a checkpoint of this configuration: {exc}") from None
        source = f"checkpoint {args.quant_only}"
    else:
        # Warm-up: compile and prime every path, then restore the initial weights and optimizer state.
        if args.warmup_steps > 0:
            init_model = copy.deepcopy(base_model.state_dict())
            init_opts = [copy.deepcopy(o.state_dict()) for o in optimizers]
            for ws in range(args.warmup_steps):
                train_step(0, 1.0)
                log(f"warmup_step:{ws + 1}/{args.warmup_steps}")
            base_model.load_state_dict(init_model)
            for opt, st in zip(optimizers, init_opts):
                opt.load_state_dict(st)
            train_loader = DistributedTokenLoader(args.train_files, args.vocab_size, rank, world_size, device)
        averager = WeightAverager(base_model, args)
        reserve_s = args.gptq_reserve_seconds if args.quant_method == "gptq" else 0.0
        cap_ms = 1000 * (args.max_wallclock_seconds - reserve_s) if args.max_wallclock_seconds > 0 else None
        training_time_ms, stop_after_step, step, qat_on = 0.0, None, 0, False
        pending = None  # last step's [loss, reached_cap], read one step late so the host never stalls the GPU
        sync()
        t0 = time.perf_counter()
        while True:
            last_step = step == args.iterations or (stop_after_step is not None and step >= stop_after_step)
            if last_step or (args.val_loss_every > 0 and step % args.val_loss_every == 0):
                sync()
                training_time_ms += 1000 * (time.perf_counter() - t0)
                val_loss, val_bpb = validate(args.eval_seq_len)
                log(f"step:{step}/{args.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                    f"train_time:{training_time_ms:.0f}ms step_avg:{training_time_ms / max(step, 1):.2f}ms")
                sync()
                t0 = time.perf_counter()
            if last_step:
                if stop_after_step is not None and step < args.iterations:
                    log(f"stopping_early: wallclock_cap train_time:{training_time_ms:.0f}ms step:{step}/{args.iterations}")
                break
            elapsed_ms = training_time_ms + 1000 * (time.perf_counter() - t0)
            scale = lr_scale(args, step, elapsed_ms, cap_ms)
            loss = train_step(step, scale)
            if qat_layers and scale < args.late_qat_threshold:
                if not qat_on:
                    log(f"late_qat:enabled step:{step} lr_scale:{scale:.4f} layers:{len(qat_layers)}")
                    qat_on = True
                refresh_qat(qat_layers, clip_ratios(args))
            averager.update(step, scale)
            step += 1
            approx_ms = training_time_ms + 1000 * (time.perf_counter() - t0)
            flags = torch.stack((loss.float(), torch.tensor(float(cap_ms is not None and approx_ms >= cap_ms), device=device)))
            if distributed:
                dist.all_reduce(flags)  # a NaN on any rank reaches every rank, so all stop together
            if pending is not None:
                stop_after_step = check_step(step - 1, pending, step, stop_after_step, log)
            pending = flags
            if step <= 10 or step % args.train_log_every == 0 or stop_after_step is not None:
                train_loss = flags[0].item() / world_size
                remaining = f" remaining:{max(cap_ms - approx_ms, 0) / 1000:.0f}s" if cap_ms is not None else ""
                log(f"step:{step}/{args.iterations} train_loss:{train_loss:.4f} train_time:{approx_ms:.0f}ms "
                    f"step_avg:{approx_ms / step:.2f}ms{remaining}")
        if pending is not None:
            check_step(step, pending, step, stop_after_step, log)
        if device.type == "cuda":
            log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
        source, averaged = averager.final()
        base_model.load_state_dict(averaged)
    for m in qat_layers:  # the exported weights are evaluated as they are, without the QAT delta
        m.qat_delta.zero_()

    t = time.perf_counter()
    val_loss, val_bpb = validate(args.eval_seq_len)
    log(f"final_weights:{source} pre_quant val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
        f"eval_time:{1000 * (time.perf_counter() - t):.0f}ms")
    if master and not args.quant_only:
        torch.save(base_model.state_dict(), "final_model.pt")
        log(f"Serialized model: {os.path.getsize('final_model.pt')} bytes")

    # Quantize (GPTQ calibration counts as training time: it reads training data), compress, fit.
    t = time.perf_counter()
    hessians = None
    if args.quant_method == "gptq":
        batches = (train_loader.next_batch(local_tokens, args.train_seq_len)[0] for _ in range(args.gptq_calib_batches))
        hessians = collect_hessians(base_model, batches, args, device, world_size)
    qstate = quantize_state_dict(base_model.state_dict(), args, hessians)
    quant_s = time.perf_counter() - t
    over = hessians is not None and args.max_wallclock_seconds > 0 and quant_s > args.gptq_reserve_seconds
    log(f"quantize:{args.quant_method} time:{quant_s:.1f}s reserve:{args.gptq_reserve_seconds:.0f}s"
        + (" WARNING: over the reserve, training + calibration exceeded the cap: raise GPTQ_RESERVE_SECONDS" if over else ""))
    code_bytes = len(code.encode("utf-8"))
    artifact = f"final_model.{label.split('_')[0]}.ptz"
    try:
        data, final_state = build_artifact(qstate, args, code_bytes, log)
    except ArtifactOverCap as exc:
        log(f"error: artifact over the cap: {exc} > ARTIFACT_CAP={args.artifact_cap}. final_model.pt is kept; "
            "shrink the model, lower ATTN_BITS/MLP_BITS/EMBED_BITS, or re-quantize with QUANT_ONLY=final_model.pt.")
        raise SystemExit(3)
    if master:
        Path(artifact).write_bytes(data)
    log(f"Serialized model {label.replace('_', '+')}: {len(data)} bytes")
    log(f"Code size: {code_bytes} bytes")
    log(f"Total submission size {label.replace('_', '+')}: {len(data) + code_bytes} bytes")
    if final_state is not qstate:  # fit-to-cap pruned: measure what it cost
        base_model.load_state_dict(dequantize_state_dict(qstate))
        _, unpruned_bpb = validate(args.eval_seq_len)
        log(f"fit_to_cap: round-trip val_bpb before pruning {unpruned_bpb:.4f}")
    if distributed:
        dist.barrier()
    load_artifact(artifact, base_model)  # score exactly what was written
    final_evaluation(label, validate, log, args, val_bpb)
    if distributed:
        dist.destroy_process_group()


def final_evaluation(label: str, validate, log, args, pre_quant_bpb: float | None) -> None:
    """Score the loaded (round-tripped) model: plain, then sliding windows. The greppable final lines."""
    for name, stride in (("roundtrip", args.eval_seq_len), ("sliding_window", args.eval_stride)):
        t = time.perf_counter()
        loss, bpb = validate(stride)
        log(f"final_{label}_{name} val_loss:{loss:.4f} val_bpb:{bpb:.4f} stride:{stride} "
            f"eval_time:{1000 * (time.perf_counter() - t):.0f}ms")
        log(f"final_{label}_{name}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
        if name == "roundtrip" and pre_quant_bpb is not None:
            log(f"quant_gap val_bpb:{bpb - pre_quant_bpb:+.5f}")
    log("final_eval:done")  # a run killed during its last evaluation lacks this line


def check_step(done_step: int, flags: Tensor, step: int, stop_after_step, log):
    """Act on a finished step's [loss sum, reached-cap count]: stop on a non-finite loss, note the cap."""
    loss, capped = flags.tolist()
    if not math.isfinite(loss):
        log(f"error: non-finite training loss ({loss}) at step {done_step}: the run is stopped. "
            "Lower the learning rates (MATRIX_LR, SCALAR_LR, TIED_EMBED_LR) or check the data.")
        raise SystemExit(4)
    return step if capped and stop_after_step is None else stop_after_step


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, FileNotFoundError) as e:
        LOG(f"error: {e}", console=False)
        sys.exit(f"error: {e}")
