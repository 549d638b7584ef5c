"""torch.distributed.checkpoint (DCP) inputs: the layouts FSDP2 loops and HF Trainer/Accelerate
write (built by ``tests/dcp_worker.py`` under torchrun, 2 ranks, gloo), each transformed,
loaded back with ``dcp.load`` at world size 1 and 2 into transformers' Llama, compared bit for
bit, trained on, and undone. torchtitan's and OLMo-core's own checkpoints:
``tests/test_framework_*.py``."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import REPO, run_cli

import dcp_worker  # noqa: E402  (tests/ is on sys.path)
from dcp_helpers import assert_rescaled, entries, metadata, refused as _refused  # noqa: E402

LAYOUTS = {"hf": "hf", "hf-nested": "hf-nested", "trainer": "trainer/checkpoint-3"}
ENV = {"OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def torchrun(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ENV, **(env or {})})


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    res = torchrun(REPO / "tests" / "dcp_worker.py", "make", root)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def transformed(made, tmp_path_factory):
    """kind -> (source, output, report) for every layout, by `wisca transform` with defaults."""
    out = tmp_path_factory.mktemp("dcp-out")
    done = {}
    for kind, rel in LAYOUTS.items():
        dst = out / kind
        res = run_cli("transform", made / rel, dst, "--json")
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        done[kind] = (made / rel, dst, json.loads(res.stdout))
    return done


def model_for(kind: str):
    return dcp_worker.model()


def load_logits(kind: str, folder: Path) -> torch.Tensor:
    """World size 1: a fresh model and optimizer with the checkpoint loaded by dcp.load."""
    model = model_for(kind)
    dcp_worker.load_into(model, folder, kind)
    with torch.no_grad():
        return dcp_worker.logits(model)


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_transform_each_layout_bit_exact(kind, transformed, made):
    src, dst, report = transformed[kind]
    assert report["format"] == "dcp" and report["verification"]["identical"]
    assert report["name_adapter"] is None
    for pair in ("qk", "vo", "ffn"):   # the skew is undone
        s = report["summary"][pair]
        assert s["imbalance_after"] < 0.5 * s["imbalance_before"], (pair, s)
    # the same DCP keys, chunks and planner data; only the storage table differs
    for ma, mb in zip(metadata(src), metadata(dst)):
        assert ma.state_dict_metadata == mb.state_dict_metadata and ma.planner_data == mb.planner_data
    assert_rescaled(src, dst)
    # world size 1: dcp.load into the framework's own fresh model: the same logits, bit for bit
    assert torch.equal(load_logits(kind, src), load_logits(kind, dst))


def test_norm_target_with_the_final_norm(made, tmp_path):
    """--targets with norm: the layer norms and the final norm -> lm_head pair, their moments too."""
    src, dst = made / "hf", tmp_path / "norm"
    res = run_cli("transform", src, dst, "--targets", "qk,vo,ffn,norm", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert report["layers"][-1]["layer"] == "final" and "norm" in report["layers"][-1]
    mults = assert_rescaled(src, dst)
    assert {"model.lm_head.weight", "model.model.norm.weight"} <= set(mults)
    assert torch.equal(load_logits("hf", src), load_logits("hf", dst))
    restored = tmp_path / "restored"
    assert run_cli("undo", dst, restored).returncode == 0
    a, b = entries(src), entries(restored)
    assert all(torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k] for k, v in a.items())


def test_world_size_2_resume_and_undo(transformed, made, tmp_path):
    """dcp.load at world size 2 (FSDP2, resharded): bit-identical logits, training goes on;
    `wisca undo` gives the source's entries back bit for bit."""
    args = [f"{k}={p}" for k in LAYOUTS for p in (transformed[k][0], transformed[k][1])]
    res = torchrun(REPO / "tests" / "dcp_worker.py", "resume", tmp_path, *args)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    for i, kind in enumerate(LAYOUTS):
        a, b = torch.load(tmp_path / f"{2 * i}.pt"), torch.load(tmp_path / f"{2 * i + 1}.pt")
        assert torch.equal(a["logits"], b["logits"]), kind
        assert torch.equal(a["logits"], load_logits(kind, transformed[kind][1])), kind   # ws 1 == ws 2
        assert torch.isfinite(torch.tensor(b["loss_after"])), kind
    for kind, (src, dst, _) in transformed.items():
        restored = tmp_path / f"undo-{kind}"
        res = run_cli("undo", dst, restored, "--json")
        assert res.returncode == 0, res.stderr[-2000:]
        a, b = entries(src), entries(restored)
        assert a.keys() == b.keys()
        for key, va in a.items():
            assert (torch.equal(va, b[key]) if isinstance(va, torch.Tensor) else va == b[key]), (kind, key)
        assert not (restored / "wisca.json").exists()


