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


if __name__ == "__main__":
    main()
