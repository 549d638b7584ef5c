"""Benchmark ``wisca`` against ``cp -r`` on a synthetic checkpoint.

    python -m benchmarks.bench                     # TinyLlama-1.1B shape, 3 rounds
    python -m benchmarks.bench --quick             # tiny shape, 1 round, under a minute
    python -m benchmarks.bench --shape llama3-8b --rounds 2   # Llama-3-8B shape, about 16 GB in 4 shards
    python -m benchmarks.bench --only cp --keep    # harness only, keep the checkpoint

(run from the repository root; the harness is not part of the installed package)

What it does:

1. Writes a random llama checkpoint of the requested shape into ``--workdir``, one tensor
   (in row chunks) at a time, so generating a 2 GiB checkpoint needs little memory. Tensor
   names and shapes come from wisca's llama architecture spec (``wisca_cli.spec``), and the
   shards are written with wisca's own shard writer (``wisca_cli.checkpoint.ShardWriter``).
   The shards are cut by size, so a decoder layer's tensors may straddle two shards, as in
   real HF checkpoints. A checkpoint from an earlier ``--keep`` run with the same shape is
   reused.
2. Times each command as a fresh subprocess, cold (source files evicted from the page
   cache first) and warm (an untimed warm-up right before the timed run), interleaved
   round by round so that drift hits every command alike, and reports medians.
3. Prints a table, checks the acceptance targets from the numbers, and writes JSON.
   Times are medians over rounds; peak RSS is the largest over all of a command's runs;
   "largest layer" is the biggest of: one decoder layer's tensors, the embedding, lm_head.
4. With ``--memory-scaling``, writes a checkpoint with twice the layers and compares the
   transform commands' peak RSS on both (warm runs, no eviction).

Peak RSS: Linux folds the parent's high-water RSS into a child's ``ru_maxrss`` at exec,
so a child spawned straight from this process (torch imported, tensors generated) would
report at least this process's peak. Each command therefore runs under a tiny Python
launcher (``_LAUNCHER``) that forks, execs and ``wait4``s it; the launcher's own ~8 MiB
is the floor of any reported peak RSS. Wall time is taken inside the launcher, from
fork to reap.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors import safe_open

from wisca_cli.checkpoint import INDEX_NAME, SINGLE_NAME, Shard, ShardWriter, TensorInfo, build_header
from wisca_cli.spec import Layout, expected_shapes, layout_from_config

MIB = 1024 * 1024
GIB = 1024 * MIB
REPO_ROOT = Path(__file__).resolve().parent.parent
STAMP_VERSION = 1
SHARD_METADATA = {"format": "pt"}

# name -> (torch dtype, safetensors dtype, config torch_dtype)
DTYPES = {
    "bf16": (torch.bfloat16, "BF16", "bfloat16"),
    "fp16": (torch.float16, "F16", "float16"),
    "fp32": (torch.float32, "F32", "float32"),
}
STD = 0.02                  # linears and embeddings ~ N(0, STD); norms ~ N(1, STD)
CHUNK_ELEMENTS = 4 * MIB    # rows generated per step: <= 16 MiB of float32

# Acceptance targets from the issue.
# against a durable copy (cp -r && sync) of the same round (the performance issue's targets)
TARGET_COLD_NO_VERIFY = 1.10
TARGET_COLD_VERIFY = 1.25
TARGET_WARM_NO_VERIFY = 1.25
TARGET_COLD_VERIFY_CMD = 1.25   # wisca verify, cold
TARGET_RSS_LAYERS = 2           # peak RSS <= 2 x largest layer + 400 MiB
TARGET_RSS_SLACK_MIB = 400
TARGET_SCALING = 1.10           # peak RSS with 2x layers within 10%

DEFAULT_SHAPE = dict(layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4,
                     vocab=32000, dtype="bf16")
QUICK_SHAPE = dict(layers=2, hidden=256, intermediate=688, heads=4, kv_heads=2,
                   vocab=1024, dtype="bf16")
SHAPES = {   # --shape presets; single flags (--layers ...) override them
    "tinyllama": DEFAULT_SHAPE,
    "llama3-8b": dict(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8,
                      vocab=128256, dtype="bf16"),     # about 16 GB; 4 shards like Meta's release
}
SHAPE_SHARDS = {"llama3-8b": 4}


# -- checkpoint shape ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    dtype: str = "bf16"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def validate(self) -> None:
        if min(self.layers, self.hidden, self.intermediate, self.heads, self.kv_heads, self.vocab) <= 0:
            raise SystemExit("shape: every dimension must be positive")
        if self.hidden % self.heads or self.head_dim % 2:
            raise SystemExit(f"shape: hidden {self.hidden} / heads {self.heads} must be an even integer")
        if self.heads % self.kv_heads:
            raise SystemExit(f"shape: heads {self.heads} must be a multiple of kv heads {self.kv_heads}")

    def layout(self) -> Layout:
        """wisca's view of the checkpoint: the llama spec combined with ``config()``."""
        return layout_from_config(self.config(), "benchmark shape")

    def tensors(self) -> list[TensorSpec]:
        """Every tensor of the checkpoint, in model order, named and shaped by wisca's llama
        spec (the tensors ``wisca transform`` expects for this config)."""
        layout = self.layout()
        spec = layout.spec
        out = [TensorSpec(spec.embed, (layout.vocab, layout.hidden), "embed")]
        for i in range(layout.layers):
            roles = {name: role for role, name in layout.layer_roles(i).items()}
            out += [TensorSpec(name, shape, f"layer {i}", norm=roles[name].endswith("norm"))
                    for name, shape in expected_shapes(layout, i).items()]
        out.append(TensorSpec(spec.final_norm, (layout.hidden,), "final norm", norm=True))
        if not layout.tie_embeddings:
            out.append(TensorSpec(spec.lm_head, (layout.vocab, layout.hidden), "lm_head"))
        return out

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "initializer_range": STD,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": DTYPES[self.dtype][2],
            "use_cache": True,
        }


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    group: str           # decoder layer / embed / final norm / lm_head: the unit "largest layer" counts
    norm: bool = False

    def nbytes(self, dtype: str) -> int:
        return math.prod(self.shape) * DTYPES[dtype][0].itemsize


