"""Predict the artifact size (code + compressed model) of a configuration before spending GPU time.

    python3 records/size_planner.py plan NUM_LAYERS=12 MLP_MULT=3.5 [--packed] [--script PATH]
    python3 records/size_planner.py check logs/*.txt                   # prediction vs the logged export
    python3 records/size_planner.py measure LOG CHECKPOINT [LOG CHECKPOINT ...]   # refit FACTORS
    python3 records/size_planner.py spend logs/RUN.txt | NAME=VALUE ...    # what the bytes under the cap buy

`plan` builds the model with the script's own classes on the meta device (no memory, no compute),
with the settings the script would see (this environment plus NAME=VALUE arguments, same names as
the script), sorts every tensor of the state dict by the script's own quant_bits_for into
quantized (embedding or matrix, by bits) and passthrough (fp16 2-D, fp32 the rest), and adds up
parameters x FACTORS (compressed bytes per parameter, measured on trained exports) + the code bytes.
Exit status 2 when the prediction is over the cap, 1 on bad input.

`spend` takes a finished run's log (its logged total size) or a configuration (plan's prediction)
and prints the headroom under ARTIFACT_CAP (never above 16,000,000), then candidate uses of it with
their extra bytes, sorted: one more bit on attention matrices, MLP matrices or embeddings; one more
bit on one layer's attention or MLP matrices, and on as many layers as fit (with the QUANT_OVERRIDES
value that does it: it names the last layers, put the ones you want); the largest MLP_MULT in steps
of 0.25 that fits; one more layer. Each is re-predicted as `plan` does, so the extra bytes are FACTORS
predictions (for a log, off by about as much as FACTORS are off on its model, which it prints), not
val_bpb predictions: which use buys the most val_bpb must be measured. Settings are printed only for
uses that fit. Exit status 0, 1 on bad input.

`measure` re-quantizes trained checkpoints (final_model.pt, with the configuration from their log)
with the script's quantizer at every bit width, compresses each tensor class alone with the
script's serializer and zstd at ZSTD_LEVEL, and prints the factors to paste into FACTORS. The
factors are for COMPRESSOR=zstd (`auto` can only be smaller). Short CPU runs train small models
for a few dozen steps; fully trained 8xH100 weights may compress differently: re-measure on a real
final_model.pt when you have one, and compare with `check` on its log.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import os
import re
import sys
import types
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack_script import pack, readable, utf8_len  # noqa: E402
from runlog import CAP_BYTES, LogError, read_log  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.05  # the planner's error on real exports is within this (tests/test_records.py checks it)

# Compressed bytes per parameter by tensor class, scales and JSON header included.
# Measured 2026-11-23 on a 2-core CPU VM by
#   python3 records/size_planner.py measure <log> <final_model.pt> ...   (runs listed in records/BENCHMARKS.md (Records tools))
HEADER_BYTES = 69  # an empty export: magic, JSON skeleton
FACTORS = {
    "embed_int2": 0.1598,  # 614,400 parameters
    "embed_int3": 0.2898,  # 614,400 parameters
    "embed_int4": 0.4114,  # 614,400 parameters
    "embed_int5": 0.5572,  # 614,400 parameters
    "embed_int6": 0.7082,  # 614,400 parameters
    "embed_int7": 0.8536,  # 614,400 parameters
    "embed_int8": 0.9861,  # 614,400 parameters
    "fp16": 1.7822,  # 1,678,080 parameters
    "fp32": 3.2761,  # 6,747 parameters
    "matrix_int2": 0.1032,  # 4,548,608 parameters
    "matrix_int3": 0.2728,  # 4,548,608 parameters
    "matrix_int4": 0.4078,  # 4,548,608 parameters
    "matrix_int5": 0.5570,  # 4,548,608 parameters
    "matrix_int6": 0.6601,  # 4,548,608 parameters
    "matrix_int7": 0.7833,  # 4,548,608 parameters
    "matrix_int8": 0.9088,  # 4,548,608 parameters
}


class PlanError(Exception):
    pass


# ----------------------------------------------------------------------------- the script and its model

def load_script(source: str, settings: dict[str, str], name: str = "train_gpt_planned") -> types.ModuleType:
    """Import a train_gpt.py source as a fresh module that reads `settings` on top of this environment
    (the script reads its settings from os.environ when its classes are defined)."""
    module = types.ModuleType(name)
    module.__file__ = str(ROOT / "train_gpt.py")
    saved = dict(os.environ)
    os.environ.update(settings)
    sys.modules[name] = module
    try:
        exec(compile(source, module.__file__, "exec"), module.__dict__)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        sys.modules.pop(name, None)
    if module.ENV_ERRORS:
        raise PlanError("; ".join(module.ENV_ERRORS))
    return module


def config_settings(config: dict) -> dict[str, str]:
    """A log's resolved config as the environment that reproduces it."""
    return {k.upper(): ("1" if v else "0") if isinstance(v, bool) else str(v) for k, v in config.items()}


