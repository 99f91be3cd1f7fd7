"""Evaluation methods side by side on ONE checkpoint: val_bpb and wall time of each network mode
of FINAL_EVAL, alone and with the online n-gram mixture (the mixture reuses the mode's scores, so
each network mode runs once).

    [the run's shape env + evaluation env] python3 records/bench_eval.py final_model.pt \\
        [--modes roundtrip,sliding_window,ttt,lora] [--val-tokens N] [--audit]

The checkpoint is a final_model.pt or a final_model.*.ptz artifact. Every model and evaluation
setting (TTT_*, NGRAM_*, EVAL_*) comes from the same env vars as train_gpt.py. One process, on
CUDA when available (eager: the numbers are for comparing methods, not for timing the compiled
8-GPU evaluation). --audit first runs each mode's causality audit, as a final evaluation does.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--modes", default=",".join(tg.NETWORK_MODES))
    ap.add_argument("--val-tokens", type=int, default=0, help="score only the first N targets (0: all)")
    ap.add_argument("--no-ngram", action="store_true", help="skip the +ngram column")
    ap.add_argument("--audit", action="store_true", help="audit every mode (alone and +ngram) first")
    opts = ap.parse_args()
    args = tg.Hyperparameters()
    tg.validate_config(args, 1, max(args.grad_accum_steps, 1))
    modes = [m.strip() for m in opts.modes.split(",") if m.strip()]
    if any(m not in tg.NETWORK_MODES for m in modes):
        sys.exit(f"--modes: each of {modes} must be one of {tg.NETWORK_MODES}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    luts = tg.load_tokenizer_tables(args, device, print)  # tables, or a CaseOps byte sidecar
    val = tg.load_validation_tokens(args.val_files, args.vocab_size)
    if opts.val_tokens:
        val = val[:opts.val_tokens + 1]
        luts = luts[:val.numel()] if isinstance(luts, torch.Tensor) else luts
    model = tg.GPT(args, torch.bfloat16 if device.type == "cuda" else torch.float32).to(device)
    if opts.checkpoint.endswith(".ptz"):
        tg.load_artifact(opts.checkpoint, model)
    else:
        model.load_state_dict(torch.load(opts.checkpoint, map_location=device, weights_only=True))

    def log(msg, console=True):
        print(msg, file=sys.stderr, flush=True)

    ev = tg.Evaluation(args, model, model, device, log=log)

    if opts.audit:
        for mode in modes + ([] if opts.no_ngram else [m + "+ngram" for m in modes]):
            tg.audit_eval_mode(mode, lambda toks: tg.run_eval_mode(ev, mode, toks, audit=True), args, log)
    print(f"checkpoint {opts.checkpoint}, {val.numel() - 1:,} targets, device {device.type}")
    print("| mode | val_bpb | time | +ngram val_bpb | +ngram time (mixture only) |")
    print("|---|---:|---:|---:|---:|")
    for mode in modes:
        t = time.perf_counter()
        sheet = tg.run_eval_mode(ev, mode, val)
        net_s = time.perf_counter() - t
        _, bpb = sheet.result(val, luts)
        mixed = ""
        if not opts.no_ngram:
            t = time.perf_counter()
            tg.ngram_mix(ev, sheet, val)
            mixed = f" {sheet.result(val, luts)[1]:.4f} | {time.perf_counter() - t:.1f} s |"
        print(f"| {mode} | {bpb:.4f} | {net_s:.1f} s |{mixed or ' | |'}", flush=True)


if __name__ == "__main__":
    main()