def largest_layer(tensors: list[TensorSpec], dtype: str) -> tuple[str, int]:
    """The group (decoder layer, embedding, lm_head, ...) with the most bytes."""
    sizes: dict[str, int] = {}
    for t in tensors:
        sizes[t.group] = sizes.get(t.group, 0) + t.nbytes(dtype)
    name = max(sizes, key=sizes.get)
    return name, sizes[name]


def plan_shards(tensors: list[TensorSpec], dtype: str, count: int | None, size: int | None
                ) -> list[list[TensorSpec]]:
    """Cut the tensor list into shards of about ``size`` bytes (or ``count`` equal shards).

    A tensor goes to the shard its middle byte falls in, so shard boundaries land between
    tensors wherever they fall, splitting decoder layers across shards. Empty shards (a
    tensor larger than a shard) are dropped.
    """
    total = sum(t.nbytes(dtype) for t in tensors)
    if size is None:
        size = max(1, math.ceil(total / max(1, count or 1)))
    shards: dict[int, list[TensorSpec]] = {}
    offset = 0
    for t in tensors:
        n = t.nbytes(dtype)
        index = int((offset + n / 2) // size)
        if count:
            index = min(index, count - 1)
        shards.setdefault(index, []).append(t)
        offset += n
    return [shards[k] for k in sorted(shards)]


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


# -- writing ------------------------------------------------------------------------------------
def _tensor_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def tensor_chunks(t: TensorSpec, dtype: str, seed: int):
    """The tensor's values as row chunks (2-D, in the target dtype), from a per-tensor seed."""
    gen = torch.Generator().manual_seed(_tensor_seed(seed, t.name))
    rows = t.shape[0]
    cols = math.prod(t.shape[1:])
    step = max(1, CHUNK_ELEMENTS // cols)
    mean = 1.0 if t.norm else 0.0
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        chunk = torch.empty((n, cols), dtype=torch.float32).normal_(mean, STD, generator=gen)
        yield chunk.to(DTYPES[dtype][0])


def shard_layout(name: str, tensors: list[TensorSpec], dtype: str) -> Shard:
    """The shard as wisca's reader would describe it: tensors back to back in plan order."""
    infos, offset = [], 0
    for t in tensors:
        n = t.nbytes(dtype)
        infos.append(TensorInfo(t.name, name, DTYPES[dtype][1], t.shape, offset, n, offset))
        offset += n
    return Shard(name, Path(name), dict(SHARD_METADATA), infos, 0)


def write_shard(path: Path, name: str, tensors: list[TensorSpec], dtype: str, seed: int) -> int:
    """Write one shard with wisca's ``ShardWriter`` (the header, then each tensor's row
    chunks at their offsets; fsynced when the last tensor is in); returns the file size."""
    writer = ShardWriter(path, shard_layout(name, tensors, dtype), dict(SHARD_METADATA))
    try:
        for t in tensors:
            done, total = 0, t.nbytes(dtype)
            for chunk in tensor_chunks(t, dtype, seed):
                raw = chunk.contiguous().reshape(-1).view(torch.uint8)
                writer.write_part(t.name, done, raw, last=done + raw.numel() == total)
                done += raw.numel()
    except BaseException:
        writer.abort()
        raise
    return path.stat().st_size


@dataclass
class CheckpointInfo:
    path: str
    shape: dict
    seed: int
    shards: int
    tensors: int
    total_bytes: int            # tensor bytes, as in the index's total_size
    file_bytes: int             # everything on disk
    largest_layer: str
    largest_layer_bytes: int
    split_layers: int           # decoder layers whose tensors straddle two shards
    gen_seconds: float | None = None
    gen_peak_rss_mib: float | None = None
    reused: bool = False


def make_checkpoint(path: Path, shape: Shape, shards: int | None, shard_size: int | None,
                    seed: int) -> CheckpointInfo:
    """Write a checkpoint folder tensor by tensor; reuse a matching one from an earlier run."""
    tensors = shape.tensors()
    plan = plan_shards(tensors, shape.dtype, shards, shard_size)
    names = shard_names(len(plan))
    stamp_path = path.with_name(path.name + ".stamp.json")
    stamp = {"version": STAMP_VERSION, "shape": asdict(shape), "shards": shards,
             "shard_size": shard_size, "seed": seed}

    reused = path.is_dir() and stamp_path.is_file() and _read_json(stamp_path) == stamp
    start = time.perf_counter()
    if not reused:
        stamp_path.unlink(missing_ok=True)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        weight_map = {}
        for name, shard in zip(names, plan):
            write_shard(path / name, name, shard, shape.dtype, seed)
            weight_map.update({t.name: name for t in shard})
        total = sum(t.nbytes(shape.dtype) for t in tensors)
        if len(plan) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            _write_json(path / INDEX_NAME, index)
        _write_json(path / "config.json", shape.config())
    gen_seconds = time.perf_counter() - start

    check_checkpoint(path, plan, names, shape.dtype, seed)
    if not reused:
        _write_json(stamp_path, stamp)

    layer_shards: dict[str, set[str]] = {}
    for name, shard in zip(names, plan):
        for t in shard:
            layer_shards.setdefault(t.group, set()).add(name)
    group, group_bytes = largest_layer(tensors, shape.dtype)
    return CheckpointInfo(
        path=str(path), shape=asdict(shape), seed=seed, shards=len(plan), tensors=len(tensors),
        total_bytes=sum(t.nbytes(shape.dtype) for t in tensors),
        file_bytes=sum(f.stat().st_size for f in path.iterdir()),
        largest_layer=group, largest_layer_bytes=group_bytes,
        split_layers=sum(1 for g, s in layer_shards.items() if g.startswith("layer") and len(s) > 1),
        gen_seconds=None if reused else gen_seconds,
        gen_peak_rss_mib=None if reused else _self_peak_rss_mib(),
        reused=reused,
    )


def check_checkpoint(path: Path, plan: list[list[TensorSpec]], names: list[str], dtype: str,
                     seed: int) -> None:
    """Open every shard with safetensors and check names, shapes, dtypes, sizes and the
    index; regenerate the smallest tensor of each shard and compare it bit for bit."""
    st_dtype = DTYPES[dtype][1]
    if len(plan) > 1:
        index = _read_json(path / INDEX_NAME)
        expected = {t.name: name for name, shard in zip(names, plan) for t in shard}
        if index.get("weight_map") != expected:
            raise SystemExit(f"{path / INDEX_NAME}: weight_map does not match the shards written")
        total = sum(t.nbytes(dtype) for shard in plan for t in shard)
        if index.get("metadata", {}).get("total_size") != total:
            raise SystemExit(f"{path / INDEX_NAME}: total_size is not {total}")
    for name, shard in zip(names, plan):
        file = path / name
        layout = shard_layout(name, shard, dtype)
        expected_size = len(build_header(layout.tensors, layout.metadata)) + sum(t.nbytes(dtype) for t in shard)
        if file.stat().st_size != expected_size:
            raise SystemExit(f"{file}: {file.stat().st_size} bytes, expected {expected_size}")
        with safe_open(str(file), framework="pt") as f:
            if f.metadata() != SHARD_METADATA:
                raise SystemExit(f"{file}: unexpected metadata {f.metadata()}")
            if set(f.keys()) != {t.name for t in shard}:
                raise SystemExit(f"{file}: tensor names do not match the plan")
            for t in shard:
                sl = f.get_slice(t.name)
                if tuple(sl.get_shape()) != t.shape or sl.get_dtype() != st_dtype:
                    raise SystemExit(f"{file}: {t.name} is {sl.get_dtype()} {sl.get_shape()}, expected {t.shape}")
            probe = min(shard, key=lambda t: t.nbytes(dtype))
            expected_values = torch.cat(list(tensor_chunks(probe, dtype, seed))).reshape(probe.shape)
            if not torch.equal(f.get_tensor(probe.name), expected_values):
                raise SystemExit(f"{file}: {probe.name} does not hold the values written")


# -- page cache ---------------------------------------------------------------------------------
def cpu_facts() -> dict:
    """The CPU's model and the vector / matrix features that decide wisca's compute speed."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"cpu_model": model, "cpu_features": [f for f in wanted if f in flags]}


def cold_read_mb_s(*paths: Path) -> float:
    """One cold pass over the files (evicted first), like cat > /dev/null."""
    evict(*paths)
    t0 = time.perf_counter()
    warm_read(*paths)
    return sum(f.stat().st_size for f in files_under(*paths)) / (time.perf_counter() - t0) / 1e6


def files_under(*paths: Path) -> list[Path]:
    out = []
    for p in paths:
        out += [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return out


def evict(*paths: Path) -> None:
    """Drop the files' pages from the page cache (after writing back anything dirty)."""
    os.sync()
    for f in files_under(*paths):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_read(*paths: Path) -> None:
    """Read the files once, like ``cat FILES > /dev/null``."""
    buf = bytearray(16 * MIB)
    for f in files_under(*paths):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


# -- measuring one run ---------------------------------------------------------------------------
# Runs argv[2:], reaps it with wait4 and writes {"wall_s", "maxrss_kib", "rc"} to argv[1].
_LAUNCHER = r"""
import json, os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(out, "w") as f:
    json.dump({"wall_s": wall, "maxrss_kib": usage.ru_maxrss, "rc": os.waitstatus_to_exitcode(status)}, f)
"""


@dataclass
class Run:
    wall_s: float
    peak_rss_mib: float
    rc: int


class CommandFailed(Exception):
    pass


def run_measured(argv: list[str], log: Path, scratch: Path) -> Run:
    """Run argv as a fresh subprocess (output to ``log``); its wall time and peak RSS."""
    result = scratch / ".run.json"
    result.unlink(missing_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, str(result), *argv],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO_ROOT)
        _, status, _ = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not result.is_file():
        raise CommandFailed(f"launcher failed (exit {proc.returncode}) for {' '.join(argv)}\n{_tail(log)}")
    data = _read_json(result)
    run = Run(wall_s=data["wall_s"], peak_rss_mib=data["maxrss_kib"] / 1024, rc=data["rc"])
    if run.rc != 0:
        raise CommandFailed(f"exit {run.rc}: {' '.join(argv)}\n{_tail(log)}")
    return run


def tinyllama(layers: int, dtype: str = "bf16") -> Shape:
    """TinyLlama-1.1B's shape with ``layers`` decoder layers."""
    return Shape(layers=layers, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000, dtype=dtype)


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def print_ratio_rows(rows: dict[str, dict]) -> None:
    """``ratio_rows``' rows as a table: median seconds, ratio to the yardstick, spread, peak RSS."""
    print(f"{'command':32} {'median s':>9} {'vs cp -r && sync':>17} {'spread':>15} {'peak RSS MiB':>13}")
    for label, row in rows.items():
        print(f"{label:32} {row['median_s']:9.2f} {row['ratio_median']:17.2f} "
              f"{row['ratio_min']:7.2f}-{row['ratio_max']:<7.2f} {row['peak_rss_mib']:13.0f}")


def paired_rounds(commands: dict[str, list[str]], src: Path, dst: Path, work: Path, rounds: int) -> dict[str, list]:
    """Each round runs every command in order, each cold (``src`` evicted, ``dst`` removed
    first): label -> its ``Run`` per round, printed as they come."""
    runs: dict[str, list] = {k: [] for k in commands}
    for r in range(rounds):
        for label, cmd in commands.items():
            shutil.rmtree(dst, ignore_errors=True)
            evict(src)
            run = run_measured(cmd, work / "run.log", work)
            runs[label].append(run)
            print(f"round {r + 1} {label}: {run.wall_s:.2f} s, peak RSS {run.peak_rss_mib:.0f} MiB", flush=True)
    shutil.rmtree(dst, ignore_errors=True)
    return runs


def ratio_rows(runs: dict[str, list], yardstick: str, nbytes: int) -> dict[str, dict]:
    """label -> wall times, median, its ratio to the yardstick's run of the same round
    (median, min, max), peak RSS and throughput."""
    base = [x.wall_s for x in runs[yardstick]]
    rows = {}
    for label, rs in runs.items():
        walls = [x.wall_s for x in rs]
        ratios = [w / b for w, b in zip(walls, base)]
        rows[label] = {"wall_s": walls, "median_s": statistics.median(walls),
                       "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                       "peak_rss_mib": max(x.peak_rss_mib for x in rs),
                       "mb_per_s": nbytes / statistics.median(walls) / 1e6}
    return rows


# -- the commands -------------------------------------------------------------------------------
@dataclass
class Command:
    key: str
    label: str
    argv: list[str]
    reads: list[Path]             # evicted before a cold run, read by a "cat" warm-up
    output: Path | None = None    # removed before and after every run, outside the timed region


LABELS = {"cp": "cp -r", "cp-sync": "cp -r && sync", "transform-noverify": "wisca transform --no-verify",
          "transform": "wisca transform", "verify": "wisca verify"}
COMMAND_KEYS = list(LABELS)
DEFAULT_KEYS = ["cp", "cp-sync", "transform-noverify", "transform", "verify"]
WISCA_KEYS = {"transform-noverify", "transform", "verify"}
# wisca's fixed cost: what the CLI imports (torch included, with its GC settings), then exit
# the way the CLI exits (no interpreter teardown)
WISCA_STARTUP = "wisca start-up"
WISCA_STARTUP_CODE = "import os; from wisca_cli.cli import _import_api; _import_api(); os._exit(0)"


def build_commands(keys: list[str], wisca: list[str], src: Path, dst: Path, verify_dst: Path
                   ) -> list[Command]:
    s, d, v = str(src), str(dst), str(verify_dst)
    every = {
        "cp": (["cp", "-r", s, d], [src], dst),
        "cp-sync": (["sh", "-c", 'cp -r "$0" "$1" && sync "$1"/*', s, d], [src], dst),
        "transform-noverify": ([*wisca, "transform", s, d, "--no-verify"], [src], dst),
        "transform": ([*wisca, "transform", s, d], [src], dst),
        "verify": ([*wisca, "verify", s, v], [src, verify_dst], None),
    }
    return [Command(k, LABELS[k], *every[k]) for k in keys]


# -- the benchmark ------------------------------------------------------------------------------
@dataclass
class Results:
    cold: dict[str, list[Run]] = field(default_factory=dict)
    warm: dict[str, list[Run]] = field(default_factory=dict)


class Bench:
    def __init__(self, workdir: Path, console: Console, warmup: str):
        self.workdir = workdir
        self.console = console
        self.warmup = warmup
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def run(self, cmd: Command) -> Run:
        remove(cmd.output)
        try:
            return run_measured(cmd.argv, self.logs / f"{cmd.key}.log", self.workdir)
        finally:
            remove(cmd.output)

    def cold(self, cmd: Command) -> Run:
        evict(*cmd.reads)
        return self.run(cmd)

    def warm(self, cmd: Command) -> Run:
        if self.warmup == "cat":
            warm_read(*cmd.reads)
        else:
            self.run(cmd)
        return self.run(cmd)

    def loop(self, commands: list[Command], rounds: int) -> Results:
        """Round-robin: every round runs each command cold, then each command warm. The
        starting command rotates from round to round."""
        res = Results({c.key: [] for c in commands}, {c.key: [] for c in commands})
        for r in range(rounds):
            order = commands[r % len(commands):] + commands[:r % len(commands)]
            for mode, measure, store in (("cold", self.cold, res.cold), ("warm", self.warm, res.warm)):
                for cmd in order:
                    run = measure(cmd)
                    store[cmd.key].append(run)
                    self.progress(f"round {r + 1}/{rounds} {mode}", cmd.label, run)
        return res

    def startup(self, argvs: dict[str, list[str]], runs: int) -> dict[str, dict]:
        """Warm start-up: one untimed run, then ``runs`` timed ones; median wall time."""
        out = {}
        for label, argv in argvs.items():
            cmd = Command("startup", label, argv, [])
            try:
                self.run(cmd)
                times = [self.run(cmd).wall_s for _ in range(runs)]
            except CommandFailed as e:
                out[label] = {"median_s": None, "error": str(e).splitlines()[0]}
                self.console.print(f"  [yellow]start-up[/] {label}: failed ({str(e).splitlines()[0]})")
                continue
            out[label] = {"median_s": statistics.median(times), "runs_s": times}
            self.progress("start-up", label, Run(statistics.median(times), 0.0, 0), rss=False)
        return out

    def progress(self, what: str, label: str, run: Run, rss: bool = True) -> None:
        tail = f"  {run.peak_rss_mib:8.1f} MiB" if rss else ""
        self.console.print(f"  [dim]{what:<16}[/] {label:<44} {run.wall_s:8.2f} s{tail}", highlight=False)


def memory_scaling(bench: Bench, wisca: list[str], base: CheckpointInfo, double: CheckpointInfo,
                   rounds: int) -> dict:
    """Peak RSS of the two transform commands on the base and the 2x-layers checkpoint."""
    dst = bench.workdir / "dst"
    keys = ["transform-noverify", "transform"]
    runs: dict[tuple[str, str], list[Run]] = {}
    for r in range(rounds):
        for which, info in (("base", base), ("double", double)):
            for cmd in build_commands(keys, wisca, Path(info.path), dst, dst):
                run = bench.run(cmd)
                runs.setdefault((cmd.key, which), []).append(run)
                bench.progress(f"scaling {r + 1}/{rounds}", f"{cmd.label}, {info.shape['layers']} layers", run)
    out = {"base_layers": base.shape["layers"], "double_layers": double.shape["layers"],
           "target_ratio": TARGET_SCALING, "commands": {}}
    for key in keys:
        b = max(r.peak_rss_mib for r in runs[(key, "base")])
        d = max(r.peak_rss_mib for r in runs[(key, "double")])
        out["commands"][key] = {
            "label": LABELS[key], "base_peak_rss_mib": b, "double_peak_rss_mib": d, "ratio": d / b,
            "base_median_s": statistics.median(r.wall_s for r in runs[(key, "base")]),
            "double_median_s": statistics.median(r.wall_s for r in runs[(key, "double")]),
            "pass": d / b <= TARGET_SCALING,
        }
    return out


# -- summary and report -------------------------------------------------------------------------
def summarize(commands: list[Command], res: Results, startup_s: float = 0.0) -> dict[str, dict]:
    """Medians per command; ``*_ex_startup`` ratios subtract wisca's start-up (Python, torch
    and wisca imported as the CLI does, no work) from wisca's times."""
    out = {}
    for c in commands:
        cold, warm = res.cold[c.key], res.warm[c.key]
        out[c.key] = {
            "label": c.label,
            "argv": c.argv,
            "cold_median_s": statistics.median(r.wall_s for r in cold),
            "warm_median_s": statistics.median(r.wall_s for r in warm),
            "peak_rss_mib": max(r.peak_rss_mib for r in cold + warm),
            "cold": [asdict(r) for r in cold],
            "warm": [asdict(r) for r in warm],
        }
    sync = out.get("cp-sync")
    for key, s in out.items():   # paired: each run against the same round's durable copy
        for mode in ("cold", "warm"):
            if sync is None:
                s[f"{mode}_vs_sync"] = None
                continue
            ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(s[mode], sync[mode])]
            s[f"{mode}_vs_sync"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                                    "of_medians": s[f"{mode}_median_s"] / sync[f"{mode}_median_s"]}
    cp = out.get("cp")
    for key, s in out.items():
        lag = startup_s if key in WISCA_KEYS else 0.0
        for mode in ("cold", "warm"):
            s[f"{mode}_ratio_to_cp"] = s[f"{mode}_median_s"] / cp[f"{mode}_median_s"] if cp else None
            s[f"{mode}_ratio_ex_startup"] = (s[f"{mode}_median_s"] - lag) / cp[f"{mode}_median_s"] if cp else None
    return out


