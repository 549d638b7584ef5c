"""The Python API: transform, verify, inspect and undo a checkpoint.

Each function streams the checkpoint one decoder layer at a time: read the layer's
tensors once, compute and apply the scales, feed the original and the new layer to the
verifier, write the new tensors into output shards laid out up front. The output folder
is renamed into place only after verification passed.

    import wisca_cli as wisca
    report = wisca.transform("ckpt/", "ckpt-wisca/")              # pow2, bit-exact, verified
    wisca.verify("ckpt/", "ckpt-wisca/")["verification"]["passed"]  # True
    wisca.undo("ckpt-wisca/", "ckpt-restored/")                   # bit-identical tensors again
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from pathlib import Path
from typing import Iterable

import torch

from . import __version__
from . import solve
from .balance import NonFiniteValues
from .checkpoint import Checkpoint, open_checkpoint
from .errors import VerificationFailed, WiscaError
from .formats import SINGLE_NAME
from .output import StagedOutput, check_target, copy_other_files
from .record import (RECORD_FORMAT, RECORD_NAME, SCALES_NAME, final_scales, layer_pattern, layer_scales, pair_report,
                     pattern_summary, read_record, resolve_mode, summarise, write_record)
from .record import stamp as record_stamp
from .options import (DEFAULT_TARGETS, OPTIONS, PROBE_FIELDS, TOLERANCE_FIELDS, OptionError,  # noqa: F401
                      TransformOptions, check, default, final_norm_warnings, layer_target_warnings, model_warnings,
                      mxfp4_warnings, fp8_warnings,
                      not_applicable)
from .balance import apply_multiplier
from .fp8 import SCALE_SUFFIX as FP8_SCALE
from .pairs import FINAL, final_pairs, layer_pairs
from .stream import (Progress, _main_dtype, _main_torch_dtype, _nonfinite_error, _rewrite, _stages, _tolerance,
                     parallel_reduce, verify_stream)
from .verifier import StreamVerifier, Tolerance, compute_dtype, probe_ids


def transform(src: str | os.PathLike, dst: str | os.PathLike, options: TransformOptions | None = None,
              progress: Progress | None = None, **kwargs) -> dict:
    """Balance a checkpoint's weight pattern; write it to dst only if it verifies.

    Keyword arguments override fields of ``options`` (``transform(a, b, scales="continuous")``).
    Returns the report (also saved as ``wisca.json`` in dst). Raises ``VerificationFailed``
    (nothing written) or ``WiscaError`` (bad input).
    """
    opts = TransformOptions.build(options, **kwargs)
    if _dcp_input(src, opts.config, opts.revision):
        from . import dcp_api
        if opts.base is not None:
            raise OptionError("base", f"applies only to a LoRA adapter; {src} is a model checkpoint")
        return dcp_api.transform(src, dst, opts, progress)
    if opts.base is not None and not Path(opts.base).is_dir():
        raise OptionError("base", f"{opts.base}: no such folder")
    from .lora import is_adapter, transform_adapter

    if is_adapter(src):   # a PEFT LoRA adapter: balance lora_A / lora_B per rank channel
        warnings = not_applicable(opts, ("targets", "granularity"), "a LoRA adapter is balanced per rank channel")
        if opts.revision is not None:
            raise OptionError("revision", f"{src}: only applies to hub repo ids, not local folders")
        if not opts.verify:
            warnings += not_applicable(opts, (*PROBE_FIELDS, *TOLERANCE_FIELDS, "tolerance"), "verification is off")
        else:
            if opts.base is None:
                warnings += not_applicable(opts, PROBE_FIELDS, "probe tokens are used only with base "
                                                                "(base + adapter logits)")
            if opts.scales == "pow2":
                warnings += not_applicable(opts, (*TOLERANCE_FIELDS, "tolerance"),
                                            "pow2 scales verify bit for bit (mode exact)")
            elif opts.base is None:
                warnings += not_applicable(opts, ("max_kl", "min_top1"), "logits are compared only with base; "
                                                                          "max_rel bounds the B A products")
        return transform_adapter(src, dst, pow2=opts.scales == "pow2", norm=opts.norm, strength=opts.strength,
                                 overwrite=opts.overwrite, base=opts.base, verify=opts.verify,
                                 training_state=opts.training_state,
                                 probe=(opts.probe_batch, opts.probe_len, opts.seed, opts.probe_ids_file),
                                 tolerance=opts.given_tolerance(), warnings=warnings)
    if opts.base is not None:
        raise OptionError("base", f"applies only to a LoRA adapter; {src} is a model checkpoint")
    started = time.perf_counter()
    from .deepspeed import WeightsView, weights_needed

    if opts.revision is None and weights_needed(src):
        # ZeRO 3 without gathered weights: the weights are the engine's fp32 masters
        dst_path = check_target(Path(src), Path(dst), opts.overwrite)
        with WeightsView(Path(src), dst_path.parent, opts.config) as view:
            report = _transform_folder(view, dst_path, opts, progress, started, source=str(Path(src)))
        return report
    return _transform_folder(src, dst, opts, progress, started)


def _transform_folder(src, dst, opts: TransformOptions, progress, started: float, source: str | None = None) -> dict:
    """transform on a safetensors folder or hub id; ``source``: the folder the user named,
    when ``src`` is a view of it with weights written from a DeepSpeed engine."""
    ckpt = open_checkpoint(src, opts.revision)
    try:
        dst_path = check_target(ckpt.root, Path(dst), opts.overwrite)
        from .training import plan_training_state, transform_training_state

        dropped = plan_training_state(ckpt.root, opts.training_state)   # refuses before any work
        pow2 = opts.scales == "pow2"
        if ckpt.layout.fp8_weights and not pow2:
            raise OptionError("scales", f"{ckpt.root}: FP8 block-quantised weights take power-of-two scales only "
                                        f"(pow2); other scales would need the codes requantised")
        exactness = solve.exactness(ckpt.layout, opts.targets, pow2)
        exact = all(v != "tolerance" for v in exactness.values())
        tol = _tolerance(ckpt, opts.given_tolerance())
        warnings = model_warnings(opts, src, exact) + final_norm_warnings(
            opts.targets, ckpt.layout.spec.targets, ckpt.layout.tie_embeddings) + layer_target_warnings(
            opts.targets, ckpt.layout) + mxfp4_warnings(
            opts.targets, ckpt.layout.spec.targets, ckpt.layout.mxfp4_experts)
        verifier = None
        if opts.verify:
            ids = probe_ids(ckpt.layout.vocab, opts.probe_batch, opts.probe_len, opts.seed, opts.probe_ids_file)
            verifier = StreamVerifier(ckpt.layout, ids, exact=exact, tolerance=tol,
                                      dtype=compute_dtype(_main_torch_dtype(ckpt), exact))
        scales: dict[str, torch.Tensor] = {}

        def balance(layer: int, tensors: dict[str, torch.Tensor], before_apply):
            try:
                new, results = solve.balance_layer(ckpt.layout, layer, tensors, opts.targets, opts.granularity,
                                                   opts.norm, opts.strength, pow2, inplace=True,
                                                   before_apply=before_apply, reduce=parallel_reduce)
            except NonFiniteValues as e:
                raise _nonfinite_error(ckpt, ckpt.layout.layer_roles(layer)[e.role]) from None
            for kind, r in results.items():
                scales[f"layers.{layer}.{kind}"] = r.scales
                for (role, axis), b in (r.fp8_folds or {}).items():   # FP8 blocks folded into scale_inv
                    scales[f"layers.{layer}.{solve.fold_key(kind, role, axis)}"] = b.to(torch.int16)
            return new, {kind: pair_report(r) for kind, r in results.items()}

        def balance_final(tensors: dict[str, torch.Tensor], head_blocks, head_dtype):
            try:
                new, results, mults = solve.balance_final(ckpt.layout, tensors, head_blocks, head_dtype,
                                                          opts.targets, opts.granularity, opts.norm,
                                                          opts.strength, pow2, reduce=parallel_reduce)
            except NonFiniteValues as e:
                raise _nonfinite_error(ckpt, _final_names(ckpt)[e.role]) from None
            for kind, r in results.items():
                scales[f"{FINAL}.{kind}"] = r.scales
            return new, {kind: pair_report(r) for kind, r in results.items()}, mults

        stamp = record_stamp()
        with StagedOutput(dst_path, opts.overwrite) as out:
            layers, result = _rewrite(ckpt, out.tmp, balance, verifier, stamp, progress, checked=lambda layer:
                                      solve.covered_roles(ckpt.layout, layer, opts.targets, opts.granularity),
                                      final_fn=balance_final)
            report = {
                "command": "transform", "wisca_version": __version__, "record_format": RECORD_FORMAT,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "source": source or ckpt.source, "output": str(dst_path),
                **({"weights_from_engine": {
                    "note": "the source has no safetensors weights: model.safetensors is written from the DeepSpeed "
                            "fp32 masters (transformed); undo leaves out what was added",
                    "added": sorted({SINGLE_NAME} | ({"config.json"} if not (Path(source) / "config.json").is_file()
                                                     else set()))}} if source else {}),
                "architecture": ckpt.layout.spec.name, "model_type": ckpt.config.get("model_type"),
                "dtype": _main_dtype(ckpt), "bytes": ckpt.total_bytes,
                "options": opts.record(),
                "targets_applied": [t for t in opts.targets if t in ckpt.layout.spec.targets],
                "targets_not_applicable": [t for t in opts.targets if t not in ckpt.layout.spec.targets],
                "exactness": exactness,
                "warnings": warnings, **_mxfp4_report(ckpt), **_fp8_report(ckpt, layers), **_towers_report(ckpt),
                "summary": summarise(layers),
                "verification": result.to_dict() if result else None,
                "scales_file": SCALES_NAME,
                "undo": f"wisca undo {dst_path} RESTORED  (multiplies back by the recorded scales; "
                        f"{'bit-exact' if pow2 else 'exact up to rounding'})",
                "layers": layers,
            }
            if "fp8" in report:   # how many units the FP8 codes limited
                warnings += fp8_warnings(ckpt.layout.fp8_block, report["fp8_clamped_units"],
                                         report["fp8"]["units"], report["fp8_folded_blocks"])
            if result is not None and not result.passed:
                raise VerificationFailed(result.failure(), report)
            copy_other_files(ckpt.root, out.tmp, skip=set(ckpt.shards) | {RECORD_NAME, SCALES_NAME} | dropped)
            report["training_state"] = transform_training_state(   # optimizer.pt of a Trainer checkpoint
                ckpt.root, out.tmp, _multipliers(ckpt, opts.targets, opts.granularity, scales), list(ckpt.tensors),
                mode=opts.training_state)
            report["seconds"] = round(time.perf_counter() - started, 3)
            write_record(out.tmp, report, scales, {"granularity": opts.granularity})
            out.commit()
        return report
    finally:
        ckpt.close()


def _dcp_input(src, config, revision=None) -> bool:
    """True for a torch.distributed checkpoint; refuses what only applies to one (``config``,
    a torchrun job) or never does (a hub revision)."""
    from .dcp import is_dcp

    if is_dcp(src):
        if revision is not None:
            raise OptionError("revision", f"{src}: only applies to hub repo ids, not local folders")
        return True
    if config is not None:
        from .deepspeed import weights_needed

        if weights_needed(src):    # a DeepSpeed folder whose only weights are the engine's
            return False
        raise OptionError("config", f"applies only to torch.distributed checkpoints and DeepSpeed folders without "
                                    f"safetensors weights; {src} is neither (no {src}/.metadata, or it has weights)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise WiscaError(f"{src}: under torchrun wisca splits torch.distributed checkpoints (DCP) across ranks; "
                         f"run plain wisca on this one")
    return False


# -- undo -----------------------------------------------------------------------------------
def _multipliers(ckpt: Checkpoint, targets: tuple[str, ...], granularity: str,
                 scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tensor name -> S (W' = S * W) for scales as recorded (``layers.{i}.{kind}``)."""
    lay, out = ckpt.layout, {}
    for layer in range(lay.layers):
        names = lay.layer_roles(layer)
        shapes = {role: ckpt.tensors[n].shape for role, n in names.items()}
        mults = solve.layer_multipliers(lay, layer, shapes, tuple(targets), granularity, layer_scales(scales, layer))
        out.update({names[role]: m for role, m in mults.items()})
    names = _final_names(ckpt)
    shapes = {role: ckpt.tensors[n].shape for role, n in names.items()}
    mults = solve.final_multipliers(lay, shapes, tuple(targets), granularity, final_scales(scales))
    out.update({names[role]: m for role, m in mults.items()})
    return out


