"""Turn finished runs into a submission folder: every number is read from the logs, never typed.

    python3 records/package_record.py logs/seed1337.txt logs/seed42.txt logs/seed2025.txt \\
        --name "11L XSA GPTQ" --author "Jane Doe" --github-id jdoe --blurb "What changed and why." \\
        [--track non_record] [--pack] [--previous 1.9001 1.8990 1.9012]

writes records/track_10min_16mb/<date>_<Name>/ (or track_non_record_16mb/) holding
- train_gpt.py: the code snapshot at the top of the logs, byte for byte (with --pack: its packed form,
  see records/pack_script.py; then bytes_code and bytes_total count the packed bytes);
- train_seed<SEED>.log: each log, unchanged;
- submission.json: the official fields (author, github_id, name, blurb, date, val_loss, val_bpb,
  bytes_total, bytes_code) plus per-seed results, from the logs' score lines (runlog.py says which);
- README.md: a skeleton with the results table, the exact command (the settings that differ from
  the defaults of the code snapshot, from each log's `config` line) and the significance test.

It refuses, listing every problem (exit status 1): files that are not train_gpt.py logs; failed runs
(error lines or no final score); code snapshots, or settings other than SEED, that differ between
logs; duplicate seeds; seeds scored by different final lines; a logged code size that is not the
snapshot's UTF-8 length; sizes that do not add up, or model + code over 16,000,000 bytes;
EVAL_ONLY/QUANT_ONLY runs; and for the record track, anything but an 8-GPU CUDA run capped at 600 s.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import difflib
import json
import operator
import re
import shlex
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack_script import pack, readable, unpack, utf8_len  # noqa: E402
from runlog import CAP_BYTES, LogError, RunLog, read_log  # noqa: E402
from significance import improvement_test  # noqa: E402

TRACKS = {"record": "track_10min_16mb", "non_record": "track_non_record_16mb"}  # official folder names
PER_RUN_SETTINGS = {"RUN_ID"}  # defaults to a fresh uuid; it names the log and is never part of the command
VARYING_SETTINGS = {"SEED"} | PER_RUN_SETTINGS  # may differ between the seeds of one submission
UNPACK_COMMAND = ("python3 -c \"exec(open('train_gpt.py', encoding='utf-8').read()"  # the script, printing its source
                  ".replace('exec(c)', 'print(c.decode(), end=str())'))\"")
BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow}


class PackageError(Exception):
    pass


# ----------------------------------------------------------------------------- settings and defaults

def eval_default(node: ast.expr, config: dict):
    """The value of an env() default as the script resolved it: literals, arithmetic, min/max, S(full, smoke)
    (picked by the logged `smoke`), and names of other settings (EVAL_SEQ_LEN defaults to the
    resolved train_seq_len). Anything else raises ValueError."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = eval_default(node.operand, config)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in BINOPS:
        return BINOPS[type(node.op)](eval_default(node.left, config), eval_default(node.right, config))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "S" and len(node.args) == 2:
        return eval_default(node.args[1] if config.get("smoke") else node.args[0], config)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("min", "max"):
        return (min if node.func.id == "min" else max)(eval_default(a, config) for a in node.args)
    if isinstance(node, ast.Name) and node.id.lower() in config:
        return config[node.id.lower()]
    raise ValueError(ast.unparse(node))


def script_defaults(source: str, config: dict) -> dict[str, object]:
    """NAME -> default of every `env("NAME", default)` call in the script, resolved for this run."""
    defaults = {}
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "env"
                and len(node.args) in (2, 3) and isinstance(node.args[0], ast.Constant)):  # (name, default[, range])
            name = node.args[0].value
            if name in PER_RUN_SETTINGS:
                continue
            try:
                defaults[name] = eval_default(node.args[1], config)
            except ValueError as e:
                raise PackageError(f"cannot resolve the default of {name} in the code snapshot: {e}") from None
    return defaults


