"""Shared pieces of the torchtitan 0.3.0 checkpoint harness (CPU, gloo).

Used by make_ckpt.py (writes a real torchtitan checkpoint) and check_load.py
(loads a checkpoint back with torchtitan's own CheckpointManager).

Everything model-, parallelism-, optimizer- and checkpoint-related is
torchtitan's own code: the model classes and layer builders from
``torchtitan.models.{llama3,qwen3}``, ``parallelize_llama`` /
``parallelize_qwen3`` (FSDP2 via ``apply_fsdp_to_decoder``), the
``OptimizersContainer`` (AdamW via ``default_adamw``), the
``LRSchedulersContainer``, the ``ChunkedLossWrapper``/``CrossEntropyLoss`` and
``CheckpointManager``.  torchtitan's ``Trainer`` itself cannot be instantiated
on a CPU-only machine, so ``Harness`` replays ``Trainer.__init__`` and
``Trainer.train_step`` step by step, in the same order.  Every place where it
deviates from the Trainer is marked with ``DEVIATION (n)`` in the code:

  (1) device detection: torchtitan falls back to "cuda"/NCCL without an
      accelerator; we make it bind "cpu" (-> gloo, torch.cpu.set_device).
  (2) training.disable_cuda_graphs=True (CUDA graph capture of fwd/bwd).
  (3) no MetricsProcessor (CUDA memory monitor, peak-FLOPs lookup); the
      loss is returned by train_step and checked finite as the Trainer does.
  (4) inner attention = torchtitan's ScaledDotProductAttention: flex_attention
      has no CPU backward, varlen needs CUDA flash kernels.
  (5) FSDP collectives forced to SUM (gloo has no PREMUL_SUM).
  (6) spmd_backend="partial_dtensor" on torch < 2.14 (the default
      "spmd_types" needs FSDP support that first shipped in torch 2.14).
  (7) data: no tokenizer / HF dataset (no hub access); random byte tokens via a
      torchtitan ParallelAwareDataloader subclass.
  (8) checkpoint states={"train_state": TrainState()} instead of the Trainer
      object itself (same state_dict: {"step", "ntokens_seen"}).

Import this module BEFORE anything from torchtitan (see ``_force_cpu_device``).
"""

from __future__ import annotations

import os

# --------------------------------------------------------------------------
# DEVIATION (1), CUDA-only: torchtitan.tools.utils computes
#     device_type = torch._utils._get_available_device_type() or "cuda"
# at import time, so on a machine without an accelerator every module that
# does ``from torchtitan.tools.utils import device_type, device_module``
# (parallel_dims.build_mesh, distributed.utils.init_distributed, the Trainer,
# the token dispatcher, metrics) would target CUDA/NCCL.  We make the
# detection answer "cpu" while torchtitan.tools.utils is first imported, so
# torchtitan binds device_type="cpu", device_module=torch.cpu and picks the
# "gloo" backend (torch.distributed.Backend.default_device_backend_map["cpu"]).
# --------------------------------------------------------------------------
import torch
import torch._utils as _torch_utils


def _force_cpu_device() -> None:
    import sys

    if "torchtitan.tools.utils" in sys.modules:
        import torchtitan.tools.utils as tu

        assert tu.device_type == "cpu", (
            "titan_harness must be imported before torchtitan "
            f"(torchtitan already bound device_type={tu.device_type!r})"
        )
        return
    orig = _torch_utils._get_available_device_type
    _torch_utils._get_available_device_type = lambda: "cpu"
    try:
        import torchtitan.tools.utils  # noqa: F401  (binds device_type="cpu")
    finally:
        _torch_utils._get_available_device_type = orig


_force_cpu_device()

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import torch.distributed as dist  # noqa: E402
from torch.distributed.checkpoint.stateful import Stateful  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402
from torch.distributed.tensor import DTensor, distribute_tensor  # noqa: E402
from torch.utils.data import IterableDataset  # noqa: E402