def test_trainer_files_are_copied(transformed):
    src, dst, _ = transformed["trainer"]
    for name in ("trainer_state.json", "rng_state_0.pth", "config.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()
    assert (dst / "wisca.json").is_file() and (dst / "optimizer_0" / ".metadata").is_file()


def test_torchrun_transform_equals_single_process_and_a_fault_leaves_nothing(transformed, made, tmp_path):
    src, single, _ = transformed["hf"]
    out = tmp_path / "two-ranks"
    res = torchrun("-m", "wisca_cli", "transform", src, out, "--json")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["ranks"] == 2 and report["verification"]["identical"]
    a, b = entries(single), entries(out)
    assert a.keys() == b.keys()
    for key, va in a.items():
        assert (torch.equal(va, b[key]) if isinstance(va, torch.Tensor) else va == b[key]), key
    assert sorted(p.name for p in out.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # a fault on rank 1 after it wrote part of its output: nothing left, every rank fails
    bad = tmp_path / "faulty"
    res = torchrun("-m", "wisca_cli", "transform", src, bad, env={"WISCA_TEST_FAULT_RANK": "1"})
    assert res.returncode != 0
    assert not bad.exists() and not any(".wisca-tmp-" in p.name for p in tmp_path.iterdir())
    # rank 0 prints the first error of any rank before any rank leaves (the ranks meet after it spoke)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "rank 1" in errors[0] and "injected test fault" in errors[0], res.stderr[-2000:]
    # torchrun's report: the ranks exit 2; one that is still on its way out when torchrun sees the
    # other's exit is stopped by torchrun's SIGTERM (143), and nothing else
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", res.stderr)
    assert "2" in codes and set(codes) <= {"2", "143", "-15"}, res.stderr[-3000:]


# -- bad input: one line, exit 2, nothing written -------------------------------------------------------
def _copy(made: Path, tmp: Path, kind: str = "hf") -> Path:
    dst = tmp / f"src-{kind}"
    shutil.copytree(made / LAYOUTS[kind], dst)
    return dst


def _edit_metadata(folder: Path, edit) -> None:
    md = dcp.FileSystemReader(folder).read_metadata()
    edit(md)
    (folder / ".metadata").write_bytes(pickle.dumps(md))


def test_missing_config_names_where_it_looked(made, tmp_path):
    src = _copy(made, tmp_path, "hf")
    (src / "config.json").unlink()
    _refused(src, tmp_path, match="no config.json in the folder or its parent; pass --config")


def test_truncated_and_corrupt_chunks(made, tmp_path):
    src = _copy(made, tmp_path)
    data = src / "__1_0.distcp"
    data.write_bytes(data.read_bytes()[:1000])
    _refused(src, tmp_path, match="__1_0.distcp: file is shorter than .metadata says (truncated checkpoint)")
    shutil.rmtree(src)
    src = _copy(made, tmp_path)
    raw = bytearray((src / "__0_0.distcp").read_bytes())
    raw[100:4000] = bytes(3900)     # zeroed inside the first chunks
    (src / "__0_0.distcp").write_bytes(bytes(raw))
    _refused(src, tmp_path, match="is corrupt")


def test_format_edge_cases(made, tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    src = _copy(made, tmp_path)

    def compressed(md):
        idx = next(iter(md.storage_data))
        md.storage_data[idx].transform_descriptors = ["zstd"]
    _edit_metadata(src, compressed)
    _refused(src, tmp_path, match="is stored with DCP transforms (zstd), which wisca cannot rewrite")

    shutil.rmtree(src)
    src = _copy(made, tmp_path)

    def megatron_buckets(md):
        md.state_dict_metadata["optimizer.distributed.dp_group_idx_0.gbuf_idx_0.bucket_idx_0.exp_avg"] = \
            BytesStorageMetadata()
    _edit_metadata(src, megatron_buckets)
    _refused(src, tmp_path, match="save with --dist-ckpt-optim-fully-reshardable")

    # a .metadata that needs a Megatron class wisca has no stand-in for (its MCoreMetadata lives elsewhere)
    (src / ".metadata").write_bytes(b"\x80\x04cmegatron.core.dist_checkpointing.metadata\nMCoreMetadata\n)\x81.")
    _refused(src, tmp_path, match="a Megatron-core checkpoint's metadata holds "
                                  "megatron.core.dist_checkpointing.metadata.MCoreMetadata, a class wisca does not know")
    (src / ".metadata").write_bytes(b"not a pickle")
    _refused(src, tmp_path, match="not a torch.distributed.checkpoint metadata file")


def test_safetensors_under_torchrun_and_config_elsewhere_are_refused(tmp_path):
    from conftest import SAMPLE

    res = run_cli("transform", SAMPLE, tmp_path / "o", "--config", SAMPLE / "config.json")
    assert res.returncode == 2 and "--config: applies only to torch.distributed checkpoints" in res.stderr
    res = run_cli("transform", SAMPLE, tmp_path / "o", env={"WORLD_SIZE": "2", "RANK": "0"})
    assert res.returncode == 2 and "run plain wisca on this one" in res.stderr
    assert not (tmp_path / "o").exists()


def test_inspect_and_verify_take_dcp(transformed, made, tmp_path):
    src, dst, _ = transformed["hf"]
    res = run_cli("inspect", dst, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert report["architecture"] == "llama" and report["before"]["summary"]["qk"]["mean_abs_log2"] > \
        report["summary"]["qk"]["mean_abs_log2"]
    res = run_cli("verify", src, dst, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["verification"]["identical"], res.stderr[-2000:]
    # continuous scales round: not bit-identical (exit 1), within the tolerances
    cont = tmp_path / "continuous"
    res = run_cli("transform", src, cont, "--scales", "continuous")
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli("verify", src, cont, "--mode", "exact")
    assert res.returncode == 1 and "verification failed" in res.stdout + res.stderr, res.stdout + res.stderr
    res = run_cli("verify", src, cont)      # auto: the record says it rounds
    assert res.returncode == 0, res.stdout + res.stderr


def test_wrapper_segments_are_recognised_and_kept(tmp_path):
    """torch.compile, activation checkpointing and FSDP1 wrapper segments in the FQNs: the
    tensors are found, the keys stay exactly as they were."""
    from conftest import dcp_llama

    plain = dcp_llama(tmp_path / "plain", steps=2)
    wrapped = {}
    for key, value in entries(plain).items():
        key = key.replace("model.layers.", "_orig_mod.model.layers.").replace(
            ".self_attn.", "._checkpoint_wrapped_module.self_attn.").replace(".mlp.", "._fsdp_wrapped_module.mlp.")
        wrapped[key] = value
    src = tmp_path / "wrapped"
    dcp.save(wrapped, checkpoint_id=src, no_dist=True)
    shutil.copyfile(plain / "config.json", src / "config.json")
    dst = tmp_path / "out"
    res = run_cli("transform", src, dst, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    mults = assert_rescaled(src, dst)
    assert any("_orig_mod." in k and "_checkpoint_wrapped_module." in k for k in mults)
    assert any("._fsdp_wrapped_module.mlp." in k for k in mults)
