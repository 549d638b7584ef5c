"""The bundled sample checkpoint (the README's first command) and hub repo ids via a local cache."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from conftest import REPO, SAMPLE, hf_logits, run_cli, tree_hash


def test_sample_is_small_trained_and_loads():
    size = sum(p.stat().st_size for p in SAMPLE.iterdir())
    assert size < 5 * 2 ** 20
    cfg = json.loads((SAMPLE / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    # trained, not random: next-byte loss on stdlib text far below ln(256) = 5.55
    text = (Path(json.__file__)).read_bytes()[:2048]
    ids = torch.tensor(list(text), dtype=torch.long).view(4, 512)[:, :128]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SAMPLE, dtype=torch.float32)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 3.0


def test_readme_first_command_transforms_the_sample(tmp_path):
    readme = (REPO / "README.md").read_text()
    assert "wisca transform sample_checkpoints/tiny-gqa-llama out/tiny-wisca --overwrite" in readme
    before = tree_hash(SAMPLE)
    dst = tmp_path / "tiny-wisca"
    for _ in range(2):   # --overwrite makes the command repeatable
        res = run_cli("transform", SAMPLE, dst, "--overwrite")
        assert res.returncode == 0, res.stderr
        assert "verified (exact)" in res.stdout and "bit-identical" in res.stdout
    ids = torch.tensor([list(b"def main(argv):\n    return 0\n" * 2)], dtype=torch.long)
    assert torch.equal(hf_logits(SAMPLE, ids), hf_logits(dst, ids))
    assert tree_hash(SAMPLE) == before
    assert run_cli("verify", SAMPLE, dst).returncode == 0


def make_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "a" * 40) -> Path:
    """A huggingface_hub cache entry laid out as the hub client writes it: blobs + symlinks."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in folder.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(Path("../../blobs") / digest)
    return snap


def test_hub_repo_id_from_the_local_cache_offline(tmp_path):
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    make_hub_cache(cache, "wisca-test/tiny-gqa-llama", SAMPLE, commit)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    dst = tmp_path / "out"
    res = run_cli("transform", "wisca-test/tiny-gqa-llama", dst, "--json", env=env)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["source"] == "hub:wisca-test/tiny-gqa-llama"
    assert not any(p.is_symlink() for p in dst.iterdir())
    assert (dst / "config.json").read_bytes() == (SAMPLE / "config.json").read_bytes()
    # --revision resolves through the same cache; an unknown repo fails cleanly offline
    res = run_cli("inspect", "wisca-test/tiny-gqa-llama", "--revision", commit, "--json", env=env)
    assert res.returncode == 0, res.stderr
    res = run_cli("transform", "wisca-test/not-cached", tmp_path / "out2", env=env)
    assert res.returncode == 2 and "not in the local hub cache" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "out2").exists()


def test_the_api_names_stay_functions_after_use(tmp_path):
    """``wisca.verify`` is the function whatever was imported first (its module is ``verifier``)."""
    import wisca_cli as wisca
    from wisca_cli import api  # noqa: F401 - imports every module the API uses

    assert callable(wisca.verify) and callable(wisca.transform) and callable(wisca.inspect)
    assert wisca.verify is api.verify