from torchtitan.components.checkpoint import CheckpointManager, ModelWrapper  # noqa: E402
from torchtitan.components.dataloader import ParallelAwareDataloader  # noqa: E402
from torchtitan.components.loss import (  # noqa: E402
    ChunkedLossWrapper,
    CrossEntropyLoss,
    IGNORE_INDEX,
)
from torchtitan.components.optimizer import (  # noqa: E402
    default_adamw,
    LRSchedulersContainer,
)
from torchtitan.config import (  # noqa: E402
    DebugConfig,
    ParallelismConfig,
    TORCH_DTYPE_MAP,
    TrainingConfig,
)
from torchtitan.distributed import ParallelDims  # noqa: E402
from torchtitan.distributed import utils as dist_utils  # noqa: E402
from torchtitan.distributed.activation_checkpoint import SelectiveAC  # noqa: E402
from torchtitan.models.common import (  # noqa: E402
    ComplexRoPE,
    CosSinRoPE,
    Embedding,
    Linear,
    RMSNorm,
)
from torchtitan.models.common.attention import (  # noqa: E402
    FlexAttention,
    ScaledDotProductAttention,
    VarlenAttention,
)
from torchtitan.models.common.config_utils import decoder_vocab_size  # noqa: E402
from torchtitan.tools import utils as tt_utils  # noqa: E402
from torchtitan.trainer import Trainer  # noqa: E402

FLAVORS = ("llama3", "llama3-unfused", "qwen3", "qwen3-moe")
# DEVIATION (6), torch 2.13: torchtitan 0.3.0 defaults to
# parallelism.spmd_backend="spmd_types", which hands FSDP2 plain tensors that
# carry spmd_types annotations and relies on torch's fully_shard to turn them
# into DTensors (pytorch #181519, first released in torch 2.14).  torch 2.13.0's
# fully_shard raises "When dp_mesh_dims is provided, all parameters must be
# DTensors on the full SPMD mesh ... Got plain tensor for parameter 'weight'" as
# soon as the FSDP degree is > 1 (at 1 rank torchtitan passes no dp_mesh_dims
# and it works).  With torch 2.13 we therefore select torchtitan's other
# supported backend, "partial_dtensor" (DTensor only on model-parallel axes,
# classic FSDP2 on the "fsdp" mesh).  Override with TITAN_SPMD_BACKEND.
SPMD_BACKEND = os.environ.get(
    "TITAN_SPMD_BACKEND",
    "spmd_types" if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)
    else "partial_dtensor",
)

# Tiny model sizes shared by all flavours.
DIM = 64
N_LAYERS = 2
N_HEADS = 4
N_KV_HEADS = 2
HEAD_DIM = DIM // N_HEADS  # 16
VOCAB = 256  # byte tokens
FFN_HIDDEN = 128
MOE_EXPERTS = 4
MOE_TOP_K = 2
MOE_HIDDEN = 128

# Training shape: ChunkedLossWrapper (stock) needs seq_len % num_chunks == 0.
SEQ_LEN = 32
LOCAL_BATCH = 2
LR = 8e-4  # stock debugmodel lr
INIT_SEED = 42
DATA_SEED = 1234
PROBE_SHAPE = (2, 16)
PROBE_SEED = 4321


