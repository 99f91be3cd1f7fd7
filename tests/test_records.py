"""Tests of the records/ tools on CPU, from real logs of short train_gpt.py runs and edits of them."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "records"))

import bench_ablation  # noqa: E402
import compare_runs  # noqa: E402
import package_record  # noqa: E402
import runlog  # noqa: E402
import significance  # noqa: E402
import size_planner  # noqa: E402
import train_gpt as tg  # noqa: E402
from data.sample import build_sample  # noqa: E402
from pack_script import pack, strip, unpack  # noqa: E402

# Every setting differs from its (non-smoke) default, so each must appear in the packaged command.
TINY = dict(VOCAB_SIZE=512, NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, ROPE_DIMS=8, TRAIN_SEQ_LEN=64,
            TRAIN_BATCH_TOKENS=1024, ITERATIONS=4, WARMUP_STEPS=0, VAL_LOSS_EVERY=0, MAX_WALLCLOCK_SECONDS=0,
            BIGRAM_VOCAB_SIZE=64, BIGRAM_DIM=8, VE_DIM=8, EVAL_STRIDE=32, VAL_BATCH_SIZE=4096,
            FINAL_EVAL="roundtrip,sliding_window")
# A trained small model whose MLP matrices are quantized (176 x 528 > 65,536 entries); the planner's
# factors were measured on other shapes and seeds (records/BENCHMARKS.md (Records tools)). No smoke
# QUANT_OVERRIDES: quantizing matrices under 65,536 entries is a smoke-test device, not a plan.
# If the export format of train_gpt.py changes, re-measure the factors (size_planner.py measure).
TRAINED = dict(SMOKE=1, QUANT_OVERRIDES="", MODEL_DIM=176, NUM_LAYERS=2, ITERATIONS=30, VAL_LOSS_EVERY=0, SEED=5)


def start(script: Path, cwd: Path, sample, settings: dict) -> subprocess.Popen:
    cwd.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in tg.KNOWN_ENV}
    env.update({k: str(v) for k, v in settings.items()}, RUN_ID="run", DATA_PATH=sample[0], TOKENIZER_PATH=sample[1],
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(script)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Three real runs at once (one thread each): the tiny config from the readable and from the
    packed script (comments and docstrings stripped), and a trained small model. name -> log path,
    and "script" -> the script that ran
    (a copy: the runs and the checks see the same bytes even if train_gpt.py is being edited)."""
    tmp = tmp_path_factory.mktemp("runs")
    sample = build_sample(tmp / "sample", vocab_size=512, train_tokens=60_000, val_docs=8)
    script = tmp / "train_gpt.py"
    script.write_bytes((ROOT / "train_gpt.py").read_bytes())
    (tmp / "packed.py").write_text(pack(strip(script.read_text(encoding="utf-8"))), encoding="utf-8")
    procs = {"plain": start(script, tmp / "plain", sample, TINY),
             "packed": start(tmp / "packed.py", tmp / "packed", sample, TINY),
             "trained": start(script, tmp / "trained", sample, TRAINED)}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name} run failed:\n{out[-3000:]}"
    return {name: tmp / name / "logs" / "run.txt" for name in procs} | {"script": script}


# ----------------------------------------------------------------------------- logs

def edited(src: Path, dst: Path, code: str | None = None, subs=(), cut=None) -> Path:
    """A synthetic log: `src` with its code snapshot replaced (code and total size lines kept
    consistent with it), regex substitutions applied to the log lines, lines matching `cut` dropped."""
    text = src.read_text(encoding="utf-8")
    old_code, body = runlog.split_snapshot(text, src)
    code = old_code if code is None else code
    delta = len(code.encode()) - len(old_code.encode())
    body = re.sub(r"^Code size: (\d+)", lambda m: f"Code size: {int(m.group(1)) + delta}", body, flags=re.M)
    body = re.sub(r"^(Total submission size \S+): (\d+)", lambda m: f"{m.group(1)}: {int(m.group(2)) + delta}", body,
                  flags=re.M)
    for pattern, repl in subs:
        body = re.sub(pattern, repl, body, flags=re.M)
    if cut:
        body = "".join(line for line in body.splitlines(True) if not re.match(cut, line))
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(code + "\n" + runlog.SEPARATOR + "\n" + body, encoding="utf-8")
    return dst


