"""Compare runs: a table of their logs, and optionally their loss curves as a PNG.

    python3 records/compare_runs.py logs/*.txt [--plot curves.png] [--x step]

Table (markdown), best submission score first: run id, seed, status, steps, ms/step, val_bpb before
quantization and of each final evaluation mode present (roundtrip, sliding_window, lora, phased, ...;
runlog.py says which one is the submission score), code + model bytes, and ">CAP" for an artifact
over 16,000,000 bytes. The plot (needs matplotlib: pip install -r records/requirements.txt) shows
the training loss and the validation val_bpb of each run against training time or step.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runlog import LogError, RunLog, read_log  # noqa: E402


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(runs: list[RunLog]) -> str:
    kinds = list(dict.fromkeys(f.kind for r in runs for f in r.finals))  # FINAL_EVAL modes, in run order
    head = ["run", "seed", "status", "steps", "ms/step", "pre-quant bpb", *(f"{k} bpb" for k in kinds),
            "bytes", "cap"]
    rows = []
    for r in sorted(runs, key=lambda r: (r.score() is None, r.score().val_bpb if r.score() else 0)):
        rows.append([r.run_id, fmt(r.seed, ""), "ok" if not r.failure() else r.failure()[:60].replace("|", "/"), fmt(r.steps, ""),
                     fmt(r.step_avg_ms, ".1f"), fmt(r.pre_quant and r.pre_quant[1], ".4f"),
                     *(fmt(r.final(k) and r.final(k).val_bpb, ".5f") for k in kinds),
                     fmt(r.total_bytes, ","), ">CAP" if r.over_cap() else ""])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def plot(runs: list[RunLog], out: Path, x: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(13, 5))
    pick = (lambda step, ms: step) if x == "step" else (lambda step, ms: ms / 1000)
    ids = [r.run_id for r in runs]
    for r in runs:
        label = r.run_id if ids.count(r.run_id) == 1 else str(r.path)  # two logs of one RUN_ID: their paths
        label = label if len(label) <= 40 else "..." + label[-37:]
        line, = ax_train.plot([pick(s, ms) for s, _, ms in r.train], [loss for _, loss, _ in r.train], label=label, lw=1.2)
        if r.val:
            ax_val.plot([pick(s, ms) for s, _, _, ms in r.val], [bpb for _, _, bpb, _ in r.val], "o-",
                        color=line.get_color(), label=label, ms=3, lw=1.2)
        if r.score() and r.val:  # the submission score, drawn at the end of training
            ax_val.plot([pick(r.val[-1][0], r.val[-1][3])], [r.score().val_bpb], "*", color=line.get_color(), ms=12)
    xlabel = "step" if x == "step" else "training time (s)"
    ax_train.set(title="training loss", xlabel=xlabel, ylabel="train_loss (nats/token)")
    ax_val.set(title="validation (star: final score after quantization)", xlabel=xlabel, ylabel="val_bpb")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", type=Path, nargs="+")
    p.add_argument("--plot", type=Path, metavar="PNG", help="write the loss curves to this PNG")
    p.add_argument("--x", choices=("time", "step"), default="time", help="x axis of the plot (default: time)")
    a = p.parse_args(argv)
    try:
        runs = [read_log(path) for path in a.logs]
    except (LogError, OSError) as e:
        sys.exit(f"error: {e}")
    for run in runs:
        if run.note:
            print(f"note: {run.note}", file=sys.stderr)
    print(table(runs))
    if a.plot:
        try:
            plot(runs, a.plot, a.x)
        except ImportError:
            sys.exit("error: the plot needs matplotlib: pip install -r records/requirements.txt (the table needs nothing)")
        print(f"wrote {a.plot}")


if __name__ == "__main__":
    main()
