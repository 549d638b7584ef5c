"""Shared pieces of the OLMo-core 3.0.0 checkpoint fixtures (``make_ckpt.py``, ``check_load.py``).

Everything here is built from the REAL ``ai2-olmo-core==3.0.0`` package: its ``TransformerConfig``,
``TransformerTrainModuleConfig`` (FSDP2 over a gloo/CPU mesh), ``AdamWConfig``, numpy dataset /
data loader and ``TrainerConfig``. Nothing here imitates OLMo-core; this module only fixes the
(tiny) sizes and seeds so that ``make_ckpt.py`` and ``check_load.py`` build the same thing.

Both scripts are launched with ``torchrun --nproc-per-node W`` (W = 1 or 2).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

# The machine is shared: keep every rank on one thread and make OpenMP threads sleep when idle.
# (Must happen before torch is imported.) One thread also keeps CPU matmuls bit-reproducible
# between runs with different world sizes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from olmo_core.config import DType
from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig, TokenizerConfig
from olmo_core.distributed.parallel import DataParallelType
from olmo_core.nn.transformer import TransformerBlockType, TransformerConfig
from olmo_core.optim import AdamWConfig
from olmo_core.train.train_module import (
    TransformerDataParallelConfig,
    TransformerTrainModuleConfig,
)

torch.set_num_threads(1)

FLAVORS = ("llama", "olmo2")

# ---- sizes -------------------------------------------------------------------------------------
D_MODEL = 64
N_LAYERS = 2
N_HEADS = 4
N_KV_HEADS = 2  # GQA: q heads {0,1} read kv head 0, q heads {2,3} read kv head 1 (repeat_interleave)
HEAD_DIM = D_MODEL // N_HEADS  # 16 -> SDPA scale 1/4 is a power of two
VOCAB_SIZE = 256  # byte-level; already a multiple of 128, so no vocab padding is needed
HIDDEN_MULTIPLE_OF = 32  # llama_like: int(8*64/3)=170 rounded up to a multiple of 32 -> 192
LAYER_NORM_EPS = 1e-6
ROPE_THETA = 500_000

SEQ_LEN = 32  # training sequence length
GLOBAL_BATCH_TOKENS = 4 * SEQ_LEN  # 4 instances per optimizer step (global)
RANK_MICROBATCH_TOKENS = 2 * SEQ_LEN  # W=2: 1 micro-batch per rank; W=1: 2 micro-batches
DATA_TOKENS = 64 * SEQ_LEN  # 16 global batches worth of random bytes
DATA_SEED = 1234
INIT_SEED = 0
PROBE_SEED = 4321
PROBE_SHAPE = (2, 16)


def tokenizer_config() -> TokenizerConfig:
    # Random bytes: every id 0..255 is a "token". eos/pad only matter for document handling,
    # which fixed-sequence-length training without doc masking ignores.
    return TokenizerConfig(vocab_size=VOCAB_SIZE, eos_token_id=0, pad_token_id=1)


def model_config(flavor: str) -> TransformerConfig:
    """OLMo-core's own ``TransformerConfig.llama_like`` with tiny sizes.

    llama: the default ``TransformerBlock`` (pre-norm: attention_norm / feed_forward_norm are
           applied to the block input, no qk norm).
    olmo2: ``ReorderedNormTransformerBlock`` (attention_norm / feed_forward_norm applied to the
           *output* of attention / MLP) with ``qk_norm`` = RMSNorm over the WHOLE q projection
           (n_heads*head_dim) and the whole k projection (n_kv_heads*head_dim), as in OLMo-2
           (``use_head_qk_norm=False``).
    """
    if flavor not in FLAVORS:
        raise ValueError(f"unknown flavor {flavor!r}, expected one of {FLAVORS}")
    return TransformerConfig.llama_like(
        d_model=D_MODEL,
        vocab_size=VOCAB_SIZE,
        n_layers=N_LAYERS,
        n_heads=N_HEADS,
        n_kv_heads=N_KV_HEADS,
        block_name=(
            TransformerBlockType.default if flavor == "llama" else TransformerBlockType.reordered_norm
        ),
        qk_norm=(flavor == "olmo2"),
        use_head_qk_norm=False,
        layer_norm_eps=LAYER_NORM_EPS,
        rope_theta=ROPE_THETA,
        hidden_size_multiple_of=HIDDEN_MULTIPLE_OF,
        dtype=DType.float32,
        init_seed=INIT_SEED,
    )


def train_module_config() -> TransformerTrainModuleConfig:
    """OLMo-core's own train module: FSDP(2) over all ranks, plain ``torch.optim.AdamW``."""
    return TransformerTrainModuleConfig(
        rank_microbatch_size=RANK_MICROBATCH_TOKENS,
        max_sequence_length=SEQ_LEN,
        optim=AdamWConfig(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
        dp_config=TransformerDataParallelConfig(
            name=DataParallelType.fsdp, param_dtype=None, reduce_dtype=DType.float32
        ),
        max_grad_norm=1.0,
        # compile_model=False (default): torch.compile is skipped on CPU by OLMo-core anyway.
    )


def write_token_file(path: Path) -> None:
    """A raw (header-less) uint8 token file, the format OLMo-core's numpy datasets memory-map."""
    rng = np.random.default_rng(DATA_SEED)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng.integers(0, VOCAB_SIZE, size=DATA_TOKENS, dtype=np.uint8).tofile(path)


def dataset_config(out_dir: Path) -> NumpyFSLDatasetConfig:
    return NumpyFSLDatasetConfig(
        tokenizer=tokenizer_config(),
        paths=[str(out_dir / "data" / "tokens.npy")],
        sequence_length=SEQ_LEN,
        dtype="uint8",
        work_dir=str(out_dir / "data_work"),
    )


def data_loader_config(out_dir: Path) -> NumpyDataLoaderConfig:
    return NumpyDataLoaderConfig(
        global_batch_size=GLOBAL_BATCH_TOKENS,
        seed=DATA_SEED,
        num_workers=0,
        work_dir=str(out_dir / "data_work"),
    )


def probe_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(0, VOCAB_SIZE, PROBE_SHAPE, generator=g, dtype=torch.long)


@torch.no_grad()
def forward_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """OLMo-core's own forward (``Transformer.forward`` without labels returns the logits).

    Every rank runs the same ids (FSDP all-gathers the full weights, so each rank computes the
    full logits); the result is a plain fp32 tensor.
    """
    was_training = model.training
    model.eval()
    logits = model(ids)
    if was_training:
        model.train()
    # OLMo-core shards lm_head with reshard_after_forward=False, so after a forward without backward
    # its parameters stay unsharded: FSDP2 then registers plain full tensors in place of the sharded
    # DTensor parameters the optimizer holds. Reshard so named_parameters() are the optimizer's again.
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    assert isinstance(logits, torch.Tensor) and not isinstance(logits, DTensor)
    return logits.detach().float().cpu()


def full(t: torch.Tensor) -> torch.Tensor:
    """Full (unsharded) copy of a possibly-sharded tensor. Collective for DTensors: call on all ranks."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu().clone()


def full_weights_and_moments(model: torch.nn.Module, optim: torch.optim.Optimizer):
    """``{fqn: full weight}`` and ``{fqn: {"exp_avg", "exp_avg_sq", "step"}}`` (full tensors)."""
    weights: Dict[str, torch.Tensor] = {}
    moments: Dict[str, Dict[str, torch.Tensor]] = {}
    for fqn, p in model.named_parameters():
        weights[fqn] = full(p)
        st = optim.state.get(p, {})
        if st:
            moments[fqn] = {k: full(st[k]) for k in ("exp_avg", "exp_avg_sq", "step")}
    return weights, moments


def get_full_model_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Full model state dict on every rank (all-gathers FSDP shards)."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


def set_full_model_state(model: torch.nn.Module, sd: Dict[str, torch.Tensor]) -> None:
    """Copy a full state dict (identical on every rank) into the (sharded) model in place."""
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=True))


# ---- exact power-of-two unbalancing -------------------------------------------------------------
#
# Each "pair" multiplies some slices of one tensor by 2**e and the partner slices by 2**-e so that
# the network function is unchanged. With powers of two every product in the affected matmuls /
# elementwise ops is bit-identical (no rounding change), so the logits are expected to be EQUAL
# (make_ckpt.py checks it and records the result).
#
# kinds:
#   qk          per kv head g: w_k rows of g x 2**-a_g, w_q rows of all q heads reading g x 2**a_g.
#               (RoPE rotates within a head and the SDPA scale 1/4 is a power of two: exact.)
#               NOT for olmo2: q_norm/k_norm (RMSNorm over the whole projection) normalise q and k,
#               which would undo a uniform scale and change the function for a per-head one.
#   qk_norm     olmo2 only (opt-in): the same per-head factors on q_norm.weight / k_norm.weight
#               (elementwise gains applied after the whole-projection norm): exact there.
#   vo          per kv head g: w_v rows of g x 2**b_g, w_out COLUMNS of the q heads reading g x 2**-b_g
#               (attention output is linear in v). Exact for both blocks (olmo2's attention_norm
#               comes after w_out, whose output is unchanged).
#   ffn         per hidden channel j: w3 (up) row j x 2**c_j, w2 (down) column j x 2**-c_j
#               (SwiGLU: silu(w1 x) * (w3 x) is linear in w3 x). Exact for both blocks.
#   norm        llama only (pre-norm block): per model channel i, attention_norm.weight[i] x 2**d_i and
#               columns i of w_q, w_k, w_v x 2**-d_i; feed_forward_norm.weight[i] x 2**e_i and columns i
#               of w1, w3 x 2**-e_i. For olmo2 the norms sit AFTER attention/MLP and feed the residual
#               stream; no linear reads them directly, and an RMSNorm after a linear only absorbs a
#               uniform scale of that linear's output approximately (eps breaks exactness), so there
#               is no exact pair for olmo2's attention_norm / feed_forward_norm.
#   lm_head_norm both flavours: per model channel i, lm_head.norm.weight[i] x 2**f_i and column i of
#               lm_head.w_out x 2**-f_i (the final norm is a pre-norm in both blocks).

DEFAULT_KINDS = {
    "llama": ("qk", "vo", "ffn", "norm", "lm_head_norm"),
    "olmo2": ("vo", "ffn", "lm_head_norm"),
}
EXP_RANGE = 4  # exponents drawn from [-4, 4]
UNBALANCE_SEED = 777


def _exps(g: torch.Generator, n: int) -> List[int]:
    return torch.randint(-EXP_RANGE, EXP_RANGE + 1, (n,), generator=g).tolist()


def _pow2(exps: List[int]) -> torch.Tensor:
    return torch.tensor([2.0**e for e in exps], dtype=torch.float32)


@torch.no_grad()
def unbalance_state_dict(
    sd: Dict[str, torch.Tensor], flavor: str, kinds: Optional[List[str]] = None
) -> Dict[str, Any]:
    """Rescale ``sd`` (full tensors, in place). Returns a JSON-able record of the exponents used.

    The exponents come from a fixed-seed generator, so every rank computes the same thing.
    """
    kinds = list(DEFAULT_KINDS[flavor] if kinds is None else kinds)
    if flavor == "olmo2" and ("qk" in kinds or "norm" in kinds):
        raise ValueError("'qk' and 'norm' pairs are not function-preserving for the olmo2 block")
    if flavor == "llama" and "qk_norm" in kinds:
        raise ValueError("the llama block has no qk norm")
    g = torch.Generator().manual_seed(UNBALANCE_SEED)
    rep = N_HEADS // N_KV_HEADS
    record: Dict[str, Any] = {"kinds": kinds, "seed": UNBALANCE_SEED, "exponents": {}}

    def per_kv_head_rows(n_heads: int, exps: List[int], sign: int) -> torch.Tensor:
        # factor for each of the n_heads*HEAD_DIM rows; kv head of q head h is h // rep
        if n_heads == N_KV_HEADS:
            per_head = [sign * e for e in exps]
        else:
            per_head = [sign * exps[h // rep] for h in range(n_heads)]
        return _pow2(per_head).repeat_interleave(HEAD_DIM)

    for layer in range(N_LAYERS):
        p = f"blocks.{layer}."
        rec: Dict[str, Any] = {}
        if "qk" in kinds:
            a = _exps(g, N_KV_HEADS)
            sd[p + "attention.w_q.weight"].mul_(per_kv_head_rows(N_HEADS, a, +1)[:, None])
            sd[p + "attention.w_k.weight"].mul_(per_kv_head_rows(N_KV_HEADS, a, -1)[:, None])
            rec["qk_per_kv_head"] = a
        if "qk_norm" in kinds:
            a = _exps(g, N_KV_HEADS)
            sd[p + "attention.q_norm.weight"].mul_(per_kv_head_rows(N_HEADS, a, +1))
            sd[p + "attention.k_norm.weight"].mul_(per_kv_head_rows(N_KV_HEADS, a, -1))
            rec["qk_norm_per_kv_head"] = a
        if "vo" in kinds:
            b = _exps(g, N_KV_HEADS)
            sd[p + "attention.w_v.weight"].mul_(per_kv_head_rows(N_KV_HEADS, b, +1)[:, None])
            sd[p + "attention.w_out.weight"].mul_(per_kv_head_rows(N_HEADS, b, -1)[None, :])
            rec["vo_per_kv_head"] = b
        if "ffn" in kinds:
            hidden = sd[p + "feed_forward.w3.weight"].shape[0]
            c = _exps(g, hidden)
            sd[p + "feed_forward.w3.weight"].mul_(_pow2(c)[:, None])
            sd[p + "feed_forward.w2.weight"].mul_(_pow2([-e for e in c])[None, :])
            rec["ffn_per_hidden_channel"] = c
        if "norm" in kinds:
            d = _exps(g, D_MODEL)
            sd[p + "attention_norm.weight"].mul_(_pow2(d))
            for w in ("w_q", "w_k", "w_v"):
                sd[p + f"attention.{w}.weight"].mul_(_pow2([-x for x in d])[None, :])
            e = _exps(g, D_MODEL)
            sd[p + "feed_forward_norm.weight"].mul_(_pow2(e))
            for w in ("w1", "w3"):
                sd[p + f"feed_forward.{w}.weight"].mul_(_pow2([-x for x in e])[None, :])
            rec["attention_norm_per_channel"] = d
            rec["feed_forward_norm_per_channel"] = e
        record["exponents"][f"blocks.{layer}"] = rec
    if "lm_head_norm" in kinds:
        f = _exps(g, D_MODEL)
        sd["lm_head.norm.weight"].mul_(_pow2(f))
        sd["lm_head.w_out.weight"].mul_(_pow2([-x for x in f])[None, :])
        record["exponents"]["lm_head_norm_per_channel"] = f
    return record


# ---- Hugging Face style config of the same model ------------------------------------------------


def hf_config(flavor: str, cfg: TransformerConfig) -> Dict[str, Any]:
    block = cfg.block
    assert not isinstance(block, dict)
    ff = block.feed_forward
    assert ff is not None
    common = dict(
        hidden_size=cfg.d_model,
        intermediate_size=ff.hidden_size,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        head_dim=HEAD_DIM,
        vocab_size=cfg.vocab_size,  # == embedding rows (no padding needed for 256)
        rms_norm_eps=LAYER_NORM_EPS,
        rope_theta=float(ROPE_THETA),
        tie_word_embeddings=False,
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        max_position_embeddings=4096,
        initializer_range=0.02,
        use_cache=True,
        torch_dtype="float32",
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=1,
    )
    if flavor == "llama":
        return dict(architectures=["LlamaForCausalLM"], model_type="llama", mlp_bias=False, **common)
    return dict(architectures=["Olmo2ForCausalLM"], model_type="olmo2", **common)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
