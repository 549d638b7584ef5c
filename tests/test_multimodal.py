"""Checkpoints released multimodal (``*ForConditionalGeneration``): the language model inside is
transformed, every other tower is copied byte for byte and reported, and transformers' own
multimodal class loads the output and gives the same logits on text and on an image.

Each tiny model is built with transformers' own multimodal class (a vision tower and projector, and
the text model of its ``ARCH_FAMILIES`` entry: Qwen3.5's hybrid layers, Qwen3.5-MoE's with experts,
Llama 4's MoE / NoPE layers; Gemma 4's with an audio tower too), every vector perturbed, and its language model skewed through the spec's own pairs with
transformers checking the text logits (``conftest.skew_by_spec``).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import wisca_cli as wisca
from conftest import ARCH_BASE, ARCH_FAMILIES, BASE_CONFIG, probe_tokens, run_cli, skew_by_spec

IMAGE, START, END = 120, 122, 123


def _text(family: str) -> dict:
    return {k: v for k, v in {**BASE_CONFIG, **ARCH_BASE, **ARCH_FAMILIES[family][1]}.items() if v is not None}


def _qwen3_5():
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64)
    cfg = Qwen3_5Config(text_config=_text("qwen3_5"), vision_config=vision, image_token_id=IMAGE, video_token_id=121,
                        vision_start_token_id=START, vision_end_token_id=END)
    return Qwen3_5ForConditionalGeneration, cfg


def _qwen3_5_moe():
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64)
    cfg = Qwen3_5MoeConfig(text_config=_text("qwen3_5_moe"), vision_config=vision, image_token_id=IMAGE,
                           video_token_id=121, vision_start_token_id=START, vision_end_token_id=END)
    return Qwen3_5MoeForConditionalGeneration, cfg


def _llama4():
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, image_size=16,
                  patch_size=8, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64,
                  pixel_shuffle_ratio=0.5, rope_theta=10000)
    cfg = Llama4Config(text_config=_text("llama4"), vision_config=vision, image_token_index=IMAGE,
                       boi_token_index=START, eoi_token_index=END)
    return Llama4ForConditionalGeneration, cfg


AUDIO, AUDIO_START, AUDIO_END = 121, 124, 125


def _gemma4():
    """Gemma 4 as its small models are released: vision and audio towers, each with its embedder into the
    language model (the ``gemma4`` fixture: PLE, kv shared across layers), tied embeddings."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=2, position_embedding_size=64)
    audio = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[8, 4],
                 output_proj_dims=32, conv_kernel_size=3)
    cfg = Gemma4Config(text_config={**_text("gemma4"), "tie_word_embeddings": True}, vision_config=vision,
                       audio_config=audio, image_token_id=IMAGE, boi_token_id=START, eoi_token_id=END,
                       audio_token_id=AUDIO, boa_token_id=AUDIO_START, eoa_token_index=AUDIO_END, video_token_id=126)
    return Gemma4ForConditionalGeneration, cfg


def _gemma4_image_and_audio(g: torch.Generator) -> dict:
    """A 4 x 4 patch image (4 tokens after the 2 x 2 pooling) and 16 frames of 8 audio features (4 tokens)."""
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(1, 16, 2)
    return dict(input_ids=torch.tensor([[5, START, *[IMAGE] * 4, END, AUDIO_START, *[AUDIO] * 4, AUDIO_END, 7, 9]]),
                pixel_values=torch.randn(1, 16, 3 * 4 * 4, generator=g), image_position_ids=grid,
                input_features=torch.randn(1, 16, 8, generator=g), input_features_mask=torch.ones(1, 16, dtype=torch.bool))


def _qwen_image(g: torch.Generator) -> dict:
    """A 1 x 4 x 4 patch grid: 4 image tokens after the 2 x 2 merge."""
    return dict(input_ids=torch.tensor([[5, START, IMAGE, IMAGE, IMAGE, IMAGE, END, 7, 9, 11, 13]]),
                pixel_values=torch.randn(16, 3 * 2 * 4 * 4, generator=g), image_grid_thw=torch.tensor([[1, 4, 4]]),
                mm_token_type_ids=torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0]]))