def _final_names(ckpt: Checkpoint) -> dict[str, str]:
    """role -> tensor name of the final stage (``norm``, ``norm_bias``, ``head``, ``head_bias``)."""
    return next(s.names for s in _stages(ckpt) if s.kind == "final")


def scale_multipliers(transformed: str | os.PathLike) -> dict[str, torch.Tensor]:
    """tensor name -> multiplier S (float64, broadcastable) that the transform applied: W' = S * W.

    What a training loop needs to carry its state into the new parametrisation: gradients
    become g / S, Adam's exp_avg / S and exp_avg_sq / S**2.
    """
    ckpt = open_checkpoint(transformed)
    try:
        record, scales = read_record(ckpt.root)
        return _multipliers(ckpt, tuple(record["options"]["targets"]), record["options"]["granularity"], scales)
    finally:
        ckpt.close()


def undo(transformed: str | os.PathLike, restored: str | os.PathLike, overwrite: bool = default("overwrite"),
         verify: bool = default("verify"), progress: Progress | None = None, config: str | None = None) -> dict:
    """Multiply back by the recorded scales: for pow2 scales the original tensors exactly."""
    from .lora import is_adapter_record, undo_adapter

    if _dcp_input(transformed, config):
        from . import dcp_api
        return dcp_api.undo(transformed, restored, overwrite, verify, progress, config)

    if is_adapter_record(transformed):
        return undo_adapter(transformed, restored, overwrite=overwrite, verify=verify)
    started = time.perf_counter()
    ckpt = open_checkpoint(transformed)
    try:
        record, scales = read_record(ckpt.root)
        opts = record["options"]
        dst_path = check_target(ckpt.root, Path(restored), overwrite)
        from .training import plan_training_state

        engine = plan_training_state(ckpt.root)   # a state wisca cannot carry back is refused before any work
        pow2 = all(v != "tolerance" for v in
                   solve.exactness(ckpt.layout, tuple(opts["targets"]), opts["scales"] == "pow2").values())
        verifier = None
        if verify:
            ids = probe_ids(ckpt.layout.vocab, opts["probe_batch"], opts["probe_len"], opts["seed"])
            verifier = StreamVerifier(ckpt.layout, ids, exact=pow2, tolerance=_tolerance(ckpt, None),
                                      dtype=compute_dtype(_main_torch_dtype(ckpt), pow2))

        def unscale_layer(layer: int, tensors: dict[str, torch.Tensor], before_apply):
            prefix = f"layers.{layer}."
            mine = {k[len(prefix):]: v for k, v in scales.items() if k.startswith(prefix)}
            try:
                return solve.unscale_layer(ckpt.layout, layer, tensors, tuple(opts["targets"]),
                                           opts["granularity"], mine, True, before_apply), {}
            except KeyError as e:
                raise WiscaError(f"{ckpt.root / SCALES_NAME}: scales {prefix}{e.args[0]} missing "
                                 f"or of the wrong size") from e

        def unscale_final(tensors: dict[str, torch.Tensor], head_blocks, head_dtype):
            try:
                new, mults = solve.unscale_final(ckpt.layout, tensors, tuple(opts["targets"]), opts["granularity"],
                                                 final_scales(scales))
            except KeyError as e:
                raise WiscaError(f"{ckpt.root / SCALES_NAME}: scales {FINAL}.{e.args[0]} missing "
                                 f"or of the wrong size") from e
            return new, None, mults

        with StagedOutput(dst_path, overwrite) as out:
            _, result = _rewrite(ckpt, out.tmp, unscale_layer, verifier, None, progress, final_fn=unscale_final)
            if result is not None and not result.passed:
                raise VerificationFailed("undo: the restored model does not compute the same function; "
                                         "nothing written", {"verification": result.to_dict()})
            copy_other_files(ckpt.root, out.tmp, skip=set(ckpt.shards) | {RECORD_NAME, SCALES_NAME} | engine)
            added = record.get("weights_from_engine")   # the source had the engine's weights only
            for name in added.get("added", []) if isinstance(added, dict) else []:
                if (out.tmp / name).is_file():
                    (out.tmp / name).unlink()
            from .training import transform_training_state

            state = transform_training_state(
                ckpt.root, out.tmp, _multipliers(ckpt, tuple(opts["targets"]), opts["granularity"], scales),
                list(ckpt.tensors), invert=True)
            out.commit()
        return {"command": "undo", "wisca_version": __version__, "source": str(ckpt.root),
                "output": str(dst_path), "verification": result.to_dict() if result else None,
                "training_state": state, "warnings": [],
                "seconds": round(time.perf_counter() - started, 3)}
    finally:
        ckpt.close()


