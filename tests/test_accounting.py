"""Every piece of training state accounted for, in every backend, and no code from a checkpoint run.

The rule: each optimizer or engine entry in SRC is rescaled exactly with its parameter's
multiplier, shown to belong to a parameter wisca leaves alone, or the command refuses before
writing anything (exit 2, one line naming the entry). ``--training-state drop`` is the one
opt-out: the output leaves the state out and says how to resume. And every pickle wisca reads
goes through an allow-list: a file whose unpickling would run code is refused, and nothing runs.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from conftest import dcp_llama, make_config, run_cli, synthetic_llama, unbalance
from dcp_helpers import refused

import wisca_cli as wisca


class _Payload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _refused_cli(*args, match: str) -> None:
    res = run_cli(*args)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and match in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("accounting")
    dcp_src = dcp_llama(root / "dcp")
    dcp_out = root / "dcp-T"
    assert run_cli("transform", dcp_src, dcp_out).returncode == 0
    return {"dcp": dcp_src, "dcp-T": dcp_out, "root": root}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _add_entries(folder: Path, entries: dict) -> None:
    """Add tensors to a DCP checkpoint: saved beside it, then merged into its metadata."""
    import torch.distributed.checkpoint as dcp

    extra = folder.parent / (folder.name + "-extra")
    dcp.save(entries, checkpoint_id=extra)
    md = dcp.FileSystemReader(folder).read_metadata()
    more = dcp.FileSystemReader(extra).read_metadata()
    for idx, info in more.storage_data.items():
        name = "extra_" + info.relative_path
        shutil.copyfile(extra / info.relative_path, folder / name)
        info.relative_path = name
        md.storage_data[idx] = info
    md.state_dict_metadata.update(more.state_dict_metadata)
    if isinstance(md.planner_data, dict) and isinstance(more.planner_data, dict):
        md.planner_data.update(more.planner_data)
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    shutil.rmtree(extra)


# -- DCP ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, match", [
    # a fused parameter's moment beside split weights (torchtitan's wqkv): follows no tensor here
    ("optimizer.state.model.layers.0.self_attn.qkv_proj.weight.exp_avg",
     "optimizer state of model.layers.0.self_attn.qkv_proj.weight, which is not a tensor of the checkpoint"),
    # another framework's optimizer prefix (OLMo-core's optim.), of no parameter
    ("optim.state.blocks.0.attention.w_q.weight.exp_avg", "optimizer state of blocks.0.attention.w_q.weight"),
    # an optimizer tensor that is not <prefix>state.<parameter>.<key>
    ("optimizer.master_weights.0", "optimizer state wisca cannot map to a parameter"),
    # a moment or master copy outside any optimizer's keys
    ("engine.layers.0.exp_avg_sq", "looks like training state"),
    ("fp32_master.model.layers.0.self_attn.q_proj.weight", "looks like training state"),
])
def test_dcp_state_that_follows_no_weight_is_refused(made, tmp_path, key, match):
    src = _copy(made["dcp"], tmp_path / "src")
    _add_entries(src, {key: torch.ones(4, 4)})
    refused(src, tmp_path, match=match)


def test_dcp_pickled_moment_of_a_weight_is_refused(made, tmp_path):
    src = _copy(made["dcp"], tmp_path / "src")
    _add_entries(src, {"optimizer.state.model.layers.0.self_attn.q_proj.weight.exp_avg_ext": [1.0, 2.0]})
    refused(src, tmp_path, match="optimizer state stored as a pickled object, not a tensor")


def test_dcp_unknown_moment_of_a_rescaled_weight_is_refused(made, tmp_path):
    src = _copy(made["dcp"], tmp_path / "src")
    # a rescaled weight (q) with a state key wisca has no power for
    _add_entries(src, {"optimizer.state.model.layers.0.self_attn.q_proj.weight.exp_avg_row": torch.ones(64, 64)})
    refused(src, tmp_path, match="optimizer state 'exp_avg_row' of a rescaled parameter")


def test_dcp_accounting_counts_every_state_entry(made):
    import torch.distributed.checkpoint as dcp

    report = json.loads((made["dcp-T"] / "wisca.json").read_text())
    acc = report["training_state"]["optimizer"]["accounting"]
    keys = [k for k in dcp.FileSystemReader(made["dcp"]).read_metadata().state_dict_metadata
            if k.startswith("optimizer.state.")]
    by_kind = {}
    for k in keys:
        by_kind[k.rsplit(".", 1)[1]] = by_kind.get(k.rsplit(".", 1)[1], 0) + 1
    assert {k: sum(v.values()) for k, v in acc.items()} == by_kind
    assert acc["exp_avg"]["scaled"] > 0 and acc["exp_avg_sq"]["scaled"] == acc["exp_avg"]["scaled"]
    assert acc["exp_avg"]["untouched"] > 0            # the embedding, norms, lm_head: multiplier 1
    assert acc["step"]["copied"] == by_kind["step"] and acc["step"]["scaled"] == 0


def test_dcp_drop_leaves_the_optimizer_out(made, tmp_path):
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    res = run_cli("transform", made["dcp"], out, "--training-state", "drop", "--json")
    assert res.returncode == 0, res.stderr
    opt = json.loads(res.stdout)["training_state"]["optimizer"]
    assert opt["transformed"] is False and opt["dropped"] and "fresh optimizer" in opt["resume"]
    keys = set(dcp.FileSystemReader(out).read_metadata().state_dict_metadata)
    assert keys and not any(k.startswith("optimizer.") for k in keys)
    src_keys = {k for k in dcp.FileSystemReader(made["dcp"]).read_metadata().state_dict_metadata
                if not k.startswith("optimizer.")}
    assert keys == src_keys
    # torch's own loader reads the model back; it computes what the transformed-with-state output does
    cfg = make_config("llama", num_attention_heads=4, num_key_value_heads=2)
    models = []
    for folder in (out, made["dcp-T"]):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        sd = {"model": {k: v for k, v in model.state_dict().items()}}
        dcp.load(sd, checkpoint_id=folder)
        models.append(sd["model"])
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    assert run_cli("verify", made["dcp"], out).returncode == 0


# -- safetensors folders beside engine state -------------------------------------------------------
def _deepspeed_like(src: Path) -> None:
    (src / "global_step3").mkdir()
    torch.save({"module": {}}, src / "global_step3" / "mp_rank_00_model_states.pt")
    (src / "latest").write_text("global_step3")


def test_engine_state_beside_safetensors_is_refused_and_drop_leaves_it_out(tmp_path):
    src = synthetic_llama(tmp_path / "src")
    _deepspeed_like(src)
    refused(src, tmp_path, match=f"{src / 'global_step3'}: no zero_pp_rank_*_optim_states.pt")
    out = tmp_path / "out"
    res = run_cli("transform", src, out, "--training-state", "drop", "--json")
    assert res.returncode == 0, res.stderr
    opt = json.loads(res.stdout)["training_state"]["optimizer"]
    assert sorted(opt["dropped"]) == ["global_step3", "latest"]
    assert not (out / "global_step3").exists() and not (out / "latest").exists()
    assert (out / "config.json").is_file()


@pytest.mark.parametrize("name", ["optimizer_1.bin", "rank0-of-2-optimizer.pt"])
def test_other_optimizer_files_are_refused(tmp_path, name):
    src = synthetic_llama(tmp_path / "src")
    torch.save({"state": {}}, src / name)
    refused(src, tmp_path, match=f"{src / name}: a per-rank optimizer state file")


# -- adapters -------------------------------------------------------------------------------------
def _adapter(src: Path) -> Path:
    """A PEFT LoRA adapter (q_proj, v_proj, rank 4, lora_B non-zero) saved at ``src``."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(make_config("llama", num_attention_heads=4, num_key_value_heads=2))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    model.save_pretrained(src)
    return src


