"""Fuzzing: mutated shards and index files never crash wisca, hang it, or leave output behind.

Seeded and reproducible: a failing case prints its seed and mutation. Every case must end
with a verified output (exit 0) or a WiscaError (exit 2) and no DST, no temporary folder.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import struct
from pathlib import Path

import pytest
import torch

import wisca_cli as wisca
from conftest import SAMPLE, run_cli

DTYPES = ["F32", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F64", "F8_E4M3", "X1", "", "f32"]


def _header(data: bytes) -> tuple[int, dict | None]:
    n = struct.unpack("<Q", data[:8])[0]
    try:
        return n, json.loads(data[8:8 + n])
    except ValueError:
        return n, None


def _with_header(data: bytes, header: dict) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + data[8 + n:]


def mutate_shard(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    n, header = _header(data)
    kind = rng.choice(["truncate", "length", "json_byte", "offsets", "dtype", "shape", "data_byte", "rename"])
    if kind == "truncate":
        return kind, data[:rng.randrange(len(data))]
    if kind == "length":
        b = bytearray(data)
        b[rng.randrange(8)] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "json_byte":
        b = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            b[8 + rng.randrange(n)] = rng.randrange(256)
        return kind, bytes(b)
    if kind == "data_byte":
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[8 + n + rng.randrange(len(data) - 8 - n)] = rng.randrange(256)
        return kind, bytes(b)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    if kind == "offsets":
        a, z = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[a, z + 2], [a - 2, z], [z, a], [a, a], [0, z], [a + 4, z + 4],
                                            [a, rng.randrange(10 ** 12)], [-1, z]])
    elif kind == "dtype":
        entry["dtype"] = rng.choice(DTYPES)
    elif kind == "shape":
        entry["shape"] = rng.choice([entry["shape"][::-1], entry["shape"][:1], [0], entry["shape"] + [1], [-1]])
    else:
        header[rng.choice(names)] = header.pop(name)   # two names collide or one moves
    return kind, _with_header(data, header)


def mutate_index(text: str, rng: random.Random) -> tuple[str, str]:
    index = json.loads(text)
    wm = index["weight_map"]
    names, shards = list(wm), sorted(set(wm.values()))
    kind = rng.choice(["json", "drop", "move", "ghost_shard", "extra", "no_map", "bad_type"])
    if kind == "json":
        pos = rng.randrange(len(text))
        return kind, text[:pos] + rng.choice(["", "{", "]", '"', "\x00", "\\"]) + text[pos + 1:]
    if kind == "drop":
        del wm[rng.choice(names)]
    elif kind == "move":
        wm[rng.choice(names)] = rng.choice(shards)
    elif kind == "ghost_shard":
        wm[rng.choice(names)] = "model-99999-of-99999.safetensors"
    elif kind == "extra":
        wm["model.layers.0.self_attn.ghost.weight"] = rng.choice(shards)
    elif kind == "no_map":
        index.pop("weight_map")
    else:
        wm[rng.choice(names)] = rng.choice([None, 3, ["x"], "../x.safetensors"])
    return kind, json.dumps(index)


def check_case(src: Path, dst: Path, what: str) -> str:
    def hang(signum, frame):
        raise TimeoutError(f"{what}: hung")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(20)
    try:
        report = wisca.transform(src, dst)
        assert report["verification"]["passed"], what
        assert (dst / "wisca.json").exists(), what
        outcome = "ok"
    except wisca.WiscaError as e:
        assert e.exit_code == 2, (what, e)
        assert "\n" not in str(e) and str(e), (what, e)
        assert not dst.exists(), what
        outcome = "error"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert not [p for p in dst.parent.iterdir() if ".wisca-tmp-" in p.name], what
    shutil.rmtree(dst, ignore_errors=True)
    return outcome


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzz_sample_shard(tmp_path, seed):
    rng = random.Random(seed)
    original = (SAMPLE / "model.safetensors").read_bytes()
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_bytes((SAMPLE / "config.json").read_bytes())
    outcomes = {"ok": 0, "error": 0}
    for case in range(150):
        kind, data = mutate_shard(original, rng)
        (src / "model.safetensors").write_bytes(data)
        outcomes[check_case(src, tmp_path / "out", f"seed {seed} case {case} ({kind})")] += 1
    assert outcomes["error"] > 50   # the mutations do bite


def test_fuzz_sharded_index_and_shards(tmp_path, ckpt_dir):
    rng = random.Random(7)
    base = ckpt_dir("llama-gqa", torch.bfloat16, shard_size="40KB")
    src = tmp_path / "src"
    shutil.copytree(base, src)
    index_text = (base / "model.safetensors.index.json").read_text()
    shards = sorted(p.name for p in base.glob("model-*.safetensors"))
    outcomes = {"ok": 0, "error": 0}
    for case in range(200):
        if case % 2:
            kind, text = mutate_index(index_text, rng)
            (src / "model.safetensors.index.json").write_text(text)
            what = f"index case {case} ({kind})"
        else:
            shard = rng.choice(shards)
            kind, data = mutate_shard((base / shard).read_bytes(), rng)
            (src / shard).write_bytes(data)
            what = f"shard {shard} case {case} ({kind})"
        outcomes[check_case(src, tmp_path / "out", what)] += 1
        shutil.copytree(base, src, dirs_exist_ok=True)   # undo the mutation
    assert outcomes["error"] > 80 and outcomes["ok"] > 10


def test_fuzzed_inputs_through_the_cli_print_one_line(tmp_path):
    """A sample of the same mutations through the real CLI: exit 2, one line, no traceback."""
    rng = random.Random(11)
    original = (SAMPLE / "model.safetensors").read_bytes()
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_bytes((SAMPLE / "config.json").read_bytes())
    seen = 0
    while seen < 6:
        kind, data = mutate_shard(original, rng)
        if kind in ("data_byte",):
            continue
        (src / "model.safetensors").write_bytes(data)
        res = run_cli("transform", src, tmp_path / "out")
        assert res.returncode in (0, 2), (kind, res.stderr)
        assert "Traceback" not in res.stderr + res.stdout
        if res.returncode == 2:
            assert len(res.stderr.strip().splitlines()) == 1, res.stderr
            assert "model.safetensors" in res.stderr or "config.json" in res.stderr
            seen += 1
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
