"""Write a REAL OLMo-core 3.0.0 training checkpoint of a tiny, deliberately unbalanced model.

    torchrun --nproc-per-node 2 make_ckpt.py --flavor llama --out DIR
    torchrun --nproc-per-node 1 make_ckpt.py --flavor olmo2 --out DIR

Everything is OLMo-core's own code, run unmodified on CPU (gloo):
  * model:        ``TransformerConfig.llama_like(...).build(init_device="meta")``
  * train module: ``TransformerTrainModuleConfig(...).build(model)`` -> FSDP2 over all ranks + AdamW
                  (it materialises and initialises the weights itself, after sharding)
  * data:         ``NumpyFSLDatasetConfig`` over a raw uint8 file of random bytes (fixed seed)
                  + ``NumpyDataLoaderConfig``
  * training:     ``TrainerConfig(...).build(...).fit()`` with a ``CheckpointerCallback`` that saves
                  the permanent checkpoint ``DIR/ckpt/step3/`` (``.metadata.json``,
                  ``model_and_optim/`` (DCP), ``train/rank*.pt``).
The only step that is not OLMo-core's is the exact power-of-two unbalancing of the weights between
building the train module and ``fit()`` (see ``olmo_fixture.unbalance_state_dict``).

Outputs (written by rank 0):
  DIR/ckpt/step3/        the checkpoint
  DIR/probe.pt           {"ids": LongTensor[2,16], "logits": fp32 logits of the model right after the
                          checkpoint, from OLMo-core's forward}
  DIR/config.json        Hugging Face style config of the same model
  DIR/flavor.json        OLMo-core configs used, unbalancing record, checks, versions, timing
  DIR/data/tokens.npy    the training tokens (raw uint8); DIR/data_work/ the data loader's cache
"""

from __future__ import annotations

import argparse
import importlib.metadata
import time
from pathlib import Path

import olmo_fixture as fx  # sets OMP env vars before torch is imported

import torch
import torch.distributed as dist