def seed_log(src: Path, dst: Path, seed: int, loss: float) -> Path:
    """Another seed of the same run: its seed and its final scores changed."""
    return edited(src, dst, subs=[(r'"seed": \d+', f'"seed": {seed}'), (r"^seed:\d+", f"seed:{seed}"),
                                  (r"^(final_\S+_exact) val_loss:\S+ val_bpb:\S+",
                                   rf"\1 val_loss:{loss:.8f} val_bpb:{loss / 1.2:.8f}")])


def test_read_log_takes_every_number_from_the_run(runs):
    run = runlog.read_log(runs["plain"])
    assert run.code == runs["script"].read_text(encoding="utf-8")
    assert run.code_bytes == len(run.code.encode()) and run.model_bytes + run.code_bytes == run.total_bytes
    assert run.config["num_layers"] == 2 and run.seed == 1337 and run.steps == 4 and run.world_size == 1
    assert [f.kind for f in run.finals] == ["roundtrip", "sliding_window"] and run.score() is run.finals[-1]
    assert run.failure() is None and not run.over_cap()


def test_score_is_the_last_final_eval_mode(runs, tmp_path):
    log = edited(runs["plain"], tmp_path / "ttt.txt", subs=[
        (r"^(final_\S+_sliding_window_exact .*)$", r"\1\nfinal_int6_zstd_ttt_ngram_exact val_loss:1.00000000 val_bpb:0.90000000")])
    run = runlog.read_log(log)
    assert run.score().name == "int6_zstd_ttt_ngram" and run.score().kind == "ttt_ngram" and run.score().val_bpb == 0.9
    run.finals = [f for f in run.finals if f.kind == "roundtrip"]
    assert run.score().kind == "roundtrip"


def test_a_run_killed_during_its_final_evaluations_has_no_score(runs, tmp_path):
    """Its last final line would be an earlier mode's, not the one FINAL_EVAL chose to end with."""
    killed = runlog.read_log(edited(runs["plain"], tmp_path / "killed.txt", cut=r"final_\S+_sliding_window|final_eval:done"))
    assert killed.finals and "final_eval:done" in killed.failure()
    assert runlog.read_log(runs["plain"]).eval_done


def test_not_a_log_is_refused(tmp_path):
    (tmp_path / "x.txt").write_text("hello\n")
    with pytest.raises(runlog.LogError, match="not a train_gpt.py log"):
        runlog.read_log(tmp_path / "x.txt")


def test_a_log_with_several_runs_is_split_and_the_last_complete_run_is_used(runs, tmp_path):
    """A reused RUN_ID appends a whole run: read as one, its curves zig-zagged and its score came from
    whichever run printed last. A crashed third run does not replace the complete second one."""
    first = seed_log(runs["plain"], tmp_path / "a.txt", 1, 6.1).read_text()
    second = seed_log(runs["plain"], tmp_path / "b.txt", 2, 6.2).read_text()
    crashed = edited(runs["plain"], tmp_path / "c.txt", cut=r"final_").read_text()
    both = tmp_path / "both.txt"
    both.write_text(first + second + crashed)
    parts = runlog.read_runs(both)
    assert [r.seed for r in parts] == [1, 2, 1337] and [len(r.train) for r in parts] == [len(parts[0].train)] * 3
    run = runlog.read_log(both)
    assert run.seed == 2 and run.score().val_loss == pytest.approx(6.2) and "using run 2, the last complete one" in run.note
    assert [s for s, *_ in run.train] == sorted(s for s, *_ in run.train)  # one run's curve, no zig-zag
    assert runlog.read_log(both, 1).seed == 1
    with pytest.raises(package_record.PackageError, match="--run N"):
        package([both], tmp_path)
    out = package([both], tmp_path, which=2)
    assert json.loads((out / "submission.json").read_text())["val_loss"] == pytest.approx(6.2)
    shown = subprocess.run([sys.executable, str(ROOT / "records" / "compare_runs.py"), str(both)], capture_output=True, text=True)
    assert shown.returncode == 0 and "using run 2" in shown.stderr


# ----------------------------------------------------------------------------- packaging

def package(logs, tmp_path, **kw):
    meta = dict(author="A. Author", github_id="aauthor", name=kw.pop("name", "Tiny Test"), blurb="A test.",
                date="2026-11-23")
    args = dict(track="non_record", pack_code=False, previous=None, records_dir=tmp_path / "records") | kw
    return package_record.package(logs, meta, **args)


