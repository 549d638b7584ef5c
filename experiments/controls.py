"""Positive controls: set-ups where the literature reports that rebalancing helps.

If rebalancing cannot be shown to help here, the transformer experiments' nulls say
nothing; if it helps here and not there, the difference is the regime.

(a) ENorm (Stock et al., ICLR 2019, arXiv 1902.10416). A fully connected ReLU network
    without normalisation (32 -> 9 x 128 -> 10: ten linear layers), plain SGD, on a
    teacher-labelled Gaussian classification task generated here. Each seed's Kaiming
    initialisation is unbalanced at a fixed function: every hidden neuron j of layer l
    gets a factor c = 4**k (k = +-1 at random) on its incoming weights and bias and 1/c
    on its outgoing weights. Powers of two: every arm starts from a network that
    computes bit-identical logits. Arms:
      never             plain SGD
      once              ENorm's per-neuron balancing (sqrt(||out||/||in||)), power-of-two,
                        swept to a fixed point at step 0
      every             ENorm: one continuous balancing sweep after every SGD step
      every-pow2        the same with power-of-two scales
      shuffled-once     control for once: its per-neuron scales permuted within each layer
      shuffled-every    control for every-pow2: each step's pow2 sweep scales permuted
                        within each layer before they are applied
      kaiming           reference: the network before it was unbalanced (same function)

(b) Balanced LoRA's synthetic low-rank regression (arXiv 2605.31484): a 20 x 20 rank-4
    target W*, the model B A (B 20 x 4, A 4 x 20), loss ||(B A - W*) X||^2 / ||W* X||^2 on
    100 Gaussian inputs, full-batch GD or Adam, float64. Initialisation unbalanced at a
    fixed product: A = 8 A0, B = B0 / 8 (A0 ~ N(0, 1/20), B0 ~ N(0, 1/4)). Arms:
      plain             no balancing
      diag-once/every   WISCA's LoRA symmetry: per rank channel k, A[k] * s, B[:, k] / s,
                        s = sqrt(||B[:, k]|| / ||A[k]||) (continuous), at step 0 / every step
      gl-once/every     GL(r): (B M^-1)(M A) with M the symmetric positive-definite solution
                        of M A A^T M = M^-1 B^T B M^-1 (then A A^T = B^T B), at step 0 / every step
      *-shuffled        control for diag: the same scales, permuted across the rank channels
      *-control         control for gl: the same spectrum as M in a random orthonormal basis
                        (R diag(eig M) R^T): as much rescaling, in the wrong directions
    Adam's moments follow the transform where it is exact: diagonal scales divide exp_avg by
    s and exp_avg_sq by s**2 (per element); for GL, exp_avg becomes M^-T exp_avg (A) and
    exp_avg M^T (B), and exp_avg_sq is left as it is (an element-wise second moment has no
    exact image under a non-diagonal M).

Every arm runs every learning rate of its grid on every seed; the seeds of one arm share
its best learning rate (lowest mean log10 final loss). Per arm: final loss and steps to a
threshold at that rate; paired differences across seeds (arm at its best rate minus the
reference at its own best rate, and arm minus its control) with 95 % t-intervals.

    python experiments/controls.py --out runs/controls              # everything (~10 min, 1 thread)
    python experiments/controls.py --out runs/controls --part lora  # only (b)
    python experiments/controls.py --out /tmp/smoke --smoke         # seconds (the test suite)

Writes results.json (settings, curves, tables), results.md and controls.png into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import fmt_ci, mean_ci  # noqa: E402

from wisca_cli.gl import gl_balance  # noqa: E402

FLOOR = 1e-12   # losses below this count as this (log10 differences stay finite)


# =============================================================================
# (a) ENorm: a deep ReLU MLP under plain SGD

MLP_ARMS = ("never", "once", "every", "every-pow2", "shuffled-once", "shuffled-every", "kaiming")
MLP_CONTROLS = {"once": "shuffled-once", "every-pow2": "shuffled-every"}


def teacher_data(n: int, d_in: int, classes: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs labelled by a fixed random two-layer ReLU teacher (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    t1 = torch.randn(64, d_in, generator=g) * math.sqrt(2 / d_in)
    t2 = torch.randn(classes, 64, generator=g) * math.sqrt(2 / 64)
    return x, (torch.relu(x @ t1.T) @ t2.T).argmax(1)


def mlp_init(seeds: list[int], sizes: list[int]) -> list[list[torch.Tensor]]:
    """[[W0, b0], [W1, b1], ...] with a leading seed dimension: Kaiming normal, zero bias."""
    layers = []
    gens = [torch.Generator().manual_seed(10_000 + s) for s in seeds]
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        w = torch.stack([torch.randn(fan_out, fan_in, generator=g) for g in gens]) * math.sqrt(2 / fan_in)
        layers.append([w, torch.zeros(len(seeds), fan_out)])
    return layers


def clone(net):
    return [[w.clone(), b.clone()] for w, b in net]


def mlp_forward(net, x: torch.Tensor) -> torch.Tensor:
    """x [S, batch, in] -> logits [S, batch, classes]."""
    h = x
    for i, (w, b) in enumerate(net):
        h = torch.baddbmm(b[:, None, :], h, w.transpose(1, 2))
        if i < len(net) - 1:
            h = torch.relu(h)
    return h


def rescale_neurons_(net, layer: int, d: torch.Tensor) -> None:
    """Hidden layer `layer` (the output of linear `layer`): incoming rows and bias times d,
    outgoing columns of linear layer+1 times 1/d. d [S, width] > 0. Function-preserving."""
    w, b = net[layer]
    w.mul_(d[:, :, None])
    b.mul_(d)
    net[layer + 1][0].div_(d[:, None, :])


def unbalance_(net, seeds: list[int], factor: float = 4.0) -> list[torch.Tensor]:
    """Every hidden neuron times factor**(+-1) (at random per seed): the same function."""
    gens = [torch.Generator().manual_seed(20_000 + s) for s in seeds]
    cs = []
    for layer in range(len(net) - 1):
        width = net[layer][0].shape[1]
        k = torch.stack([torch.randint(0, 2, (width,), generator=g) for g in gens]) * 2 - 1
        c = factor ** k.to(torch.float32)
        rescale_neurons_(net, layer, c)
        cs.append(c)
    return cs


def enorm_scales(net, layer: int, pow2: bool) -> torch.Tensor:
    """ENorm's per-neuron balancing scale for one hidden layer: sqrt(||out|| / ||in||)."""
    n_in = net[layer][0].norm(dim=2)            # row j of W_l
    n_out = net[layer + 1][0].norm(dim=1)       # column j of W_{l+1}
    d = torch.sqrt(n_out / n_in)
    d = torch.where(torch.isfinite(d) & (d > 0), d, torch.ones_like(d))
    return torch.exp2(torch.round(torch.log2(d))) if pow2 else d