# ----------------------------------------------------------------------------
# Model configs, built with torchtitan's own layer builders and init tables.
# ----------------------------------------------------------------------------
def model_config(flavor: str):
    """Return (torchtitan ModelSpec, json-able description of the args)."""
    if flavor in ("llama3", "llama3-unfused"):
        from torchtitan.models import llama3 as L

        fuse = flavor == "llama3"
        rope = ComplexRoPE.Config(
            dim=HEAD_DIM,
            max_seq_len=SEQ_LEN,
            theta=500000,
            scaling="llama",  # same as every stock llama3 flavour
        )
        cfg = L.Llama3Model.Config(
            dim=DIM,
            vocab_size=VOCAB,
            tok_embeddings=Embedding.Config(
                num_embeddings=VOCAB, embedding_dim=DIM, param_init=L._EMBEDDING_INIT
            ),
            norm=RMSNorm.Config(normalized_shape=DIM, param_init=L._NORM_INIT),
            lm_head=Linear.Config(
                in_features=DIM,
                out_features=VOCAB,
                param_init=L._output_linear_init(DIM),
            ),
            layers=L._build_llama3_layers(
                n_layers=N_LAYERS,
                dim=DIM,
                n_heads=N_HEADS,
                n_kv_heads=N_KV_HEADS,
                hidden_dim=FFN_HIDDEN,
                rope=rope,
                fuse_qkv=fuse,
                attn_backend="flex",  # stock default (sdpa is rejected for LMs)
            ),
        )
        spec = dataclasses.replace(L.model_registry("debugmodel"), model=cfg)
        spec.flavor = f"tiny-{flavor}"
    elif flavor in ("qwen3", "qwen3-moe"):
        from torchtitan.models import qwen3 as Q

        rope = CosSinRoPE.Config(dim=HEAD_DIM, max_seq_len=SEQ_LEN, theta=1000000.0)
        common = dict(
            n_layers=N_LAYERS,
            dim=DIM,
            n_heads=N_HEADS,
            n_kv_heads=N_KV_HEADS,
            head_dim=HEAD_DIM,
            fuse_qkv=True,  # stock qwen3 setting
            attn_backend="flex",
            rope=rope,
        )
        if flavor == "qwen3":
            layers = Q._build_qwen3_layers(hidden_dim=FFN_HIDDEN, **common)
        else:
            layers = Q._build_qwen3_moe_layers(
                moe_hidden_dim=MOE_HIDDEN,
                num_experts=MOE_EXPERTS,
                top_k=MOE_TOP_K,
                moe_comm_backend="standard",  # EP=1 -> local dispatch
                **common,
            )
        cfg = Q.Qwen3Model.Config(
            vocab_size=VOCAB,
            dim=DIM,
            norm=Q._qwen3_norm(DIM),
            enable_weight_tying=False,  # HF config says tie_word_embeddings=false
            tok_embeddings=Embedding.Config(
                num_embeddings=VOCAB, embedding_dim=DIM, param_init=Q._EMBEDDING_INIT
            ),
            lm_head=Linear.Config(
                in_features=DIM, out_features=VOCAB, param_init=Q._LINEAR_INIT
            ),
            layers=layers,
        )
        base = "debugmodel" if flavor == "qwen3" else "debugmodel_moe"
        spec = dataclasses.replace(Q.model_registry(base), model=cfg)
        spec.flavor = f"tiny-{flavor}"
    else:
        raise ValueError(f"unknown flavor {flavor!r}; choose from {FLAVORS}")
    return spec


def describe_model_args(spec) -> dict:
    """JSON description of the torchtitan model config (flavor.json)."""

    def default(o):
        if callable(o):
            return getattr(o, "__qualname__", None) or repr(o)
        return repr(o)

    return json.loads(json.dumps(spec.model.to_dict(), default=default))