def tensor_classes(tg, args) -> dict[str, list[int]]:
    """class (a FACTORS key) -> the numel of each of its tensors in the exported state dict."""
    import torch
    with torch.device("meta"):
        model = tg.GPT(args)
    classes = defaultdict(list)
    for name, t in model.state_dict().items():
        bits = tg.quant_bits_for(name, t, args)
        classes[tensor_class(tg, name, t, bits)].append(t.numel())
    return classes


def tensor_class(tg, name: str, t, bits: int | None) -> str:
    if bits is not None:  # lm_head joined EMBED_NAMES in later scripts; logs of earlier ones name it apart
        return f"{'embed' if name in tg.EMBED_NAMES or name == 'lm_head.weight' else 'matrix'}_int{bits}"
    return "fp16" if t.ndim == 2 else "fp32"


def model_bytes(tg, args) -> int:
    return HEADER_BYTES + sum(predict(tensor_classes(tg, args)).values())


def predict(classes: dict) -> dict[str, int]:
    missing = sorted(set(classes) - set(FACTORS))
    if missing:
        raise PlanError(f"no measured factor for {', '.join(missing)}: run `size_planner.py measure` on a "
                        "checkpoint with such tensors and add it to FACTORS")
    return {c: round(sum(numels) * FACTORS[c]) for c, numels in classes.items()}


# ----------------------------------------------------------------------------- plan

def configure(settings: dict[str, str], script: Path):
    """(script text, readable source, module, Hyperparameters) of a configuration, checked as the script would."""
    text = script.read_text(encoding="utf-8")
    source = readable(text)
    tg = load_script(source, settings)
    unknown = sorted(set(settings) - set(tg.KNOWN_ENV))
    if unknown:
        raise PlanError("not settings of this script: " + ", ".join(
            f"{u}" + "".join(f" (did you mean {m}?)" for m in difflib.get_close_matches(u, tg.KNOWN_ENV, n=1))
            for u in unknown))
    args = tg.Hyperparameters()
    try:
        tg.validate_config(args, 8, args.grad_accum_steps or 1)  # the 8-GPU record setup
    except tg.ConfigError as e:
        raise PlanError(str(e)) from None
    return text, source, tg, args


