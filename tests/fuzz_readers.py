"""The readers' fuzzer, run in a child process by ``tests/test_hostile_files.py``.

``python fuzz_readers.py N SEED MARKER KIND=PATH...`` mutates every seed file N times (random
seed SEED) and loads each mutation with the reader of its KIND:

- ``pt2``: :func:`edgeslim.load_model` (zip members damaged one at a time, or whole bytes)
- ``weights``: :func:`edgeslim.core.models.storage.load_weights` (sparse safetensors)
- ``hf``: the ``hf:`` directory reader (sparse and bit-packed quantized tensors)
- ``slim``: :func:`edgeslim.unpack` (header values and stream bytes damaged, then framed
  again with correct CRCs so the damage reaches the validators and the decoders)

Seeds may be hostile (a pickle or a sympy payload that writes MARKER): their mutations must
not run it either. Every case must load or raise an ``EdgeslimError``, leave MARKER absent and
stay under ``2 x its declared tensor bytes + 64 MB`` (:class:`memprobe.Peak`: tracemalloc,
the per-case resident high-water mark and an address-space cap). Prints one JSON line: the
counts, the largest peak per kind, the time, and the first failure (the case is kept).
"""

from __future__ import annotations

import io
import json
import random
import struct
import sys
import time
import zipfile
import zlib
from pathlib import Path

import torch

import edgeslim
from edgeslim.core.errors import EdgeslimError
from edgeslim.core.models import hf, storage
from memprobe import MB, Peak  # this folder is on sys.path: the script runs from it


def _load_hf(path: Path):
    return hf._read(path.parent)


LOADERS = {
    "pt2": edgeslim.load_model,
    "weights": storage.load_weights,
    "hf": _load_hf,
    "slim": edgeslim.unpack,
}
SUFFIX = {"pt2": ".pt2", "weights": ".safetensors", "hf": ".safetensors", "slim": ".slim"}


class Mutator:
    def __init__(self, rng: random.Random):
        self.rng = rng

    def flip(self, data: bytes) -> bytes:
        rng, data = self.rng, bytearray(data)
        for _ in range(rng.choice([1, 1, 2, 4, 16])):
            op = rng.random()
            i = rng.randrange(len(data)) if data else 0
            if op < 0.6 and data:
                data[i] = rng.randrange(256)
            elif op < 0.8:
                data[i:i] = bytes([rng.choice([0, 0x22, 0x2D, 0x30, 0x39, 0x5B, 0x7B, 0xFF])])
            elif data:
                del data[i : i + rng.randrange(1, 9)]
        if rng.random() < 0.05:
            data = data[: rng.randrange(len(data) + 1)]
        return bytes(data)

    def json_text(self, text: bytes) -> bytes:
        """One integer of a JSON document set to a hostile value, or a few characters."""
        rng = self.rng
        if rng.random() < 0.6:
            try:
                obj = json.loads(text)
            except ValueError:
                obj = None
            leaves = []

            def walk(o):
                for k, v in o.items() if isinstance(o, dict) else enumerate(o):
                    if isinstance(v, (dict, list)):
                        walk(v)
                    elif isinstance(v, int):
                        leaves.append((o, k, v))

            if isinstance(obj, (dict, list)):
                walk(obj)
            if leaves:
                o, k, v = rng.choice(leaves)
                o[k] = rng.choice(
                    [0, 1, -1, v + 1, v * 2, v * 1000, 2**31 - 1, 2**40, float("inf")]
                )
                return json.dumps(obj).encode()
        out = bytearray(text)
        for _ in range(rng.choice([1, 2, 3])):
            i = rng.randrange(len(out)) if out else 0
            if rng.random() < 0.7 and out:
                out[i] = rng.choice(b'0123456789-[],:"{}eE.')
            else:
                out[i:i] = rng.choice([b"9" * rng.choice([3, 6, 9, 12]), b"Infinity", b"-1"])
        return bytes(out)

    def pt2(self, raw: bytes) -> bytes:
        if self.rng.random() < 0.2:
            return self.flip(raw)  # whole-file bytes: mostly caught by the zip's CRCs
        with zipfile.ZipFile(io.BytesIO(raw)) as zin:
            infos = zin.infolist()
            victim = self.rng.choice(infos).filename
            out = io.BytesIO()
            with zipfile.ZipFile(out, "w") as zout:
                for item in infos:
                    data = zin.read(item.filename)
                    if item.filename == victim:
                        is_json = item.filename.endswith(".json")
                        data = self.json_text(data) if is_json else self.flip(data)
                    zout.writestr(item, data)
        return out.getvalue()

    def safetensors(self, raw: bytes) -> bytes:
        n = int.from_bytes(raw[:8], "little")
        if self.rng.random() < 0.2:
            return self.flip(raw)
        head = json.loads(raw[8 : 8 + n])
        meta = head.get("__metadata__", {})
        r = self.rng.random()
        if r < 0.4 and meta:  # the metadata (shapes, quantized layers) as a document
            key = self.rng.choice(sorted(meta))
            meta[key] = self.json_text(meta[key].encode()).decode("latin-1")
        elif r < 0.7:  # the header's offsets, shapes and dtypes
            text = self.json_text(json.dumps(head).encode())
            return len(text).to_bytes(8, "little") + text + raw[8 + n :]
        else:  # the tensor bytes
            return raw[: 8 + n] + self.flip(raw[8 + n :])
        text = json.dumps(head).encode()
        return len(text).to_bytes(8, "little") + text + raw[8 + n :]

    def slim(self, raw: bytes) -> bytes:
        _, _, flags, _, h, n, _ = struct.unpack_from("<8sBBHIII", raw)
        head = raw[24 : 24 + h]
        text = zlib.decompress(head) if flags else head
        pos, streams = 24 + h + 8 * n, []
        for i in range(n):
            size = struct.unpack_from("<I", raw, 24 + h + 8 * i)[0]
            streams.append(raw[pos : pos + size])
            pos += size
        r = self.rng.random()
        if r < 0.1:
            return self.flip(raw)  # whole-file bytes: mostly caught by the CRCs
        if r < 0.75 or not streams:
            text = self.json_text(text)
        else:
            k = self.rng.randrange(len(streams))
            streams[k] = self.flip(streams[k])
        head = zlib.compress(text) if flags else text
        directory = b"".join(struct.pack("<II", len(s), zlib.crc32(s)) for s in streams)
        fixed = struct.pack("<8sBBHII", raw[:8], raw[8], flags, 0, len(head), len(streams))
        crc = zlib.crc32(directory, zlib.crc32(head, zlib.crc32(fixed)))
        return fixed + struct.pack("<I", crc) + head + directory + b"".join(streams)


