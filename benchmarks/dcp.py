"""Benchmark: wisca on a torch.distributed checkpoint (model + AdamW moments), cold, against
a durable copy of the same folder.

    python -m benchmarks.dcp                      # TinyLlama shape with 8 layers (about 4.9 GB)
    python -m benchmarks.dcp --layers 22          # the full TinyLlama shape (about 11 GB)
    python -m benchmarks.dcp --rounds 3 --json out.json

The checkpoint is written the way an FSDP2 job writes it: two ranks (torchrun, gloo), every
tensor sharded by rows into two chunks, bf16 weights and fp32 ``exp_avg`` / ``exp_avg_sq`` /
``step`` under ``optimizer.state.<fqn>``, ``{"model": ..., "optimizer": ...}`` at the top.
Before every run the source is evicted from the page cache (and the output removed); the runs
of one round go in order (``cp -r && sync``, then each wisca command), rounds repeat, and each
wisca run is reported as its ratio to the copy of the same round (median and spread).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .bench import Shape, paired_rounds, ratio_rows, size_of

REPO_ROOT = Path(__file__).resolve().parents[1]
_MAKE = r"""
import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
import json
out, config = sys.argv[1], json.load(open(sys.argv[2]))
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
sys.path.insert(0, sys.argv[3])
from wisca_cli.spec import layout_from_config, expected_shapes
lay = layout_from_config(config)
shapes = {lay.spec.embed: (lay.vocab, lay.hidden), lay.spec.final_norm: (lay.hidden,),
          lay.spec.lm_head: (lay.vocab, lay.hidden)}
for i in range(lay.layers):
    shapes.update(expected_shapes(lay, i))
g = torch.Generator().manual_seed(rank)
model, opt = {}, {}
for name, shape in shapes.items():
    rows = shape[0] // world
    local = (shape[0] - rows * (world - 1) if rank == world - 1 else rows, *shape[1:])
    def piece(std, dtype, positive=False):
        t = torch.randn(local, generator=g) * std
        t = t.abs() if positive else t
        return DTensor.from_local(t.to(dtype), mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                                  stride=torch.empty(shape, device="meta").stride())
    model[name] = piece(1.0 if name.endswith("norm.weight") else 0.02, torch.bfloat16)
    opt[f"state.{name}.exp_avg"] = piece(1e-4, torch.float32)
    opt[f"state.{name}.exp_avg_sq"] = piece(1e-8, torch.float32, True)
    opt[f"state.{name}.step"] = torch.tensor(100.0)
    opt[f"param_groups.{name}.lr"] = 3e-4
dcp.save({"model": model, "optimizer": opt}, checkpoint_id=out)
dist.barrier()
dist.destroy_process_group()
"""


def tinyllama(layers: int) -> Shape:
    return Shape(layers=layers, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000)


def make(path: Path, shape: Shape) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(shape.config(), indent=1))
    script = path.parent / ".make_dcp.py"
    script.write_text(_MAKE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(script), str(path), str(path / "config.json"), str(REPO_ROOT)], check=True, env=env)
    os.sync()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the TinyLlama shape (default 8)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=REPO_ROOT / "bench_work" / "dcp")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    args = ap.parse_args(argv)
    work, shape = args.workdir, tinyllama(args.layers)
    src, dst = work / "src", work / "dst"
    marker = work / "shape.json"        # a kept checkpoint is reused only for the same shape
    if not (src / ".metadata").is_file() or not marker.is_file() or json.loads(marker.read_text()) != vars(shape):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        make(src, shape)
        marker.write_text(json.dumps(vars(shape)))
    wisca = [sys.executable, "-m", "wisca_cli"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "wisca_cli"]
    commands = {
        "cp -r && sync": ["sh", "-c", 'cp -r "$0" "$1" && sync "$1"/* "$1"/.metadata', str(src), str(dst)],
        "wisca transform --no-verify": [*wisca, "transform", str(src), str(dst), "--no-verify"],
        "wisca transform": [*wisca, "transform", str(src), str(dst)],
        "torchrun x2 wisca transform --no-verify": [*torchrun, "transform", str(src), str(dst), "--no-verify"],
        "torchrun x2 wisca transform": [*torchrun, "transform", str(src), str(dst)],
    }
    runs = paired_rounds(commands, src, dst, work, args.rounds)
    nbytes = size_of(src)
    result = {"shape": vars(shape), "bytes": nbytes, "rounds": args.rounds,
              "commands": ratio_rows(runs, "cp -r && sync", nbytes)}
    print(f"\nDCP checkpoint: TinyLlama shape, {args.layers} layers, {nbytes / 2**30:.2f} GiB "
          f"(bf16 weights + fp32 AdamW moments, 2 chunks per tensor); cold, {args.rounds} rounds")
    print(f"{'command':42} {'median s':>9} {'vs cp -r && sync':>17} {'spread':>15} {'peak RSS MiB':>13}")
    for label, row in result["commands"].items():
        print(f"{label:42} {row['median_s']:9.2f} {row['ratio_median']:16.2f}x "
              f"[{row['ratio_min']:.2f}-{row['ratio_max']:.2f}]".ljust(86) + f" {row['peak_rss_mib']:10.0f}")
    print("(peak RSS: the largest of the launched process and its children, e.g. one torchrun rank)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