def enorm_sweep_(net, pow2: bool, perm_gen: torch.Generator | None = None) -> list[torch.Tensor]:
    """One ENorm cycle, layer by layer from the input. perm_gen: the control, each layer's
    scales permuted across its neurons (per seed) before they are applied."""
    applied = []
    for layer in range(len(net) - 1):
        d = enorm_scales(net, layer, pow2)
        if perm_gen is not None:
            d = torch.stack([row[torch.randperm(len(row), generator=perm_gen)] for row in d])
        rescale_neurons_(net, layer, d)
        applied.append(d)
    return applied


def enorm_converge_(net, pow2: bool, sweeps: int = 30) -> list[torch.Tensor]:
    """Sweep to a fixed point; returns each layer's total per-neuron scale."""
    total = [torch.ones_like(net[i][1]) for i in range(len(net) - 1)]
    for _ in range(sweeps):
        d = enorm_sweep_(net, pow2)
        total = [t * di for t, di in zip(total, d)]
        if all(bool((di == 1).all()) for di in d):
            break
    return total


def shuffled(scales: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.stack([row[torch.randperm(len(row), generator=gen)] for row in d]) for d in scales]


def mlp_imbalance(net) -> float:
    """Mean |log2(||in_j|| / ||out_j||)| over hidden neurons and seeds."""
    vals = [torch.log2(net[i][0].norm(dim=2) / net[i + 1][0].norm(dim=1)).abs().mean() for i in range(len(net) - 1)]
    return float(torch.stack(vals).mean())


