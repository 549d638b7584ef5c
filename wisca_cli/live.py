"""The transition inside the training job: a live model (plain tensors or FSDP2 DTensor
shards) and its optimizer, rescaled in place. The third backend of the symmetry core.

    import wisca_cli as wisca
    report = wisca.transition(model, optimizer)          # at step N, on every rank together

Per decoder layer: the plan (``pairs.layer_pairs``) from the model's config; each member
tensor's statistics from the pieces this process holds (a DTensor's local shard, at its
global offset; a view into a fused in-memory expert tensor), merged (``stats``) and, in a
distributed job, all-reduced, so every rank gets the same scales and nothing is gathered;
then each piece multiplied in place (``balance.chunk_multiplier``): parameters by S,
gradients, Adam's ``exp_avg`` and momentum by 1/S, ``exp_avg_sq`` by 1/S**2.

Verification runs the live model's own forward on probe tokens before and after
(bit-identical logits for pow2 scales); on failure every touched tensor is restored
exactly (pow2: by the inverse scales; continuous: from copies of the touched tensors,
which cost their size in memory) and ``VerificationFailed`` is raised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .balance import apply_multiplier_, chunk_multiplier, member_multipliers, scales_from_stats
from .errors import VerificationFailed, WiscaError
from .options import DEFAULT_TARGETS, check, default, final_norm_warnings, layer_target_warnings
from .pairs import FINAL, final_pairs, layer_pairs
from .record import RECORD_FORMAT, pair_report, summarise, write_record
from .solve import MAX_SWEEPS, _overlapping, exactness
from .spec import layout_from_config
from .stats import NonFiniteValues, UnitStats, chunk_stats
from .training import FAMILIES
from .verifier import compare_logits, probe_ids, resolve_tolerance


# -- where a checkpoint tensor lives in memory ----------------------------------------------------
@dataclass(frozen=True)
class Region:
    """A checkpoint tensor as a box of an in-memory parameter: ``param[start : start + size]``
    with the dimensions not in ``keep`` squeezed (a fused expert's ``[e, I:2I, :]``)."""

    name: str                      # the parameter's name in the model
    start: tuple[int, ...]
    size: tuple[int, ...]
    keep: tuple[int, ...]          # physical dims that are the logical tensor's dims

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.size[d] for d in self.keep)

    def pieces(self, t: torch.Tensor):
        """(view, logical offsets) of the part of ``t`` (a parameter, its gradient or a
        moment: plain or DTensor) this process holds, for this box."""
        local, offset = _local(t)
        lo = [max(s, o) for s, o in zip(self.start, offset)]
        hi = [min(s + n, o + m) for s, n, o, m in zip(self.start, self.size, offset, local.shape)]
        if any(a >= b for a, b in zip(lo, hi)):
            return []
        view = local
        for d, (a, b, o) in enumerate(zip(lo, hi, offset)):
            view = view.narrow(d, a - o, b - a)
        squeeze = [d for d in range(view.dim()) if d not in self.keep]
        for d in reversed(squeeze):
            view = view.squeeze(d)
        return [(view, tuple(lo[d] - self.start[d] for d in self.keep))]


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def _local(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The local tensor (same storage) and its offset in the global tensor."""
    if not _is_dtensor(t):
        return t.detach(), (0,) * t.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local().detach(), tuple(offset)


def _counts_here(t: torch.Tensor) -> bool:
    """Whether this process's piece of ``t`` enters the all-reduced statistics: one replica
    of each shard does (DTensor: coordinate 0 on every Replicate mesh dim; a plain tensor,
    replicated on every rank: rank 0)."""
    import torch.distributed as dist

    if not _is_dtensor(t):
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    coord = t.device_mesh.get_coordinate() or []
    return all(c == 0 for c, p in zip(coord, t.placements) if p.is_replicate())


_EXPERT = re.compile(r"^(?P<pre>.*\.)(?P<mod>block_sparse_moe|mlp|mixer)\.experts\.(?P<e>\d+)\.(?P<w>\w+)\.weight$")


def _resolver(params: dict[str, torch.Tensor], spec):
    """checkpoint tensor name -> Region of a live parameter. Names as saved, then
    transformers 5's in-memory layout: renamed (``spec.memory_renames``: Mixtral's
    ``block_sparse_moe`` is ``mlp``, GPT-NeoX's ``embed_out`` is ``lm_head``), and the
    experts fused, ``mlp.experts.gate_up_proj`` [E, 2I, H] (gate then up) and
    ``mlp.experts.down_proj`` [E, H, I] (Nemotron-H's plain experts: ``mixer.experts.up_proj``
    [E, I, H] and ``mixer.experts.down_proj``)."""
    def region(role: str, name: str) -> Region:
        if name in params:
            p = params[name]
            return Region(name, (0,) * p.dim(), tuple(p.shape), tuple(range(p.dim())))
        renamed = spec.memory_name(name)
        if renamed != name:
            return region(role, renamed)
        m = _EXPERT.match(name)
        if m and role.startswith("experts."):
            e, part = int(m["e"]), role.rsplit(".", 1)[1]
            alone = f"{m['pre']}{m['mod']}.experts.{part}_proj"   # a plain MLP's: up_proj [E, I, H] (Nemotron-H)
            if part in ("up", "down") and alone in params and (part == "down" or m["mod"] == "mixer"):
                p = params[alone]
                return Region(alone, (e, 0, 0), (1, *p.shape[1:]), (1, 2))
            fused = m["pre"] + ("mlp.experts.down_proj" if part == "down" else "mlp.experts.gate_up_proj")
            if fused in params:
                p = params[fused]
                if part == "down":
                    return Region(fused, (e, 0, 0), (1, *p.shape[1:]), (1, 2))
                half = p.shape[1] // 2
                return Region(fused, (e, half if part == "up" else 0, 0), (1, half, p.shape[2]), (1, 2))
        raise WiscaError(f"transition: the model has no parameter for {name} (role {role})")
    return region


# -- the transition ---------------------------------------------------------------------------------
def _unwrap_model(model):
    for attr in ("module", "_orig_mod"):          # DDP / FSDP1, torch.compile
        while hasattr(model, attr) and isinstance(getattr(model, attr), torch.nn.Module):
            model = getattr(model, attr)
    return model


def _unwrap_optimizer(optimizer):
    """accelerate's AcceleratedOptimizer, Lightning's wrappers: the torch optimizer inside."""
    while optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and \
            hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _optimizer_powers(optimizer) -> dict[str, int]:
    """state key -> p (the entry becomes entry / S**p), or WiscaError for an optimizer wisca
    cannot transform (8-bit, Adafactor, unknown)."""
    keys = set()
    for state in optimizer.state.values():
        keys |= set(state)
    if not keys:
        return {}
    for _, (powers, marks) in FAMILIES.items():
        if marks <= keys and keys <= set(powers):
            return powers
    raise WiscaError(f"transition: cannot transform the state of {type(optimizer).__name__} (state keys "
                     f"{sorted(keys)}); pass optimizer_state='reset' to clear it instead")


def _all_reduce(stats: list[UnitStats]) -> list[UnitStats]:
    import torch.distributed as dist

    if not stats or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    packed = [s.pack() for s in stats]
    sizes = [p["sum"].shape[1] for p in packed]
    out = {}
    for key, op in (("sum", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX), ("min", dist.ReduceOp.MIN)):
        flat = torch.cat([p[key] for p in packed], dim=1)
        dist.all_reduce(flat, op=op)
        out[key] = flat.split(sizes, dim=1)
    return [UnitStats.unpack({k: out[k][i] for k in out}) for i in range(len(stats))]


def _agree(ok: bool) -> bool:
    """Every rank's verdict, combined: passed only if it passed everywhere."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([0.0 if ok else 1.0])
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)   # ranks that failed
    return flag.item() == 0