def check_targets(summary: dict[str, dict], largest_layer_bytes: int) -> list[dict]:
    """The issue's acceptance targets, from the measured numbers; None where not measured."""
    def ratio(key: str, mode: str) -> float | None:
        vs = summary[key].get(f"{mode}_vs_sync") if key in summary else None
        return vs["median"] if vs else None

    rss_limit = TARGET_RSS_LAYERS * largest_layer_bytes / MIB + TARGET_RSS_SLACK_MIB
    wisca_rss = [(s["peak_rss_mib"], s["label"]) for k, s in summary.items() if k in WISCA_KEYS]
    worst = max(wisca_rss) if wisca_rss else (None, "")
    targets = [
        ("cold transform --no-verify vs cp -r && sync", ratio("transform-noverify", "cold"), TARGET_COLD_NO_VERIFY, "x"),
        ("cold transform (verify) vs cp -r && sync", ratio("transform", "cold"), TARGET_COLD_VERIFY, "x"),
        ("warm transform --no-verify vs cp -r && sync", ratio("transform-noverify", "warm"), TARGET_WARM_NO_VERIFY,
         "x"),
        ("cold verify vs cp -r && sync", ratio("verify", "cold"), TARGET_COLD_VERIFY_CMD, "x"),
        (f"peak RSS ({worst[1] or 'wisca'})", worst[0], rss_limit, " MiB"),
    ]
    return [{"target": name, "value": value, "limit": limit, "unit": unit,
             "pass": None if value is None else value <= limit}
            for name, value, limit, unit in targets]