def mlp_start(arm: str, base, unbalanced, seeds: list[int]):
    """The arm's network at step 0 (before the first SGD step) and its step-0 scales."""
    if arm == "kaiming":
        return clone(base), None
    net = clone(unbalanced)
    scales = None
    if arm in ("once", "shuffled-once"):
        probe = clone(unbalanced)
        scales = enorm_converge_(probe, pow2=True)
        if arm == "once":
            net = probe
        else:
            scales = shuffled(scales, torch.Generator().manual_seed(30_000 + seeds[0]))
            for layer, d in enumerate(scales):
                rescale_neurons_(net, layer, d)
    return net, scales


def mlp_setup(cfg: dict):
    sizes = [cfg["d_in"]] + [cfg["width"]] * (cfg["depth"] - 1) + [cfg["classes"]]
    x, y = teacher_data(cfg["n_train"] + cfg["n_val"], cfg["d_in"], cfg["classes"])
    data = {"x": x[:cfg["n_train"]], "y": y[:cfg["n_train"]], "xv": x[cfg["n_train"]:], "yv": y[cfg["n_train"]:]}
    base = mlp_init(cfg["seeds"], sizes)
    unbalanced = clone(base)
    unbalance_(unbalanced, cfg["seeds"])
    return data, base, unbalanced


def mlp_loss(net, x, y, S: int) -> torch.Tensor:
    """Per-seed mean cross-entropy of x [n, in] (shared by the seeds)."""
    logits = mlp_forward(net, x.expand(S, -1, -1))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(S), reduction="none").view(S, -1).mean(1)


def train_mlp(arm: str, lr: float, cfg: dict, data, base, unbalanced) -> dict:
    seeds, S = cfg["seeds"], len(cfg["seeds"])
    net, _ = mlp_start(arm, base, unbalanced, seeds)
    ev_x, ev_y = data["x"][:cfg["n_eval"]], data["y"][:cfg["n_eval"]]
    gens = [torch.Generator().manual_seed(40_000 + s) for s in seeds]
    order = torch.stack([torch.randint(cfg["n_train"], (cfg["steps"], cfg["batch"]), generator=g) for g in gens])
    perm_gen = torch.Generator().manual_seed(50_000 + seeds[0])
    curve, imb = {}, {}
    for step in range(cfg["steps"] + 1):
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            with torch.no_grad():
                curve[step] = mlp_loss(net, ev_x, ev_y, S).tolist()
            imb[step] = mlp_imbalance(net)
        if step == cfg["steps"]:
            break
        with torch.no_grad():       # the balancing arms balance before every step (the first included)
            if arm == "every":
                enorm_sweep_(net, pow2=False)
            elif arm == "every-pow2":
                enorm_sweep_(net, pow2=True)
            elif arm == "shuffled-every":
                enorm_sweep_(net, pow2=True, perm_gen=perm_gen)
        params = [t.requires_grad_() for layer in net for t in layer]
        idx = order[:, step]
        logits = mlp_forward(net, data["x"][idx])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data["y"][idx].reshape(-1),
                               reduction="sum") / cfg["batch"]     # the sum of the seeds' mean losses
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            net = [[w - lr * gw, b - lr * gb] for (w, b), gw, gb in zip(net, grads[0::2], grads[1::2])]
    with torch.no_grad():
        val = mlp_loss(net, data["xv"], data["yv"], S).tolist()
    return {"curve": curve, "imbalance": imb, "val_loss": val}


def mlp_start_check(cfg: dict, data, base, unbalanced) -> dict:
    """Every arm's step-0 logits against `never`'s: bit-identical for the pow2 arms."""
    S = len(cfg["seeds"])
    x = data["x"][:cfg["n_eval"]].expand(S, -1, -1)
    ref = mlp_forward(unbalanced, x)
    out = {}
    for arm in MLP_ARMS:
        net, scales = mlp_start(arm, base, unbalanced, cfg["seeds"])
        if arm == "every":
            enorm_sweep_(net, pow2=False)      # its first balancing: continuous, not bit-exact
        elif arm == "every-pow2":
            enorm_sweep_(net, pow2=True)
        elif arm == "shuffled-every":
            enorm_sweep_(net, pow2=True, perm_gen=torch.Generator().manual_seed(50_000 + cfg["seeds"][0]))
        out[arm] = {"bit_identical": bool(torch.equal(mlp_forward(net, x), ref)),
                    "max_abs_diff": float((mlp_forward(net, x) - ref).abs().max()),
                    "imbalance": mlp_imbalance(net)}
        if scales is not None:
            out[arm]["scale_multiset"] = [sorted(torch.log2(d[0]).round().int().tolist()) for d in scales]
    return out