def _mixed_precision_dtypes(model) -> set:
    """Compute dtypes of FSDP2 mixed precision (``MixedPrecisionPolicy.param_dtype`` of every
    ``fully_shard`` module): the safe range must hold in them too."""
    out = set()
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if get_state is None:
            continue
        try:
            dtype = get_state()._mp_policy.param_dtype
        except AttributeError:   # another torch version's internals: the caller's compute_dtype still applies
            continue
        if dtype is not None:
            out.add(dtype)
    return out


def _narrowest(dtypes) -> torch.dtype:
    return min(dtypes, key=lambda d: torch.finfo(d).max)


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device))
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.detach().float().cpu()


class _Touched:
    """Every piece multiplied, with its total multiplier, so a failure is undone exactly."""

    def __init__(self, exact: bool):
        self.exact, self.log, self.copies = exact, [], {}
        self.accounting: dict[str, dict[str, int]] = {}   # optimizer state key -> scaled / untouched / copied
        self.counted: set = set()

    def count(self, key: str, how: str, ident=None) -> None:
        if ident is not None:
            if (ident, key) in self.counted:   # a fused parameter: one entry, several regions
                return
            self.counted.add((ident, key))
        self.accounting.setdefault(key, {"scaled": 0, "untouched": 0, "copied": 0})[how] += 1

    def scale(self, key: tuple, view: torch.Tensor, mult: torch.Tensor, power: int, offset: float = 0.0) -> None:
        mult = mult.to(view.device)
        if not self.exact and key not in self.copies:
            self.copies[key] = (view, view.clone())
        if offset:   # a (offset + w) norm weight stores (offset + w) * s - offset (rounds)
            view.copy_(((view.double() + offset) * mult.double() ** power - offset).to(view.dtype))
        else:
            apply_multiplier_(view, mult, power)
        self.log.append((view, mult, power, offset))

    def restore(self) -> None:
        if not self.exact:
            for view, saved in self.copies.values():
                view.copy_(saved)
            return
        for view, mult, power, offset in reversed(self.log):   # pow2: the inverse is exact
            if offset:
                view.copy_(((view.double() + offset) * mult.double() ** -power - offset).to(view.dtype))
            else:
                apply_multiplier_(view, mult, -power)


