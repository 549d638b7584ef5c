"""WISCA for PEFT LoRA adapters: balance each module's lora_A / lora_B per rank channel.

A LoRA module adds ``dW = scaling * B A`` to a base weight (A ``[r, in]``, B ``[out, r]``,
``scaling = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; per-module
``rank_pattern`` / ``alpha_pattern`` override r and alpha). Row k of A times ``s[k]`` and
column k of B times ``1/s[k]`` leave ``B A`` unchanged (``pairs.lora_pair``). With
power-of-two scales every term ``B[i, k] A[k, j]`` is computed exactly as before, so the
products, PEFT's forward (``lora_B(lora_A(x))``) and merged weights are bit-identical.
DoRA magnitude vectors depend on the product only and stay as they are.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``; PEFT's
tensor names are ``base_model.model.<module>.lora_A.weight`` (embeddings:
``<module>.lora_embedding_A``). Other tensors (DoRA magnitudes, lora biases, modules to
save) are copied unchanged. A Trainer checkpoint of an adapter (``optimizer.pt`` beside it)
gets its optimizer state carried over too (``training.transform_training_state``).

    from wisca_cli.lora import transform_adapter, undo_adapter
    transform_adapter("adapter/", "adapter-wisca/", base="base-model/")   # + logits check
    undo_adapter("adapter-wisca/", "adapter-restored/")                   # bit-identical again
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .errors import VerificationFailed, WiscaError, reason
from .options import default
from .record import (RECORD_FORMAT, RECORD_NAME, SCALES_NAME, pair_report, read_record, record_kind, save_tensors,
                     shard_metadata)
from .record import stamp as record_stamp
from .record import write_record

from .formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter  # noqa: F401 - re-exported
KIND = "lora-adapter"
PREFIX = "base_model.model."
_LINEAR = re.compile(r"^(?P<mod>.+)\.lora_(?P<side>[AB])\.weight$")
_EMBED = re.compile(r"^(?P<mod>.+)\.lora_embedding_(?P<side>[AB])$")
# max |B'A' - BA| / max |BA| allowed with continuous scales, by adapter dtype
PRODUCT_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass
class LoraModule:
    prefix: str          # adapter tensor prefix: base_model.model.model.layers.0.self_attn.q_proj
    key: str             # module in the base model: model.layers.0.self_attn.q_proj
    a: str               # tensor names in the adapter
    b: str
    embedding: bool      # lora_embedding_A/B: dW = (B A)^T on an embedding table
    rank: int
    scaling: float


# -- reading --------------------------------------------------------------------------------
def _pattern_key(keys, module_key: str) -> str | None:
    """peft.utils.other.get_pattern_key: the first pattern matching the module's name end."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module_key):
            return key
    return None