def test_package_three_seeds(runs, tmp_path):
    logs = [seed_log(runs["plain"], tmp_path / f"s{s}.txt", s, loss) for s, loss in ((1, 6.1), (2, 6.2), (3, 6.3))]
    out = package(logs, tmp_path, previous=[6.5])
    assert out == tmp_path / "records" / "track_non_record_16mb" / "2026-11-23_Tiny_Test"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "submission.json", "train_gpt.py", "train_seed1.log",
                                                      "train_seed2.log", "train_seed3.log"]
    assert (out / "train_gpt.py").read_bytes() == runs["script"].read_bytes()
    assert (out / "train_seed2.log").read_bytes() == logs[1].read_bytes()
    sub = json.loads((out / "submission.json").read_text())
    run = runlog.read_log(logs[0])
    assert sub["val_loss"] == pytest.approx(6.2) and sub["val_loss_std"] == pytest.approx(0.1)
    assert sub["val_bpb"] == pytest.approx(6.2 / 1.2)
    assert sub["bytes_code"] == run.code_bytes and sub["bytes_total"] == run.total_bytes
    assert sub["seeds"] == [1, 2, 3] and sub["seed_results"]["3"]["val_loss"] == 6.3
    assert sub["track"] == "non_record_16mb"
    assert sub["score_line"] == "final_int6_zstd_sliding_window_exact"
    for field in ("author", "github_id", "name", "blurb", "date"):
        assert sub[field]
    readme = (out / "README.md").read_text()
    assert "| 2 | 4 |" in readme and "NOT A RECORD" in readme  # 0.3 nats better, but 3 noisy seeds


def test_packaged_command_sets_exactly_the_settings_that_differ(runs, tmp_path):
    tiny = package_record.overrides(runlog.read_log(runs["plain"]))
    assert set(tiny) == set(TINY) | {"DATA_PATH", "TOKENIZER_PATH"}  # EVAL_SEQ_LEN follows TRAIN_SEQ_LEN: not set
    trained = package_record.overrides(runlog.read_log(runs["trained"]))  # against the smoke defaults
    assert {"SMOKE", "MODEL_DIM", "NUM_LAYERS", "ITERATIONS", "VAL_LOSS_EVERY", "SEED"} <= set(trained)
    assert not {"VOCAB_SIZE", "NUM_HEADS", "TRAIN_SEQ_LEN", "EVAL_SEQ_LEN", "EMA_DECAY"} & set(trained)
    out = package([runs["trained"]], tmp_path)
    assert "SEED=$SEED DATA_PATH=" in (out / "README.md").read_text()
    assert "MODEL_DIM=176" in (out / "README.md").read_text() and "VOCAB_SIZE" not in (out / "README.md").read_text()


def test_package_refuses_logs_whose_code_differs(runs, tmp_path):
    code = runlog.read_log(runs["plain"]).code
    other = edited(runs["plain"], tmp_path / "b.txt", code=code.replace("import copy\n", "import copy  # changed\n"),
                   subs=[(r'"seed": \d+', '"seed": 7')])
    with pytest.raises(package_record.PackageError, match="code differs") as refused:
        package([runs["plain"], other], tmp_path)
    assert "import copy  # changed" in str(refused.value)  # the diff shows the changed line


def test_package_refuses_over_the_cap_and_mismatched_code_size(runs, tmp_path):
    run = runlog.read_log(runs["plain"])
    big = 16_000_001 - run.code_bytes
    over = edited(runs["plain"], tmp_path / "over.txt", subs=[
        (r"^(Serialized model \S+): \d+", rf"\1: {big}"), (r"^(Total submission size \S+): \d+", rf"\1: {big + run.code_bytes}")])
    with pytest.raises(package_record.PackageError, match="16,000,000-byte cap"):
        package([over], tmp_path)
    wrong = edited(runs["plain"], tmp_path / "wrong.txt", subs=[(r"^Code size: \d+", "Code size: 123")])
    with pytest.raises(package_record.PackageError, match="logged code size 123 != UTF-8 length"):
        package([wrong], tmp_path)


def test_package_refuses_runs_without_a_final_score(runs, tmp_path):
    crashed = edited(runs["plain"], tmp_path / "crashed.txt", cut=r"final_int")
    with pytest.raises(package_record.PackageError, match="no final_\\*_exact score line"):
        package([crashed], tmp_path)
    failed = edited(runs["plain"], tmp_path / "failed.txt", cut=r"final_int", subs=[(r"\Z", "error: boom\n")])
    with pytest.raises(package_record.PackageError, match="error: boom"):
        package([failed], tmp_path)
    assert not (tmp_path / "records").exists()