def _check_common(granularity, norm, strength, scales, optimizer_state, max_kl, min_top1, max_rel):
    if optimizer_state not in ("transform", "reset"):
        raise WiscaError(f"optimizer_state must be 'transform' or 'reset', got {optimizer_state!r}")
    tolerance = {k: check(k, v) for k, v in (("max_kl", max_kl), ("min_top1", min_top1), ("max_rel", max_rel))
                 if v is not None}
    return (check("granularity", granularity), check("norm", norm), check("strength", strength),
            check("scales", scales), tolerance)


def _prepare_optimizer(optimizer, optimizer_state: str) -> tuple[object, dict[str, int]]:
    optimizer = _unwrap_optimizer(optimizer)
    if optimizer is None:
        return None, {}
    if optimizer_state == "reset":
        optimizer.state.clear()
        return optimizer, {}
    return optimizer, _optimizer_powers(optimizer)       # raises before anything is touched


@torch.no_grad()
def _run(model, params: dict, optimizer, powers: dict, groups, vocab: int, exact: bool, opts: dict,
         compute_dtype, verify: bool, probe: tuple, tolerance: dict, make_report) -> tuple[dict, dict]:
    """The transition over ``groups`` ((label, pairs, regions) per decoder layer or LoRA
    module), verified on the live model's own forward; restores everything on failure.
    Returns (report, recorded scales)."""
    was_training = model.training
    model.eval()
    try:
        ids = probe_ids(vocab, *probe) if verify else None
        before = _logits(model, ids) if verify else None
        touched = _Touched(exact)
        mp_dtypes = _mixed_precision_dtypes(model)
        reports, recorded = [], {}
        groups = list(groups)   # every name resolved before anything is touched
        _check_state(groups, params, optimizer, powers)
        try:
            for label, pairs, regions in groups:
                results = _balance_layer(pairs, regions, params, opts["norm"], opts["strength"], opts["pow2"],
                                         compute_dtype, touched, mp_dtypes)
                totals: dict[str, torch.Tensor] = {}
                for kind, (result, mults) in results.items():
                    recorded[label["key"](kind)] = result.scales
                    for role, m in mults.items():
                        totals[role] = totals[role] * m if role in totals else m
                for role, mult in totals.items():   # gradients and moments follow the weights
                    _scale_state(regions[role], params[regions[role].name], optimizer, powers, mult, touched)
                reports.append({**label["report"], **{k: pair_report(r) for k, (r, _) in results.items()}})
        except NonFiniteValues as e:
            touched.restore()
            raise WiscaError(f"transition: a parameter of role {e.role} contains NaN or Inf; nothing changed") from None
        except BaseException:
            touched.restore()
            raise
        verification = None
        if verify:
            after = _logits(model, ids)
            dtype = _narrowest(p.dtype for p in params.values() if p.is_floating_point())
            result = compare_logits(before, after, exact, resolve_tolerance(_dtype_name(dtype), tolerance))
            verification = result.to_dict()
            if not _agree(result.passed):
                touched.restore()
                verification["passed"] = False
                raise VerificationFailed("transition: the rescaled model's logits differ; model and optimizer "
                                         "restored", make_report(reports, verification))
    finally:
        model.train(was_training)
    report = make_report(reports, verification)
    if optimizer is not None:   # the state of every parameter the transition left alone
        by_param = {id(p): n for n, p in params.items()}
        for param, state in optimizer.state.items():
            name = by_param.get(id(param), id(param))
            for key in state:
                if (name, key) not in touched.counted:
                    touched.count(key, "untouched" if powers.get(key, 0) else "copied", name)
    report["optimizer"] = {"transformed": optimizer is None or bool(powers) or not optimizer.state,
                           "reset": opts["optimizer_state"] == "reset",
                           "optimizer": type(optimizer).__name__ if optimizer is not None else None,
                           "accounting": touched.accounting}
    return report, recorded