# =============================================================================
# (b) Balanced LoRA's synthetic low-rank regression

LORA_ARMS = ("plain", "diag-once", "diag-every", "gl-once", "gl-every",
             "diag-once-shuffled", "diag-every-shuffled", "gl-once-control", "gl-every-control")
LORA_CONTROLS = {"diag-once": "diag-once-shuffled", "diag-every": "diag-every-shuffled",
                 "gl-once": "gl-once-control", "gl-every": "gl-every-control"}


def lora_problem(cfg: dict) -> dict:
    n, r, S = cfg["n"], cfg["rank"], len(cfg["seeds"])
    gens = [torch.Generator().manual_seed(60_000 + s) for s in cfg["seeds"]]
    dt = torch.float64

    def per_seed(fn):
        return torch.stack([fn(g) for g in gens])

    U = per_seed(lambda g: torch.linalg.qr(torch.randn(n, r, generator=g, dtype=dt))[0])
    V = per_seed(lambda g: torch.linalg.qr(torch.randn(n, r, generator=g, dtype=dt))[0])
    sigma = torch.tensor(cfg["sigma"], dtype=dt)
    W = U @ torch.diag_embed(sigma.expand(S, -1)) @ V.transpose(1, 2)
    X = per_seed(lambda g: torch.randn(n, cfg["samples"], generator=g, dtype=dt))
    C = X @ X.transpose(1, 2) / ((W @ X) ** 2).sum((1, 2))[:, None, None]
    A0 = per_seed(lambda g: torch.randn(r, n, generator=g, dtype=dt)) / math.sqrt(n)
    B0 = per_seed(lambda g: torch.randn(n, r, generator=g, dtype=dt)) / math.sqrt(r)
    k = cfg["kappa"]
    return {"W": W, "C": C, "A": A0 * k, "B": B0 / k}


def lora_loss_grad(A, B, W, C):
    D = B @ A - W
    DC = D @ C
    loss = (DC * D).sum((1, 2))
    G = 2 * DC
    return loss, G @ A.transpose(1, 2), B.transpose(1, 2) @ G   # loss, dL/dB, dL/dA


def diag_scales(A, B) -> torch.Tensor:
    """WISCA's per-rank-channel balancing scale: s_k = sqrt(||B[:, k]|| / ||A[k]||)."""
    s = torch.sqrt(B.norm(dim=1) / A.norm(dim=2))
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))


def random_orthogonal(S: int, r: int, gen: torch.Generator, dtype) -> torch.Tensor:
    q, rr = torch.linalg.qr(torch.randn(S, r, r, generator=gen, dtype=dtype))
    return q * torch.sign(torch.diagonal(rr, dim1=1, dim2=2))[:, None, :]


def lora_transform(kind: str, A, B, state: dict | None, gen: torch.Generator):
    """One balancing (or control) step; returns (A', B') and updates Adam's state in place."""
    if kind.startswith("diag"):
        s = diag_scales(A, B)
        if "shuffled" in kind:
            s = torch.stack([row[torch.randperm(len(row), generator=gen)] for row in s])
        A2, B2 = A * s[:, :, None], B / s[:, None, :]
        if state:
            state["mA"].mul_(1 / s[:, :, None]); state["vA"].mul_(1 / s[:, :, None] ** 2)  # noqa: E702
            state["mB"].mul_(s[:, None, :]); state["vB"].mul_(s[:, None, :] ** 2)          # noqa: E702
        return A2, B2
    M, Minv = gl_balance(A, B)
    if "control" in kind:
        lam = torch.linalg.eigvalsh(M)
        R = random_orthogonal(A.shape[0], A.shape[1], gen, A.dtype)
        M = R @ torch.diag_embed(lam) @ R.transpose(1, 2)
        Minv = R @ torch.diag_embed(1 / lam) @ R.transpose(1, 2)
    A2, B2 = M @ A, B @ Minv
    if state:
        state["mA"].copy_(Minv.transpose(1, 2) @ state["mA"])
        state["mB"].copy_(state["mB"] @ M.transpose(1, 2))
    return A2, B2


