"""Compressed artifact size of one checkpoint under each byte layout and codec.

    [env overrides] python3 records/bench_artifact_layout.py final_model.pt

Quantizes with the script's settings (QUANT_METHOD is ignored: round to nearest with the clip
search; the layout question does not depend on GPTQ), then serializes the result as the script does
(arrays grouped by kind, 16/32-bit arrays byte-shuffled) and in plain per-tensor order without
shuffling, and compresses each with every available codec.
"""
import json
import struct
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def serialize_plain(qstate) -> bytes:
    """The baseline layout: tensors in state-dict order, q then scale, bytes as stored."""
    chunks, header, offset = [], {}, 0
    for name, e in qstate.items():
        header[name] = dict(bits=e["bits"], arrays={})
        for key in ("q", "scale") if e["bits"] else ("data",):
            raw = e[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            header[name]["arrays"][key] = dict(dtype=str(e[key].dtype), shape=list(e[key].shape), offset=offset)
            chunks.append(raw)
            offset += len(raw)
    head = json.dumps(header).encode()
    return tg.BLOB_MAGIC + struct.pack("<I", len(head)) + head + b"".join(chunks)


def main():
    args = tg.Hyperparameters()
    state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
    qstate = tg.quantize_state_dict(state, args)
    blobs = {"grouped + byte-shuffled (script)": tg.serialize_quantized(qstate), "plain per-tensor": serialize_plain(qstate)}
    codecs = tg._codecs()
    print(f"raw blob: {len(blobs['plain per-tensor']):,} bytes")
    print("| layout | " + " | ".join(codecs) + " |")
    print("|---|" + "---:|" * len(codecs))
    for name, blob in blobs.items():
        sizes = [len(tg.compress_artifact(blob, c, args.zstd_level)) for c in codecs]
        print(f"| {name} | " + " | ".join(f"{s:,}" for s in sizes) + " |")


if __name__ == "__main__":
    main()