# model_type -> (builder, the image input its class takes, the towers' module names)
FAMILIES = {
    "qwen3_5": (_qwen3_5, _qwen_image, ["model.visual"]),
    "qwen3_5_moe": (_qwen3_5_moe, _qwen_image, ["model.visual"]),
    "llama4": (_llama4, lambda g: dict(     # a 16 x 16 image, 4 patches, 1 token after the pixel shuffle
        input_ids=torch.tensor([[5, START, IMAGE, END, 7, 9, 11]]), pixel_values=torch.randn(1, 3, 16, 16, generator=g)),
        ["multi_modal_projector", "vision_model"]),
    "gemma4": (_gemma4, _gemma4_image_and_audio,
               ["model.audio_tower", "model.embed_audio", "model.embed_vision", "model.vision_tower"]),
}


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    cache = {}

    def get(family: str):
        if family not in cache:
            build, _, _ = FAMILIES[family]
            cls, cfg = build()
            path = tmp_path_factory.mktemp("mm") / family
            torch.manual_seed(0)
            model = cls(cfg)
            with torch.no_grad():   # every vector away from its init, so each scaling shows
                for _, p in model.named_parameters():
                    if p.dim() == 1:
                        p.add_(torch.randn_like(p) * 0.1)
            model.save_pretrained(path)
            skew_by_spec(path)   # the language model unbalanced, its text logits checked in transformers
            cache[family] = (cls, path)
        return cache[family]

    return get


def _logits(cls, path, image: dict | None) -> torch.Tensor:
    model = cls.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(**(image or {"input_ids": probe_tokens()})).logits


def _tensors(path) -> dict[str, bytes]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


