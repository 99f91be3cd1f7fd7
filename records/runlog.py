"""Read one train_gpt.py log (logs/<RUN_ID>.txt) into numbers; every records tool reads logs here.

A log is: the script's source as run, "\n", a line of 100 "=", then `Running Python ...`, the
`config {json}` line and the log lines proper. Each quantity is read by exactly one pattern below,
only from the part after the code snapshot (the source itself contains these strings).

The submission score is the last `final_*_exact` line: the script scores the modes of FINAL_EVAL
in order, and its README says to list the scoring mode last.

The script appends to its log, so a file may hold several runs (a reused RUN_ID, a resumed run):
read_runs splits them, read_log takes the last complete one and says so in `note`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

SEPARATOR = "=" * 100
CAP_BYTES = 16_000_000  # the challenge's limit on code + compressed model (decimal, not MiB)

PATTERNS = {
    "runtime": re.compile(r"^Running Python (\S+) PyTorch (\S+) device:(\S+)$"),
    "config": re.compile(r"^config (\{.*\})$"),
    "gpu": re.compile(r"^\|\s+\d+\s+(NVIDIA .+?)\s{2,}(?:On|Off)\s+\|"),
    "world": re.compile(r"^world_size:(\d+) grad_accum_steps:(\d+)$"),
    "params": re.compile(r"^model_params:(\d+)$"),
    "train": re.compile(r"^step:(\d+)/(\d+) train_loss:(\S+) train_time:(\d+)ms step_avg:(\S+)ms"),
    "val": re.compile(r"^step:(\d+)/(\d+) val_loss:(\S+) val_bpb:(\S+) train_time:(\d+)ms"),
    "stop": re.compile(r"^stopping_early: "),
    "pre_quant": re.compile(r"^final_weights:(\S+) pre_quant val_loss:(\S+) val_bpb:(\S+)"),
    "model_bytes": re.compile(r"^Serialized model (\S+): (\d+) bytes$"),  # not the fp32 `Serialized model: N`
    "code_bytes": re.compile(r"^Code size: (\d+) bytes$"),
    "total_bytes": re.compile(r"^Total submission size (\S+): (\d+) bytes$"),
    "exact": re.compile(r"^final_(\S+)_exact val_loss:(\S+) val_bpb:(\S+)$"),
    "eval_time": re.compile(r"^final_(\S+) val_loss:\S+ val_bpb:\S+ .*eval_time:(\d+)ms$"),
    "error": re.compile(r"^error: (.*)$"),
    "done": re.compile(r"^final_eval:done"),
}


class LogError(ValueError):
    """The file is not a train_gpt.py log."""


@dataclass
class Final:
    name: str  # e.g. "int6_zstd_sliding_window" from `final_int6_zstd_sliding_window_exact`
    val_loss: float
    val_bpb: float

    @property
    def kind(self) -> str:
        """The FINAL_EVAL mode, "+" written "_": roundtrip, sliding_window, ttt_ngram, ..."""
        return self.name.split("_", 2)[-1]


@dataclass
class RunLog:
    path: Path
    code: str  # the script exactly as run (what train_gpt.py read from its own file)
    config: dict
    python: str = ""
    torch: str = ""
    device: str = ""
    gpus: list[str] = field(default_factory=list)  # nvidia-smi rows, CUDA runs only
    world_size: int | None = None
    model_params: int | None = None
    train: list[tuple[int, float, float]] = field(default_factory=list)  # step, train_loss, train_time_ms
    val: list[tuple[int, float, float, float]] = field(default_factory=list)  # step, val_loss, val_bpb, ms
    iterations: int | None = None
    stopped_early: bool = False
    pre_quant: tuple[float, float] | None = None  # val_loss, val_bpb of the averaged weights
    model_bytes: int | None = None
    code_bytes: int | None = None
    total_bytes: int | None = None
    finals: list[Final] = field(default_factory=list)
    eval_ms: float = 0.0  # sum over the final evaluations
    eval_done: bool = False  # the `final_eval:done` line: every FINAL_EVAL mode was scored
    step_avg_ms: float | None = None
    errors: list[str] = field(default_factory=list)
    note: str = ""  # set when the file holds several runs: which one this is
    runs_in_file: int = 1

    @property
    def run_id(self) -> str:
        return str(self.config.get("run_id", self.path.stem))

    @property
    def seed(self) -> int | None:
        return self.config.get("seed")

    @property
    def steps(self) -> int | None:
        return self.train[-1][0] if self.train else None

    @property
    def train_time_ms(self) -> float | None:
        return self.val[-1][3] if self.val else (self.train[-1][2] if self.train else None)

    @property
    def hardware(self) -> str:
        if self.gpus:
            return f"{len(self.gpus)}x {self.gpus[0]}"
        return f"{self.world_size or 1}x {self.device}"

    def score(self) -> Final | None:
        """The submission score: the last final line (see the module docstring)."""
        return self.finals[-1] if self.finals else None

    def final(self, kind: str) -> Final | None:
        of_kind = [f for f in self.finals if f.kind == kind]
        return of_kind[-1] if of_kind else None

    def failure(self) -> str | None:
        """Why this run has no usable score, or None."""
        if self.errors:
            return "error: " + self.errors[0]
        if not self.finals:
            return "no final_*_exact score line (crashed, killed or still running)"
        if not self.eval_done:  # the last line present would not be the score FINAL_EVAL chose
            return "no final_eval:done line: killed or still running during the final evaluations"
        return None

    def over_cap(self) -> bool:
        return (self.total_bytes or 0) > CAP_BYTES or any("over the cap" in e for e in self.errors)


def split_snapshot(text: str, path) -> tuple[str, str]:
    """(code as run, the log after it). The separator is the first 100-"=" line followed by the
    `Running Python` line; the logger added one "\n" after the code."""
    m = re.search(rf"^{SEPARATOR}\nRunning Python ", text, re.M)
    if not m or m.start() == 0 or text[m.start() - 1] != "\n":
        raise LogError(f"{path}: no code snapshot followed by a {len(SEPARATOR)}-'=' line: not a train_gpt.py log")
    return text[:m.start() - 1], text[m.start() + len(SEPARATOR) + 1:]


def split_runs(text: str, path) -> list[str]:
    """The runs a log holds: the script appends, so a reused RUN_ID (or a resumed run) adds a whole
    run (code snapshot, separator, lines) after the last. A run's snapshot starts with a line
    equal to the first line of the file (the script's first line), which no log line is."""
    first = text.split("\n", 1)[0] + "\n"
    starts = [0]
    for m in re.finditer(rf"^{SEPARATOR}\nRunning Python ", text, re.M):
        if m.start() > starts[-1]:
            nxt = text.find("\n" + first, m.end())
            nxt_sep = re.search(rf"^{SEPARATOR}\nRunning Python ", text[m.end():], re.M)
            if nxt >= 0 and nxt_sep and nxt + 1 < m.end() + nxt_sep.start():
                starts.append(nxt + 1)
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


def read_runs(path) -> list[RunLog]:
    """Every run in a log file, in order."""
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as f:  # newline="": keep the code's bytes exactly
        text = f.read()
    runs = []
    for part in split_runs(text, path):
        code, body = split_snapshot(part, path)
        run = RunLog(path=path, code=code, config={})
        for line in body.splitlines():
            try:
                parse_line(run, line)
            except ValueError as e:  # a line that matches a pattern but holds no number (or bad JSON)
                raise LogError(f"{path}: cannot read {line[:80]!r}: {e}") from None
        if not run.config:
            raise LogError(f"{path}: no `config {{...}}` line")
        runs.append(run)
    return runs


def read_log(path, which: int | None = None) -> RunLog:
    """One run of a log. A log that holds several runs gives the last complete one (a score and
    final_eval:done), or the last if none is complete, and says so in `note`; `which` (1-based)
    picks one."""
    runs = read_runs(path)
    if which is not None:
        if not 1 <= which <= len(runs):
            raise LogError(f"{path}: run {which} asked for, but the log holds {len(runs)} run(s)")
        run = runs[which - 1]
    else:
        complete = [i for i, r in enumerate(runs) if r.failure() is None]
        i = complete[-1] if complete else len(runs) - 1
        run = runs[i]
        if len(runs) > 1:
            run.note = (f"{path}: holds {len(runs)} runs (a reused RUN_ID or a resumed run); using run {i + 1}, "
                        f"the last {'complete one' if complete else 'one (none is complete)'}")
    run.runs_in_file = len(runs)
    return run


def parse_line(run: RunLog, line: str) -> None:
    for key, pattern in PATTERNS.items():
        m = pattern.match(line)
        if m:
            break
    else:
        return
    g = m.groups()
    if key == "runtime":
        run.python, run.torch, run.device = g
    elif key == "config":
        run.config = json.loads(g[0])
    elif key == "gpu":
        run.gpus.append(g[0])
    elif key == "world":
        run.world_size = int(g[0])
    elif key == "params":
        run.model_params = int(g[0])
    elif key == "train":
        run.train.append((int(g[0]), float(g[2]), float(g[3])))
        run.iterations, run.step_avg_ms = int(g[1]), float(g[4])
    elif key == "val":
        run.val.append((int(g[0]), float(g[2]), float(g[3]), float(g[4])))
        run.iterations = int(g[1])
    elif key == "stop":
        run.stopped_early = True
    elif key == "pre_quant":
        run.pre_quant = (float(g[1]), float(g[2]))
    elif key == "model_bytes":
        run.model_bytes = int(g[1])
    elif key == "code_bytes":
        run.code_bytes = int(g[0])
    elif key == "total_bytes":
        run.total_bytes = int(g[1])
    elif key == "exact":
        run.finals.append(Final(g[0], float(g[1]), float(g[2])))
    elif key == "eval_time":
        run.eval_ms += float(g[1])
    elif key == "done":
        run.eval_done = True
    elif key == "error":
        run.errors.append(g[0])
