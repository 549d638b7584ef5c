"""Which slices of which tensors scale together: the WISCA symmetries as index maps.

A ``Pair`` is one kind of symmetry in one layer (``qk``, ``vo``, ``ffn``). Each of its
``Member`` tensors has an axis along which every slice belongs to a unit (``units[i]``,
or -1 for a slice the pair does not touch). Side +1 slices are multiplied by the unit's
scale ``s``, side -1 slices by ``1/s``. Units are built at channel granularity (one
rotary pair, head dim or neuron); ``head_of`` maps each unit to its head (kv group) so
coarser granularities are a regrouping, not a new rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import CONV_PARTS, Layout, logical_shapes

from .options import ALL_TARGETS, DEFAULT_TARGETS, EXTRA_TARGETS, GRANULARITIES  # noqa: F401 - re-exported


@dataclass(frozen=True)
class Member:
    role: str            # role in the layer ("q", "k_bias", ...)
    axis: int            # axis the units run along
    # long [size of axis]; -1 = slice untouched. [experts, size of axis] for a tensor whose
    # dim 0 holds the experts (a fused 3-D expert tensor): slice i of expert e is units[e, i]
    units: torch.Tensor
    side: int            # +1: times s, -1: times 1/s (-2: 1/s², the down of a relu² MLP)
    counts: bool = True  # contributes to the unit norm (biases do not)
    offset: float = 0.0  # the tensor stores w for a factor (offset + w): Gemma's (1 + w) norms


@dataclass(frozen=True)
class Pair:
    kind: str
    n_units: int
    head_of: torch.Tensor  # long [n_units]: head (kv group) of each unit
    members: tuple[Member, ...]

    @property
    def b_degree(self) -> int:
        """The power of 1/s on the B side: 1, or 2 for a relu² MLP's down (relu²(s x) = s² relu²(x))."""
        return max((-m.side for m in self.members if m.side < 0), default=1)

    def regroup(self, granularity: str) -> "Pair":
        """The same pair with units merged to one per head or one per layer."""
        if granularity == "channel":
            return self
        if granularity == "head":
            mapping, n = self.head_of, int(self.head_of.max()) + 1
        else:
            mapping, n = torch.zeros_like(self.head_of), 1
        members = tuple(
            Member(m.role, m.axis, torch.where(m.units >= 0, mapping[m.units.clamp(min=0)], -1),
                   m.side, m.counts, m.offset)
            for m in self.members
        )
        return Pair(self.kind, n, torch.arange(n) if granularity == "head" else torch.zeros(1, dtype=torch.long), members)


