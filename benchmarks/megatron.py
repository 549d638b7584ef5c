"""Benchmark: wisca on a Megatron-core torch_dist checkpoint (bf16 weights, fp32 master weights
and AdamW moments), cold, one process and 2 ranks, against a durable copy of the same folder.

    python -m benchmarks.megatron                  # TinyLlama shape with 8 layers (about 6.6 GiB)
    python -m benchmarks.megatron --layers 22      # the full TinyLlama shape (about 14.4 GiB; generated in memory)
    python -m benchmarks.megatron --rounds 3 --json out.json

The checkpoint is generated in the on-disk form megatron-core's ``dist_checkpointing.save``
writes with the torch_dist strategy (megatron need not be installed): every layer role one
stacked tensor ``decoder.layers.<role> [L, ...]`` held as one chunk per layer (torch's
``ShardedTensor`` with a local shard per layer, as megatron-core's ``_mcore_to_torch_sharded_tensor``
builds it), ``linear_qkv`` rows per kv group and ``linear_fc1`` gate then up,
``optimizer.state.{fp32_param,exp_avg,exp_avg_sq}.<key>`` shaped and chunked like the weight
(mixed precision: bf16 weights, fp32 masters), the common state as DCP bytes entries,
``metadata.json`` and ``latest_checkpointed_iteration.txt``. Not trained: random values.
Before every run the source is evicted from the page cache and the output removed; each round
runs ``cp -r && sync`` and then each wisca command; the ratio to the copy of the same round is
reported (median and spread), with peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .bench import Shape, paired_rounds, ratio_rows

REPO_ROOT = Path(__file__).resolve().parents[1]
ITERATION = 100
_MAKE = r"""
import io, json, sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties
out, s = sys.argv[1], json.loads(sys.argv[2])
dist.init_process_group("gloo")
L, D, I, H, G, V = s["layers"], s["hidden"], s["intermediate"], s["heads"], s["kv_heads"], s["vocab"]
d = D // H
roles = {"self_attention.linear_qkv.weight": ((H + 2 * G) * d, D), "self_attention.linear_qkv.layer_norm_weight": (D,),
         "self_attention.linear_proj.weight": (D, H * d), "mlp.linear_fc1.layer_norm_weight": (D,),
         "mlp.linear_fc1.weight": (2 * I, D), "mlp.linear_fc2.weight": (D, I)}
g = torch.Generator().manual_seed(0)

def stacked(shape, fill):
    # one local shard per layer at offset l on axis 0, as megatron-core saves a stacked tensor
    shards = [Shard.from_tensor_and_offsets(fill((1, *shape)), [l] + [0] * len(shape), 0) for l in range(L)]
    meta = ShardedTensorMetadata([sh.metadata for sh in shards], torch.Size((L, *shape)),
                                 TensorProperties(dtype=shards[0].tensor.dtype))
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, meta, process_group=None)

def weight(shape):
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

sd = {}
for name, shape in roles.items():
    w = stacked(shape, lambda sh: torch.ones(sh, dtype=torch.bfloat16) if len(sh) == 2 else weight(sh))
    key = "decoder.layers." + name
    sd[key] = w
    sd["optimizer.state.fp32_param." + key] = stacked(shape, lambda sh: torch.randn(sh, generator=g) * 0.02)
    sd["optimizer.state.exp_avg." + key] = stacked(shape, lambda sh: torch.randn(sh, generator=g) * 1e-4)
    sd["optimizer.state.exp_avg_sq." + key] = stacked(shape, lambda sh: torch.rand(sh, generator=g) * 1e-8)
for key, shape in {"embedding.word_embeddings.weight": (V, D), "decoder.final_layernorm.weight": (D,),
                   "output_layer.weight": (V, D)}.items():
    sd[key] = torch.ones(shape, dtype=torch.bfloat16) if len(shape) == 1 else weight(shape)
    sd["optimizer.state.fp32_param." + key] = sd[key].float()
    sd["optimizer.state.exp_avg." + key] = torch.randn(shape, generator=g) * 1e-4
    sd["optimizer.state.exp_avg_sq." + key] = torch.rand(shape, generator=g) * 1e-8
for k in ("iteration", "checkpoint_version"):
    sd["common_state/" + k] = io.BytesIO(torch.tensor(3).numpy().tobytes())
dcp.save(sd, checkpoint_id=out)
if dist.get_rank() == 0:
    json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1}, open(out + "/metadata.json", "w"))
dist.destroy_process_group()
"""


def tinyllama(layers: int) -> Shape:
    return Shape(layers=layers, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000, dtype="bf16")


def config(shape: Shape) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": shape.hidden,
            "intermediate_size": shape.intermediate, "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads, "num_hidden_layers": shape.layers, "vocab_size": shape.vocab,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu"}


def make(root: Path, shape: Shape) -> None:
    """``root``: Megatron-LM's save folder (the tracker and ``iter_0000100/``) and config.json."""
    root.mkdir(parents=True)
    it = root / f"iter_{ITERATION:07d}"
    res = subprocess.run([sys.executable, "-c", _LAUNCH, str(it), json.dumps(vars(shape))],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    (root / "config.json").write_text(json.dumps(config(shape), indent=1))
    os.sync()


# one process of a 1-rank gloo group (ShardedTensor needs a process group)
_LAUNCH = ("import os, sys; os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(29500 + os.getpid() % 1000), "
           "RANK='0', WORLD_SIZE='1', LOCAL_RANK='0'); exec(" + repr(_MAKE) + ")")


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the TinyLlama shape (default 8)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=REPO_ROOT / "bench_work" / "megatron")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    work, shape = args.workdir, tinyllama(args.layers)
    src, dst = work / "checkpoints", work / "dst"
    marker = work / "shape.json"        # a kept checkpoint is reused only for the same shape
    if not (src / "latest_checkpointed_iteration.txt").is_file() or not marker.is_file() \
            or json.loads(marker.read_text()) != vars(shape):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        make(src, shape)
        marker.write_text(json.dumps(vars(shape)))
    wisca = [sys.executable, "-m", "wisca_cli"]
    ranks = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "wisca_cli"]
    commands = {
        "cp -r && sync": ["sh", "-c", 'cp -r "$0" "$1" && sync', str(src), str(dst)],
        "wisca transform --no-verify": [*wisca, "transform", str(src), str(dst), "--no-verify"],
        "wisca transform": [*wisca, "transform", str(src), str(dst)],
        "torchrun -n 2 wisca transform": [*ranks, "transform", str(src), str(dst)],
    }
    runs = paired_rounds(commands, src, dst, work, args.rounds)
    nbytes = size_of(src)
    result = {"shape": vars(shape), "bytes": nbytes, "rounds": args.rounds,
              "commands": ratio_rows(runs, "cp -r && sync", nbytes)}
    print(f"\nMegatron-core torch_dist checkpoint: TinyLlama shape, {args.layers} layers, {nbytes / 2**30:.2f} GiB "
          f"(bf16 weights, fp32 masters and AdamW moments, stacked layers); cold, {args.rounds} rounds")
    print(f"{'command':32} {'median s':>9} {'vs cp -r && sync':>17} {'spread':>15} {'peak RSS MiB':>13}")
    for label, row in result["commands"].items():
        print(f"{label:32} {row['median_s']:9.2f} {row['ratio_median']:17.2f} "
              f"{row['ratio_min']:7.2f}-{row['ratio_max']:<7.2f} {row['peak_rss_mib']:13.0f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
