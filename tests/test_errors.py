"""Bad input and faults: exit 2 (or 130/143), one clear line, the source untouched, no output.

Each case states its behaviour in the README's troubleshooting section.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import wisca_cli as wisca
from conftest import hf_logits, probe_tokens, run_cli, synthetic_llama, tree_hash


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".wisca-tmp-" in p.name or ".wisca-old-" in p.name]


def assert_clean_failure(res, src: Path, before: dict, dst: Path, *needles: str, code: int = 2):
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = [line for line in res.stderr.strip().splitlines() if not line.startswith("warning: --no-verify")]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert tree_hash(src) == before
    assert not dst.exists()
    assert not dst.parent.exists() or leftovers(dst.parent) == []


@pytest.fixture
def src(tmp_path, ckpt_dir):
    """A private, mutable copy of a tiny GQA llama."""
    path = tmp_path / "src"
    shutil.copytree(ckpt_dir("llama-gqa"), path)
    return path


@pytest.fixture
def sharded(tmp_path, ckpt_dir):
    path = tmp_path / "sharded"
    shutil.copytree(ckpt_dir("llama-gqa", torch.bfloat16, shard_size="40KB"), path)
    return path


def transform_fails(src: Path, dst: Path, *needles: str, mutate=None, extra=()):
    if mutate:
        mutate(src)
    before = tree_hash(src)
    res = run_cli("transform", src, dst, *extra)
    assert_clean_failure(res, src, before, dst, *needles)
    return res


def rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data[8 + n:])


# -- the source ------------------------------------------------------------------------------
def test_missing_config(src, tmp_path):
    transform_fails(src, tmp_path / "out", "config.json", "not found", mutate=lambda p: (p / "config.json").unlink())


def test_config_not_json(src, tmp_path):
    transform_fails(src, tmp_path / "out", "config.json", "invalid JSON",
                    mutate=lambda p: (p / "config.json").write_text("{model_type: llama"))


def test_config_unreadable(src, tmp_path):
    transform_fails(src, tmp_path / "out", "config.json", "cannot read",
                    mutate=lambda p: (p / "config.json").write_bytes(b"\xff\xfe\x00garbage"))


def test_unknown_model_type_names_the_supported_ones(src, tmp_path):
    def edit(p):
        cfg = json.loads((p / "config.json").read_text())
        cfg["model_type"] = "bert"
        (p / "config.json").write_text(json.dumps(cfg))
    transform_fails(src, tmp_path / "out", "'bert' is not supported", "llama", "mistral", "qwen2", mutate=edit)


def test_missing_source_folder(tmp_path):
    res = run_cli("transform", tmp_path / "nope", tmp_path / "out")
    assert res.returncode == 2 and "no such folder" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("field,value,needle", [
    ("num_key_value_heads", 4, "self_attn.k_proj.weight has shape [32, 64], expected [64, 64]"),
    ("num_attention_heads", 3, "not a multiple"),
    ("num_hidden_layers", 3, "layer 2 tensor model.layers.2.input_layernorm.weight is missing"),
    ("num_hidden_layers", 1, "model.layers.1.input_layernorm.weight is beyond num_hidden_layers=1"),
    ("intermediate_size", 64, "mlp.gate_proj.weight has shape [96, 64], expected [64, 64]"),
    ("attention_bias", True, "self_attn.q_proj.bias is missing"),
    ("hidden_size", "64", "hidden_size must be a positive integer"),
])
def test_config_inconsistent_with_tensors(src, tmp_path, field, value, needle):
    def edit(p):
        cfg = json.loads((p / "config.json").read_text())
        cfg[field] = value
        (p / "config.json").write_text(json.dumps(cfg))
    transform_fails(src, tmp_path / "out", needle, mutate=edit)


def test_missing_layer_tensor(src, tmp_path):
    def edit(p):
        t = load_file(p / "model.safetensors")
        del t["model.layers.1.mlp.up_proj.weight"]
        save_file(t, p / "model.safetensors", metadata={"format": "pt"})
    transform_fails(src, tmp_path / "out", "model.layers.1.mlp.up_proj.weight is missing", mutate=edit)


def test_extra_layer_tensor(src, tmp_path):
    def edit(p):
        t = load_file(p / "model.safetensors")
        t["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
        save_file(t, p / "model.safetensors", metadata={"format": "pt"})
    transform_fails(src, tmp_path / "out", "model.layers.0.self_attn.extra.weight is not part of the llama", mutate=edit)


def test_truncated_shard(src, tmp_path):
    def edit(p):
        f = p / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-1000])
    transform_fails(src, tmp_path / "out", "model.safetensors", "not a valid safetensors file", mutate=edit)


def test_header_length_wrong(src, tmp_path):
    def edit(p):
        f = p / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[:8] = struct.pack("<Q", struct.unpack("<Q", data[:8])[0] + 13)
        f.write_bytes(bytes(data))
    transform_fails(src, tmp_path / "out", "model.safetensors", "not a valid safetensors file", mutate=edit)


def test_header_length_huge(src, tmp_path):
    def edit(p):
        f = p / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(struct.pack("<Q", 2 ** 62) + data[8:])
    transform_fails(src, tmp_path / "out", "model.safetensors", "not a valid safetensors file", mutate=edit)


def test_header_invalid_json(src, tmp_path):
    def edit(p):
        f = p / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[8] = ord("[")
        f.write_bytes(bytes(data))
    transform_fails(src, tmp_path / "out", "model.safetensors", "not a valid safetensors file", mutate=edit)


@pytest.mark.parametrize("case", ["out_of_range", "overlapping", "unknown_dtype", "wrong_dtype_size"])
def test_header_bad_entries(src, tmp_path, case):
    name = "model.layers.0.self_attn.q_proj.weight"

    def edit(header):
        entry = header[name]
        if case == "out_of_range":
            entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][1] + 10 ** 9]
        elif case == "overlapping":
            entry["data_offsets"] = [entry["data_offsets"][0] - 8, entry["data_offsets"][1] - 8]
        elif case == "unknown_dtype":
            entry["dtype"] = "F42"
        else:
            entry["dtype"] = "F16"
    transform_fails(src, tmp_path / "out", "model.safetensors", "not a valid safetensors file",
                    mutate=lambda p: rewrite_header(p / "model.safetensors", edit))


def test_header_duplicate_names(src, tmp_path):
    def edit(p):
        f = p / "model.safetensors"
        data = f.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = data[8:8 + n].replace(b'"model.layers.0.mlp.up_proj.weight"', b'"model.layers.0.mlp.gate_proj.weight"')
        f.write_bytes(data[:8] + header + data[8 + n:])
    transform_fails(src, tmp_path / "out", "model.safetensors", mutate=edit)


def test_integer_dtype_where_floats_belong(src, tmp_path):
    def edit(p):
        t = load_file(p / "model.safetensors")
        t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(96, 64, dtype=torch.int32)
        save_file(t, p / "model.safetensors", metadata={"format": "pt"})
    transform_fails(src, tmp_path / "out", "up_proj.weight has dtype I32", mutate=edit)


def test_index_names_missing_shard(sharded, tmp_path):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    transform_fails(sharded, tmp_path / "out", shard.name, "shard file not found", mutate=lambda p: shard.unlink())


def test_index_tensor_in_wrong_shard(sharded, tmp_path):
    def edit(p):
        idx = json.loads((p / "model.safetensors.index.json").read_text())
        wm = idx["weight_map"]
        shards = sorted(set(wm.values()))
        name = next(n for n, s in wm.items() if s == shards[0])
        wm[name] = shards[1]
        (p / "model.safetensors.index.json").write_text(json.dumps(idx))
    transform_fails(sharded, tmp_path / "out", "model.safetensors.index.json", "is listed in", mutate=edit)


def test_index_invalid_json(sharded, tmp_path):
    transform_fails(sharded, tmp_path / "out", "model.safetensors.index.json", "invalid JSON",
                    mutate=lambda p: (p / "model.safetensors.index.json").write_text('{"weight_map": '))


def test_index_shard_path_escapes_folder(sharded, tmp_path):
    def edit(p):
        idx = json.loads((p / "model.safetensors.index.json").read_text())
        first = next(iter(idx["weight_map"]))
        idx["weight_map"][first] = "../../etc/passwd"
        (p / "model.safetensors.index.json").write_text(json.dumps(idx))
    transform_fails(sharded, tmp_path / "out", "invalid shard name", mutate=edit)


def test_no_weights_at_all(src, tmp_path):
    transform_fails(src, tmp_path / "out", "no model.safetensors", mutate=lambda p: (p / "model.safetensors").unlink())


# a balanced tensor (found by the statistics pass), an unbalanced one (its own scan), the
# streamed embedding and lm_head (row blocks); with and without verification
@pytest.mark.parametrize("name", ["model.layers.1.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight",
                                  "model.layers.0.input_layernorm.weight",
                                  # layer 1's reference step (and its scan) starts during layer 0's
                                  "model.layers.1.post_attention_layernorm.weight", "model.embed_tokens.weight",
                                  "lm_head.weight"])
@pytest.mark.parametrize("bad,extra", [(float("nan"), ()), (float("inf"), ()), (float("-inf"), ("--no-verify",))])
def test_nan_or_inf_weight_is_refused_naming_the_tensor(src, tmp_path, name, bad, extra):
    def edit(p):
        t = load_file(p / "model.safetensors")
        t[name].view(-1)[min(7, t[name].numel() - 1)] = bad
        save_file(t, p / "model.safetensors", metadata={"format": "pt"})
    transform_fails(src, tmp_path / "out", f"{name} contains NaN or Inf", mutate=edit, extra=extra)


# -- degenerate weights that must work -------------------------------------------------------
def test_dead_units_keep_scale_one_and_are_reported(src, tmp_path):
    t = load_file(src / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight"][[3, 7]] = 0.0           # two dead neurons
    t["model.layers.1.self_attn.k_proj.weight"][:16] = 0.0         # a dead kv head: q/k of group 0
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    dst = tmp_path / "out"
    res = run_cli("transform", src, dst, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["verification"]["identical"]
    assert report["summary"]["ffn"]["dead"] == 2 and report["summary"]["qk"]["dead"] == 8
    assert report["summary"]["ffn"]["imbalance_after"] == report["summary"]["ffn"]["imbalance_after"]  # not NaN
    scales = load_file(dst / "wisca_scales.safetensors")
    assert scales["layers.0.ffn"][[3, 7]].tolist() == [1.0, 1.0]
    assert torch.isfinite(scales["layers.1.qk"]).all() and (scales["layers.1.qk"][:8] == 1).all()
    ids = probe_tokens()
    assert torch.equal(hf_logits(src, ids), hf_logits(dst, ids))


def test_fp16_scales_that_would_overflow_are_clamped_and_reported(tmp_path):
    src = synthetic_llama(tmp_path / "fp16", dtype=torch.float16)
    t = load_file(src / "model.safetensors")
    up = t["model.layers.0.mlp.up_proj.weight"]
    up[5] = up[5] * 2 ** -10                      # tiny row: balancing would multiply it by ~2**5
    up[5, 0] = 4.0e4                              # ...but this element would overflow fp16 (max 65504)
    t["model.layers.0.mlp.down_proj.weight"][:, 9] *= 2 ** -12    # pushes column 9 toward subnormals
    t["model.layers.0.mlp.down_proj.weight"][0, 9] = 3e-5       # near fp16's smallest normal 6.1e-5
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    dst = tmp_path / "out"
    res = run_cli("transform", src, dst, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["summary"]["ffn"]["clamped"] >= 1
    assert report["verification"]["identical"]
    out = load_file(dst / "model.safetensors")
    for name, w in out.items():
        assert torch.isfinite(w).all(), name
    back = tmp_path / "back"
    assert run_cli("undo", dst, back).returncode == 0
    assert all(torch.equal(w, load_file(back / "model.safetensors")[n]) for n, w in t.items())


def test_symlinked_shards_work(sharded, tmp_path):
    """As in the hugging face cache: every file a symlink to a blob elsewhere."""
    linked = tmp_path / "linked"
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    linked.mkdir()
    for f in sharded.iterdir():
        blob = blobs / (f.name + ".blob")
        shutil.copyfile(f, blob)
        (linked / f.name).symlink_to(os.path.relpath(blob, linked))
    dst = tmp_path / "out"
    res = run_cli("transform", linked, dst)
    assert res.returncode == 0, res.stderr
    assert not any(p.is_symlink() for p in dst.iterdir())
    ids = probe_tokens()
    assert torch.equal(hf_logits(sharded, ids), hf_logits(dst, ids))


# -- the target ------------------------------------------------------------------------------
def test_dst_exists_is_refused_without_overwrite(src, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    before = tree_hash(src)
    res = run_cli("transform", src, dst)
    assert res.returncode == 2 and "already exists" in res.stderr and "--overwrite" in res.stderr
    assert (dst / "keep.txt").read_text() == "old" and tree_hash(src) == before


def test_overwrite_replaces_only_after_verification(src, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    import wisca_cli.solve as api   # where the scales are applied
    real = api.apply_scales
    monkeypatch.setattr(api, "apply_scales", lambda p, t, s, **kw: {k: v * 1.001 for k, v in real(p, t, s, **kw).items()})
    with pytest.raises(wisca.VerificationFailed):
        wisca.transform(src, dst, overwrite=True)
    assert (dst / "keep.txt").read_text() == "old" and leftovers(tmp_path) == []
    monkeypatch.setattr(api, "apply_scales", real)
    wisca.transform(src, dst, overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "wisca.json").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["same", "inside"])
def test_dst_equal_to_or_inside_src_is_refused(src, where):
    dst = src if where == "same" else src / "sub" / "out"
    if where == "inside":
        (src / "sub").mkdir()
    before = tree_hash(src)
    res = run_cli("transform", src, dst, "--overwrite")
    assert res.returncode == 2 and "must not be the source folder or inside it" in res.stderr
    assert tree_hash(src) == before


def test_dst_parent_missing(src, tmp_path):
    transform_fails(src, tmp_path / "no" / "such" / "out", "output parent folder does not exist")


def test_dst_parent_read_only(src, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    target = parent / "out" if os.geteuid() != 0 else Path("/sys/wisca-test-out")   # root ignores modes
    before = tree_hash(src)
    res = run_cli("transform", src, target)
    parent.chmod(0o755)
    assert res.returncode == 2 and "cannot create the output folder here" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and tree_hash(src) == before and not target.exists()


def test_file_size_limit_hit_mid_write(tmp_path):
    src = synthetic_llama(tmp_path / "big", hidden=256, layers=4, inter=512, vocab=512)
    before = tree_hash(src)
    dst = tmp_path / "out"
    limit = 600_000   # bytes: smaller than the 4.6 MB shard, larger than config/header

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    res = subprocess.run([sys.executable, "-m", "wisca_cli", "transform", str(src), str(dst)],
                         capture_output=True, text=True, preexec_fn=cap, timeout=120)
    assert_clean_failure(res, src, before, dst, "writing the output failed", "too large")


def _wait_for_tmp(parent: Path, proc, timeout=60.0) -> bool:
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if leftovers(parent):
            return True
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_run_leaves_nothing(tmp_path, sig, code):
    src = synthetic_llama(tmp_path / "big", hidden=512, layers=8, heads=8, kv_heads=2, inter=1536, vocab=4096)
    before = tree_hash(src)
    dst = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "wisca_cli", "transform", str(src), str(dst)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for_tmp(tmp_path, proc), "the run ended before it could be interrupted"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert not dst.exists() and leftovers(tmp_path) == [] and tree_hash(src) == before


def test_a_signal_before_the_cleanup_is_armed_leaves_nothing(src, tmp_path, monkeypatch, capsys):
    """A signal that lands after the temporary folder exists but before the ``with`` block
    that removes it (a real window, seen once under load) is cleaned up by the CLI's signal
    path: every temporary folder is registered before it is created."""
    from wisca_cli import cli, output

    def enter_then_signal(self):
        self.tmp = output.staged_dir(self.dst.parent, self.dst.name)
        cli._on_signal(signal.SIGTERM, None)      # the handler fires here, inside __enter__

    monkeypatch.setattr(output.StagedOutput, "__enter__", enter_then_signal)
    dst = tmp_path / "out"
    assert cli.run(["transform", str(src), str(dst)]) == 143
    assert not dst.exists() and leftovers(tmp_path) == [] and output._STAGED == set()
    assert "SIGTERM: interrupted, no output written" in capsys.readouterr().err


def test_a_signal_as_the_temporary_folder_is_made_leaves_nothing(src, tmp_path, monkeypatch, capsys):
    """The signal handler runs as mkdir returns, the folder already made (the window in which
    a CI run once kept ``.out.wisca-tmp-*``): the folder stays registered and is removed."""
    from wisca_cli import cli, output

    real_mkdir = Path.mkdir

    def mkdir_then_signal(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if output.TMP_MARK in self.name:
            cli._on_signal(signal.SIGINT, None)

    monkeypatch.setattr(Path, "mkdir", mkdir_then_signal)
    dst = tmp_path / "out"
    assert cli.run(["transform", str(src), str(dst)]) == 130
    assert not dst.exists() and leftovers(tmp_path) == [] and output._STAGED == set()
    assert "SIGINT: interrupted, no output written" in capsys.readouterr().err


def test_a_signal_after_the_commit_says_the_output_is_complete(src, tmp_path, monkeypatch, capsys):
    """A signal held back while the output is renamed into place fires right after: the
    output is whole, and the message says so instead of "no output written"."""
    from wisca_cli import cli, output

    real_commit = output.StagedOutput.commit

    def commit_then_signal(self):
        real_commit(self)
        cli._on_signal(signal.SIGTERM, None)

    monkeypatch.setattr(output.StagedOutput, "commit", commit_then_signal)
    dst = tmp_path / "out"
    assert cli.run(["transform", str(src), str(dst)]) == 143
    err = capsys.readouterr().err
    assert "no output written" not in err and f"{dst} is in place" in " ".join(err.split())
    assert leftovers(tmp_path) == [] and output._STAGED == set()
    monkeypatch.undo()
    assert cli.run(["verify", str(src), str(dst)]) == 0
    # a later run in the same process that is interrupted before its commit writes nothing
    monkeypatch.setattr(output.StagedOutput, "__enter__", lambda self: cli._on_signal(signal.SIGTERM, None))
    capsys.readouterr()
    assert cli.run(["transform", str(src), str(tmp_path / "out2")]) == 143
    assert "SIGTERM: interrupted, no output written" in capsys.readouterr().err


def test_two_runs_writing_the_same_dst(tmp_path):
    src = synthetic_llama(tmp_path / "big", hidden=256, layers=4, inter=512, vocab=512)
    dst = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "wisca_cli", "transform", str(src), str(dst)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    loser = next(e for c, e in results if c == 2)
    assert ("already exists" in loser or "appeared while wisca was running" in loser) and "Traceback" not in loser
    assert leftovers(tmp_path) == []
    assert run_cli("verify", src, dst).returncode == 0


def test_probe_ids_file_errors(src, tmp_path):
    bad = tmp_path / "ids.txt"
    bad.write_text("1 2 3\n4 5 999\n")
    transform_fails(src, tmp_path / "out", "probe ids must lie in [0, 128)", extra=("--probe-ids", str(bad)))


def test_bad_option_values(src, tmp_path):
    for extra, needle in ((("--targets", "qk,xy"), "unknown target 'xy'"), (("--strength", "2"), "--strength"),
                          (("--granularity", "row"), "--granularity"), (("--scales", "pow3"), "--scales")):
        transform_fails(src, tmp_path / "out", needle, extra=extra)


def test_disk_full_mid_write(tmp_path):
    """A 3 MiB filesystem for the output: ENOSPC half-way, nothing left behind."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    src = synthetic_llama(tmp_path / "big", hidden=256, layers=4, inter=512, vocab=512)   # ~4.6 MB
    before = tree_hash(src)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small)], check=True)
    try:
        dst = small / "out"
        res = run_cli("transform", src, dst)
        assert_clean_failure(res, src, before, dst, "writing the output failed", "No space left on device")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
