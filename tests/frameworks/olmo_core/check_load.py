"""Check that REAL OLMo-core 3.0.0 loads a checkpoint (original or rewritten) and can train on from it.

    torchrun --nproc-per-node W check_load.py --flavor F --ckpt DIR/ckpt/step3 \
        --probe DIR/probe.pt --out RESULT.pt [--continue trainer|plain|none]

``--ckpt`` is a ``stepN/`` folder (``.metadata.json``, ``model_and_optim/``, ``train/``) or directly a
``model_and_optim/`` DCP folder. ``DIR`` (the folder holding ``probe.pt``) must be the make_ckpt.py
output folder: its training tokens are reused when training on.

Steps (all OLMo-core's own code on CPU/gloo, W = 1 or 2 ranks, any W can load any W's checkpoint):
  1. build a fresh model + train module exactly as make_ckpt.py (FSDP2 + AdamW, fresh init, empty
     optimizer state);
  2. ``olmo_core.distributed.checkpoint.load_model_and_optim_state(<step>/model_and_optim, model, optim,
     flatten_optimizer_state=True)`` -- the Trainer saves the optimizer state flattened
     (``TransformerTrainModule.state_dict_save_opts``), so it must be loaded flattened too;
  3. logits of OLMo-core's forward on the probe ids;
  4. ``--continue trainer`` (default): resume with OLMo-core's own ``Trainer`` from the step folder
     (``Trainer.load_checkpoint`` -> ``Checkpointer.load`` -> ``TransformerTrainModule.load_state_dict``,
     i.e. the Trainer's own load path, trainer/data-loader state included) and ``fit()`` 2 more steps;
     ``--continue plain``: 2 steps of a plain loop (forward with labels, backward, the same AdamW).

RESULT.pt (rank 0) = {
  "logits":  fp32 logits on the probe ids right after loading (before training on),
  "probe_logits_equal": torch.equal(logits, probe["logits"]),
  "weights": {fqn: full tensor}, "moments": {fqn: {"exp_avg", "exp_avg_sq", "step"}}, both right after loading,
  "param_groups": [{option: value} per AdamW param group, without "params"],
  "losses":  [CE loss of each extra step], "continue": mode, "world_size": W,
  "seconds": {...},
}
Exit status is non-zero if a loss is not finite (the logits comparison is left to the caller, so
that a deliberately changed checkpoint can be checked too).
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path
from typing import Dict, List

import olmo_fixture as fx  # sets OMP env vars before torch is imported

import torch

from olmo_core.data.utils import get_labels
from olmo_core.distributed.checkpoint import load_model_and_optim_state
from olmo_core.distributed.utils import barrier
from olmo_core.train import TrainerConfig, prepare_training_environment, teardown_training_environment
from olmo_core.train.callbacks import Callback, CheckpointerCallback
from olmo_core.train.common import Duration


class LossRecorder(Callback):
    """Collects the (rank-reduced) ``train/CE loss`` the Trainer logs after each step."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: Dict[int, float] = {}

    def log_metrics(self, step: int, metrics: Dict[str, float]) -> None:
        if "train/CE loss" in metrics:
            self.losses[step] = float(metrics["train/CE loss"])


def resolve(ckpt: Path):
    """-> (model_and_optim folder, step folder or None)."""
    if (ckpt / "model_and_optim" / ".metadata").is_file():
        return ckpt / "model_and_optim", ckpt
    if (ckpt / ".metadata").is_file():
        parent = ckpt.parent
        step_dir = parent if ckpt.name == "model_and_optim" and (parent / "train").is_dir() else None
        return ckpt, step_dir
    raise SystemExit(f"{ckpt}: neither a stepN/ folder nor a DCP folder (no .metadata)")


def continue_with_trainer(train_module, fixture_dir: Path, load_dir: Path, n_steps: int, work: Path) -> List[float]:
    recorder = LossRecorder()
    dataset = fx.dataset_config(fixture_dir).build()
    data_loader = fx.data_loader_config(fixture_dir).build(dataset, dp_process_group=train_module.dp_process_group)
    trainer = TrainerConfig(
        save_folder=str(work / "save"),  # empty, so fit() has nothing to auto-resume from there
        work_dir=str(work / "work"),
        max_duration=Duration.steps(n_steps),  # reset below once the start step is known
        metrics_collect_interval=1,
        callbacks={
            # No checkpoints are written by this check.
            "checkpointer": CheckpointerCallback(enabled=False),
            "loss_recorder": recorder,
        },
    ).build(train_module, data_loader)
    # The Trainer's own resume path: trainer state (step, data loader position, RNG) from
    # train/rank{r}.pt (falls back to rank0.pt when the world size differs), model + optimizer via
    # Checkpointer.load -> TransformerTrainModule.state_dict_to_load / load_state_dict.
    trainer.load_checkpoint(str(load_dir))
    start = trainer.global_step
    trainer.max_duration = Duration.steps(start + n_steps)
    trainer.fit()  # checkpoint already loaded, so fit() just trains steps start+1 .. start+n_steps
    return [recorder.losses[s] for s in sorted(recorder.losses) if s > start]


