"""Benchmark: wisca on a Megatron-core torch_dist checkpoint (bf16 weights, fp32 master weights
and AdamW moments), cold, one process and 2 ranks, against a durable copy of the same folder.

    python -m benchmarks.megatron                  # TinyLlama shape with 8 layers (about 6.6 GiB)
    python -m benchmarks.megatron --layers 22      # the full TinyLlama shape (about 15 GiB)
    python -m benchmarks.megatron --rounds 3 --json out.json

The checkpoint is generated in the on-disk form megatron-core's ``dist_checkpointing.save``
writes with the torch_dist strategy (megatron need not be installed), a chunk at a time so any
size fits in memory: every layer role one stacked tensor ``decoder.layers.<role> [L, ...]`` held
as one chunk per layer (as megatron-core's ``_mcore_to_torch_sharded_tensor`` hands it to torch
DCP), each chunk a ``torch.save`` archive in ``__0_0.distcp`` as DCP's file system writer lays it out,
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
import sys
from pathlib import Path

from .bench import Shape, paired_rounds, print_ratio_rows, ratio_rows, size_of, tinyllama

REPO_ROOT = Path(__file__).resolve().parents[1]
ITERATION = 100
STACKED = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.layer_norm_weight",
           "self_attention.linear_proj.weight", "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc1.weight",
           "mlp.linear_fc2.weight")


def _write(it: Path, shape: Shape) -> None:
    """``it`` (``iter_N/``) written a chunk at a time, as torch DCP's file system writer lays a
    checkpoint out (each chunk a ``torch.save`` archive in ``__0_0.distcp``, ``.metadata`` the
    pickled ``Metadata`` with every chunk's offset and size): memory holds one layer's tensor."""
    import io
    import pickle

    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, TensorProperties, TensorStorageMetadata)

    L, D, I, H, G, V = shape.layers, shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.vocab
    d = D // H
    roles = dict(zip(STACKED, (((H + 2 * G) * d, D), (D,), (D, H * d), (D,), (2 * I, D), (D, I))))
    g = torch.Generator().manual_seed(0)
    fills = {"": lambda sh: torch.ones(sh, dtype=torch.bfloat16) if len(sh) == 1 else
             (torch.randn(sh, generator=g) * 0.02).to(torch.bfloat16),
             "optimizer.state.fp32_param.": lambda sh: torch.randn(sh, generator=g) * 0.02,
             "optimizer.state.exp_avg.": lambda sh: torch.randn(sh, generator=g) * 1e-4,
             "optimizer.state.exp_avg_sq.": lambda sh: torch.rand(sh, generator=g) * 1e-8}
    it.mkdir(parents=True)
    entries, storage = {}, {}
    with open(it / "__0_0.distcp", "wb") as f:
        def put(key: str, offsets: tuple, raw) -> None:
            storage[MetadataIndex(key, torch.Size(offsets) if offsets is not None else None)] = \
                _StorageInfo("__0_0.distcp", f.tell(), len(raw))
            f.write(raw)

        def tensor(key: str, t: torch.Tensor, offsets: tuple) -> None:
            buf = io.BytesIO()
            torch.save(t, buf)
            put(key, offsets, buf.getbuffer())

        for prefix, fill in fills.items():
            for name, sh in roles.items():
                key = prefix + "decoder.layers." + name
                entries[key] = TensorStorageMetadata(
                    TensorProperties(dtype=torch.float32 if prefix else torch.bfloat16), torch.Size((L, *sh)),
                    [ChunkStorageMetadata(torch.Size((l, *[0] * len(sh))), torch.Size((1, *sh))) for l in range(L)])
                for l in range(L):   # one chunk per layer, as megatron-core saves a stacked tensor
                    tensor(key, fill((1, *sh)), (l, *[0] * len(sh)))
            for name, sh in {"embedding.word_embeddings.weight": (V, D), "decoder.final_layernorm.weight": (D,),
                             "output_layer.weight": (V, D)}.items():
                key = prefix + name
                t = fill(sh)
                entries[key] = TensorStorageMetadata(TensorProperties(dtype=t.dtype), t.shape,
                                                     [ChunkStorageMetadata(torch.Size([0] * len(sh)), t.shape)])
                tensor(key, t, (0,) * len(sh))
        for key in ("common_state/shard_0_1",):   # megatron-core's common state: a bytes entry (torch.save'd)
            entries[key] = BytesStorageMetadata()
            buf = io.BytesIO()
            torch.save({"iteration": ITERATION, "checkpoint_version": 3.0}, buf)
            put(key, None, buf.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    md = Metadata(state_dict_metadata=entries, planner_data={}, storage_data=storage)
    with open(it / ".metadata", "wb") as f:
        pickle.dump(md, f)
    (it / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))



def config(shape: Shape) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": shape.hidden,
            "intermediate_size": shape.intermediate, "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.kv_heads, "num_hidden_layers": shape.layers, "vocab_size": shape.vocab,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu"}


def make(root: Path, shape: Shape) -> None:
    """``root``: Megatron-LM's save folder (the tracker and ``iter_0000100/``) and config.json."""
    root.mkdir(parents=True)
    _write(root / f"iter_{ITERATION:07d}", shape)
    (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    (root / "config.json").write_text(json.dumps(config(shape), indent=1))
    os.sync()


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
    print_ratio_rows(result["commands"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
