"""Evaluation methods side by side on ONE checkpoint: val_bpb and wall time of each network mode
of FINAL_EVAL, alone and with the online n-gram mixture (the mixture reuses the mode's scores, so
each network mode runs once), and the evaluation time each would take on the full validation set.

    [the run's shape env + evaluation env] python3 records/bench_eval.py final_model.pt \\
        [--modes roundtrip,sliding_window,lora,phased+tilt] [--val-tokens N] [--audit] [--scores DIR] \\
        [--project-tokens 62021632] [--project-gpus 8]

The checkpoint is a final_model.pt or a final_model.*.ptz artifact. Every model and evaluation
setting (TTT_*, NGRAM_*, TILT_*, EVAL_*) comes from the same env vars as train_gpt.py, except that
TTT_MAX_SECONDS is 0 unless set (on a slow device the budget would stop adaptation early). One process, on
CUDA when available (eager: the numbers are for comparing methods, not for timing the compiled
8-GPU evaluation). --audit first runs each mode's causality audit, as a final evaluation does.
The projection: each mode's (and each mixture's) seconds per scored target on THIS device, times
--project-tokens (the challenge's validation targets) / --project-gpus (ranks split the targets
evenly), against the 600 s evaluation budget; audits count as measured (fixed-size streams). A rank
of G runs batches of VAL_BATCH_SIZE / G tokens: set VAL_BATCH_SIZE to that here for its batch shape,
and score enough targets to fill many batches (the last one is padded: a warning says when it counts).
"""
import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--modes", default=",".join(tg.NETWORK_MODES), help="FINAL_EVAL modes (MODE[+tilt][+ngram])")
    ap.add_argument("--val-tokens", type=int, default=0, help="score only the first N targets (0: all)")
    ap.add_argument("--no-ngram", action="store_true", help="skip the +ngram column")
    ap.add_argument("--audit", action="store_true", help="audit every mode (alone and +ngram) first")
    ap.add_argument("--scores", metavar="DIR", help="keep each mode's network scores in DIR/CHECKPOINT.MODE.TARGETS.KEY.pt "
                    "(KEY: the checkpoint's bytes and every setting but NGRAM_*, FINAL_EVAL, RUN_ID), reused when there "
                    "(for the mixture's settings on a slow mode's scores; the time column is then 0)")
    ap.add_argument("--project-tokens", type=int, default=62_021_632, help="targets the time is projected to")
    ap.add_argument("--project-gpus", type=int, default=8, help="ranks the projected targets are split over")
    opts = ap.parse_args()
    args = tg.Hyperparameters()
    args.final_eval = opts.modes  # checked as FINAL_EVAL is
    if "TTT_MAX_SECONDS" not in os.environ:  # a mode's score, not where a slow device's clock stopped it
        args.ttt_max_seconds = 0.0
    tg.validate_config(args, 1, max(args.grad_accum_steps, 1))
    modes = tg.final_modes(args)
    if opts.project_tokens < 1 or opts.project_gpus < 1:
        sys.exit("--project-tokens and --project-gpus must be >= 1")
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

    def clock():
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    audit_s = {}
    if opts.audit:
        for mode in modes + ([] if opts.no_ngram else [m + "+ngram" for m in modes if "ngram" not in m]):
            t = clock()
            tg.audit_eval_mode(mode, lambda toks: tg.run_eval_mode(ev, mode, toks, audit=True), args, log)
            audit_s[mode] = clock() - t
    n = val.numel() - 1
    key = hashlib.sha256(Path(opts.checkpoint).read_bytes())  # what the network scores depend on
    settings = {k: v for k, v in tg.config_dict(args).items() if not k.startswith(("ngram_", "final_eval", "run_id"))}
    key.update(json.dumps(settings, sort_keys=True, default=str).encode())
    print(f"checkpoint {opts.checkpoint}, {n:,} targets, device {device.type}")
    print("| mode | val_bpb | time | +ngram val_bpb | +ngram time (mixture only) |")
    print("|---|---:|---:|---:|---:|")
    timed = []  # (mode as audited, row name, measured seconds)
    for mode in modes:
        t, saved = clock(), Path(opts.scores or ".", f"{Path(opts.checkpoint).stem}.{mode}.{n}.{key.hexdigest()[:12]}.pt")
        if opts.scores and saved.is_file():
            sheet = tg.ScoreSheet(n, device)
            sheet.nats, sheet.ent, sheet.hits = (v.to(device) for v in torch.load(saved).values())
            sheet.net_nats = sheet.nats
            print(f"{mode}: network scores from {saved}", file=sys.stderr)
        else:
            sheet = tg.run_eval_mode(ev, mode, val)
            if opts.scores:
                saved.parent.mkdir(parents=True, exist_ok=True)
                torch.save(dict(nats=sheet.nats, ent=sheet.ent, hits=sheet.hits), saved)
        net_s = clock() - t
        _, bpb = sheet.result(val, luts)
        timed.append((mode, mode, net_s))
        mixed = ""
        if not opts.no_ngram and "ngram" not in mode:
            t = clock()
            tg.ngram_mix(ev, sheet, val)
            timed.append((mode + "+ngram", mode + "+ngram (mixture only)", clock() - t))
            mixed = f" {sheet.result(val, luts)[1]:.4f} | {timed[-1][2]:.1f} s |"
        print(f"| {mode} | {bpb:.4f} | {net_s:.1f} s |{mixed or ' | |'}", flush=True)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    N, G = opts.project_tokens, opts.project_gpus
    print(f"\nProjection for THIS device ({where}; eager, one process): {N:,} targets split evenly over {G} such devices.")
    print("CPU figures are not H100 figures: a GPU run gives that GPU's projection. projected = s/target x "
          f"{N:,} / {G}; an audit's cost does not grow with the validation set: projected as measured.")
    print("| mode | measured | targets | s/target | projected | audit (as measured) |")
    print("|---|---:|---:|---:|---:|---:|")
    total = 0.0
    for audited, name, s in timed:
        projected, audit = s / n * N / G, audit_s.get(audited)
        total += projected + (audit or 0.0)
        print(f"| {name} | {s:.2f} s | {n:,} | {s / n:.3e} | {projected:.1f} s | "
              f"{'' if audit is None else f'{audit:.1f} s'} |")
    for mode in [m for m in modes if m in ("roundtrip", "sliding_window")]:  # the last batch is padded
        seq = min(args.eval_seq_len, n)
        w = len(tg.window_plan(n, seq, seq if mode == "roundtrip" else args.eval_stride)[0])
        b = max(1, args.val_batch_size // seq)
        if -(-w // b) * b > 1.1 * w:
            print(f"{mode}: {-(-w // b) * b:,} windows computed for {w:,} (batches of {b:,}: VAL_BATCH_SIZE / EVAL_SEQ_LEN), "
                  "so its s/target overstates the full set's: score >= 10 batches (--val-tokens) or lower VAL_BATCH_SIZE")
    if {"lora", "phased"} & {m.split("+")[0] for m in modes}:
        print("lora/phased: projected as measured here; a real evaluation stops adapting (scoring goes on) at "
              "TTT_MAX_SECONDS (default 400 s)")
    print(f"total projected {total:.1f} s (every row{', audits included' if audit_s else ''}) "
          "against the 600 s evaluation budget: "
          f"{'under' if total <= 600 else 'OVER'} by {abs(600 - total):.1f} s")


if __name__ == "__main__":
    main()