def overrides(run: RunLog) -> dict[str, object]:
    """The settings of this run that differ from its code's defaults: what the command must set."""
    defaults = script_defaults(readable(run.code), run.config)
    out = {}
    for key, value in sorted(run.config.items()):
        name = key.upper()
        if name in PER_RUN_SETTINGS:
            continue
        if name not in defaults:
            raise PackageError(f"{run.path}: config has {key} but the code snapshot has no env(\"{name}\", ...)")
        if value != defaults[name]:
            out[name] = value
    return out


def shell_value(value) -> str:
    return ("1" if value else "0") if isinstance(value, bool) else shlex.quote(str(value))


# ----------------------------------------------------------------------------- checks

def problems(runs: list[RunLog], track: str, code: str) -> list[str]:
    """Every reason not to package these runs with `code` as the submitted train_gpt.py (empty: all good)."""
    out = []
    for run in runs:
        p = run.path
        if run.failure():
            out.append(f"{p}: {run.failure()}")
        if run.config.get("eval_only") or run.config.get("quant_only"):
            out.append(f"{p}: an EVAL_ONLY/QUANT_ONLY run: package the log of the training run")
        if run.code_bytes != utf8_len(run.code):
            out.append(f"{p}: logged code size {run.code_bytes} != UTF-8 length {utf8_len(run.code)} of its code snapshot")
        if None in (run.model_bytes, run.total_bytes) or run.model_bytes + utf8_len(run.code) != run.total_bytes:
            out.append(f"{p}: logged sizes do not add up: model {run.model_bytes} + code {utf8_len(run.code)} "
                       f"!= total {run.total_bytes}")
        elif run.model_bytes + utf8_len(code) > CAP_BYTES:
            out.append(f"{p}: model {run.model_bytes} + code {utf8_len(code)} = {run.model_bytes + utf8_len(code)} "
                       f"bytes > the {CAP_BYTES:,}-byte cap")
        if track == "record":
            cap_s = run.config.get("max_wallclock_seconds", 0)
            if run.device != "cuda" or run.world_size != 8 or run.config.get("smoke") or not 0 < cap_s <= 600:
                out.append(f"{p}: the record track needs an 8-GPU CUDA run with MAX_WALLCLOCK_SECONDS <= 600 "
                           f"(this is device:{run.device} world_size:{run.world_size} smoke:{run.config.get('smoke')} "
                           f"max_wallclock_seconds:{cap_s}); use --track non_record")
    seeds = [run.seed for run in runs]
    if len(set(seeds)) != len(seeds):
        out.append(f"duplicate seeds {seeds}: each log must be a different seed")
    first = runs[0]
    for run in runs[1:]:
        if run.code != first.code:
            out.append(code_difference(first, run))
        if run.score() and first.score() and run.score().name != first.score().name:  # e.g. killed during TTT
            out.append(f"{run.path}: scored by final_{run.score().name}_exact but {first.path} by "
                       f"final_{first.score().name}_exact: did one stop during its last evaluation?")
        differing = sorted(k.upper() for k in set(first.config) | set(run.config)
                           if k.upper() not in VARYING_SETTINGS and first.config.get(k) != run.config.get(k))
        if differing:
            out.append(f"{run.path}: settings differ from {first.path}'s: {', '.join(differing)} (only SEED may)")
    return out


def code_difference(a: RunLog, b: RunLog) -> str:
    """Say how b's code snapshot differs from a's: the first lines of a diff of the readable sources."""
    src_a, src_b = readable(a.code), readable(b.code)
    if src_a == src_b:
        return f"{b.path}: same source as {a.path} but one ran packed and the other not: the code bytes differ"
    diff = difflib.unified_diff(src_a.splitlines(), src_b.splitlines(), str(a.path), str(b.path), lineterm="", n=1)
    return f"{b.path}: its code differs from {a.path}'s:\n    " + "\n    ".join(line[:160] for line in list(diff)[:20])


