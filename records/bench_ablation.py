"""Ablation of the April stack on the tiny CPU shape: today's defaults, each feature alone, all on.

    python3 records/bench_ablation.py --out /tmp/ablation [--jobs 2] [--seeds 1337,42] [--arms seeds,loop]
    python3 records/bench_ablation.py --out /tmp/ablation --table      # only print the table of finished runs

Every arm is one `train_gpt.py` run of the shape in records/BENCHMARKS.md ("Tiny CPU shape against
the reference scripts": 4 layers, width 128, 306 steps of 8,192 tokens, EMA 0.92) with the arm's
settings on top, plain round-trip evaluation. Runs go to OUT/<arm>_s<seed>/ (a finished run is
skipped when run again) with `OMP_NUM_THREADS=1` each; `--jobs` of them at a time. Step times are
only comparable between runs that shared the machine the same way.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = os.environ.get("CORPUS", str(ROOT.parent / "shared" / "corpus"))
SHAPE = dict(NUM_LAYERS=4, MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, TRAIN_SEQ_LEN=256, EVAL_SEQ_LEN=256,
             EVAL_STRIDE=64, TRAIN_BATCH_TOKENS=8192, WARMUP_STEPS=2, WARMDOWN_ITERS=100, EMA_DECAY=0.92,
             ITERATIONS=306, MAX_WALLCLOCK_SECONDS=0, VAL_LOSS_EVERY=0, VAL_BATCH_SIZE=65536, FINAL_EVAL="roundtrip",
             DATA_PATH=f"{CORPUS}/datasets/webmix_sp1024", TOKENIZER_PATH=f"{CORPUS}/tokenizers/fineweb_1024_bpe.model")
# The stack's settings scaled to 4 layers: the loop on the middle blocks 1-2 (as 3-5 of 11),
# parallel residuals from block 2 (as 7 of 11). The shape's settings (sp1024 data included) win
# over a preset's defaults, as explicit settings do.
ARMS = {
    "seeds": "PRESET=seeds",
    "top": "PRESET=top VOCAB_SIZE=1024 LOOP_LAYERS=1-2 PARALLEL_FROM=2",
    "loop": "LOOP_LAYERS=1-2 LOOP_REPEATS=2 LOOP_START_FRAC=0.35",
    "parallel": "PARALLEL_FROM=2",
    "gate": "ATTN_GATE_DIMS=12",
    "muoneqr": "MUON_ROW_NORM=1",
    "normuon": "NORMUON=1",
    "polar": "MUON_NS_COEFFS=polar",
    "qk": "QK_GAIN_INIT=5.25",
    "mom": "MUON_MOMENTUM=0.97",
    "seqsched": "SEQ_LEN_SCHEDULE=64:0.33,128:0.66",
    "emahl": "EMA_HALF_LIFE_FRAC=0.04",
    "minlr": "MIN_LR=0.1",
    "wdtaper": "MUON_WD_TAPER_START=0.5 MUON_WD_FINAL=0.0",
    "naive": "PRESET=naive_baseline ROPE_DIMS=32",  # the baseline's full RoPE at this shape's head dim
}


def arm_env(arm: str, seed: int) -> dict[str, str]:
    env = {k: str(v) for k, v in SHAPE.items()} | dict(kv.split("=", 1) for kv in ARMS[arm].split())
    return os.environ | env | dict(SEED=str(seed), RUN_ID=f"{arm}_s{seed}", OMP_NUM_THREADS="1")


def run_arm(out: Path, arm: str, seed: int) -> str:
    folder = out / f"{arm}_s{seed}"
    log = folder / "out.txt"
    if read_run(log) is not None:  # a run cut off before its round trip is run again
        return f"{folder.name}: done before"
    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=folder, env=arm_env(arm, seed),
                            stdout=f, stderr=subprocess.STDOUT).returncode
    return f"{folder.name}: exit {rc} in {time.perf_counter() - t:.0f} s"


def read_run(log: Path) -> dict | None:
    text = log.read_text() if log.exists() else ""
    grab = lambda pattern: (m.group(1) if (m := re.search(pattern, text)) else None)  # noqa: E731
    rt = grab(r"final_int\d+_\w+_roundtrip_exact val_loss:\S+ val_bpb:(\S+)")
    if rt is None:
        return None
    return dict(pre=grab(r"pre_quant val_loss:\S+ val_bpb:(\S+)"), rt=float(rt),
                bytes=int(grab(r"Serialized model int\d+\+\w+: (\d+) bytes")),
                ms=float(grab(r"step:(?:\d+)/\d+ val_loss.*step_avg:(\S+)ms")))


def table(out: Path, seeds: list[int]) -> str:
    rows = ["| arm | settings | " + " | ".join(f"round trip s{s}" for s in seeds) + " | mean | vs seeds | pre-quant "
            "(first seed) | model bytes | ms/step |", "|---|---|" + "---:|" * (len(seeds) + 5)]
    base = [read_run(out / f"seeds_s{s}" / "out.txt") for s in seeds]
    for arm in ARMS:
        runs = [read_run(out / f"{arm}_s{s}" / "out.txt") for s in seeds]
        done = [r for r in runs if r]
        if not done:
            continue
        mean = sum(r["rt"] for r in done) / len(done)
        both = [(r["rt"], b["rt"]) for r, b in zip(runs, base) if r and b]  # vs seeds on the seeds both have
        delta = f"{sum(r - b for r, b in both) / len(both):+.4f}" if both and arm != "seeds" else ""
        cells = " | ".join(f"{r['rt']:.4f}" if r else "" for r in runs)
        rows.append(f"| {arm} | `{ARMS[arm]}` | {cells} | {mean:.4f} | {delta} | {done[0]['pre']} | "
                    f"{done[0]['bytes']:,} | {done[0]['ms']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--seeds", default="1337")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--table", action="store_true", help="print the table of finished runs, run nothing")
    a = ap.parse_args()
    seeds, arms = [int(s) for s in a.seeds.split(",")], a.arms.split(",")
    if unknown := [arm for arm in arms if arm not in ARMS]:
        sys.exit(f"error: unknown arms {unknown}; the arms are {', '.join(ARMS)}")
    if not a.table:
        if not Path(SHAPE["DATA_PATH"]).is_dir():
            sys.exit(f"error: no stand-in corpus at {CORPUS}: set CORPUS to the folder holding datasets/ and tokenizers/")
        with ThreadPoolExecutor(a.jobs) as pool:
            for line in pool.map(lambda job: run_arm(a.out, *job), [(arm, s) for s in seeds for arm in arms]):
                print(line, flush=True)
    print(table(a.out, seeds))


if __name__ == "__main__":
    main()
