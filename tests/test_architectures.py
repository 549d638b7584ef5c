"""Every decoder family: a tiny checkpoint built by transformers' own class per family.

Per family (one 2-layer, hidden-64, fp32 model, built once per session):
- ``wisca transform`` with default options; transformers' logits of the output are
  bit-identical to the source's, or (targets the spec lists as inexact) KL <= 1e-6 and
  top-1 agreement 1.0;
- the imbalance of every pair kind the family has drops (``inspect``);
- the streamed reference forward matches transformers within 1e-5 of the max logit;
- the opt-in ``norm`` target, alternating with qk/vo/ffn, is function-preserving too;
- a checkpoint that does not match its spec fails naming the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

import wisca_cli as wisca
from conftest import ARCH_FAMILIES, FUSED_ON_DISK, REPO, hf_logits, probe_tokens, reference_logits, run_cli
from wisca_cli import api, spec
from wisca_cli.spec import CONV_PARTS
from wisca_cli.checkpoint import open_checkpoint
from wisca_cli.pairs import DEFAULT_TARGETS

FAMILIES = list(ARCH_FAMILIES)
NORM_FAMILIES = [f for f in FAMILIES if "norm" in spec.spec_for(ARCH_FAMILIES[f][0]).targets]


def _inexact(family: str) -> set[str]:
    return set(spec.spec_for(ARCH_FAMILIES[family][0]).inexact_targets)


def _assert_same_function(src, dst, exact: bool) -> None:
    ids = probe_tokens()
    a, b = hf_logits(src, ids), hf_logits(dst, ids)
    if exact:
        assert torch.equal(a, b)
    else:   # stated tolerance for inexact targets, fp32
        la, lb = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
        assert (la.exp() * (la - lb)).sum(-1).mean() <= 1e-6
        assert (a.argmax(-1) == b.argmax(-1)).all()


def _logits_applied_anyway(src, names: dict, pair, low: int, high: int, bad):
    """transformers' logits (on ``probe_tokens``) of a copy of ``src`` at ``bad`` in which ``pair``
    (on physical roles; ``names``: role -> tensor name) is applied anyway, at scales 2**k, k drawn
    from [low, high) (seed 0): a symmetry the spec leaves out must move them."""
    from safetensors.torch import save_file

    from wisca_cli.balance import apply_scales

    tensors = load_file(src / "model.safetensors")
    s = torch.exp2(torch.randint(low, high, (pair.n_units,), generator=torch.Generator().manual_seed(0))).double()
    scaled = apply_scales(pair, {m.role: tensors[names[m.role]] for m in pair.members}, s)
    shutil.copytree(src, bad)
    save_file({**tensors, **{names[r]: t.contiguous() for r, t in scaled.items()}}, bad / "model.safetensors",
              metadata={"format": "pt"})
    return hf_logits(bad, probe_tokens())


@pytest.fixture(scope="module")
def transformed(arch_ckpt, tmp_path_factory):
    """family -> (source, default transform output, its report), once per session."""
    cache = {}

    def get(family):
        if family not in cache:
            src = arch_ckpt(family)
            dst = tmp_path_factory.mktemp("out") / family
            cache[family] = (src, dst, wisca.transform(src, dst))
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_default_transform_keeps_the_function_in_transformers(family, transformed):
    src, dst, report = transformed(family)
    lay = open_checkpoint(src).layout
    exact = not (_inexact(family) & set(DEFAULT_TARGETS))
    v = report["verification"]
    assert v["passed"] and v["mode"] == ("exact" if exact else "tolerance")
    assert report["targets_applied"] == [t for t in DEFAULT_TARGETS if t in lay.spec.targets]
    assert report["targets_not_applicable"] == [t for t in DEFAULT_TARGETS if t not in lay.spec.targets]
    for t in DEFAULT_TARGETS:
        want = "not applicable" if t not in lay.spec.targets else "tolerance" if t in _inexact(family) else "exact"
        assert report["exactness"][t] == want
    _assert_same_function(src, dst, exact)


@pytest.mark.parametrize("family", FAMILIES)
def test_imbalance_drops_for_every_pair_kind(family, transformed, tmp_path):
    src, dst, report = transformed(family)
    targets = DEFAULT_TARGETS
    if not report["targets_applied"]:   # none of the defaults holds (DeepSeek-V4): its only target, norm
        assert spec.spec_for(ARCH_FAMILIES[family][0]).targets == ("norm",)
        targets, dst = ("norm",), tmp_path / "norm"
        report = wisca.transform(src, dst, targets=targets)
    before, after = wisca.inspect(src, targets=targets)["summary"], wisca.inspect(dst, targets=targets)["summary"]
    kinds = set(report["targets_applied"])
    assert set(before) == kinds and kinds
    for kind in kinds:
        assert after[kind]["mean_abs_log2"] < before[kind]["mean_abs_log2"], kind
        assert report["summary"][kind]["imbalance_after"] < report["summary"][kind]["imbalance_before"]


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_reference_forward_matches_transformers(family, arch_ckpt):
    src = arch_ckpt(family)
    ids = probe_tokens()
    ref = hf_logits(src, ids)
    ours = reference_logits(src, ids)
    assert ours.shape == ref.shape
    # stated fp32 tolerance of the reference forward: 1e-5 relative to the largest logit
    assert (ours - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("family", NORM_FAMILIES)
def test_norm_target_alternating_with_the_others(family, arch_ckpt, tmp_path, monkeypatch):
    src = arch_ckpt(family)
    targets = ("qk", "vo", "ffn", "norm")
    report = wisca.transform(src, tmp_path / "out", targets=targets)
    assert report["verification"]["passed"]
    assert report["summary"]["norm"]["imbalance_after"] < report["summary"]["norm"]["imbalance_before"]
    _assert_same_function(src, tmp_path / "out", not (_inexact(family) & set(targets)))
    if not _inexact(family):   # cumulative scales recorded: undo is bit-exact
        wisca.undo(tmp_path / "out", tmp_path / "back")
        a = (src / "model.safetensors").read_bytes()
        assert (tmp_path / "back" / "model.safetensors").read_bytes() == a


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gpt_neox", "cohere", "phi", "starcoder2"])
def test_final_norm_against_untied_lm_head(family, arch_ckpt, tmp_path):
    """The norm target also pairs the final norm (and its LayerNorm bias) with lm_head's
    input columns when the embeddings are untied: imbalance drops, same function, the
    multipliers name both tensors (optimizer moments follow), undo is bit-exact."""
    src, out = arch_ckpt(family), tmp_path / "out"
    lay = open_checkpoint(src).layout
    assert not lay.tie_embeddings
    report = wisca.transform(src, out, targets=("norm",))
    final = report["layers"][-1]
    assert final["layer"] == "final" and final["norm"]["units"] == lay.hidden
    assert final["norm"]["imbalance_after"] < final["norm"]["imbalance_before"]
    assert not any("final norm" in w["message"] for w in report["warnings"])
    _assert_same_function(src, out, "norm" not in _inexact(family))
    before, after = wisca.inspect(src, targets=("norm",)), wisca.inspect(out, targets=("norm",))
    assert before["layers"][-1]["layer"] == after["layers"][-1]["layer"] == "final"
    assert after["layers"][-1]["norm"]["mean_abs_log2"] < before["layers"][-1]["norm"]["mean_abs_log2"]
    assert after["before"]["layers"][-1]["norm"]["mean_abs_log2"] == \
        pytest.approx(before["layers"][-1]["norm"]["mean_abs_log2"], rel=1e-6)
    mults = api.scale_multipliers(out)
    head, norm = mults[lay.spec.lm_head], mults[lay.spec.final_norm]
    assert head.shape == (1, lay.hidden) and torch.equal(head.reshape(-1), 1 / norm.reshape(-1))
    assert (head != 1).any()
    if lay.spec.final.norm_bias:
        assert torch.equal(mults[lay.spec.final.norm_bias], norm)
    if "norm" not in _inexact(family):
        wisca.undo(out, tmp_path / "back")
        assert (tmp_path / "back" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


@pytest.mark.parametrize("family", ["llama-tied", "gpt2", "cohere-qknorm", "phi-qknorm"])
def test_final_norm_is_not_applicable_with_tied_embeddings(family, arch_ckpt, tmp_path):
    src = arch_ckpt(family)
    assert open_checkpoint(src).layout.tie_embeddings
    report = wisca.transform(src, tmp_path / "out", targets=("norm",))
    assert report["targets_applied"] == ["norm"]              # the decoder layers' input norms
    assert all(e["layer"] != "final" for e in report["layers"])
    assert [w["option"] for w in report["warnings"] if "final norm -> lm_head" in w["message"]] == ["targets"]
    assert "tied" in report["warnings"][-1]["message"]
    assert all(e["layer"] != "final" for e in wisca.inspect(tmp_path / "out", targets=("norm",))["layers"])
    _assert_same_function(src, tmp_path / "out", True)


def test_norm_target_is_not_applicable_without_input_norms(arch_ckpt, tmp_path, monkeypatch):
    report = wisca.transform(arch_ckpt("olmo2"), tmp_path / "out", targets=("norm",))
    assert report["targets_not_applicable"] == ["norm"] and report["exactness"] == {"norm": "not applicable"}


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_not_matching_the_spec_is_named(family, arch_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    src = arch_ckpt(family)
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    lay = open_checkpoint(src).layout
    victim = sorted(lay.layer_roles(1).values())[0]
    tensors = load_file(bad / "model.safetensors")
    tensors[victim] = torch.cat([tensors[victim], tensors[victim][:1]])
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(wisca.WiscaError, match=re.escape(victim)):
        wisca.transform(bad, tmp_path / "out")


def test_cli_transform_gpt2(arch_ckpt, tmp_path):
    res = run_cli("transform", arch_ckpt("gpt2"), tmp_path / "out", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["targets_not_applicable"] == ["ffn"] and report["exactness"]["ffn"] == "not applicable"
    assert report["verification"]["identical"]


def test_readme_support_matrix_matches_the_specs():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Supported architectures", 1)[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    assert table == spec.support_matrix_markdown()


def test_every_moe_family_reads_experts_fused_on_disk():
    """Every MoE spec declares its 3-D fused expert tensors, and a fixture stored that way
    (``model.state_dict()``, or gpt-oss's own layout) runs every test of this file."""
    specs = spec.shipped_specs().values()
    moe = {s.name for s in specs if s.moe is not None}
    declared = {s.name for s in specs if s.moe is not None and s.moe.fused_experts}
    only_fused = {s.name for s in specs if s.moe is not None and not s.moe.expert_tensors}   # gpt-oss, Llama 4
    stored_fused = {spec.spec_for(ARCH_FAMILIES[f][0]).name for f in FUSED_ON_DISK}
    # every tensor renamed in memory (Nemotron-H's backbone. -> model.): a state dict in safetensors is not
    # its checkpoint; its fused experts are read from DCP checkpoints and live models (test_dcp_families, test_live)
    renamed = {"nemotron_h", "deepseek_v4"}   # DeepSeek-V4: attn.wq_a -> self_attn.q_a_proj, ...
    assert only_fused and moe == declared == stored_fused | only_fused | renamed


def test_every_shipped_spec_has_a_fixture():
    assert {spec.spec_for(mt).name for mt, _ in ARCH_FAMILIES.values()} | {"llama", "mistral", "qwen2"} == \
        {s.name for s in spec.all_specs().values()}


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_norm_target_on_the_base_families(family, ckpt_dir, tmp_path, monkeypatch):
    src = ckpt_dir(family, torch.float32)
    report = wisca.transform(src, tmp_path / "out", targets=("qk", "vo", "ffn", "norm"))
    assert report["verification"]["identical"]
    _assert_same_function(src, tmp_path / "out", True)


def test_multi_token_prediction_layers_are_copied_unchanged(arch_ckpt, tmp_path):
    """DeepSeek-V3 / GLM-4.5 checkpoints carry their MTP module as layer num_hidden_layers
    (``num_nextn_predict_layers`` of them), which transformers does not load: copied byte for
    byte (the default targets leave the residual stream, the embedding and the head as they
    were); a layer beyond them is still refused by name."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(arch_ckpt("deepseek_v3"), src)
    config = json.loads((src / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["num_hidden_layers"] == 2
    tensors = load_file(src / "model.safetensors")
    mtp = {"model.layers.2.eh_proj.weight": torch.randn(64, 128), "model.layers.2.enorm.weight": torch.randn(64)}
    save_file({**tensors, **mtp}, src / "model.safetensors", metadata={"format": "pt"})
    report = wisca.transform(src, tmp_path / "out")
    assert report["verification"]["identical"]
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(out[n], t) for n, t in mtp.items())
    config["num_nextn_predict_layers"] = 0
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(wisca.WiscaError, match=r"tensor model\.layers\.2\.\w+\.weight is beyond num_hidden_layers=2 "
                                               r"\+ num_nextn_predict_layers=0"):
        wisca.transform(src, tmp_path / "out2")


def test_llama4_qk_holds_on_nope_layers_only_with_qk_norm(arch_ckpt, transformed, tmp_path):
    """Llama 4 with use_qk_norm L2-normalises q and k after RoPE on the RoPE layers, which would
    absorb a qk rescaling: the spec keeps qk to the NoPE layers (target_layers) and the report
    names the layer it leaves out. Rescaling that RoPE layer's q/k rows per rotary pair anyway
    changes transformers' logits: the restriction is needed. Without QK-norm, qk holds there."""
    from wisca_cli.pairs import layer_pairs, physical_roles, qk_pair, to_physical

    src = arch_ckpt("llama4")
    lay = open_checkpoint(src).layout
    assert [lay.rotary_dims_at(i) > 0 for i in range(2)] == [True, False]
    assert [[p.kind for p in layer_pairs(lay, i, ("qk",), "channel")] for i in range(2)] == [[], ["qk"]]
    warnings = [w["message"] for w in transformed("llama4")[2]["warnings"]]
    assert any(m.startswith("qk is not applicable on layers 0: use_qk_norm L2-normalises") for m in warnings)
    assert not transformed("llama4-noqknorm")[2]["warnings"]
    plain = open_checkpoint(arch_ckpt("llama4-noqknorm")).layout
    assert all(layer_pairs(plain, i, ("qk",), "channel") for i in range(2))

    names = lay.layer_roles(0)
    pair = to_physical(lay, qk_pair(lay, physical_roles(lay, set(names)), 0))
    ids = probe_tokens()
    assert (_logits_applied_anyway(src, names, pair, -3, 4, tmp_path / "bad") - hf_logits(src, ids)).abs().max() > 1e-3


def test_kimi_k2_config_reads_as_deepseek_v3(arch_ckpt, tmp_path):
    """Kimi K2 ships DeepSeek-V3's tensors with its own config.json: model_type ``kimi_k2``
    (custom code, architectures DeepseekV3ForCausalLM) and the older rope keys, ``rope_theta``
    beside ``rope_scaling`` {"type": "yarn", ...}. The same weights under that config: the
    streamed forward computes transformers' DeepSeek-V3 logits, and the transform writes the
    same tensors as for the DeepSeek-V3 config."""
    src = arch_ckpt("deepseek_v3-plain")                 # YaRN with mscale_all_dim, no q latent
    kimi = tmp_path / "kimi"
    shutil.copytree(src, kimi)
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(model_type="kimi_k2", rope_theta=rope.pop("rope_theta"),
               rope_scaling={"type": rope.pop("rope_type"), **rope})
    (kimi / "config.json").write_text(json.dumps(cfg))
    ids = probe_tokens()
    torch.testing.assert_close(reference_logits(kimi, ids), hf_logits(src, ids, torch.float32), atol=1e-5, rtol=1e-5)
    assert not torch.equal(reference_logits(kimi, ids), reference_logits(_without_yarn(kimi, tmp_path), ids))
    wisca.transform(src, tmp_path / "a")
    report = wisca.transform(kimi, tmp_path / "b")
    assert report["architecture"] == "deepseek_v3" and report["model_type"] == "kimi_k2"
    assert report["verification"]["identical"]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _without_yarn(path, tmp_path):
    """The same checkpoint with plain RoPE: YaRN must change the logits for the test to mean anything."""
    plain = tmp_path / "plain"
    shutil.copytree(path, plain)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_scaling")
    (plain / "config.json").write_text(json.dumps(cfg))
    return plain


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5", "qwen3_5_moe", "olmo_hybrid"])
def test_linear_attention_layers_keep_norm_and_ffn_only(family, arch_ckpt, transformed, tmp_path):
    """A Gated DeltaNet layer (layer 0 of these fixtures): the spec leaves qk and vo out there and
    the report says so; the norm target pairs the input norm with every input projection and the
    gated RMSNorm (one weight of size dv shared by the value heads) with out_proj's columns of
    every head. Rescaling q against k, or v against out_proj, on that layer anyway changes
    transformers' logits: the restriction is needed. (qk and vo hold on layer 1, full attention.)"""
    from wisca_cli.pairs import Member, Pair, layer_pairs, to_physical

    src = arch_ckpt(family)
    lay = open_checkpoint(src).layout
    assert [lay.is_linear_layer(i) for i in range(2)] == [True, False]
    everything = ("qk", "vo", "ffn", "norm")
    assert sorted(p.kind for p in layer_pairs(lay, 0, everything, "channel")) == ["ffn", "norm"]
    post_norm = family == "olmo_hybrid"   # its attention layers are post-norm: no norm target there
    assert sorted(p.kind for p in layer_pairs(lay, 1, everything, "channel")) == \
        ["ffn", "qk", "vo"] if post_norm else ["ffn", "norm", "qk", "vo"]
    norm = next(p for p in layer_pairs(lay, 0, ("norm",), "channel"))
    lin = lay.linear
    out = next(m for m in norm.members if m.role == "lin_out")
    gated = next(m for m in norm.members if m.role == "lin_norm")
    assert len(gated.units) == lin.value_dim and gated.offset == 0.0   # no (1 + w) on the gated norm
    assert torch.equal(out.units, gated.units[torch.arange(lin.value_heads * lin.value_dim) % lin.value_dim])
    warnings = [w["message"] for w in transformed(family)[2]["warnings"]]
    assert any(m.startswith("qk is not applicable on layers 0: a Gated DeltaNet layer") for m in warnings)
    assert any(m.startswith("vo is not applicable on layers 0: a Gated DeltaNet layer") for m in warnings)

    names = lay.layer_roles(0)
    keys, values = lin.key_heads * lin.key_dim, lin.value_heads * lin.value_dim
    tried = {
        "qk": Pair("qk", keys, torch.zeros(keys, dtype=torch.long),
                   (Member("lin_q", 0, torch.arange(keys), +1), Member("lin_k", 0, torch.arange(keys), -1))),
        "vo": Pair("vo", values, torch.zeros(values, dtype=torch.long),
                   (Member("lin_v", 0, torch.arange(values), +1), Member("lin_out", 1, torch.arange(values), -1))),
    }
    ids = probe_tokens()
    ref = hf_logits(src, ids)
    for kind, pair in tried.items():
        moved = _logits_applied_anyway(src, names, to_physical(lay, pair), -3, 4, tmp_path / kind)
        assert (moved - ref).abs().max() > 1e-3, kind


def test_olmo_hybrid_norm_target_holds_on_its_linear_attention_layers_only(arch_ckpt, tmp_path):
    """OLMo-hybrid: pre-norm Gated DeltaNet layers (attention_layer_norm, feedforward_layer_norm as
    saved) between post-norm OLMo 2 attention layers (feedforward_layer_norm there is the norm after
    the attention). The norm target pairs the pre-norms with their readers and the report says it
    does not apply on the attention layers; pairing the post-attention norm with the MLP's input
    columns there anyway changes transformers' logits (the residual keeps the unscaled branch), so
    the restriction is needed. The conv, saved as three tensors, is read as one and left as saved here
    (the conv target, not requested, is tested below)."""
    from wisca_cli.pairs import Member, Pair, layer_pairs, to_physical

    src = arch_ckpt("olmo_hybrid")
    lay = open_checkpoint(src).layout
    assert lay.conv_split
    linear_roles, attention_roles = lay.layer_roles(0), lay.layer_roles(1)
    assert linear_roles["attn_norm"].endswith("attention_layer_norm.weight")
    assert linear_roles["mlp_norm"].endswith("feedforward_layer_norm.weight")
    assert attention_roles["post_attn_norm"].endswith("feedforward_layer_norm.weight")
    assert "attn_norm" not in attention_roles and "post_attn_norm" not in linear_roles
    norm = next(p for p in layer_pairs(lay, 0, ("norm",), "channel"))
    assert {m.role for m in norm.members} == {"attn_norm", "mlp_norm", "lin_norm", "lin_q", "lin_k", "lin_v",
                                              "lin_z", "lin_b", "lin_a", "gate", "up", "lin_out"}
    out = tmp_path / "out"
    report = wisca.transform(src, out, targets=("qk", "vo", "ffn", "norm"))
    assert report["verification"]["identical"] and report["summary"]["norm"]["units_changed"] > 0
    assert torch.equal(hf_logits(out, probe_tokens()), hf_logits(src, probe_tokens()))
    assert any(w["message"].startswith("norm is not applicable on layers 1: a post-norm attention layer")
               for w in report["warnings"])
    tensors, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    for part in ("q_conv1d", "k_conv1d", "v_conv1d"):
        name = f"model.layers.0.linear_attn.{part}.weight"
        assert torch.equal(tensors[name], after[name])

    h = lay.hidden
    tried = Pair("norm", h, torch.zeros(h, dtype=torch.long),
                 (Member("post_attn_norm", 0, torch.arange(h), +1), Member("gate", 1, torch.arange(h), -1),
                  Member("up", 1, torch.arange(h), -1)))
    moved = _logits_applied_anyway(src, attention_roles, to_physical(lay, tried), -3, 4, tmp_path / "post-norm")
    assert (moved - hf_logits(src, probe_tokens())).abs().max() > 1e-3


# the Mamba2 families: the pair kinds on their fixture's layer 0 (Mamba2) and layer 1 (attention), the
# norm pair's roles on layer 0 (Granite 4: the MLP on the same layer; Nemotron-H: a mixer-only block)
MAMBA2 = {
    "granitemoehybrid": (["ffn", "norm"], ["ffn", "norm", "qk", "vo"],
                         {"attn_norm", "lin_in", "lin_norm", "lin_out", "mlp_norm", "shared.gate_up", "router"}),
    "nemotron_h": (["norm"], ["norm", "qk", "vo"], {"attn_norm", "lin_in", "lin_norm", "lin_out"}),
}


@pytest.mark.parametrize("family", sorted(MAMBA2))
def test_mamba2_layers_keep_norm_and_ffn_only(family, arch_ckpt, transformed, tmp_path):
    """A Mamba2 layer (layer 0 of the fixtures: Granite 4's, Nemotron-H's): the spec leaves qk and
    vo out there and the report says so; the norm target pairs the input norm with in_proj and the
    gated grouped RMSNorm with out_proj. The mixer's own analogues of qk and vo, B's rows of in_proj
    against C's (y reads C . B x) and x's rows against out_proj's columns, change transformers'
    logits when applied anyway (the conv and SiLU sit between): the restriction is needed."""
    from safetensors.torch import save_file

    from wisca_cli.balance import apply_scales
    from wisca_cli.pairs import Member, Pair, layer_pairs

    src = arch_ckpt(family)
    lay = open_checkpoint(src).layout
    assert [lay.is_linear_layer(i) for i in range(2)] == [True, False]
    everything = ("qk", "vo", "ffn", "norm")
    kinds0, kinds1, norm_roles = MAMBA2[family]
    assert sorted(p.kind for p in layer_pairs(lay, 0, everything, "channel")) == kinds0
    assert sorted(p.kind for p in layer_pairs(lay, 1, everything, "channel")) == kinds1
    norm = next(p for p in layer_pairs(lay, 0, ("norm",), "channel"))
    assert {m.role for m in norm.members} == norm_roles | {m.role for m in norm.members if m.role.startswith(
        ("experts.", "shared."))}
    warnings = [w["message"] for w in transformed(family)[2]["warnings"]]
    assert any(m.startswith("qk is not applicable on layers 0: a Mamba2") for m in warnings)
    assert any(m.startswith("vo is not applicable on layers 0: a Mamba2") for m in warnings)

    lin = lay.linear
    inner, bc = lin.value_heads * lin.value_dim, lin.key_heads * lin.key_dim
    rows = 2 * inner + 2 * bc + lin.value_heads
    tensors, names = load_file(src / "model.safetensors"), lay.layer_roles(0)
    assert names["lin_in"] in tensors

    def rows_of(start, n, size=rows):
        u = torch.full((size,), -1, dtype=torch.long)
        u[start:start + n] = torch.arange(n)
        return u

    tried = {
        "qk": Pair("qk", bc, torch.zeros(bc, dtype=torch.long),
                   (Member("lin_in", 0, rows_of(2 * inner, bc), +1), Member("lin_in", 0, rows_of(2 * inner + bc, bc), -1))),
        "vo": Pair("vo", inner, torch.zeros(inner, dtype=torch.long),
                   (Member("lin_in", 0, rows_of(inner, inner), +1), Member("lin_out", 1, torch.arange(inner), -1))),
    }
    ids = probe_tokens()
    ref = hf_logits(src, ids)
    for kind, pair in tried.items():   # SiLU is nearly linear near 0: scales far from 1 show it
        s = torch.exp2(torch.randint(-6, 7, (pair.n_units,), generator=torch.Generator().manual_seed(0))).double()
        scaled = {m.role: tensors[names[m.role]] for m in pair.members}
        for m in pair.members:   # one member at a time: lin_in is on both sides of qk
            one = Pair(kind, pair.n_units, pair.head_of, (m,))
            scaled.update(apply_scales(one, {m.role: scaled[m.role]}, s))
        bad = tmp_path / kind
        shutil.copytree(src, bad)
        save_file({**tensors, **{names[r]: t.contiguous() for r, t in scaled.items()}}, bad / "model.safetensors",
                  metadata={"format": "pt"})
        # far above fp32 rounding (a symmetry that holds gives 0): B against C moves the logits by
        # about 1e-3 of the largest here (SiLU is near-linear for small B, C), x against out_proj by ~1
        assert (hf_logits(bad, ids) - ref).abs().max() > 1e-4 * ref.abs().max(), kind


def test_relu2_mlp_takes_down_over_s_squared(arch_ckpt, transformed, tmp_path):
    """Nemotron-H's relu² MLP (layer 2 of the fixture; its MoE experts on layer 3 alike): relu²(s x)
    = s² relu²(x), so the ffn pair divides down's column by s² (``Member.side`` -2) and balances
    with s = (||down|| / ||up||) ** (1/3). The default transform keeps transformers' logits bit for
    bit (test_default_transform_keeps_the_function_in_transformers) and balances it; the degree-1
    rule (down / s) changes them: the degree is needed."""
    from wisca_cli.pairs import Member, Pair, layer_pairs

    src = arch_ckpt("nemotron_h")
    lay = open_checkpoint(src).layout
    assert lay.layer_type(2) == "mlp" and lay.is_moe_layer(3)
    for layer in (2, 3):
        ffn = next(p for p in layer_pairs(lay, layer, ("ffn",), "channel"))
        assert ffn.b_degree == 2 and {m.side for m in ffn.members if m.role.endswith("down")} == {-2}
    summary = transformed("nemotron_h")[2]["layers"][2]["ffn"]
    assert summary["units_changed"] > 0 and summary["imbalance_after"] < summary["imbalance_before"] / 2

    n = lay.intermediate
    wrong = Pair("ffn", n, torch.zeros(n, dtype=torch.long),
                 (Member("up", 0, torch.arange(n), +1), Member("down", 1, torch.arange(n), -1)))
    ref = hf_logits(src, probe_tokens())
    moved = _logits_applied_anyway(src, lay.layer_roles(2), wrong, -3, 4, tmp_path / "degree-1")
    assert (moved - ref).abs().max() > 1e-3 * ref.abs().max()


@pytest.mark.parametrize("family, edit", [
    # Nemotron-H as NVIDIA releases it: the layer kinds as hybrid_override_pattern letters
    ("nemotron_h", lambda c: {**{k: v for k, v in c.items() if k != "layers_block_type"},
                              "hybrid_override_pattern": "M*-E"}),
    # Granite 4.0-H as IBM releases it: the legacy layer type names, the head dim left to "auto"
    ("granitemoehybrid", lambda c: {**c, "layer_types": ["mamba", "attention"], "mamba_d_head": "auto"}),
    # Qwen3-Next / Qwen3.5 as released: full_attention_interval instead of a layer_types list
    ("qwen3_next", lambda c: {**{k: v for k, v in c.items() if k != "layer_types"}, "full_attention_interval": 2}),
    ("qwen3_5", lambda c: {**{k: v for k, v in c.items() if k != "layer_types"}, "full_attention_interval": 2}),
    # OLMo-hybrid without a list: every 4th layer full attention, the last one where none falls
    ("olmo_hybrid", lambda c: {k: v for k, v in c.items() if k != "layer_types"}),
])
def test_hybrid_configs_as_released(family, edit, arch_ckpt, tmp_path):
    """config.json as the hub's checkpoints write it, read as transformers reads it: transform exit 0,
    transformers' logits bit-identical (within the stated tolerance for Qwen's (1 + w) QK-norm), the
    layer kinds as transformers derives them (layer 0 linear attention, layer 1 full attention)."""
    src = tmp_path / "src"
    shutil.copytree(arch_ckpt(family), src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(edit(cfg)))
    out = tmp_path / "out"
    report = wisca.transform(src, out)
    assert report["verification"]["identical"] and report["summary"]["ffn"]["units_changed"] > 0
    assert any(w["message"].startswith("qk is not applicable on layers 0: a ") for w in report["warnings"])
    ids = probe_tokens()
    exact = not (_inexact(family) & set(report["targets_applied"]))
    a, b = hf_logits(src, ids), hf_logits(out, ids)
    assert torch.equal(a, b) if exact else torch.allclose(a, b, atol=1e-5 * a.abs().max().item())


@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5", "qwen3_5_moe", "granitemoehybrid", "nemotron_h",
                                    "olmo_hybrid"])