# -- verify -----------------------------------------------------------------------------------
def _same_architecture(a: Checkpoint, b: Checkpoint) -> None:
    la, lb = a.layout, b.layout
    keys = ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "tie_embeddings")
    for key in keys:
        if getattr(la, key) != getattr(lb, key) or la.spec.name != lb.spec.name:
            raise WiscaError(f"{b.root}: not the same architecture as {a.root} ({key} differs)")


def verify(a: str | os.PathLike, b: str | os.PathLike, mode: str = default("mode"),
           probe_batch: int = default("probe_batch"), probe_len: int = default("probe_len"),
           seed: int = default("seed"), probe_ids_file: str | None = None,
           tolerance: Tolerance | dict | None = None, progress: Progress | None = None,
           revision: str | None = None, max_kl: float | None = None, min_top1: float | None = None,
           max_rel: float | None = None, config: str | None = None) -> dict:
    """Do checkpoints a and b compute the same function on the probe tokens?

    mode: "exact" (bit-identical logits), "tolerance", or "auto": exact unless b's wisca
    record says it was transformed with continuous scales. Tolerances: ``max_kl``,
    ``min_top1``, ``max_rel`` (or ``tolerance`` with any of them); those not given are the
    dtype's defaults. Two LoRA adapters are compared by their modules' B A products.
    """
    started = time.perf_counter()
    values = dict(probe_batch=probe_batch, probe_len=probe_len, seed=seed, probe_ids_file=probe_ids_file,
                  tolerance=tolerance, max_kl=max_kl, min_top1=min_top1, max_rel=max_rel, revision=revision)
    opts = TransformOptions.build(**{k: v for k, v in values.items()   # the ones set: not at their defaults
                                     if v != (OPTIONS[k].default if k in OPTIONS else None)})
    check("mode", mode)
    from .lora import is_adapter, verify_adapters

    if _dcp_input(a, config, revision) or _dcp_input(b, None):
        from . import dcp_api
        from .dcp import is_dcp
        for path in (a, b):
            if not is_dcp(path):
                raise WiscaError(f"{path}: not a torch.distributed checkpoint; verify compares two of the same kind")
        return dcp_api.verify(a, b, mode, (probe_batch, probe_len, seed, probe_ids_file), opts.given_tolerance(),
                              progress, config)

    if is_adapter(a) or is_adapter(b):
        mode = resolve_mode(mode, Path(b))
        warnings = not_applicable(opts, PROBE_FIELDS, "adapters are compared by their B A products")
        if opts.revision is not None:
            raise OptionError("revision", f"{a}: only applies to hub repo ids, not local folders")
        if mode == "exact":
            warnings += not_applicable(opts, (*TOLERANCE_FIELDS, "tolerance"), "mode exact")
        report = verify_adapters(a, b, mode == "exact", opts.given_tolerance())
        return {**report, "warnings": warnings, "seconds": round(time.perf_counter() - started, 3)}
    views = contextlib.ExitStack()
    with views:
        return _verify_folders(a, b, revision, mode, opts, probe_batch, probe_len, seed, probe_ids_file, progress,
                               started, views, config)