# ----------------------------------------------------------------------------- outputs

def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def submission(runs: list[RunLog], meta: dict, code_bytes: int) -> dict:
    scores = [run.score() for run in runs]
    loss, loss_std = mean_std([s.val_loss for s in scores])
    bpb, bpb_std = mean_std([s.val_bpb for s in scores])
    r8 = lambda x: None if x is None else round(x, 8)  # means of 8-decimal values, without float noise
    return dict(
        **meta,
        val_loss=r8(loss), val_bpb=r8(bpb), val_loss_std=r8(loss_std), val_bpb_std=r8(bpb_std),
        bytes_total=max(run.model_bytes for run in runs) + code_bytes,  # the largest seed's artifact
        bytes_code=code_bytes,
        score_line=f"final_{scores[0].name}_exact",
        seeds=[run.seed for run in runs],
        seed_results={str(run.seed): dict(val_loss=s.val_loss, val_bpb=s.val_bpb, bytes_total=run.model_bytes + code_bytes,
                                          bytes_model=run.model_bytes, steps=run.steps, train_time_ms=run.train_time_ms,
                                          eval_time_ms=run.eval_ms, log=log_name(run))
                      for run, s in zip(runs, scores)},
        hardware=runs[0].hardware,
        pytorch_version=runs[0].torch,
    )


def log_name(run: RunLog) -> str:
    return f"train_seed{run.seed}.log"


def command(runs: list[RunLog], settings: dict) -> str:
    env = " ".join(f"{k}={shell_value(v)}" for k, v in settings.items())
    world = runs[0].world_size or 1
    launcher = "python3 train_gpt.py" if world == 1 else f"torchrun --standalone --nproc_per_node={world} train_gpt.py"
    seeds = " ".join(str(run.seed) for run in runs)
    return f"for SEED in {seeds}; do\n  SEED=$SEED {env + ' ' if env else ''}{launcher}\ndone"


def readme(runs: list[RunLog], sub: dict, settings: dict, packed: bool, significance: str | None) -> str:
    std = f", std {sub['val_bpb_std']:.5f}" if sub["val_bpb_std"] is not None else ""
    rows = [f"| {run.seed} | {run.steps} | {run.train_time_ms / 1000:.1f} s | {r['val_loss']:.8f} | {r['val_bpb']:.8f} "
            f"| {r['bytes_total']:,} | [{r['log']}]({r['log']}) |"
            for run, r in ((run, sub["seed_results"][str(run.seed)]) for run in runs)]
    lines = [
        f"# {sub['name']}", "", sub["blurb"], "",
        f"**val_bpb {sub['val_bpb']:.5f}** (mean of {len(runs)} seed{'s' if len(runs) > 1 else ''}{std}), "
        f"val_loss {sub['val_loss']:.5f} nats; score line `{sub['score_line']}`; "
        f"largest artifact {sub['bytes_total']:,} bytes (code {sub['bytes_code']:,}).", "",
        "## Results", "",
        "| seed | steps | train time | val_loss | val_bpb | bytes_total | log |",
        "|---:|---:|---:|---:|---:|---:|---|", *rows, "",
        f"Hardware: {sub['hardware']}; PyTorch {sub['pytorch_version']}.", "",
        "## Reproduce", "", "```bash", command(runs, settings), "```", "",
        ("Settings that differ from this train_gpt.py's defaults: "
         + ", ".join(f"`{k}={shell_value(v)}`" for k, v in settings.items()) + "."
         if settings else "Every setting is this train_gpt.py's default."), "",
    ]
    if packed:
        lines += ["`train_gpt.py` is packed: it decompresses its lzma source (7 bits a character) and runs it. "
                  + ("The logs were written by the readable source, which runs identically; `bytes_code` and "
                     "`bytes_total` count the packed bytes." if unpack(runs[0].code) is None else
                     "The runs used this packed file, so the logs count its bytes.")
                  + " The readable source:", "", "```bash", UNPACK_COMMAND, "```", ""]
    if significance:
        lines += ["## Significance", "", "```", significance, "```", ""]
    lines += ["## Approach", "", "TODO: what changed against the previous record, and why it helps.", "",
              "---", "Generated by `records/package_record.py` from the logs; every number above is read from them."]
    return "\n".join(lines) + "\n"


