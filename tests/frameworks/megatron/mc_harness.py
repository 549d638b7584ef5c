"""Megatron-core torch_dist checkpoint harness (CPU, gloo; megatron-core 0.15.x and 0.19.x).

Uses megatron-core's OWN classes to write real Megatron checkpoints and to load
them back (resume), replaying what Megatron-LM's ``training.get_model``,
``train_step``, ``save_checkpoint`` and ``load_checkpoint`` do for
``--ckpt-format torch_dist``:

  model      GPTModel(get_gpt_layer_local_spec()) [-> Float16Module if bf16]
             -> megatron DistributedDataParallel (Megatron-LM always wraps)
             --moe sequential: get_gpt_layer_local_spec(num_experts=4, ...): every MLP
             is a MoELayer (TopKRouter top-2, SequentialMLP experts of width 48,
             allgather dispatcher, dropless, no aux loss), EP 1, TP 1 only;
             --moe grouped (moe_grouped_gemm) stops with megatron's reason: no
             grouped-GEMM experts without TE (0.19) / the grouped_gemm package (0.15)
  optimizer  get_megatron_optimizer(OptimizerConfig(optimizer="adam", ...)):
             FP32Optimizer (adam), Float16OptimizerWithFloat16Params (bf16),
             DistributedOptimizer (dist, dist-dp; bf16 params + fp32 masters);
             OptimizerParamScheduler (constant lr / wd)
  training   model.zero_grad_buffer / optimizer.zero_grad /
             get_forward_backward_func()(...) (-> finalize_model_grads) /
             optimizer.step / scheduler.step
  save       {"model": unwrap_model(model).sharded_state_dict(metadata=md),
              "optimizer": optimizer.sharded_state_dict(state_dict, metadata=md),
              "iteration": 3, "checkpoint_version": 3.0 [+ --mlm-extras]}
             dist_checkpointing.save(..., get_default_save_sharded_strategy("torch_dist"),
                                     content_metadata=md without dp_cp_group)
             + ckpt/latest_checkpointed_iteration.txt
  load       load_common_state_dict -> load_content_metadata -> sharded state dict
             with is_loading=True -> dist_checkpointing.load ->
             model.load_state_dict(strict=True) -> optimizer.load_state_dict

md = Megatron-LM's _build_sharded_state_dict_metadata(): for the distributed
optimizer distrib_optim_sharding_type = "fully_reshardable" (what
--dist-ckpt-optim-fully-reshardable gives; resharding over TP/DP works) or, with
--dist-sharding dp_reshardable, Megatron-LM's default (same TP/DP only).

Run (world size = tp, except dist-dp = tp 1 x dp 2):

  OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python -m torch.distributed.run \\
      --standalone --nproc-per-node 2 mc_harness.py make --out DIR --tp 2 --optim bf16
  OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python -m torch.distributed.run \\
      --standalone --nproc-per-node 1 mc_harness.py resume --src DIR/ckpt/iter_0000003 \\
      --other DIR2/ckpt/iter_0000003 --tp 1 --optim bf16 --out RESULT.pt

(use the same --seed for make and resume: it also picks the training batch).

make writes DIR/ckpt/iter_0000003 (+ latest_checkpointed_iteration.txt),
DIR/config.json (HF Llama / Qwen3 config; --moe: Mixtral / Qwen3Moe with
norm_topk_prob true), DIR/probe.pt {"ids", "logits"},
DIR/keys.txt (on-disk layout), DIR/unbalance_multipliers.pt {param: M, W' = M*W}
and DIR/state.pt {"weights", "optimizer", "losses_after_save"} (the saved state in
RESULT.pt's layout, and the losses of 2 uninterrupted steps after the save).

Tensor layouts in RESULT.pt["weights"] / ["optimizer"] (and state.pt) are GLOBAL
(gathered over TP and, for the distributed optimizer, over DP), PER LAYER, keyed by
GPTModel parameter names ("decoder.layers.<i>.self_attention.linear_qkv.weight",
...; optimizer keys "<name>::param|exp_avg|exp_avg_sq", fp32); linear_fc1 rows are
[gate (all I); up (all I)] as megatron's swiglu sharded factory stores them;
linear_qkv rows are, per query group, [R q heads, k, v].  The checkpoint itself
stacks the layers on a leading dim ("decoder.layers.<...>", shape (L, ...)) and, for
the local spec, stores input_layernorm.weight / pre_mlp_layernorm.weight under the
TE names self_attention.linear_qkv.layer_norm_weight / mlp.linear_fc1.layer_norm_weight.

--moe: per-layer names "decoder.layers.<i>.mlp.router.weight" [E, D] and
"decoder.layers.<i>.mlp.experts.local_experts.<e>.linear_fc1.weight" [gate; up] /
".linear_fc2.weight".  The checkpoint stacks experts on a second leading dim:
decoder.layers.mlp.experts.experts.linear_fc1.weight (L, E, 2*I_moe, D) (gate and up
halves saved as separate chunks), ...linear_fc2.weight (L, E, D, I_moe),
decoder.layers.mlp.router.weight (L, E, D); pre_mlp_layernorm is still saved as
decoder.layers.mlp.linear_fc1.layer_norm_weight although a MoE layer has no
mlp.linear_fc1.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

# ==========================================================================
# CPU SHIMS (the smallest set found necessary; none changes numerics or the
# checkpoint format).  Everything else uses megatron's own CPU paths:
# use_cpu_initialization=True, gloo process groups, an explicit attention mask
# (megatron's default causal mask is built with device="cuda").
# ==========================================================================


class _NullStream:
    """Stands in for torch.cuda.Stream: on CPU all work is synchronous."""

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def synchronize(self):
        pass


# (S1) megatron allocates DDP grad/param buffers on torch.cuda.current_device();
#      on CPU they must live on "cpu".
torch.cuda.current_device = lambda: torch.device("cpu")
# (S2) DDP's finish_grad_sync waits on cudagraph events via torch.cuda.current_stream();
#      CPU execution is synchronous, a no-op stream is exact.
torch.cuda.current_stream = lambda device=None: _NullStream()
# (S5) torch_dist save's preload of the write buckets ends with torch.cuda.synchronize()
#      after its non-blocking .to("cpu") copies; CPU copies are already complete.
torch.cuda.synchronize = lambda device=None: None


def _is_cuda_device(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.startswith("cuda")
    return isinstance(d, int) and not isinstance(d, bool)


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """(S3) megatron's optimizer/clip_grads/schedules/grad-buffer code creates
    small bookkeeping tensors with a hard-coded device="cuda" (found_inf, loss
    scale, grad-norm accumulators, token counts) and moves state with .cuda();
    this redirects exactly those device requests to the CPU.  It also answers
    megatron's dtype checks ``param.type() in ['torch.cuda.BFloat16Tensor', ...]``
    (Float16Optimizer, DistributedOptimizer, clip_grads) with the CUDA type name
    of the same dtype.  Values, dtypes and shapes are untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


