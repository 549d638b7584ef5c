"""Where a checkpoint's tensors live among the parameters transformers builds in memory.

transformers 5 loads some checkpoint tensors under other names and fuses others
(``transformers/conversion_mapping.py``: ``WeightRenaming`` and ``WeightConverter``), and
``save_pretrained`` reverts it (``core_model_loading.revert_weight_conversion``). The MoE
families' mapping, for instance::

    mixtral:   WeightRenaming(".block_sparse_moe.", ".mlp.")
               WeightConverter([".experts.*.w1.weight", ".experts.*.w3.weight"], ".experts.gate_up_proj",
                               [MergeModulelist(dim=0), Concatenate(dim=1)])
               WeightConverter([".experts.*.w2.weight"], ".experts.down_proj", [MergeModulelist(dim=0)])
    qwen2_moe: the same converters on "mlp.experts.*.gate_proj.weight" / "up_proj" / "down_proj"
               (qwen3_moe, olmoe, glm4_moe, deepseek_v3, ... reuse it)

so in memory ``mlp.experts.gate_up_proj`` is ``[E, 2I, H]`` (every expert's gate rows, then
its up rows) and ``mlp.experts.down_proj`` is ``[E, H, I]``, while the checkpoint holds one
2-D tensor per expert. An optimizer state written by ``Trainer`` is keyed by the in-memory
parameters, so its moments have the fused shapes.

``parameter_layout(model)`` states, for every parameter of a model (a meta-device one
will do), which checkpoint tensors it holds and where: a ``Param`` made of ``Piece`` boxes.
The names and shapes of the saved tensors come from transformers' own
``revert_weight_conversion`` (run on meta tensors: no memory, no data); where each one sits
in the fused parameter comes from the converter's operations, of which wisca reads
``MergeModulelist(dim=0)`` (stack over experts) optionally followed by
``Concatenate(dim=d)`` (the source patterns' stacks side by side along ``d``, in the
converter's order), and a plain ``Concatenate(dim=d)`` of named parts (OLMo-hybrid's conv,
saved as its q, k and v channels). Any other operation is refused by name, never guessed. A transformers
without a conversion mapping (4.x) keeps the saved layout in memory: every parameter is
its own checkpoint tensor.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import WiscaError


@dataclass(frozen=True)
class Piece:
    """A checkpoint tensor as a box of an in-memory parameter: ``param[start : start + size]``
    with the dimensions not in ``keep`` squeezed (one expert's up rows: ``[e, I:2I, :]``)."""

    saved: str                     # the checkpoint tensor's name
    start: tuple[int, ...]
    size: tuple[int, ...]
    keep: tuple[int, ...]          # the parameter's dims that are the saved tensor's dims

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.size[d] for d in self.keep)

    def index(self) -> tuple[slice, ...]:
        return tuple(slice(a, a + n) for a, n in zip(self.start, self.size))


