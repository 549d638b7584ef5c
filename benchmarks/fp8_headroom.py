"""How much room the FP8 limits leave the balance: one FFN pair (up ``[I, H]``, down ``[H, I]``),
Gaussian weights skewed per neuron by ``2**N(0, spread)`` (up row j times it, down column j
divided: the same function), quantised as transformers does (``Fp8Quantize``: per-block amax /
448, 128 x 128 blocks), balanced with wisca's solver with and without the FP8 code limits.

    python benchmarks/fp8_headroom.py                  # DeepSeek-V3's expert size: H 7168, I 2048
    python benchmarks/fp8_headroom.py --hidden 1024    # shorter rows: fewer blocks per row

Prints per spread: the mean |log2| imbalance before, after (wisca: per-block folds into
``weight_scale_inv`` and per-unit limits), after without the folds (``solve.FOLD`` off: only the
codes' own limits), and after without any limits; for each, units moved and units the codes
clamped; the blocks folded; how many up rows cannot be scaled down in their codes at all (a code
whose last bit is 2**-9) or up (a code at 448). The folded result is applied (codes and
weight_scale_inv) and its dequantised weights checked to be the source's times the scales, bit
for bit. The README quotes it.
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
    from wisca_cli.solve import apply_pair, fold_blocks, solve_pair
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
        folded = solve_pair(layout, pair, tensors, fold=True)
        limited = solve_pair(layout, pair, tensors, fold=False)
        free = scales_from_stats("ffn", unit_stats(pair, tensors, fp8_block=block), dtype=torch.bfloat16)
        live = ~torch.isnan(limited.before)
        mean = lambda x: float(x[live].abs().mean())  # noqa: E731
        moved = lambda r: int((r.scales != 1).sum())  # noqa: E731
        floor = int((fp8.exponent_limits(tensors["up"], 0)[0] == 0).sum())      # rows that cannot go down
        ceiling = int((fp8.exponent_limits(tensors["up"], 0)[1] == 0).sum())    # rows holding a 448
        print(f"skew 2**N(0, {spread}): imbalance {mean(folded.before):.2f} -> {mean(folded.after):.2f} with folds "
              f"(moved {moved(folded)}, fp8-clamped {folded.fp8_clamped}, blocks folded "
              f"{fold_blocks(folded.fp8_folds)}); without folds -> {mean(limited.after):.2f} (moved "
              f"{moved(limited)}, fp8-clamped {limited.fp8_clamped}); without limits -> {mean(free.after):.2f} "
              f"(moved {moved(free)}); up rows that cannot go down {floor}, up {ceiling}")
        new = {**tensors, **apply_pair(pair, tensors, folded, block)}   # applied, every code checked
        s = folded.scales.double()
        for role, mult in (("up", s[:, None]), ("down", 1 / s[None, :])):
            before = fp8.dequantize(tensors[role], tensors[role + "_scale_inv"], block).double()
            after = fp8.dequantize(new[role], new[role + "_scale_inv"], block).double()
            assert torch.equal(after, before * mult), role

if __name__ == "__main__":
    main()