def transition(model, optimizer=None, *, targets=DEFAULT_TARGETS, granularity: str = default("granularity"),
               norm: str = default("norm"), strength: float = default("strength"), scales: str = default("scales"),
               verify: bool = default("verify"), probe_batch: int = default("probe_batch"),
               probe_len: int = default("probe_len"), seed: int = default("seed"), max_kl: float | None = None,
               min_top1: float | None = None, max_rel: float | None = None, optimizer_state: str = "transform",
               compute_dtype: torch.dtype | None = None, record_dir: str | Path | None = None) -> dict:
    """Rescale a live Hugging Face model (and its optimizer's state) in place.

    Every rank of a distributed job calls it together. Parameters may be plain tensors or
    FSDP2 DTensors on any mesh; statistics are reduced across ranks, never gathered.
    ``optimizer_state``: "transform" (moments follow the scales; an optimizer wisca cannot
    transform raises before anything is touched) or "reset" (its state is cleared).
    ``compute_dtype``: a mixed-precision compute dtype narrower than the parameters (the
    safe range then follows it; FSDP2's ``MixedPrecisionPolicy.param_dtype`` is found by
    itself). ``record_dir``: also write ``wisca.json`` and the scales
    there (rank 0), so a checkpoint saved into that folder can be undone with ``wisca undo``.
    A PEFT model is handed to ``transition_lora``. Returns the report (``wisca transform
    --json``'s shape, JSON-serialisable); raises ``VerificationFailed`` (everything
    restored) or ``WiscaError``.
    """
    model = _unwrap_model(model)
    if _lora_modules(model):
        return transition_lora(model, optimizer, norm=norm, strength=strength, scales=scales, verify=verify,
                               probe_batch=probe_batch, probe_len=probe_len, seed=seed, max_kl=max_kl,
                               min_top1=min_top1, max_rel=max_rel, optimizer_state=optimizer_state,
                               compute_dtype=compute_dtype)
    targets = check("targets", targets)
    granularity, norm, strength, scales, tolerance = _check_common(granularity, norm, strength, scales,
                                                                   optimizer_state, max_kl, min_top1, max_rel)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise WiscaError("transition: the model has no Hugging Face config (model.config)")
    layout = layout_from_config(config.to_dict(), where="model.config")
    if layout.mxfp4_experts:   # packed in memory as the quantiser keeps them: read from a checkpoint only
        raise WiscaError("transition: model.config: MXFP4-quantised experts in memory are not supported "
                         "(load with Mxfp4Config(dequantize=True))")
    pow2 = scales == "pow2"
    exact_by_target = exactness(layout, targets, pow2)
    exact = pow2 and all(v != "tolerance" for v in exact_by_target.values())
    params = dict(model.named_parameters())
    if any(p.dtype == torch.float8_e4m3fn for p in params.values()):   # FP8Linear: codes + weight_scale_inv
        raise WiscaError("transition: model: FP8-quantised weights in memory are not supported "
                         "(load with FineGrainedFP8Config(dequantize=True), or transform the checkpoint)")
    region_of = _resolver(params, layout.spec)
    optimizer, powers = _prepare_optimizer(optimizer, optimizer_state)

    def groups():
        for layer in range(layout.layers):
            roles = layout.layer_roles(layer)
            pairs = layer_pairs(layout, layer, targets, granularity)
            regions = {m.role: region_of(m.role, roles[m.role]) for p in pairs for m in p.members}
            yield {"report": {"layer": layer}, "key": lambda kind, i=layer: f"layers.{i}.{kind}"}, pairs, regions
        final = final_pairs(layout, targets, granularity)   # final norm -> lm_head (untied embeddings)
        if final:
            spec = layout.spec
            names = {"norm": spec.final_norm, "norm_bias": spec.final.norm_bias, "head": spec.lm_head}
            regions = {m.role: region_of(m.role, names[m.role]) for p in final for m in p.members}
            yield {"report": {"layer": FINAL}, "key": lambda kind: f"{FINAL}.{kind}"}, final, regions

    def make_report(reports, verification):
        out = _report(layout.spec.name, targets, granularity, norm, strength, scales, exact_by_target, reports,
                      verification)
        out["warnings"] += final_norm_warnings(targets, layout.spec.targets, layout.tie_embeddings)
        out["warnings"] += layer_target_warnings(targets, layout)
        return out

    opts = {"norm": norm, "strength": strength, "pow2": pow2, "optimizer_state": optimizer_state}
    report, recorded = _run(model, params, optimizer, powers, groups(), layout.vocab, exact, opts, compute_dtype,
                            verify, (probe_batch, probe_len, seed), tolerance, make_report)
    if record_dir is not None:
        _write_record(Path(record_dir), report, recorded)
    return report