def report(console: Console, result: dict) -> None:
    ck = result["checkpoint"]
    sh = ck["shape"]
    console.print()
    console.print(
        f"[bold]Checkpoint[/] {ck['path']}: llama {sh['layers']} layers, hidden {sh['hidden']}, "
        f"intermediate {sh['intermediate']}, {sh['heads']}/{sh['kv_heads']} heads, vocab {sh['vocab']}, "
        f"{sh['dtype']}; {ck['total_bytes'] / GIB:.2f} GiB in {ck['shards']} shards "
        f"({ck['split_layers']} layers split across shards)", highlight=False)
    console.print(f"[bold]Largest layer[/] {ck['largest_layer']}: {ck['largest_layer_bytes'] / MIB:.1f} MiB "
                  f"({ck['largest_layer_bytes']} bytes)", highlight=False)
    if ck["reused"]:
        console.print("[bold]Generation[/] reused from an earlier --keep run")
    else:
        console.print(f"[bold]Generation[/] {ck['gen_seconds']:.1f} s, bench process peak RSS "
                      f"{ck['gen_peak_rss_mib']:.0f} MiB (after importing torch: "
                      f"{result['bench_rss_before_gen_mib']:.0f} MiB)", highlight=False)
    startup = ", ".join(f"{label} {v['median_s']:.2f} s" if v["median_s"] is not None else f"{label} n/a"
                        for label, v in result["startup"].items())
    console.print(f"[bold]Start-up[/] (warm, median of {result['startup_runs']}): {startup}", highlight=False)

    m = result["machine"]
    console.print(f"[bold]Machine[/] {m.get('cpu_model', '?')}, {m['cpus']} CPUs, features: "
                  f"{', '.join(m.get('cpu_features', [])) or '?'}", highlight=False)
    disk = result.get("disk") or {}
    if disk:
        console.print(f"[bold]Disk[/] (this run, the checkpoint's {disk['bytes'] / GIB:.2f} GiB): cold read "
                      f"{disk['cold_read_mb_s']:.0f} MB/s (one pass, evicted first); durable copy "
                      f"(cp -r && sync, cold, median) {disk['durable_copy_mb_s']:.0f} MB/s", highlight=False)

    table = Table(title=f"Median of {result['rounds']} rounds ({result['warmup']} warm-up); ratios to the same "
                        f"round's cp -r && sync: median [min-max]")
    for col in ("command", "cold s", "warm s", "cold / cp -r && sync", "warm / cp -r && sync", "cold / cp -r",
                "peak RSS MiB"):
        table.add_column(col, justify="left" if col == "command" else "right")
    fmt_ratio = lambda v: "–" if v is None else f"{v:.2f}x"   # noqa: E731
    fmt_vs = lambda v: "–" if not v else f"{v['median']:.2f}x [{v['min']:.2f}-{v['max']:.2f}]"   # noqa: E731
    for s in result["commands"].values():
        table.add_row(s["label"], f"{s['cold_median_s']:.2f}", f"{s['warm_median_s']:.2f}",
                      fmt_vs(s.get("cold_vs_sync")), fmt_vs(s.get("warm_vs_sync")),
                      fmt_ratio(s["cold_ratio_to_cp"]), f"{s['peak_rss_mib']:.0f}")
    table.caption = ("cp -r does not wait for the disk; wisca returns once its output is durable, so the "
                     "yardstick is cp -r && sync")
    console.print(table)

    console.print("[bold]Acceptance targets[/]")
    for t in result["targets"]:
        value = "not measured" if t["value"] is None else f"{t['value']:.2f}{t['unit']}"
        verdict = {True: "[green]PASS[/]", False: "[red]FAIL[/]", None: "[dim]n/a [/]"}[t["pass"]]
        console.print(f"  {verdict} {t['target']}: {value} (limit {t['limit']:.2f}{t['unit']})", highlight=False)

    ms = result.get("memory_scaling")
    if ms:
        table = Table(title=f"Memory scaling: {ms['base_layers']} vs {ms['double_layers']} layers "
                            f"(peak RSS, max of {result['rounds']} runs)")
        for col in ("command", f"{ms['base_layers']} layers MiB", f"{ms['double_layers']} layers MiB",
                    "ratio", "time ratio", "within 10%"):
            table.add_column(col, justify="left" if col == "command" else "right")
        for key, s in ms["commands"].items():
            table.add_row(s["label"], f"{s['base_peak_rss_mib']:.0f}", f"{s['double_peak_rss_mib']:.0f}",
                          f"{s['ratio']:.3f}", f"{s['double_median_s'] / s['base_median_s']:.2f}",
                          "[green]PASS[/]" if s["pass"] else "[red]FAIL[/]")
        console.print(table)


