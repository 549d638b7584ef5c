"""Write a REAL torchtitan 0.3.0 checkpoint of a tiny, deliberately unbalanced model.

    torchrun --nproc-per-node {1,2} make_ckpt.py --flavor F --out DIR

F in {llama3, llama3-unfused, qwen3, qwen3-moe}.  Steps (torchtitan Trainer
order, see titan_harness.Harness for the deviations forced by CPU/gloo):

  1. build the model on meta, parallelize with torchtitan's own
     parallelize_llama / parallelize_qwen3 (FSDP2 over all ranks), init
     weights, build OptimizersContainer (AdamW), LR schedulers, dataloader and
     CheckpointManager;
  2. checkpointer.load() (a fresh start, as Trainer.train() does first);
  3. unbalance the weights by exact powers of two (unbalance.py) and check the
     logits on the probe ids are bit-identical before/after;
  4. run 3 AdamW steps on random byte tokens; CheckpointManager.save() after
     each step (torchtitan writes only at the last one: interval=500,
     last_step=True with last_save_model_only=False as in the stock
     *_debugmodel configs) -> DIR/checkpoint/step-3/;
  5. write next to it: probe.pt, config.json (HF style), flavor.json
     (torchtitan model args), unbalance.json (exponents used + checks) and
     reference.pt (full weights/moments/losses as the live run saw them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import titan_harness as H  # noqa: E402  (must precede torchtitan imports)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import unbalance as U  # noqa: E402

STEPS = 3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flavor", required=True, choices=H.FLAVORS)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--no-unbalance", action="store_true")
    ap.add_argument("--odd-rows", type=int, default=0, metavar="E",
                    help="unfused only: the initial q weights' odd rows times 2**E (another model, "
                         "not a transform), so the q/k size ratio of rows 2i and 2i+1 differs: a balancer that paired the "
                         "rotary rows otherwise than torchtitan's (2i, 2i+1) would then change the function")
    ap.add_argument(
        "--model-only",
        action="store_true",
        help="last_save_model_only=True (torchtitan's Trainer.Config default): "
        "the final checkpoint holds model weights only, no optimizer state",
    )
    args = ap.parse_args()
    t0 = time.time()
    out = os.path.abspath(args.out)
    if os.path.exists(os.path.join(out, "checkpoint")):
        raise SystemExit(f"{out}/checkpoint exists; pick a fresh --out")

    config = H.trainer_config(
        args.flavor,
        steps=args.steps,
        dump_folder=out,
        ckpt=dict(folder="checkpoint", last_save_model_only=args.model_only),
    )
    h = H.Harness(config)
    world = dist.get_world_size()
    H.log(f"flavor={args.flavor} world={world} built in {time.time() - t0:.1f}s")

    # Trainer.train(): checkpointer.load(step=config.checkpoint.load_step) first.
    assert not h.checkpointer.load(step=config.checkpoint.load_step)

    ids = H.probe_ids()
    report: dict = {"flavor": args.flavor, "world_size": world}
    names = [n for n, _ in h.model.named_parameters()]
    dims = dict(
        n_layers=H.N_LAYERS, dim=H.DIM, n_heads=H.N_HEADS, n_kv_heads=H.N_KV_HEADS,
        head_dim=H.HEAD_DIM, ffn_hidden=H.FFN_HIDDEN,
        n_experts=H.MOE_EXPERTS, moe_hidden=H.MOE_HIDDEN,
    )
    if args.odd_rows:
        assert args.flavor == "llama3-unfused", "--odd-rows: the unfused flavour"
        odd = {}
        for n in names:
            if n.endswith("qkv_linear.wq.weight"):
                rows = dict(h.model.named_parameters())[n].shape[0]
                odd[U.canonical_fqn(n)] = (torch.arange(rows) % 2 * args.odd_rows).to(torch.int32)[:, None]
        assert len(odd) == H.N_LAYERS, sorted(odd)
        U.apply(h.model, odd, +1)
    before = h.logits(ids)

    if args.flavor.startswith("qwen3"):
        # Show that the per-head q/k transform is NOT function-preserving under
        # Qwen3's q_norm/k_norm (then undo it exactly: ldexp by -e).
        plan0 = U.make_plan(args.flavor, **dims)
        qk = U.qk_exponents_for_check(plan0, names, a=2)
        U.apply(h.model, qk, +1)
        broken = h.logits(ids)
        U.apply(h.model, qk, -1)
        assert torch.equal(h.logits(ids), before), "qk undo was not exact"
        report["qk_breaks_function"] = {
            "transform": "layer 0, kv head 0: its q heads x 4, k head x 1/4",
            "max_abs_logit_diff": float((broken - before).abs().max()),
            "max_rel_logit_diff": float(
                ((broken - before).abs().max() / before.abs().max())
            ),
        }
        H.log("qwen3 qk transform changes logits:", report["qk_breaks_function"])

    if not args.no_unbalance:
        plan = U.make_plan(args.flavor, **dims)
        U.apply(h.model, U.exponents(plan, names), +1)
        after = h.logits(ids)
        bit_identical = torch.equal(before, after)
        rel = float((after - before).abs().max() / before.abs().max())
        report["unbalance"] = {
            "plan": plan,
            "logits_bit_identical": bit_identical,
            "max_rel_logit_diff": rel,
        }
        H.log(f"unbalanced: logits bit-identical={bit_identical} max rel diff={rel:.3g}")
        assert bit_identical or rel <= 1e-6, "unbalancing changed the function"

    losses = []
    t_train = time.time()
    for step in range(1, args.steps + 1):
        loss = h.train_step()
        losses.append(loss)
        # Trainer.train(): checkpointer.save(step, last_step=(step == steps))
        h.checkpointer.save(h.train_state.step, last_step=(step == args.steps))
        H.log(f"step {step} loss {loss:.5f}")
    h.checkpointer.maybe_wait_for_saving()
    report["losses"] = losses
    report["train_and_save_s"] = time.time() - t_train

    logits = h.logits(ids)  # the model's own forward, right after saving
    weights = h.full_weights()
    moments = {} if args.model_only else h.full_moments()
    if H.rank() == 0:
        torch.save({"ids": ids, "logits": logits}, os.path.join(out, "probe.pt"))
        torch.save(
            {"weights": weights, "moments": moments, "losses": losses},
            os.path.join(out, "reference.pt"),
        )
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(H.hf_config(args.flavor), f, indent=2)
        with open(os.path.join(out, "flavor.json"), "w") as f:
            json.dump(
                {
                    "flavor": args.flavor,
                    "torchtitan_model": config.model_spec.name,
                    "world_size": world,
                    "steps": args.steps,
                    "checkpoint": os.path.join("checkpoint", f"step-{args.steps}"),
                    "last_save_model_only": args.model_only,
                    "spmd_backend": config.parallelism.spmd_backend,
                    "versions": H.versions(),
                    "training": {
                        "seq_len": H.SEQ_LEN,
                        "local_batch_size": H.LOCAL_BATCH,
                        "lr": H.LR,
                        "optimizer": "AdamW (torchtitan default_adamw)",
                    },
                    "model_args": H.describe_model_args(config.model_spec),
                },
                f,
                indent=2,
            )
        report["total_s"] = time.time() - t0
        with open(os.path.join(out, "unbalance.json"), "w") as f:
            json.dump(report, f, indent=2)
    H.log(f"done in {time.time() - t0:.1f}s -> {out}/checkpoint/step-{args.steps}")
    h.checkpointer.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    H.exit_without_destructors()