def _verify_folders(a, b, revision, mode, opts, probe_batch, probe_len, seed, probe_ids_file, progress, started,
                    views: contextlib.ExitStack, config=None) -> dict:
    ca = _open_weights(a, revision, views, config)
    try:
        cb = _open_weights(b, None, views)
        try:
            _same_architecture(ca, cb)
            mode = resolve_mode(mode, cb.root)
            warnings = []
            if probe_ids_file:
                warnings += not_applicable(opts, ("probe_batch", "probe_len", "seed"),
                                            "probe_ids_file gives the probe tokens")
            if mode == "exact":
                warnings += not_applicable(opts, (*TOLERANCE_FIELDS, "tolerance"), "mode exact (bit-identical logits)")
            tolerance = opts.given_tolerance()
            ids = probe_ids(ca.layout.vocab, probe_batch, probe_len, seed, probe_ids_file)
            verifier = StreamVerifier(ca.layout, ids, exact=mode == "exact", tolerance=_tolerance(ca, tolerance),
                                      dtype=compute_dtype(_main_torch_dtype(ca), mode == "exact"))
            result = verify_stream(ca, cb, verifier, progress)
            return {"command": "verify", "wisca_version": __version__, "a": str(ca.root), "b": str(cb.root),
                    "architecture": ca.layout.spec.name, "verification": result.to_dict(),
                    "warnings": warnings, "seconds": round(time.perf_counter() - started, 3)}
        finally:
            cb.close()
    finally:
        ca.close()