# -- LoRA adapters in memory -----------------------------------------------------------------------
def _lora_modules(model) -> list[tuple[str, str, str, str]]:
    """(module name, adapter, lora_A parameter name, lora_B parameter name) of a PEFT model."""
    out = []
    for name, module in model.named_modules():
        for a_attr, b_attr, suffix in (("lora_A", "lora_B", ".weight"), ("lora_embedding_A", "lora_embedding_B", "")):
            a, b = getattr(module, a_attr, None), getattr(module, b_attr, None)
            if a is None or b is None or not hasattr(a, "keys"):
                continue
            for adapter in a.keys():
                if adapter in b:
                    out.append((name, adapter, f"{name}.{a_attr}.{adapter}{suffix}", f"{name}.{b_attr}.{adapter}{suffix}"))
    return out


def transition_lora(model, optimizer=None, *, norm: str = default("norm"), strength: float = default("strength"),
                    scales: str = default("scales"), verify: bool = default("verify"),
                    probe_batch: int = default("probe_batch"), probe_len: int = default("probe_len"),
                    seed: int = default("seed"), max_kl: float | None = None, min_top1: float | None = None,
                    max_rel: float | None = None, optimizer_state: str = "transform",
                    compute_dtype: torch.dtype | None = None) -> dict:
    """Balance every LoRA module of a PEFT model in memory per rank channel (row k of A
    times s[k], column k of B times 1/s[k]; ``B A`` unchanged), with its optimizer state.
    Same options, verification and report as ``transition`` (summary kind ``lora``)."""
    from .pairs import lora_pair

    model = _unwrap_model(model)
    _, norm, strength, scales, tolerance = _check_common("channel", norm, strength, scales, optimizer_state,
                                                         max_kl, min_top1, max_rel)
    modules = _lora_modules(model)
    if not modules:
        raise WiscaError("transition_lora: the model has no LoRA modules (lora_A / lora_B)")
    params = dict(model.named_parameters())
    missing = [a for _, _, a, b in modules if a not in params or b not in params]
    if missing:
        raise WiscaError(f"transition_lora: {missing[0]} is not a parameter of the model")
    optimizer, powers = _prepare_optimizer(optimizer, optimizer_state)
    pow2 = scales == "pow2"

    def whole(name):
        p = params[name]
        return Region(name, (0,) * p.dim(), tuple(p.shape), tuple(range(p.dim())))

    def groups():
        for module, adapter, a, b in modules:
            rank = params[a].shape[0]
            key = module if adapter == "default" else f"{module}.{adapter}"
            yield ({"report": {"module": key, "rank": rank}, "key": lambda kind, k=key: k},
                   [lora_pair(rank)], {"lora_A": whole(a), "lora_B": whole(b)})

    def make_report(reports, verification):
        report = _report("lora", ("lora",), "channel", norm, strength, scales,
                         {"lora": "exact" if pow2 else "tolerance"}, reports, verification)
        report["kind"] = "lora-adapter"
        report["modules"] = report.pop("layers")
        return report

    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if verify and not vocab:
        raise WiscaError("transition_lora: the model has no config.vocab_size for probe tokens; pass verify=False")
    opts = {"norm": norm, "strength": strength, "pow2": pow2, "optimizer_state": optimizer_state}
    report, _ = _run(model, params, optimizer, powers, groups(), vocab or 0, pow2, opts, compute_dtype, verify,
                     (probe_batch, probe_len, seed), tolerance, make_report)
    return report


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}.get(dtype, "F32")