def train_lora(arm: str, opt: str, lr: float, cfg: dict, prob: dict) -> dict:
    A, B, W, C = prob["A"].clone(), prob["B"].clone(), prob["W"], prob["C"]
    gen = torch.Generator().manual_seed(70_000 + cfg["seeds"][0])
    state = None
    if opt == "adam":
        state = {"mA": torch.zeros_like(A), "vA": torch.zeros_like(A), "mB": torch.zeros_like(B),
                 "vB": torch.zeros_like(B)}
    b1, b2, eps = 0.9, 0.999, 1e-8
    kind = None if arm == "plain" else arm.replace("-once", "").replace("-every", "")
    once, every = arm.endswith("-once") or "-once-" in arm, "-every" in arm
    if once:
        A, B = lora_transform(arm, A, B, state, gen)
    curve, imb = {}, {}
    for step in range(cfg["steps"] + 1):
        loss, gB, gA = lora_loss_grad(A, B, W, C)
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            curve[step] = loss.tolist()
            imb[step] = float((torch.linalg.matrix_norm(A @ A.transpose(1, 2) - B.transpose(1, 2) @ B)
                               / (A.norm(dim=(1, 2)) ** 2 + B.norm(dim=(1, 2)) ** 2)).mean())
        if step == cfg["steps"]:
            break
        if opt == "gd":
            A, B = A - lr * gA, B - lr * gB
        else:
            t = step + 1
            for p, g, m, v in (("A", gA, state["mA"], state["vA"]), ("B", gB, state["mB"], state["vB"])):
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                upd = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
                if p == "A":
                    A = A - lr * upd
                else:
                    B = B - lr * upd
        if every:
            A, B = lora_transform(arm, A, B, state, gen)
    assert kind is None or kind in ("diag", "gl", "diag-shuffled", "gl-control")
    return {"curve": curve, "imbalance": imb}


def lora_start_check(cfg: dict, prob: dict) -> dict:
    """Every arm's step-0 product against plain's, and the scale multisets of the controls."""
    out = {}
    ref = prob["B"] @ prob["A"]
    for arm in LORA_ARMS:
        A, B = prob["A"].clone(), prob["B"].clone()
        if arm != "plain":
            A, B = lora_transform(arm, A, B, None, torch.Generator().manual_seed(0))
        out[arm] = {"max_rel_product_diff": float(((B @ A - ref).norm() / ref.norm())),
                    "balance_residual": float((torch.linalg.matrix_norm(A @ A.transpose(1, 2) - B.transpose(1, 2) @ B)
                                               / torch.linalg.matrix_norm(A @ A.transpose(1, 2))).max())}
    return out


# =============================================================================
# analysis


def steps_to(curve: dict, seed_i: int, threshold: float) -> int | None:
    for step in sorted(curve):
        v = curve[step][seed_i]
        if math.isfinite(v) and v <= threshold:
            return step
    return None


def log_final(run: dict, i: int) -> float:
    v = run["curve"][max(run["curve"])][i]
    return math.log10(max(v, FLOOR)) if math.isfinite(v) else math.inf