def test_package_refuses_seeds_scored_by_different_lines(runs, tmp_path):
    stopped = edited(runs["plain"], tmp_path / "b.txt", subs=[(r'"seed": \d+', '"seed": 7')], cut=r"final_int\S+_sliding")
    with pytest.raises(package_record.PackageError, match="did one stop during its last evaluation"):
        package([runs["plain"], stopped], tmp_path)


def test_record_track_needs_an_8_gpu_capped_run(runs, tmp_path):
    with pytest.raises(package_record.PackageError, match="8-GPU CUDA run"):
        package([runs["plain"]], tmp_path, track="record")
    smi = "".join(f"\\n|   {i}  NVIDIA H100 80GB HBM3          On  |   00000000:{i}8:00.0 Off |          0 |" for i in range(8))
    gpu = edited(runs["plain"], tmp_path / "gpu.txt", subs=[
        (r"device:cpu$", "device:cuda" + smi), (r"^world_size:1 ", "world_size:8 "),
        (r'"max_wallclock_seconds": [\d.]+', '"max_wallclock_seconds": 600.0')])
    out = package([gpu], tmp_path, track="record")
    assert out.parent.name == "track_10min_16mb"
    assert "torchrun --standalone --nproc_per_node=8 train_gpt.py" in (out / "README.md").read_text()
    assert json.loads((out / "submission.json").read_text())["hardware"] == "8x NVIDIA H100 80GB HBM3"


def test_package_refuses_seeds_with_different_settings(runs, tmp_path):
    other = edited(runs["plain"], tmp_path / "b.txt", subs=[(r'"seed": \d+', '"seed": 7'), (r'"matrix_lr": [\d.]+', '"matrix_lr": 0.5')])
    with pytest.raises(package_record.PackageError, match="settings differ.*MATRIX_LR"):
        package([runs["plain"], other], tmp_path)


def test_package_packed_counts_the_packed_bytes(runs, tmp_path):
    out = package([runs["plain"]], tmp_path, pack_code=True)
    packed = (out / "train_gpt.py").read_text()
    assert unpack(packed) == runlog.read_log(runs["plain"]).code
    sub = json.loads((out / "submission.json").read_text())
    assert sub["bytes_code"] == len(packed.encode()) and sub["bytes_total"] == runlog.read_log(runs["plain"]).model_bytes + len(packed.encode())
    assert package_record.UNPACK_COMMAND in (out / "README.md").read_text()
    shown = subprocess.run(package_record.UNPACK_COMMAND, shell=True, cwd=out, capture_output=True, text=True)
    assert shown.stdout == runlog.read_log(runs["plain"]).code  # the README's command shows the readable source
    with pytest.raises(package_record.PackageError, match="already packed"):  # the packed run's own log
        package([runs["packed"]], tmp_path, pack_code=True, name="other")


# ----------------------------------------------------------------------------- packing

def masked_lines(log: Path) -> list[str]:
    """The log after the code snapshot, without code-size lines and with timings blanked."""
    _, body = runlog.split_snapshot(log.read_text(encoding="utf-8"), log)
    lines = [line for line in body.splitlines() if not re.match(r"(Code size|Total submission size|fit_to_cap: headroom)", line)]
    return [re.sub(r":[\d.]+m?s\b", ":*", line) for line in lines]  # every duration (eval_plan's too)


def test_packed_stripped_script_runs_identically_and_logs_its_own_bytes(runs):
    plain, packed = runlog.read_log(runs["plain"]), runlog.read_log(runs["packed"])
    assert masked_lines(runs["packed"]) == masked_lines(runs["plain"])
    assert unpack(packed.code) == strip(plain.code)  # the packed run snapshotted the wrapper it ran...
    assert packed.code_bytes == len(packed.code.encode()) < plain.code_bytes - 30_000  # ...and counted its bytes


# ----------------------------------------------------------------------------- ablation

