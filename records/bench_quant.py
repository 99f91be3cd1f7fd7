"""Quantization benchmark: export ONE fp32 checkpoint through several quantization settings and
compare compressed bytes and round-trip val_bpb, in one process (one pre-quant evaluation).

    [model-shape env vars as in training] python3 records/bench_quant.py final_model.pt [VAL_TOKENS [FILTER]]

FILTER (a substring of the row names, default all) picks rows: "gptq int" gives the issue-15 grid, "rtn" the
round-to-nearest rows of issue 3, "int5" one bit width of both. Hessians for GPTQ come once from the
training shards (DATA_PATH), as in train_gpt.py; each row is scored after a true round trip through its
compressed bytes. Validation is the first VAL_TOKENS tokens (default 100,000) of the val split, scored with
plain windows of EVAL_SEQ_LEN. Block matrices narrower than the script's 65,536-element "small tensor" rule
are forced into the quantized set, so that small CPU models exercise the same code as the 8xH100 one.

The issue-15 grid: at each width, today's export (gptq + clip search, zstd) and that export + SDClip per
class (k from the records: attention 13.0, MLP 11.5 for int6, embedding 20.0 for int8), + LQER (rank 4 on the top 3 tensors, int4 factors), + the pergroup codec (bytes only: the
weights of today's row), and all of them. SDClip "k scaled" keeps the records' int6 grid step k*std/31:
k_b = k * (2^(b-1) - 1) / 31 at b bits; "k kept" uses the records' k at every width. A second table gives
each row's Hessian-weighted reconstruction error per tensor class, sum tr(E H E^T) / sum tr(W H W^T) with
E = W - W_hat, on the same calibration Hessians (the embedding's: the tied head's inputs, collected for this
table only; the exports keep the EMBED_GPTQ setting).
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

MATS = r"\.(c_q|c_k|c_v|proj|fc)\.weight$"
GRIDS = {  # name: (QUANT_OVERRIDES, attention bits, MLP bits)
    "int4": (f"{MATS}:4", 4, 4),
    "int5 MLP / int6 attn": (rf"{MATS}:6,mlp\.(fc|proj)\.weight$:5", 6, 5),
    "int6": (f"{MATS}:6", 6, 6),
}


def sdclip(attn_bits, mlp_bits, scaled):
    k = lambda k6, bits: k6 * (2 ** (bits - 1) - 1) / 31 if scaled else k6  # noqa: E731
    return dict(attn_clip_sigmas=k(13.0, attn_bits), mlp_clip_sigmas=k(11.5, mlp_bits), embed_clip_sigmas=20.0)


LQER, PERGROUP = dict(lqer_rank=4, lqer_top_k=3, lqer_bits=4), dict(compressor="pergroup")
INT4, INT5, INT6 = (overrides for overrides, _, _ in GRIDS.values())
VARIANTS = {  # name: Hyperparameters attributes that differ from the defaults (zstd, clip search)
    "rtn int6 (max scaling)": dict(quant_method="rtn", quant_clip_ratios="1.0", quant_overrides=INT6),
    "rtn int6 + clip search": dict(quant_method="rtn", quant_overrides=INT6),
    "rtn int5 MLP / int6 attn + clip search": dict(quant_method="rtn", quant_overrides=INT5),
    # int4 stresses the rounding method where int6 on a briefly trained model cannot tell them apart.
    "rtn int4 (max scaling)": dict(quant_method="rtn", quant_clip_ratios="1.0", quant_overrides=INT4),
    "rtn int4 + clip search": dict(quant_method="rtn", quant_overrides=INT4),
    "int6 gptq, PRUNE_FRAC=0.05": dict(quant_method="gptq", quant_overrides=INT6, prune_frac=0.05),
}
for grid, (overrides, ab, mb) in GRIDS.items():
    rows = {"": {}, " + SDClip (k scaled)": sdclip(ab, mb, True), " + SDClip (k kept)": sdclip(ab, mb, False),
            " + LQER r4 top3 int4": LQER, " + pergroup codec": PERGROUP,
            " + all (SDClip k scaled, LQER, pergroup)": sdclip(ab, mb, True) | LQER | PERGROUP}
    if (ab, mb) == (6, 6):
        rows = {n.replace(" (k scaled)", ""): s for n, s in rows.items() if "k kept" not in n}
    VARIANTS |= {f"gptq {grid}{n}": dict(quant_method="gptq", quant_overrides=overrides) | s for n, s in rows.items()}
# SDClip on the matrices alone (embeddings keep the search) at smaller k: where does it keep today's gap?
VARIANTS |= {f"sweep: gptq int5 MLP / int6 attn + SDClip k={k} on the matrices": dict(
    quant_method="gptq", quant_overrides=INT5, attn_clip_sigmas=k, mlp_clip_sigmas=k) for k in (3.0, 4.0, 5.0, 6.0)}
VARIANTS["sweep: gptq int5 MLP / int6 attn + LQER r4 top3 int4 + pergroup codec"] = dict(
    quant_method="gptq", quant_overrides=INT5) | LQER | PERGROUP


def relative_errors(state, restored, hessians):
    """Per class: sum tr(E H E^T) / sum tr(W H W^T) over the tensors with a Hessian."""
    num, den = {}, {}
    for key, H in hessians.items():
        name, H = key + ".weight", H.float().cpu()
        W, E = state[name].float(), state[name].float() - restored[name].float()
        c = tg.tensor_class(name)
        num[c] = num.get(c, 0.0) + float(((E @ H) * E).sum())
        den[c] = den.get(c, 0.0) + float(((W @ H) * W).sum())
    return {c: num[c] / den[c] for c in num}


def main():
    args = tg.Hyperparameters()
    args.val_batch_size = min(args.val_batch_size, 64 * args.eval_seq_len)  # a padded batch is scored in full
    checkpoint, val_tokens_n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    only = sys.argv[3] if len(sys.argv) > 3 else ""  # run only the variants whose name contains this
    device = torch.device("cpu")
    luts = tg.load_tokenizer_tables(args, device, print)  # tables, or a CaseOps byte sidecar
    val = tg.load_validation_tokens(args.val_files, args.vocab_size)[:val_tokens_n + 1]
    luts = luts[:val.numel()] if isinstance(luts, torch.Tensor) else luts
    model = tg.GPT(args)
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    model.load_state_dict(state)

    def score():
        return tg.run_eval_mode(tg.Evaluation(args, model, model, device), "roundtrip", val).result(val, luts)[1]

    base_bpb = score()
    loader = tg.DistributedTokenLoader(args.train_files, args.vocab_size, 0, 1, device)
    batches = [loader.next_batch(args.train_batch_tokens // 8, args.train_seq_len)[0] for _ in range(args.gptq_calib_batches)]
    keys = {k for settings in VARIANTS.values() for k in settings}
    defaults = {k: getattr(args, k) for k in keys}
    t, embed_gptq = time.perf_counter(), args.embed_gptq
    args.quant_overrides, args.embed_gptq = INT6, True  # every block matrix, and the tied head
    hessians = tg.collect_hessians(model, batches, args, device, 1)
    gptq_hessians = {k: H for k, H in hessians.items() if k != "tok_emb" or embed_gptq}  # as train_gpt.py
    print(f"checkpoint {checkpoint}: pre-quant val_bpb {base_bpb:.4f} on {val_tokens_n:,} val tokens; "
          f"Hessians of {len(hessians)} tensors in {time.perf_counter() - t:.1f} s")
    print("| export | model bytes | round-trip val_bpb | gap | quantize time |")
    print("|---|---:|---:|---:|---:|")
    done, errors = {}, {}  # quantized once per weight setting (a codec row reuses its weights)
    for name, settings in VARIANTS.items():
        if only not in name:
            continue
        for k in keys:
            setattr(args, k, settings.get(k, defaults[k]))
        weights = tuple(sorted((k, str(v)) for k, v in settings.items() if k != "compressor"))
        if weights not in done:
            t = time.perf_counter()
            qstate = tg.quantize_state_dict(state, args, gptq_hessians if args.quant_method == "gptq" else None)
            done[weights] = [tg.prune_quantized(qstate, args.prune_frac), time.perf_counter() - t, None]
        qstate, seconds, bpb = done[weights]
        blob = tg.compress_artifact(tg.serialize_quantized(qstate), args.compressor, args.zstd_level)
        if bpb is None:
            restored = tg.dequantize_state_dict(tg.deserialize_quantized(tg.decompress_artifact(blob)))
            model.load_state_dict(restored)
            done[weights][2] = bpb = score()
            errors[name] = relative_errors(state, restored, hessians)
            model.load_state_dict(state)
        note = "" if name in errors else " (weights above)"
        print(f"| {name} | {len(blob):,} | {bpb:.4f}{note} | {bpb - base_bpb:+.5f} | {seconds:.1f} s |", flush=True)
    print("\nHessian-weighted relative error sum tr(E H E^T) / sum tr(W H W^T), E = W - W_hat:\n")
    print("| export | attn | mlp | embed |\n|---|---:|---:|---:|")
    for name, err in errors.items():
        print(f"| {name} | " + " | ".join(f"{err.get(c, float('nan')):.3e}" for c in ("attn", "mlp", "embed")) + " |")


if __name__ == "__main__":
    main()