def _open_weights(src, revision, views: contextlib.ExitStack, config=None) -> Checkpoint:
    """``open_checkpoint``; a folder whose only weights are a DeepSpeed engine's fp32 masters
    (ZeRO 3 without gathered weights) is read through a ``deepspeed.WeightsView`` in the
    system's temporary folder (removed when ``views`` closes)."""
    from .deepspeed import WeightsView, weights_needed

    if revision is not None or not weights_needed(src):
        return open_checkpoint(src, revision)
    import tempfile

    ckpt = open_checkpoint(views.enter_context(WeightsView(Path(src), Path(tempfile.gettempdir()), config)))
    ckpt.root = Path(src).resolve()   # reports name the user's folder; the shards keep their own paths
    ckpt.source = str(ckpt.root)
    return ckpt


# -- inspect ---------------------------------------------------------------------------------
def inspect(src: str | os.PathLike, granularity: str = default("granularity"), norm: str = default("norm"),
            targets: Iterable[str] = DEFAULT_TARGETS, revision: str | None = None,
            progress: Progress | None = None, plot: str | os.PathLike | None = None,
            config: str | None = None) -> dict:
    """The weight pattern: per layer and pair kind, log2(||A|| / ||B||) of each unit.

    ``mean_abs_log2`` is the mean |log2 ratio| over the units at ``granularity`` (0 means
    perfectly balanced); ``heads`` gives the signed ratio per head (kv group; per expert
    for MoE ``ffn``). A LoRA adapter folder gives the same per module and rank channel.
    A folder written by ``transform`` also gets ``before``: the pattern of the original,
    reconstructed from the recorded scales. ``plot``: also draw it to this PNG.
    """
    granularity, norm = check("granularity", granularity), check("norm", norm)
    targets = check("targets", targets)
    if plot is not None and not Path(plot).parent.is_dir():
        raise OptionError("plot", f"{plot}: folder {Path(plot).parent} does not exist")
    from .lora import inspect_adapter, is_adapter

    if is_adapter(src):
        if revision is not None:
            raise OptionError("revision", f"{src}: only applies to hub repo ids, not local folders")
        _dcp_input(src, config)
        report = inspect_adapter(src, norm)
        report["warnings"] = [{"option": n, "message": "ignored: a LoRA adapter is inspected per rank channel"}
                              for n, v in (("granularity", granularity), ("targets", targets))
                              if v != default(n)]
    elif _dcp_input(src, config, revision):
        from .dcp_api import open_readable

        report = _inspect_model(open_readable(src, config), granularity, norm, targets, progress)
    else:
        with contextlib.ExitStack() as views:
            report = _inspect_model(_open_weights(src, revision, views, config), granularity, norm, targets,
                                    progress)
    if plot is not None:
        from .plot import plot_pattern

        before = report.get("before")
        title = f"weight pattern of {report['source']} ({report['architecture']})" + (
            ": before and after wisca transform" if before else "")
        report["plot"] = str(plot_pattern(before or report, plot, after=report if before else None, title=title))
    return report


