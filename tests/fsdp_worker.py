"""Run under `torchrun --nproc-per-node 2 tests/fsdp_worker.py {1d|2d} TMP [MODEL]` (gloo, CPU).

Every rank builds the same skewed tiny GQA Llama (or loads the transformers checkpoint
folder MODEL: an MoE's 3-D fused experts are then sharded over the expert axis), shards it with FSDP2 ``fully_shard``
(1d: one mesh of 2 ranks; 2d: HSDP, replicate 2 x shard 1), trains one AdamW step, and
calls ``wisca_cli.transition``. The reference is a plain copy of the same model and
optimizer state (gathered before the transition) transitioned in one process: the gathered
weights and moments must equal it bit for bit, and training must go on.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_config, unbalance  # noqa: E402

import wisca_cli as wisca  # noqa: E402


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main() -> None:
    mesh_kind = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if len(sys.argv) > 3:
        model = AutoModelForCausalLM.from_pretrained(sys.argv[3], dtype=torch.float32, attn_implementation="eager")
    else:
        model = AutoModelForCausalLM.from_config(make_config("llama", num_attention_heads=4, num_key_value_heads=2),
                                                 attn_implementation="eager")
        unbalance(model)
    ref = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (2,)) if mesh_kind == "1d" else \
        init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()

    # the reference: the same weights and moments, gathered, in one process
    names = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        ref_params = dict(ref.named_parameters())
        for n, p in model.named_parameters():
            ref_params[n].copy_(full(p))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    ref_opt.state.update({ref_params[names[id(p)]]: {k: full(v).clone() for k, v in s.items()}
                          for p, s in opt.state.items()})
    for group in ref_opt.param_groups:
        group.update({k: v for k, v in opt.param_groups[0].items() if k != "params"})

    report = wisca.transition(model, opt)
    expected = wisca.transition(ref, ref_opt)
    assert report["verification"]["identical"], report["verification"]
    for kind, got in report["summary"].items():   # the same scales; imbalance figures up to summation order
        want = expected["summary"][kind]
        for key, value in got.items():
            assert (value == want[key]) if isinstance(value, int) else abs(value - want[key]) <= 1e-6 * max(1, abs(value)), \
                (kind, key, value, want[key])
    assert sum(s["units_changed"] for s in report["summary"].values()) > 0
    for n, p in model.named_parameters():
        assert torch.equal(full(p), ref_params[n].detach()), n
    for p, s in opt.state.items():
        rp = ref_params[names[id(p)]]
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(full(s[k]), ref_opt.state[rp][k]), (names[id(p)], k)
    # same function (checked inside, all ranks agreed), and training goes on
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    print(f"rank {rank}: FSDP2 OK ({mesh_kind})", flush=True)
    dist.barrier()   # every rank past its last collective: gloo's teardown then has nothing in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
