"""Cost of the in-process transition against one optimizer step, on the same model in memory.

    python -m benchmarks.live                      # TinyLlama-1.1B shape, bf16 and fp32
    python -m benchmarks.live --layers 4 --dtypes float32 --rounds 2   # a quick look

Builds a LlamaForCausalLM with TinyLlama's shape (random weights, skewed by exact
power-of-two rescalings so there is something to balance), an AdamW optimizer with state
(one step taken), and times, in alternation, ``optimizer.step()`` and
``wisca_cli.transition(model, optimizer, verify=False)``. The first transition balances;
later ones find scales of 1 but do the same reads and in-place writes. Prints medians, spread and the ratio; --json for a report.
torch's AdamW keeps its moments in the parameters' dtype, so "bf16" means bf16 weights and
bf16 moments; "float32" is fp32 weights and fp32 moments (the mixed-precision master copy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch


def build(layers: int, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        for layer in model.model.layers:   # skew V/O and up/down by powers of two: same function
            t = torch.exp2(torch.randint(-3, 4, (layer.self_attn.v_proj.weight.shape[0],), generator=g).to(dtype))
            layer.self_attn.v_proj.weight.mul_(t[:, None])
            layer.self_attn.o_proj.weight.div_(t.repeat(8)[None, :])
            u = torch.exp2(torch.randint(-3, 4, (layer.mlp.up_proj.weight.shape[0],), generator=g).to(dtype))
            layer.mlp.up_proj.weight.mul_(u[:, None])
            layer.mlp.down_proj.weight.div_(u[None, :])
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.live", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import wisca_cli as wisca

    torch.set_num_threads(os.cpu_count() or 1)
    results = {"machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                           "torch": torch.__version__, "threads": torch.get_num_threads()},
               "layers": args.layers, "runs": {}}
    for name in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        dtype = getattr(torch, name)
        model = build(args.layers, dtype)
        params = [p for p in model.parameters()]
        opt = torch.optim.AdamW(params, lr=1e-4)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()                                    # moments exist
        steps, trans = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            opt.step()
            steps.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            report = wisca.transition(model, opt, verify=False)
            trans.append(time.perf_counter() - t0)
            changed = sum(s["units_changed"] for s in report["summary"].values())
        n_params = sum(p.numel() for p in params)
        run = {"params": n_params, "optimizer_step_s": steps, "transition_s": trans,
               "optimizer_step_median_s": statistics.median(steps), "transition_median_s": statistics.median(trans),
               "ratio": statistics.median(trans) / statistics.median(steps), "units_changed_last": changed}
        results["runs"][name] = run
        del model, opt, params
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        m = results["machine"]
        print(f"machine: {m['cpus']} cpus ({m['cpu']}), torch {m['torch']}, {m['threads']} threads; "
              f"{args.layers} layers (TinyLlama-1.1B shape)")
        for name, r in results["runs"].items():
            print(f"{name:9s} {r['params'] / 1e9:.2f}B params: optimizer.step {r['optimizer_step_median_s']:.2f} s "
                  f"[{min(r['optimizer_step_s']):.2f}-{max(r['optimizer_step_s']):.2f}], transition(verify=False) "
                  f"{r['transition_median_s']:.2f} s [{min(r['transition_s']):.2f}-{max(r['transition_s']):.2f}] "
                  f"-> {r['ratio']:.2f}x (target <= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