def read_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WiscaError(f"{path}: cannot read the adapter config: {reason(e)}") from e
    if not isinstance(config, dict):
        raise WiscaError(f"{path}: not a JSON object")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise WiscaError(f"{path}: peft_type {kind!r} is not a LoRA adapter (only LORA is supported)")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise WiscaError(f"{path}: field 'r' must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise WiscaError(f"{path}: field 'lora_alpha' must be a number, got {alpha!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            raise WiscaError(f"{path}: field {field!r} must be an object")
    return config


def _modules(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> list[LoraModule]:
    where = folder / ADAPTER_WEIGHTS
    sides: dict[tuple[str, bool], dict[str, str]] = {}
    for name in tensors:
        m = _LINEAR.match(name) or _EMBED.match(name)
        if m:
            sides.setdefault((m["mod"], m.re is _EMBED), {})[m["side"]] = name
    if not sides:
        raise WiscaError(f"{where}: no LoRA tensors (names ending in .lora_A.weight / .lora_B.weight)")
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules = []
    for (prefix, embedding), pair in sorted(sides.items()):
        if set(pair) != {"A", "B"}:
            have = next(iter(pair.values()))
            raise WiscaError(f"{where}: {have} has no lora_{'B' if 'A' in pair else 'A'} partner")
        a, b = tensors[pair["A"]], tensors[pair["B"]]
        for name, t in ((pair["A"], a), (pair["B"], b)):
            if t.dim() < 2 or not t.is_floating_point():
                raise WiscaError(f"{where}: {name} must be a floating-point matrix, got {t.dtype} {tuple(t.shape)}")
        if a.shape[0] != b.shape[1]:
            raise WiscaError(f"{where}: {prefix}: lora_A has rank {a.shape[0]} ({tuple(a.shape)}) but lora_B has "
                             f"{b.shape[1]} ({tuple(b.shape)})")
        key = prefix[len(PREFIX):] if prefix.startswith(PREFIX) else prefix
        rk, ak = _pattern_key(ranks, key), _pattern_key(alphas, key)
        r = ranks[rk] if rk is not None else config["r"]
        alpha = alphas[ak] if ak is not None else config["lora_alpha"]
        if a.shape[0] != r:
            raise WiscaError(f"{where}: {prefix}: rank {a.shape[0]} does not match r = {r} in {ADAPTER_CONFIG}")
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules.append(LoraModule(prefix, key, pair["A"], pair["B"], embedding, r, scaling))
    return modules


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor], dict | None, list[LoraModule]]:
    """(adapter config, tensors, safetensors metadata, LoRA modules), validated."""
    from safetensors import SafetensorError, safe_open

    if not is_adapter(folder):
        raise WiscaError(f"{folder}: not a PEFT adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = read_config(folder)
    where = folder / ADAPTER_WEIGHTS
    try:
        with safe_open(str(where), "pt") as f:
            metadata = f.metadata()
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WiscaError(f"{where}: cannot read: {reason(e, 200)}") from e
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise WiscaError(f"{where}: tensor {name} contains NaN or Inf")
    return config, tensors, metadata, _modules(folder, config, tensors)


# -- the math ---------------------------------------------------------------------------------
def _product(module: LoraModule, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """B A in float32 (float64 for float64 adapters): ``[out, in]`` for linear layers and
    embeddings; conv layers (A ``[r, in, k...]``, B ``[out, r, 1...]``) flattened alike."""
    a, b = tensors[module.a], tensors[module.b]
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    rank = a.shape[0]
    return b.transpose(0, 1).reshape(rank, -1).t().to(dtype) @ a.reshape(rank, -1).to(dtype)


def _pair_report(module: LoraModule, r) -> dict:
    return {"module": module.key, "rank": module.rank, "scaling": module.scaling, **pair_report(r)}


def _summarise(reports: list[dict]) -> dict:
    live = [(r, r["units"] - r["dead"]) for r in reports]
    n = max(sum(w for _, w in live), 1)
    return {"modules": len(reports), "units": sum(r["units"] for r in reports), "dead": sum(r["dead"] for r in reports),
            "clamped": sum(r["clamped"] for r in reports),
            "imbalance_before": sum(r["imbalance_before"] * w for r, w in live) / n,
            "imbalance_after": sum(r["imbalance_after"] * w for r, w in live) / n,
            "log2_scale_min": min((r["log2_scale_min"] for r in reports), default=0.0),
            "log2_scale_max": max((r["log2_scale_max"] for r in reports), default=0.0)}


def _multipliers(modules: list[LoraModule], tensors: dict, scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """adapter tensor name -> S (float64, broadcastable): A' = S A, B' = S B."""
    from .balance import member_multipliers
    from .pairs import lora_pair

    out = {}
    for m in modules:
        shapes = {"lora_A": tuple(tensors[m.a].shape), "lora_B": tuple(tensors[m.b].shape)}
        mult = member_multipliers(lora_pair(m.rank), scales[m.prefix].double(), shapes)
        out[m.a], out[m.b] = mult["lora_A"], mult["lora_B"]
    return out


def _compare_products(modules: list[LoraModule], old: dict, new: dict, exact: bool,
                      tol: float | None = None) -> dict:
    """Every module's B A, old against new; ``tol``: max relative difference (default by dtype)."""
    worst, worst_module, identical = 0.0, None, True
    if tol is None:
        tol = max(PRODUCT_TOLERANCE.get(old[m.a].dtype, 1e-5) for m in modules) if modules else 0.0
    for m in modules:
        p, q = _product(m, old), _product(m, new)
        if not torch.equal(p, q):
            identical = False
            rel = float((p - q).abs().max()) / (float(p.abs().max()) or 1.0)
            if not math.isfinite(rel):
                rel = math.inf
            if rel >= worst:
                worst, worst_module = rel, m.key
    passed = identical if exact else worst <= tol
    return {"modules": len(modules), "identical": identical, "max_rel_diff": worst, "passed": passed,
            "first_failing_module": None if passed else worst_module, "tolerance": None if exact else tol}


# -- base model + adapter forward ------------------------------------------------------------
def _deltas(modules: list[LoraModule], tensors: dict, fan_in_fan_out: bool) -> dict[str, torch.Tensor]:
    """base tensor name -> scaling * B A, laid out like the base tensor."""
    out = {}
    for m in modules:
        d = _product(m, tensors).float() * m.scaling
        if m.embedding or fan_in_fan_out:
            d = d.t()
        out[m.key + ".weight"] = d
    return out


def verify_with_base(base: str | os.PathLike, config: dict, modules: list[LoraModule], old: dict, new: dict,
                     exact: bool, probe_batch: int = default("probe_batch"), probe_len: int = default("probe_len"),
                     seed: int = default("seed"),
                     probe_ids_file: str | None = None, tolerance: dict | None = None) -> dict:
    """Logits of base + original adapter against base + transformed adapter.

    Both adapters are merged into the base weights (``W + scaling * B A``) stage by stage as
    the base checkpoint streams (``stream.verify_derived``: the same walk as ``wisca
    verify``) through the project's reference forward, in float32. Returns the verifier's
    result as a dict.
    """
    from .checkpoint import open_checkpoint
    from .stream import verify_derived
    from .verifier import StreamVerifier, probe_ids, resolve_tolerance

    if config.get("use_dora"):
        raise WiscaError(f"{ADAPTER_CONFIG}: checking logits with a base model is not supported for DoRA adapters "
                         f"(run without a base model: the B A products are still verified)")
    ckpt = open_checkpoint(base)
    try:
        lay, spec = ckpt.layout, ckpt.layout.spec
        fan = bool(config.get("fan_in_fan_out"))
        d_old, d_new = _deltas(modules, old, fan), _deltas(modules, new, fan)
        tied_head = spec.lm_head if lay.tie_embeddings else None   # a tied model stores no lm_head
        for name, d in d_old.items():
            info = ckpt.tensors.get(spec.embed if name == tied_head else name)
            if info is None:
                raise WiscaError(f"{ckpt.root}: the adapter adapts {name[:-len('.weight')]}, which the base model "
                                 f"does not have (no tensor {name})")
            if tuple(d.shape) != tuple(info.shape):
                raise WiscaError(f"{ckpt.root}: the adapter's update of {name} has shape {tuple(d.shape)} but the "
                                 f"base tensor has {tuple(info.shape)}: not this adapter's base model")
        used: set[str] = set()

        def derive(role: str, name: str, w: torch.Tensor, first_row: int):
            """The base tensor (or a row block of it) merged with each adapter's update.
            A tied head reads the base table: only a LoRA of lm_head itself changes it."""
            key = spec.lm_head if role == "head" else name
            if key not in d_old:
                return w, w
            used.add(key)
            rows = slice(first_row, first_row + w.shape[0])
            return w.float() + d_old[key][rows], w.float() + d_new[key][rows]

        ids = probe_ids(lay.vocab, probe_batch, probe_len, seed, probe_ids_file)
        verifier = StreamVerifier(lay, ids, exact=exact, tolerance=resolve_tolerance("F32", tolerance),
                                  dtype=torch.float32)
        result = verify_derived(ckpt, verifier, derive)
        unused = sorted(set(d_old) - used)
        if unused:
            raise WiscaError(f"{ckpt.root}: the adapter adapts {unused[0][:-len('.weight')]}, which the reference "
                             f"forward does not read; cannot check logits with this base model")
        return result.to_dict()
    finally:
        ckpt.close()


# -- transform / undo -----------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name, as api.transform reports it."""
    return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}.get(
        dtype, str(dtype).split(".")[-1])


def _write(out_tmp: Path, src: Path, tensors: dict | None, metadata: dict | None, stamp: dict | None) -> None:
    if tensors is None:        # nothing changed: the file byte for byte
        shutil.copyfile(src / ADAPTER_WEIGHTS, out_tmp / ADAPTER_WEIGHTS)
        return
    save_tensors(out_tmp / ADAPTER_WEIGHTS, tensors, shard_metadata(metadata, stamp))


def _training_state(src: Path, tmp: Path, multipliers: dict, names: list[str], invert: bool,
                    base: Path | None, trivial: bool, mode: str = "transform") -> dict:
    from .training import find_optimizer_state, transform_training_state

    if trivial and mode != "drop":
        path, others = find_optimizer_state(src)
        return {"optimizer": {"file": path.name, "transformed": True, "tensors": 0,
                              "note": "every scale is 1: the optimizer state is unchanged"}} if path else {}
    return transform_training_state(src, tmp, multipliers, names, invert, base=base, mode=mode)


def transform_adapter(src: str | os.PathLike, dst: str | os.PathLike, pow2: bool = True, norm: str = "fro",
                      strength: float = 1.0, overwrite: bool = False, base: str | os.PathLike | None = None,
                      verify: bool = True, probe: tuple | None = None, tolerance: dict | None = None,
                      warnings: list | None = None, training_state: str = "transform") -> dict:
    """Balance a PEFT LoRA adapter's A/B pairs per rank channel; write it to dst if it verifies.

    ``pow2`` (default): power-of-two scales, every B A product bit-identical. ``norm``:
    ``fro`` or ``rms``. ``strength``: use ``s ** strength``. ``base``: a model folder;
    base + adapter logits before and after are then compared too (reference forward).
    ``verify=False`` skips both checks. An adapter whose B is all zeros (fresh init) has
    nothing to balance: reported as such, its files copied byte for byte.

    Writes ``wisca.json`` (the report) and ``wisca_scales.safetensors`` (module -> s,
    float32) beside the adapter, so ``undo_adapter`` restores it bit-identically; an
    optimizer state in the folder (a Trainer checkpoint) is carried into the new
    parametrisation (``training_state="drop"``: left out of the output instead; a state
    wisca cannot rescale is refused). ``probe`` (batch, length, seed, ids file) and ``tolerance`` (fields
    not given: float32 defaults) apply to the base + adapter logits check. Raises
    ``VerificationFailed`` or ``WiscaError``; nothing is written then.
    """
    from .balance import apply_scales, solve_pair
    from .options import check
    from .output import StagedOutput, check_target, copy_other_files
    from .pairs import lora_pair

    norm, strength = check("norm", norm), check("strength", strength)
    started = time.perf_counter()
    src = Path(src).resolve() if Path(src).exists() else Path(src)
    if not src.is_dir():
        raise WiscaError(f"{src}: no such adapter folder")
    config, tensors, metadata, modules = read_adapter(src)
    dst_path = check_target(src, Path(dst), overwrite)
    base_path = Path(base).resolve() if base is not None else None
    from .training import plan_training_state

    dropped = plan_training_state(src, check("training_state", training_state))   # refuses before any work

    new: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    reports = []
    for m in modules:
        pair = lora_pair(m.rank)
        t = {"lora_A": tensors[m.a], "lora_B": tensors[m.b]}
        dtype = min((x.dtype for x in t.values()), key=lambda d: torch.finfo(d).max)
        result = solve_pair(pair, t, norm, strength, pow2, dtype)
        scaled = apply_scales(pair, t, result.scales.double())
        new[m.a], new[m.b] = scaled["lora_A"], scaled["lora_B"]
        scales[m.prefix] = result.scales
        reports.append(_pair_report(m, result))
    summary = _summarise(reports)
    trivial = all(bool((s == 1).all()) for s in scales.values())
    nothing = summary["dead"] == summary["units"]
    summary["nothing_to_balance"] = nothing
    out_tensors = {**tensors, **new}

    verification = None
    if verify:
        exact = pow2
        products = _compare_products(modules, tensors, out_tensors, exact, (tolerance or {}).get("max_rel"))
        verification = {"mode": "exact" if exact else "tolerance", "passed": products["passed"],
                        "identical": products["identical"], "products": products, "base": None}
        if base_path is not None and products["passed"]:
            probe = probe or (default("probe_batch"), default("probe_len"), default("seed"), None)
            res = verify_with_base(base_path, config, modules, tensors, out_tensors, exact, *probe,
                                   tolerance=tolerance)
            verification["base"] = res
            verification["passed"] = res["passed"]
            verification["identical"] = products["identical"] and res["identical"]
    report = {
        "command": "transform", "kind": KIND, "wisca_version": __version__, "record_format": RECORD_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": str(src), "output": str(dst_path), "architecture": "lora",
        "base_model": config.get("base_model_name_or_path"), "dtype": _dtype_name(tensors[modules[0].a].dtype),
        "options": {"scales": "pow2" if pow2 else "continuous", "norm": norm, "strength": strength,
                    "granularity": "channel", "targets": ["lora"], "verify": verify,
                    "base": str(base_path) if base_path else None},
        "targets_applied": ["lora"], "targets_not_applicable": [],
        "exactness": {"lora": "exact" if pow2 else "tolerance"},
        "warnings": list(warnings or []),
        "summary": {"lora": summary},
        "verification": verification,
        "scales_file": SCALES_NAME,
        "undo": f"wisca undo {dst_path} RESTORED  (multiplies back by the recorded scales; "
                f"{'bit-exact' if pow2 else 'exact up to rounding'})",
        "modules": reports,
    }
    if nothing:
        report["note"] = "every lora_B is zero (a fresh adapter): nothing to balance; the adapter is copied unchanged"
    if verification is not None and not verification["passed"]:
        bad = verification["products"]["first_failing_module"]
        where = f"module {bad}" if bad else "the base model's logits"
        raise VerificationFailed(f"verification failed: base + adapter differ at {where}; nothing written", report)

    with StagedOutput(dst_path, overwrite) as out:
        copy_other_files(src, out.tmp, skip={ADAPTER_WEIGHTS, RECORD_NAME, SCALES_NAME} | dropped)
        _write(out.tmp, src, None if trivial else out_tensors, metadata,
               record_stamp())
        mults = _multipliers(modules, tensors, scales)
        report["training_state"] = _training_state(src, out.tmp, mults, list(tensors), False, base_path, trivial,
                                                   training_state)
        report["seconds"] = round(time.perf_counter() - started, 3)
        write_record(out.tmp, report, scales, {"kind": KIND})
        out.commit()
    return report


def read_adapter_record(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    record, scales = read_record(folder, "an adapter")
    path = folder / RECORD_NAME
    if record.get("record_format") != RECORD_FORMAT or record.get("kind") != KIND:
        raise WiscaError(f"{path}: not a LoRA adapter record of wisca {__version__} "
                         f"(format {record.get('record_format')!r}, kind {record.get('kind')!r})")
    return record, scales


def is_adapter_record(folder: str | os.PathLike) -> bool:
    """True when folder holds a wisca record of a transformed adapter (undo -> undo_adapter)."""
    return record_kind(folder) == KIND


def undo_adapter(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False,
                 base: str | os.PathLike | None = None, verify: bool = True) -> dict:
    """Multiply the recorded scales back out: the original adapter, bit-identical for pow2.

    The optimizer state of a transformed adapter checkpoint is carried back as well.
    Verification: every module's B A product equals the transformed adapter's (exactly
    for pow2 scales, within tolerance otherwise).
    """
    from .balance import apply_scales
    from .output import StagedOutput, check_target, copy_other_files
    from .pairs import lora_pair

    started = time.perf_counter()
    src = Path(src).resolve() if Path(src).exists() else Path(src)
    if not src.is_dir():
        raise WiscaError(f"{src}: no such adapter folder")
    record, scales = read_adapter_record(src)
    config, tensors, metadata, modules = read_adapter(src)
    dst_path = check_target(src, Path(dst), overwrite)
    from .training import plan_training_state

    plan_training_state(src)   # a state wisca cannot carry back is refused before any work
    pow2 = record.get("options", {}).get("scales", "pow2") == "pow2"
    new = {}
    for m in modules:
        s = scales.get(m.prefix)
        if s is None or s.shape != (m.rank,):
            raise WiscaError(f"{src / SCALES_NAME}: scales of {m.prefix} missing or of the wrong size")
        t = {"lora_A": tensors[m.a], "lora_B": tensors[m.b]}
        back = apply_scales(lora_pair(m.rank), t, 1.0 / s.double())
        new[m.a], new[m.b] = back["lora_A"], back["lora_B"]
    extra = sorted(set(scales) - {m.prefix for m in modules})
    if extra:
        raise WiscaError(f"{src / SCALES_NAME}: scales for {extra[0]}, which the adapter does not have")
    out_tensors = {**tensors, **new}
    verification = None
    if verify:
        products = _compare_products(modules, tensors, out_tensors, pow2)
        verification = {"mode": "exact" if pow2 else "tolerance", "passed": products["passed"],
                        "identical": products["identical"], "products": products, "base": None}
        if not products["passed"]:
            raise VerificationFailed(f"undo: the restored adapter's B A differs at "
                                     f"{products['first_failing_module']}; nothing written",
                                     {"verification": verification})
    trivial = all(bool((s == 1).all()) for s in scales.values())
    base_path = Path(base).resolve() if base is not None else (
        Path(record["options"]["base"]) if record.get("options", {}).get("base") else None)
    with StagedOutput(dst_path, overwrite) as out:
        copy_other_files(src, out.tmp, skip={ADAPTER_WEIGHTS, RECORD_NAME, SCALES_NAME})
        _write(out.tmp, src, None if trivial else out_tensors, metadata, None)
        mults = _multipliers(modules, tensors, scales)
        state = _training_state(src, out.tmp, mults, list(tensors), True, base_path, trivial)
        out.commit()
    return {"command": "undo", "kind": KIND, "wisca_version": __version__, "source": str(src),
            "output": str(dst_path), "verification": verification,
            "training_state": state, "warnings": [], "seconds": round(time.perf_counter() - started, 3)}


# -- inspect / verify -------------------------------------------------------------------------
def inspect_adapter(folder: str | os.PathLike, norm: str = "fro") -> dict:
    """The weight pattern of an adapter: per module and rank channel, the signed
    log2(||A[k]|| / ||B[:, k]||) (NaN, reported as None, where a side is zero)."""
    from .balance import log2_imbalance, unit_stats
    from .pairs import lora_pair

    folder = Path(folder)
    config, tensors, _, modules = read_adapter(folder)
    out = []
    for m in modules:
        pair = lora_pair(m.rank)
        ratio = log2_imbalance(unit_stats(pair, {"lora_A": tensors[m.a], "lora_B": tensors[m.b]}), norm)
        live = ratio[~torch.isnan(ratio)]
        out.append({"module": m.key, "rank": m.rank, "units": m.rank, "dead": int(torch.isnan(ratio).sum()),
                    "mean_abs_log2": float(live.abs().mean()) if len(live) else 0.0,
                    "max_abs_log2": float(live.abs().max()) if len(live) else 0.0,
                    "channels": [None if x != x else round(float(x), 4) for x in ratio]})
    n = sum(r["units"] - r["dead"] for r in out)
    summary = {"lora": {"modules": len(out),
                        "mean_abs_log2": sum(r["mean_abs_log2"] * (r["units"] - r["dead"]) for r in out) / max(n, 1),
                        "max_abs_log2": max((r["max_abs_log2"] for r in out), default=0.0)}}
    report = {"command": "inspect", "kind": KIND, "wisca_version": __version__, "source": str(folder),
              "architecture": "lora", "base_model": config.get("base_model_name_or_path"),
              "granularity": "channel", "norm": norm, "summary": summary, "modules": out}
    if is_adapter_record(folder):   # transformed by wisca: the original's pattern from the record
        record, scales = read_adapter_record(folder)
        before = {name: t for name, t in tensors.items()}
        from .balance import apply_scales

        for m in modules:
            s = scales.get(m.prefix)
            if s is None or s.shape != (m.rank,):
                raise WiscaError(f"{folder / SCALES_NAME}: scales of {m.prefix} missing or of the wrong size")
            back = apply_scales(lora_pair(m.rank), {"lora_A": tensors[m.a], "lora_B": tensors[m.b]}, 1.0 / s.double())
            before[m.a], before[m.b] = back["lora_A"], back["lora_B"]
        rows = []
        for m, r in zip(modules, out):
            ratio = log2_imbalance(unit_stats(lora_pair(m.rank), {"lora_A": before[m.a], "lora_B": before[m.b]}), norm)
            rows.append({**r, "channels": [None if x != x else round(float(x), 4) for x in ratio]})
        report["before"] = {"source": f"{folder} before wisca transform (from its record)", "kind": KIND,
                            "architecture": "lora", "modules": rows}
    return report


def verify_adapters(a: str | os.PathLike, b: str | os.PathLike, exact: bool, tolerance: dict | None = None) -> dict:
    """Do two adapters make the same updates? Every module's B A product compared
    (bit for bit, or within ``tolerance['max_rel']``, default by dtype)."""
    a, b = Path(a), Path(b)
    for folder in (a, b):
        if not is_adapter(folder):
            raise WiscaError(f"{folder}: not a PEFT adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}); "
                             f"an adapter can only be compared with an adapter")
    _, ta, _, ma = read_adapter(a)
    _, tb, _, mb = read_adapter(b)
    if [(m.prefix, m.rank) for m in ma] != [(m.prefix, m.rank) for m in mb]:
        raise WiscaError(f"{b}: not the same adapter modules and ranks as {a}")
    tb_named = {m.a: tb[n.a] for m, n in zip(ma, mb)} | {m.b: tb[n.b] for m, n in zip(ma, mb)}
    products = _compare_products(ma, ta, {**ta, **tb_named}, exact, (tolerance or {}).get("max_rel"))
    verification = {"mode": "exact" if exact else "tolerance", "passed": products["passed"],
                    "identical": products["identical"], "products": products, "base": None}
    return {"command": "verify", "kind": KIND, "wisca_version": __version__, "a": str(a), "b": str(b),
            "architecture": "lora", "verification": verification}
