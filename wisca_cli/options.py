"""Every option of every command, stated once: its default, choices, range and help.

The API's option objects (``TransformOptions``, the keyword arguments of ``verify``,
``inspect`` and ``undo``) take their defaults from this table, and the command line
builds its flags from it (``cli._flag``), so the two cannot drift apart. ``check``
validates a value and names the *field* in its error (``OptionError.field``); the CLI
rewrites that to the flag (``--max-kl``). Pure: no torch, no I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any

from .errors import WiscaError

GRANULARITIES = ("layer", "head", "channel")
DEFAULT_TARGETS = ("qk", "vo", "ffn")
EXTRA_TARGETS = ("norm", "conv")      # off by default
ALL_TARGETS = DEFAULT_TARGETS + EXTRA_TARGETS
NORMS = ("fro", "rms")
SCALES = ("pow2", "continuous")
MODES = ("auto", "exact", "tolerance")
TRAINING_STATE_MODES = ("transform", "drop")


class OptionError(WiscaError):
    """A bad option value; ``field`` is the API's name for it (the CLI shows the flag)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.detail = field, message


@dataclass(frozen=True)
class Option:
    name: str                      # the API's field / keyword name
    default: Any
    help: str
    kind: str = "str"              # str, int, float, bool, path, list
    choices: tuple[str, ...] = ()
    lo: float | None = None        # inclusive range for numbers
    hi: float | None = None
    flag: str | None = None        # the CLI flag, when it is not --name-with-dashes

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def cli_default(self) -> Any:
        return ",".join(self.default) if self.kind == "list" else self.default

    def check(self, value: Any) -> Any:
        """The value, validated (a list given as "a,b" is split); raises ``OptionError``."""
        if value is None:
            return None
        if self.kind == "list":
            items = tuple(t.strip() for t in value.split(",")) if isinstance(value, str) else tuple(value)
            items = tuple(t for t in items if t)
            bad = [t for t in items if t not in self.choices]
            if bad or not items:
                raise OptionError(self.name, f"unknown {self.name.rstrip('s')} {bad[0] if bad else '(none)'!r} "
                                             f"(choose from {', '.join(self.choices)})")
            return items
        if self.choices and value not in self.choices:
            raise OptionError(self.name, f"{value!r} is not one of {', '.join(self.choices)}")
        if self.kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (self.kind == "int" and not float(value).is_integer()):
                raise OptionError(self.name, f"must be a{'n integer' if self.kind == 'int' else ' number'}, "
                                             f"got {value!r}")
            if value != value or (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
                raise OptionError(self.name, f"must be {self._range()}, got {value}" if self._range()[0] == ">"
                                  else f"must lie in {self._range()}, got {value}")
        return value

    def _range(self) -> str:
        if self.hi is None or self.hi > 1e6:
            return f">= {self.lo:g}"
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        return f"[{lo}, {self.hi:g}]"


_OPTIONS = [
    Option("targets", DEFAULT_TARGETS, "Pair kinds, comma-separated: qk, vo, ffn, norm, conv (norm -> linear; "
           "conv: a linear-attention layer's input projection -> its causal conv; both off by default).",
           kind="list", choices=ALL_TARGETS),
    Option("granularity", "channel", "One scale per layer, per head (kv group, or expert) or per channel.",
           choices=GRANULARITIES),
    Option("norm", "fro", "Balance Frobenius norms (fro) or per-element RMS (rms).", choices=NORMS),
    Option("strength", 1.0, "Use s**strength: 0 = identity, 1 = fully balanced.", kind="float", lo=0.0, hi=1.0),
    Option("scales", "pow2", "pow2 (bit-exact) or continuous (exact balance; verified with tolerances).",
           choices=SCALES),
    Option("verify", True, "Check logits on probe tokens before committing the output.", kind="bool"),
    Option("probe_batch", 2, "Probe sequences.", kind="int", lo=1),
    Option("probe_len", 32, "Tokens per probe sequence.", kind="int", lo=1),
    Option("seed", 0, "Seed of the random probe tokens.", kind="int", lo=0, hi=2**63 - 1),
    Option("probe_ids_file", None, "File of probe token ids (JSON rows, or one sequence per line).",
           kind="path", flag="--probe-ids"),
    Option("max_kl", None, "Tolerance mode: max mean KL of the softmax (default by dtype).", kind="float", lo=0.0),
    Option("min_top1", None, "Tolerance mode: min top-1 agreement (default by dtype).", kind="float", lo=0.0, hi=1.0),
    Option("max_rel", None, "Tolerance mode: max |Δlogit| / max |logit| (default by dtype).", kind="float", lo=0.0),
    Option("mode", "auto", "exact, tolerance, or auto (exact unless B's wisca record says the transform rounds).",
           choices=MODES),
    Option("revision", None, "Hub revision (branch, tag or commit) of a hub repo id."),
    Option("base", None, "LoRA adapter only: the base model folder; also compare base + adapter logits.",
           kind="path"),
    Option("config", None, "torch.distributed checkpoints and DeepSpeed folders without safetensors weights "
           "only: the model's config.json (or its folder) when it is not in the checkpoint folder (or, for "
           "DCP, its parent).", kind="path"),
    Option("training_state", "transform", "Optimizer and engine state (moments, fp32 masters): transform it "
           "exactly with the weights, refusing any state wisca cannot rescale; or drop it from the output "
           "(resume from the weights with a fresh optimizer).", choices=TRAINING_STATE_MODES),
    Option("overwrite", False, "Replace the output folder (the old one stays until the new one verified).",
           kind="bool"),
    Option("report", None, "Also write the JSON report to this file.", kind="path"),
    Option("plot", None, "Also draw the weight pattern as heatmaps to this PNG (needs matplotlib).", kind="path"),
]
OPTIONS: dict[str, Option] = {o.name: o for o in _OPTIONS}
TOLERANCE_FIELDS = ("max_kl", "min_top1", "max_rel")
PROBE_FIELDS = ("probe_batch", "probe_len", "seed", "probe_ids_file")


def default(name: str) -> Any:
    return OPTIONS[name].default


def check(name: str, value: Any) -> Any:
    return OPTIONS[name].check(value)


def flag_of(field: str) -> str:
    """The CLI flag of an API field (for error messages the CLI shows)."""
    opt = OPTIONS.get(field)
    return opt.cli_flag if opt else field


# -- the options of a transform ---------------------------------------------------------------
@dataclass
class TransformOptions:
    """The options of ``transform``; defaults and valid values come from ``options.OPTIONS``."""

    targets: tuple[str, ...] = default("targets")
    granularity: str = default("granularity")
    norm: str = default("norm")
    strength: float = default("strength")
    scales: str = default("scales")                 # "pow2" or "continuous"
    verify: bool = default("verify")
    probe_batch: int = default("probe_batch")
    probe_len: int = default("probe_len")
    seed: int = default("seed")
    probe_ids_file: str | None = None
    max_kl: float | None = None                      # tolerance fields: None = the dtype's default
    min_top1: float | None = None
    max_rel: float | None = None
    tolerance: object = None                         # a verify.Tolerance or dict: all three at once
    overwrite: bool = default("overwrite")
    revision: str | None = None
    base: str | None = None                          # LoRA adapters: base model folder for the logits check
    config: str | None = None                        # DCP checkpoints: config.json when not beside them
    training_state: str = default("training_state")  # "transform" or "drop"
    given: frozenset = frozenset()                   # fields the caller set explicitly

    @classmethod
    def build(cls, options: "TransformOptions | None" = None, **kwargs) -> "TransformOptions":
        """``options`` with the fields in ``kwargs`` replaced, validated."""
        names = {f.name for f in fields(cls)} - {"given"}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise OptionError(unknown[0], f"unknown option (options: {', '.join(sorted(names))})")
        base = options or cls()
        values = {n: getattr(base, n) for n in names}
        values.update(kwargs)
        opts = cls(**values, given=frozenset(base.given) | frozenset(kwargs))
        opts.check()
        return opts

    def is_given(self, name: str) -> bool:
        """Set by the caller: named in ``build``'s keywords, or different from the default."""
        if name == "tolerance":
            return self.tolerance is not None
        return name in self.given or getattr(self, name) != (OPTIONS[name].default if name in OPTIONS else None)

    def check(self) -> None:
        for name in OPTIONS:
            if hasattr(self, name):
                setattr(self, name, check(name, getattr(self, name)))
        given = self.given_tolerance()
        for name in TOLERANCE_FIELDS:
            check(name, given.get(name))

    def given_tolerance(self) -> dict:
        """The tolerance fields the caller set (the rest stay the dtype's defaults)."""
        tol = self.tolerance
        out = dict(asdict(tol) if is_dataclass(tol) else (tol or {}))
        out.update({k: getattr(self, k) for k in TOLERANCE_FIELDS if getattr(self, k) is not None})
        return {k: v for k, v in out.items() if v is not None}

    def record(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if f.name not in ("overwrite", "tolerance", "given", *TOLERANCE_FIELDS)}
        d["targets"] = list(self.targets)
        d["tolerance"] = self.given_tolerance() or None
        return d


def not_applicable(opts: TransformOptions, names, why: str) -> list[dict]:
    """Warnings for options the caller set that this input does not use."""
    return [{"option": n, "message": f"ignored: {why}"} for n in names if opts.is_given(n)]


def model_warnings(opts: TransformOptions, src, exact: bool) -> list[dict]:
    out = []
    if not opts.verify:
        return out + not_applicable(opts, (*PROBE_FIELDS, *TOLERANCE_FIELDS, "tolerance"), "verification is off")
    if opts.probe_ids_file:
        out += not_applicable(opts, ("probe_batch", "probe_len", "seed"), "probe_ids_file gives the probe tokens")
    if exact:
        out += not_applicable(opts, (*TOLERANCE_FIELDS, "tolerance"),
                               "these scales verify bit for bit (mode exact); tolerances apply to continuous "
                               "scales and inexact targets")
    return out


TIED_FINAL_NORM = ("the final norm -> lm_head part of the norm target is not applicable: the embeddings are "
                   "tied, so lm_head is the embedding table, whose columns also make the residual stream "
                   "entering layer 0 (scaling them would change the input); the decoder layers' input norms "
                   "are balanced")


MXFP4_COPIED = ("the experts are MXFP4-quantised (*_blocks, *_scales): copied unchanged, byte for byte; "
                "the reference forward dequantises them")
MXFP4_NORM = ("; the norm target's pair of the norm they read (with the router) is not applicable on every "
              "layer (an MXFP4 scale is shared by 32 input columns), the attention input norm -> q, k, v "
              "pair is balanced")


def mxfp4_warnings(targets: tuple[str, ...], family_targets: tuple[str, ...], quantized: bool) -> list[dict]:
    """MXFP4 experts: copied unchanged, and the norm target without the norm they read."""
    if not quantized:
        return []
    norm = "norm" in targets and "norm" in family_targets
    return [{"option": "targets", "message": MXFP4_COPIED + (MXFP4_NORM if norm else "")}]


FP8_FORMAT = ("the checkpoint is FP8 block-quantised (float8_e4m3fn codes, a float32 weight_scale_inv per {bm}x{bn} "
              "block): the codes are rescaled in that format by powers of two, each unit's scale limited to what "
              "keeps every code it touches exact (|v| <= 448, no bits lost below 2**-9) after a power of two per "
              "block of rows or columns is moved into weight_scale_inv (the same dequantised weight); the "
              "statistics and the reference forward use the dequantised weights (code * scale_inv, as transformers "
              "loads them with FineGrainedFP8Config(dequantize=True)); FP8 kernels that quantise "
              "activations (per-group dynamic scales) see rescaled input channels where vo, ffn or norm scale a "
              "linear's input, so their own rounding can differ")


def fp8_warnings(block: tuple[int, int] | None, clamped: int | None = None, units: int | None = None,
                 folded: int | None = None) -> list[dict]:
    """FP8 block-quantised weights: what is done to them, and (after a transform) how many
    units the codes limited and how many blocks took a power of two into weight_scale_inv."""
    if not block:
        return []
    message = FP8_FORMAT.format(bm=block[0], bn=block[1])
    if clamped is not None:
        message += f"; {clamped} of {units} units on FP8 weights were clamped by the codes (fp8_clamped_units)"
    if folded is not None:
        message += f"; {folded} blocks folded a power of two into weight_scale_inv (fp8_folded_blocks)"
    return [{"option": "scales", "message": message}]


def final_norm_warnings(targets: tuple[str, ...], family_targets: tuple[str, ...], tied: bool) -> list[dict]:
    """The norm target requested on a family that has it, with tied embeddings: its final
    norm -> lm_head pair does not apply (say so, as for a target not applicable)."""
    if tied and "norm" in targets and "norm" in family_targets:
        return [{"option": "targets", "message": TIED_FINAL_NORM}]
    return []


def layer_target_warnings(targets: tuple[str, ...], layout) -> list[dict]:
    """A requested target that this checkpoint's family has on some layers only (the spec's
    ``target_layers``, e.g. Llama 4's qk on NoPE layers with use_qk_norm; qk and vo on a hybrid
    family's linear-attention layers): where not, and why (one line per reason)."""
    out = []
    for t in targets:
        if t not in layout.spec.targets and t in layout.spec.target_why:   # on no layer of this family
            out.append({"option": "targets", "message": f"{t} is not applicable to {layout.spec.name}: "
                        f"{layout.spec.target_why[t]}"})
            continue
        why: dict[str, list[int]] = {}
        for i in range(layout.layers):
            reason = layout.not_applicable_why(t, i) if t in layout.spec.targets else None
            if reason:
                why.setdefault(reason, []).append(i)
        for reason, skipped in why.items():
            out.append({"option": "targets", "message": f"{t} is not applicable on layers "
                        f"{', '.join(map(str, skipped))}: {reason}"})
    return out


# -- transform -------------------------------------------------------------------------------