@pytest.mark.parametrize("family", FAMILIES)
def test_language_model_transformed_towers_copied_and_multimodal_class_agrees(family, multimodal, tmp_path):
    """--targets vo,ffn (exact on both): the multimodal class gives bit-identical logits on text and
    on an image; every tower tensor is byte-identical and reported; the language model's changed;
    undo gives every tensor back."""
    cls, src = multimodal(family)
    _, image, towers = FAMILIES[family]
    out = tmp_path / "out"
    res = run_cli("transform", src, out, "--targets", "vo,ffn", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["model_type"] == family and report["verification"]["mode"] == "exact"
    before, after = _tensors(src), _tensors(out)
    tower = {m: [k for k in before if k.startswith(m + ".")] for m in towers}
    assert all(tower.values()) and all(after[k] == before[k] for names in tower.values() for k in names)
    assert report["other_towers"] == [{"module": m, "tensors": len(tower[m]), "bytes": sum(len(before[k]) for k in tower[m]),
                                       "copied_unchanged": True} for m in towers]
    changed = [k for k in before if after[k] != before[k]]
    assert changed and not any(k.startswith(tuple(towers)) for k in changed)
    for inputs in (None, image(torch.Generator().manual_seed(1))):
        assert torch.equal(_logits(cls, out, inputs), _logits(cls, src, inputs))
    assert run_cli("undo", out, tmp_path / "back").returncode == 0
    assert _tensors(tmp_path / "back") == before


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_on_the_multimodal_checkpoint(family, multimodal, tmp_path):
    """Defaults: exit 0 (Qwen3.5's qk on its (1 + w) QK-norm rounds: tolerance), the human report
    names each tower copied, the multimodal class agrees on text and on an image (bit for bit where
    every target is exact), inspect reads the output."""
    cls, src = multimodal(family)
    _, image, towers = FAMILIES[family]
    out = tmp_path / "out"
    res = run_cli("transform", src, out, "--json")
    assert res.returncode == 0, res.stderr
    exact = json.loads(res.stdout)["verification"]["mode"] == "exact"
    human = run_cli("transform", src, tmp_path / "again")
    assert human.returncode == 0 and all(f"{m}: " in human.stdout for m in towers)
    assert "copied byte for byte" in human.stdout
    for inputs in (None, image(torch.Generator().manual_seed(1))):
        a, b = _logits(cls, src, inputs), _logits(cls, out, inputs)
        if exact:
            assert torch.equal(a, b)
        la, lb = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
        assert (la.exp() * (la - lb)).sum(-1).mean() <= 1e-6 and (a.argmax(-1) == b.argmax(-1)).all()
    assert set(wisca.inspect(out)["summary"]) <= {"qk", "vo", "ffn"}


def test_trainer_checkpoint_and_live_transition_of_a_multimodal_model(multimodal, tmp_path):
    """Qwen3.5 as released (vision tower + language model) fine-tuned with transformers' Trainer on
    text: the checkpoint-N/ is transformed with its optimizer.pt (Adam's moments / S and / S**2 bit
    for bit, the tower's parameters untouched), the multimodal class gives bit-identical logits and
    training resumes; and ``wisca_cli.transition`` on the live multimodal model and its optimizer
    keeps its logits bit for bit."""
    from test_training import SAVE, _args, _dataset, _load
    from transformers import Trainer

    from wisca_cli.training import optimizer_parameter_names

    cls, src = multimodal("qwen3_5")
    model = cls.from_pretrained(src, attn_implementation="eager")
    trainer = Trainer(model=model, args=_args(tmp_path / "run", SAVE), train_dataset=_dataset(8))
    trainer.train()
    ckpt, out = tmp_path / "run" / f"checkpoint-{SAVE}", tmp_path / "out"
    report = wisca.transform(ckpt, out, targets=("vo", "ffn"))
    opt = report["training_state"]["optimizer"]
    assert opt["transformed"] and opt["exact"] and opt["underflow"] == 0 and opt["scaled_parameters"] > 0
    assert torch.equal(_logits(cls, ckpt, None), _logits(cls, out, None))
    mult, names = wisca.scale_multipliers(out), optimizer_parameter_names(ckpt)
    assert mult and all(n.startswith("model.language_model.") for n in mult)
    before, after = _load(ckpt / "optimizer.pt"), _load(out / "optimizer.pt")
    for key, b in before["state"].items():
        s = mult.get(names[key], torch.ones(1, dtype=torch.float64)).float()
        a = after["state"][key]
        assert torch.equal(a["exp_avg"], b["exp_avg"] / s) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"] / (s * s))
    resumed = cls.from_pretrained(out, attn_implementation="eager")
    more = Trainer(model=resumed, args=_args(tmp_path / "more", SAVE + 2), train_dataset=_dataset(8))
    more.train(resume_from_checkpoint=str(out))
    assert more.state.global_step == SAVE + 2

    live = cls.from_pretrained(src, attn_implementation="eager")
    adam = torch.optim.AdamW(live.parameters(), lr=1e-3)
    live(input_ids=probe_tokens(), labels=probe_tokens()).loss.backward()
    adam.step()
    live.eval()
    weights = {n: p.detach().clone() for n, p in live.named_parameters()}
    with torch.no_grad():
        want = live(input_ids=probe_tokens(), use_cache=False).logits
    result = wisca.transition(live, adam, targets=("vo", "ffn"))
    with torch.no_grad():
        got = live(input_ids=probe_tokens(), use_cache=False).logits
    assert torch.equal(want, got) and result["verification"]["mode"] == "exact"
    moved = {n for n, p in live.named_parameters() if not torch.equal(p.detach(), weights[n])}
    assert moved and all(n.startswith("model.language_model.layers.") for n in moved)   # the tower untouched


def test_dcp_checkpoint_of_a_multimodal_model(multimodal, tmp_path):
    """Qwen3.5 as released, one step on an image (so the vision tower has Adam state too), saved with
    torch DCP as an FSDP2 loop does: ``wisca transform`` rescales the language model's weights and
    moments bit for bit, copies the tower's weights and state unchanged and reports the tower;
    ``dcp.load`` into transformers' multimodal class gives bit-identical logits on text and on an
    image."""
    import torch.distributed.checkpoint as dcp
    from dcp_helpers import assert_rescaled
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict)

    cls, start = multimodal("qwen3_5")
    _, image, towers = FAMILIES["qwen3_5"]
    model = cls.from_pretrained(start, attn_implementation="eager")
    adam = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = image(torch.Generator().manual_seed(1))
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    adam.step()
    assert all(adam.state[p] for p in model.model.visual.parameters())
    src, dst = tmp_path / "src", tmp_path / "dst"
    dcp.save({"model": get_model_state_dict(model),
              "optimizer": get_optimizer_state_dict(model, adam, options=StateDictOptions(flatten_optimizer_state_dict=True))},
             checkpoint_id=src, no_dist=True)
    model.config.to_json_file(str(src / "config.json"))
    report = wisca.transform(src, dst, targets=("vo", "ffn"))
    assert report["format"] == "dcp" and report["verification"]["identical"]
    tower = sum(1 for n, _ in model.named_parameters() if n.startswith("model.visual."))
    assert [(t["module"], t["tensors"]) for t in report["other_towers"]] == [("model.visual", tower)]
    mults = assert_rescaled(src, dst)     # weights x S, moments / S and / S**2, everything else as it was
    assert mults and not any("visual" in key for key in mults)

    def logits(path):
        fresh = cls.from_pretrained(start, attn_implementation="eager")
        state = {"model": get_model_state_dict(fresh)}
        dcp.load(state, checkpoint_id=path, no_dist=True)
        set_model_state_dict(fresh, state["model"])
        fresh.eval()
        with torch.no_grad():
            return [fresh(**x).logits for x in ({"input_ids": probe_tokens()}, inputs)]

    for a, b in zip(logits(src), logits(dst)):
        assert torch.equal(a, b)