def _inspect_model(ckpt, granularity: str, norm: str, targets: tuple[str, ...], progress: Progress | None) -> dict:
    try:
        record = scales = None
        if (ckpt.root / RECORD_NAME).is_file():
            record, scales = read_record(ckpt.root)
        layers, before = [], []
        for i in range(ckpt.layout.layers):
            roles = ckpt.layout.layer_roles(i)
            pairs = layer_pairs(ckpt.layout, i, targets, "channel")
            wanted = {m.role for pair in pairs for m in pair.members}
            if record is not None:
                wanted |= solve.covered_roles(ckpt.layout, i, tuple(record["options"]["targets"]),
                                              record["options"]["granularity"])
            wanted |= {r + FP8_SCALE for r in wanted if r + FP8_SCALE in roles}   # FP8 weights' block scales
            tensors = {role: ckpt.read(roles[role]) for role in wanted}
            layers.append(layer_pattern(ckpt.layout, i, tensors, targets, granularity, norm))
            if record is not None:
                prefix = f"layers.{i}."
                mine = {k[len(prefix):]: v for k, v in scales.items() if k.startswith(prefix)}
                try:
                    original = {**tensors, **solve.unscale_layer(
                        ckpt.layout, i, tensors, tuple(record["options"]["targets"]),
                        record["options"]["granularity"], mine)}
                except KeyError as e:
                    raise WiscaError(f"{ckpt.root / SCALES_NAME}: scales {prefix}{e.args[0]} missing "
                                     f"or of the wrong size") from e
                before.append(layer_pattern(ckpt.layout, i, original, targets, granularity, norm))
            if progress:
                progress(sum(t.numel() * t.element_size() for t in tensors.values()), f"layer {i}")
        final = final_pairs(ckpt.layout, targets, "channel")
        if final:   # final norm -> lm_head (the norm target, untied embeddings)
            names = _final_names(ckpt)
            tensors = {m.role: ckpt.read(names[m.role]) for m in final[0].members}
            layers.append(layer_pattern(ckpt.layout, FINAL, tensors, targets, granularity, norm, final))
            if record is not None:
                try:
                    original = {**tensors, **_unscale_final_whole(ckpt, tensors, record, scales)}
                except KeyError as e:
                    raise WiscaError(f"{ckpt.root / SCALES_NAME}: scales {FINAL}.{e.args[0]} missing "
                                     f"or of the wrong size") from e
                before.append(layer_pattern(ckpt.layout, FINAL, original, targets, granularity, norm, final))
        report = {"command": "inspect", "wisca_version": __version__, "source": ckpt.source,
                  "architecture": ckpt.layout.spec.name, "granularity": granularity, "norm": norm,
                  "warnings": mxfp4_warnings(targets, ckpt.layout.spec.targets, ckpt.layout.mxfp4_experts)
                  + fp8_warnings(ckpt.layout.fp8_block),
                  **_mxfp4_report(ckpt), **_fp8_report(ckpt), "summary": pattern_summary(layers, targets),
                  "layers": layers}
        if record is not None:
            report["before"] = {"source": f"{ckpt.source} before wisca transform (from its record)",
                                "architecture": ckpt.layout.spec.name,
                                "summary": pattern_summary(before, targets), "layers": before}
        return report
    finally:
        ckpt.close()