def hf_config(flavor: str) -> dict:
    """A Hugging Face style config.json describing the same model."""
    cfg: dict[str, Any] = {
        "hidden_size": DIM,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": N_HEADS,
        "num_key_value_heads": N_KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "max_position_embeddings": SEQ_LEN,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if flavor.startswith("llama3"):
        cfg.update(
            model_type="llama",
            architectures=["LlamaForCausalLM"],
            intermediate_size=FFN_HIDDEN,
            rms_norm_eps=1e-5,  # torchtitan RMSNorm.Config default eps
            rope_theta=500000.0,
            # torchtitan ComplexRoPE scaling="llama" with its defaults
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            mlp_bias=False,
            pretraining_tp=1,
            bos_token_id=None,
            eos_token_id=None,
        )
    elif flavor == "qwen3":
        cfg.update(
            model_type="qwen3",
            architectures=["Qwen3ForCausalLM"],
            intermediate_size=FFN_HIDDEN,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            rope_scaling=None,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=N_LAYERS,
        )
    else:  # qwen3-moe
        cfg.update(
            model_type="qwen3_moe",
            architectures=["Qwen3MoeForCausalLM"],
            intermediate_size=FFN_HIDDEN,  # unused: every layer is sparse
            moe_intermediate_size=MOE_HIDDEN,
            num_experts=MOE_EXPERTS,
            num_local_experts=MOE_EXPERTS,     # transformers 5 saves the count under this name
            num_experts_per_tok=MOE_TOP_K,
            norm_topk_prob=True,  # torchtitan router route_norm=True
            decoder_sparse_step=1,
            mlp_only_layers=[],
            output_router_logits=False,
            router_aux_loss_coef=0.001,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            rope_scaling=None,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=N_LAYERS,
        )
    return cfg


def use_sdpa(spec) -> None:
    """DEVIATION (4), CPU-only: swap the inner attention for SDPA.

    The stock LM backends are "flex" (torch.compile'd flex_attention),
    "flex_flash" and "varlen" (CUDA flash kernels).  flex_attention runs
    forward on CPU but raises "FlexAttention does not support backward on CPU",
    so we use torchtitan's own ScaledDotProductAttention (causal) module, the
    maskless backend the Trainer already supports (no attention_masks are
    built for it).  Every sample is a single document (positions 0..L-1), so
    causal SDPA computes exactly what block-causal flex would.  The inner
    attention has no parameters or state: checkpoints are unaffected.
    """
    for layer in spec.model.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()


def trainer_config(flavor: str, *, steps: int, dump_folder: str, ckpt: dict) -> Trainer.Config:
    """A torchtitan Trainer.Config, patterned on the stock ``*_debugmodel`` ones."""
    spec = model_config(flavor)
    use_sdpa(spec)
    return Trainer.Config(
        model_spec=spec,
        dump_folder=dump_folder,
        loss=ChunkedLossWrapper.Config(
            loss_fn=CrossEntropyLoss.Config(global_vocab_size=decoder_vocab_size(spec)),
        ),
        optimizer=default_adamw(lr=LR),
        # stock debugmodel schedule, but over a fixed 100-step horizon so that the
        # lr is the same function of the step in make_ckpt and check_load (and
        # never 0 at step 3, as it would be with total_steps=training.steps=3).
        lr_scheduler=LRSchedulersContainer.Config(
            warmup_steps=2,
            decay_ratio=0.8,
            decay_type="linear",
            min_lr_factor=0.0,
            total_steps=100,
        ),
        training=TrainingConfig(
            local_batch_size=LOCAL_BATCH,
            seq_len=SEQ_LEN,
            steps=steps,
            # fp32 everywhere (stock default casts FSDP params to bf16).
            mixed_precision_param="float32",
            mixed_precision_reduce="float32",
            # DEVIATION (2), CUDA-only: CUDA graph capture of fwd/bwd.
            disable_cuda_graphs=True,
        ),
        parallelism=ParallelismConfig(spmd_backend=SPMD_BACKEND),
        checkpoint=CheckpointManager.Config(enable=True, **ckpt),
        activation_checkpoint=SelectiveAC.Config(),  # stock debugmodel setting
        # fixed seed (--debug.seed) so a fixture is reproducible for a given W
        debug=DebugConfig(seed=INIT_SEED),
    )


# ----------------------------------------------------------------------------
# Data: random byte tokens, in torchtitan's dataloader format
# ({"input": ids, "positions": pos}, labels), through torchtitan's own
# ParallelAwareDataloader (a torchdata StatefulDataLoader) so the checkpoint's
# "dataloader" entry is the real thing.
# ----------------------------------------------------------------------------
class RandomBytesDataset(IterableDataset, Stateful):
    def __init__(self, seq_len: int, dp_rank: int, seed: int = DATA_SEED):
        self.seq_len, self.dp_rank, self.seed = seq_len, dp_rank, seed
        self.sample_idx = 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(
                self.seed + 1_000_003 * self.dp_rank + self.sample_idx
            )
            self.sample_idx += 1
            tok = torch.randint(0, VOCAB, (self.seq_len + 1,), generator=g)
            # one document per sample: positions 0..L-1 (block-causal == causal)
            yield {
                "input": tok[:-1],
                "positions": torch.arange(self.seq_len),
            }, tok[1:]

    def state_dict(self):
        return {"sample_idx": self.sample_idx}

    def load_state_dict(self, sd):
        self.sample_idx = sd["sample_idx"]


class RandomBytesDataLoader(ParallelAwareDataloader):
    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        dataset: str = "random_bytes"

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        tokenizer=None,
        seq_len: int,
        local_batch_size: int,
        snapshot_every_n_steps: int | None = 1,
    ):
        super().__init__(
            RandomBytesDataset(seq_len, dp_rank),
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            batch_size=local_batch_size,
            num_workers=0,
            snapshot_every_n_steps=snapshot_every_n_steps,
        )


