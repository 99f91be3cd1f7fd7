"""Quantization benchmark: export ONE fp32 checkpoint through several quantization settings and
compare compressed bytes and round-trip val_bpb, in one process (one pre-quant evaluation).

    [model-shape env vars as in training] python3 records/bench_quant.py final_model.pt [VAL_TOKENS [FILTER]]

Hessians for GPTQ come from the training shards (DATA_PATH), as in train_gpt.py. Validation is the
first VAL_TOKENS tokens (default 100,000) of the val split, scored with plain windows of EVAL_SEQ_LEN.
Block matrices narrower than the script's 65,536-element "small tensor" rule are forced into the
quantized set, so that small CPU models exercise the same code as the 8xH100 one.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

MATS = r"\.(c_q|c_k|c_v|proj|fc)\.weight$"
VARIANTS = {  # name: (QUANT_METHOD, QUANT_CLIP_RATIOS or None for the default search, overrides, PRUNE_FRAC)
    "rtn int6 (max scaling)": ("rtn", "1.0", f"{MATS}:6", 0.0),
    "rtn int6 + clip search": ("rtn", None, f"{MATS}:6", 0.0),
    "gptq int6": ("gptq", None, f"{MATS}:6", 0.0),
    "gptq int5 MLP / int6 attn": ("gptq", None, rf"{MATS}:6,mlp\.(fc|proj)\.weight$:5", 0.0),
    "rtn int5 MLP / int6 attn + clip search": ("rtn", None, rf"{MATS}:6,mlp\.(fc|proj)\.weight$:5", 0.0),
    "gptq int6, PRUNE_FRAC=0.05": ("gptq", None, f"{MATS}:6", 0.05),
    # int4 stresses the rounding method where int6 on a briefly trained model cannot tell them apart.
    "rtn int4 (max scaling)": ("rtn", "1.0", f"{MATS}:4", 0.0),
    "rtn int4 + clip search": ("rtn", None, f"{MATS}:4", 0.0),
    "gptq int4": ("gptq", None, f"{MATS}:4", 0.0),
}


def main():
    args = tg.Hyperparameters()
    checkpoint, val_tokens_n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    only = sys.argv[3] if len(sys.argv) > 3 else ""  # run only the variants whose name contains this
    device = torch.device("cpu")
    luts = tg.load_tokenizer_tables(args, device, print)  # tables, or a CaseOps byte sidecar
    val = tg.load_validation_tokens(args.val_files, args.vocab_size, args.eval_seq_len)[:val_tokens_n + 1]
    luts = luts[:val.numel()] if isinstance(luts, torch.Tensor) else luts
    model = tg.GPT(args)
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    model.load_state_dict(state)

    def score():
        return tg.run_eval_mode(tg.Evaluation(args, model, model, device), "roundtrip", val).result(val, luts)[1]

    base_bpb = score()
    loader = tg.DistributedTokenLoader(args.train_files, args.vocab_size, 0, 1, device)
    batches = [loader.next_batch(args.train_batch_tokens // 8, args.train_seq_len)[0] for _ in range(args.gptq_calib_batches)]
    print(f"checkpoint {checkpoint}: pre-quant val_bpb {base_bpb:.4f} on {val_tokens_n:,} val tokens")
    print("| export | model bytes (zstd-22) | round-trip val_bpb | gap | quantize time |")
    print("|---|---:|---:|---:|---:|")
    hessians = None
    for name, (method, ratios, overrides, prune) in VARIANTS.items():
        if only not in name:
            continue
        args.quant_method, args.quant_overrides, args.prune_frac = method, overrides, prune
        args.quant_clip_ratios = ratios or tg.KNOWN_ENV["QUANT_CLIP_RATIOS"]
        t = time.perf_counter()
        if method == "gptq" and hessians is None:
            hessians = tg.collect_hessians(model, batches, args, device, 1)
        qstate = tg.prune_quantized(tg.quantize_state_dict(state, args, hessians if method == "gptq" else None), prune)
        seconds = time.perf_counter() - t
        size = len(tg.compress_artifact(tg.serialize_quantized(qstate), "zstd", args.zstd_level))
        model.load_state_dict(tg.dequantize_state_dict(qstate))
        bpb = score()
        print(f"| {name} | {size:,} | {bpb:.4f} | {bpb - base_bpb:+.4f} | {seconds:.1f} s |", flush=True)
        model.load_state_dict(state)


if __name__ == "__main__":
    main()