def test_conv_target_on_linear_attention_layers(family, arch_ckpt, tmp_path):
    """--targets conv: on a linear-attention layer the input projection's row of each conv channel
    times s and that channel's taps / s (the depthwise conv's output, SiLU's input, unchanged):
    transformers' logits bit-identical, the imbalance down, only those tensors changed, and the
    report says the other layers have no conv."""
    from safetensors.torch import load_file as load

    src, out = arch_ckpt(family), tmp_path / "out"
    report = wisca.transform(src, out, targets=("conv",))
    assert report["verification"]["identical"] and report["exactness"] == {"conv": "exact"}
    conv = report["summary"]["conv"]
    assert conv["units_changed"] > 0 and conv["imbalance_after"] < conv["imbalance_before"]
    lay = open_checkpoint(src).layout
    others = [i for i in range(lay.layers) if not lay.is_linear_layer(i)]
    assert any(w["message"].startswith(f"conv is not applicable on layers {', '.join(map(str, others))}: no causal conv")
               for w in report["warnings"])
    ids = probe_tokens()
    assert torch.equal(hf_logits(src, ids), hf_logits(out, ids))
    before, after = load(src / "model.safetensors"), load(out / "model.safetensors")
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    allowed = {name for i in range(lay.layers) if lay.is_linear_layer(i) for role, name in lay.layer_roles(i).items()
               if role in ("lin_q", "lin_k", "lin_v", "lin_qkvz", "lin_qkv", "lin_in", "lin_conv", *CONV_PARTS)}
    assert changed and changed <= allowed and any(n.endswith("conv1d.weight") for n in changed)