from olmo_core.distributed.utils import barrier
from olmo_core.train import TrainerConfig, prepare_training_environment, teardown_training_environment
from olmo_core.train.callbacks import CheckpointerCallback
from olmo_core.train.common import Duration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", choices=fx.FLAVORS, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3, help="train this many steps, checkpoint at the last")
    ap.add_argument(
        "--unbalance",
        default=None,
        help="comma-separated pair kinds (default per flavor: %s); 'none' to skip"
        % {k: ",".join(v) for k, v in fx.DEFAULT_KINDS.items()},
    )
    ap.add_argument(
        "--save-async",
        action="store_true",
        help="let the CheckpointerCallback save asynchronously (OLMo-core's default on a CPU-capable "
        "backend). Works at W=1; at W=2 OLMo-core 3.0.0 intermittently hangs in Trainer._shutdown after "
        "the checkpoint is fully written (rank 0 in a bookkeeping all_reduce, rank 1 in the final "
        "barrier), so run it under `timeout`",
    )
    args = ap.parse_args()
    t0 = time.perf_counter()
    out: Path = args.out.resolve()

    # OLMo-core's own environment setup: gloo process group (CPU only), logging, seeds.
    prepare_training_environment(seed=0, backend="gloo", shared_filesystem=True)
    rank, ws = fx.rank(), fx.world_size()

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if (out / "ckpt").exists() and any((out / "ckpt").iterdir()):
            raise SystemExit(f"{out}/ckpt is not empty; use a fresh --out")
        fx.write_token_file(out / "data" / "tokens.npy")
    barrier()

    # ---- model + train module (FSDP2 over the gloo mesh, AdamW) -----------------------------------
    model_cfg = fx.model_config(args.flavor)
    # init_device="meta": the train module shards it with FSDP, then materialises and initialises it
    # (Transformer.init_weights, seeded by model_cfg.init_seed).
    model = model_cfg.build(init_device="meta")
    tm_cfg = fx.train_module_config()
    train_module = tm_cfg.build(model, device=torch.device("cpu"))
    model = train_module.model  # the FSDP-wrapped model

    # ---- unbalance at a fixed function ------------------------------------------------------------
    # Must come AFTER the train module is built: parallelize_model() calls init_weights(), which would
    # overwrite anything done to the weights earlier. The optimizer has no state yet.
    ids = fx.probe_ids()
    logits_before = fx.forward_logits(model, ids)
    unbalance = {"kinds": []}
    kinds = None if args.unbalance is None else [k for k in args.unbalance.split(",") if k and k != "none"]
    if kinds is None or kinds:
        sd = fx.get_full_model_state(model)  # all-gather: every rank holds the full tensors
        unbalance = fx.unbalance_state_dict(sd, args.flavor, kinds)  # same exponents on every rank
        fx.set_full_model_state(model, sd)  # every rank copies its own shard back
        del sd
    logits_after = fx.forward_logits(model, ids)
    exact = torch.equal(logits_before, logits_after)
    rel = ((logits_after - logits_before).abs().max() / logits_before.abs().max()).item()
    unbalance["logits_check"] = {"torch_equal": exact, "max_abs_diff_over_max_abs": rel}
    if rank == 0:
        print(f"[make_ckpt] unbalanced {unbalance['kinds']}: logits equal={exact} rel={rel:.3e}", flush=True)
    if not exact and rel > 1e-6:
        raise RuntimeError(f"unbalancing changed the function: rel diff {rel}")

    # ---- data + trainer ---------------------------------------------------------------------------
    dataset = fx.dataset_config(out).build()
    data_loader = fx.data_loader_config(out).build(dataset, dp_process_group=train_module.dp_process_group)
    trainer_cfg = TrainerConfig(
        save_folder=str(out / "ckpt"),
        work_dir=str(out / "trainer_work"),
        max_duration=Duration.steps(args.steps),
        metrics_collect_interval=1,
        callbacks={
            "checkpointer": CheckpointerCallback(
                save_interval=args.steps,  # one permanent checkpoint: ckpt/step{steps}/
                pre_train_checkpoint=False,  # no step0/ (it would hold the un-trained weights)
                # gloo supports CPU, so OLMo-core's default here would be async saving (a separate
                # checkpoint process group, same on-disk format); synchronous saving is the fixture's
                # default to keep it simple, --save-async exercises the async path.
                save_async=args.save_async,
            ),
        },
    )
    trainer = trainer_cfg.build(train_module, data_loader)
    t_fit = time.perf_counter()
    trainer.fit()  # unmodified OLMo-core Trainer.fit on CPU
    t_fit = time.perf_counter() - t_fit

    # ---- probe right after the checkpoint (fit() ends with the step-N checkpoint) -------------------
    logits = fx.forward_logits(train_module.model, ids)
    step_dir = out / "ckpt" / f"step{args.steps}"
    if rank == 0:
        assert (step_dir / "model_and_optim" / ".metadata").is_file(), step_dir
        torch.save({"ids": ids, "logits": logits}, out / "probe.pt")
        fx.write_json(out / "config.json", fx.hf_config(args.flavor, model_cfg))
        fx.write_json(
            out / "flavor.json",
            {
                "flavor": args.flavor,
                "world_size": ws,
                "steps": args.steps,
                "checkpoint": str(step_dir.relative_to(out)),
                "versions": {
                    "ai2-olmo-core": importlib.metadata.version("ai2-olmo-core"),
                    "torch": torch.__version__,
                },
                "model_config": model_cfg.as_config_dict(),
                "train_module_config": tm_cfg.as_config_dict(),
                "dataset_config": fx.dataset_config(out).as_config_dict(),
                "data_loader_config": fx.data_loader_config(out).as_config_dict(),
                "trainer_config": {
                    k: v
                    for k, v in trainer_cfg.as_config_dict().items()
                    if k in ("save_folder", "work_dir", "max_duration", "metrics_collect_interval", "callbacks")
                },
                "probe": {"seed": fx.PROBE_SEED, "shape": list(fx.PROBE_SHAPE)},
                "unbalance": unbalance,
                "seconds": {"fit": round(t_fit, 2), "total": round(time.perf_counter() - t0, 2)},
            },
        )
        print(f"[make_ckpt] wrote {step_dir} in {time.perf_counter() - t0:.1f}s (fit {t_fit:.1f}s)", flush=True)
    barrier()
    teardown_training_environment()


if __name__ == "__main__":
    main()