def test_adapter_with_a_state_it_cannot_rescale_is_refused(tmp_path):
    src = _adapter(tmp_path / "adapter")
    torch.save({"state": {0: {"exp_avg_sq_row": torch.ones(4)}}, "param_groups": [{"params": [0]}]},
               src / "optimizer.pt")
    refused(src, tmp_path, match="optimizer state keys ['exp_avg_sq_row']")
    out = tmp_path / "out"
    res = run_cli("transform", src, out, "--training-state", "drop", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["training_state"]["optimizer"]["dropped"] == ["optimizer.pt"]
    assert not (out / "optimizer.pt").exists() and (out / "adapter_model.safetensors").is_file()


# -- live models -------------------------------------------------------------------------------------
def _live():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config("llama", num_attention_heads=4, num_key_value_heads=2),
                                             attn_implementation="eager")
    with torch.no_grad():
        unbalance(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def test_live_moment_of_another_shape_is_refused_before_anything_changes():
    model, opt = _live()
    q = model.model.layers[0].self_attn.q_proj.weight
    opt.state[q]["exp_avg"] = opt.state[q]["exp_avg"].flatten()     # a flattened moment
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    with pytest.raises(wisca.WiscaError, match=r"optimizer state 'exp_avg' of model\.layers\.0\.self_attn\.q_proj"
                                               r"\.weight is torch\.float32 of shape \[4096\]"):
        wisca.transition(model, opt)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(torch.equal(v, moments[id(p)][k]) for p, s in opt.state.items() for k, v in s.items())


def test_live_accounting_counts_every_state_entry():
    model, opt = _live()
    report = wisca.transition(model, opt)
    acc = report["optimizer"]["accounting"]
    n = len(list(model.parameters()))
    assert {k: sum(v.values()) for k, v in acc.items()} == {"step": n, "exp_avg": n, "exp_avg_sq": n}
    assert acc["exp_avg"]["scaled"] > 0 and acc["exp_avg"]["untouched"] > 0 and acc["step"]["copied"] == n


# -- no code from a checkpoint ---------------------------------------------------------------------
@pytest.mark.parametrize("command", ["transform", "verify", "inspect", "undo"])
def test_a_metadata_pickle_that_would_run_code_is_refused(made, tmp_path, command):
    marker = tmp_path / "ran"
    which = "dcp-T" if command in ("verify", "undo") else "dcp"
    src = _copy(made[which], tmp_path / "src")
    (src / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    args = {"transform": [src, tmp_path / "out"], "inspect": [src], "undo": [src, tmp_path / "out"],
            "verify": [made["dcp"], src]}[command]
    _refused_cli(command, *args, match=f"{src / '.metadata'}: refused to unpickle posix.system")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_an_optimizer_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    src = synthetic_llama(tmp_path / "src")
    torch.save({"state": {}, "param_groups": [], "x": _Payload(marker)}, src / "optimizer.pt")
    for command in (["transform", src, tmp_path / "out"], ["transform", src, tmp_path / "out", "--json"]):
        _refused_cli(*command, match=f"{src / 'optimizer.pt'}: cannot be read with torch.load(weights_only=True)")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_by_name_state_of_a_fused_parameter_is_refused(tmp_path):
    """A by-name optimizer state (get_optimizer_state_dict saved as optim.pt) holding the moment
    of a parameter fused in memory (qkv_proj) beside split q/k/v weights: not a tensor of the
    checkpoint, so it is refused, never copied."""
    src = synthetic_llama(tmp_path / "src")
    name = "model.layers.0.self_attn.qkv_proj.weight"
    torch.save({"state": {name: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(128, 64),
                                 "exp_avg_sq": torch.zeros(128, 64)}},
                "param_groups": [{"lr": 1e-3, "params": [name]}]}, src / "optim.pt")
    refused(src, tmp_path, match=f"{src / 'optim.pt'}: ")
    res = run_cli("transform", src, tmp_path / "never")
    assert "qkv_proj" in res.stderr


@pytest.mark.parametrize("command", ["transform", "inspect"])
def test_a_chunk_pickle_that_would_run_code_is_refused(made, tmp_path, command):
    """A .distcp chunk is a torch.save archive, read by wisca's own tensor-only unpickler or
    torch.load(weights_only=True): a chunk whose unpickling would run code is refused."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "ran"
    src = _copy(made["dcp"], tmp_path / "src")
    md = dcp.FileSystemReader(src).read_metadata()
    key = "model.model.layers.0.self_attn.q_proj.weight"
    idx = next(i for i in md.storage_data if i.fqn == key)
    payload = pickle.dumps(_Payload(marker))
    (src / "__evil.distcp").write_bytes(payload)
    md.storage_data[idx].relative_path, md.storage_data[idx].offset = "__evil.distcp", 0
    md.storage_data[idx].length = len(payload)
    (src / ".metadata").write_bytes(pickle.dumps(md))
    args = [src, tmp_path / "out"] if command == "transform" else [src]
    _refused_cli(command, *args, match=f"{src / '__evil.distcp'}: chunk of {key} is corrupt")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_adapter_by_name_state_of_a_parameter_it_does_not_have_is_refused(tmp_path):
    """An adapter checkpoint whose by-name optimizer state holds a moment of a parameter the
    adapter does not hold (a fused lora_A of q/k/v): refused, never copied."""
    src = _adapter(tmp_path / "adapter")
    name = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.default.weight"
    torch.save({"state": {name: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(4, 64),
                                 "exp_avg_sq": torch.zeros(4, 64)}},
                "param_groups": [{"lr": 1e-3, "params": [name]}]}, src / "optim.pt")
    refused(src, tmp_path, match=f"{src / 'optim.pt'}: parameter base_model.model.model.layers.0.self_attn."
                                 f"qkv_proj.lora_A.weight")