def _stats(pair, regions, params, dtypes: list) -> UnitStats:
    stats = UnitStats.zeros(pair.n_units)
    for m in pair.members:
        p = params[regions[m.role].name]
        dtypes.append(p.dtype)
        if _counts_here(p):
            for view, offsets in regions[m.role].pieces(p):
                chunk_stats(m, pair.n_units, view, offsets, into=stats)
    return stats


def _apply_pair(pair, s: torch.Tensor, regions, params, touched: _Touched) -> dict[str, torch.Tensor]:
    """Multiply every piece of the pair's members by its multiplier; role -> S applied."""
    shapes = {m.role: regions[m.role].shape for m in pair.members}
    mults = member_multipliers(pair, s.double(), shapes)
    offsets = {m.role: m.offset for m in pair.members}
    for role, mult in mults.items():
        region = regions[role]
        for view, off in region.pieces(params[region.name]):
            touched.scale(("param", region.name, region.start, off), view,
                          chunk_multiplier(mult, off, tuple(view.shape)), 1, offsets[role])
    return mults


def _balance_layer(pairs, regions, params, norm, strength, pow2, compute_dtype, touched: _Touched,
                   mp_dtypes=()) -> dict:
    """As ``solve.balance_layer``: disjoint pairs solved from the originals, then applied;
    pairs sharing tensors (the norm target) balanced in turn, sweep after sweep."""
    def solve(pair):
        dtypes: list = list(mp_dtypes)
        stats = _all_reduce([_stats(pair, regions, params, dtypes)])[0]
        dtype = _narrowest(dtypes + ([compute_dtype] if compute_dtype else []))
        return scales_from_stats(pair.kind, stats, norm, strength, pow2, dtype, degree=pair.b_degree), stats

    out: dict = {}
    if not _overlapping(pairs):
        solved = [(pair, solve(pair)[0]) for pair in pairs]
        for pair, result in solved:
            out[pair.kind] = (result, _apply_pair(pair, result.scales, regions, params, touched))
        return out
    sweeps = MAX_SWEEPS if strength == 1.0 else 1
    for _ in range(sweeps):
        moved = False
        for pair in pairs:
            result, _ = solve(pair)
            mults = _apply_pair(pair, result.scales, regions, params, touched)
            moved |= bool((torch.log2(result.scales.double()).abs() > (0 if pow2 else 1e-3)).any())
            if pair.kind in out:
                prev, prev_mults = out[pair.kind]
                prev.scales = (prev.scales.double() * result.scales.double()).float()
                prev.clamped = max(prev.clamped, result.clamped)
                out[pair.kind] = (prev, {r: prev_mults[r] * m for r, m in mults.items()})
            else:
                out[pair.kind] = (result, mults)
        if not moved:
            break
    if sweeps > 1:
        from .balance import log2_imbalance

        for pair in pairs:
            stats = _all_reduce([_stats(pair, regions, params, [])])[0]
            out[pair.kind][0].after = log2_imbalance(stats, norm)
    return out