def package(log_paths: list[Path], meta: dict, track: str, pack_code: bool, previous: list[float] | None,
            records_dir: Path, which: int | None = None) -> Path:
    try:
        runs = [read_log(p, which) for p in log_paths]
    except (LogError, OSError) as e:
        raise PackageError(str(e)) from None
    several = [str(r.path) for r in runs if r.runs_in_file > 1 and which is None]
    if several:
        raise PackageError(f"{', '.join(several)} hold(s) several runs (a reused RUN_ID or a resumed run): "
                           "say which with --run N (1 = the first in the file)")
    runs.sort(key=lambda r: r.seed)
    if pack_code and unpack(runs[0].code) is not None:
        raise PackageError("the logged code is already packed: drop --pack")
    code = pack(runs[0].code) if pack_code else runs[0].code
    found = problems(runs, track, code)
    if found:
        raise PackageError("refusing to package:\n  " + "\n  ".join(found))
    verdict = None
    if previous:
        try:
            verdict = improvement_test([run.score().val_loss for run in runs], previous).report()
        except ValueError as e:
            raise PackageError(f"significance: {e}") from None
    slug = re.sub(r"[^A-Za-z0-9]+", "_", meta["name"]).strip("_")
    out = records_dir / TRACKS[track] / f"{meta['date']}_{slug}"
    if out.exists():
        raise PackageError(f"{out} exists: remove it or choose another --name")
    settings = {k: v for k, v in overrides(runs[0]).items() if k != "SEED"}  # may raise: before writing
    sub = submission(runs, dict(meta, track=TRACKS[track].removeprefix("track_")), utf8_len(code))
    text = readme(runs, sub, settings, unpack(code) is not None, verdict)
    out.mkdir(parents=True)
    (out / "train_gpt.py").write_bytes(code.encode("utf-8"))
    for run in runs:
        shutil.copyfile(run.path, out / log_name(run))
    (out / "submission.json").write_text(json.dumps(sub, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "README.md").write_text(text, encoding="utf-8")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", type=Path, nargs="+", help="logs/<RUN_ID>.txt of each seed")
    p.add_argument("--name", required=True, help="submission name; also names the folder")
    p.add_argument("--run", type=int, metavar="N", help="the run to use in logs that hold several (1 = first)")
    p.add_argument("--author", required=True)
    p.add_argument("--github-id", required=True)
    p.add_argument("--blurb", required=True, help="one paragraph: what the submission does")
    p.add_argument("--date", default=datetime.date.today().isoformat(), help="YYYY-MM-DD (default: today)")
    p.add_argument("--track", choices=TRACKS, default="record", help="record: 10 min on 8xH100 (default)")
    p.add_argument("--pack", action="store_true", help="submit the packed form of the logged code")
    p.add_argument("--previous", type=float, nargs="+", metavar="NATS",
                   help="previous record's val_loss (per seed, or one value): add the significance test")
    p.add_argument("--records-dir", type=Path, default=Path(__file__).resolve().parent,
                   help="the records/ folder to write into (default: this one)")
    a = p.parse_args(argv)
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", a.date):
        p.error(f"--date {a.date!r} is not YYYY-MM-DD")
    meta = dict(author=a.author, github_id=a.github_id, name=a.name, blurb=a.blurb, date=a.date)
    try:
        out = package(a.logs, meta, a.track, a.pack, a.previous, a.records_dir, a.run)
    except PackageError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}/ (train_gpt.py, {len(a.logs)} log(s), submission.json, README.md)")


if __name__ == "__main__":
    main()
