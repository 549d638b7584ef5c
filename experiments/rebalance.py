"""Rebalancing inside the training loop of a tiny GQA Llama: SGD+momentum vs AdamW,
natural vs induced imbalance, once vs every k steps, against a shuffled-scales control.

The model and data are experiments/transition.py's (byte-level Llama on the Python
stdlib's top-level modules), smaller (hidden 64, 2 layers, 4 query heads on 2 kv heads,
sequence 64) so that a grid with 5 seeds fits a CPU. The transition is the library's live
one: ``wisca_cli.transition(model, optimizer)`` in the loop (pow2 scales, channel
granularity, fro norm; parameters times S, SGD momentum and Adam's exp_avg by 1/S,
exp_avg_sq by 1/S**2).

Imbalance:
  natural     the model as initialised
  induced     at a fixed function (powers of two: bit-identical logits, checked):
              q_proj x 8 / k_proj / 8, v_proj x 8 / o_proj columns / 8, up_proj x 4 /
              down_proj columns / 4, in every layer
Arms (all from the same initial function, same batches):
  none            never rebalanced
  once            wisca.transition at step 0
  every           wisca.transition every k steps (step 0 included)
  shuffled-once   control: once's scales permuted across the units of each pair and
                  layer (the same multiset of scales, other units), optimizer state alike

    python experiments/rebalance.py --out runs/rebalance            # the shipped grid
    python experiments/rebalance.py --out /tmp/smoke --smoke        # seconds (the test suite)

Writes results.json, results.md and rebalance.png into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transition as tr  # noqa: E402
from stats import fmt_ci, mean_ci  # noqa: E402

import wisca_cli as wisca  # noqa: E402
from wisca_cli.record import layer_scales  # noqa: E402
from wisca_cli.solve import layer_multipliers  # noqa: E402
from wisca_cli.spec import layout_from_config  # noqa: E402

ARMS = ("none", "once", "every", "shuffled-once")
INDUCED = (("q_proj", 0, 8.0), ("k_proj", 0, 1 / 8), ("v_proj", 0, 8.0), ("o_proj", 1, 1 / 8),
           ("up_proj", 0, 4.0), ("down_proj", 1, 1 / 4))

FULL = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 176, "seq_len": 64,
        "batch_size": 16, "steps": 150, "every": 25, "eval_every": 25, "eval_batches": 4, "grad_clip": 1.0,
        "seeds": [0, 1, 2, 3, 4], "lr": {"sgd": 0.3, "adamw": 3e-3}, "lr_mults": [1.0],
        "cells": ["sgd/induced", "adamw/induced"], "arms": list(ARMS)}
SMOKE = {**FULL, "hidden": 32, "layers": 1, "intermediate": 64, "seq_len": 16, "batch_size": 2, "steps": 4,
         "every": 2, "eval_every": 2, "eval_batches": 1, "seeds": [0], "cells": ["sgd/induced", "adamw/induced"]}


def make_optimizer(model, opt: str, lr: float):
    if opt == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return tr.make_optimizer(list(model.named_parameters()), lr, 0.1)


def induce_imbalance_(model) -> None:
    """Q x 8 / K / 8, V x 8 / O / 8, up x 4 / down / 4 in every layer: the same function."""
    with torch.no_grad():
        for layer in model.model.layers:
            for name, axis, factor in INDUCED:
                mod = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
                mod.weight.mul_(factor)   # axis 0: rows; axis 1: columns; a uniform factor is the same


def layer_imbalance(model) -> dict[str, float]:
    """Mean over layers of |log2(||A|| / ||B||)| per pair, whole tensors (fro): the part of
    the imbalance the induced factors set, and a coarse view of the natural one."""
    out = {"qk": [], "vo": [], "ffn": []}
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        r = a.q_proj.weight.shape[0] / a.k_proj.weight.shape[0]     # GQA: Q has R x K's rows
        out["qk"].append(abs(math.log2(a.q_proj.weight.detach().norm() / a.k_proj.weight.detach().norm() / math.sqrt(r))))
        out["vo"].append(abs(math.log2(a.v_proj.weight.detach().norm() * math.sqrt(r) / a.o_proj.weight.detach().norm())))
        out["ffn"].append(abs(math.log2(m.up_proj.weight.detach().norm() / m.down_proj.weight.detach().norm())))
    return {k: sum(v) / len(v) for k, v in out.items()}


def multipliers_from_scales(model, scales: dict[str, torch.Tensor], granularity: str = "channel",
                            targets=("qk", "vo", "ffn")) -> dict[str, torch.Tensor]:
    """parameter name -> S (W' = S W) for recorded per-unit scales (``layers.{i}.{kind}``)."""
    layout = layout_from_config(model.config.to_dict())
    params = dict(model.named_parameters())
    out = {}
    for layer in range(layout.layers):
        names = layout.layer_roles(layer)
        shapes = {role: params[n].shape for role, n in names.items() if n in params}
        mults = layer_multipliers(layout, layer, shapes, tuple(targets), granularity, layer_scales(scales, layer))
        out.update({names[role]: m for role, m in mults.items()})
    return out


def apply_multipliers_(model, opt, mults: dict[str, torch.Tensor], inverse: bool = False) -> None:
    """W' = S W and the optimizer state alike (momentum, exp_avg / S; exp_avg_sq / S**2)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, S in mults.items():
            S = (1 / S if inverse else S).to(torch.float32)
            p = params[name]
            p.mul_(S)
            st = opt.state.get(p, {})
            for key, power in (("momentum_buffer", 1), ("exp_avg", 1), ("exp_avg_sq", 2)):
                if st.get(key) is not None:
                    st[key].div_(S ** power)


def shuffled_transition(model, opt, seed: int) -> dict:
    """The control: wisca.transition's own scales, permuted across the units of each pair and
    layer, applied instead of them (the real ones undone exactly: powers of two)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = wisca.transition(model, opt, record_dir=tmp)
        scales = load_file(str(Path(tmp) / "wisca_scales.safetensors"))
    real = multipliers_from_scales(model, scales)
    apply_multipliers_(model, opt, real, inverse=True)
    g = torch.Generator().manual_seed(seed)
    order = {k: torch.randperm(len(v), generator=g) for k, v in sorted(scales.items())}
    perm = {k: scales[k][order[k]] for k in order}
    apply_multipliers_(model, opt, multipliers_from_scales(model, perm))
    # per pair: (scales sorted, the control's sorted, the control equals the scales unit by unit,
    # units the permutation moved): a uniform imbalance gives equal scales, which a permutation
    # cannot change (docs/efficacy.md)
    report["control_scales"] = {k: (sorted(scales[k].tolist()), sorted(perm[k].tolist()),
                                    bool(torch.equal(scales[k], perm[k])),
                                    int((order[k] != torch.arange(len(order[k]))).sum())) for k in scales}
    return report


def build(cfg: dict, seed: int, imbalance: str):
    args = SimpleNamespace(**{k: cfg[k] for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "seq_len")})
    model = tr.make_model(args, seed)
    if imbalance == "induced":
        induce_imbalance_(model)
    return model