def analyse(runs: dict, arms, ref: str, controls: dict, lrs: list[float], n_seeds: int, threshold: float,
            steps: int) -> dict:
    """runs[arm][lr_index] -> run. Best lr per arm, per-arm summaries, paired CIs."""
    best, per_lr = {}, {}
    for arm in arms:
        means = []
        for j in range(len(lrs)):
            vals = [log_final(runs[arm][j], i) for i in range(n_seeds)]
            means.append(sum(vals) / n_seeds if all(math.isfinite(v) for v in vals) else math.inf)
        per_lr[arm] = means
        best[arm] = min(range(len(lrs)), key=lambda j: means[j])
    censored = steps + 1       # "never reached": counted as one step past the budget

    def at_best(arm):
        run = runs[arm][best[arm]]
        logs = [log_final(run, i) for i in range(n_seeds)]
        hits = [steps_to(run["curve"], i, threshold) for i in range(n_seeds)]
        return logs, hits

    table = {}
    for arm in arms:
        logs, hits = at_best(arm)
        row = {"best_lr": lrs[best[arm]], "best_lr_index": best[arm],
               "best_lr_at_grid_edge": best[arm] in (0, len(lrs) - 1),
               "log10_final": mean_ci(logs), "final_loss_geomean": 10 ** (sum(logs) / n_seeds)
               if all(math.isfinite(v) for v in logs) else math.inf,
               "reached": sum(h is not None for h in hits), "steps_to_threshold": hits,
               "log10_final_per_seed": logs, "mean_log10_final_per_lr": per_lr[arm]}
        table[arm] = row

    def paired(a, b):
        la, ha = at_best(a)
        lb, hb = at_best(b)
        dl = [x - y for x, y in zip(la, lb)]
        ds = [(x if x is not None else censored) - (y if y is not None else censored) for x, y in zip(ha, hb)]
        return {"d_log10_final": mean_ci(dl), "d_steps": mean_ci(ds), "per_seed_d_log10": dl, "per_seed_d_steps": ds}

    comparisons = {}
    for arm in arms:
        if arm != ref:
            comparisons[f"{arm} - {ref}"] = paired(arm, ref)
    for arm, ctrl in controls.items():
        comparisons[f"{arm} - {ctrl}"] = paired(arm, ctrl)
    return {"best": {a: lrs[j] for a, j in best.items()}, "table": table, "comparisons": comparisons,
            "threshold": threshold}


# =============================================================================
# driver

CONFIGS = {
    "full": {
        "mlp": {"seeds": list(range(8)), "d_in": 32, "width": 128, "depth": 10, "classes": 10, "n_train": 8192,
                "n_val": 2048, "n_eval": 2048, "batch": 64, "steps": 400, "eval_every": 20,
                "lrs": [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1], "threshold": 1.2},
        "lora": {"seeds": list(range(8)), "n": 20, "rank": 4, "samples": 100, "sigma": [4.0, 2.0, 1.0, 0.5],
                 "kappa": 8.0, "steps": 1000, "eval_every": 10, "threshold": 1e-4,
                 "lrs": {"gd": [0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0],
                         "adam": [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]}},
    },
    "smoke": {
        "mlp": {"seeds": [0, 1], "d_in": 8, "width": 16, "depth": 4, "classes": 3, "n_train": 256, "n_val": 64,
                "n_eval": 64, "batch": 16, "steps": 6, "eval_every": 2, "lrs": [0.05, 0.1], "threshold": 1.0},
        "lora": {"seeds": [0, 1], "n": 20, "rank": 4, "samples": 100, "sigma": [4.0, 2.0, 1.0, 0.5],
                 "kappa": 8.0, "steps": 8, "eval_every": 2, "threshold": 0.5,
                 "lrs": {"gd": [0.05, 0.1], "adam": [0.01, 0.02]}},
    },
}


def run_mlp(cfg: dict) -> dict:
    data, base, unbalanced = mlp_setup(cfg)
    check = mlp_start_check(cfg, data, base, unbalanced)
    runs = {}
    for arm in MLP_ARMS:
        runs[arm] = []
        for lr in cfg["lrs"]:
            t0 = time.time()
            runs[arm].append(train_mlp(arm, lr, cfg, data, base, unbalanced))
            final = runs[arm][-1]["curve"][cfg["steps"]]
            print(f"  mlp {arm:15s} lr {lr:<6g} final {sum(final) / len(final):.4f}  {time.time() - t0:5.1f}s",
                  flush=True)
    res = analyse(runs, MLP_ARMS, "never", MLP_CONTROLS, cfg["lrs"], len(cfg["seeds"]), cfg["threshold"],
                  cfg["steps"])
    for arm in MLP_ARMS:
        res["table"][arm]["val_loss_at_best"] = runs[arm][res["table"][arm]["best_lr_index"]]["val_loss"]
    return {"config": cfg, "start_check": check, "runs": runs, **res}


