"""The architecture specs as data: every shipped file loads, resolves exactly as before the
typed specs (tests/data/resolved_specs.json), states only what differs from its parent, and
a wrong key or value type is one clear error naming the file."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from wisca_cli import spec
from wisca_cli.errors import WiscaError

SNAPSHOT = json.loads((Path(__file__).parent / "data" / "resolved_specs.json").read_text())["specs"]
# The norm target's readers, hard-coded in pairs.norm_pair before the specs declared them
# (families recorded later carry their own).
OLD_NORM_READERS = {"attn_norm": ["q", "k", "v"], "mlp_norm": ["gate", "up", "router", "shared_gate"]}


def _files() -> dict[str, dict]:
    folder = resources.files("wisca_cli") / "architectures"
    return {f"architectures/{e.name}": json.loads(e.read_text()) for e in folder.iterdir() if e.name.endswith(".json")}


def test_every_shipped_spec_loads():
    files = _files()
    specs = spec.shipped_specs()
    assert sorted(specs) == sorted(d["name"] for d in files.values()) == sorted(SNAPSHOT)
    for s in specs.values():
        assert isinstance(s, spec.ArchSpec)
        assert isinstance(s.norm, spec.NormSpec) and isinstance(s.attention, spec.AttentionSpec)
        assert all(isinstance(o, spec.OptionalTensor) for o in s.optional_tensors.values())
        assert all(isinstance(f, spec.FusedSpec) for f in s.fused.values())
        assert s.moe is None or isinstance(s.moe, spec.MoeSpec)
        for model_type in s.model_types:
            assert spec.spec_for(model_type) is s


@pytest.mark.parametrize("name", sorted(SNAPSHOT))
def test_resolved_spec_equals_the_old_one(name):
    """The deep-merged, shrunken files resolve to exactly the specs the full files gave."""
    old = spec.parse_spec({"norm_readers": OLD_NORM_READERS, **SNAPSHOT[name]}, f"snapshot {name}")
    assert spec.shipped_specs()[name] == old


def _restated(child, parent, path=""):
    """Leaves of a child file equal to what it inherits anyway."""
    out = []
    for key, value in child.items():
        if key in ("name", "extends", *spec.NOT_INHERITED) and not path:
            continue
        here = f"{path}{key}"
        if isinstance(value, dict) and isinstance(parent.get(key), dict):
            out += _restated(value, parent[key], here + ".")
        elif key in parent and parent[key] == value:
            out.append(here)
    return out


def test_children_state_only_what_differs():
    files = {d["name"]: d for d in _files().values()}
    resolved = {}

    def resolve(name):
        if name not in resolved:
            d = files[name]
            base = resolve(d["extends"]) if "extends" in d else {}
            resolved[name] = spec.merge({k: v for k, v in base.items() if k not in spec.NOT_INHERITED},
                                        {k: v for k, v in d.items() if k != "extends"})
        return resolved[name]

    for name, d in files.items():
        if "extends" in d:
            assert _restated(d, resolve(d["extends"])) == [], name
    assert "gate" not in files["qwen3"].get("layer_tensors", {})
    assert set(files["qwen3"]["layer_tensors"]) == {"q_norm", "k_norm"}


def test_merge_is_deep_and_null_removes():
    base = {"a": {"x": 1, "y": {"p": 1}}, "l": [1, 2], "s": 1, "gone": {"k": 1}}
    got = spec.merge(base, {"a": {"y": {"q": 2}, "z": 3}, "l": [3], "s": None, "gone": None, "new": {"n": None}})
    assert got == {"a": {"x": 1, "y": {"p": 1, "q": 2}, "z": 3}, "l": [3], "new": {}}
    assert base["a"]["y"] == {"p": 1}   # the parent is left alone


def _load_with(name: str, change) -> None:
    files = json.loads(json.dumps(_files()))
    change(files[f"architectures/{name}.json"])
    spec.load_specs(files)


@pytest.mark.parametrize("name, change, message", [
    ("qwen3", lambda d: d.update(atention={}),
     "architectures/qwen3.json: unknown key 'atention' in the spec (known: name, model_types,"),
    ("qwen3", lambda d: d["attention"].update(rotery="half"),
     "architectures/qwen3.json: unknown key 'rotery' in attention (known: rotary,"),
    ("llama", lambda d: d["optional_tensors"]["q_bias"].update(nam="x"),
     "architectures/llama.json: unknown key 'nam' in optional_tensors.q_bias (known: name, when, unless)"),
    ("mixtral", lambda d: d["moe"].update(topk=2), "architectures/mixtral.json: unknown key 'topk' in moe"),
    ("qwen3", lambda d: d["attention"].update(rotary="full"),
     'architectures/qwen3.json: attention.rotary must be one of "half", "interleaved", got "full"'),
    ("gpt2", lambda d: d["attention"].update(head_dim_key="no"),
     'architectures/gpt2.json: attention.head_dim_key must be true or false, got "no"'),
    ("llama", lambda d: d.update(targets=["qk", "moe"]),
     "architectures/llama.json: targets must be a list of names from: qk, vo, ffn, norm, conv, got"),
    ("gemma2", lambda d: d["norm"].update(weight_offset="1"),
     'architectures/gemma2.json: norm.weight_offset must be a number, got "1"'),
    ("phi3", lambda d: d["fused"]["qkv"].update(parts=["q", "o"]),
     "architectures/phi3.json: fused.qkv.parts must be a non-empty list of names from:"),
    ("granite", lambda d: d["attention"]["scale"].update(inv_sqrt="head_dim"),
     "architectures/granite.json: attention.scale must have exactly one of inv_sqrt, value"),
    ("qwen3", lambda d: d.update(extends="lama"), 'architectures/qwen3.json: extends "lama" names no spec'),
    ("qwen3", lambda d: d.pop("model_types"), "architectures/qwen3.json: missing key 'model_types'"),
    ("qwen3", lambda d: d.update(model_types=["llama"]),
     "model_type 'llama' is also served by architectures/llama.json"),
    ("llama", lambda d: d.pop("norm_readers"), "architectures/llama.json: the norm target needs norm_readers"),
    ("gemma2", lambda d: d.update(inexact_targets=["ffn"], targets=["qk", "vo"]),
     "architectures/gemma2.json: inexact target 'ffn' is not in targets"),
    ("mixtral", lambda d: d["moe"]["expert_tensors"].update(up="w3.weight"),
     "architectures/mixtral.json: moe.expert_tensors.up must contain {expert}"),
    ("cohere", lambda d: d["block"].update(parallel_residual=False),
     "architectures/cohere.json: block.shared_norm needs parallel_residual"),
    ("cohere", lambda d: d["layer_tensors"].update(mlp_norm="post_attention_layernorm.weight"),
     "architectures/cohere.json: block.shared_norm: the MLP reads attn_norm, so there is no mlp_norm"),
    ("cohere", lambda d: d["attention"].update(qk_norm="per_head"),
     'architectures/cohere.json: attention.qk_norm must be one of "head", "heads", "full", got "per_head"'),
    ("phi", lambda d: d["final"].update(head_bias=1),
     "architectures/phi.json: final.head_bias must be a non-empty string, got 1"),
    ("deepseek_v3", lambda d: d["moe"].update(routing="topk"),
     'architectures/deepseek_v3.json: moe.routing must be one of "softmax", "sigmoid", "topk_sigmoid", '
     '"softmax_group", "topk_softmax", "scaled_softmax", "sqrtsoftplus", got "topk"'),
    ("deepseek_v3", lambda d: d["moe"].pop("topk_groups"),
     "architectures/deepseek_v3.json: moe.groups and moe.topk_groups go together"),
    ("glm4_moe", lambda d: d["moe"].pop("routing"),
     'architectures/glm4_moe.json: moe.groups need routing "sigmoid" or "softmax_group"'),
    ("mistral4", lambda d: d["moe"].update(correction="mlp.gate.e_score_correction_bias"),
     'architectures/mistral4.json: moe.correction needs routing "sigmoid" or "sqrtsoftplus"'),
    ("deepseek_v3", lambda d: d["attention"]["mla"].pop("kv_lora_rank"),
     "architectures/deepseek_v3.json: missing key 'kv_lora_rank' in attention.mla"),
    ("deepseek_v3", lambda d: d["optional_tensors"]["q_a_bias"].update(when=[]),
     "architectures/deepseek_v3.json: optional_tensors.q_a_bias.when must be true, false, a config key or a "
     "non-empty list of config keys, got []"),
    ("gpt_oss", lambda d: d["moe"]["fused_experts"]["down"].update(dims=["in", "experts", "out"]),
     'architectures/gpt_oss.json: moe.fused_experts.down.dims must be "experts" then "out" and "in"'),
    ("gpt_oss", lambda d: d["moe"]["fused_experts"]["gate_up"].update(layout="halves"),
     'architectures/gpt_oss.json: moe.fused_experts.gate_up.layout must be one of "concat", "interleaved"'),
    ("gpt_oss", lambda d: d["moe"]["fused_experts"].pop("down"),
     "architectures/gpt_oss.json: moe.fused_experts must hold gate, up, down once each"),
    ("mixtral", lambda d: d["moe"].update(fused_experts=None, fused_router=None, mxfp4="quantization_config"),
     "architectures/mixtral.json: moe.mxfp4: MXFP4 experts are fused ones; it needs moe.fused_experts"),
    ("gpt_oss", lambda d: d["mlp"].pop("alpha"),
     'architectures/gpt_oss.json: mlp: alpha and limit go with kind "clamped"'),
    ("llama4", lambda d: d["target_layers"]["qk"].update(only="even"),
     'architectures/llama4.json: target_layers.qk.only must be one of "rope", "nope", got "even"'),
    ("llama4", lambda d: d.update(targets=["vo", "ffn", "norm"]),
     "architectures/llama4.json: target_layers names 'qk', which is not in targets"),
    ("llama4", lambda d: d["attention"].pop("rope_layers"),
     "architectures/llama4.json: attention.nope_interval needs attention.rope_layers"),
    ("llama4", lambda d: d["attention"]["temperature"].pop("floor"),
     "architectures/llama4.json: missing key 'floor' in attention.temperature"),
    ("llama4", lambda d: d["config_defaults"].update(floor_scale=[1]),
     "architectures/llama4.json: config_defaults.floor_scale must be a number, a string or true/false, got [1]"),
    ("llama4", lambda d: d.update(refused_model_types={"llama": "x"}),
     "architectures/llama4.json: refused_model_types names 'llama', which is served by architectures/llama.json"),
    # the hybrid families' sections
    ("granitemoehybrid", lambda d: d["linear_attention"].update(kind="mamba3"),
     'architectures/granitemoehybrid.json: linear_attention.kind must be one of "gated_deltanet", "mamba2", '
     'got "mamba3"'),
    ("granitemoehybrid", lambda d: d["linear_attention"]["tensors"].update(lin_q="mamba.q.weight"),
     "architectures/granitemoehybrid.json: linear_attention.tensors: 'lin_q' is not a mamba2 role"),
    ("granitemoehybrid", lambda d: d["linear_attention"]["tensors"].pop("lin_D"),
     "architectures/granitemoehybrid.json: linear_attention.tensors lacks lin_D"),
    ("olmo_hybrid", lambda d: d["linear_attention"].update(conv_split=["a", "b"]),
     "architectures/olmo_hybrid.json: linear_attention.conv_split: the conv's q, k and v parts, got ['a', 'b']"),
    ("olmo_hybrid", lambda d: d["linear_attention"].update(full_attention_lacks={"moe": "x"}),
     "architectures/olmo_hybrid.json: linear_attention.full_attention_lacks: 'moe' is not a target"),
    ("llama", lambda d: d.update(targets=["qk", "conv"]),
     "architectures/llama.json: the conv target needs linear_attention (a causal conv to pair with)"),
    ("nemotron_h", lambda d: d["block"].pop("mlp_kinds"),
     "architectures/nemotron_h.json: block.kinds and block.mlp_kinds go together"),
    ("nemotron_h", lambda d: d["block"].pop("pattern_letters"),
     "architectures/nemotron_h.json: block.pattern and block.pattern_letters go together, with block.kinds"),
    ("granitemoehybrid", lambda d: d["fused"].pop("shared.gate_up"),
     "architectures/granitemoehybrid.json: moe names the fused MLP tensor 'shared.gate_up', which fused does not "
     "describe"),
])
def test_bad_spec_is_one_line_naming_file_and_key(name, change, message):
    with pytest.raises(WiscaError) as e:
        _load_with(name, change)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_norm_readers_expand_over_every_mlp():
    s = spec.shipped_specs()["qwen2_moe"]
    prefixes = ["experts.0.", "experts.1.", "shared."]
    assert s.norm_reader_roles("mlp_norm", prefixes) == [
        "experts.0.gate", "experts.0.up", "experts.1.gate", "experts.1.up", "shared.gate", "shared.up",
        "router", "shared_gate"]
    assert s.norm_reader_roles("attn_norm", [""]) == ["q", "k", "v"]


def test_sections_are_frozen():
    s = spec.shipped_specs()["llama"]
    with pytest.raises(AttributeError):
        s.attention.rotary = None
    with pytest.raises(TypeError):
        s.layer_tensors["q"] = "x"


def test_refuse_when_names_the_config_key():
    cfg = {"model_type": "olmoe", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 2, "intermediate_size": 32, "vocab_size": 128, "num_experts": 4,
           "num_experts_per_tok": 2}
    assert spec.layout_from_config({**cfg, "clip_qkv": None}).experts == 4
    with pytest.raises(WiscaError, match=r"config.json: clip_qkv=8.0 is not supported for olmoe: q, k and v are clamped"):
        spec.layout_from_config({**cfg, "clip_qkv": 8.0})


DEEPSEEK = {"model_type": "deepseek_v3", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4,
            "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 128, "n_routed_experts": 4,
            "num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_shared_experts": 2, "first_k_dense_replace": 1,
            "q_lora_rank": 32, "kv_lora_rank": 24, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12}


@pytest.mark.parametrize("q_lora, bias, want", [
    (32, False, {"q_a", "q_a_norm", "q_b"}), (32, True, {"q_a", "q_a_bias", "q_a_norm", "q_b", "kv_a_bias", "o_bias"}),
    (None, False, {"q"}), (None, True, {"q", "kv_a_bias", "o_bias"})])
def test_optional_tensors_when_all_and_unless(q_lora, bias, want):
    """``when`` as a list: every key set (q_a_proj's bias needs a q latent and attention_bias);
    ``unless``: absent when the key is set (q_proj only without a q latent)."""
    lay = spec.layout_from_config({**DEEPSEEK, "q_lora_rank": q_lora, "attention_bias": bias})
    roles = set(lay.layer_roles(0))
    assert roles & {"q", "q_a", "q_a_bias", "q_a_norm", "q_b", "kv_a_bias", "o_bias"} == want
    assert {"kv_a", "kv_a_norm", "kv_b", "o", "gate", "up", "down"} <= roles and "router" not in roles
    moe = set(lay.layer_roles(1))        # first_k_dense_replace=1: layer 1 routes
    assert {"router", "router_correction", "shared.up", "experts.3.down"} <= moe and "up" not in moe
    assert lay.shared_intermediate == 2 * 32 and lay.head_dim == lay.rotary_dims == 8


def test_mla_needs_a_kv_head_per_query_head():
    with pytest.raises(WiscaError, match=r"config.json: num_key_value_heads=2 must equal num_attention_heads=4 "
                                         r"for multi-head latent attention"):
        spec.layout_from_config({**DEEPSEEK, "num_key_value_heads": 2})


def test_gpt_oss_reads_mxfp4_experts_and_refuses_other_quantisations():
    cfg = {"model_type": "gpt_oss", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 2, "intermediate_size": 24, "vocab_size": 128, "num_local_experts": 4,
           "num_experts_per_tok": 2}
    assert spec.layout_from_config(cfg).fused_experts
    assert spec.layout_from_config({**cfg, "intermediate_size": 32, "quantization_config": {"quant_method": "mxfp4"}}
                                   ).mxfp4_experts
    with pytest.raises(WiscaError, match=r"config.json: MXFP4 experts need hidden_size and the expert intermediate "
                                         r"size to be multiples of 32, got 64 and 24"):
        spec.layout_from_config({**cfg, "quantization_config": {"quant_method": "mxfp4"}})
    with pytest.raises(WiscaError, match=r"config.json: quantization_config=\{\"quant_method\": \"fp8\"\} is not "
                                         r"supported for gpt_oss: only MXFP4 experts"):
        spec.layout_from_config({**cfg, "quantization_config": {"quant_method": "fp8"}})


LLAMA4 = {"model_type": "llama4_text", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "num_hidden_layers": 8, "intermediate_size": 24, "intermediate_size_mlp": 48,
          "vocab_size": 128, "num_local_experts": 4, "interleave_moe_layer_step": 2}


@pytest.mark.parametrize("extra", [{}, {"use_qk_norm": False, "attention_chunk_size": None, "no_rope_layer_interval": 3},
                                   {"no_rope_layers": [1, 0, 0, 1, 1, 1, 0, 1], "moe_layers": [0, 5]}])
def test_llama4_layers_as_transformers_fills_the_config_in(extra):
    """A short Llama 4 config.json reads as transformers' Llama4TextConfig fills it in: NoPE
    layers every no_rope_layer_interval, MoE layers every interleave_moe_layer_step (or the
    lists where given), chunked attention on the RoPE layers, qk only on the NoPE layers
    with use_qk_norm (its default true)."""
    from transformers import Llama4TextConfig

    cfg = {**LLAMA4, **extra}
    hf = Llama4TextConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    lay = spec.layout_from_config(cfg)
    layers = range(cfg["num_hidden_layers"])
    assert [int(lay.rotary_dims_at(i) > 0) for i in layers] == hf.no_rope_layers
    assert [i for i in layers if lay.is_moe_layer(i)] == hf.moe_layers
    assert [lay.chunk_at(i) for i in layers] == [hf.attention_chunk_size if t == "chunked_attention" else None
                                                  for t in hf.layer_types]
    assert [lay.target_applies("qk", i) for i in layers] == [not (hf.use_qk_norm and r) for r in hf.no_rope_layers]
    assert lay.intermediate == 48 and lay.expert_intermediate == lay.shared_intermediate == 24
    assert lay.rope_theta == hf.rope_parameters["rope_theta"] and lay.eps == hf.rms_norm_eps


def test_a_config_key_under_another_name_of_transformers():
    """Qwen3-MoE configs of transformers 4 (the hub's) say num_experts, transformers 5's
    num_local_experts (its attribute_map): both read the same, and transformers agrees."""
    from transformers import Qwen3MoeConfig

    base = {"model_type": "qwen3_moe", "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 2,
            "vocab_size": 128, "num_experts_per_tok": 2}
    for key in ("num_experts", "num_local_experts"):
        cfg = {**base, key: 6}
        assert spec.layout_from_config(cfg).experts == 6 == Qwen3MoeConfig(**{key: 6}).num_local_experts
    with pytest.raises(WiscaError, match="num_local_experts"):
        spec.layout_from_config(base)


def test_multimodal_config_reads_as_its_language_model_renamed():
    """Llama4ForConditionalGeneration's config (model_type llama4, the text model's under
    text_config): the llama4 family under the names the multimodal checkpoint gives it; one
    line naming the key when text_config is missing."""
    lay = spec.layout_from_config({"model_type": "llama4", "text_config": LLAMA4, "tie_word_embeddings": False})
    text = spec.layout_from_config(LLAMA4)
    assert lay.spec.name == "llama4" and lay.layers == text.layers and lay.hidden == text.hidden
    assert (lay.spec.embed, lay.spec.lm_head, lay.spec.layer_prefix) == (
        "language_model.model.embed_tokens.weight", "language_model.lm_head.weight", "language_model.model.layers.{layer}.")
    assert lay.layer_roles(0) == {r: "language_model." + n for r, n in text.layer_roles(0).items()}
    with pytest.raises(WiscaError) as e:
        spec.layout_from_config({"model_type": "llama4"})
    assert str(e.value) == "config.json: a llama4 checkpoint needs its language model's config under 'text_config'"


# -- frameworks (frameworks/*.json) ---------------------------------------------------------------
def _framework_files() -> dict:
    from importlib import resources

    root = resources.files("wisca_cli").joinpath("frameworks")
    return {f"frameworks/{e.name}": json.loads(e.read_text()) for e in root.iterdir() if e.name.endswith(".json")}


def test_framework_descriptions_rename_every_role_and_are_checked():
    from wisca_cli.framework import load_frameworks, optimizer_prefixes, shipped_frameworks

    shipped = shipped_frameworks()
    assert set(shipped) == {"torchtitan", "olmo_core", "megatron"}
    llama = spec.shipped_specs()["llama"]
    titan = llama.adapted("torchtitan", shipped["torchtitan"].families["llama"])
    assert titan.layer_name(2, titan.layer_tensors["q"]) == "layers.2.attention.qkv_linear.wq.weight"
    assert titan.attention.rotary == "interleaved" and llama.attention.rotary == "half"
    assert set(titan.layer_tensors) == set(llama.layer_tensors)
    assert optimizer_prefixes() == ("optimizer.", "optim.")
    files = _framework_files()
    cases = [
        (lambda d: d["families"]["llama"]["layer_tensors"].pop("up"),
         r"torchtitan.json: families.llama must rename every layer tensor role of the spec \(missing: up"),
        (lambda d: d["families"].__setitem__("nosuch", d["families"]["llama"]), r"families.nosuch: no such family"),
        (lambda d: d["families"]["llama"]["fused_state"]["qkv"].__setitem__("parts", ["q", "v", "k"]),
         r"layout kv_groups holds parts \[q, k, v\]"),
        (lambda d: d.__setitem__("optimizer_prefix", "optimizer"), r"optimizer_prefix must be"),
        (lambda d: d["families"]["llama"].__setitem__("layer_prefix", "layers."), r"layer_prefix must contain"),
        (lambda d: d.__setitem__("colour", "red"), r"unknown key 'colour'"),
    ]
    for edit, match in cases:
        data = json.loads(json.dumps(files["frameworks/torchtitan.json"]))
        edit(data)
        with pytest.raises(WiscaError, match=match):
            load_frameworks({"frameworks/torchtitan.json": data})
    # Megatron-core: stacked layers, fused tensors standing for their parts, the state key first
    mega = shipped["megatron"]
    adapted = llama.adapted("megatron", mega.families["llama"])
    assert set(adapted.layer_tensors) == {"attn_norm", "qkv", "o", "mlp_norm", "gate_up", "down"}
    assert adapted.fused["qkv"].layout == "kv_groups" and mega.stacked_prefix("llama") == "decoder.layers."
    assert mega.state_key == "first" and mega.state_powers["fp32_param"] == -1
    cases = [
        (lambda d: d["families"]["llama"]["layer_tensors"].pop("gate_up"),
         r"megatron.json: families.llama must rename every layer tensor role of the spec \(missing: gate_up"),
        (lambda d: d["families"]["llama"]["fused"]["qkv"].__setitem__("parts", ["q", "k"]),
         r"layout kv_groups holds parts \[q, k, v\]"),
        (lambda d: d["families"]["llama"].__setitem__("layer_prefix", "decoder.{layer}.layers."),
         r"layer_prefix must end with \{layer\}\. \(stacked layers\)"),
        (lambda d: d["state_powers"].__setitem__("param", 3), r"an integer power from -1 to 2"),
        (lambda d: d["stand_ins"].__setitem__("x.Y", "Tensor"), r"stand_ins.x.Y must be one of"),
        (lambda d: d.__setitem__("state_key", "middle"), r"state_key must be one of"),
    ]
    for edit, match in cases:
        data = json.loads(json.dumps(files["frameworks/megatron.json"]))
        edit(data)
        with pytest.raises(WiscaError, match=match):
            load_frameworks({"frameworks/megatron.json": data})