def rotary_units(head_dim: int, rotary_dims: int, style: str | None) -> tuple[torch.Tensor, int]:
    """Unit of each dim of one head: rotary pairs share a unit, other dims get their own.

    ``half`` (HF rotate_half): dim i pairs with i + r/2. ``interleaved`` (GPT-J): 2i with 2i+1.
    Returns (unit index per dim, units per head).
    """
    dims = torch.arange(head_dim)
    r = rotary_dims if style else 0
    units = torch.empty(head_dim, dtype=torch.long)
    if style == "interleaved":
        units[:r] = dims[:r] // 2
    else:
        units[:r] = dims[:r] % max(r // 2, 1)
    units[r:] = r // 2 + torch.arange(head_dim - r)
    return units, r // 2 + (head_dim - r)


def _qk_maps(layout: Layout, layer: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Unit of every Q row and K row (group x rotary pair), and units per kv head."""
    d, group = layout.head_dim, layout.group_size
    per_dim, per_head = rotary_units(d, layout.rotary_dims_at(layer), layout.rotary_style)
    kv_rows = (torch.arange(layout.kv_heads)[:, None] * per_head + per_dim[None, :]).reshape(-1)
    q_rows = (torch.arange(layout.heads)[:, None] // group * per_head + per_dim[None, :]).reshape(-1)
    return q_rows, kv_rows, per_head


def qk_pair(layout: Layout, roles: set[str], layer: int = 0) -> Pair:
    """Q rows of every query head in group g and K rows of kv head g, per rotary pair.

    With QK-norm (where the layer has a ``q_norm`` tensor) the scale lives on the norm
    weights (and a LayerNorm's biases) instead: scaling q_proj/k_proj would be absorbed by
    the norm. ``head`` (one weight of size d shared by all heads) and ``heads`` (a weight row
    per head, ``[H, d]`` and ``[G, d]``: Cohere): one unit per rotary pair shared by all heads,
    along the last axis; ``full`` (weights of size H*d and G*d): the same maps as the rows.
    """
    if layout.mla:
        return mla_qk_pair(layout, roles)
    q_rows, kv_rows, per_head = _qk_maps(layout, layer)
    qk_norm = layout.spec.attention.qk_norm if "q_norm" in roles else None
    if qk_norm in ("head", "heads"):
        per_dim, n = rotary_units(layout.head_dim, layout.rotary_dims_at(layer), layout.rotary_style)
        axis = 0 if qk_norm == "head" else 1
        members = [Member(r, axis, per_dim, side, not r.endswith("_bias"))
                   for r, side in (("q_norm", +1), ("k_norm", -1), ("q_norm_bias", +1), ("k_norm_bias", -1))
                   if r in roles]
        return Pair("qk", n, torch.zeros(n, dtype=torch.long), tuple(members))
    if qk_norm == "full":
        members = [Member("q_norm", 0, q_rows, +1), Member("k_norm", 0, kv_rows, -1)]
        members += [Member(r, 0, ids, side, False) for r, ids, side in
                    (("q_norm_bias", q_rows, +1), ("k_norm_bias", kv_rows, -1)) if r in roles]
    else:
        members = [Member("q", 0, q_rows, +1), Member("k", 0, kv_rows, -1)]
        members += [Member(r, 0, ids, side, False) for r, ids, side in
                    (("q_bias", q_rows, +1), ("k_bias", kv_rows, -1)) if r in roles]
    n = layout.kv_heads * per_head
    return Pair("qk", n, torch.arange(n) // per_head, tuple(members))


def vo_pair(layout: Layout, roles: set[str], layer: int = 0) -> Pair:
    """V rows of kv head g, dim i and the O input columns that read them (every head in g)."""
    if layout.mla:
        return mla_vo_pair(layout, roles)
    d, g_count, group = layout.head_dim, layout.kv_heads, layout.group_size
    kv_rows = torch.arange(g_count * d)
    o_cols = (torch.arange(layout.heads)[:, None] // group * d + torch.arange(d)[None, :]).reshape(-1)
    members = [Member("v", 0, kv_rows, +1), Member("o", 1, o_cols, -1)]
    if "v_bias" in roles:
        members.append(Member("v_bias", 0, kv_rows, +1, False))
    n = g_count * d
    return Pair("vo", n, torch.arange(n) // d, tuple(members))


def mla_qk_pair(layout: Layout, roles: set[str]) -> Pair:
    """Multi-head latent attention (DeepSeek-V3): a query head's rows (of ``q_b``, or ``q``)
    are ``nope`` dims then ``rope`` dims; ``kv_b``'s rows per head are ``nope`` k rows then
    ``v`` rows; the last ``rope`` rows of ``kv_a`` are one rope key shared by every head.

    Units: each head's no-rope dims one by one (q row vs its k_nope row of ``kv_b``, head h),
    then one unit per rotary pair of the shared rope key, the same for every query head
    (all heads' q rope rows vs the ``kv_a`` rope rows, with its bias; "head" H)."""
    mla, heads = layout.mla, layout.heads
    pair_of, per_rope = rotary_units(mla.rope, mla.rope, layout.rotary_style)
    nope = torch.arange(heads)[:, None] * mla.nope + torch.arange(mla.nope)[None, :]   # [H, nope]
    rope = heads * mla.nope + pair_of                                                  # [rope]
    q_rows = torch.cat([nope, rope.expand(heads, -1)], dim=1).reshape(-1)
    kv_b_rows = torch.cat([nope, torch.full((heads, mla.v), -1)], dim=1).reshape(-1)
    kv_a_rows = torch.cat([torch.full((mla.kv_lora,), -1), rope])
    members = [Member("q_b" if "q_b" in roles else "q", 0, q_rows, +1), Member("kv_b", 0, kv_b_rows, -1),
               Member("kv_a", 0, kv_a_rows, -1)]
    if "kv_a_bias" in roles:
        members.append(Member("kv_a_bias", 0, kv_a_rows, -1, False))
    n = heads * mla.nope + per_rope
    head_of = torch.cat([torch.arange(heads).repeat_interleave(mla.nope), torch.full((per_rope,), heads)])
    return Pair("qk", n, head_of, tuple(members))


def mla_vo_pair(layout: Layout, roles: set[str]) -> Pair:
    """Multi-head latent attention: the v rows of ``kv_b`` (head h, dim i) and o's input
    column h * v + i."""
    mla, heads = layout.mla, layout.heads
    v = torch.arange(heads)[:, None] * mla.v + torch.arange(mla.v)[None, :]
    kv_b_rows = torch.cat([torch.full((heads, mla.nope), -1), v], dim=1).reshape(-1)
    n = heads * mla.v
    return Pair("vo", n, torch.arange(n) // mla.v,
                (Member("kv_b", 0, kv_b_rows, +1), Member("o", 1, torch.arange(n), -1)))


def _mlps(layout: Layout, roles: set[str]) -> list[tuple[str, int]]:
    """(role prefix, intermediate size) of every gated MLP in a layer: dense, experts, shared."""
    if "router" in roles:
        mlps = [(f"experts.{e}.", layout.expert_intermediate) for e in range(layout.experts)]
        dense = [("", layout.intermediate)] if layout.spec.moe.parallel_dense else []   # Gemma 4: beside the experts
        return dense + mlps + ([("shared.", layout.shared_intermediate)] if "shared.up" in roles else [])
    return [("", layout.intermediate)] if "down" in roles else []   # none: a mixer-only layer (Nemotron-H)


# positively homogeneous activations of a plain MLP: act(s x) = s**d act(x) for s > 0
HOMOGENEOUS = {"relu": 1, "relu2": 2}


def ffn_pair(layout: Layout, roles: set[str], layer: int = 0) -> Pair:
    """Row j of up (a gated MLP's linear branch, or a plain MLP's input to relu / relu²) and
    column j of down (/ s, or / s² after relu²), per neuron.

    MoE: every expert (and the shared expert) on its own; its index is the unit's "head"
    (``--granularity head`` = one scale per expert). The router is untouched.
    """
    members, heads, start = [], [], 0
    # a plain MLP's activation of degree d (relu² 2: relu²(s x) = s² relu²(x)) takes down / s**d
    degree = HOMOGENEOUS.get(layout.act, 1) if layout.spec.mlp.kind == "plain" else 1
    for e, (prefix, n) in enumerate(_mlps(layout, roles)):
        units = torch.arange(start, start + n)
        members += [Member(prefix + "up", 0, units, +1), Member(prefix + "down", 1, units, -degree)]
        if prefix + "up_bias" in roles:
            members.append(Member(prefix + "up_bias", 0, units, +1, False))
        heads.append(torch.full((n,), e, dtype=torch.long))
        start += n
    return Pair("ffn", start, torch.cat(heads) if heads else torch.zeros(0, dtype=torch.long), tuple(members))


def norm_pair(layout: Layout, roles: set[str], layer: int = 0) -> Pair:
    """Norm weight (and bias) channel c times s, input column c of every linear reading it / s.

    The spec's ``norm_readers`` name the linears reading each input norm (q, k, v; gate and
    up of every MLP of the layer, the router, the shared-expert gate). Post norms feed the
    residual stream, not a linear: not part of this target. One "head" per norm.
    """
    shapes = logical_shapes(layout, layer)
    prefixes = [p for p, _ in _mlps(layout, roles)]
    parallel = layout.spec.moe is not None and layout.spec.moe.parallel_dense
    linear = layout.is_linear_layer(layer)
    members, heads, n = [], [], 0
    for norm in layout.spec.norm_readers_at(linear):
        mine = prefixes
        if parallel:   # Gemma 4: expert_norm feeds the experts, the other norms the dense MLP
            mine = [p for p in prefixes if p.startswith("experts.") == (norm == "expert_norm")]
        linears = layout.spec.norm_reader_roles(norm, mine, linear)
        if norm not in roles or layout.mxfp4_experts and any(r.startswith("experts.") for r in linears):
            continue   # MXFP4 experts read this norm: their blocks take no column scale
        h = shapes[norm][0]   # hidden, or a latent's size (MLA's q_a_norm, kv_a_norm)
        units = torch.arange(n, n + h)
        members.append(Member(norm, 0, units, +1))
        if norm + "_bias" in roles:
            members.append(Member(norm + "_bias", 0, units, +1, False))
        # a reader's input column c reads channel c % h: a norm shared by every head of its
        # input (the gated RMSNorm of a Gated DeltaNet, one weight of size dv per value head)
        members += [Member(r, 1, units[torch.arange(shapes[r][1]) % h], -1) for r in linears if r in roles]
        heads.append(torch.full((h,), len(heads), dtype=torch.long))
        n += h
    return Pair("norm", n, torch.cat(heads) if heads else torch.zeros(0, dtype=torch.long), tuple(members))


def conv_pair(layout: Layout, roles: set[str], layer: int = 0) -> Pair:
    """A linear-attention layer's causal conv: the input projection's row of conv channel c times s
    (a Gated DeltaNet's q, k, v rows; a Mamba2 in_proj's x, B, C rows), the conv's channel c
    (its K taps) times 1/s. The conv is depthwise (channel c reads only row c) and linear, and its
    bias (Mamba2) is added after it, so the conv's output, the SiLU's input, is unchanged. One
    "head" per key / value head (Gated DeltaNet) or per head and group (Mamba2)."""
    lin = layout.linear
    keys, values = lin.key_heads * lin.key_dim, lin.value_heads * lin.value_dim
    channels = torch.arange(2 * keys + values)
    if layout.spec.linear_attention.kind == "mamba2":   # in_proj rows [z | x B C | dt]
        rows = torch.full((2 * values + 2 * keys + lin.value_heads,), -1, dtype=torch.long)
        rows[values:2 * values + 2 * keys] = channels
        members = [Member("lin_in", 0, rows, +1)]
        head_of = torch.cat([torch.arange(values) // lin.value_dim,
                             lin.value_heads + torch.arange(2 * keys) // lin.key_dim])
    else:   # [q | k | v] as the conv reads them
        members = [Member("lin_q", 0, channels[:keys], +1), Member("lin_k", 0, channels[keys:2 * keys], +1),
                   Member("lin_v", 0, channels[2 * keys:], +1)]
        head_of = torch.cat([torch.arange(2 * keys) // lin.key_dim,
                             2 * lin.key_heads + torch.arange(values) // lin.value_dim])
    if layout.conv_split:   # saved as three tensors in transformers' split of the channels (OLMo-hybrid)
        starts = [0, *torch.tensor(layout.conv_split_sizes).cumsum(0).tolist()]
        members += [Member(part, 0, channels[a:b], -1) for part, a, b in zip(CONV_PARTS, starts, starts[1:])]
    else:
        members.append(Member("lin_conv", 0, channels, -1))
    return Pair("conv", len(channels), head_of, tuple(members))


BUILDERS = {"qk": qk_pair, "vo": vo_pair, "ffn": ffn_pair, "norm": norm_pair, "conv": conv_pair}


def physical_roles(layout: Layout, roles: set[str]) -> set[str]:
    """The layer's logical roles (q, k, v, gate, up...) for the physical ones it stores."""
    out = set(roles)
    for fused in layout.spec.fused:
        for suffix in ("", "_bias"):
            if fused + suffix in roles:
                out |= {p + suffix for p in layout.spec.fused[fused].parts}
    for fused, info in (layout.spec.moe.fused_experts.items() if layout.fused_experts else ()):
        for suffix in ("", "_bias"):
            if f"experts.{fused}{suffix}" in roles:
                out |= {f"experts.{e}.{p}{suffix}" for e in range(layout.experts) for p in info.parts}
    return out


def _expert_members(layout: Layout, members: list[Member]) -> list[Member]:
    """Members on single experts' tensors (``experts.3.up``, logical ``W[out, in]``) as members
    of the fused 3-D tensors that hold them (``experts.gate_up``): one per tensor, axis and
    side, with units ``[E, n]`` along the physical axis (-1 on the slices the pair leaves
    alone). Several logical members on the same slices (the norm target reads gate and up of
    one fused tensor) give one member: each slice counts once."""
    out: dict[tuple, Member] = {}
    for m in members:
        e, role = m.role.split(".")[1:]
        base, bias = (role[:-5], "_bias") if role.endswith("_bias") else (role, "")
        fused = layout.fused_expert_of(base)
        info = layout.spec.moe.fused_experts[fused]
        shape = layout.fused_expert_shape(fused, bias=bool(bias))
        axis = 1 if bias else info.dims.index("out" if m.axis == 0 else "in")
        key = (f"experts.{fused}{bias}", axis, m.side, m.counts)
        if key not in out:
            out[key] = Member(key[0], axis, torch.full((layout.experts, shape[axis]), -1, dtype=torch.long),
                              m.side, m.counts)
        out[key].units[int(e), layout.expert_parts(fused)[base] if m.axis == 0 else slice(None)] = m.units
    return list(out.values())


def _in_fused_expert(layout: Layout, role: str) -> bool:
    parts = role.split(".")
    return len(parts) == 3 and parts[0] == "experts" and layout.fused_expert_of(parts[2].removesuffix("_bias")) is not None


def to_physical(layout: Layout, pair: Pair) -> Pair:
    """Map a pair on logical roles to the tensors as stored: fused tensors (a part's slices
    inside the fused tensor, -1 elsewhere) and Conv1D weights (``[in, out]``: axes swapped).
    Several logical members reading one fused tensor's input columns become one member."""
    offset = layout.spec.norm.weight_offset
    members, seen, experts = [], set(), []
    for m in pair.members:
        if layout.fused_experts and _in_fused_expert(layout, m.role):
            experts.append(m)
            continue
        role, axis, units = m.role, m.axis, m.units
        base, bias = (role[:-5], "_bias") if role.endswith("_bias") else (role, "")
        fused = layout.fused_of(base)
        if fused is not None:
            parts = layout.fused_parts(fused)
            if axis == 0:
                full = torch.full((sum(len(p) for p in parts.values()),), -1, dtype=torch.long)
                full[parts[base]] = units
                units = full
            role = fused + bias
            if axis == 1 and (role, axis) in seen:
                continue
            seen.add((role, axis))
        is_norm = base.endswith("norm")
        if layout.spec.linear == "conv1d" and not bias and not is_norm:
            axis = 1 - axis
        own = layout.spec.linear_attention.norm_offset if base == "lin_norm" else offset
        members.append(Member(role, axis, units, m.side, m.counts, own if is_norm and not bias else 0.0))
    return Pair(pair.kind, pair.n_units, pair.head_of, tuple(members + _expert_members(layout, experts)))


def layer_pairs(layout: Layout, layer: int, targets: tuple[str, ...], granularity: str) -> list[Pair]:
    """The pairs of one decoder layer for the requested targets the family supports."""
    layout = layout.at(layer)
    roles = physical_roles(layout, set(layout.layer_roles(layer)))
    pairs = []
    for t in targets:
        if t in ("qk", "vo") and "o" not in roles and "lin_out" not in roles:
            continue   # an MLP-only layer (Nemotron-H): no token mixer, nothing to pair
        if t in layout.spec.targets and layout.target_applies(t, layer):   # target_layers
            pair = BUILDERS[t](layout, roles, layer)
            if pair.n_units:
                pairs.append(to_physical(layout, pair).regroup(granularity))
    return pairs


FINAL = "final"   # the stage after the last decoder layer: the final norm and the head


def final_pairs(layout: Layout, targets: tuple[str, ...], granularity: str) -> list[Pair]:
    """The ``norm`` target between the last layer and the logits: final norm weight (and
    LayerNorm bias) of channel c times s, input column c of lm_head times 1/s. Roles are the
    final stage's: ``norm``, ``norm_bias``, ``head`` (a ``W[out, in]`` linear in every family).

    None with tied embeddings: the head is then the embedding table, whose columns also
    make the residual stream entering layer 0, so scaling them would change the input."""
    if "norm" not in targets or "norm" not in layout.spec.targets or layout.tie_embeddings:
        return []
    h = layout.hidden
    units = torch.arange(h)
    members = [Member("norm", 0, units, +1, offset=layout.spec.norm.weight_offset)]
    if layout.spec.final.norm_bias:
        members.append(Member("norm_bias", 0, units, +1, False))
    members.append(Member("head", 1, units, -1))
    return [Pair("norm", h, torch.zeros(h, dtype=torch.long), tuple(members)).regroup(granularity)]


def lora_pair(rank: int) -> Pair:
    """PEFT LoRA: dW = (alpha / r) B A; row k of A times s[k], column k of B times 1/s[k]."""
    units = torch.arange(rank)
    return Pair("lora", rank, torch.zeros(rank, dtype=torch.long),
                (Member("lora_A", 0, units, +1), Member("lora_B", 1, units, -1)))
