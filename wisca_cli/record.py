"""The record a transform leaves beside its output: what was done, and how to undo it.

Two files, the same for models and adapters:

- ``wisca.json``: the report (tool version, options, per-pair summary, verification,
  the undo command); ``kind`` says ``lora-adapter`` for adapters.
- ``wisca_scales.safetensors``: the scales as applied, float32, one per unit, keyed
  ``layers.{i}.{kind}`` (models) or by LoRA module prefix (adapters); for FP8 weights also the
  powers of two folded into ``weight_scale_inv``, int16 per block, keyed
  ``layers.{i}.{kind}.fp8_fold.{role}.rows|cols`` (``solve.fold_key``; only nonzero ones).

Output shards get a ``wisca`` metadata entry pointing at the record. Everything here is
written byte for byte reproducibly: the same scales and report give the same files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import __version__
from .checkpoint import TensorInfo, build_header
from .errors import WiscaError, reason
from .pairs import layer_pairs

RECORD_NAME = "wisca.json"
SCALES_NAME = "wisca_scales.safetensors"
RECORD_FORMAT = 1
RECORD_FILES = (RECORD_NAME, SCALES_NAME)
VOLATILE = ("created", "seconds")   # in the returned report, not in the record: same input, same files
_SAFETENSORS_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def stamp() -> dict:
    """The ``wisca`` metadata entry of every output shard."""
    return {"version": __version__, "record": RECORD_NAME}


def shard_metadata(meta: dict | None, with_stamp: dict | None) -> dict | None:
    """A shard's safetensors metadata with the ``wisca`` entry replaced (or dropped)."""
    out = {k: v for k, v in (meta or {}).items() if k != "wisca"}
    if with_stamp:
        out["wisca"] = json.dumps(with_stamp, separators=(",", ":"))
    return out or None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file with tensors and metadata in sorted order: reproducible bytes
    (``safetensors.torch.save_file`` orders metadata keys differently from run to run)."""
    infos, blobs, offset = [], [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        infos.append(TensorInfo(name, path.name, _SAFETENSORS_DTYPE[t.dtype], tuple(t.shape), 0, raw.numel(), offset))
        blobs.append(raw)
        offset += raw.numel()
    meta = {k: str(metadata[k]) for k in sorted(metadata)} if metadata else None
    with open(path, "wb") as f:
        f.write(build_header(infos, meta))
        for raw in blobs:
            f.write(raw.numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


def write_record(folder: Path, report: dict, scales: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """wisca.json and the scales into ``folder`` (the temporary output), without the
    report's run time and wall-clock fields (``VOLATILE``), so the same input and options
    give the same files; a write failure (a full disk) is an input error naming the folder."""
    kept = {k: v for k, v in report.items() if k not in VOLATILE}
    try:
        save_tensors(folder / SCALES_NAME, scales, {"wisca_version": __version__, **metadata})
        (folder / RECORD_NAME).write_text(json.dumps(kept, indent=1) + "\n")
    except OSError as e:
        raise WiscaError(f"{folder.parent}: writing the record failed: {e.strerror or e}") from e


def read_record(folder: Path, what: str = "a checkpoint") -> tuple[dict, dict[str, torch.Tensor]]:
    """wisca.json and the recorded scales of a folder written by wisca transform."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / RECORD_NAME
    if not path.is_file():
        raise WiscaError(f"{folder}: no {RECORD_NAME}: not {what} written by wisca transform")
    try:
        record = json.loads(path.read_text())
        scales = load_file(str(folder / SCALES_NAME))
    except (OSError, ValueError, SafetensorError) as e:
        raise WiscaError(f"{path}: cannot read the wisca record: {reason(e)}") from e
    if not isinstance(record, dict) or record.get("record_format") != RECORD_FORMAT:
        got = record.get("record_format") if isinstance(record, dict) else None
        raise WiscaError(f"{path}: record format {got!r} is not supported by wisca {__version__}")
    return record, scales