def tensor_bytes(obj) -> int:
    """The bytes of the tensors a reader returned (a model's state, or a state dict)."""
    state = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    return sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))


def main(argv: list[str]) -> dict:
    n, seed, marker = int(argv[0]), int(argv[1]), Path(argv[2])
    seeds = [arg.split("=", 1) for arg in argv[3:]]
    rng = random.Random(seed)
    mutator = Mutator(rng)
    mutate = {"pt2": mutator.pt2, "weights": mutator.safetensors, "hf": mutator.safetensors}
    mutate["slim"] = mutator.slim
    work = marker.parent / "fuzz"
    torch.set_num_threads(1)
    plan = []
    for i, (kind, path) in enumerate(seeds):
        raw = Path(path).read_bytes()
        try:  # warm up (lazy imports, first-call caches) outside the measured cases
            declared = tensor_bytes(LOADERS[kind](Path(path)))
        except EdgeslimError:
            declared = 0  # a hostile seed
        folder = work / f"{i}-{kind}"
        folder.mkdir(parents=True, exist_ok=True)
        case = folder / ("model.safetensors" if kind == "hf" else "case" + SUFFIX[kind])
        plan.append((f"{kind}:{Path(path).name}", kind, raw, declared, case))
    stats = {label: {"loaded": 0, "refused": 0, "peak": 0} for label, *_ in plan}
    start = time.perf_counter()
    for i in range(n):
        for label, kind, raw, declared, case in plan:
            data = mutate[kind](raw)
            case.write_bytes(data)
            budget = 2 * max(declared, len(data)) + 64 * MB
            failure = None
            try:
                with Peak(budget) as peak:
                    LOADERS[kind](case)
                stats[label]["loaded"] += 1
            except EdgeslimError as exc:
                stats[label]["refused"] += 1
                peak.note(exc)
            except BaseException as exc:
                failure = f"{type(exc).__name__}: {exc}"[:500]
            if marker.exists():
                failure = "the planted code ran"
            elif failure is None and peak.over:
                failure = f"{peak.bytes} bytes (limit hit: {peak.hit_limit}), budget {budget}"
            stats[label]["peak"] = max(stats[label]["peak"], peak.bytes)
            if failure:
                kept = case.with_name(f"failure-{i}{case.suffix}")
                case.rename(kept)
                return {"failure": failure, "seed": label, "case": i, "file": str(kept)}
    return {
        "cases": sum(s["loaded"] + s["refused"] for s in stats.values()),
        "seconds": round(time.perf_counter() - start, 1),
        "peak_bytes": max(s["peak"] for s in stats.values()),
        "per_seed": stats,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