def test_conv_target_where_the_conv_is_saved_split(arch_ckpt, tmp_path):
    """OLMo-hybrid saves its conv as three tensors in transformers' own split of the channels (near-equal
    thirds, not q, k and v): the conv target follows each channel into its saved part (q_proj's rows
    against the first part's channels and into the second, ...): every part and projection row changed
    where its channel's scale is not 1, transformers' logits bit-identical (checked in the test above),
    undo gives every tensor back."""
    from wisca_cli.pairs import layer_pairs

    src = arch_ckpt("olmo_hybrid")
    lay = open_checkpoint(src).layout
    keys, values = lay.linear.key_heads * lay.linear.key_dim, lay.linear.value_heads * lay.linear.value_dim
    assert lay.conv_split and sum(lay.conv_split_sizes) == 2 * keys + values
    assert lay.conv_split_sizes != (keys, keys, values)   # the saved split is not q | k | v
    pair = layer_pairs(lay, 0, ("conv",), "channel")[0]
    parts = {m.role: m.units for m in pair.members if m.role in CONV_PARTS}
    assert torch.equal(torch.cat([parts[p] for p in CONV_PARTS]), torch.arange(2 * keys + values))
    report = wisca.transform(src, tmp_path / "out", targets=("conv",))
    assert report["exactness"] == {"conv": "exact"} and report["verification"]["identical"]
    wisca.undo(tmp_path / "out", tmp_path / "back")
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_gemma4_symmetries_per_layer_and_the_restrictions_needed(arch_ckpt, transformed, tmp_path):
    """Gemma 4 (the ``gemma4`` fixture: sliding / full layers, the last two reusing the keys and values
    of layers 2 and 3). qk lives on q_norm / k_norm (QK-norm per head, weight applied in float32) and
    holds on layers 0 and 1 only: a layer whose keys serve later layers' queries (2, 3) or that reuses
    another's (4, 5) is skipped, and the report says so; vo holds nowhere (v is RMS-normalised without a
    weight). Applied anyway, qk on layer 3 (k_norm / s meets layer 5's unscaled queries) and vo on
    layers 0 and 1 each change transformers' logits: the restrictions are needed. On the MoE model
    the norm target pairs pre_feedforward_layernorm with the dense MLP, pre_feedforward_layernorm_2
    with every expert's gate_up_proj and router.scale with router.proj; ffn covers both MLPs."""
    from wisca_cli.pairs import Member, Pair, layer_pairs, to_physical

    src = arch_ckpt("gemma4")
    lay = open_checkpoint(src).layout
    assert [lay.kv_mode(i) for i in range(6)] == [None, None, "store", "store", "reuse", "reuse"]
    assert [lay.kv_source(i) for i in (4, 5)] == [2, 3]
    assert [(lay.at(i).head_dim, lay.at(i).kv_heads, lay.at(i).intermediate) for i in (0, 1, 4, 5)] == \
        [(16, 2, 96), (32, 2, 96), (16, 2, 192), (32, 2, 192)]
    everything = ("qk", "vo", "ffn", "norm")
    assert [sorted(p.kind for p in layer_pairs(lay, i, everything, "channel")) for i in range(6)] == \
        [["ffn", "norm", "qk"]] * 2 + [["ffn", "norm"]] * 4
    qk = layer_pairs(lay, 1, ("qk",), "channel")[0]
    assert sorted(m.role for m in qk.members) == ["k_norm", "q_norm"] and qk.n_units == 16   # 32 dims, turned in pairs
    warnings = [w["message"] for w in transformed("gemma4")[2]["warnings"]]
    assert any(m.startswith("qk is not applicable on layers 2, 3, 4, 5: its keys are shared") for m in warnings)
    assert any(m.startswith("vo is not applicable to gemma4: v is RMS-normalised") for m in warnings)

    ref = hf_logits(src, probe_tokens())

    def tried(layer, pair, name):
        moved = _logits_applied_anyway(src, lay.layer_roles(layer), to_physical(lay.at(layer), pair), 1, 4,
                                       tmp_path / name)
        return (moved - ref).abs().max()

    unshared = dataclasses.replace(lay, config={**lay.config, "num_kv_shared_layers": 0})
    stored = layer_pairs(unshared, 3, ("qk",), "channel")[0]   # the pair qk would be without the sharing
    assert tried(3, stored, "qk-store") > 1e-3
    for layer in (0, 1):
        d, kv, heads = lay.at(layer).head_dim, lay.at(layer).kv_heads, lay.heads
        o_cols = (torch.arange(heads)[:, None] // (heads // kv) * d + torch.arange(d)[None, :]).reshape(-1)
        vo = Pair("vo", kv * d, torch.zeros(kv * d, dtype=torch.long),
                  (Member("v", 0, torch.arange(kv * d), +1), Member("o", 1, o_cols, -1)))
        assert tried(layer, vo, f"vo-{layer}") > 1e-3, layer

    moe = open_checkpoint(arch_ckpt("gemma4-moe")).layout
    assert moe.v_from_k(1) and not moe.v_from_k(0) and "v" not in moe.layer_roles(1)
    norm = layer_pairs(moe, 0, ("norm",), "channel")[0]
    readers = {m.role: m for m in norm.members}
    assert set(readers) == {"attn_norm", "q", "k", "v", "mlp_norm", "gate", "up", "expert_norm",
                            "experts.gate_up", "router_norm", "router"}
    assert readers["experts.gate_up"].units.shape == (4, 64)   # every expert's input columns, per expert
    ffn = layer_pairs(moe, 0, ("ffn",), "channel")[0]
    assert {m.role for m in ffn.members} == {"up", "down", "experts.gate_up", "experts.down"}
    assert ffn.n_units == 96 + 4 * 24


def test_deepseek_v4_norm_only_and_the_restrictions_needed(arch_ckpt, transformed, tmp_path):
    """DeepSeek-V4: the norm target is its one symmetry (each layer's attn_norm against q_a, kv, the
    compressor's and the indexer's projections; q_a_norm against q_b and the indexer's q_b; ffn_norm
    against every expert, the shared one and the router; the final norm against head); the report says
    why qk, vo and ffn do not hold. Applied anyway, each changes transformers' logits: q_b's rows against
    the kv norm (q_b_norm absorbs the first, the keys are the values), the kv norm against o_a's columns
    (the values are the keys), the shared expert's up rows against its down columns (the clamp at
    swiglu_limit)."""
    from wisca_cli.pairs import Member, Pair, layer_pairs, to_physical

    src = arch_ckpt("deepseek_v4")
    lay = open_checkpoint(src).layout
    assert [lay.layer_type(i) for i in range(4)][:3] == \
        ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
    norm = {i: {m.role for m in layer_pairs(lay, i, ("qk", "vo", "ffn", "norm"), "channel")[0].members} for i in range(3)}
    assert norm[0] == {"attn_norm", "q_a", "kv", "q_a_norm", "q_b", "mlp_norm", "router", "shared.gate", "shared.up",
                       "experts.0.gate", "experts.0.up", "experts.1.gate", "experts.1.up", "experts.2.gate",
                       "experts.2.up", "experts.3.gate", "experts.3.up"}
    assert norm[1] - norm[0] == {"comp_kv", "comp_gate", "idx_kv", "idx_gate", "idx_w", "idx_q"}
    assert norm[2] - norm[0] == {"comp_kv", "comp_gate"}
    warnings = [w["message"] for w in transformed("deepseek_v4")[2]["warnings"]]
    for t in ("qk", "vo", "ffn"):
        assert any(m.startswith(f"{t} is not applicable to deepseek_v4: ") for m in warnings), t

    ids = probe_tokens()
    ref = hf_logits(src, ids)
    d, heads, inter = lay.head_dim, lay.heads, lay.shared_intermediate
    r = lay.rotary_dims
    per_dim = torch.cat([torch.arange(d - r), d - r + torch.arange(r) // 2])   # the trailing rope dims in pairs
    tried = {
        "qk": Pair("qk", d, torch.zeros(d, dtype=torch.long),
                   (Member("q_b", 0, per_dim.repeat(heads), +1), Member("kv_norm", 0, per_dim, -1))),
        "vo": Pair("vo", d, torch.zeros(d, dtype=torch.long),
                   (Member("kv_norm", 0, per_dim, +1), Member("o_a", 1, per_dim.repeat(heads // lay.config["o_groups"]), -1))),
        "ffn": Pair("ffn", inter, torch.zeros(inter, dtype=torch.long),
                    (Member("shared.up", 0, torch.arange(inter), +1), Member("shared.down", 1, torch.arange(inter), -1))),
    }
    for kind, pair in tried.items():
        moved = _logits_applied_anyway(src, lay.layer_roles(1), to_physical(lay, pair), 4, 7, tmp_path / kind)
        assert (moved - ref).abs().max() > 1e-3, kind


@pytest.mark.parametrize("family", ["gemma4", "gemma4-moe"])
def test_gemma4_config_forms_as_transformers_reads_them(family, arch_ckpt, tmp_path):
    """Gemma 4's per-layer sizes from config.json as saved (per_layer_config) and as the config class
    takes them (global_head_dim, num_global_key_value_heads, no per_layer_config) agree with
    transformers' own reading, layer by layer; a config.json without layer_types is refused in one line
    (exit 2, nothing written): transformers would derive them."""
    from transformers import AutoConfig

    src = arch_ckpt(family)
    saved = json.loads((src / "config.json").read_text())
    given = {k: v for k, v in saved.items() if k != "per_layer_config"}
    given.update(global_head_dim=32, num_global_key_value_heads=1)
    (tmp_path / "given").mkdir()
    (tmp_path / "given" / "config.json").write_text(json.dumps(given))
    theirs = AutoConfig.from_pretrained(tmp_path / "given")
    for cfg in (saved, given):
        lay = spec.layout_from_config(cfg)
        assert [(lay.at(i).head_dim, lay.at(i).kv_heads) for i in range(lay.layers)] == \
            [(theirs.per_layer_config[i].head_dim, theirs.per_layer_config[i].num_key_value_heads)
             for i in range(lay.layers)]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    (bad / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "layer_types"}))
    res = run_cli("transform", bad, tmp_path / "never")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "layer_types is missing" in lines[0]
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("family", ["gemma4", "gemma4-moe", "deepseek_v4"])
def test_bf16_checkpoint_every_target_bit_identical_in_transformers(family, tmp_path):
    """A bf16 checkpoint (as these families are released), every target they have: verified exact, and
    transformers' bf16 forward of the output gives the source's logits bit for bit (their norms multiply
    the weight in float32, which a power of two passes through exactly)."""
    from conftest import build
    from transformers import AutoModelForCausalLM

    src = build(tmp_path / "src", family, skew="spec", dtype=torch.bfloat16)
    report = wisca.transform(src, tmp_path / "out", targets=("qk", "vo", "ffn", "norm"))
    assert report["verification"]["mode"] == "exact" and report["verification"]["identical"]
    assert sum(s["units_changed"] for s in report["summary"].values()) > 0
    ids = probe_tokens()

    def logits(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager").eval()
        with torch.no_grad():
            return model(ids).logits

    assert torch.equal(logits(src), logits(tmp_path / "out"))


@pytest.mark.parametrize("family,name,change,message", [
    ("gemma4", "model.embed_tokens_per_layer.weight", "drop", "model.embed_tokens_per_layer.weight is missing"),
    ("gemma4", "model.per_layer_projection_norm.weight", "shape", "has shape [3], expected [8] from config.json"),
    ("deepseek_v4", "model.hc_head.hc_fn", "drop", "model.hc_head.hc_fn is missing"),
    ("deepseek_v4", "model.layers.0.ffn.gate.tid2eid", "float", "expected an integer dtype (an index table)"),
])
def test_broken_tensor_outside_the_layers_is_one_line(family, name, change, message, arch_ckpt, tmp_path):
    """The tensors beside the layers (Gemma 4's per-layer embeddings, DeepSeek-V4's hyper head) and the
    token table: missing, misshapen or of the wrong dtype, refused in one line naming it, exit 2, the
    source unchanged, nothing written."""
    from safetensors.torch import save_file

    src = tmp_path / "src"
    shutil.copytree(arch_ckpt(family), src)
    tensors = load_file(src / "model.safetensors")
    if change == "drop":
        del tensors[name]
    elif change == "shape":
        tensors[name] = torch.ones(3)
    else:
        tensors[name] = tensors[name].float()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    before = (src / "model.safetensors").read_bytes()
    res = run_cli("transform", src, tmp_path / "never")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and message in lines[0], res.stderr
    assert not (tmp_path / "never").exists() and (src / "model.safetensors").read_bytes() == before