def run_lora(cfg: dict) -> dict:
    prob = lora_problem(cfg)
    out = {"config": cfg, "start_check": lora_start_check(cfg, prob)}
    for opt in ("gd", "adam"):
        runs = {}
        for arm in LORA_ARMS:
            runs[arm] = [train_lora(arm, opt, lr, cfg, prob) for lr in cfg["lrs"][opt]]
        res = analyse(runs, LORA_ARMS, "plain", LORA_CONTROLS, cfg["lrs"][opt], len(cfg["seeds"]),
                      cfg["threshold"], cfg["steps"])
        for arm in LORA_ARMS:
            print(f"  lora/{opt} {arm:20s} best lr {res['best'][arm]:<6g} "
                  f"log10 final {fmt_ci(res['table'][arm]['log10_final'], 2)}", flush=True)
        out[opt] = {"runs": runs, **res}
    return out


def md_block(title: str, res: dict, arms, metric_note: str) -> list[str]:
    t = res["table"]
    lines = [f"### {title}", "", metric_note, "",
             "| arm | best lr | final loss (geo-mean) | log10 final, mean [95 % CI] | reached threshold | "
             "median steps to threshold |", "|---|---|---|---|---|---|"]
    for arm in arms:
        row = t[arm]
        hits = sorted(h for h in row["steps_to_threshold"] if h is not None)
        med = hits[len(hits) // 2] if hits else "—"
        edge = " (grid edge)" if row["best_lr_at_grid_edge"] else ""
        lines.append(f"| {arm} | {row['best_lr']:g}{edge} | {row['final_loss_geomean']:.3g} | "
                     f"{fmt_ci(row['log10_final'], 2)} | {row['reached']}/{len(row['steps_to_threshold'])} | {med} |")
    lines += ["", "Paired differences across seeds (each arm at its own best lr), 95 % t-interval; "
              "* = excludes 0. Negative = better.", "",
              "| comparison | Δ log10 final loss | Δ steps to threshold |", "|---|---|---|"]
    for name, c in res["comparisons"].items():
        lines.append(f"| {name} | {fmt_ci(c['d_log10_final'], 2)} | {fmt_ci(c['d_steps'], 0)} |")
    lines += ["", "Mean log10 final loss per learning rate (inf = a seed diverged):", "",
              "| arm | " + " | ".join(f"{lr:g}" for lr in res["lrs"]) + " |",
              "|---|" + "---|" * len(res["lrs"])]
    for arm in arms:
        lines.append(f"| {arm} | " + " | ".join(f"{v:+.2f}" if math.isfinite(v) else "inf"
                                                 for v in t[arm]["mean_log10_final_per_lr"]) + " |")
    return lines + [""]


def _identical(v: dict) -> str:
    return "bit-identical" if v["bit_identical"] else f"max |Δ| {v['max_abs_diff']:.1e}"


def write_md(out: Path, result: dict) -> None:
    lines = ["# Positive controls", "", f"Command: `{result['command']}`  ", f"Wall time: {result['wall_s']:.0f} s; "
             f"{result['machine']}", ""]
    if "mlp" in result:
        m = result["mlp"]
        c = m["config"]
        lines += [f"## (a) ENorm: {c['depth']}-layer ReLU MLP, width {c['width']}, plain SGD, "
                  f"{c['steps']} steps, batch {c['batch']}, {len(c['seeds'])} seeds", "",
                  "Step-0 check (logits against `never`): " + ", ".join(
                      f"{a} {_identical(v)} (imbalance {v['imbalance']:.2f})" for a, v in m["start_check"].items()), ""]
        m["lrs"] = c["lrs"]
        lines += md_block("Train loss (2048 fixed training examples)", m, MLP_ARMS,
                          f"Threshold: loss {m['threshold']}. Validation loss at the best lr: " + ", ".join(
                              f"{a} {sum(m['table'][a]['val_loss_at_best']) / len(c['seeds']):.3f}" for a in MLP_ARMS))
    if "lora" in result:
        lo = result["lora"]
        c = lo["config"]
        lines += [f"## (b) Low-rank regression: {c['n']}x{c['n']} rank-{c['rank']} target, B A with r = {c['rank']}, "
                  f"kappa {c['kappa']:g}, {c['steps']} steps, {len(c['seeds'])} seeds", "",
                  "Step-0 check (product B A against plain's, relative): " + ", ".join(
                      f"{a} {v['max_rel_product_diff']:.1e}" for a, v in lo["start_check"].items()), ""]
        for opt in ("gd", "adam"):
            lo[opt]["lrs"] = c["lrs"][opt]
            lines += md_block(f"{opt.upper()}", lo[opt], LORA_ARMS,
                              f"Loss: relative ||(BA - W*)X||^2 / ||W* X||^2; threshold {lo[opt]['threshold']:g}.")
    (out / "results.md").write_text("\n".join(lines))


def plot(out: Path, result: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if "mlp" in result:
        panels.append(("(a) ENorm MLP, SGD", result["mlp"], MLP_ARMS, result["mlp"]["config"]["lrs"]))
    if "lora" in result:
        for opt in ("gd", "adam"):
            panels.append((f"(b) low-rank regression, {opt}", result["lora"][opt], LORA_ARMS,
                           result["lora"]["config"]["lrs"][opt]))
    fig, axes = plt.subplots(2, len(panels), figsize=(5.5 * len(panels), 8), squeeze=False)
    for k, (title, res, arms, lrs) in enumerate(panels):
        ax, ax2 = axes[0][k], axes[1][k]
        for arm in arms:
            run = res["runs"][arm][res["table"][arm]["best_lr_index"]]
            steps = sorted(run["curve"])
            geo = [10 ** (sum(math.log10(max(v, FLOOR)) if math.isfinite(v) else 3 for v in run["curve"][s])
                          / len(run["curve"][s])) for s in steps]
            style = "--" if ("shuffled" in arm or "control" in arm) else ("-." if arm == "kaiming" else "-")
            ax.plot(steps, geo, style, label=f"{arm} (lr {res['best'][arm]:g})")
            ax2.plot(lrs, [v if math.isfinite(v) else float("nan") for v in res["table"][arm]["mean_log10_final_per_lr"]],
                     style, marker="o", label=arm)
        ax.set_yscale("log")
        ax.set_title(title + ": loss at each arm's best lr (geo-mean over seeds)", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax2.set_xscale("log")
        ax2.set_xlabel("learning rate")
        ax2.set_ylabel("mean log10 final loss")
        ax2.set_title("learning-rate sensitivity", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "controls.png", dpi=90)
    plt.close(fig)


def strip_runs(result: dict) -> dict:
    """results.json keeps the curves at each arm's best lr only (the per-lr finals are in the table)."""
    def keep(res):
        return {a: res["runs"][a][res["table"][a]["best_lr_index"]] for a in res["runs"]}
    out = json.loads(json.dumps({k: v for k, v in result.items()}, default=str))
    if "mlp" in result:
        out["mlp"]["runs"] = keep(result["mlp"])
    if "lora" in result:
        for opt in ("gd", "adam"):
            out["lora"][opt]["runs"] = keep(result["lora"][opt])
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--part", default="mlp,lora", help="mlp, lora or both (comma-separated)")
    p.add_argument("--smoke", action="store_true", help="a tiny version (seconds)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = CONFIGS["smoke" if args.smoke else "full"]
    parts = [s.strip() for s in args.part.split(",") if s.strip()]
    t0 = time.time()
    result = {"command": "python experiments/controls.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                         f"{args.threads} thread(s)"}
    if "mlp" in parts:
        result["mlp"] = run_mlp(dict(cfg["mlp"]))
    if "lora" in parts:
        result["lora"] = run_lora(dict(cfg["lora"]))
    result["wall_s"] = time.time() - t0
    write_md(out, result)
    plot(out, result)
    stripped = strip_runs(result)
    (out / "results.json").write_text(json.dumps(stripped, indent=1, default=str))
    print(f"wrote {out}/results.md ({result['wall_s']:.0f} s)")
    return stripped


if __name__ == "__main__":
    main()
