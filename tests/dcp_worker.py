"""torch.distributed.checkpoint fixtures, under `torchrun --standalone --nproc-per-node 2` (gloo, CPU).

    dcp_worker.py make OUT            # every layout below, from FSDP2-sharded training
    dcp_worker.py resume OUT KIND=SRC ...   # each SRC loaded at world size 2: logits, 2 steps -> OUT/i.pt
    dcp_worker.py make-hf OUT MODEL         # a transformers checkpoint folder, FSDP2-trained, saved to OUT

Layouts written by ``make`` (each from 3 AdamW steps of a skewed tiny GQA Llama, sharded
with FSDP2 ``fully_shard`` over 2 ranks, so every tensor is stored as 2 row chunks):

- ``hf/``: ``{"model": get_model_state_dict, "optimizer": flattened optimizer state}``
- ``hf-nested/``: the same with the optimizer state not flattened (param_groups as a list)
- ``trainer/checkpoint-3/``: HF Trainer / Accelerate FSDP ``SHARDED_STATE_DICT``:
  ``pytorch_model_fsdp_0/`` ({"model": ...}), ``optimizer_0/`` ({"optimizer": ...},
  not flattened), config.json, trainer_state.json, rng_state_0.pth

torchtitan's and OLMo-core's own checkpoints are made by the frameworks themselves
(``tests/frameworks/``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_config, unbalance  # noqa: E402

FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def config():
    return make_config("llama", num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)


def model():
    """The skewed HF Llama."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config(), attn_implementation="eager")
    with torch.no_grad():
        unbalance(hf)
    return hf


def logits(model, ids=IDS) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def loss(model, ids=IDS) -> torch.Tensor:
    out = logits(model, ids)
    return torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))


def shard(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    blocks = model.model.layers if hasattr(model, "model") else model.layers.values()
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train(model, opt, steps: int) -> float:
    value = 0.0
    for _ in range(steps):
        loss_ = loss(model)
        loss_.backward()
        opt.step()
        opt.zero_grad()
        value = float(loss_.detach())
    return value


def make(out: Path) -> None:
    rank = dist.get_rank()
    hf = shard(model())
    ho = torch.optim.AdamW(hf.parameters(), lr=1e-3, weight_decay=0.1)
    train(hf, ho, 3)
    msd = get_model_state_dict(hf)
    dcp.save({"model": msd, "optimizer": get_optimizer_state_dict(hf, ho, options=FLAT)}, checkpoint_id=out / "hf")
    dcp.save({"model": msd, "optimizer": get_optimizer_state_dict(hf, ho)}, checkpoint_id=out / "hf-nested")
    trainer = out / "trainer" / "checkpoint-3"
    dcp.save({"model": msd}, checkpoint_id=trainer / "pytorch_model_fsdp_0")
    dcp.save({"optimizer": get_optimizer_state_dict(hf, ho)}, checkpoint_id=trainer / "optimizer_0")
    if rank == 0:
        for folder in ("hf", "hf-nested", "trainer/checkpoint-3"):
            config().to_json_file(str(out / folder / "config.json"))
        (trainer / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
        torch.save({"python": 1, "torch": torch.get_rng_state()}, trainer / "rng_state_0.pth")
    dist.barrier()


def make_hf(out: Path, model_dir: Path) -> None:
    """Any transformers model (an MoE's experts fused in 3-D parameters, sharded over experts):
    2 AdamW steps under FSDP2, then {"model", "optimizer"} (flattened) as a training loop saves it."""
    from transformers import AutoModelForCausalLM

    model = shard(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, opt, 2)
    dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt, options=FLAT)},
             checkpoint_id=out)
    if dist.get_rank() == 0:
        model.config.to_json_file(str(out / "config.json"))
    dist.barrier()


def load_into(model, src: Path, kind: str):
    """A fresh sharded model and AdamW with SRC's state loaded (resharded to this world size)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    flat = StateDictOptions(flatten_optimizer_state_dict=kind == "hf")
    msd, osd = get_model_state_dict(model), get_optimizer_state_dict(model, opt, options=flat)
    if kind == "trainer":
        dcp.load({"model": msd}, checkpoint_id=src / "pytorch_model_fsdp_0")
        dcp.load({"optimizer": osd}, checkpoint_id=src / "optimizer_0")
    else:
        dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=src)
    set_model_state_dict(model, msd)
    set_optimizer_state_dict(model, opt, osd, options=flat)
    return opt


def resume(out: Path, jobs: list[str]) -> None:
    """Each KIND=SRC: a fresh sharded model and AdamW (the fixture's initial weights, so a
    load that missed anything shows), SRC loaded, its logits, and two more training steps."""
    for i, job in enumerate(jobs):
        kind, src = job.split("=", 1)
        m = shard(model())
        opt = load_into(m, Path(src), kind)
        first = logits(m).detach()
        train(m, opt, 2)
        after = float(loss(m).detach())
        if dist.get_rank() == 0:
            torch.save({"logits": first, "loss_after": after}, out / f"{i}.pt")
    dist.barrier()


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    if sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    elif sys.argv[1] == "make-hf":
        make_hf(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        resume(Path(sys.argv[2]), sys.argv[3:])
    print(f"rank {dist.get_rank()}: OK", flush=True)
    dist.barrier()   # every rank past its last collective: gloo's teardown then has nothing in flight
    dist.destroy_process_group()
    # everything this worker writes is closed by now; leave without the interpreter's teardown, where a
    # native thread still joinable at exit has aborted a finished job ("terminate called without an
    # active exception", once under load)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