def _check_state(groups, params: dict, optimizer, powers: dict[str, int]) -> None:
    """Before anything is touched: every optimizer entry of a parameter the transition may
    rescale is one wisca rescales exactly (a floating-point tensor of the parameter's shape)
    or one no rescaling changes (``step``); anything else is refused, never skipped."""
    if optimizer is None:
        return
    names = {regions[role].name for _, _, regions in groups for role in regions}
    for name in sorted(names):
        param = params[name]
        for key, t in optimizer.state.get(param, {}).items():
            if not powers.get(key, 0):
                continue
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else None
            if shape != tuple(param.shape) or not t.is_floating_point():
                what = f"a {type(t).__name__}" if shape is None else f"{t.dtype} of shape {list(shape)}"
                raise WiscaError(f"transition: optimizer state {key!r} of {name} is {what}, not a floating-point "
                                 f"tensor of the parameter's shape {list(param.shape)}; wisca cannot rescale it "
                                 f"with its parameter; nothing changed (optimizer_state='reset' clears it)")


def _scale_state(region: Region, param, optimizer, powers: dict[str, int], mult: torch.Tensor,
                 touched: _Touched) -> None:
    """The gradient (if any) times 1/S, each optimizer moment times 1/S**p."""
    tensors = []
    if param.grad is not None:
        tensors.append(("grad", param.grad, -1))
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    for key, t in state.items():
        p = powers.get(key, 0)
        if p:    # a floating-point tensor of the parameter's shape (``_check_state``)
            tensors.append((key, t, -p))
        touched.count(key, "scaled" if p else "copied", region.name)
    for key, t, power in tensors:
        for view, off in region.pieces(t):
            touched.scale((key, region.name, region.start, off), view,
                          chunk_multiplier(mult, off, tuple(view.shape)), power)


def _report(architecture, targets, granularity, norm, strength, scales, exactness_, layer_reports,
            verification) -> dict:
    return {"command": "transition", "wisca_version": __version__, "record_format": RECORD_FORMAT,
            "architecture": architecture,
            "options": {"targets": list(targets), "granularity": granularity, "norm": norm, "strength": strength,
                        "scales": scales, "verify": verification is not None},
            "targets_applied": [t for t, e in exactness_.items() if e != "not applicable"],
            "targets_not_applicable": [t for t, e in exactness_.items() if e == "not applicable"],
            "exactness": exactness_, "summary": summarise(layer_reports), "verification": verification,
            "layers": layer_reports, "warnings": []}


def _write_record(folder: Path, report: dict, scales: dict[str, torch.Tensor]) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    record = {**report, "command": "transform", "source": "transition (in memory)", "output": str(folder),
              "options": {**report["options"], "probe_batch": default("probe_batch"),
                          "probe_len": default("probe_len"), "seed": default("seed")}}
    write_record(folder, record, scales, {"granularity": report["options"]["granularity"]})