def test_ablation_arms_resolve_and_the_table_reads_real_logs(runs, tmp_path):
    for arm in bench_ablation.ARMS:  # every arm's settings are valid for the script
        env = bench_ablation.arm_env(arm, 1)
        args = subprocess.run([sys.executable, "-c", "import train_gpt as tg; a = tg.Hyperparameters(); "
                               "tg.validate_config(a, 1, 8); print(a.num_layers, a.iterations, a.seed)"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        assert args.returncode == 0 and args.stdout.split() == ["4", "306", "1"], (arm, args.stderr[-1000:])
    for arm in ("seeds", "loop"):
        (tmp_path / f"{arm}_s7").mkdir()
        (tmp_path / f"{arm}_s7" / "out.txt").write_text(runs["plain"].read_text())
    rows = bench_ablation.table(tmp_path, [7]).splitlines()
    bpb = float(re.search(r"final_int\d+_\w+_roundtrip_exact val_loss:\S+ val_bpb:(\S+)", runs["plain"].read_text()).group(1))
    assert len(rows) == 4 and f"| {bpb:.4f} | {bpb:.4f} |" in rows[2] and "| +0.0000 |" in rows[3]


# ----------------------------------------------------------------------------- significance

def test_one_sample_test_matches_the_closed_form():
    v = significance.improvement_test([1.000, 1.002, 1.004], [1.010])
    t = 0.003 / (0.002 / math.sqrt(3))  # (improvement - margin) / standard error
    assert v.t == pytest.approx(t) and v.df == 2
    assert v.p == pytest.approx(0.5 * (1 - t / math.sqrt(t * t + 2)))  # t distribution, 2 degrees of freedom
    assert v.p == pytest.approx(0.060845, abs=1e-6) and not v.qualifies


def test_welch_test_matches_the_closed_form():
    v = significance.improvement_test([1.000, 1.002, 1.004], [1.020, 1.022, 1.024])
    t = 0.015 / math.sqrt(2 * 0.002 ** 2 / 3)
    x = t * t / (4 + t * t)
    assert v.t == pytest.approx(t) and v.df == pytest.approx(4)  # Welch-Satterthwaite, equal variances
    assert v.p == pytest.approx(0.5 * (1 - math.sqrt(x) * (3 - x) / 2))  # t distribution, 4 degrees of freedom
    assert v.qualifies and "RECORD: p=0.000390" in v.report()


def test_significance_needs_two_seeds_and_a_margin():
    with pytest.raises(ValueError, match="at least 2"):
        significance.improvement_test([1.0], [1.1])
    # exactly the margin better: p = 0.5, never a record
    assert significance.improvement_test([1.0, 1.001, 0.999], [1.005]).p == pytest.approx(0.5)


# ----------------------------------------------------------------------------- size planner

def test_planner_is_within_5_percent_of_a_real_export(runs):
    run = runlog.read_log(runs["trained"])
    predicted = size_planner.predicted_model_bytes(runs["trained"])
    assert abs(predicted / run.model_bytes - 1) < size_planner.TOLERANCE, (predicted, run.model_bytes)


def test_planner_plans_the_default_configuration(capsys):
    assert size_planner.plan({}, ROOT / "train_gpt.py", packed=False) in (0, 2)
    out = capsys.readouterr().out
    assert "matrix_int6" in out and "embed_int8" in out and f"{(ROOT / 'train_gpt.py').stat().st_size:,}" in out
    with pytest.raises(size_planner.PlanError, match="did you mean NUM_LAYERS"):
        size_planner.plan({"NUM_LAYER": "12"}, ROOT / "train_gpt.py", packed=False)
    with pytest.raises(size_planner.PlanError, match="NUM_HEADS=3 must divide"):
        size_planner.plan({"NUM_HEADS": "3"}, ROOT / "train_gpt.py", packed=False)


def spend_table(out: str) -> dict[str, tuple[int, bool, str]]:
    """`spend`'s table: use -> (extra bytes, fits, setting)."""
    rows = re.findall(r"^(\S.*?)\s+([+-][\d,]+)  (yes|no) *(.*)$", out, re.M)
    return {use: (int(e.replace(",", "")), fits == "yes", setting) for use, e, fits, setting in rows}


def headroom_of(out: str) -> int:
    return int(re.search(r"^headroom: ([+-][\d,]+) bytes", out, re.M).group(1).replace(",", ""))


def test_spend_prices_the_uses_of_the_headroom_of_a_configuration(capsys):
    import torch
    assert size_planner.spend_config({"NUM_LAYERS": "2"}, ROOT / "train_gpt.py", packed=False) == 0
    out = capsys.readouterr().out
    rows, headroom = spend_table(out), headroom_of(out)
    assert headroom > 10_000_000 and "not val_bpb" in out and "nothing fits" not in out
    assert {"all attention matrices: int6 -> int7", "all MLP matrices: int6 -> int7",  # bits, width, depth
            "all embeddings: int8 -> fp16", "one more layer: NUM_LAYERS 2 -> 3"} <= set(rows)
    wider = [u for u in rows if u.startswith("wider MLP: MLP_MULT 3 -> ") and u.endswith("(largest that fits)")]
    assert len(wider) == 1 and all(fits and setting for _, fits, setting in rows.values())
    assert [e for e, *_ in rows.values()] == sorted(e for e, *_ in rows.values())
    # +1 bit on the MLP matrices: their parameters x the factor step (two classes rounded)
    _, _, stg, args = size_planner.configure({"NUM_LAYERS": "2"}, ROOT / "train_gpt.py")
    with torch.device("meta"):
        state = stg.GPT(args).state_dict()
    mlp = sum(t.numel() for n, t in state.items() if ".mlp." in n and stg.quant_bits_for(n, t, args) == 6)
    step = size_planner.FACTORS["matrix_int7"] - size_planner.FACTORS["matrix_int6"]
    assert abs(rows["all MLP matrices: int6 -> int7"][0] - mlp * step) <= 1
    # the one-layer QUANT_OVERRIDES gives exactly the last layer's MLP matrices one more bit
    setting = rows["MLP matrices, 1 layer: int6 -> int7"][2]
    assert setting == r"QUANT_OVERRIDES='^blocks\.1\.mlp\.(fc|proj)\.weight$:7'"
    args.quant_overrides = setting.split("=", 1)[1].strip("'")
    assert {n for n, t in state.items() if stg.quant_bits_for(n, t, args) == 7} == {"blocks.1.mlp.fc.weight",
                                                                                    "blocks.1.mlp.proj.weight"}
    # the largest MLP_MULT that fits: 0.25 more does not
    args.quant_overrides = ""
    base = size_planner.model_bytes(stg, args)
    args.mlp_mult = float(wider[0].split()[-4]) + 0.25
    assert size_planner.model_bytes(stg, args) - base > headroom >= rows[wider[0]][0]


def test_spend_over_the_cap_suggests_nothing(capsys):
    with pytest.raises(SystemExit) as done:
        size_planner.main(["spend", "NUM_LAYERS=2", "ARTIFACT_CAP=1000000"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    rows = spend_table(out)
    assert headroom_of(out) < 0 and "(ARTIFACT_CAP 1,000,000 - total" in out and "nothing fits" in out
    assert len(rows) >= 6 and not any(fits or setting for _, fits, setting in rows.values())
    assert "QUANT_OVERRIDES='" not in out and "MLP_MULT=" not in out and "NUM_LAYERS=" not in out
    with pytest.raises(SystemExit, match="spend takes one LOG or NAME=VALUE"):
        size_planner.main(["spend", "a.txt", "b.txt"])


def test_spend_reads_a_finished_run(tmp_path, capsys):
    """A log of a 4-layer run whose headroom buys one more bit on 2 layers' MLP matrices, not on 3."""
    import torch
    script = ROOT / "train_gpt.py"
    code, (_, _, stg, args) = script.read_text(encoding="utf-8"), size_planner.configure({"NUM_LAYERS": "4"}, script)
    with torch.device("meta"):
        state = stg.GPT(args).state_dict()
    layer = sum(t.numel() for n, t in state.items() if n.startswith("blocks.3.mlp.") and t.ndim == 2)
    model = size_planner.model_bytes(stg, args)
    total = model + len(code.encode())
    cap = total + round(2.5 * layer * (size_planner.FACTORS["matrix_int7"] - size_planner.FACTORS["matrix_int6"]))
    config = stg.config_dict(args) | {"artifact_cap": cap}

    def log(path, *lines):
        body = ["Running Python 3 PyTorch 2 device:cpu", "config " + json.dumps(config, sort_keys=True),
                "world_size:1 grad_accum_steps:8", *lines]
        path.write_text(code + "\n" + runlog.SEPARATOR + "\n" + "\n".join(body) + "\n", encoding="utf-8")
        return str(path)

    sizes = [f"Serialized model int6+zstd: {model} bytes", f"Code size: {len(code.encode())} bytes",
             f"Total submission size int6+zstd: {total} bytes"]
    with pytest.raises(SystemExit) as done:
        size_planner.main(["spend", log(tmp_path / "run.txt", f"fit_to_cap: headroom {cap - total} bytes under "
                                        f"ARTIFACT_CAP={cap} (records/size_planner.py spend: what it buys)", *sizes)])
    assert done.value.code == 0
    captured = capsys.readouterr()
    rows, out = spend_table(captured.out), captured.out
    assert headroom_of(out) == cap - total and f"logged: total {total:,} bytes" in out and "(+0.0%)" in out
    assert "warning" not in captured.err
    assert rows["MLP matrices, 2 of 4 layers: int6 -> int7"][1:] == (
        True, r"QUANT_OVERRIDES='^blocks\.(2|3)\.mlp\.(fc|proj)\.weight$:7'")
    assert rows["all attention matrices: int6 -> int7"][1] and not rows["all MLP matrices: int6 -> int7"][1]
    with pytest.raises(SystemExit):  # a headroom line that disagrees with the total: the total line counts
        size_planner.main(["spend", log(tmp_path / "odd.txt", f"fit_to_cap: headroom 5 bytes under ARTIFACT_CAP={cap}", *sizes)])
    captured = capsys.readouterr()
    assert "disagrees with its total size line" in captured.err and headroom_of(captured.out) == cap - total
    with pytest.raises(SystemExit, match="no `Total submission size` line"):
        size_planner.main(["spend", log(tmp_path / "crashed.txt", *sizes[:2])])


# ----------------------------------------------------------------------------- compare runs

def test_compare_runs_table_flags_failures_and_the_cap(runs, tmp_path):
    run = runlog.read_log(runs["plain"])
    over = edited(runs["plain"], tmp_path / "over.txt", subs=[(r'"run_id": "run"', '"run_id": "big"'),
                  (r"^(Total submission size \S+): \d+", r"\1: 16000001")])
    failed = edited(runs["plain"], tmp_path / "failed.txt", cut=r"final_int",
                    subs=[(r'"run_id": "run"', '"run_id": "bad"'), (r"\Z", "error: boom\n")])
    table = compare_runs.table([runlog.read_log(p) for p in (failed, over, runs["plain"])])
    rows = table.splitlines()
    assert "roundtrip bpb" in rows[0] and "sliding_window bpb" in rows[0] and "ttt bpb" not in rows[0]
    assert rows[2].startswith("| big |") and rows[2].endswith("| 16,000,001 | >CAP |")
    assert rows[3].startswith("| run |") and f"{run.score().val_bpb:.5f}" in rows[3]
    assert rows[4].startswith("| bad |") and "error: boom" in rows[4]
    pytest.importorskip("matplotlib")
    compare_runs.plot([runlog.read_log(p) for p in (runs["plain"], runs["trained"])], tmp_path / "c.png", "time")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- benchmarks

def test_model_flops_per_token_matches_torch_flop_counter():
    """The matmul part is exactly what torch counts for one forward+backward; attention by its formula."""
    import bench_step
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    args = tg.Hyperparameters()
    for k, v in dict(num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, rope_dims=4, vocab_size=64,
                     bigram_vocab_size=31, bigram_dim=8, ve_dim=8, train_seq_len=48, mlp_mult=2.0).items():
        setattr(args, k, v)
    model = tg.GPT(args)
    ids = torch.randint(0, 64, (2, 48))
    with FlopCounterMode(display=False) as counter:
        model(ids, ids).mean().backward()
    flops = bench_step.model_flops_per_token(model, args)
    assert counter.get_total_flops() / ids.numel() == flops["matmul"]
    assert flops["attention"] == 3 * 4 * 32 * 24 * 3 and flops["total"] == flops["matmul"] + flops["attention"]


def test_bench_step_runs_and_reports(tmp_path):
    sample = build_sample(tmp_path / "sample", vocab_size=512, train_tokens=30_000, val_docs=4)
    env = {k: v for k, v in os.environ.items() if k not in tg.KNOWN_ENV}
    env.update(SMOKE="1", DATA_PATH=str(sample[0]), TOKENIZER_PATH=str(sample[1]), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "records" / "bench_step.py"), "--steps", "2", "--warmup", "1",
                          "--phase-reps", "1", "--eval-tokens", "2048", "--json", str(tmp_path / "b.json")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["ms_per_step"] > 0 and 0 < res["mfu"] < 1 and res["tokens_per_s"] == pytest.approx(4096 / res["ms_per_step"] * 1000)
    assert res["sliding_eval_tokens"] == 2048 and res["export_bytes"] > 0 and len(res["phase_ms"]) == 3
    assert "ms/step" in out.stdout and "MFU" in out.stdout


def smoke_checkpoint(tmp_path):
    """(env, path) of a fresh SMOKE-shaped checkpoint on a sample built in tmp_path, for bench_eval.py."""
    sample = build_sample(tmp_path / "sample", vocab_size=512, train_tokens=30_000, val_docs=4)
    env = {k: v for k, v in os.environ.items() if k not in tg.KNOWN_ENV}
    env.update(SMOKE="1", DATA_PATH=str(sample[0]), TOKENIZER_PATH=str(sample[1]), OMP_NUM_THREADS="1")
    ckpt = tmp_path / "m.pt"
    subprocess.run([sys.executable, "-c", "import sys, torch, train_gpt as tg; "
                    "torch.save(tg.GPT(tg.Hyperparameters()).state_dict(), sys.argv[1])", str(ckpt)],
                   cwd=ROOT, env=env, check=True, timeout=120)
    return env, ckpt


def test_bench_eval_projects_each_mode_to_the_validation_set(tmp_path):
    """Each row: projected = s/target x N / G (as printed, within rounding); the total sums rows and audits."""
    env, ckpt = smoke_checkpoint(tmp_path)
    out = subprocess.run([sys.executable, str(ROOT / "records" / "bench_eval.py"), str(ckpt), "--val-tokens", "2048",
                          "--modes", "roundtrip,sliding_window", "--project-tokens", "1000000", "--project-gpus", "4", "--audit"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Projection for THIS device (cpu" in out.stdout
    assert re.search(r"^roundtrip: [\d,]+ windows computed for [\d,]+ ", out.stdout, re.M)  # 2,048 targets: one padded batch
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.splitlines()
            if line.startswith("| ") and line.count("|") == 7 and " s/target " not in line]
    assert [r[0] for r in rows] == ["roundtrip", "roundtrip+ngram (mixture only)", "sliding_window",
                                    "sliding_window+ngram (mixture only)"]
    total = 0.0
    for _, measured, targets, per, projected, audit in rows:
        assert targets == "2,048" and audit.endswith(" s")
        per, projected = float(per), float(projected.removesuffix(" s"))
        # Printed rounded: measured to .2f, s/target to 4 digits, projected and audit to .1f.
        assert abs(per - float(measured.removesuffix(" s")) / 2048) <= 2.5e-6 + 6e-4 * per
        assert abs(projected - per * 1_000_000 / 4) <= 0.051 + 6e-4 * projected
        total += projected + float(audit.removesuffix(" s"))
    last = out.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"total projected ([\d.]+) s \(every row, audits included\) against the 600 s evaluation budget: "
                     r"(under|OVER) by ([\d.]+) s", last)
    assert m, last
    assert float(m[1]) == pytest.approx(total, abs=0.05 * (2 * len(rows) + 1))
    assert float(m[3]) == pytest.approx(abs(600 - float(m[1])), abs=0.1)
    assert m[2] == ("under" if float(m[1]) <= 600 else "OVER")


def test_bench_eval_reuses_kept_network_scores(tmp_path):
    """--scores: the first run keeps each mode's network scores, the second reads them (no scoring) and gives
    the same val_bpb, alone and mixed; another target count or network setting is another file, a mixture setting not."""
    env, ckpt = smoke_checkpoint(tmp_path)

    def bench(n, **settings):
        out = subprocess.run([sys.executable, str(ROOT / "records" / "bench_eval.py"), str(ckpt), "--val-tokens", str(n),
                              "--modes", "sliding_window", "--scores", str(tmp_path / "scores")],
                             env=env | settings, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        row = next(line for line in out.stdout.splitlines() if line.startswith("| sliding_window |"))
        return [c.strip() for c in row.strip("|").split("|")], "network scores from" in out.stderr

    (first, reused), (again, reused_again) = bench(1024), bench(1024)
    assert not reused and reused_again
    assert first[1] == again[1] and first[3] == again[3]  # val_bpb alone and +ngram
    assert again[2] == "0.0 s"
    assert not bench(512)[1]  # another target count: scored afresh
    assert bench(1024, NGRAM_ORDER="3")[1] and not bench(1024, EVAL_STRIDE="16")[1]
    assert len(list((tmp_path / "scores").glob("m.sliding_window.*.pt"))) == 3
