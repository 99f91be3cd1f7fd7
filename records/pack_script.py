"""Pack train_gpt.py into a short self-extracting script (lzma + 7 bits a character + exec), and back.

    python3 records/pack_script.py train_gpt.py -o /tmp/train_gpt.py     # pack, print the bytes saved
    python3 records/pack_script.py --strip train_gpt.py -o /tmp/p.py     # also drop comments and docstrings
    python3 records/pack_script.py --unpack records/.../train_gpt.py     # print the readable source

`--strip` packs the same program without its comments and docstrings (the source is parsed and
written back by `ast.unparse`: formatting changes, behaviour does not; a test runs both and compares
their logs). `--unpack` then gives that stripped source, so keep the readable script in the repository.

The wrapper execs the source in its own module namespace, so `__name__` and `__file__` are the
wrapper's: the script snapshots its own (packed) file into the log and logs the packed bytes as
its code size, which is exactly the code that a submission counts. Run the packed file from the
repository root (SMOKE=1 imports data/ next to it), or give it DATA_PATH and TOKENIZER_PATH.
"""
from __future__ import annotations

import argparse
import ast
import base64
import lzma
import re
import sys
from pathlib import Path

# Raw LZMA2 (no .xz container) with pb=0: text has no 4-byte structure for the position bits to
# model (~2% smaller). The payload goes 7 bits to a character of a ''''' literal: one UTF-8 byte each,
# except the four values a literal cannot hold raw (NUL, CR, quote, backslash), written as chr(256 + v)
# in two bytes: ~1.18 bytes per payload byte (8/7 plus the escapes), against base85's 1.25.
FILTERS = [dict(id=lzma.FILTER_LZMA2, preset=9 | lzma.PRESET_EXTREME, lc=3, lp=0, pb=0, nice_len=64)]
UNSAFE = {0, 13, 39, 92}
PREFIX = "import lzma as L\ns='''"
SUFFIX = ("'''\nc=L.decompress(int(''.join(f'{ord(x)%%256:07b}'for x in s),2).to_bytes(%d,'big'),L.FORMAT_RAW,"
          "filters=[{'id':L.FILTER_LZMA2}])\nexec(c)\n")
PACKED_7BIT = re.compile(re.escape(PREFIX) + "(.*)" + re.escape(SUFFIX % 123).replace("123", r"(\d+)"), re.DOTALL)
B85_PREFIX = 'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("'  # scripts packed before 2026-11-25
B85_SUFFIXES = {'"),L.FORMAT_RAW,filters=[{"id":L.FILTER_LZMA2}]))\n': True, '")))\n': False}  # raw LZMA2, .xz


def pack(source: str) -> str:
    payload = lzma.compress(source.encode("utf-8"), format=lzma.FORMAT_RAW, filters=FILTERS)
    n = -(-len(payload) * 8 // 7)
    bits = bin(int.from_bytes(payload, "big"))[2:].zfill(7 * n)
    values = (int(bits[i:i + 7], 2) for i in range(0, 7 * n, 7))
    packed = PREFIX + "".join(chr(v + 256 if v in UNSAFE else v) for v in values) + SUFFIX % len(payload)
    assert unpack(packed) == source
    return packed


def strip(source: str) -> str:
    """The same program without comments and docstrings."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    # ast.unparse writes every statement on one line, indented by 4 per level: 1 per level is the
    # same program, and compresses smaller.
    lines = ast.unparse(tree).split("\n")
    out = "\n".join(" " * ((len(x) - len(x.lstrip(" "))) // 4) + x.lstrip(" ") for x in lines) + "\n"
    assert ast.dump(ast.parse(out)) == ast.dump(tree), "stripping changed the program"
    return out


def unpack(text: str) -> str | None:
    """The source inside a packed script, or None when `text` is not one made by pack()."""
    raw = dict(format=lzma.FORMAT_RAW, filters=[dict(id=lzma.FILTER_LZMA2)])
    if m := PACKED_7BIT.fullmatch(text):
        bits = "".join(f"{ord(c) % 256:07b}" for c in m.group(1))
        return lzma.decompress(int(bits, 2).to_bytes(int(m.group(2)), "big"), **raw).decode("utf-8")
    for suffix, is_raw in B85_SUFFIXES.items():
        if text.startswith(B85_PREFIX) and text.endswith(suffix):
            payload = base64.b85decode(text[len(B85_PREFIX):-len(suffix)])
            return lzma.decompress(payload, **(raw if is_raw else {})).decode("utf-8")
    return None


def readable(text: str) -> str:
    """The source of a script, packed or not."""
    source = unpack(text)
    return text if source is None else source


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("script", type=Path)
    p.add_argument("-o", "--output", type=Path, help="write the packed script here (default: only print sizes)")
    p.add_argument("--unpack", action="store_true", help="print the readable source of a packed script")
    p.add_argument("--strip", action="store_true", help="drop comments and docstrings before packing")
    a = p.parse_args(argv)
    text = a.script.read_text(encoding="utf-8")
    if a.unpack:
        source = unpack(text)
        if source is None:
            sys.exit(f"error: {a.script} is not a script packed by records/pack_script.py")
        sys.stdout.write(source)
        return
    if unpack(text) is not None:
        sys.exit(f"error: {a.script} is already packed")
    packed = pack(strip(text) if a.strip else text)
    if a.output:
        a.output.write_text(packed, encoding="utf-8")
    saved = utf8_len(text) - utf8_len(packed)
    print(f"{a.script}: {utf8_len(text)} bytes -> packed {utf8_len(packed)} bytes (saves {saved} bytes, "
          f"{saved / utf8_len(text):.1%})" + (f", written to {a.output}" if a.output else ""))


if __name__ == "__main__":
    main()