def plan(settings: dict[str, str], script: Path, packed: bool) -> int:
    text, source, tg, args = configure(settings, script)
    classes = tensor_classes(tg, args)
    sizes = predict(classes)
    code = utf8_len(pack(source) if packed else text)
    total = HEADER_BYTES + sum(sizes.values()) + code
    print(f"{'class':<14}{'tensors':>8}{'params':>14}{'bytes/param':>13}{'bytes':>13}")
    for c in sorted(sizes, key=sizes.get, reverse=True):
        params = sum(classes[c])
        print(f"{c:<14}{len(classes[c]):>8}{params:>14,}{FACTORS[c]:>13.4f}{sizes[c]:>13,}")
    print(f"{'header':<49}{HEADER_BYTES:>13,}")
    print(f"{'code' + (' (packed)' if packed else ''):<49}{code:>13,}")
    print(f"{'total':<49}{total:>13,}  (cap {CAP_BYTES:,}: {CAP_BYTES - total:+,} bytes)")
    if total > CAP_BYTES:
        print(f"OVER THE CAP: predicted {total:,} > {CAP_BYTES:,} bytes", file=sys.stderr)
        return 2
    if total > CAP_BYTES * (1 - TOLERANCE):
        print(f"WARNING: within the planner's {TOLERANCE:.0%} error of the cap: it may not fit "
              "(an over-cap run prunes to fit or stops)", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- check and measure

def run_module(log_path):
    run = read_log(log_path)
    tg = load_script(readable(run.code), config_settings(run.config))
    return run, tg, tg.Hyperparameters()


def predicted_model_bytes(log_path) -> int:
    """The planner's prediction for the configuration of a log, built with the log's own code."""
    _, tg, args = run_module(log_path)
    return model_bytes(tg, args)


def check(log_paths: list[Path]) -> None:
    print(f"{'log':<40}{'predicted':>12}{'real':>12}{'error':>9}")
    for path in log_paths:
        real = read_log(path).model_bytes
        if real is None:
            print(f"{str(path):<40}  no `Serialized model` line: skipped")
            continue
        predicted = predicted_model_bytes(path)
        print(f"{str(path):<40}{predicted:>12,}{real:>12,}{predicted / real - 1:>+9.2%}")


def quantize_all_at(tg, args, bits: int) -> None:
    """Make every tensor that the export quantizes use `bits`: each class setting (*_BITS) and each
    QUANT_OVERRIDES pattern (those keeping a tensor in fp16 stay)."""
    for attr in [a for a in vars(type(args)) if a.endswith("_bits")]:
        setattr(args, attr, bits)
    if getattr(args, "quant_overrides", ""):
        args.quant_overrides = ",".join(f"{p}:{16 if b >= 16 else bits}" for p, b in tg.quant_overrides(args))


def measure(pairs: list[tuple[Path, Path]]) -> None:
    import torch
    import zstandard
    total_bytes, total_params, header = defaultdict(int), defaultdict(int), 0
    for log_path, checkpoint in pairs:
        run, tg, args = run_module(log_path)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        compress = zstandard.ZstdCompressor(level=args.zstd_level).compress
        size = lambda qstate: len(compress(tg.serialize_quantized(qstate)))  # noqa: E731
        header = size({})
        for bits in range(2, 9):
            quantize_all_at(tg, args, bits)
            qstate = tg.quantize_state_dict(state, args)
            groups = defaultdict(list)
            for name, t in state.items():
                groups[tensor_class(tg, name, t, qstate[name]["bits"])].append(name)
            for c, names in groups.items():
                if bits > 2 and not c.startswith(("embed", "matrix")):
                    continue  # passthrough tensors do not depend on the bits: measured once
                total_bytes[c] += size({n: qstate[n] for n in names}) - header
                total_params[c] += sum(state[n].numel() for n in names)
        print(f"measured {log_path} with {checkpoint}", file=sys.stderr)
    print(f"HEADER_BYTES = {header}")
    print("FACTORS = {")
    for c in sorted(total_bytes):
        print(f'    "{c}": {total_bytes[c] / total_params[c]:.4f},  # {total_params[c]:,} parameters')
    print("}")


# ----------------------------------------------------------------------------- spend

def next_bits(bits: int | None) -> int | None:
    """One more bit: int8 -> 16 (fp16), the next setting the script accepts; None: nothing above."""
    return None if bits is None or bits >= 16 else 16 if bits == 8 else bits + 1


def more_bits(bits: int) -> str:
    return f"int{bits} -> {'fp16' if next_bits(bits) == 16 else f'int{next_bits(bits)}'}"


def alternation(names: list[str]) -> str:
    """A regex for exactly these names: [mlp.fc.weight, mlp.proj.weight] -> mlp\\.(fc|proj)\\.weight$"""
    if len(names) == 1:
        return re.escape(names[0]) + "$"
    parts = [n.split(".") for n in names]
    shortest = min(map(len, parts))
    pre = min(len(os.path.commonprefix(parts)), shortest - 1)  # common leading / trailing components
    suf = min(len(os.path.commonprefix([p[::-1] for p in parts])), shortest - pre - 1)
    dotted = lambda ps: re.escape(".".join(ps))  # noqa: E731
    head = dotted(parts[0][:pre]) + r"\." if pre else ""
    tail = r"\." + dotted(parts[0][len(parts[0]) - suf:]) if suf else ""
    return f"{head}({'|'.join(dotted(p[pre:len(p) - suf]) for p in parts)}){tail}$"


def uses(tg, args, headroom: int, world: int) -> list[tuple[int | None, str, str]]:
    """(extra bytes, use, setting) of each candidate use of the headroom, re-predicted as `plan` does
    (None: the script refuses the change). Bytes only: what each buys in val_bpb must be measured."""
    import torch
    base = model_bytes(tg, args)

    def extra(**changes) -> int | None:
        new = copy.copy(args)  # settings are class attributes: the copy's own override them
        for k, v in changes.items():
            setattr(new, k, v)
        try:
            tg.validate_config(new, world, new.grad_accum_steps or max(1, 8 // world))
        except tg.ConfigError:
            return None
        return model_bytes(tg, new) - base

    fits = lambda e: e is not None and e <= headroom  # noqa: E731
    rows = []
    for what, attr in (("attention matrices", "attn_bits"), ("MLP matrices", "mlp_bits"), ("embeddings", "embed_bits")):
        bits = getattr(args, attr)
        e = extra(**{attr: next_bits(bits)}) if next_bits(bits) else 0
        if e != 0:  # 0: QUANT_OVERRIDES sets the bits of every tensor of the class
            rows.append((e, f"all {what}: {more_bits(bits)}", f"{attr.upper()}={next_bits(bits)}"))
    L, prefix = args.num_layers, f"blocks.{args.num_layers - 1}."
    with torch.device("meta"):
        state = tg.GPT(args).state_dict()
    for what, mlp in (("attention", False), ("MLP", True)):
        last = {n[len(prefix):]: tg.quant_bits_for(n, t, args) for n, t in state.items()  # the last layer's
                if n.startswith(prefix) and (".mlp." in n) == mlp and tg.quant_bits_for(n, t, args)}  # quantized
        if len(set(last.values())) != 1 or not next_bits(bits := next(iter(last.values()))):
            continue  # none, or at several bit widths

        def overrides(layers, names=tuple(last), bits=bits) -> str:
            ids = "|".join(map(str, layers))
            item = rf"^blocks\.{ids if len(layers) == 1 else f'({ids})'}\.{alternation(list(names))}:{next_bits(bits)}"
            return ",".join(filter(None, (args.quant_overrides, item)))
        one = extra(quant_overrides=overrides([L - 1]))
        rows.append((one, f"{what} matrices, 1 layer: {more_bits(bits)}",
                     f"QUANT_OVERRIDES='{overrides([L - 1])}'"))
        k = min(L, headroom // one) if one else 0  # as many layers as fit (each costs the same)
        while k > 1 and not fits(e := extra(quant_overrides=overrides(range(L - k, L)))):
            k -= 1
        if k > 1 and (k < L or not any(use.startswith(f"all {what}") for _, use, _ in rows)):
            use = f"{what} matrices, {k} of {L} layers: {more_bits(bits)}"
            rows.append((e, use, f"QUANT_OVERRIDES='{overrides(range(L - k, L))}'"))
    mult = lambda k: args.mlp_mult + 0.25 * k  # noqa: E731
    k, hi = 0, 1  # the largest k that fits: bytes grow with MLP_MULT
    while fits(extra(mlp_mult=mult(hi))) and hi < 1 << 16:
        k, hi = hi, 2 * hi
    while hi - k > 1:
        k, hi = ((k + hi) // 2, hi) if fits(extra(mlp_mult=mult((k + hi) // 2))) else (k, (k + hi) // 2)
    rows.append((extra(mlp_mult=mult(max(k, 1))), f"wider MLP: MLP_MULT {args.mlp_mult:g} -> {mult(max(k, 1)):g}"
                 + (" (largest that fits)" if k else ""), f"MLP_MULT={mult(max(k, 1)):g}"))
    rows.append((extra(num_layers=L + 1), f"one more layer: NUM_LAYERS {L} -> {L + 1}", f"NUM_LAYERS={L + 1}"))
    return sorted(rows, key=lambda r: (r[0] is None, r[0] or 0))


def spend(tg, args, total: int, world: int) -> int:
    cap = min(getattr(args, "artifact_cap", CAP_BYTES), CAP_BYTES)
    headroom = cap - total
    print(f"headroom: {headroom:+,} bytes (ARTIFACT_CAP {cap:,} - total {total:,})")
    rows = uses(tg, args, headroom, world)
    print(f"\n{'use':<56}{'extra bytes':>13}  {'fits':<8}setting")
    for e, use, setting in rows:
        ok = e is not None and e <= headroom
        fits = "refused" if e is None else "yes" if ok else "no"  # refused: by the script's validate_config
        print(f"{use:<56}{'-' if e is None else f'{e:+,}':>13}  {fits:<8}{setting if ok else ''}".rstrip())
    print("\nextra bytes: predicted from FACTORS (compressed bytes per parameter), not val_bpb: "
          "which use buys the most val_bpb must be measured.\nlayers: a QUANT_OVERRIDES shown names the last ones, "
          "put those you want (blocks\\.(i|j|...)\\.).")
    if not any(e is not None and e <= headroom for e, *_ in rows):
        print(f"nothing fits: free {-headroom:,} bytes first" if headroom < 0 else "nothing fits")
    return 0


def spend_config(settings: dict[str, str], script: Path, packed: bool) -> int:
    text, source, tg, args = configure(settings, script)
    code, model = utf8_len(pack(source) if packed else text), model_bytes(tg, args)
    print(f"predicted: model {model:,} + code {code:,}{' (packed)' if packed else ''} = {model + code:,} bytes")
    return spend(tg, args, model + code, 8)


def spend_log(path: Path) -> int:
    run, tg, args = run_module(path)
    if run.note:
        print(f"note: {run.note}", file=sys.stderr)
    if run.total_bytes is None:
        raise LogError(f"{path}: no `Total submission size` line: the run did not export an artifact")
    print(f"logged: total {run.total_bytes:,} bytes" + (f" (model {run.model_bytes:,} + code {run.code_bytes:,})"
                                                         if run.model_bytes and run.code_bytes else ""))
    if run.model_bytes:
        predicted = model_bytes(tg, args)
        print(f"FACTORS predict this model at {predicted:,} bytes ({predicted / run.model_bytes - 1:+.1%}): "
              "the extra bytes below are likely off by about as much")
    logged = re.findall(r"^fit_to_cap: headroom (\d+) bytes under ARTIFACT_CAP=(\d+)",  # optional: a check
                        path.read_text(encoding="utf-8"), re.M)
    if logged and run.runs_in_file == 1 and int(logged[-1][0]) != int(logged[-1][1]) - run.total_bytes:
        print(f"warning: the log's fit_to_cap headroom {int(logged[-1][0]):,} disagrees with its total size line",
              file=sys.stderr)
    return spend(tg, args, run.total_bytes, run.world_size or 1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pl = sub.add_parser("plan", help="predict the artifact size of a configuration")
    pl.add_argument("settings", nargs="*", metavar="NAME=VALUE", help="settings on top of this environment")
    pl.add_argument("--script", type=Path, default=ROOT / "train_gpt.py", help="the script (packed or not)")
    pl.add_argument("--packed", action="store_true", help="count the code bytes of the packed script")
    ch = sub.add_parser("check", help="compare predictions with the model bytes in logs")
    ch.add_argument("logs", type=Path, nargs="+")
    me = sub.add_parser("measure", help="measure FACTORS on trained checkpoints")
    me.add_argument("pairs", type=Path, nargs="+", metavar="LOG CHECKPOINT")
    sp = sub.add_parser("spend", help="what the bytes under the cap of a log or a configuration buy")
    sp.add_argument("inputs", nargs="*", metavar="LOG | NAME=VALUE", help="a finished run's log, or settings (as plan)")
    sp.add_argument("--script", type=Path, default=ROOT / "train_gpt.py", help="the script (configurations only)")
    sp.add_argument("--packed", action="store_true", help="count the code bytes of the packed script")
    a = p.parse_args(argv)
    try:
        if a.command == "plan":
            bad = [s for s in a.settings if "=" not in s]
            if bad:
                raise PlanError(f"settings must be NAME=VALUE, got {' '.join(bad)}")
            sys.exit(plan(dict(s.split("=", 1) for s in a.settings), a.script, a.packed))
        elif a.command == "check":
            check(a.logs)
        elif a.command == "spend":
            if all("=" in s for s in a.inputs):
                sys.exit(spend_config(dict(s.split("=", 1) for s in a.inputs), a.script, a.packed))
            if len(a.inputs) > 1:
                raise PlanError(f"spend takes one LOG or NAME=VALUE settings, got {' '.join(a.inputs)}")
            sys.exit(spend_log(Path(a.inputs[0])))
        else:
            if len(a.pairs) % 2:
                raise PlanError("measure takes pairs: LOG CHECKPOINT [LOG CHECKPOINT ...]")
            measure(list(zip(a.pairs[::2], a.pairs[1::2])))
    except (PlanError, LogError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