@dataclass(frozen=True)
class Param:
    """An in-memory parameter and the checkpoint tensors it holds."""

    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]

    @property
    def fused(self) -> bool:
        """False when the parameter is one checkpoint tensor, whatever its name."""
        return not (len(self.pieces) == 1 and self.pieces[0].shape == self.shape)

    @property
    def saved(self) -> tuple[str, ...]:
        return tuple(p.saved for p in self.pieces)

    def multiplier(self, multipliers: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The parameter's S (broadcastable to ``shape``) assembled from the pieces' own
        (``multipliers``: checkpoint tensor name -> S broadcastable to it; absent: 1);
        None when every piece has S = 1."""
        own = {p.saved: multipliers[p.saved] for p in self.pieces if p.saved in multipliers}
        if not own:
            return None
        if not self.fused:
            return own[self.pieces[0].saved]
        # a dim stays 1 where no piece's box or multiplier varies along it
        dims = len(self.shape)
        full = [False] * dims
        for p in self.pieces:
            m = own.get(p.saved)
            for d in range(dims):
                if p.size[d] != self.shape[d]:
                    full[d] = True
                elif m is not None and d in p.keep:
                    logical = p.keep.index(d) - len(p.keep) + m.dim()
                    if logical >= 0 and m.shape[logical] != 1:
                        full[d] = True
        out = torch.ones([n if f else 1 for n, f in zip(self.shape, full)], dtype=torch.float64)
        for p in self.pieces:
            m = own.get(p.saved)
            if m is None:
                continue
            box = tuple(slice(a, a + n) if f else slice(0, 1) for a, n, f in zip(p.start, p.size, full))
            target = out[box]
            m = torch.broadcast_to(m.double(), [target.shape[d] for d in p.keep]) if m.dim() else m.double()
            shape = [target.shape[d] if d in p.keep else 1 for d in range(dims)]
            out[box] = m.reshape(shape) if m.dim() else m
        return out


def identity(name: str, shape: tuple[int, ...], saved: str | None = None) -> Param:
    """A parameter that is one checkpoint tensor (``saved``, default its own name)."""
    dims = len(shape)
    return Param(name, tuple(shape), (Piece(saved or name, (0,) * dims, tuple(shape), tuple(range(dims))),))


def _glob_regex(pattern: str) -> re.Pattern:
    """A converter's source pattern (``.experts.*.w1.weight``; a dot written escaped, ``\\.``, as
    DeepSeek-V4's are, is a dot) with the expert index captured."""
    return re.compile(re.escape(pattern.replace("\\.", ".")).replace(r"\*", r"(\d+)") + "$")


def _converter_of(saved: list[str], converters: list) -> tuple[object, list[tuple[int, int, str]]]:
    """(the converter whose source patterns every saved name matches, [(pattern index,
    expert, saved name)])."""
    for conv in converters:
        regexes = [_glob_regex(p) for p in conv.source_patterns]
        found = []
        for name in saved:
            hits = [(k, m) for k, r in enumerate(regexes) if (m := r.search(name))]
            if len(hits) != 1 or len(hits[0][1].groups()) > 1:
                break
            groups = hits[0][1].groups()
            found.append((hits[0][0], int(groups[0]) if groups else -1, name))
        else:
            return conv, found
    return None, []


def _op_chain(conv) -> int | None:
    """The Concatenate dim of a MergeModulelist(0)[, Concatenate(d)] converter (0: none),
    None for any other chain of operations."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(getattr(conv, "operations", []) or [])
    if not ops or type(ops[0]) is not MergeModulelist or ops[0].dim != 0:
        return None
    if len(ops) == 1:
        return 0 if len(conv.source_patterns) == 1 else None
    if len(ops) == 2 and type(ops[1]) is Concatenate and ops[1].dim >= 1:
        return ops[1].dim
    return None


def _plain_concat(conv) -> int | None:
    """The dim of a converter that only concatenates its source tensors (``Concatenate(dim=d)``
    of plain names, no expert index), None for any other."""
    from transformers.core_model_loading import Concatenate

    ops = list(getattr(conv, "operations", []) or [])
    if len(ops) == 1 and type(ops[0]) is Concatenate and not any("*" in p for p in conv.source_patterns):
        return ops[0].dim
    return None


def _concat_param(name: str, shape: tuple[int, ...], saved: dict[str, tuple[int, ...]],
                  found: list[tuple[int, int, str]], dim: int, where: str) -> Param:
    """The parameter as its saved parts side by side along ``dim``, in the converter's order
    (the sizes ``save_pretrained`` gives them, which loading concatenates back)."""
    order = sorted(found)
    if [k for k, _, _ in order] != list(range(len(order))):
        raise WiscaError(f"{where}: its saved parts {sorted(saved)} are not one per source pattern")
    pieces, start = [], 0
    for _, _, n in order:
        s = saved[n]
        if len(s) != len(shape) or any(a != b for d, (a, b) in enumerate(zip(s, shape)) if d != dim):
            raise WiscaError(f"{where}: its saved part {n} {list(s)} does not fit it along dim {dim}")
        pieces.append(Piece(n, tuple(start if d == dim else 0 for d in range(len(shape))), tuple(s),
                            tuple(range(len(shape)))))
        start += s[dim]
    if start != shape[dim]:
        raise WiscaError(f"{where}: its saved parts add up to {start} along dim {dim}, not {shape[dim]}")
    return Param(name, tuple(shape), tuple(pieces))


def _fused_param(name: str, shape: tuple[int, ...], saved: dict[str, tuple[int, ...]], converters: list) -> Param:
    conv, found = _converter_of(list(saved), converters)
    ops = [repr(o) for o in getattr(conv, "operations", [])] if conv is not None else []
    where = f"{name} {list(shape)}"
    if conv is None:
        raise WiscaError(f"{where}: transformers saves it as {len(saved)} tensors ({next(iter(saved))}, ...) "
                         f"through a conversion wisca cannot read")
    concat = _plain_concat(conv)
    if concat is not None:   # one tensor saved in parts along a dim (OLMo-hybrid's conv: q | k | v)
        return _concat_param(name, shape, saved, found, concat, where)
    cat = _op_chain(conv)
    if cat is None:
        raise WiscaError(f"{where}: transformers fuses it from {conv.source_patterns} with operations {ops}; "
                         f"wisca maps MergeModulelist(dim=0) optionally followed by Concatenate only")
    experts = shape[0]
    offsets, offset = {}, 0
    for k in range(len(conv.source_patterns)):
        of_k = sorted((e, n) for kk, e, n in found if kk == k)
        if [e for e, _ in of_k] != list(range(experts)):
            raise WiscaError(f"{where}: the saved tensors of {conv.source_patterns[k]} are not experts 0..{experts - 1}")
        offsets[k] = offset
        offset += saved[of_k[0][1]][cat - 1] if cat else 0
    pieces = []
    for k, e, n in sorted(found):
        s = saved[n]
        start = [e] + [0] * len(s)
        if cat:
            start[cat] = offsets[k]
        pieces.append(Piece(n, tuple(start), (1, *s), tuple(range(1, len(s) + 1))))
    volume = sum(math.prod(p.size) for p in pieces)
    inside = all(a + n <= m for p in pieces for a, n, m in zip(p.start, p.size, shape)) and \
        all(len(p.size) == len(shape) for p in pieces)
    if not inside or volume != math.prod(shape):
        raise WiscaError(f"{where}: its saved tensors ({conv.source_patterns}, {ops}) do not tile it exactly")
    return Param(name, tuple(shape), tuple(pieces))


def parameter_layout(model) -> dict[str, Param]:
    """In-memory parameter name (``model.named_parameters()``) -> the checkpoint tensors it
    holds, as ``model.save_pretrained`` would write them. ``model`` may be on the meta device."""
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, revert_weight_conversion
    except ImportError:            # transformers 4: the saved layout is the in-memory one
        return {n: identity(n, s) for n, s in params.items()}
    try:
        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                       if not isinstance(c, PrefixChange)]   # as revert_weight_conversion does for a new model
    except Exception as e:   # noqa: BLE001 - another library's failure: a one-line reason
        from .errors import reason

        raise WiscaError(f"transformers' conversion mapping of {type(model).__name__} failed: "
                         f"{type(e).__name__}: {reason(e, 160)}") from e
    if not conversions:
        return {n: identity(n, s) for n, s in params.items()}
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    model._weight_conversions = conversions         # what from_pretrained attaches; revert reads it
    out = {}
    for name, shape in params.items():
        with torch.device("meta"):
            meta = torch.empty(shape)
        saved = {k: tuple(v.shape) for k, v in revert_weight_conversion(model, {name: meta}).items()}
        if len(saved) == 1 and next(iter(saved.values())) == shape:
            out[name] = identity(name, shape, next(iter(saved)))
        else:
            out[name] = _fused_param(name, shape, saved, converters)
    return out