# -- helpers ------------------------------------------------------------------------------------
def remove(path: Path | None) -> None:
    if path is not None and path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def _write_json(path: Path, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _self_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 1GiB, 123456)")
    unit = (m.group(2) or "").lower().rstrip("b").rstrip("i")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(unit or " "))


# -- command line -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = p.add_argument_group("checkpoint shape (default: TinyLlama-1.1B)")
    shape.add_argument("--shape", choices=sorted(SHAPES), default=None,
                       help="a preset: tinyllama (2.05 GiB, the default) or llama3-8b (about 16 GB, 4 shards)")
    shape.add_argument("--layers", type=int)
    shape.add_argument("--hidden", type=int)
    shape.add_argument("--intermediate", type=int)
    shape.add_argument("--heads", type=int)
    shape.add_argument("--kv-heads", type=int)
    shape.add_argument("--vocab", type=int)
    shape.add_argument("--dtype", choices=sorted(DTYPES))
    shards = shape.add_mutually_exclusive_group()
    shards.add_argument("--shards", type=int, help="number of shards (default 5; fewer if a shard would be smaller than a tensor)")
    shards.add_argument("--shard-size", type=parse_size, help="about this many bytes per shard (e.g. 400MB)")
    shape.add_argument("--seed", type=int, default=0)

    run = p.add_argument_group("benchmark")
    run.add_argument("--workdir", type=Path, default=Path("bench_work"))
    run.add_argument("--rounds", type=int, help="rounds; medians are over these (default 3)")
    run.add_argument("--only", help=f"comma-separated commands to time, from {','.join(COMMAND_KEYS)} "
                                    f"(default {','.join(DEFAULT_KEYS)})")
    run.add_argument("--warmup", choices=["rerun", "cat"],
                     help="warm runs: an untimed run of the same command first (default), "
                          "or read the inputs like cat (default with --quick)")
    run.add_argument("--startup-runs", type=int, help="timed runs per start-up command (default 5)")
    run.add_argument("--memory-scaling", action="store_true",
                     help="also compare peak RSS of transform on a checkpoint with twice the layers")
    run.add_argument("--wisca-cmd", default=None,
                     help=f"how to invoke wisca (default: '{sys.executable} -m wisca_cli')")
    run.add_argument("--quick", action="store_true",
                     help="tiny shape (2 layers, hidden 256), 1 round, 1 start-up run, cat warm-up: "
                          "a sanity check")
    run.add_argument("--make-only", action="store_true", help="write the checkpoint, check it and stop (implies --keep)")
    run.add_argument("--keep", action="store_true", help="keep the work folder (its checkpoints are reused)")
    run.add_argument("--json", type=Path, help="write the results to this file")
    args = p.parse_args(argv)

    if args.quick and args.shape:
        p.error("--quick and --shape exclude each other")
    preset = QUICK_SHAPE if args.quick else SHAPES[args.shape or "tinyllama"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.shards is None and args.shard_size is None:
        args.shards = SHAPE_SHARDS.get(args.shape, 5)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.startup_runs = args.startup_runs or (1 if args.quick else 5)
    args.warmup = args.warmup or ("cat" if args.quick else "rerun")
    keys = [k.strip() for k in (args.only or ",".join(DEFAULT_KEYS)).split(",") if k.strip()]
    unknown = [k for k in keys if k not in COMMAND_KEYS]
    if unknown or not keys:
        p.error(f"--only: unknown command(s) {unknown}; choose from {','.join(COMMAND_KEYS)}")
    args.keys = list(dict.fromkeys(keys))
    if args.rounds < 1 or args.startup_runs < 1 or (args.shards is not None and args.shards < 1):
        p.error("--rounds, --startup-runs and --shards must be at least 1")
    args.keep = args.keep or args.make_only
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:     # piped or logged: don't wrap the tables at 80 columns
        console = Console(width=max(console.width, 110))
    shape = Shape(args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab, args.dtype)
    shape.validate()
    wisca = args.wisca_cmd.split() if args.wisca_cmd else [sys.executable, "-m", "wisca_cli"]

    workdir = args.workdir.resolve()
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    src, dst, verify_dst = workdir / "src", workdir / "dst", workdir / "verify-dst"
    src2 = workdir / "src-2x"
    try:
        result: dict = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform(), **cpu_facts()},
            "rounds": args.rounds, "warmup": args.warmup, "startup_runs": args.startup_runs,
            "bench_rss_before_gen_mib": _self_peak_rss_mib(),
        }
        console.print(f"Writing checkpoint to {src} ...", highlight=False)
        info = make_checkpoint(src, shape, args.shards, args.shard_size, args.seed)
        result["checkpoint"] = asdict(info)
        console.print(f"  {info.total_bytes / GIB:.2f} GiB, {info.shards} shards, "
                      + ("reused" if info.reused else f"{info.gen_seconds:.1f} s, bench peak RSS "
                                                      f"{info.gen_peak_rss_mib:.0f} MiB"), highlight=False)
        if args.make_only:
            return 0

        bench = Bench(workdir, console, args.warmup)
        console.print("Start-up:")
        startup = {"python -c pass": [sys.executable, "-c", "pass"],
                   "python -c 'import torch'": [sys.executable, "-c", "import torch"]}
        if WISCA_KEYS & set(args.keys) or args.memory_scaling:
            startup["wisca --help"] = [*wisca, "--help"]
            startup[WISCA_STARTUP] = [*wisca[:-2], "-c", WISCA_STARTUP_CODE] if wisca[-2:] == ["-m", "wisca_cli"] \
                else [sys.executable, "-c", WISCA_STARTUP_CODE]
        result["startup"] = bench.startup(startup, args.startup_runs)
        if result["startup"].get("wisca --help", {}).get("median_s", 0) is None:
            raise CommandFailed("wisca does not start (see above); try --only cp,cp-sync for the harness alone")

        commands = build_commands(args.keys, wisca, src, dst, verify_dst)
        if "verify" in args.keys:     # `wisca verify SRC VERIFY_DST` needs a transformed checkpoint
            console.print(f"Transforming once into {verify_dst} for `wisca verify` ...", highlight=False)
            remove(verify_dst)
            run_measured([*wisca, "transform", str(src), str(verify_dst), "--no-verify"],
                         bench.logs / "verify-dst.log", workdir)
        console.print(f"Timing {len(commands)} commands, {args.rounds} rounds, cold and warm:")
        res = bench.loop(commands, args.rounds)
        wisca_start = result["startup"].get(WISCA_STARTUP, {}).get("median_s") or 0.0
        result["commands"] = summarize(commands, res, wisca_start)
        result["targets"] = check_targets(result["commands"], info.largest_layer_bytes)
        # the disk's own speed today, so a slow disk can be told from a slow wisca
        sync = result["commands"].get("cp-sync")
        result["disk"] = {"bytes": info.total_bytes, "cold_read_mb_s": cold_read_mb_s(src),
                          "durable_copy_mb_s": info.total_bytes / sync["cold_median_s"] / 1e6 if sync else None}
        if not sync:
            result["disk"]["durable_copy_mb_s"] = float("nan")

        if args.memory_scaling:
            doubled = Shape(**{**asdict(shape), "layers": 2 * shape.layers})
            console.print(f"Writing the {doubled.layers}-layer checkpoint to {src2} ...", highlight=False)
            info2 = make_checkpoint(src2, doubled, args.shards, args.shard_size, args.seed)
            result["checkpoint_2x"] = asdict(info2)
            result["memory_scaling"] = memory_scaling(bench, wisca, info, info2, args.rounds)

        report(console, result)
        if args.json:
            _write_json(args.json, result)
            console.print(f"Results written to {args.json}", highlight=False)
        return 0
    except CommandFailed as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        return 1
    finally:
        if not args.keep:
            for path in (src, src2, dst, verify_dst, workdir / "logs", workdir / ".run.json",
                         src.with_name("src.stamp.json"), src2.with_name("src-2x.stamp.json")):
                remove(path)
            if created and not any(workdir.iterdir()):
                workdir.rmdir()


if __name__ == "__main__":
    sys.exit(main())
