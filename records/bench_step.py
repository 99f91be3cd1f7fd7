"""Training-step throughput of train_gpt.py: ms/step, tokens/s, model FLOPs per token, MFU against a
measured matmul peak, peak memory, a per-phase breakdown, and the time of the sliding evaluation
and of the export.

    [env overrides] torchrun --standalone --nproc_per_node=N records/bench_step.py [--steps 100]
    [env overrides] python3 records/bench_step.py --steps 20 --warmup 3      # one process, any device

It builds train_gpt.py's own model, optimizers, loader and step from the same env vars (the default
8xH100 configuration unless overridden; DATA_PATH must hold training and validation shards), so a
setting that speeds this up speeds training up. Measured, in order:
  1. steady state: --steps steps exactly as training runs them (no host sync inside a step) after
     --warmup steps (compilation); ms/step, tokens/s (all ranks), MFU, peak memory;
  2. phases, each followed by a sync: loading one batch, forward+backward (with DDP's overlapped
     gradient all-reduce), the same all-reduce alone (distributed only: what overlap can hide),
     the optimizer step (Muon's own all-reduce included);
  3. the sliding-window evaluation of --eval-tokens validation tokens at EVAL_STRIDE, extrapolated
     to --val-total tokens (the challenge's 62M) on 8 GPUs;
  4. the export: GPTQ Hessians (GPTQ_CALIB_BATCHES), quantization, compression of the weights as
     they are after the timed steps.
MFU = model FLOPs per token (6 x matmul weights a token passes through, plus causal attention) x
tokens/s / (ranks x peak), the peak being a large bf16 matmul measured on this GPU (fp32 on CPU).
--json writes every figure to a file.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def model_flops_per_token(model: tg.GPT, args) -> dict[str, float]:
    """Training FLOPs per token: forward + backward = 3 x forward. Every CastedLinear weight and the
    tied head cost 2 FLOPs per weight forward; causal attention 4 x model_dim x (seq_len / 2) per layer."""
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, tg.CastedLinear))
    if model.lm_head is None:
        matmul += model.tok_emb.weight.numel()
    attention = 4 * args.model_dim * (args.train_seq_len / 2) * args.num_layers
    return {"matmul": 6.0 * matmul, "attention": 3.0 * attention, "total": 6.0 * matmul + 3.0 * attention}


def measure_peak_flops(device) -> float:
    """Sustained FLOP/s of a large square matmul: bf16 on CUDA, fp32 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps, t = 20 if device.type == "cuda" else 5, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int) -> float:
    """Mean seconds of fn() over reps calls, synced before and after each."""
    total = 0.0
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        total += time.perf_counter() - t
    return total / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation)")
    ap.add_argument("--phase-reps", type=int, default=5)
    ap.add_argument("--eval-tokens", type=int, default=1 << 20, help="validation tokens for the sliding timing (0: skip)")
    ap.add_argument("--val-total", type=int, default=62_021_632, help="tokens the evaluation time is extrapolated to")
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--json")
    opts = ap.parse_args()

    args = tg.Hyperparameters()
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    grad_accum = args.grad_accum_steps or (8 // world if 8 % world == 0 else 1)
    tg.validate_config(args, world, grad_accum)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(args.seed)
    act_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = tg.GPT(args, act_dtype).to(device)
    qat_layers = tg.prepare_qat(base, args) if args.late_qat_threshold > 0 else []
    backend = tg.select_attention(args.attn_backend, device)
    compiled = torch.compile(base, dynamic=False, fullgraph=True) if device.type == "cuda" and args.compile else base
    model = DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False) if distributed else compiled
    optimizers, muon = tg.build_optimizers(base, args, fused=device.type == "cuda")
    loader = tg.DistributedTokenLoader(args.train_files, args.vocab_size, rank, world, device)
    local_tokens = args.train_batch_tokens // (world * grad_accum)

    def step(i: int) -> torch.Tensor:
        loss = tg.forward_backward(model, loader, args, grad_accum, local_tokens, device)
        tg.optimizer_step(base, optimizers, muon, args, i, 1.0)
        if qat_layers:  # the late-QAT refresh runs after every step once enabled: time the worst case
            tg.refresh_qat(qat_layers, tg.clip_ratios(args))
        return loss

    t = time.perf_counter()
    for i in range(opts.warmup):
        step(i)
    sync(device)
    warmup_s = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for i in range(opts.steps):
        loss = step(opts.warmup + i)
    sync(device)
    step_s = (time.perf_counter() - t) / max(opts.steps, 1)
    flops = model_flops_per_token(base, args)
    peak = measure_peak_flops(device)
    tokens_per_s = args.train_batch_tokens / step_s
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "world_size": world,
        "torch": torch.__version__, "attention_backend": backend, "compile": compiled is not base,
        "train_batch_tokens": args.train_batch_tokens, "train_seq_len": args.train_seq_len,
        "num_layers": args.num_layers, "model_dim": args.model_dim, "params": sum(p.numel() for p in base.parameters()),
        "warmup_steps": opts.warmup, "warmup_s": warmup_s, "steps": opts.steps, "ms_per_step": 1000 * step_s,
        "tokens_per_s": tokens_per_s, "tokens_per_s_per_rank": tokens_per_s / world,
        "model_flops_per_token": flops["total"], "attention_flops_share": flops["attention"] / flops["total"],
        "peak_flops_per_rank": peak, "mfu": flops["total"] * tokens_per_s / (world * peak),
        "final_train_loss": float(loss),
    }
    if device.type == "cuda":
        out["peak_mem_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["peak_mem_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20

    # Phases, each on its own with a sync around it.
    reps = opts.phase_reps
    out["phase_ms"] = phases = {}
    phases["load one micro-batch"] = 1000 * timed(lambda: loader.next_batch(local_tokens, args.train_seq_len), device, reps)
    phases["forward+backward (all micro-batches)"] = 1000 * timed(
        lambda: tg.forward_backward(model, loader, args, grad_accum, local_tokens, device), device, reps)
    if distributed:
        grads = [p.grad for p in base.parameters() if p.grad is not None]
        phases["gradient all-reduce alone"] = 1000 * timed(lambda: [dist.all_reduce(g) for g in grads], device, reps)
    phases["optimizer (clip, Muon incl. its all-reduce, Adam)"] = 1000 * optimizer_time(
        base, optimizers, muon, args, model, loader, grad_accum, local_tokens, device, reps)

    if opts.eval_tokens:
        val = tg.load_validation_tokens(args.val_files, args.vocab_size)[:opts.eval_tokens + 1]
        head = val[:2 * args.eval_seq_len + 1]  # compile the evaluation graph first (same padded batch shape)
        ev = tg.Evaluation(args, compiled, base, device, rank, world)
        tg.eval_windows(ev, head, tg.ScoreSheet(head.numel() - 1, device), args.eval_stride)
        sheet = tg.ScoreSheet(val.numel() - 1, device)
        sync(device)
        t = time.perf_counter()
        tg.eval_windows(ev, val, sheet, args.eval_stride)
        sync(device)
        eval_s = time.perf_counter() - t
        out["sliding_eval_s"] = eval_s
        out["sliding_eval_tokens"] = val.numel() - 1
        # Every rank scored its share of these tokens; at the same per-rank rate on 8 ranks:
        out["sliding_eval_extrapolated_s_8ranks"] = eval_s * world * opts.val_total / (8 * (val.numel() - 1))

    if not opts.no_export:
        batches = [loader.next_batch(local_tokens, args.train_seq_len)[0] for _ in range(args.gptq_calib_batches)]
        t = time.perf_counter()
        hessians = tg.collect_hessians(base, iter(batches), args, device, world) if args.quant_method == "gptq" else None
        sync(device)
        out["export_hessians_s"] = time.perf_counter() - t
        t = time.perf_counter()
        qstate = tg.quantize_state_dict(base.state_dict(), args, hessians)
        out["export_quantize_s"] = time.perf_counter() - t
        t = time.perf_counter()
        blob = tg.compress_artifact(tg.serialize_quantized(qstate), args.compressor, args.zstd_level)
        out["export_compress_s"] = time.perf_counter() - t
        out["export_bytes"] = len(blob)

    if rank == 0:
        print(f"| {out['device']} x{world} | {backend} | {out['ms_per_step']:.1f} ms/step | "
              f"{tokens_per_s / 1e6:.3f}M tok/s ({tokens_per_s / world / 1e6:.3f}M per rank) | "
              f"MFU {100 * out['mfu']:.1f}% | {flops['total'] / 1e6:.1f} MFLOP/token |")
        for name, ms in phases.items():
            print(f"  {name}: {ms:.1f} ms")
        for key, value in out.items():
            if key != "phase_ms":
                print(f"  {key}: {value:.6g}" if isinstance(value, float) else f"  {key}: {value}")
        if opts.json:
            Path(opts.json).write_text(json.dumps(out, indent=1) + "\n")
    if distributed:
        dist.destroy_process_group()


def optimizer_time(base, optimizers, muon, args, model, loader, grad_accum, local_tokens, device, reps) -> float:
    """Mean seconds of the optimizer step alone, fresh gradients computed (untimed) before each."""
    total = 0.0
    for i in range(reps):
        tg.forward_backward(model, loader, args, grad_accum, local_tokens, device)
        sync(device)
        t = time.perf_counter()
        tg.optimizer_step(base, optimizers, muon, args, 10_000 + i, 1.0)
        sync(device)
        total += time.perf_counter() - t
    return total / max(reps, 1)


if __name__ == "__main__":
    main()