def _towers_report(ckpt) -> dict:
    """``other_towers``: in a multimodal checkpoint (``spec.multimodal``), the tensors outside
    the language model (vision and audio towers, projectors) by top-level module, each copied
    byte for byte (nothing for a text-only checkpoint)."""
    spec = ckpt.layout.spec
    if spec.multimodal is None or ckpt.config.get("model_type") not in spec.multimodal.model_types:
        return {}
    lm = spec.language_model_prefixes()
    towers: dict[str, dict] = {}
    for name, info in sorted(ckpt.tensors.items()):
        if not name.startswith(lm):
            parts = name.split(".")
            root = ".".join(parts[:2] if parts[0] == "model" and len(parts) > 2 else parts[:1])
            t = towers.setdefault(root, {"module": root, "tensors": 0, "bytes": 0, "copied_unchanged": True})
            t["tensors"] += 1
            t["bytes"] += info.nbytes
    return {"other_towers": list(towers.values())}


def _mxfp4_report(ckpt) -> dict:
    """``mxfp4_experts``: the MXFP4 tensors, copied unchanged (nothing for other checkpoints)."""
    lay = ckpt.layout
    if not lay.mxfp4_experts:
        return {}
    names = [name for i in range(lay.layers) for role, name in lay.layer_roles(i).items() if lay.is_mxfp4(role)]
    return {"mxfp4_experts": {"copied_unchanged": True, "tensors": names}}


