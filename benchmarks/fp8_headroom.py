"""How much room the FP8 limits leave the balance: one FFN pair (up ``[I, H]``, down ``[H, I]``),
Gaussian weights skewed per neuron by ``2**N(0, spread)`` (up row j times it, down column j
divided: the same function), quantised as transformers does (``Fp8Quantize``: per-block amax /
448, 128 x 128 blocks), balanced with wisca's solver with and without the FP8 code limits.

    python benchmarks/fp8_headroom.py                  # DeepSeek-V3's expert size: H 7168, I 2048
    python benchmarks/fp8_headroom.py --hidden 1024    # shorter rows: fewer blocks per row

Prints per spread: units moved, units the codes clamped, units held at 1 that wanted to move,
the mean |log2| imbalance before, after, and after without the limits, and how many up rows
cannot be scaled down at all (a code whose last bit is 2**-9) or up (a code at 448). The
README quotes it.

``--fold`` also estimates what wisca does NOT do (a possible extension): a power of two per
block of rows of ``up`` and per block of columns of ``down`` moved into ``weight_scale_inv``
(scale_inv times 2**-c, that block's codes times 2**c: the same weight), chosen per block as
the exponent that keeps the most of its slices exact at their wanted scale, after which each
unit is clamped to what its slices allow. Blocks whose choice leaves a unit without any exact
exponent fall back to c = 0.
"""

from __future__ import annotations

import argparse
import types

import torch


def main() -> None:
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    from wisca_cli import fp8
    from wisca_cli.balance import scales_from_stats
    from wisca_cli.pairs import Member, Pair
    from wisca_cli.solve import solve_pair
    from wisca_cli.stats import unit_stats

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--spreads", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fold", action="store_true", help="also estimate per-block factors in weight_scale_inv")
    args = ap.parse_args()
    h, n, block = args.hidden, args.intermediate, (args.block, args.block)
    config = FineGrainedFP8Config(weight_block_size=list(block))
    quantise = Fp8Quantize(types.SimpleNamespace(quantization_config=config))
    layout = types.SimpleNamespace(fp8_block=block, fp8_weights=frozenset({"up", "down"}))
    pair = Pair("ffn", n, torch.zeros(n, dtype=torch.long),
                (Member("up", 0, torch.arange(n), +1), Member("down", 1, torch.arange(n), -1)))
    g = torch.Generator().manual_seed(args.seed)
    up, down = torch.randn(n, h, generator=g) * 0.02, torch.randn(h, n, generator=g) * 0.02
    print(f"FFN pair up [{n}, {h}], down [{h}, {n}], {block[0]}x{block[1]} blocks: {n} units")
    for spread in args.spreads:
        u = torch.exp2(torch.randn(n, generator=g) * spread)
        tensors = {}
        for role, w in (("up", up * u[:, None]), ("down", down / u[None, :])):
            q = quantise.convert({f"{role}.weight": w})
            tensors[role], tensors[role + "_scale_inv"] = q[f"{role}.weight"], q[f"{role}.weight_scale_inv"]
        limited = solve_pair(layout, pair, tensors)
        free = scales_from_stats("ffn", unit_stats(pair, tensors, fp8_block=block), dtype=torch.bfloat16)
        live = ~torch.isnan(limited.before)
        mean = lambda x: float(x[live].abs().mean())  # noqa: E731
        held = int(((free.scales != 1) & (limited.scales == 1)).sum())
        floor = int((fp8.exponent_limits(tensors["up"], 0)[0] == 0).sum())      # rows that cannot go down
        ceiling = int((fp8.exponent_limits(tensors["up"], 0)[1] == 0).sum())    # rows holding a 448
        print(f"skew 2**N(0, {spread}): moved {int((limited.scales != 1).sum())}, fp8-clamped "
              f"{limited.fp8_clamped}, held at 1 {held}; imbalance {mean(limited.before):.2f} -> "
              f"{mean(limited.after):.2f} (without the limits -> {mean(free.after):.2f}, "
              f"moved {int((free.scales != 1).sum())}); up rows that cannot go down {floor}, up {ceiling}")
        if args.fold:
            wanted = torch.log2(free.scales.double()).round().long()
            k = fold_estimate(tensors, wanted, block[0], fp8)
            print(f"  with block factors in weight_scale_inv (estimate): moved {int((k != 0).sum())}; imbalance "
                  f"-> {mean(free.before + 2 * k.double()):.2f}")


def fold_estimate(tensors: dict, wanted: torch.Tensor, size: int, fp8) -> torch.Tensor:
    """Per-unit exponents reachable when each block of up rows / down columns may also move a
    power of two into weight_scale_inv (see the module docstring)."""
    ulo, uhi = (x.long() for x in fp8.exponent_limits(tensors["up"], 0))     # up row j times 2**k
    dlo, dhi = (x.long() for x in fp8.exponent_limits(tensors["down"], 1))   # down column j times 2**-k
    blocks = len(wanted) // size
    cands = torch.arange(-24, 25)

    def best(lo, hi):   # the exponent inside most [lo, hi] intervals (ties: the smallest |c|)
        cover = ((lo[None, :] <= cands[:, None]) & (cands[:, None] <= hi[None, :])).sum(1)
        ok = cands[cover == cover.max()]
        return int(ok[ok.abs().argmin()])

    cu = torch.tensor([best(ulo[b * size:(b + 1) * size] - wanted[b * size:(b + 1) * size],
                            uhi[b * size:(b + 1) * size] - wanted[b * size:(b + 1) * size]) for b in range(blocks)])
    cd = torch.tensor([best(dlo[b * size:(b + 1) * size] + wanted[b * size:(b + 1) * size],
                            dhi[b * size:(b + 1) * size] + wanted[b * size:(b + 1) * size]) for b in range(blocks)])
    while True:   # unit j: k + cu in [ulo, uhi] and -k + cd in [dlo, dhi]
        u, d = cu.repeat_interleave(size), cd.repeat_interleave(size)
        lo, hi = torch.maximum(ulo - u, d - dhi), torch.minimum(uhi - u, d - dlo)
        empty = (lo > hi).view(blocks, size).any(1)
        if not bool(empty.any()):
            return torch.minimum(torch.maximum(wanted, lo), hi)
        cu[empty], cd[empty] = 0, 0


if __name__ == "__main__":
    main()
