"""A real DeepSpeed checkpoint through transformers' Trainer on CPU, and its resume.

    python ds_trainer.py make   RUN --stage 2 [--bf16] [--no-gather] [--trainer-optim] [--universal] [--odd] [--moe]      -> RUN/checkpoint-3/
    python ds_trainer.py resume CKPT DUMP --stage 2 [--bf16] [--no-gather] [--trainer-optim] [--universal] [--odd] [--moe] -> DUMP (torch.save)

Run it plainly (world size 1) or under ``torchrun --nproc-per-node 2``. ``make`` builds a
tiny GQA llama, rescales its Q/K, V/O and up/down pairs by random powers of two (the same
function, a skewed weight pattern: wisca has scales to apply), trains 3 steps with ZeRO
``--stage`` and saves. ``resume`` builds the same Trainer, resumes from CKPT and, before its
first step, writes what DeepSpeed restored, read with DeepSpeed's own accessors: every
parameter's working weight, fp32 master and Adam moments (``safe_get_full_*``), and the
logits of a fixed batch; then trains two more steps and records their losses.

CPU deviations from a GPU run: ``DS_ACCELERATOR=cpu`` (DeepSpeed's CPU accelerator, gloo
process group, its shm comm op compiled once on first use), the torch AdamW (``torch_adam``,
no fused CUDA Adam), fp32 or bf16 (no fp16 on CPU).
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


if "RANK" not in os.environ:   # a plain run is world size 1 (a free port: test runs go on side by side)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT") or _free_port(), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1")

import torch  # noqa: E402

torch.set_num_threads(1)
VOCAB, LENGTH, STEPS = 128, 16, 3
ODD = "--odd" in sys.argv
MOE = "--moe" in sys.argv


def moe_model():
    """A tiny Mixtral: transformers 5 holds its experts fused in memory (``mlp.experts.gate_up_proj``
    [E, 2I, H], ``down_proj`` [E, H, I]), which are DeepSpeed's parameters; ``save_pretrained``
    writes them per expert. Skewed per expert by powers of two (up rows / down columns)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, tie_word_embeddings=False, attn_implementation="eager")
    m = MixtralForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in m.model.layers:
            ex = layer.mlp.experts
            e, two_i, _ = ex.gate_up_proj.shape
            u = torch.exp2(torch.randint(-3, 4, (e, two_i // 2), generator=g).float())
            ex.gate_up_proj[:, two_i // 2:, :].mul_(u[:, :, None])
            ex.down_proj.div_(u[:, None, :])
    return m


def config(args) -> dict:
    """DeepSpeed's config; with ``--trainer-optim`` Trainer builds the AdamW (two param groups:
    weight decay and none) and hands it to DeepSpeed, else DeepSpeed builds it (one group)."""
    out = {"zero_optimization": {"stage": args.stage,
                                  "stage3_gather_16bit_weights_on_model_save": not args.no_gather},
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto",
                                                      "eps": "auto", "torch_adam": True}},
            "bf16": {"enabled": args.bf16}, "fp16": {"enabled": False}}
    if args.trainer_optim:
        del out["optimizer"]
    if args.universal:   # resume from the universal checkpoint `latest_universal` names
        out["checkpoint"] = {"load_universal": True}
    return out


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        x = torch.randint(0, VOCAB, (LENGTH,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x}


@torch.no_grad()
def unbalance(model, seed: int = 0) -> None:
    """Q/K (per rotary pair), V/O and up/down rescaled by 2**k, k in [-3, 3]: same function."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d, group = cfg.hidden_size // heads, heads // kv
    rand = lambda *shape: torch.exp2(torch.randint(-3, 4, shape, generator=g).float())  # noqa: E731
    for layer in model.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        s = rand(kv, d // 2).repeat(1, 2)
        att.q_proj.weight.mul_(s.repeat_interleave(group, 0).reshape(-1, 1))
        att.k_proj.weight.div_(s.reshape(-1, 1))
        t = rand(kv, d)
        att.v_proj.weight.mul_(t.reshape(-1, 1))
        att.o_proj.weight.div_(t.repeat_interleave(group, 0).reshape(1, -1))
        u = rand(mlp.up_proj.weight.shape[0])
        mlp.up_proj.weight.mul_(u.reshape(-1, 1))
        mlp.down_proj.weight.div_(u.reshape(1, -1))


def model():
    if MOE:
        return moe_model()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    if ODD:   # 30 x odd parameters in all: ZeRO pads the flat buffer to a multiple of 2 x world
        shape = dict(hidden_size=30, intermediate_size=62, num_attention_heads=3, num_key_value_heads=1)
    cfg = LlamaConfig(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64, tie_word_embeddings=False,
                      attn_implementation="eager", **shape)
    m = LlamaForCausalLM(cfg)
    unbalance(m)
    return m


def trainer(args, out: str, max_steps: int, callbacks=()):
    import transformers.training_args as ta
    from transformers import Trainer, TrainingArguments

    if args.bf16:   # DEVIATION: the CPU does bf16 (slowly); transformers only asks a GPU whether it can
        ta.is_torch_bf16_gpu_available = lambda: True
    targs = TrainingArguments(output_dir=out, max_steps=max_steps, save_steps=STEPS, per_device_train_batch_size=2,
                              learning_rate=1e-3, weight_decay=0.1, lr_scheduler_type="constant", deepspeed=config(args),
                              bf16=args.bf16, report_to=[], logging_steps=1, seed=0, dataloader_num_workers=0,
                              save_only_model=False, disable_tqdm=True)
    return Trainer(model=model(), args=targs, train_dataset=Data(), callbacks=list(callbacks))


def dump_state(tr) -> dict:
    """What DeepSpeed holds now, per parameter name, read with its own accessors."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine = tr.model_wrapped
    module = engine.module
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:   # ZeRO 1/2 link moments to parameters at the first step; DeepSpeed's own call
        link()
    out = {"weight": {}, "master": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            out["weight"][name] = p.detach().clone()
        out["master"][name] = safe_get_full_fp32_param(p).clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[key][name] = safe_get_full_optimizer_state(p, key).clone()
    batch = torch.stack([Data()[i]["input_ids"] for i in range(4)])
    with torch.no_grad():
        engine.eval()
        out["logits"] = engine(input_ids=batch).logits.float().clone()
        engine.train()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["make", "resume"])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--no-gather", action="store_true")
    ap.add_argument("--trainer-optim", action="store_true")
    ap.add_argument("--universal", action="store_true")
    ap.add_argument("--odd", action="store_true", help="a model whose parameter count needs ZeRO's end padding")
    ap.add_argument("--moe", action="store_true", help="a tiny Mixtral (experts fused in memory)")
    args = ap.parse_args()
    if args.mode == "make":
        trainer(args, args.paths[0], STEPS).train()
        if args.universal and int(os.environ["RANK"]) == 0:   # DeepSpeed's own conversion, as its docs say
            import subprocess

            ckpt = Path(args.paths[0]) / f"checkpoint-{STEPS}"
            subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                            str(ckpt / f"global_step{STEPS}"), "--output_folder",
                            str(ckpt / f"global_step{STEPS}_universal"), "--inject_missing_state"], check=True,
                           capture_output=True)
        return
    from transformers import TrainerCallback

    ckpt, dump = args.paths
    state = {}

    class Dump(TrainerCallback):
        def on_train_begin(self, targs, tstate, control, **kw):
            state.update(dump_state(tr))

        def on_log(self, targs, tstate, control, logs=None, **kw):
            if logs and "loss" in logs:
                state.setdefault("losses", []).append(float(logs["loss"]))

    import tempfile

    tr = trainer(args, tempfile.mkdtemp(), STEPS + 2, [Dump()])
    tr.args.save_strategy = "no"
    tr.train(resume_from_checkpoint=ckpt)
    if int(os.environ["RANK"]) == 0:
        torch.save(state, dump)


def leave() -> None:
    """DEVIATION: leave without C++ destructors once everything is written (a rank of a
    two-rank gloo job aborted at interpreter exit now and then, after its work was done)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    leave()