def train_arm(cfg: dict, data, opt_name: str, imbalance: str, arm: str, seed: int, lr: float) -> dict:
    model = build(cfg, seed, imbalance)
    opt = make_optimizer(model, opt_name, lr)
    offsets = tr.batch_offsets(seed, cfg["steps"], len(data["train"]), cfg["batch_size"], cfg["seq_len"])
    params = [p for p in model.parameters() if p.requires_grad]
    curve, imb, transitions, train_loss = {}, {}, [], []
    for step in range(cfg["steps"] + 1):
        if (arm == "once" and step == 0) or (arm == "every" and step % cfg["every"] == 0 and step < cfg["steps"]):
            rep = wisca.transition(model, opt)
            transitions.append({"step": step, "units_changed": _changed(rep),
                                "imbalance": {k: [v["imbalance_before"], v["imbalance_after"]]
                                              for k, v in rep["summary"].items()},
                                "verification": bool(rep["verification"]["passed"])})
        elif arm == "shuffled-once" and step == 0:
            rep = shuffled_transition(model, opt, 80_000 + seed)
            transitions.append({"step": 0, "control_scales": rep["control_scales"]})
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            v = tr.evaluate(model, data["val"])
            curve[step] = v if math.isfinite(v) else float("inf")
            imb[step] = layer_imbalance(model)
        if step == cfg["steps"]:
            break
        for group in opt.param_groups:
            group["lr"] = tr.lr_at(step, lr, lr / 10, max(1, cfg["steps"] // 12), cfg["steps"])
        x, y = tr.get_batch(data["train"], offsets[step], cfg["seq_len"])
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        train_loss.append(loss.item())
    return {"curve": curve, "imbalance": imb, "transitions": transitions, "final": curve[cfg["steps"]],
            "train_last": sum(train_loss[-20:]) / max(1, len(train_loss[-20:]))}


def _changed(rep: dict) -> float:
    units = sum(v.get("units", 0) for v in rep["summary"].values())
    changed = sum(v.get("units_changed", 0) for v in rep["summary"].values())
    return changed / units if units else float("nan")


def start_check(cfg: dict, data, seed: int) -> dict:
    """Step-0 logits of every arm's start against the plain model's: bit-identical (pow2)."""
    x = data["val"][0][0][:2]
    base = build(cfg, seed, "natural")
    with torch.no_grad():
        ref = base(input_ids=x, use_cache=False).logits
    out = {}
    for imbalance in ("natural", "induced"):
        for arm in ARMS:
            model = build(cfg, seed, imbalance)
            opt = make_optimizer(model, "sgd", 0.1)
            ctrl = None
            if arm in ("once", "every"):
                wisca.transition(model, opt)
            elif arm == "shuffled-once":
                ctrl = shuffled_transition(model, opt, 80_000 + seed)["control_scales"]
            with torch.no_grad():
                logits = model(input_ids=x, use_cache=False).logits
            out[f"{imbalance}/{arm}"] = {"bit_identical": bool(torch.equal(logits, ref)),
                                         "imbalance": layer_imbalance(model), "control_scales": ctrl}
    return out


def analyse(results: dict, cfg: dict) -> dict:
    """Per cell: best lr per arm (mean final val loss), paired differences with CIs."""
    out = {}
    for cell, by_arm in results.items():
        best = {}
        for arm, by_lr in by_arm.items():
            means = {lr: sum(r["final"] for r in runs) / len(runs) for lr, runs in by_lr.items()}
            best[arm] = min(means, key=means.get)
        rows = {}
        for arm in by_arm:
            finals = [r["final"] for r in by_arm[arm][best[arm]]]
            rows[arm] = {"best_lr": best[arm], "final": mean_ci(finals), "per_seed": finals,
                         "per_lr_mean": {lr: sum(r["final"] for r in runs) / len(runs)
                                         for lr, runs in by_arm[arm].items()}}

        def paired(a, b, same_lr=None):
            la = by_arm[a][same_lr or best[a]]
            lb = by_arm[b][same_lr or best[b]]
            d = [(x["final"] - y["final"]) / y["final"] for x, y in zip(la, lb)]
            return {"rel_diff": mean_ci(d), "per_seed": d}

        comps = {f"{a} - none": paired(a, "none") for a in by_arm if a != "none"}
        if "once" in by_arm and "shuffled-once" in by_arm:
            comps["once - shuffled-once"] = paired("once", "shuffled-once")
        for lr in by_arm.get("none", {}):
            if "once" in by_arm and lr in by_arm["once"] and len(by_arm["none"]) > 1:
                comps[f"once - none @ lr {lr:g}"] = paired("once", "none", same_lr=lr)
        out[cell] = {"rows": rows, "comparisons": comps}
    return out


def write_md(out: Path, result: dict) -> None:
    cfg = result["config"]
    lines = ["# Rebalancing in the loop: a tiny GQA Llama", "", f"Command: `{result['command']}`  ",
             f"Wall time {result['wall_s']:.0f} s; {result['machine']}", "",
             f"Model: hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads / {cfg['kv_heads']} kv, "
             f"intermediate {cfg['intermediate']}; {cfg['steps']} steps of {cfg['batch_size']} x {cfg['seq_len']} bytes; "
             f"every = every {cfg['every']} steps; seeds {cfg['seeds']}.", "",
             "Step-0 check (logits against the natural model, seed 0): " + ", ".join(
                 f"{k} {'bit-identical' if v['bit_identical'] else 'DIFFERENT'}" for k, v in result["start_check"].items()),
             ""]
    for cell, res in result["analysis"].items():
        lines += [f"## {cell}", "", "| arm | best lr | final val loss, mean [95 % CI] | per lr (mean) |", "|---|---|---|---|"]
        for arm, row in res["rows"].items():
            per = ", ".join(f"{lr:g}: {v:.4f}" for lr, v in row["per_lr_mean"].items())
            lines.append(f"| {arm} | {row['best_lr']:g} | {fmt_ci(row['final'], 4)} | {per} |")
        lines += ["", "| comparison (paired, relative Δ val loss) | mean [95 % CI] |", "|---|---|"]
        for name, c in res["comparisons"].items():
            lines.append(f"| {name} | {fmt_ci(c['rel_diff'], 2, pct=True)} |")
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))


