"""Load a torchtitan checkpoint back with torchtitan's own CheckpointManager.

    torchrun --nproc-per-node W check_load.py --flavor F --ckpt CKPT_FOLDER \
        --probe DIR/probe.pt --out RESULT.pt

Builds a fresh model + optimizer exactly like make_ckpt.py (same flavour, same
torchtitan parallelize function, FSDP2 over W ranks), restores CKPT_FOLDER
with ``CheckpointManager.load`` and writes RESULT.pt:

    {"logits":  torchtitan forward on probe ids (fp32, [2, 16, 256]),
     "logits_equal_probe": torch.equal(logits, probe["logits"]),
     "weights": {fqn: full tensor}           # model state dict as checkpointed
     "moments": {fqn: {"exp_avg", "exp_avg_sq", "step"}}   # optimizer FQNs
     "losses":  [2 more training steps after the load, must be finite],
     "step", "world_size", "load_mode", "excluded"}

How the folder is handed to torchtitan:
  * named ``step-N``   -> checkpoint.folder = its parent, load(step=N): the
                          Trainer's resume path;
  * any other name     -> checkpoint.initial_load_path = CKPT_FOLDER with
                          initial_load_model_only=False (checkpoint.folder
                          points at an empty scratch dir).
  ``load_only=True`` so nothing is ever written into CKPT_FOLDER.  The
  dataloader entry is excluded from loading when the checkpoint was written by
  a different number of data-parallel ranks (torchtitan's dataloader refuses
  to reshard: "dataloader resharding is not supported yet").
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import titan_harness as H  # noqa: E402  (must precede torchtitan imports)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader  # noqa: E402

EXTRA_STEPS = 2
NON_MODEL_STATES = ("optimizer", "lr_scheduler", "dataloader", "train_state")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flavor", required=True, choices=H.FLAVORS)
    ap.add_argument("--ckpt", required=True, help="a DCP folder (e.g. .../step-3)")
    ap.add_argument("--probe", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--extra-steps", type=int, default=EXTRA_STEPS)
    args = ap.parse_args()
    t0 = time.time()

    ckpt = os.path.abspath(args.ckpt)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    keys = FileSystemReader(ckpt).read_metadata().state_dict_metadata.keys()
    saved_dp = sum(1 for k in keys if re.fullmatch(r"dataloader\.dp_rank_\d+", k))
    has_optim = any(k.startswith("optimizer.") for k in keys)
    # Non-model states missing from the checkpoint (a model-only save, i.e.
    # last_save_model_only=True) or not reshardable (dataloader) are excluded.
    present = {k.split(".", 1)[0] for k in keys}
    exclude = [s for s in NON_MODEL_STATES if s not in present]
    if "dataloader" in present and saved_dp != world:
        exclude.append("dataloader")

    m = re.fullmatch(r"step-(\d+)", os.path.basename(ckpt))
    if m:
        load_mode, step = "resume", int(m.group(1))
        ckpt_cfg = dict(folder=os.path.dirname(ckpt), load_step=step)
    else:
        load_mode, step = "initial_load_path", -1
        ckpt_cfg = dict(
            # must not exist: torchtitan then falls back to initial_load_path
            folder=os.path.join(tempfile.gettempdir(), f"titan_empty_{os.getppid()}"),
            initial_load_path=ckpt,
            initial_load_model_only=False,
        )
    ckpt_cfg.update(load_only=True, exclude_from_loading=exclude)

    dump = os.path.dirname(os.path.abspath(args.out)) or "."
    config = H.trainer_config(
        args.flavor, steps=10_000, dump_folder=dump, ckpt=ckpt_cfg
    )
    h = H.Harness(config)
    assert dist.get_world_size() == world

    # Trainer.train(): first thing is checkpointer.load(step=load_step).
    t_load = time.time()
    loaded = h.checkpointer.load(step=config.checkpoint.load_step)
    assert loaded, f"torchtitan did not load {ckpt}"
    load_s = time.time() - t_load
    loaded_step = h.train_state.step  # restored train_state.step (0 if excluded)

    probe = torch.load(args.probe)
    logits = h.logits(probe["ids"])
    equal = torch.equal(logits, probe["logits"])
    max_abs = float((logits - probe["logits"]).abs().max())
    H.log(
        f"loaded {ckpt} ({load_mode}, W={world}, excluded={exclude}) "
        f"step={loaded_step}: logits equal probe: {equal} (max abs diff {max_abs:.3g})"
    )
    weights = h.full_weights()
    moments = h.full_moments() if has_optim else {}

    losses = []
    for _ in range(args.extra_steps):
        loss = h.train_step()
        h.checkpointer.save(h.train_state.step)  # Trainer order; no-op: load_only
        losses.append(loss)
        assert math.isfinite(loss), f"non-finite loss {loss}"
    H.log(f"losses after load: {losses}")

    if H.rank() == 0:
        torch.save(
            {
                "logits": logits,
                "logits_equal_probe": equal,
                "max_abs_logit_diff": max_abs,
                "weights": weights,
                "moments": moments,
                "losses": losses,
                "step": loaded_step,
                "world_size": world,
                "load_mode": load_mode,
                "excluded": exclude,
                "load_s": load_s,
                "total_s": time.time() - t0,
            },
            args.out,
        )
    h.checkpointer.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    H.exit_without_destructors()
