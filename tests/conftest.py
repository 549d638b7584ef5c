"""Fixtures: tiny checkpoints built with transformers' own classes.

Each model gets random, function-preserving rescalings of its Q/K, V/O and FFN pairs
(``unbalance``) so its weight pattern is far from balanced, like a checkpoint deep into
training, while it still computes exactly what the freshly initialised model computed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_checkpoints" / "tiny-gqa-llama"

FAMILIES = {
    # name: (model_type, extra config)
    "llama-gqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-mqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=1)),
    "llama-mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4)),
    "mistral": ("mistral", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=8)),
    "qwen2": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2)),
}


def make_config(model_type: str, **extra):
    from transformers import AutoConfig

    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=128,
                max_position_embeddings=128, tie_word_embeddings=False, head_dim=16)
    base.update(extra)
    return AutoConfig.for_model(model_type, **base)


@torch.no_grad()
def unbalance(model, seed: int = 0, spread: float = 3.0) -> None:
    """Rescale every Q/K, V/O and up/down pair by random factors: same function, skewed pattern."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    group = heads // kv
    rand = lambda *shape: torch.exp2(torch.randn(*shape, generator=g) * spread)  # noqa: E731
    for layer in model.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        s = rand(kv, d // 2).repeat(1, 2)                       # rotate_half pairs share a scale
        att.q_proj.weight.mul_(s.repeat_interleave(group, 0).reshape(-1, 1))
        att.k_proj.weight.div_(s.reshape(-1, 1))
        if att.q_proj.bias is not None:
            att.q_proj.bias.mul_(s.repeat_interleave(group, 0).reshape(-1))
            att.k_proj.bias.div_(s.reshape(-1))
        t = rand(kv, d)
        att.v_proj.weight.mul_(t.reshape(-1, 1))
        if att.v_proj.bias is not None:
            att.v_proj.bias.mul_(t.reshape(-1))
        att.o_proj.weight.div_(t.repeat_interleave(group, 0).reshape(1, -1))
        u = rand(mlp.up_proj.weight.shape[0])
        mlp.up_proj.weight.mul_(u.reshape(-1, 1))
        mlp.down_proj.weight.div_(u.reshape(1, -1))


def build_checkpoint(path: Path, family: str, dtype=torch.float32, shard_size=None, seed=0) -> Path:
    from transformers import AutoModelForCausalLM

    model_type, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(model_type, **extra), attn_implementation="eager")
    with torch.no_grad():   # biases start at zero: give them values so their scaling is tested
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
    unbalance(model, seed)
    model = model.to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def probe_tokens(vocab: int = 128, batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(path: Path, ids: torch.Tensor, dtype=None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                 **({"dtype": dtype} if dtype else {}))
    model.eval()
    return model(ids).logits


def tree_hash(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m wisca_cli ARGS` the way a user or CI would."""
    return subprocess.run([sys.executable, "-m", "wisca_cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    """family-dtype -> built checkpoint folder (built once per session)."""
    cache: dict[tuple, Path] = {}

    def get(family: str, dtype=torch.float32, shard_size=None) -> Path:
        key = (family, dtype, shard_size)
        if key not in cache:
            name = f"{family}-{str(dtype).split('.')[-1]}" + ("-sharded" if shard_size else "")
            cache[key] = build_checkpoint(tmp_path_factory.mktemp("ckpt") / name, family, dtype, shard_size)
        return cache[key]

    return get


def synthetic_llama(path: Path, hidden=64, layers=2, heads=4, kv_heads=2, inter=96, vocab=128,
                    dtype=torch.float32, seed=0, std=0.05, shards: int = 1) -> Path:
    """A llama checkpoint written directly with safetensors (no transformers), any size.
    ``shards > 1`` cuts the tensors, in model order, into shards of about equal size, so
    layers straddle shard files."""
    from safetensors.torch import save_file
    import json as _json

    g = torch.Generator().manual_seed(seed)
    d = hidden // heads
    rnd = lambda *s: (torch.randn(*s, generator=g) * std).to(dtype)  # noqa: E731
    t = {"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=dtype),
         "lm_head.weight": rnd(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
                  p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype),
                  p + "self_attn.q_proj.weight": rnd(heads * d, hidden),
                  p + "self_attn.k_proj.weight": rnd(kv_heads * d, hidden),
                  p + "self_attn.v_proj.weight": rnd(kv_heads * d, hidden),
                  p + "self_attn.o_proj.weight": rnd(hidden, heads * d),
                  p + "mlp.gate_proj.weight": rnd(inter, hidden), p + "mlp.up_proj.weight": rnd(inter, hidden),
                  p + "mlp.down_proj.weight": rnd(hidden, inter)})
    path.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file(t, path / "model.safetensors", metadata={"format": "pt"})
    else:
        total, done, weight_map, groups = sum(v.nbytes for v in t.values()), 0, {}, [{} for _ in range(shards)]
        for name, v in t.items():
            groups[min(shards - 1, (done + v.nbytes // 2) * shards // total)][name] = v
            done += v.nbytes
        groups = [g for g in groups if g]
        for k, g in enumerate(groups):
            fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file(g, path / fname, metadata={"format": "pt"})
            weight_map.update({name: fname for name in g})
        (path / "model.safetensors.index.json").write_text(_json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "config.json").write_text(_json.dumps({
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "max_position_embeddings": 256}))
    return path


# -- every decoder family (tests/test_architectures.py) ------------------------------------------
_SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=128,
              max_position_embeddings=128, tie_word_embeddings=False, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ARCH_FAMILIES = {
    # name: (model_type, config overrides); one tiny model per family
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", {}),
    "qwen3-tied": ("qwen3", dict(tie_word_embeddings=True)),
    "phi3": ("phi3", {}),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32)),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=48, mlp_only_layers=[1])),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    norm_topk_prob=True)),
    "gemma2": ("gemma2", dict(sliding_window=8, query_pre_attn_scalar=16)),
    "gemma3": ("gemma3_text", dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                                   query_pre_attn_scalar=16)),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", dict(embedding_multiplier=12.0, attention_multiplier=0.125,
                                residual_multiplier=0.25, logits_scaling=4.0)),
    "smollm3": ("smollm3", dict(no_rope_layers=[1, 0])),
    "gpt_neox": ("gpt_neox", dict(head_dim=None, num_key_value_heads=None, rotary_pct=0.5)),
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, n_inner=None, head_dim=None,
                          num_key_value_heads=None, tie_word_embeddings=True)),
}


def _arch_config(model_type: str, extra: dict):
    from transformers import AutoConfig

    cfg = {**_SMALL, **extra}
    if model_type == "gpt2":
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            cfg.pop(k)
    return AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if v is not None or k == "n_inner"})


def build_arch_checkpoint(path: Path, family: str, seed: int = 0, spread: float = 3.0) -> Path:
    """A tiny checkpoint of one family, built and saved by transformers, then given skewed
    weights: random power-of-two rescalings of every symmetry the family's spec lists (qk,
    vo, ffn, norm). Logits before and after are compared in transformers (equal, or within
    1e-5 where the spec says the target rounds), so the symmetries are checked independently
    of wisca's own verifier."""
    import json as _json

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from wisca_cli.balance import apply_scales
    from wisca_cli.pairs import layer_pairs
    from wisca_cli.spec import layout_from_config

    model_type, extra = ARCH_FAMILIES[family]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_arch_config(model_type, extra), attn_implementation="eager")
    with torch.no_grad():   # biases, norms (and a zero-initialised router) get values of their own
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif not p.any():
                p.normal_(0.0, 0.02)
    model.save_pretrained(path, safe_serialization=True)
    ids = probe_tokens()
    before = hf_logits(path, ids)
    layout = layout_from_config(_json.loads((path / "config.json").read_text()))
    tensors = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for layer in range(layout.layers):
        names = layout.layer_roles(layer)
        w = {role: tensors[n] for role, n in names.items()}
        for pair in layer_pairs(layout, layer, layout.spec.targets, "channel"):
            s = torch.exp2(torch.round(torch.randn(pair.n_units, generator=g) * spread)).double()
            w.update(apply_scales(pair, w, s))
        tensors.update({names[r]: t.contiguous() for r, t in w.items()})
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    after = hf_logits(path, ids)
    if layout.spec.inexact_targets:
        assert (after - before).abs().max() <= 1e-5 * before.abs().max(), family
    else:
        assert torch.equal(before, after), f"{family}: unbalancing changed the function"
    return path


@pytest.fixture(scope="session")
def arch_ckpt(tmp_path_factory):
    """family -> tiny skewed checkpoint of that family (built once per session)."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_arch_checkpoint(tmp_path_factory.mktemp("arch") / family, family)
        return cache[family]

    return get