class TrainState(Stateful):
    """Same state as ``Trainer.state_dict`` (saved under key "train_state")."""

    def __init__(self):
        self.step = 0
        self.ntokens_seen = 0

    def state_dict(self):
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, sd):
        self.step = sd["step"]
        self.ntokens_seen = sd["ntokens_seen"]


# ----------------------------------------------------------------------------
# The Trainer, replayed.
# ----------------------------------------------------------------------------
class Harness:
    """Replays ``torchtitan.trainer.Trainer.__init__`` on CPU/gloo."""

    def __init__(self, config: Trainer.Config):
        self.config = config
        spec = config.model_spec

        # Trainer: self.device = utils.get_local_device(); device_module.set_device()
        # (with the cpu patch this is torch.device("cpu", 0) and torch.cpu.set_device)
        self.device = tt_utils.get_local_device()
        tt_utils.device_module.set_device(self.device)

        # Trainer.init_distributed(): dist_utils.init_distributed picks "gloo"
        # for device_type "cpu"; then ParallelDims.from_config.
        world_size = dist_utils.init_distributed(
            config.comm,
            enable_cpu_backend=config.training.enable_cpu_offload,
            base_folder=config.dump_folder,
        )
        self.parallel_dims = pd = ParallelDims.from_config(config.parallelism, world_size)
        dist_utils.set_spmd_backend(config.parallelism.spmd_backend)

        if pd.dp_enabled:
            batch_mesh = pd.get_mesh("batch")
            batch_degree, batch_rank = batch_mesh.size(), batch_mesh.get_local_rank()
        else:
            batch_degree, batch_rank = 1, 0
        self.batch_degree, self.batch_rank = batch_degree, batch_rank

        dist_utils.set_determinism(
            pd, self.device, config.debug, distinct_seed_mesh_dims=["pp"]
        )

        model_config = spec.model
        model_config.update_from_config(config=config)
        self.model_config = model_config

        with torch.device("meta"), tt_utils.set_default_dtype(
            TORCH_DTYPE_MAP[config.training.dtype]
        ):
            model = model_config.build()
        model.verify_module_protocol()

        # DEVIATION (3), CUDA-only: MetricsProcessor (device memory monitor,
        # peak-FLOPs lookup via lspci/nvidia) is not built; losses are returned
        # from train_step instead of being logged.

        # Trainer: init_device = device_type ("cpu" here), buffer_device None.
        init_device = tt_utils.device_type
        self.loss_fn = config.loss.build(compile_config=config.compile)

        global_batch_size = config.training.global_batch_size
        if global_batch_size < 0:
            global_batch_size = config.training.local_batch_size * batch_degree
        self.gradient_accumulation_steps = global_batch_size // (
            config.training.local_batch_size * batch_degree
        )
        assert not pd.pp_enabled, "harness does not do pipeline parallelism"

        model = spec.parallelize_fn(
            model,
            parallel_dims=pd,
            training=config.training,
            parallelism=config.parallelism,
            compile_config=config.compile,
            ac_config=config.activation_checkpoint,
            dump_folder=config.dump_folder,
        )
        # DEVIATION (5), gloo-only: torchtitan's apply_fsdp_to_decoder calls
        # set_gradient_divide_factor(1.0) (it normalises by the global token
        # count itself); FSDP2 then reduce-scatters with ReduceOp.PREMUL_SUM(1.0),
        # which gloo rejects ("Cannot use ReduceOp.PREMUL_SUM with Gloo").  Forcing
        # SUM-only collectives (torch's own FSDPModule API) makes FSDP post-multiply
        # by the same factor 1.0 instead: numerically identical.
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_force_sum_reduction_for_comms(True)

        model.to_empty(device=init_device)
        with torch.no_grad():
            model.init_weights(buffer_device=None)
        model.train()
        self.model_parts = [model]

        # ChunkedLossWrapper: lm_head applied inside the loss.
        if isinstance(self.loss_fn, ChunkedLossWrapper):
            self.loss_fn.set_lm_head(model.lm_head)
            model._skip_lm_head = True

        self.optimizers = config.optimizer.build(model_parts=self.model_parts)
        if spec.post_optimizer_build_fn is not None:  # MoE expert-bias hook
            spec.post_optimizer_build_fn(self.optimizers, self.model_parts, pd)
        self.lr_schedulers = config.lr_scheduler.build(
            optimizers=self.optimizers, training_steps=config.training.steps
        )

        self.train_state = TrainState()

        # DEVIATION (7), no hub access: no tokenizer (byte tokens need none) and our
        # RandomBytesDataLoader instead of HuggingFaceTextDataLoader("c4_test").
        self.dataloader = RandomBytesDataLoader.Config().build(
            dp_world_size=batch_degree,
            dp_rank=batch_rank,
            seq_len=config.training.seq_len,
            local_batch_size=config.training.local_batch_size,
            snapshot_every_n_steps=(
                config.checkpoint.interval * self.gradient_accumulation_steps
                if config.checkpoint.enable
                else None
            ),
        )

        # DEVIATION (8): states={"train_state": TrainState()} instead of the Trainer
        # object itself; TrainState.state_dict is Trainer.state_dict verbatim.
        self.checkpointer = config.checkpoint.build(
            dataloader=self.dataloader,
            model_parts=self.model_parts,
            optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers,
            states={"train_state": self.train_state},
            sd_adapter=(
                spec.state_dict_adapter(model_config, config.hf_assets_path)
                if spec.state_dict_adapter
                else None
            ),
            base_folder=config.dump_folder,
        )
        self.train_context = dist_utils.get_spmd_context(
            parallel_dims=pd,
            spmd_typechecking=(
                config.parallelism.spmd_backend == "spmd_types"
                and config.debug.spmd_typechecking
            ),
        )
        self._data_iter = None

    # ---------------------------------------------------------------- training
    @property
    def model(self):
        return self.model_parts[0]

    def _post_dataloading_process(self, input_dict, labels):
        # Trainer.post_dataloading_process (no CP, spmd_types backend)
        from torchtitan.distributed.spmd_types import annotate_input_spmd_types

        inputs = input_dict["input"]
        extra = {k: v for k, v in input_dict.items() if k != "input"}
        masks = self._attention_masks(extra["positions"])
        if masks is not None:
            extra["attention_masks"] = masks
        self.train_state.ntokens_seen += labels.numel()
        if self.config.parallelism.spmd_backend == "spmd_types":
            inputs, labels, extra = annotate_input_spmd_types(
                self.parallel_dims, inputs, labels, extra
            )
        return inputs, labels, extra

    def _attention_masks(self, positions):
        # Trainer: masks only for the masked backends (Flex/Varlen).
        inner = getattr(self.model_config.first_attention, "inner_attention", None)
        if isinstance(inner, (FlexAttention.Config, VarlenAttention.Config)):
            return self.model.get_attention_masks(positions=positions)
        return None

    def train_step(self) -> float:
        """Trainer.train() loop body + Trainer.train_step; returns global avg loss."""
        import spmd_types as spmd

        if self._data_iter is None:
            self._data_iter = iter(self.dataloader)
        self.train_state.step += 1
        pd = self.parallel_dims
        self.optimizers.zero_grad(set_to_none=self.config.training.disable_cuda_graphs)

        local_valid_tokens = torch.tensor(0, dtype=torch.int64)
        batches = []
        for _ in range(self.gradient_accumulation_steps):
            input_dict, labels = next(self._data_iter)
            local_valid_tokens += (labels != IGNORE_INDEX).sum()
            batches.append((input_dict, labels))
        if pd.dp_enabled:
            global_valid_tokens = dist_utils.dist_sum_tensor(
                local_valid_tokens.to(self.device), pd.get_mesh("batch")
            )
        else:
            global_valid_tokens = local_valid_tokens.to(self.device)

        accumulated = None
        for input_dict, labels in batches:
            inputs, labels, extra = self._post_dataloading_process(input_dict, labels)
            with self.train_context():
                pred = self.model(inputs, **extra)
                loss, _ = self.loss_fn(
                    pred, labels, global_valid_tokens, positions=extra["positions"]
                )
                del pred
                with spmd.no_typecheck():
                    loss.backward()
            loss = loss.detach()
            accumulated = loss.clone() if accumulated is None else accumulated + loss

        dist_utils.clip_grad_norm_(
            [p for m in self.model_parts for p in m.parameters()],
            self.config.training.max_norm,
            foreach=True,
            pp_mesh=pd.get_optional_mesh("pp"),
            ep_enabled=pd.ep_enabled,
        )
        self.checkpointer.maybe_wait_for_staging()
        self.optimizers.step()
        self.lr_schedulers.step()

        if pd.dp_cp_enabled:
            g = dist_utils.dist_sum(accumulated, pd.get_optional_mesh("loss"))
        else:
            g = float(accumulated.item())
        if not math.isfinite(g):
            raise RuntimeError(f"Loss is not finite ({g}) at step {self.train_state.step}")
        return g

    # ------------------------------------------------------------------ probing
    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """torchtitan's own forward (eval mode) on ``ids``; fp32 logits [B, L, V]."""
        model = self.model
        was_training, skip = model.training, model._skip_lm_head
        model.eval()
        model._skip_lm_head = False
        try:
            pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids).contiguous()
            masks = self._attention_masks(pos)
            with self.train_context():
                out = model(ids, positions=pos, attention_masks=masks)
            if isinstance(out, DTensor):
                out = out.full_tensor()
            return out.detach().float().clone()
        finally:
            model._skip_lm_head = skip
            model.train(was_training)

    def full_weights(self) -> dict[str, torch.Tensor]:
        """Model state dict exactly as the checkpointer sees it, as full tensors."""
        sd = ModelWrapper(self.model_parts).state_dict()
        return {k: _full(v) for k, v in sd.items()}

    def full_moments(self) -> dict[str, dict[str, torch.Tensor]]:
        """Optimizer state (FQN keyed, as OptimizersContainer saves it), full tensors."""
        flat = self.optimizers.state_dict()
        out: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in flat.items():
            m = re.match(r"state\.(.+)\.(exp_avg|exp_avg_sq|step)$", k)
            if m:
                out.setdefault(m.group(1), {})[m.group(2)] = _full(v)
        return out


def _full(v):
    if isinstance(v, DTensor):
        return v.full_tensor().detach().clone()
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    return v


def set_full_(p: torch.Tensor, new_full: torch.Tensor) -> None:
    """Write a full (global) tensor into a possibly FSDP-sharded parameter."""
    with torch.no_grad():
        if isinstance(p, DTensor):
            d = distribute_tensor(
                new_full.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None
            )
            p.to_local().copy_(d.to_local())
        else:
            p.copy_(new_full)


def versions() -> dict:
    from importlib.metadata import version

    out = {}
    for pkg in ("torch", "torchtitan", "triton", "spmd_types", "torchdata"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # pragma: no cover - optional package
            out[pkg] = None
    return out


def probe_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(0, VOCAB, PROBE_SHAPE, generator=g)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def log(*a):
    if rank() == 0:
        print("[harness]", *a, flush=True)


def exit_without_destructors() -> None:
    """DEVIATION: leave without running C++ destructors. Everything is written and the process
    group is destroyed by then, but a thread left behind (torchtitan's checkpointer or torch's
    process-group machinery) made one rank abort at exit ("terminate called without an active
    exception", SIGABRT) once in about 15 two-rank runs here."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