def _fp8_report(ckpt, layers: list[dict] | None = None) -> dict:
    """``fp8``: the FP8 block-quantised weights (block size, how many); after a transform,
    ``fp8_clamped_units``: units whose scale the codes limited, ``fp8_folded_blocks``: blocks
    whose weight_scale_inv took a power of two (``fp8.scale_inv_copied_unchanged`` when none
    did) (nothing for other checkpoints)."""
    lay = ckpt.layout
    if not lay.fp8_weights:
        return {}
    names = sorted(name for i in range(lay.layers) for role, name in lay.layer_roles(i).items()
                   if lay.is_fp8(role, name))
    out = {"fp8": {"block_size": list(lay.fp8_block), "weights": len(names)}}
    if layers is not None:
        pairs = [p for rep in layers for p in rep.values() if isinstance(p, dict) and "fp8_clamped" in p]
        out["fp8"]["units"] = sum(p["units"] for p in pairs)
        out["fp8"]["units_changed"] = sum(p["units_changed"] for p in pairs)
        out["fp8_clamped_units"] = sum(p["fp8_clamped"] for p in pairs)
        out["fp8_folded_blocks"] = sum(p.get("fp8_folded_blocks", 0) for p in pairs)
        out["fp8"]["scale_inv_copied_unchanged"] = out["fp8_folded_blocks"] == 0
    return out


def _unscale_final_whole(ckpt: Checkpoint, tensors: dict[str, torch.Tensor], record: dict,
                         scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The final stage's tensors (the head whole) before the recorded transform."""
    opts = record["options"]
    new, mults = solve.unscale_final(ckpt.layout, tensors, tuple(opts["targets"]), opts["granularity"],
                                     final_scales(scales))
    if "head" in mults and "head" in tensors:
        new["head"] = apply_multiplier(tensors["head"], mults["head"])
    return new
