"""Benchmark: wisca on a Trainer checkpoint with DeepSpeed ZeRO-2 state (world size 2), cold,
against a durable copy of the same folder.

    python -m benchmarks.deepspeed                  # TinyLlama shape with 8 layers (about 6.4 GB)
    python -m benchmarks.deepspeed --layers 22      # the full TinyLlama shape (about 17 GB)
    python -m benchmarks.deepspeed --rounds 3 --json out.json

The checkpoint is generated in the exact on-disk form DeepSpeed 0.19 writes for ZeRO 2 at
world size 2 with bf16 (``torch.save`` of DeepSpeed's own classes; deepspeed must be
installed, ``pip install -e '.[test]'``), not trained: ``checkpoint-100/`` holds
``model.safetensors`` (bf16), ``latest`` and ``global_step100/`` with
``mp_rank_00_model_states.pt`` (the bf16 module, views of one flat buffer, and
``param_shapes``) and one ``bf16_zero_pp_rank_R_mp_rank_00_optim_states.pt`` per rank (its
half of the fp32 masters, ``exp_avg`` and ``exp_avg_sq`` as flat partitions, with
``param_slice_mappings``). Before every run the source is evicted from the page cache and
the output removed; each round runs ``cp -r && sync`` and then wisca; the ratio to the copy
of the same round is reported (median and spread), with peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections import OrderedDict
from pathlib import Path

from .bench import Shape, make_checkpoint, paired_rounds, print_ratio_rows, ratio_rows, size_of, tinyllama

REPO_ROOT = Path(__file__).resolve().parents[1]
WORLD, STEP = 2, 100



def make(ckpt: Path, shape: Shape) -> None:
    """``ckpt`` (``checkpoint-100/``) in DeepSpeed's on-disk form, one rank file at a time."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    from safetensors import safe_open

    make_checkpoint(ckpt, shape, shards=1, shard_size=None, seed=0)
    for f in ckpt.parent.glob(ckpt.name + ".stamp.json"):
        f.unlink()
    tag = ckpt / f"global_step{STEP}"
    tag.mkdir()
    (ckpt / "latest").write_text(tag.name)
    with safe_open(str(ckpt / "model.safetensors"), "pt") as st:
        names = list(st.keys())
        shapes = OrderedDict((n, torch.Size(st.get_slice(n).get_shape())) for n in names)
    order = [n for n in names if n.startswith("model.embed")] + \
        sorted((n for n in names if ".layers." in n), key=lambda n: (int(n.split(".")[2]), n)) + \
        [n for n in names if n.startswith("model.norm")] + [n for n in names if n.startswith("lm_head")]
    shapes = OrderedDict((n, shapes[n]) for n in order)
    sizes = [math.prod(s) for s in shapes.values()]
    total = sum(sizes)
    padded = -(-total // (2 * WORLD)) * (2 * WORLD)
    part = padded // WORLD
    ds_config = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 1,
                 "gradient_accumulation_steps": 1, "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}}
    # the bf16 module: views of one flat buffer, as ZeRO 2 keeps it
    flat = torch.empty(padded, dtype=torch.bfloat16)
    module, o = OrderedDict(), 0
    with safe_open(str(ckpt / "model.safetensors"), "pt") as st:
        for name, n in zip(shapes, sizes):
            flat[o:o + n] = st.get_tensor(name).reshape(-1)
            module[name] = flat[o:o + n].view(shapes[name])
            o += n
    torch.save({"module": module, "buffer_names": [], "optimizer": None, "param_shapes": [shapes],
                "frozen_param_shapes": OrderedDict(), "shared_params": {}, "frozen_param_fragments": OrderedDict(),
                "lr_scheduler": {"base_lrs": [3e-4], "last_epoch": STEP}, "data_sampler": None, "random_ltd": None,
                "skipped_steps": 0, "global_steps": STEP, "global_samples": STEP * WORLD, "dp_world_size": WORLD,
                "mp_world_size": 1, "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
                "ds_config": ds_config, "ds_version": "0.19.8"}, tag / "mp_rank_00_model_states.pt")
    g = torch.Generator().manual_seed(1)
    for r in range(WORLD):
        lo, hi = r * part, (r + 1) * part
        tail = padded - total if r == WORLD - 1 else 0     # saved without the end padding, as DeepSpeed does
        masters = flat[lo:hi].float()[:part - tail]
        exp_avg = torch.randn(part, generator=g) * 1e-4
        exp_avg_sq = torch.rand(part, generator=g) * 1e-8
        slices, o = OrderedDict(), 0
        for name, n in zip(shapes, sizes):
            a, b = max(o, lo), min(o + n, hi)
            if a < b:
                slices[name] = fragment_address(numel=b - a, start=a - lo)
            o += n
        osd = {"loss_scaler": LossScaler(1.0), "dynamic_loss_scale": False, "overflow": False, "clip_grad": 1.0,
               "base_optimizer_state": {"state": {0: {"step": torch.tensor(float(STEP)), "exp_avg": exp_avg,
                                                      "exp_avg_sq": exp_avg_sq}},
                                        "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8,
                                                          "weight_decay": 0.0, "amsgrad": False, "params": [0]}]},
               "single_partition_of_fp32_groups": [masters], "zero_stage": ZeroStageEnum.gradients,
               "group_paddings": [tail],
               "param_alignment_paddings": [[0] * len(sizes)], "partition_count": [WORLD], "ds_version": "0.19.8",
               "param_slice_mappings": [slices]}
        torch.save({"optimizer_state_dict": osd, "ds_config": ds_config, "ds_version": "0.19.8"},
                   tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        del masters, exp_avg, exp_avg_sq, osd
    os.sync()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the TinyLlama shape (default 8)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=REPO_ROOT / "bench_work" / "deepspeed")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    work, shape = args.workdir, tinyllama(args.layers)
    src, dst = work / f"checkpoint-{STEP}", work / "dst"
    marker = work / "shape.json"        # a kept checkpoint is reused only for the same shape
    if not (src / "latest").is_file() or not marker.is_file() or json.loads(marker.read_text()) != vars(shape):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        make(src, shape)
        marker.write_text(json.dumps(vars(shape)))
    wisca = [sys.executable, "-m", "wisca_cli"]
    commands = {
        "cp -r && sync": ["sh", "-c", 'cp -r "$0" "$1" && sync', str(src), str(dst)],
        "wisca transform --no-verify": [*wisca, "transform", str(src), str(dst), "--no-verify"],
        "wisca transform": [*wisca, "transform", str(src), str(dst)],
    }
    runs = paired_rounds(commands, src, dst, work, args.rounds)
    nbytes = size_of(src)
    result = {"shape": vars(shape), "bytes": nbytes, "rounds": args.rounds, "world_size": WORLD,
              "commands": ratio_rows(runs, "cp -r && sync", nbytes)}
    print(f"\nDeepSpeed ZeRO-2 checkpoint, world size {WORLD}: TinyLlama shape, {args.layers} layers, "
          f"{nbytes / 2**30:.2f} GiB (bf16 safetensors + bf16 module + fp32 masters and AdamW moments); "
          f"cold, {args.rounds} rounds")
    print_ratio_rows(result["commands"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