def plot(out: Path, result: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(result["runs"])
    fig, axes = plt.subplots(2, len(cells), figsize=(5 * len(cells), 7), squeeze=False)
    for k, cell in enumerate(cells):
        for arm, by_lr in result["runs"][cell].items():
            lr = result["analysis"][cell]["rows"][arm]["best_lr"]
            runs = by_lr[lr]
            steps = sorted(runs[0]["curve"])
            axes[0][k].plot(steps, [sum(r["curve"][s] for r in runs) / len(runs) for s in steps], label=f"{arm} ({lr:g})")
            axes[1][k].plot(steps, [sum(sum(r["imbalance"][s].values()) / 3 for r in runs) / len(runs) for s in steps],
                            label=arm)
        axes[0][k].set_title(f"{cell}: val loss (mean over seeds)", fontsize=9)
        axes[1][k].set_title("layer-level imbalance |log2 ||A||/||B|| |, mean of qk/vo/ffn", fontsize=9)
        axes[1][k].set_xlabel("step")
        axes[0][k].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "rebalance.png", dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--cells", help="comma-separated opt/imbalance cells, e.g. sgd/induced,adamw/natural")
    p.add_argument("--arms", help=f"comma-separated, of {','.join(ARMS)}")
    p.add_argument("--seeds", type=int, help="number of seeds (0..n-1)")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr-mults", help="multipliers of the base lr, e.g. 0.3,1,3")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = json.loads(json.dumps(SMOKE if a.smoke else FULL))
    if a.cells:
        cfg["cells"] = a.cells.split(",")
    if a.arms:
        cfg["arms"] = a.arms.split(",")
    if a.seeds:
        cfg["seeds"] = list(range(a.seeds))
    if a.steps:
        cfg["steps"] = a.steps
    if a.lr_mults:
        cfg["lr_mults"] = [float(x) for x in a.lr_mults.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train, val = tr.load_corpus(None)
    data = {"train": train, "val": tr.val_batches(val, cfg["eval_batches"], cfg["batch_size"], cfg["seq_len"])}
    result = {"command": "python experiments/rebalance.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {a.threads} thread(s)",
              "config": cfg, "start_check": start_check(cfg, data, cfg["seeds"][0]), "runs": {}}
    for cell in cfg["cells"]:
        opt_name, imbalance = cell.split("/")
        result["runs"][cell] = {}
        for arm in cfg["arms"]:
            result["runs"][cell][arm] = {}
            for mult in cfg["lr_mults"]:
                lr = cfg["lr"][opt_name] * mult
                runs = []
                for seed in cfg["seeds"]:
                    t1 = time.time()
                    runs.append(train_arm(cfg, data, opt_name, imbalance, arm, seed, lr))
                    print(f"  {cell:14s} {arm:14s} lr {lr:<7g} seed {seed} val {runs[-1]['final']:.4f} "
                          f"({time.time() - t1:.1f}s)", flush=True)
                result["runs"][cell][arm][lr] = runs
    result["analysis"] = analyse(result["runs"], cfg)
    result["wall_s"] = time.time() - t0
    write_md(out, result)
    plot(out, result)
    js = json.loads(json.dumps(result, default=str))
    (out / "results.json").write_text(json.dumps(js, indent=1))
    print(f"wrote {out}/results.md ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