def record_kind(folder: str | os.PathLike) -> str | None:
    """``kind`` of a folder's wisca record ("lora-adapter"), "model" for a model's, None
    when there is no readable record."""
    try:
        record = json.loads((Path(folder) / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record.get("kind", "model") if isinstance(record, dict) else None


def layer_scales(scales: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    """pair kind -> scales of one decoder layer, from the record's ``layers.{i}.{kind}`` keys."""
    prefix = f"layers.{layer}."
    return {k[len(prefix):]: v for k, v in scales.items() if k.startswith(prefix)}


def final_scales(scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """pair kind -> scales of the final stage (final norm -> lm_head), from ``final.{kind}`` keys."""
    prefix = "final."
    return {k[len(prefix):]: v for k, v in scales.items() if k.startswith(prefix)}


# -- report summaries ---------------------------------------------------------------------
def summarise(layer_reports: list[dict]) -> dict:
    """Per pair kind, over the layers' reports: units, dead, clamped, mean |log2 imbalance|
    before and after (weighted by live units), log2 scale range, units changed."""
    summary: dict[str, dict] = {}
    for rep in layer_reports:
        for kind, p in rep.items():
            if not isinstance(p, dict):   # the layer number, a module's name and rank
                continue
            s = summary.setdefault(kind, {"units": 0, "dead": 0, "clamped": 0, "_b": 0.0, "_a": 0.0,
                                          "_n": 0, "log2_scale_min": 0.0, "log2_scale_max": 0.0,
                                          "units_changed": 0})
            live = p["units"] - p["dead"]
            s["units"] += p["units"]
            s["dead"] += p["dead"]
            s["clamped"] += p["clamped"]
            if "fp8_clamped" in p:   # pairs on FP8 weights
                s["fp8_clamped"] = s.get("fp8_clamped", 0) + p["fp8_clamped"]
                s["fp8_folded_blocks"] = s.get("fp8_folded_blocks", 0) + p.get("fp8_folded_blocks", 0)
            s["units_changed"] += p.get("units_changed", 0)
            s["_b"] += p["imbalance_before"] * live
            s["_a"] += p["imbalance_after"] * live
            s["_n"] += live
            s["log2_scale_min"] = min(s["log2_scale_min"], p["log2_scale_min"])
            s["log2_scale_max"] = max(s["log2_scale_max"], p["log2_scale_max"])
    for s in summary.values():
        n = max(s.pop("_n"), 1)
        s["imbalance_before"] = s.pop("_b") / n
        s["imbalance_after"] = s.pop("_a") / n
    return summary


def pair_report(r) -> dict:
    """One pair's report from its ``balance.PairResult``."""
    live = ~torch.isnan(r.before)
    log2s = torch.log2(r.scales.double())
    mean = lambda x: float(x[live].abs().mean()) if bool(live.any()) else 0.0  # noqa: E731
    out = {"units": len(r.scales), "dead": r.dead, "clamped": r.clamped,
           "units_changed": int((r.scales != 1).sum()),
           "imbalance_before": mean(r.before), "imbalance_after": mean(r.after),
           "log2_scale_min": float(log2s.min()), "log2_scale_max": float(log2s.max())}
    if getattr(r, "fp8_clamped", None) is not None:   # units the FP8 codes limited (also in clamped)
        out["fp8_clamped"] = r.fp8_clamped
        out["fp8_folded_blocks"] = sum(int((b != 0).sum()) for b in (r.fp8_folds or {}).values())
    return out


# -- weight patterns (inspect) ----------------------------------------------------------------
def layer_pattern(layout, layer: int | str, tensors: dict[str, torch.Tensor], targets: tuple[str, ...],
                   granularity: str, norm: str, pairs=None) -> dict:
    """One layer's weight pattern: per pair kind, the units' |log2 ratio| and per head (kv
    group, expert or norm) the signed log2(||A|| / ||B||). ``pairs``: other pairs than the
    decoder layer's (the final stage's, ``layer="final"``)."""
    from .balance import log2_imbalance, unit_stats

    entry: dict = {"layer": layer}
    for pair in layer_pairs(layout, layer, targets, "channel") if pairs is None else pairs:
        block = layout.fp8_block   # FP8 weights count dequantised
        units = log2_imbalance(unit_stats(pair.regroup(granularity), tensors, fp8_block=block), norm)
        heads = log2_imbalance(unit_stats(pair.regroup("head"), tensors, fp8_block=block), norm)
        live = units[~torch.isnan(units)]
        entry[pair.kind] = {
            "units": len(units), "dead": int(torch.isnan(units).sum()),
            "mean_abs_log2": float(live.abs().mean()) if len(live) else 0.0,
            "max_abs_log2": float(live.abs().max()) if len(live) else 0.0,
            "heads": [None if x != x else round(float(x), 4) for x in heads],
        }
    return entry


def pattern_summary(layers: list[dict], targets: tuple[str, ...]) -> dict:
    summary = {}
    for kind in targets:
        vals = [(e[kind]["mean_abs_log2"], e[kind]["units"] - e[kind]["dead"]) for e in layers if kind in e]
        n = sum(w for _, w in vals)
        if vals:
            summary[kind] = {"mean_abs_log2": sum(v * w for v, w in vals) / max(n, 1),
                             "max_abs_log2": max(e[kind]["max_abs_log2"] for e in layers if kind in e)}
    return summary


def resolve_mode(mode: str, b_root: Path) -> str:
    """auto: exact unless b's wisca record says its transform rounds."""
    if mode != "auto":
        return mode
    rec = b_root / RECORD_NAME
    try:
        record = json.loads(rec.read_text()) if rec.is_file() else {}
        rounds = record["options"]["scales"] == "continuous" or "tolerance" in record.get("exactness", {}).values()
    except (ValueError, KeyError, TypeError, OSError):
        rounds = False
    return "tolerance" if rounds else "exact"
