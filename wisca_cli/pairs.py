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

from .spec import Layout

GRANULARITIES = ("layer", "head", "channel")
ALL_TARGETS = ("qk", "vo", "ffn")


@dataclass(frozen=True)
class Member:
    role: str            # role in the layer ("q", "k_bias", ...)
    axis: int            # axis the units run along
    units: torch.Tensor  # long [size of axis]; -1 = slice untouched
    side: int            # +1: times s, -1: times 1/s
    counts: bool = True  # contributes to the unit norm (biases do not)


@dataclass(frozen=True)
class Pair:
    kind: str
    n_units: int
    head_of: torch.Tensor  # long [n_units]: head (kv group) of each unit
    members: tuple[Member, ...]

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
                   m.side, m.counts)
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


def qk_pair(layout: Layout, roles: set[str]) -> Pair:
    """Q rows of every query head in group g and K rows of kv head g, per rotary pair."""
    d, g_count, group = layout.head_dim, layout.kv_heads, layout.group_size
    per_dim, per_head = rotary_units(d, layout.rotary_dims, layout.spec.attention.get("rotary"))
    kv_rows = (torch.arange(g_count)[:, None] * per_head + per_dim[None, :]).reshape(-1)
    q_rows = (torch.arange(layout.heads)[:, None] // group * per_head + per_dim[None, :]).reshape(-1)
    members = [Member("q", 0, q_rows, +1), Member("k", 0, kv_rows, -1)]
    members += [Member(r, 0, ids, side, False) for r, ids, side in
                (("q_bias", q_rows, +1), ("k_bias", kv_rows, -1)) if r in roles]
    n = g_count * per_head
    return Pair("qk", n, torch.arange(n) // per_head, tuple(members))


def vo_pair(layout: Layout, roles: set[str]) -> Pair:
    """V rows of kv head g, dim i and the O input columns that read them (every head in g)."""
    d, g_count, group = layout.head_dim, layout.kv_heads, layout.group_size
    kv_rows = torch.arange(g_count * d)
    o_cols = (torch.arange(layout.heads)[:, None] // group * d + torch.arange(d)[None, :]).reshape(-1)
    members = [Member("v", 0, kv_rows, +1), Member("o", 1, o_cols, -1)]
    if "v_bias" in roles:
        members.append(Member("v_bias", 0, kv_rows, +1, False))
    n = g_count * d
    return Pair("vo", n, torch.arange(n) // d, tuple(members))


def ffn_pair(layout: Layout, roles: set[str]) -> Pair:
    """Row j of up (a gated MLP's linear branch) and column j of down, per neuron."""
    n = layout.intermediate
    units = torch.arange(n)
    members = [Member("up", 0, units, +1), Member("down", 1, units, -1)]
    if "up_bias" in roles:
        members.append(Member("up_bias", 0, units, +1, False))
    return Pair("ffn", n, torch.zeros(n, dtype=torch.long), tuple(members))


BUILDERS = {"qk": qk_pair, "vo": vo_pair, "ffn": ffn_pair}


def layer_pairs(layout: Layout, layer: int, targets: tuple[str, ...], granularity: str) -> list[Pair]:
    """The pairs of one decoder layer for the requested targets the family supports."""
    roles = set(layout.layer_roles(layer))
    return [BUILDERS[t](layout, roles).regroup(granularity)
            for t in targets if t in layout.spec.targets]


def lora_pair(rank: int) -> Pair:
    """PEFT LoRA: dW = (alpha / r) B A; row k of A times s[k], column k of B times 1/s[k]."""
    units = torch.arange(rank)
    return Pair("lora", rank, torch.zeros(rank, dtype=torch.long),
                (Member("lora_A", 0, units, +1), Member("lora_B", 1, units, -1)))