_CudaToCpuMode().__enter__()  # active for the whole process

_FAKE_CUDA_GEN = torch.Generator()  # stands in for the (absent) CUDA default generator


def _install_cpu_rng_tracker(seed: int) -> None:
    """(S4) replaces tensor_parallel.model_parallel_cuda_manual_seed: megatron's
    CudaRNGStatesTracker stores CUDA generator states; on CPU we keep the same
    named states (same seeds) in a CPU generator.  The tracker's fork() is only
    entered around dropout, which is p=0 here, so this never touches numerics."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: _FAKE_CUDA_GEN.get_state()
    mrandom._set_cuda_rng_state = lambda new_state, *a, **k: _FAKE_CUDA_GEN.set_state(new_state)
    tracker = mrandom.get_cuda_rng_tracker()  # a plain CudaRNGStatesTracker
    tracker.reset()
    tp_rank = ps.get_tensor_model_parallel_rank()
    names_seeds = [
        (mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed),
        (mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank),
        (mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024),
    ]
    tracker.set_states({n: torch.Generator().manual_seed(s).get_state() for n, s in names_seeds})
    tracker.seeds_.update(s for _, s in names_seeds)
    _FAKE_CUDA_GEN.manual_seed(seed)


def _patch_distopt_torch_adam_step() -> None:
    """(S6) DistributedOptimizer._set_main_param_and_optimizer_states (every
    DistOpt checkpoint load path) copies checkpoint tensors into EVERY tensor of
    the inner optimizer's per-param state; torch's AdamW (what megatron falls back
    to without Apex/TE, i.e. on CPU) keeps a tensor "step" there, which the
    checkpoint tensors deliberately omit ("Handle torch Adam 'step' state
    separately") -> KeyError 'step' (fully_reshardable, fully_sharded_model_space);
    dp_reshardable instead hands over the live, never-loaded per-param "step" and
    would overwrite the loaded step.  We keep "step" out of that copy only; megatron
    sets it from the checkpoint's param_groups in DistributedOptimizer.load_state_dict.
    With TE/Apex FusedAdam (GPU) "step" is not per-param state and this never arises."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as DO

    orig = DO._set_main_param_and_optimizer_states
    if getattr(orig, "_mc_harness_patched", False):
        return

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        gi, go = self.model_param_group_index_map[model_param]
        state = self.optimizer.state.get(self.optimizer.param_groups[gi]["params"][go], {})
        step = state.pop("step", None)
        # dp_reshardable hands over the live (not loaded) per-param "step" too: never copy it
        tensors = {k: v for k, v in tensors.items() if k != "step"}
        try:
            return orig(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    _set_main_param_and_optimizer_states._mc_harness_patched = True
    DO._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states


def _unshare_torch_adam_steps(optimizer) -> None:
    """(S7) DistributedOptimizer.load_state_dict (non-Apex/TE branch) assigns ONE
    ``step`` tensor object to every param's torch-Adam state, and torch's
    Optimizer.load_state_dict keeps 'step' uncopied; torch AdamW then increments
    that shared tensor once per param per step (foreach ``_foreach_add_``), so from
    the 2nd resumed step on the bias correction uses a wrong step count.  We give
    each param its own copy of the (identical) loaded value right after the load.
    Again only the CPU/torch-Adam fallback is affected (FusedAdam keeps 'step' in
    param_groups)."""
    from megatron.core.optimizer import distrib_optimizer as do_mod

    if getattr(do_mod, "HAVE_APEX_OR_TE", True):
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, do_mod.DistributedOptimizer):
            for st in opt.optimizer.state.values():
                if isinstance(st.get("step"), torch.Tensor):
                    st["step"] = st["step"].clone()


# (S8) megatron-core 0.15.x MoE without TE: moe_utils never defines te_general_gemm, so the
#      router raises NameError; defining it as None selects megatron's own torch.mm path.
def _define_missing_te_general_gemm() -> None:
    """(S8) --moe on megatron-core 0.15.x only: its transformer/moe/moe_utils.py imports
    te_general_gemm inside ``try: import transformer_engine`` and never defines the name
    when TE is absent, so the router's RouterGatingLinearFunction raises
    ``NameError: name 'te_general_gemm' is not defined`` at its
    ``if te_general_gemm is not None`` check.  Defining it as None (what 0.19's
    moe_utils does without TE) selects megatron's own torch.mm router path; nothing
    is replaced where the name exists."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# ==========================================================================
# end of CPU SHIMS
# ==========================================================================

import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import megatron.core  # noqa: E402
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402
from megatron.core.dist_checkpointing.serialization import (  # noqa: E402
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.module import Float16Module  # noqa: E402
from megatron.core.utils import unwrap_model  # noqa: E402

MC_VERSION = megatron.core.__version__
_patch_distopt_torch_adam_step()  # (S6), see above
_define_missing_te_general_gemm()  # (S8), see above

# ---------------------------------------------------------------- model shape
HIDDEN = 64
HEADS = 4
GROUPS = 2
HEAD_DIM = 16
FFN = 96
VOCAB = 128
SEQ = 16
MBS = 2
EPS = 1e-5
ROPE_BASE = 10000
TRAIN_STEPS = 3
RESUME_STEPS = 2
# --moe: every layer's MLP is a MoELayer (router + experts), expert parallelism 1
MOE_EXPERTS = 4
MOE_TOPK = 2
MOE_FFN = 48


def log(*a):
    if dist.get_rank() == 0:
        print("[mc_harness]", *a, flush=True)


# ================================================================== setup


def init_dist(tp: int, optim: str, cmd: str) -> None:
    """World = TP x DP (DP = world // tp).  make: world = tp, except dist-dp (TP 1 x DP 2,
    so the DistributedOptimizer really shards).  resume: any world divisible by tp
    (dist-dp then simply means the DistributedOptimizer over whatever DP there is)."""
    dist.init_process_group(backend="gloo")
    ws = dist.get_world_size()
    assert ws % tp == 0, f"world size {ws} is not a multiple of --tp {tp}"
    if cmd == "make" and optim == "dist-dp":
        assert ws // tp >= 2, f"make --optim dist-dp needs DP >= 2 (world {ws}, tp {tp})"
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)


DIST_MODES = ("dist", "dist-dp", "dist-dp-buckets")


def is_bf16(optim: str) -> bool:
    return optim == "bf16" or optim in DIST_MODES


def is_dist(optim: str) -> bool:
    return optim in DIST_MODES


def dist_sharding_of(a) -> str:
    """dist-dp-buckets = the DistributedOptimizer saved with Megatron-LM's default
    distrib_optim_sharding_type dp_reshardable (per-bucket flat tensors)."""
    return "dp_reshardable" if a.optim == "dist-dp-buckets" else a.dist_sharding


MOE_TP_ERROR = (
    "--moe needs --tp 1 here: megatron's MoELayer refuses to train at TP > 1 without "
    "sequence parallelism (ValueError: During training, performance may degrade if MoE and "
    "tensor parallelismare enabled without also enabling sequence parallelism.), and "
    "sequence parallelism needs Apex or Transformer Engine norms: the local spec's torch "
    "norm asserts 'sequence parallel not supported by torch LayerNorm'"
)


def moe_config_kwargs(moe) -> dict:
    """TransformerConfig fields for --moe: dropless top-2 softmax routing without any
    load-balancing loss, bias or jitter (a deterministic forward), megatron's
    allgather token dispatcher (plain torch permute / all-gather, runs on CPU).
    TP 1 only (see MOE_TP_ERROR)."""
    if not moe:
        return {}
    return dict(
        num_moe_experts=MOE_EXPERTS,
        moe_router_topk=MOE_TOPK,
        moe_ffn_hidden_size=MOE_FFN,
        moe_grouped_gemm=(moe == "grouped"),
        moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=None,
        moe_input_jitter_eps=None,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=False,  # top-k of the logits, softmax over those k
        moe_router_topk_scaling_factor=None,
        moe_router_enable_expert_bias=False,
        moe_expert_capacity_factor=None,  # dropless
        moe_permute_fusion=False,
        moe_router_fusion=False,
    )


def make_config(tp: int, optim: str, qk_norm: bool, layers: int, moe=None) -> TransformerConfig:
    bf16 = is_bf16(optim)
    kw = dict(
        num_layers=layers,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        kv_channels=HEAD_DIM,
        ffn_hidden_size=FFN,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=EPS,
        add_bias_linear=False,
        qk_layernorm=qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=tp,
        sequence_parallel=False,
        use_cpu_initialization=True,
        # fused kernels need CUDA/apex/TE; these are megatron's unfused torch paths
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
    )
    kw.update(moe_config_kwargs(moe))
    return TransformerConfig(**kw)


def layer_spec(qk_norm: bool, moe=None):
    if not moe:
        return get_gpt_layer_local_spec(qk_layernorm=qk_norm, normalization="RMSNorm")
    return get_gpt_layer_local_spec(
        num_experts=MOE_EXPERTS,
        moe_grouped_gemm=(moe == "grouped"),
        qk_layernorm=qk_norm,
        normalization="RMSNorm",
    )


def check_experts_module(model, moe) -> None:
    """--moe grouped must really get grouped-GEMM experts, not a silent SequentialMLP."""
    kinds = {
        type(m).__name__
        for n, m in unwrap_model(model).named_modules()
        if n.endswith(".mlp.experts")
    }
    log(f"--moe {moe}: experts module {sorted(kinds)}")
    if moe == "grouped" and kinds != {"GroupedMLP"}:
        raise SystemExit(
            f"--moe grouped: megatron-core {MC_VERSION}'s local spec "
            f"get_gpt_layer_local_spec(moe_grouped_gemm=True) built {sorted(kinds)}, not a "
            "grouped-GEMM experts module: this version has no non-TE grouped experts "
            "(LocalSpecProvider.grouped_mlp_modules ignores the flag; the legacy GroupedMLP "
            "is gone and TEGroupedMLP needs Transformer Engine, i.e. CUDA)"
        )


def build(tp: int, optim: str, qk_norm: bool, layers: int, seed: int, moe=None):
    """Megatron-LM get_model() + get_megatron_optimizer(), in that order."""
    torch.manual_seed(seed)  # use_cpu_initialization draws the FULL weights on CPU
    _install_cpu_rng_tracker(seed)
    config = make_config(tp, optim, qk_norm, layers, moe)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(qk_norm, moe),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=ROPE_BASE,
    )
    if moe:
        check_experts_module(model, moe)
    if is_bf16(optim):
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=is_bf16(optim),  # Megatron-LM forces this for --bf16
        overlap_grad_reduce=False,
        use_distributed_optimizer=is_dist(optim),
        check_for_nan_in_grad=True,
    )
    ddp_kwargs = {}
    if is_dist(optim) and hasattr(DistributedOptimizer, "compute_full_param_layout"):
        # megatron-core >= 0.19: Megatron-LM's wrap_model_chunks_with_ddp pre-computes the
        # distributed-optimizer param layout (bucket_size None: overlap_grad_reduce is off)
        ddp_kwargs["full_param_layout"] = DistributedOptimizer.compute_full_param_layout(
            [p for p in model.parameters() if p.requires_grad],
            None,
            parallel_state.get_data_parallel_world_size(with_context_parallel=True),
            ddp_config,
            expert_data_parallel_world_size=parallel_state.get_expert_data_parallel_world_size(),
        )
    model = DistributedDataParallel(
        config=config, ddp_config=ddp_config, module=model, **ddp_kwargs
    )
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=1e-3,
        weight_decay=0.01,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_eps=1e-8,
        clip_grad=1.0,
        bf16=is_bf16(optim),
        params_dtype=torch.bfloat16 if is_bf16(optim) else torch.float32,
        use_distributed_optimizer=is_dist(optim),
    )
    optimizer = get_megatron_optimizer(opt_config, [model])
    # Megatron-LM get_optimizer_param_scheduler(): constant lr, constant wd; it sets
    # each param group's lr = max_lr * lr_mult and weight_decay = wd * wd_mult
    # (so norms get no weight decay), and is stepped after every optimizer step
    sched = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt_config.lr,
        min_lr=0.0,
        lr_warmup_steps=0,
        lr_decay_steps=1000 * MBS,
        lr_decay_style="constant",
        start_wd=opt_config.weight_decay,
        end_wd=opt_config.weight_decay,
        wd_incr_steps=1000 * MBS,
        wd_incr_style="constant",
    )
    # what Megatron-LM's train() sets on the config before the first step
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    return model, optimizer, sched


def unwrap(model):
    return unwrap_model(model)


# ================================================================== data


def causal_mask(s: int) -> torch.Tensor:
    # Megatron-LM get_ltor_masks_and_position_ids: True = masked out
    return torch.triu(torch.ones(1, 1, s, s), diagonal=1).bool()


def train_batch(seed: int):
    g = torch.Generator().manual_seed(10_000 + seed + 7919 * parallel_state.get_data_parallel_rank())
    toks = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
    return {
        "tokens": toks[:, :-1].contiguous(),
        "labels": toks[:, 1:].contiguous(),
        "loss_mask": torch.ones(MBS, SEQ),
        "position_ids": torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ).contiguous(),
        "attention_mask": causal_mask(SEQ),
    }


def probe_ids(seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, SEQ), generator=g)


def forward_step(data_iterator, model):
    b = next(data_iterator)
    out = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])

    def loss_func(loss_mask, output_tensor):
        losses = output_tensor.float().view(-1)
        lm = loss_mask.view(-1).float()
        loss = torch.sum(losses * lm) / lm.sum()
        return loss, {"lm loss": loss.detach().clone()}

    return out, lambda t: loss_func(b["loss_mask"], t)


def train_steps(model, optimizer, sched, n: int, seed: int):
    """Megatron-LM train_step(), n times on the same synthetic batch."""
    fwd_bwd = get_forward_backward_func()
    losses = []
    for _ in range(n):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        batch = train_batch(seed)
        reduced = fwd_bwd(
            forward_step_func=forward_step,
            data_iterator=iter([batch]),
            model=[model],
            num_microbatches=1,
            seq_length=SEQ,
            micro_batch_size=MBS,
            decoder_seq_length=SEQ,
            forward_only=False,
        )
        ok, grad_norm, _ = optimizer.step()
        assert ok, "optimizer step skipped"
        sched.step(increment=MBS * parallel_state.get_data_parallel_world_size())
        loss = reduced[0]["lm loss"].clone()
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        loss /= parallel_state.get_data_parallel_world_size()
        losses.append(float(loss))
        log(f"step loss {float(loss):.6f} grad_norm {float(grad_norm):.6f}")
    return losses


@torch.no_grad()
def probe_logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids).contiguous()
    logits = model(ids, pos, causal_mask(ids.shape[1]))  # [b, s, V/tp]
    model.train()
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits.contiguous())
    return logits.float()


# ================================================================== layouts


def _ranks():
    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


def global_to_local(name: str, t: torch.Tensor) -> torch.Tensor:
    """Slice a tensor in the checkpoint's GLOBAL layout to this TP rank's local shard."""
    r, tp = _ranks()
    if tp == 1:
        return t
    if "linear_fc1.weight" in name:  # [gate; up] -> rank r holds [gate_r; up_r]
        half = t.shape[0] // 2
        n = half // tp
        return torch.cat([t[r * n : (r + 1) * n], t[half + r * n : half + (r + 1) * n]])
    pdim = tp_partition_dim(name)
    if pdim is None:
        return t
    n = t.shape[pdim] // tp
    return t.narrow(pdim, r * n, n)


def tp_partition_dim(name: str):
    if any(k in name for k in ("linear_qkv.weight", "linear_fc1.weight", "word_embeddings.weight", "output_layer.weight")):
        return 0
    if any(k in name for k in ("linear_proj.weight", "linear_fc2.weight")):
        return 1
    return None


def local_to_global(name: str, t: torch.Tensor) -> torch.Tensor:
    """All-gather a TP-local shard into the checkpoint's GLOBAL layout (collective)."""
    r, tp = _ranks()
    pdim = tp_partition_dim(name)
    if tp == 1 or pdim is None:
        return t.clone()
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    if "linear_fc1.weight" in name:
        h = t.shape[0] // 2
        return torch.cat([p[:h] for p in parts] + [p[h:] for p in parts])
    return torch.cat(parts, dim=pdim)


# ================================================================== unbalancing


def unbalance_multipliers(layers: int, qk_norm: bool, seed: int, moe=None):
    """{param name (global layout): M} with W' = M * W; exact powers of two,
    same on all ranks (drawn from a seeded CPU generator).  With --moe the SwiGLU
    pair is unbalanced per expert (expert e's linear_fc1 "up" row j x 2**c_ej, its
    linear_fc2 column j x 2**-c_ej); the router is left alone."""
    g = torch.Generator().manual_seed(seed)
    R = HEADS // GROUPS
    d = HEAD_DIM
    mults = {}
    for li in range(layers):
        pre = f"decoder.layers.{li}."
        qkv = torch.ones((HEADS + 2 * GROUPS) * d, 1)
        proj = torch.ones(1, HEADS * d)
        for gi in range(GROUPS):
            base = gi * (R + 2) * d
            if not qk_norm:
                a = torch.randint(-3, 4, (d // 2,), generator=g).double()
                sa = torch.cat([2.0**a, 2.0**a])  # rotary pair (i, i + d/2)
                for h in range(R):
                    qkv[base + h * d : base + (h + 1) * d, 0] = sa
                qkv[base + R * d : base + (R + 1) * d, 0] = 1.0 / sa
            b = float(torch.randint(-3, 4, (1,), generator=g))
            qkv[base + (R + 1) * d : base + (R + 2) * d, 0] = 2.0**b
            for h in range(gi * R, (gi + 1) * R):
                proj[0, h * d : (h + 1) * d] = 2.0**-b
        mults[pre + "self_attention.linear_qkv.weight"] = qkv
        mults[pre + "self_attention.linear_proj.weight"] = proj
        if moe:
            mlps = [(f"mlp.experts.local_experts.{e}.", MOE_FFN) for e in range(MOE_EXPERTS)]
        else:
            mlps = [("mlp.", FFN)]
        for mlp, ffn in mlps:
            c = torch.randint(-3, 4, (ffn,), generator=g).double()
            fc1 = torch.cat([torch.ones(ffn), 2.0**c]).unsqueeze(1)  # [gate; up] rows
            fc2 = (2.0**-c).unsqueeze(0)
            mults[pre + mlp + "linear_fc1.weight"] = fc1
            mults[pre + mlp + "linear_fc2.weight"] = fc2
    return mults


def named_model_params(model):
    """{state_dict-style name (as in GPTModel.state_dict) : live model param}."""
    return {n: p for n, p in unwrap(model).named_parameters()}


def iter_opts(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def optimizer_views(optimizer, model):
    """For each model param name -> list of (kind, tensor, flat_slice or None):
    the optimizer tensors that live in that param's coordinates.  flat_slice is
    the (start, end) range of the param's flattened LOCAL shard the tensor
    covers (DistributedOptimizer), None = whole param."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import (
        Float16OptimizerWithFloat16Params,
        FP32Optimizer,
    )

    by_id = {id(p): n for n, p in named_model_params(model).items()}
    out = {}

    def add(name, kind, t, sl):
        out.setdefault(name, []).append((kind, t, sl))

    for opt in iter_opts(optimizer):
        st = opt.optimizer.state
        if isinstance(opt, DistributedOptimizer):
            pairs = []
            for mg, sg in zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups):
                pairs += list(zip(mg, sg))
            for mg, sg in zip(opt.model_fp32_groups, opt.shard_fp32_groups):
                pairs += list(zip(mg, sg))
            for mp, sp in pairs:
                rng = opt._get_model_param_range_map(mp)["param"]
                name = by_id[id(mp)]
                sl = (rng.start, rng.end)
                add(name, "param", sp, sl)
                for k in ("exp_avg", "exp_avg_sq"):
                    if sp in st and k in st[sp]:
                        add(name, k, st[sp][k], sl)
        elif isinstance(opt, Float16OptimizerWithFloat16Params):
            for mg, fg in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                for mp, fp in zip(mg, fg):
                    name = by_id[id(mp)]
                    add(name, "param", fp, None)
                    for k in ("exp_avg", "exp_avg_sq"):
                        if fp in st and k in st[fp]:
                            add(name, k, st[fp][k], None)
            for g in opt.fp32_from_fp32_groups:
                for p in g:
                    name = by_id[id(p)]
                    for k in ("exp_avg", "exp_avg_sq"):
                        if p in st and k in st[p]:
                            add(name, k, st[p][k], None)
        elif isinstance(opt, FP32Optimizer):
            for g in opt.optimizer.param_groups:
                for p in g["params"]:
                    name = by_id[id(p)]
                    for k in ("exp_avg", "exp_avg_sq"):
                        if p in st and k in st[p]:
                            add(name, k, st[p][k], None)
        else:
            raise NotImplementedError(type(opt))
    return out


@torch.no_grad()
def apply_unbalance(model, optimizer, mults):
    params = named_model_params(model)
    views = optimizer_views(optimizer, model)
    for name, Mg in mults.items():
        p = params[name]
        M = global_to_local(name, Mg.expand(*global_shape(name, p)))
        p.mul_(M.to(p.dtype))
        for kind, t, sl in views.get(name, []):
            Mk = M.reshape(-1)[sl[0] : sl[1]].view(t.shape) if sl else M.view(t.shape)
            if kind == "param":
                t.mul_(Mk.to(t.dtype))
            elif kind == "exp_avg":
                t.div_(Mk.to(t.dtype))
            elif kind == "exp_avg_sq":
                t.div_((Mk * Mk).to(t.dtype))


def global_shape(name, p):
    _, tp = _ranks()
    shape = list(p.shape)
    pdim = tp_partition_dim(name)
    if pdim is not None:
        shape[pdim] *= tp
    return shape


# ================================================================== checkpoint


def sharded_sd_metadata(optim: str, dist_sharding: str):
    """Megatron-LM checkpointing._build_sharded_state_dict_metadata()."""
    md = {}
    if is_dist(optim):
        md["distrib_optim_sharding_type"] = dist_sharding
        if dist_sharding == "fully_reshardable":
            md["distrib_optim_fully_reshardable_mem_efficient"] = False
    md["singleton_local_shards"] = False
    md["chained_optim_avoid_prefix"] = True
    md["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return md


def mlm_extras(a, sched):
    """The remaining top-level entries of a Megatron-LM torch_dist checkpoint:
    'args' (an argparse.Namespace with Megatron-LM argument names, pickled into the
    common state), 'rng_state' (Megatron-LM get_rng_state(): a ShardedObject of shape
    (pp, tp) replicated over DP), 'opt_param_scheduler', and
    'num_floating_point_operations_so_far'."""
    import random

    import numpy as np
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import random as mrandom

    tp = parallel_state.get_tensor_model_parallel_world_size()
    dp = parallel_state.get_data_parallel_world_size()
    bf16 = is_bf16(a.optim)
    args = argparse.Namespace(
        num_layers=a.layers, hidden_size=HIDDEN, ffn_hidden_size=FFN,
        num_attention_heads=HEADS, group_query_attention=True, num_query_groups=GROUPS,
        kv_channels=HEAD_DIM, max_position_embeddings=SEQ, seq_length=SEQ,
        position_embedding_type="rope", rotary_base=ROPE_BASE, rotary_percent=1.0,
        rotary_interleaved=False, use_rotary_position_embeddings=True,
        normalization="RMSNorm", norm_epsilon=EPS, swiglu=True, add_bias_linear=False,
        add_qkv_bias=False, untie_embeddings_and_output_weights=True,
        qk_layernorm=a.qk_norm, padded_vocab_size=VOCAB, make_vocab_size_divisible_by=VOCAB,
        hidden_dropout=0.0, attention_dropout=0.0, transformer_impl="local",
        params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16, fp16=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
        context_parallel_size=1, expert_model_parallel_size=1, data_parallel_size=dp,
        world_size=dist.get_world_size(), use_distributed_optimizer=is_dist(a.optim),
        ckpt_format="torch_dist", dist_ckpt_optim_fully_reshardable=(
            is_dist(a.optim) and dist_sharding_of(a) == "fully_reshardable"),
        optimizer="adam", lr=1e-3, min_lr=0.0, lr_decay_style="constant",
        weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0,
        micro_batch_size=MBS, global_batch_size=MBS * dp, seed=a.seed,
        iteration=TRAIN_STEPS, consumed_train_samples=TRAIN_STEPS * MBS * dp,
        skipped_train_samples=0, consumed_valid_samples=0,
    )
    if a.moe:
        vars(args).update(
            num_experts=MOE_EXPERTS, moe_router_topk=MOE_TOPK, moe_ffn_hidden_size=MOE_FFN,
            moe_grouped_gemm=(a.moe == "grouped"), moe_token_dispatcher_type="allgather",
            moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
            moe_router_score_function="softmax", moe_router_pre_softmax=False,
            moe_expert_capacity_factor=None, expert_tensor_parallel_size=tp,
        )
    rng_state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": _FAKE_CUDA_GEN.get_state(),  # stand-in for torch.cuda.get_rng_state()
        "rng_tracker_states": mrandom.get_cuda_rng_tracker().get_states(),
    }
    rng = ShardedObject(
        "rng_state",
        [rng_state],
        (1, tp),
        (0, parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )
    return {
        "args": args,
        "rng_state": rng,
        "opt_param_scheduler": sched.state_dict(),
        "num_floating_point_operations_so_far": 0,
    }


def clean_md(md):
    return {k: v for k, v in md.items() if k != "dp_cp_group"}


def generate_state_dict(model, optimizer, md, is_loading: bool, iteration=None, extras=None):
    """Megatron-LM checkpointing.generate_state_dict() (torch_dist branch).
    ``extras``: the other top-level entries Megatron-LM saves (args, rng_state,
    opt_param_scheduler, num_floating_point_operations_so_far), see mlm_extras()."""
    sd = {"checkpoint_version": 3.0}
    if iteration is not None:
        sd["iteration"] = iteration
    if extras:
        sd.update(extras)
    # Megatron-LM calls this on unwrap_model(model): no DDP / Float16Module prefix
    sd["model"] = unwrap_model(model).sharded_state_dict(metadata=md)
    okw = dict(metadata=md)
    if is_loading:
        okw["is_loading"] = True
    sd["optimizer"] = optimizer.sharded_state_dict(sd, **okw)
    return sd


def save_ckpt(model, optimizer, out_dir, optim, dist_sharding, iteration=TRAIN_STEPS, extras=None):
    ckpt_root = os.path.join(out_dir, "ckpt")
    name = os.path.join(ckpt_root, f"iter_{iteration:07d}")
    if dist.get_rank() == 0:
        os.makedirs(name, exist_ok=True)
    dist.barrier()
    md = sharded_sd_metadata(optim, dist_sharding)
    sd = generate_state_dict(
        model, optimizer, md, is_loading=False, iteration=iteration, extras=extras
    )
    dist_checkpointing.save(
        sd,
        name,
        get_default_save_sharded_strategy("torch_dist"),  # TorchDistSaveShardedStrategy
        validate_access_integrity=True,
        content_metadata=clean_md(md),
    )
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(ckpt_root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(iteration))
    dist.barrier()
    return name


def _materialize_distopt_state(optimizer):
    """DEVIATION from Megatron-LM's load path (CPU only, no Apex/TE): without a fused
    Adam, DistributedOptimizer.state_dict() reads the Adam 'step' from the torch
    optimizer's per-param state (``assert len(steps) == 1``), which a freshly built
    optimizer does not have yet, so building the loading sharded state dict would
    fail.  On GPU, TE/Apex FusedAdam keeps 'step' in param_groups and this never
    arises.  We call megatron's own ``_init_optimizer_states_with_dummy_values()``
    (what its fsdp_dtensor load path does for the same reason): a zero-grad inner
    step on the fp32 shard masters only; every value it touches (masters, moments,
    step) is overwritten by the checkpoint load that follows."""
    from megatron.core.optimizer import distrib_optimizer as do_mod

    if getattr(do_mod, "HAVE_APEX_OR_TE", True):
        return
    for opt in iter_opts(optimizer):
        if isinstance(opt, DistributedOptimizer) and len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()


def load_ckpt(model, optimizer, sched, ckpt_dir):
    """Megatron-LM load_checkpoint() for a GLOBAL torch_dist checkpoint."""
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    md = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)
    log(f"content metadata in {ckpt_dir}: {md}")
    md = dict(md or {})
    md["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
    _materialize_distopt_state(optimizer)
    sharded = generate_state_dict(model, optimizer, md, is_loading=True)
    state_dict = dist_checkpointing.load(
        sharded,
        ckpt_dir,
        get_default_load_sharded_strategy(ckpt_dir),  # TorchDistLoadShardedStrategy
        validate_access_integrity=True,
    )
    model.load_state_dict(state_dict["model"], strict=True)
    optimizer.load_state_dict(state_dict["optimizer"])
    _unshare_torch_adam_steps(optimizer)  # (S7)
    if "opt_param_scheduler" in state_dict:  # present with make --mlm-extras
        sched.load_state_dict(state_dict["opt_param_scheduler"])
    return state_dict.get("iteration")


def dump_keys(ckpt_dir, path):
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(ckpt_dir).read_metadata()
    lines = [f"# {ckpt_dir}  megatron-core {MC_VERSION}  torch {torch.__version__}"]
    lines.append(f"# files: {sorted(os.listdir(ckpt_dir))}")
    lines.append(f"# .metadata unpickles to: {type(meta).__module__}.{type(meta).__qualname__}")
    if hasattr(meta, "mcore_data"):
        lines.append(f"# .metadata mcore_data: {meta.mcore_data}")
    mj = os.path.join(ckpt_dir, "metadata.json")
    if os.path.exists(mj):
        with open(mj) as f:
            lines.append(f"# metadata.json: {f.read().strip()}")
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    where = "common.pt" if os.path.exists(os.path.join(ckpt_dir, "common.pt")) else (
        "'common_state' bytes entry inside the .distcp files"
    )
    lines.append(f"# common state ({where}), via dist_checkpointing.load_common_state_dict:")
    for k in sorted(common):
        v = common[k]
        if isinstance(v, argparse.Namespace):
            v = f"argparse.Namespace({len(vars(v))} fields)"
        lines.append(f"#   {k}: {v!r}")
    for key in sorted(meta.state_dict_metadata):
        m = meta.state_dict_metadata[key]
        if hasattr(m, "chunks"):
            chunks = " ".join(f"{tuple(c.offsets)}+{tuple(c.sizes)}" for c in m.chunks)
            lines.append(
                f"{key}\tTensor\t{tuple(m.size)}\t{m.properties.dtype}\tchunks: {chunks}"
            )
        else:
            lines.append(f"{key}\t{type(m).__name__}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def hf_moe_config(qk_norm: bool) -> dict:
    """Hugging Face MoE fields.  megatron's router (score_function softmax,
    moe_router_pre_softmax False, no scaling factor) takes the top-k LOGITS and
    softmaxes over those k only, so a token's k expert weights sum to 1: the same as
    HF's softmax over all experts followed by renormalising the top k, i.e.
    Qwen3Moe's norm_topk_prob=True; Mixtral always renormalises (no such field)."""
    if qk_norm:
        return {
            "model_type": "qwen3_moe",
            "architectures": ["Qwen3MoeForCausalLM"],
            "intermediate_size": FFN,  # dense MLP width: used by no layer (mlp_only_layers [])
            "moe_intermediate_size": MOE_FFN,
            "num_experts": MOE_EXPERTS,
            "num_experts_per_tok": MOE_TOPK,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "router_aux_loss_coef": 0.0,
            "output_router_logits": False,
        }
    return {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "intermediate_size": MOE_FFN,  # Mixtral's per-expert width
        "num_local_experts": MOE_EXPERTS,
        "num_experts_per_tok": MOE_TOPK,
        "router_jitter_noise": 0.0,
        "router_aux_loss_coef": 0.0,
        "output_router_logits": False,
    }


def hf_config(qk_norm: bool, optim: str, layers: int, moe=None):
    cfg = {
        "model_type": "qwen3" if qk_norm else "llama",
        "architectures": ["Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": GROUPS,
        "head_dim": HEAD_DIM,
        "num_hidden_layers": layers,
        "vocab_size": VOCAB,
        "rms_norm_eps": EPS,
        "rope_theta": float(ROPE_BASE),
        "max_position_embeddings": SEQ,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16" if is_bf16(optim) else "float32",
        "megatron_core_version": MC_VERSION,
    }
    if moe:
        cfg.update(hf_moe_config(qk_norm))
    return cfg


# ================================================================== gathering


def gather_weights(model):
    out = {}
    for name, p in sorted(named_model_params(model).items()):
        full = local_to_global(name, p.detach())
        out[name] = full.float() if dist.get_rank() == 0 else None
    return out


def gather_optimizer(optimizer, model):
    """{"<param>::<kind>": full global fp32 tensor} for the fp32 masters ("param",
    absent for the fp32 FP32Optimizer whose master IS the model param) and the
    Adam moments ("exp_avg", "exp_avg_sq").  Collective; rank 0 gets tensors."""
    views = optimizer_views(optimizer, model)
    params = named_model_params(model)
    sharded = any(isinstance(o, DistributedOptimizer) for o in iter_opts(optimizer))
    out = {}
    for name in sorted(params):
        p = params[name]
        if sharded:  # same collective sequence on every DP rank, owning a slice or not
            kinds = ["param", "exp_avg", "exp_avg_sq"]
        else:
            kinds = sorted({k for k, _, _ in views.get(name, [])})
        for kind in kinds:
            local = torch.zeros(p.numel(), dtype=torch.float32)
            for k, t, sl in views.get(name, []):
                if k != kind:
                    continue
                if sl is None:
                    local.copy_(t.detach().float().reshape(-1))
                else:
                    local[sl[0] : sl[1]] = t.detach().float().reshape(-1)
            if sharded:  # each DP rank owns a disjoint slice (zeros elsewhere)
                dist.all_reduce(local, group=parallel_state.get_data_parallel_group())
            full = local_to_global(name, local.view(p.shape))
            out[f"{name}::{kind}"] = full if dist.get_rank() == 0 else None
    return out


def adam_steps(optimizer):
    """Distinct Adam 'step' values held by the inner torch optimizer(s) after loading."""
    steps = set()
    for opt in iter_opts(optimizer):
        for st in opt.optimizer.state.values():
            if "step" in st:
                steps.add(float(st["step"]))
        for g in opt.optimizer.param_groups:
            if "step" in g:
                steps.add(float(g["step"]))
    return sorted(steps)


def check_unbalanced_state(before, after, mults):
    """after == before * M (weights, masters), / M (exp_avg), / M**2 (exp_avg_sq), exactly."""
    n = 0
    for key, b in before.items():
        name, _, kind = key.partition("::")
        M = mults.get(name)
        if M is None:
            want = b
        else:
            M = M.expand(b.shape).to(b.dtype)
            want = {"": b * M, "param": b * M, "exp_avg": b / M, "exp_avg_sq": b / (M * M)}[kind]
        assert torch.equal(after[key], want), f"unbalanced state mismatch at {key}"
        n += 1
    return n


# ================================================================== commands


def cmd_make(a):
    t0 = time.time()
    init_dist(a.tp, a.optim, "make")
    model, optimizer, sched = build(a.tp, a.optim, a.qk_norm, a.layers, a.seed, a.moe)
    log(f"megatron-core {MC_VERSION}, optimizer {[type(o).__name__ for o in iter_opts(optimizer)]}")
    train_steps(model, optimizer, sched, TRAIN_STEPS, a.seed)
    owned = torch.tensor(
        [
            sum(t.numel() for v in optimizer_views(optimizer, model).values() for k, t, sl in v if k == "exp_avg")
        ]
    )
    parts = [torch.zeros_like(owned) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, owned)
    log(f"Adam exp_avg elements held per rank: {[int(x) for x in parts]}")

    ids = probe_ids()
    before = probe_logits(model, ids)
    state_before = {**gather_weights(model), **gather_optimizer(optimizer, model)}
    mults = unbalance_multipliers(a.layers, a.qk_norm, a.seed + 1, a.moe)
    apply_unbalance(model, optimizer, mults)
    after = probe_logits(model, ids)
    w_after, o_after = gather_weights(model), gather_optimizer(optimizer, model)
    if dist.get_rank() == 0:
        assert torch.equal(before, after), (
            "unbalancing changed the function: max |diff| = "
            f"{(before - after).abs().max().item()}"
        )
        n = check_unbalanced_state(state_before, {**w_after, **o_after}, mults)
        log(f"unbalanced at a fixed function: logits torch.equal before/after; "
            f"{n} weight/optimizer tensors scaled exactly by M / 1/M / 1/M^2")

    extras = mlm_extras(a, sched) if a.mlm_extras else None
    name = save_ckpt(model, optimizer, a.out, a.optim, dist_sharding_of(a), extras=extras)
    if dist.get_rank() == 0:
        with open(os.path.join(a.out, "config.json"), "w") as f:
            json.dump(hf_config(a.qk_norm, a.optim, a.layers, a.moe), f, indent=2)
        torch.save({"ids": ids, "logits": after}, os.path.join(a.out, "probe.pt"))
        torch.save(
            {k: v for k, v in mults.items()}, os.path.join(a.out, "unbalance_multipliers.pt")
        )
        dump_keys(name, os.path.join(a.out, "keys.txt"))
        # what was saved, in the same global layout resume's RESULT.pt uses
        torch.save({"weights": w_after, "optimizer": o_after}, os.path.join(a.out, "state.pt"))
    # uninterrupted continuation from the saved state (same data as resume's 2 steps):
    # a same-layout resume of this checkpoint must reproduce these losses
    cont = train_steps(model, optimizer, sched, RESUME_STEPS, a.seed)
    if dist.get_rank() == 0:
        st = torch.load(os.path.join(a.out, "state.pt"), weights_only=False)
        st["losses_after_save"] = cont
        st["adam_step_at_save"] = TRAIN_STEPS
        torch.save(st, os.path.join(a.out, "state.pt"))
    log(f"wrote {name} in {time.time() - t0:.1f}s")


def cmd_resume(a):
    """``--tps 1,2``: the same ranks load at TP 1 (DP = world) and then at TP 2, one
    ``initialize_model_parallel`` after the other (one start-up for both); RESULT.pt then
    holds {tp: result}."""
    t0 = time.time()
    src_abs = os.path.abspath(a.src)
    out_abs = os.path.abspath(a.out)
    assert not out_abs.startswith(src_abs + os.sep), "RESULT must not be written into CKPT"
    tps = [int(t) for t in a.tps.split(",")] if a.tps else [a.tp]
    results = {}
    for i, tp in enumerate(tps):
        if i:
            parallel_state.destroy_model_parallel()
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        else:
            init_dist(tp, a.optim, "resume")
        a.tp = tp
        results[tp] = _resume_at(a)
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(out_abs) or ".", exist_ok=True)
        torch.save(results if a.tps else results[tps[0]], out_abs)
    log(f"wrote {out_abs} in {time.time() - t0:.1f}s")


def _resume_at(a):
    res = {"version": MC_VERSION, "tp": a.tp}
    ids = probe_ids()
    model, optimizer, sched = build(a.tp, a.optim, a.qk_norm, a.layers, a.seed, a.moe)
    it = load_ckpt(model, optimizer, sched, a.src)
    log(f"loaded {a.src} (iteration {it})")
    res["logits_src"] = probe_logits(model, ids)
    del model, optimizer, sched

    model, optimizer, sched = build(a.tp, a.optim, a.qk_norm, a.layers, a.seed, a.moe)
    it = load_ckpt(model, optimizer, sched, a.other)
    log(f"loaded {a.other} (iteration {it})")
    res["logits_other"] = probe_logits(model, ids)
    res["weights"] = gather_weights(model)
    res["optimizer"] = gather_optimizer(optimizer, model)
    res["weights_layout"] = (
        "per layer (decoder.layers.<i>.*), global (un-TP-sharded) layout, keys = GPTModel "
        "param names; the checkpoint instead stacks layers on a leading dim and stores "
        "input_layernorm.weight / pre_mlp_layernorm.weight as "
        "self_attention.linear_qkv.layer_norm_weight / mlp.linear_fc1.layer_norm_weight; "
        "linear_fc1 rows = [gate(all I); up(all I)]; linear_qkv rows per query group "
        "[R q heads, k, v]; optimizer keys '<name>::param|exp_avg|exp_avg_sq' (fp32)"
        + (
            "; MoE: mlp.router.weight [E, D], mlp.experts.local_experts.<e>.linear_fc1 / "
            "linear_fc2.weight per expert (the checkpoint stacks them as "
            "mlp.experts.experts.* with shape (L, E, ...))"
            if a.moe
            else ""
        )
    )
    res["adam_step"] = adam_steps(optimizer)
    res["losses"] = train_steps(model, optimizer, sched, RESUME_STEPS, a.seed)
    return res


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    for c in ("make", "resume"):
        p = sub.add_parser(c)
        p.add_argument("--tp", type=int, default=1, choices=(1, 2))
        p.add_argument("--optim", default="adam", choices=("adam", "bf16") + DIST_MODES)
        p.add_argument("--qk-norm", action="store_true")
        p.add_argument(
            "--moe",
            choices=("sequential", "grouped"),
            default=None,
            help=f"every MLP a MoELayer ({MOE_EXPERTS} experts, top-{MOE_TOPK}, expert width "
            f"{MOE_FFN}, EP 1); sequential = SequentialMLP experts, grouped = "
            "moe_grouped_gemm (needs a grouped-GEMM experts module: see README)",
        )
        p.add_argument("--layers", type=int, default=3)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument(
            "--dist-sharding",
            default="fully_reshardable",
            help="DistributedOptimizer distrib_optim_sharding_type for make "
            "(Megatron-LM default without --dist-ckpt-optim-fully-reshardable: dp_reshardable, "
            "which --optim dist-dp-buckets selects)",
        )
        if c == "make":
            p.add_argument("--out", required=True)
            p.add_argument(
                "--mlm-extras",
                action="store_true",
                help="also save args / rng_state / opt_param_scheduler / "
                "num_floating_point_operations_so_far as Megatron-LM does",
            )
        else:
            p.add_argument("--src", required=True)
            p.add_argument("--other", required=True)
            p.add_argument("--out", required=True)
            p.add_argument("--tps", default=None,
                           help="TP sizes to load at in turn with the same ranks, e.g. 1,2 (overrides --tp)")
    a = ap.parse_args()
    if a.moe and a.tp != 1:
        ap.error(MOE_TP_ERROR)
    try:
        (cmd_make if a.cmd == "make" else cmd_resume)(a)
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