def continue_plain(train_module, n_steps: int) -> List[float]:
    """Plain loop with the train module's model and AdamW (no Trainer, no grad clipping)."""
    model, optim = train_module.model, train_module.optim
    model.train()
    g = torch.Generator().manual_seed(99 + fx.rank())
    losses = []
    for _ in range(n_steps):
        ids = torch.randint(0, fx.VOCAB_SIZE, (2, fx.SEQ_LEN), generator=g)
        out = model(ids, labels=get_labels({"input_ids": ids}))
        out.loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        loss = out.loss.detach().clone()
        torch.distributed.all_reduce(loss)
        losses.append(loss.item() / fx.world_size())
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", choices=fx.FLAVORS, required=True)
    ap.add_argument("--ckpt", type=Path, required=True, help="stepN/ folder or its model_and_optim/ folder")
    ap.add_argument("--probe", type=Path, required=True, help="make_ckpt.py's DIR/probe.pt")
    ap.add_argument("--out", type=Path, required=True, help="RESULT.pt")
    ap.add_argument("--continue", dest="cont", choices=("trainer", "plain", "none"), default="trainer")
    ap.add_argument("--steps", type=int, default=2, help="extra training steps")
    args = ap.parse_args()
    t0 = time.perf_counter()

    prepare_training_environment(seed=0, backend="gloo", shared_filesystem=True)
    rank = fx.rank()
    mao_dir, step_dir = resolve(args.ckpt.resolve())
    fixture_dir = args.probe.resolve().parent
    probe = torch.load(args.probe, weights_only=True)

    # 1. fresh model + train module built the same way as make_ckpt.py
    model = fx.model_config(args.flavor).build(init_device="meta")
    train_module = fx.train_module_config().build(model, device=torch.device("cpu"))
    model, optim = train_module.model, train_module.optim

    # 2. OLMo-core's own loader
    t_load = time.perf_counter()
    load_model_and_optim_state(str(mao_dir), model, optim, flatten_optimizer_state=True)
    t_load = time.perf_counter() - t_load

    # 3. forward + full weights / moments (collectives: every rank takes part)
    logits = fx.forward_logits(model, probe["ids"])
    equal = torch.equal(logits, probe["logits"])
    weights, moments = fx.full_weights_and_moments(model, optim)
    if rank == 0:
        diff = (logits - probe["logits"]).abs().max().item()
        print(f"[check_load] W={fx.world_size()} loaded {mao_dir}: probe logits equal={equal} max|diff|={diff:.3e}", flush=True)

    # 4. train on
    t_cont = time.perf_counter()
    losses: List[float] = []
    if args.cont == "trainer":
        if step_dir is None:
            raise SystemExit("--continue trainer needs a stepN/ folder (train/ state); use --continue plain")
        work = args.out.resolve().parent / (args.out.name + ".trainer")
        if rank == 0 and work.exists():
            shutil.rmtree(work)
        barrier()
        losses = continue_with_trainer(train_module, fixture_dir, step_dir, args.steps, work)
    elif args.cont == "plain":
        losses = continue_plain(train_module, args.steps)
    t_cont = time.perf_counter() - t_cont

    if rank == 0:
        result = {
            "logits": logits,
            "probe_logits_equal": equal,
            "weights": weights,
            "moments": moments,
            # the non-tensor optimizer entries (optim.param_groups.<fqn>.<option> in the checkpoint)
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optim.param_groups],
            "losses": losses,
            "continue": args.cont,
            "world_size": fx.world_size(),
            "ckpt": str(mao_dir),
            "seconds": {
                "load": round(t_load, 3),
                "continue": round(t_cont, 3),
                "total": round(time.perf_counter() - t0, 3),
            },
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, args.out)
        print(f"[check_load] losses={losses} -> {args.out} ({time.perf_counter() - t0:.1f}s)", flush=True)
    ok = len(losses) == (args.steps if args.cont != "none" else 0) and all(math.isfinite(x) for x in losses)
    barrier()
    teardown_training_environment()
    if not ok:
        raise SystemExit(f"bad losses: {losses}")


if __name__ == "__main__":
    main()
