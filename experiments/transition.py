"""Does a WISCA transition help training? A small, reproducible experiment.

Trains a tiny GQA Llama from scratch on the Python standard library's own source
(byte-level, vocab 256: the data is on every machine that has Python), saves a
checkpoint with its optimizer state at a stage boundary, transitions it with
``wisca.transform`` (the Python API), and continues training both the original and
the transitioned model with the same data order, learning-rate schedule and seed.
With the default power-of-two scales both branches start from the same function
(their validation losses at the boundary are bit-identical, which is checked), so
every difference afterwards comes from the new weight pattern.

    # baseline vs WISCA, transition early and late, 3 seeds (~15 min on one CPU thread)
    python experiments/transition.py --out runs/main --transition-at early,late

    # the LoRA variant: fine-tune an adapter on a held-out slice of the stdlib,
    # transition the adapter part-way, continue
    python experiments/transition.py --out runs/lora --lora

    # a few steps, one seed (the test suite runs this)
    python experiments/transition.py --out /tmp/smoke --smoke

    # one figure from several runs
    python experiments/transition.py --combine runs/main runs/lora --png docs/efficacy.png

    # the stage-boundary study at ~50M parameters on one CUDA GPU (bf16 autocast, fused
    # AdamW, SDPA attention): baseline / wisca@500 / random@500, 3 seeds, the whole stdlib
    python experiments/transition.py --preset gpu-50m --out runs/gpu-50m
    python experiments/transition.py --preset gpu-50m --estimate      # its FLOPs and time, no run
    python experiments/transition.py --preset gpu-50m --smoke --out /tmp/g   # the same code, CPU-sized

Each run writes ``results.json`` (settings, every curve, the table), ``results.md``
(the tables) and ``curves.png`` (validation loss per branch, mean and min-max band over
seeds, and the paired difference to the baseline) into ``--out``.

Branches, all trained to the same final step on the same batches:
  baseline          never transitioned
  wisca@T           transitioned at step T, optimizer moments carried over
                    (exp_avg / S, exp_avg_sq / S**2 for W' = S * W)
  wisca@T/reset     transitioned at step T with a fresh AdamW (--optimizer-state reset)
  reset@T           control for the above: not transitioned, fresh AdamW at step T
  random@T          control (--random-control): wisca@T's own scales shuffled across the
                    units of each pair: same function, same amount of rescaling, not balanced

Data: the top-level ``*.py`` modules of the stdlib pretrain the model (``--corpus
stdlib``: every ``*.py``, ``*.txt`` and ``*.rst`` file of the stdlib, site-packages
excluded); a fixed set of stdlib packages (asyncio, email, http, ...) is held out for the
LoRA fine-tune. In all, every 10th file (sorted by path) is the validation split. Numbers
reproduce exactly only with the same stdlib (Python version), torch version and device.

On CUDA (``--device cuda``, or ``auto`` with a GPU) the weights and AdamW's state stay
fp32 (master weights), the training forward and backward run under bf16 autocast
(``--precision``), AdamW is fused and fp32 matmuls may use TF32. Validation is always
computed without autocast, on the fp32 weights, so a power-of-two transition still leaves
the boundary validation loss bit-identical (the run stops otherwise; on CUDA it stops when
the two differ by more than 1e-6 relative and reports how many were bit-identical).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

# imported up front, so that a long run uses one consistent version of the package
import wisca_cli as wisca  # noqa: E402
from wisca_cli.api import scale_multipliers  # noqa: E402
from wisca_cli.balance import apply_scales, solve_pair  # noqa: E402
from wisca_cli.pairs import lora_pair  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import fmt_ci, mean_ci  # noqa: E402

# -----------------------------------------------------------------------------
# data

HELD_OUT_PACKAGES = ("asyncio", "concurrent", "email", "http", "json", "logging", "urllib", "xml")


CORPORA = {"top-level": "top-level stdlib modules",
           "stdlib": "the whole stdlib (*.py, *.txt, *.rst; site-packages excluded)"}
TEXT_SUFFIXES = (".py", ".txt", ".rst")
NOT_STDLIB = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_files(packages: tuple[str, ...] | None, everything: bool = False) -> list[Path]:
    """Top-level stdlib modules (packages=None), every *.py under the given packages, or
    (everything=True) every *.py / *.txt / *.rst file of the stdlib outside site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if everything:
        files = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d not in NOT_STDLIB]
            files += [Path(folder) / n for n in names if n.endswith(TEXT_SUFFIXES)]
    elif packages is None:
        files = [p for p in root.glob("*.py")]
    else:
        files = [p for pkg in packages for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(packages: tuple[str, ...] | None, val_every: int = 10,
                everything: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) byte tensors; every val_every-th file (by sorted path) is validation."""
    train, val = [], []
    for i, path in enumerate(stdlib_files(packages, everything)):
        (val if i % val_every == val_every - 1 else train).append(path.read_bytes())
    as_tensor = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)  # noqa: E731
    return as_tensor(train), as_tensor(val)


def batch_offsets(seed: int, steps: int, n_bytes: int, batch: int, seq: int) -> torch.Tensor:
    """[steps, batch] window starts: the data order, identical for every branch of a seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(n_bytes - seq - 1, (steps, batch), generator=g)


def get_batch(data: torch.Tensor, starts: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of seq + 1 bytes at starts (on the device of data and starts)."""
    idx = starts[:, None] + torch.arange(seq + 1, device=starts.device)[None, :]
    window = data[idx].long()
    return window[:, :-1], window[:, 1:]


def val_batches(data: torch.Tensor, n_batches: int, batch: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set: evenly spaced windows over the whole validation split."""
    starts = torch.linspace(0, len(data) - seq - 2, n_batches * batch).long().view(n_batches, batch)
    return [get_batch(data, s, seq) for s in starts]


# -----------------------------------------------------------------------------
# model, optimizer, training


def make_model(args, seed: int):
    """A byte-level GQA Llama, initialised on the CPU from the seed (the same on any device)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, intermediate_size=args.intermediate,
        max_position_embeddings=max(512, args.seq_len), tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(config, attn_implementation=getattr(args, "attn", "eager"),
                                         dtype=torch.float32)


def load_model(folder: Path, attn: str = "eager"):
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()

    return LlamaForCausalLM.from_pretrained(folder, attn_implementation=attn, dtype=torch.float32)


def make_optimizer(params: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float, fused: bool = False):
    """AdamW, nanoGPT-style: weight decay on matrices only (fused: one kernel, CUDA)."""
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95), **extra)


def lr_at(step: int, peak: float, floor: float, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to floor at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model, batches) -> float:
    """Mean cross-entropy in nats/byte over the fixed validation batches.

    Never under autocast: the fp32 weights and activations, so that a power-of-two
    rescaling (exact in any floating-point format) leaves the result bit-identical.
    """
    model.eval()
    total = 0.0
    for x, y in batches:
        logits = model(input_ids=x, use_cache=False).logits
        total += F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1)).item()
    model.train()
    return total / len(batches)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model, opt, task, start: int, stop: int, name: str, snapshot=None) -> tuple[dict, dict, dict]:
    """Train from step `start` to `stop`; validation loss at task.eval_steps (and start, stop).

    Step t means "after t updates". snapshot(step, model, opt) is called at task.boundaries.
    The training forward runs under task.autocast() (bf16 on CUDA); the per-step losses stay
    on the device until the next evaluation, so that a GPU step never waits for the host.
    Returns (curve, train_loss, timing): timing splits the wall time into training steps and
    the rest (evaluation, checkpoints).
    """
    curve = {}
    device = getattr(task, "device", torch.device("cpu"))
    autocast = getattr(task, "autocast", contextlib.nullcontext)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = torch.full((max(stop - start, 0),), float("nan"), device=device)
    t0 = time.time()
    other = 0.0
    for step in range(start, stop + 1):
        if step in task.eval_steps or step in (start, stop):
            synchronize(device)
            t1 = time.time()
            curve[step] = evaluate(model, task.val)
            last = losses[step - 1 - start].item() if step > start else float("nan")
            other += time.time() - t1
            print(f"  {name:14s} step {step:5d}/{stop} | val {curve[step]:.4f} | "
                  f"train {last:.4f} | {time.time() - t0:6.1f}s", flush=True)
        if snapshot is not None and step in task.boundaries:
            synchronize(device)
            t1 = time.time()
            snapshot(step, model, opt)
            other += time.time() - t1
        if step == stop:
            break
        for group in opt.param_groups:
            group["lr"] = task.lr(step)
        x, y = get_batch(task.train_data, task.offsets[step], task.seq_len)
        with autocast():
            logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, task.grad_clip)
        opt.step()
        losses[step - start] = loss.detach()
    synchronize(device)
    train_loss = dict(zip(range(start, stop), losses.tolist()))
    wall = time.time() - t0
    timing = {"steps": stop - start, "seconds": round(wall, 2), "train_seconds": round(wall - other, 2)}
    return curve, train_loss, timing


# -----------------------------------------------------------------------------
# the transition of a full model: checkpoint -> wisca.transform -> optimizer state


def scale_optimizer_state(opt, named_params, multipliers: dict[str, torch.Tensor]) -> None:
    """W' = S * W makes the gradient g / S: exp_avg / S, exp_avg_sq / S**2, step untouched."""
    for name, p in named_params:
        S = multipliers.get(name)
        state = opt.state.get(p)
        if S is None or not state:
            continue
        S = S.to(state["exp_avg"].device)
        state["exp_avg"].copy_(state["exp_avg"].double() / S)
        state["exp_avg_sq"].copy_(state["exp_avg_sq"].double() / S**2)


def units_changed(folder: Path) -> float:
    """Fraction of units whose scale is not 1 (a pow2 transition can be a no-op for a unit)."""
    scales = load_file(str(folder / "wisca_scales.safetensors"))
    n = sum(s.numel() for s in scales.values())
    return sum(int((s != 1).sum()) for s in scales.values()) / max(n, 1)


def check_written(src: Path, dst: Path, exact: bool) -> None:
    """The tensors on disk are the source's times the recorded multipliers (bit-exact for pow2)."""
    before, after = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    multipliers = scale_multipliers(dst)
    for name, w in before.items():
        S = multipliers.get(name)
        expected = w if S is None else (w.double() * S).to(w.dtype)
        same = torch.equal(expected, after[name]) if exact else torch.allclose(expected, after[name], rtol=1e-6)
        if not same:
            raise RuntimeError(f"{dst}: tensor {name} is not the source times its recorded scales")


class _Task:
    """What both tasks share: the corpus, the validation batches, the step budget, the device."""

    def __init__(self, args, workdir: Path, packages, steps: int, corpus: str, everything: bool = False):
        self.args, self.workdir = args, workdir
        self.device = torch.device(getattr(args, "device", "cpu"))
        train, val = load_corpus(packages, everything=everything)
        self.train_bytes, self.val_bytes = len(train), len(val)
        self.train_data = train.to(self.device)
        self.val = [(x.to(self.device), y.to(self.device))
                    for x, y in val_batches(val, args.eval_batches, args.batch_size, args.seq_len)]
        self.total, self.seq_len, self.grad_clip = steps, args.seq_len, args.grad_clip
        self.data_desc = f"{corpus}: {len(train):,} train / {len(val):,} val bytes"
        bf16 = getattr(args, "precision", "fp32") == "bf16"
        self.autocast = ((lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16
                         else contextlib.nullcontext)

    def set_offsets(self, seed: int) -> None:
        """The data order of a seed: drawn on the CPU (the same on any device), used on the device."""
        a = self.args
        self.offsets = batch_offsets(seed, self.total, self.train_bytes, a.batch_size, a.seq_len).to(self.device)


class PretrainTask(_Task):
    """Train a GQA Llama from scratch; the transition acts on the whole checkpoint."""

    kind = "pretrain"

    def __init__(self, args, workdir: Path):
        everything = getattr(args, "corpus", "top-level") == "stdlib"
        super().__init__(args, workdir, None, args.steps, CORPORA["stdlib" if everything else "top-level"],
                         everything=everything)

    def lr(self, step: int) -> float:
        a = self.args
        return lr_at(step, a.lr, a.min_lr, a.warmup, a.steps)

    def optimizer(self, model):
        return make_optimizer(list(model.named_parameters()), self.args.lr, self.args.weight_decay,
                              fused=self.device.type == "cuda")

    def place(self, model):
        """On the device; compiled with --compile (in place: names and state dicts unchanged)."""
        model = model.to(self.device)
        if getattr(self.args, "compile", False):
            model.compile()
        return model

    def start(self, seed: int):
        model = self.place(make_model(self.args, seed))
        return model, self.optimizer(model)

    def snapshot(self, folder: Path, model, opt) -> None:
        """A stage-boundary checkpoint: HF folder (fp32 safetensors) + optimizer.pt."""
        from transformers.utils import logging

        logging.disable_progress_bar()
        model.save_pretrained(folder)
        torch.save(opt.state_dict(), folder / "optimizer.pt")

    def resume(self, folder: Path, fresh_optimizer: bool):
        model = self.place(load_model(folder, getattr(self.args, "attn", "eager")))
        opt = self.optimizer(model)
        if not fresh_optimizer:
            opt.load_state_dict(torch.load(folder / "optimizer.pt", map_location=self.device))
        return model, opt

    def transition(self, folder: Path, dst: Path, fresh_optimizer: bool):
        """wisca.transform the checkpoint, carry the optimizer state over (or reset it)."""
        a = self.args
        t0 = time.time()
        report = wisca.transform(folder, dst, granularity=a.granularity, norm=a.norm, strength=a.strength,
                                 scales=a.scales, overwrite=True)
        check_written(folder, dst, exact=a.scales == "pow2")
        # transform copies optimizer.pt unchanged (it is "another file" of the checkpoint):
        # rewrite it in the new parametrisation, so the folder on disk is consistent
        model, opt = self.resume(dst, fresh_optimizer=False)
        scale_optimizer_state(opt, model.named_parameters(), scale_multipliers(dst))
        torch.save(opt.state_dict(), dst / "optimizer.pt")
        if fresh_optimizer:
            model, opt = self.resume(dst, fresh_optimizer=True)
        info = {
            "imbalance": {k: {"before": v["imbalance_before"], "after": v["imbalance_after"]}
                          for k, v in report["summary"].items()},
            "units_changed": units_changed(dst),
            "verification_passed": bool(report["verification"]["passed"]),
            "transform_seconds": round(time.time() - t0, 2),
        }
        return model, opt, info

    def random_transition(self, folder: Path, wisca_dst: Path, dst: Path, seed: int):
        """Control: wisca's own scales shuffled across the units of each pair.

        The same function, the same amount of rescaling (the same multiset of scales per
        layer and pair), but not balancing: it tells a balanced pattern from any
        function-preserving reparametrisation. The tool's record turns per-unit scales
        into per-tensor multipliers (scale_multipliers), as for the real transition.
        """
        a = self.args
        t0 = time.time()
        g = torch.Generator().manual_seed(seed)
        scales = load_file(str(wisca_dst / "wisca_scales.safetensors"))
        shuffled = {k: v[torch.randperm(len(v), generator=g)] for k, v in sorted(scales.items())}
        # the control's premise: per pair and layer the same multiset of scales, on other units
        for k, v in scales.items():
            if not torch.equal(shuffled[k].sort().values, v.sort().values):
                raise RuntimeError(f"random control: {k} is not a permutation of wisca's scales")
        n_units = sum(v.numel() for v in scales.values())
        moved = sum(int((shuffled[k] != v).sum()) for k, v in scales.items())
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(folder, dst)
        shutil.copy(wisca_dst / "wisca.json", dst / "wisca.json")
        save_file(shuffled, str(dst / "wisca_scales.safetensors"))
        multipliers = scale_multipliers(dst)
        weights = load_file(str(folder / "model.safetensors"))
        new = {n: (w.double() * multipliers[n]).to(w.dtype) if n in multipliers else w for n, w in weights.items()}
        save_file(new, str(dst / "model.safetensors"), metadata={"format": "pt"})
        model, opt = self.resume(dst, fresh_optimizer=False)
        scale_optimizer_state(opt, model.named_parameters(), multipliers)
        torch.save(opt.state_dict(), dst / "optimizer.pt")
        before = wisca.inspect(folder, granularity=a.granularity, norm=a.norm)["summary"]
        after = wisca.inspect(dst, granularity=a.granularity, norm=a.norm)["summary"]
        info = {
            "imbalance": {k: {"before": before[k]["mean_abs_log2"], "after": after[k]["mean_abs_log2"]}
                          for k in before},
            "units_changed": units_changed(dst),
            "units_moved": moved / max(n_units, 1),   # share of units whose scale differs from wisca's
            "scales_permutation_of_wisca": True,
            "transform_seconds": round(time.time() - t0, 2),
        }
        return model, opt, info


# -----------------------------------------------------------------------------
# the LoRA variant


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * x A^T B^T, base frozen; A [r, in] random, B [out, r] zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)  # as PEFT

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


class LoraTask(_Task):
    """Fine-tune a LoRA adapter on held-out stdlib packages; the transition acts on the adapter."""

    kind = "lora"

    def __init__(self, args, workdir: Path):
        super().__init__(args, workdir, HELD_OUT_PACKAGES, args.lora_steps,
                         f"held-out stdlib packages {', '.join(HELD_OUT_PACKAGES)}")
        self.base = workdir / "base"
        self.base_info = self.pretrain_base()

    def pretrain_base(self) -> dict:
        """The base model: the main experiment's baseline, trained once (--lora-base-seed)."""
        a = self.args
        pre = PretrainTask(a, self.workdir)
        pre.eval_steps, pre.boundaries = set(range(0, a.steps + 1, a.eval_every)), set()
        seed = a.lora_base_seed
        pre.set_offsets(seed)
        model, opt = pre.start(seed)
        print(f"LoRA base model: pretraining {a.steps} steps, seed {seed}", flush=True)
        t0 = time.time()
        curve, _, _ = train(model, opt, pre, 0, a.steps, "base")
        model.save_pretrained(self.base)
        before = evaluate(model, self.val)
        print(f"  base: val loss on the pretraining split {curve[a.steps]:.4f}, "
              f"on the held-out packages {before:.4f}", flush=True)
        return {"steps": a.steps, "seed": seed, "val_loss_pretrain_split": curve[a.steps],
                "val_loss_heldout_before_finetune": before, "seconds": round(time.time() - t0, 1)}

    def lr(self, step: int) -> float:
        a = self.args
        return lr_at(step, a.lora_lr, a.lora_lr / 10, a.lora_warmup, a.lora_steps)

    def lora_modules(self, model) -> list[tuple[str, LoRALinear]]:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]

    def build(self, seed: int):
        """Frozen base + fresh adapters on --lora-targets of every decoder layer."""
        a = self.args
        model = load_model(self.base)
        for p in model.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(seed)
        for layer in model.model.layers:
            for name in a.lora_targets.split(","):
                parent = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
                setattr(parent, name, LoRALinear(getattr(parent, name), a.lora_rank, a.lora_alpha, g))
        return model

    def named_trainable(self, model):
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def start(self, seed: int):
        model = self.build(seed)
        self.seed = seed
        return model, make_optimizer(self.named_trainable(model), self.args.lora_lr, self.args.lora_weight_decay)

    def snapshot(self, folder: Path, model, opt) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        adapter = {n: p.detach().clone() for n, p in self.named_trainable(model)}
        torch.save({"adapter": adapter, "optimizer": opt.state_dict()}, folder / "adapter.pt")

    def resume(self, folder: Path, fresh_optimizer: bool):
        saved = torch.load(folder / "adapter.pt")
        model = self.build(self.seed)
        with torch.no_grad():
            for n, p in self.named_trainable(model):
                p.copy_(saved["adapter"][n])
        opt = make_optimizer(self.named_trainable(model), self.args.lora_lr, self.args.lora_weight_decay)
        if not fresh_optimizer:
            opt.load_state_dict(saved["optimizer"])
        return model, opt

    def transition(self, folder: Path, dst: Path, fresh_optimizer: bool):
        """Balance every adapter per rank: row k of A times s[k], column k of B times 1/s[k]."""
        a = self.args
        t0 = time.time()
        model, opt = self.resume(folder, fresh_optimizer)
        before, after, changed, units = [], [], 0, 0
        with torch.no_grad():
            for _, mod in self.lora_modules(model):
                pair = lora_pair(mod.lora_A.shape[0])
                ab = {"lora_A": mod.lora_A.data, "lora_B": mod.lora_B.data}
                res = solve_pair(pair, ab, norm=a.norm, strength=a.strength, pow2=a.scales == "pow2")
                s = res.scales.double()
                new = apply_scales(pair, ab, s)
                mod.lora_A.copy_(new["lora_A"])
                mod.lora_B.copy_(new["lora_B"])
                for p, S in ((mod.lora_A, s[:, None]), (mod.lora_B, 1 / s[None, :])):
                    state = opt.state.get(p)
                    if state:
                        state["exp_avg"].copy_(state["exp_avg"].double() / S)
                        state["exp_avg_sq"].copy_(state["exp_avg_sq"].double() / S**2)
                live = ~torch.isnan(res.before)
                before += res.before[live].abs().tolist()
                after += res.after[live].abs().tolist()
                changed += int((res.scales != 1).sum())
                units += len(res.scales)
        self.snapshot(dst, model, opt)
        info = {
            "imbalance": {"lora": {"before": statistics.fmean(before) if before else 0.0,
                                   "after": statistics.fmean(after) if after else 0.0}},
            "units_changed": changed / max(units, 1),
            "transform_seconds": round(time.time() - t0, 2),
        }
        return model, opt, info


# -----------------------------------------------------------------------------
# one seed: baseline to the end, then every branch from its boundary checkpoint


def transition_steps(spec: str, total: int) -> list[int]:
    named = {"early": round(0.25 * total), "mid": round(0.5 * total), "late": round(0.75 * total)}
    steps = sorted({named[s] if s in named else int(s) for s in spec.split(",")})
    if not all(0 < s < total for s in steps):
        raise SystemExit(f"--transition-at: steps must lie strictly between 0 and {total}, got {steps}")
    return steps


def branch_plan(args, boundaries: list[int]) -> list[tuple[str, int, str, bool]]:
    """(name, boundary, transition: wisca|random|none, fresh optimizer?) for every non-baseline branch."""
    plan = []
    modes = args.optimizer_state.split(",")
    for b in boundaries:
        if "transform" in modes:
            plan.append((f"wisca@{b}", b, "wisca", False))
            if args.random_control:
                plan.append((f"random@{b}", b, "random", False))
        if "reset" in modes:
            plan.append((f"wisca@{b}/reset", b, "wisca", True))
            plan.append((f"reset@{b}", b, "none", True))
    return plan


def run_seed(task, args, seed: int, boundaries: list[int]) -> dict:
    print(f"== seed {seed} ==", flush=True)
    task.set_offsets(seed)
    task.boundaries = set(boundaries)
    ckpt = task.workdir / f"seed{seed}"

    def snapshot(step, model, opt):
        task.snapshot(ckpt / f"step{step}", model, opt)

    t0 = time.time()
    model, opt = task.start(seed)
    task.n_params = sum(p.numel() for p in model.parameters())
    curve, train_loss, timing = train(model, opt, task, 0, task.total, "baseline", snapshot)
    branches = {"baseline": {"transition": None, "curve": curve, "train_loss": train_loss,
                             "seconds": round(time.time() - t0, 1), "timing": timing}}
    transitions = {}
    for name, b, how, fresh in branch_plan(args, boundaries):
        t0 = time.time()
        folder = ckpt / f"step{b}"
        if how != "none":
            dst = ckpt / f"step{b}-{name.replace('/', '-')}"
            if how == "wisca":
                model, opt, info = task.transition(folder, dst, fresh)
            else:
                model, opt, info = task.random_transition(folder, ckpt / f"step{b}-wisca@{b}", dst, seed)
            # the experiment's premise: both branches start from the same function
            original = branches["baseline"]["curve"][b]
            transitioned = evaluate(model, task.val)
            rel = abs(transitioned - original) / max(abs(original), 1e-30)
            info.update(boundary_val_original=original, boundary_val_transitioned=transitioned,
                        boundary_bit_identical=transitioned == original, boundary_rel_diff=rel)
            moved = f", units moved {info['units_moved']:.1%}" if "units_moved" in info else ""
            print(f"  {name}: boundary val {original!r} -> {transitioned!r} "
                  f"({'bit-identical' if transitioned == original else f'differs by {rel:.2g} relative'}), "
                  f"imbalance {fmt_imbalance(info['imbalance'])}, units changed {info['units_changed']:.1%}"
                  f"{moved}", flush=True)
            transitions[name] = info
            # pow2 scales are exact in any format, so the fp32 evaluation is bit-identical; on CUDA
            # two model objects could in principle get other kernels, so there a difference up
            # to 1e-6 relative is reported (boundary_bit_identical false) rather than fatal
            tolerance = 1e-6 if task.device.type == "cuda" else 0.0
            if args.scales == "pow2" and rel > tolerance:
                raise RuntimeError(f"seed {seed}, {name}: the transitioned model does not compute the same "
                                   f"function (boundary val loss {transitioned!r} != {original!r})")
        else:
            model, opt = task.resume(folder, fresh_optimizer=fresh)
        curve, train_loss, timing = train(model, opt, task, b, task.total, name)
        branches[name] = {"transition": b, "curve": curve, "train_loss": train_loss,
                          "seconds": round(time.time() - t0, 1), "timing": timing}
    del model, opt
    if not args.keep_checkpoints:   # a ~50M checkpoint with its AdamW state is 0.6 GB per folder
        shutil.rmtree(ckpt, ignore_errors=True)
    return {"seed": seed, "branches": branches, "transitions": transitions}


def fmt_imbalance(imb: dict) -> str:
    return ", ".join(f"{k} {v['before']:.2f}->{v['after']:.2f}" for k, v in imb.items())


# -----------------------------------------------------------------------------
# size and cost: the parameter count, the FLOPs of a run, its estimated time on an H100

H100_BF16_DENSE_PEAK = 989.4e12    # FLOP/s, H100 SXM, dense bf16 (fp32 with TF32: half of it)
ESTIMATE_MFU = (0.35, 0.25, 0.20)  # assumed achieved share of that peak: optimistic, central, pessimistic
ESTIMATE_OVERHEAD_S = 75           # python/torch/transformers imports, CUDA start, data, checkpoints,
#                                    wisca.transform and its checks, plot (measured parts: see docs/efficacy.md)


def count_parameters(args) -> int:
    """make_model's parameter count, from the shapes (untied embeddings, no biases)."""
    h, hd = args.hidden, args.hidden // args.heads
    attn = 2 * h * args.heads * hd + 2 * h * args.kv_heads * hd
    per_layer = attn + 3 * h * args.intermediate + 2 * h
    return 2 * 256 * h + args.layers * per_layer + h


def run_cost(args, n_params: int, boundaries: list[int], total: int) -> dict:
    """FLOPs of the whole run and its estimated time on one H100.

    Training: 6 N + 12 L d S FLOPs per token (forward and backward, attention counted without
    the causal half), at bf16 autocast. Evaluation: 2 N + 4 L d S per token, fp32 with TF32
    matmuls (half the bf16 peak). Steps: the baseline's, plus each branch's from its boundary.
    """
    tokens = args.batch_size * args.seq_len
    attn = args.layers * args.hidden * args.seq_len
    train_step = (6 * n_params + 12 * attn) * tokens
    eval_batch = (2 * n_params + 4 * attn) * tokens
    eval_steps = set(range(0, total + 1, args.eval_every)) | set(boundaries)
    starts = [0] + [b for _, b, _, _ in branch_plan(args, boundaries)]
    arm_steps = sum(total - b for b in starts)
    evals = sum(len({t for t in eval_steps if t >= b} | {b, total}) for b in starts)
    train_flops = args.seeds * arm_steps * train_step
    eval_flops = args.seeds * evals * args.eval_batches * eval_batch
    est = {}
    for mfu in ESTIMATE_MFU:
        compute = train_flops / (mfu * H100_BF16_DENSE_PEAK) + eval_flops / (mfu * H100_BF16_DENSE_PEAK / 2)
        est[f"{mfu:.0%}"] = {"compute_s": round(compute), "total_s": round(compute + ESTIMATE_OVERHEAD_S)}
    return {"parameters": n_params, "tokens_per_step": tokens, "train_flops_per_step": train_step,
            "arm_steps": args.seeds * arm_steps, "evaluations": args.seeds * evals,
            "train_flops": train_flops, "eval_flops": eval_flops,
            "h100_bf16_dense_peak": H100_BF16_DENSE_PEAK, "overhead_s": ESTIMATE_OVERHEAD_S,
            "h100_estimate_at_share_of_peak": est}


def cost_text(cost: dict) -> str:
    est = ", ".join(f"{k} of peak: {v['total_s']} s ({v['total_s'] / 60:.1f} min)"
                    for k, v in cost["h100_estimate_at_share_of_peak"].items())
    return (f"{cost['parameters']:,} parameters; {cost['tokens_per_step']:,} bytes/step; "
            f"{cost['train_flops_per_step'] / 1e12:.2f} TFLOP per training step; {cost['arm_steps']:,} "
            f"training steps and {cost['evaluations']} evaluations in all: "
            f"{(cost['train_flops'] + cost['eval_flops']) / 1e15:.1f} PFLOP. Estimated command time on one "
            f"H100 (989 TFLOP/s dense bf16), with {cost['overhead_s']} s of start-up, checkpoints and "
            f"transforms: {est}; add the machine's start")


def measured_throughput(seeds: list[dict], cost: dict) -> dict:
    steps = sum(b["timing"]["steps"] for s in seeds for b in s["branches"].values())
    secs = sum(b["timing"]["train_seconds"] for s in seeds for b in s["branches"].values())
    flops = cost["train_flops_per_step"] * steps / max(secs, 1e-9)
    return {"train_steps": steps, "train_seconds": round(secs, 1), "tflops": round(flops / 1e12, 2),
            "share_of_h100_bf16_peak": round(flops / H100_BF16_DENSE_PEAK, 4),
            "bytes_per_second": round(cost["tokens_per_step"] * steps / max(secs, 1e-9))}


# -----------------------------------------------------------------------------
# results: table, markdown, plot


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(seeds: list[dict], total: int, train_window: int) -> list[dict]:
    """One row per branch: final validation loss / perplexity over seeds, paired deltas."""
    names = list(seeds[0]["branches"])
    base_val = [s["branches"]["baseline"]["curve"][total] for s in seeds]
    # the train-loss window: the last steps that every branch trained (same batches in all)
    last_start = max(b["transition"] or 0 for b in seeds[0]["branches"].values())
    window = lambda tl: statistics.fmean(tl[t] for t in range(max(total - train_window, last_start), total))  # noqa: E731
    base_train = [window(s["branches"]["baseline"]["train_loss"]) for s in seeds]
    rows = []
    for name in names:
        br = [s["branches"][name] for s in seeds]
        val = [b["curve"][total] for b in br]
        ppl = [math.exp(v) for v in val]
        tr = [window(b["train_loss"]) for b in br]
        d_loss = [100 * (v - bv) / bv for v, bv in zip(val, base_val)]
        d_ppl = [100 * (math.exp(v - bv) - 1) for v, bv in zip(val, base_val)]
        d_train_ppl = [100 * (math.exp(t - bt) - 1) for t, bt in zip(tr, base_train)]
        rows.append({
            "branch": name, "transition": br[0]["transition"], "seeds": len(br),
            "val_loss": mean_std(val), "val_ppl": mean_std(ppl),
            "delta_val_loss_pct": mean_std(d_loss), "delta_val_loss_pct_range": (min(d_loss), max(d_loss)),
            "delta_val_ppl_pct": mean_std(d_ppl), "delta_val_ppl_pct_range": (min(d_ppl), max(d_ppl)),
            "better_than_baseline": sum(v < bv for v, bv in zip(val, base_val)),
            "train_loss": mean_std(tr), "delta_train_ppl_pct": mean_std(d_train_ppl),
        })
    return rows


def contrasts(seeds: list[dict], total: int) -> list[dict]:
    """Paired differences of the final validation loss (%), mean and 95 % t-interval over seeds:
    every branch vs the baseline, and every wisca@T vs its shuffled-scales control random@T."""
    names = list(seeds[0]["branches"])
    pairs = [(n, "baseline") for n in names if n != "baseline"]
    pairs += [(n.replace("random@", "wisca@"), n) for n in names
              if n.startswith("random@") and n.replace("random@", "wisca@") in names]
    out = []
    for arm, ref in pairs:
        d = [100 * (s["branches"][arm]["curve"][total] - s["branches"][ref]["curve"][total])
             / s["branches"][ref]["curve"][total] for s in seeds]
        out.append({"arm": arm, "reference": ref, "delta_val_loss_pct": d, "ci95": mean_ci(d),
                    "arm_lower": sum(x < 0 for x in d), "seeds": len(d)})
    return out


def contrasts_markdown(rows: list[dict]) -> str:
    lines = ["| arm vs reference | Δ final val loss %, mean [95 % t-interval] | per seed | arm lower |",
             "|---|---|---|---|"]
    for r in rows:
        per_seed = ", ".join(f"{x:+.3f}" for x in r["delta_val_loss_pct"])
        lines.append(f"| {r['arm']} vs {r['reference']} | {fmt_ci(r['ci95'], 3)} % | {per_seed} "
                     f"| {r['arm_lower']}/{r['seeds']} |")
    return "\n".join(lines)


def table_markdown(rows: list[dict], total: int, train_window: int) -> str:
    pm = lambda ms, f=".4f": f"{ms[0]:{f}} ± {ms[1]:{f}}"  # noqa: E731
    pct = lambda ms, rng: f"{ms[0]:+.2f} ± {ms[1]:.2f} [{rng[0]:+.2f}, {rng[1]:+.2f}]"  # noqa: E731
    lines = [
        f"| branch | val loss @ {total} | val ppl | Δ val loss % | Δ val ppl % | lower than baseline "
        f"| train loss (last {train_window}) | Δ train ppl % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["branch"] == "baseline":
            d_loss = d_ppl = better = d_train = "—"
        else:
            d_loss = pct(r["delta_val_loss_pct"], r["delta_val_loss_pct_range"])
            d_ppl = pct(r["delta_val_ppl_pct"], r["delta_val_ppl_pct_range"])
            better = f"{r['better_than_baseline']}/{r['seeds']}"
            d_train = f"{r['delta_train_ppl_pct'][0]:+.2f} ± {r['delta_train_ppl_pct'][1]:.2f}"
        lines.append(f"| {r['branch']} | {pm(r['val_loss'])} | {pm(r['val_ppl'], '.3f')} | {d_loss} | {d_ppl} "
                     f"| {better} | {pm(r['train_loss'])} | {d_train} |")
    return "\n".join(lines)


def transitions_markdown(seeds: list[dict]) -> str:
    names = list(seeds[0]["transitions"])
    if not names:
        return ""
    kinds = list(seeds[0]["transitions"][names[0]]["imbalance"])
    head = " | ".join(f"{k} imbalance before → after" for k in kinds)
    lines = [f"| transition | boundary val loss equal (seeds) | max abs Δ boundary val | {head} | units changed |",
             "|---|---|---|" + "---|" * len(kinds) + "---|"]
    for name in names:
        infos = [s["transitions"][name] for s in seeds]
        same = sum(i["boundary_bit_identical"] for i in infos)
        diff = max(abs(i["boundary_val_transitioned"] - i["boundary_val_original"]) for i in infos)
        imb = " | ".join(f"{statistics.fmean(i['imbalance'][k]['before'] for i in infos):.3f} → "
                         f"{statistics.fmean(i['imbalance'][k]['after'] for i in infos):.3f}" for k in kinds)
        changed = statistics.fmean(i["units_changed"] for i in infos)
        lines.append(f"| {name} | {same}/{len(infos)} bit-identical | {diff:.3g} | {imb} | {changed:.1%} |")
    return "\n".join(lines)


def plot(runs: list[dict], png: Path, titles: list[str] | None = None) -> None:
    """Per run: validation loss (mean, min-max band over seeds) and paired Δ% vs baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(runs), figsize=(5.2 * len(runs), 7.5), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    for col, run in enumerate(runs):
        top, bottom = axes[0][col], axes[1][col]
        seeds, total = run["seeds"], run["total_steps"]
        first = min((b for b in run["boundaries"]), default=0)
        lo_y, hi_y = math.inf, -math.inf
        for i, name in enumerate(seeds[0]["branches"]):
            color = f"C{i}"
            steps = sorted(seeds[0]["branches"][name]["curve"])
            ys = torch.tensor([[s["branches"][name]["curve"][t] for t in steps] for s in seeds])
            top.plot(steps, ys.mean(0), color=color, label=name, lw=1.4)
            top.fill_between(steps, ys.min(0).values, ys.max(0).values, color=color, alpha=0.2)
            shown = ys[:, [j for j, t in enumerate(steps) if t >= first]]
            lo_y, hi_y = min(lo_y, float(shown.min())), max(hi_y, float(shown.max()))
            if name != "baseline":
                base = torch.tensor([[s["branches"]["baseline"]["curve"][t] for t in steps] for s in seeds])
                d = 100 * (ys - base) / base
                bottom.plot(steps, d.mean(0), color=color, label=name, lw=1.4)
                bottom.fill_between(steps, d.min(0).values, d.max(0).values, color=color, alpha=0.2)
        for b in run["boundaries"]:
            for ax in (top, bottom):
                ax.axvline(b, color="grey", ls=":", lw=1)
        pad = 0.05 * (hi_y - lo_y)
        top.set_ylim(lo_y - pad, hi_y + pad)
        top.set_xlim(max(0, first - 2 * run["eval_every"]), total)
        bottom.set_xlim(top.get_xlim())
        bottom.axhline(0, color="C0", lw=1)
        top.set_title(textwrap.fill(titles[col] if titles else run["title"], 48), fontsize=10)
        top.set_ylabel("validation loss (nats/byte)")
        bottom.set_ylabel("Δ val loss vs baseline (%)")
        bottom.set_xlabel("step (dotted: transition)")
        top.legend(fontsize=8)
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
    n = sorted({len(r["seeds"]) for r in runs})
    suptitle = f"WISCA transition: validation loss, mean and min-max band over seeds ({'/'.join(map(str, n))})"
    fig.suptitle(textwrap.fill(suptitle, 56 * len(runs)), fontsize=11)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def load_run(folder: Path) -> dict:
    run = json.loads((folder / "results.json").read_text())
    for s in run["seeds"]:  # JSON keys are strings
        for b in s["branches"].values():
            b["curve"] = {int(k): v for k, v in b["curve"].items()}
            b["train_loss"] = {int(k): v for k, v in b["train_loss"].items()}
    return run


def run_title(args) -> str:
    what = "LoRA fine-tune" if args.lora else "pretraining"
    if args.preset:
        size = f"{count_parameters(args) / 1e6:.1f}M"
        what = f"{args.preset}{' (smoke)' if args.smoke else ''}: {what} of a {size} GQA Llama"
    wd = args.lora_weight_decay if args.lora else args.weight_decay
    return (f"{what}, wd {wd}, {args.granularity}/{args.norm}/{args.scales}, strength {args.strength}, "
            f"opt state {args.optimizer_state}")


# -----------------------------------------------------------------------------


# --preset: defaults for a whole study; flags given on the command line still win
PRESETS = {
    # the stage-boundary study at ~50M parameters, sized for ~10 minutes of one H100 with its start
    # (estimate: --estimate). GQA Llama: hidden 768, 8 layers, 12 query heads on 3 kv heads (head
    # dim 64), SwiGLU 2048, byte vocabulary, untied: 49,951,488 parameters
    "gpu-50m": {
        "hidden": 768, "layers": 8, "heads": 12, "kv_heads": 3, "intermediate": 2048,
        "batch_size": 64, "seq_len": 512, "steps": 1000, "warmup": 100, "lr": 1e-3, "min_lr": 1e-4,
        "eval_every": 50, "eval_batches": 4, "train_window": 100,
        "seeds": 3, "transition_at": "mid", "random_control": True, "optimizer_state": "transform",
        "corpus": "stdlib", "attn": "sdpa", "device": "auto", "threads": 4,
    },
}
# --smoke: a few steps of a smaller model; with a preset, that preset's smoke sizes on top
SMOKE = {"seeds": 1, "steps": 16, "lora_steps": 12, "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2,
         "intermediate": 96, "batch_size": 4, "seq_len": 64, "warmup": 4, "lora_warmup": 2,
         "eval_every": 4, "eval_batches": 2, "train_window": 4}
PRESET_SMOKE = {
    # the same code path (corpus, arms, SDPA, device choice), 2 seeds for the paired intervals,
    # 8 query heads on 2 kv heads (the preset's 4:1 grouping)
    "gpu-50m": {"seeds": 2, "heads": 8, "kv_heads": 2, "threads": 1},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, help="output folder for results.json, results.md, curves.png")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="gpu-50m: the stage-boundary study at ~50M parameters on one CUDA GPU "
                        "(see the PRESETS table in this file; explicit flags override it)")
    p.add_argument("--estimate", action="store_true",
                   help="print the run's parameter count, FLOPs and estimated H100 time, and exit")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (model init and data order)")
    p.add_argument("--steps", type=int, default=600, help="training steps (of the LoRA base with --lora)")
    p.add_argument("--transition-at", default="early",
                   help="comma list: early (25%% of the steps), mid (50%%), late (75%%) or step numbers")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    p.add_argument("--optimizer-state", default="transform",
                   help="transform (exp_avg / S, exp_avg_sq / S^2) or reset (fresh AdamW), or both: "
                        "transform,reset; reset adds a reset@T control branch")
    p.add_argument("--random-control", action="store_true",
                   help="add a random@T branch: wisca's scales shuffled across units (not with --lora)")
    p.add_argument("--corpus", default="top-level", choices=sorted(CORPORA),
                   help="pretraining text: top-level = the stdlib's top-level *.py modules; stdlib = every "
                        "*.py, *.txt and *.rst file of the stdlib (site-packages excluded)")
    g = p.add_argument_group("device")
    g.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda if a GPU is visible, else cpu")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the training forward: bf16 autocast over fp32 master weights, or fp32; auto = bf16 "
                        "on cuda, fp32 on cpu. Validation is always fp32, without autocast")
    g.add_argument("--attn", default="eager", choices=["eager", "sdpa"],
                   help="attention kernel (sdpa: fused, flash attention on CUDA)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each model (model.compile()); optional, off by default")
    g = p.add_argument_group("wisca")
    g.add_argument("--granularity", default="channel", choices=["channel", "head", "layer"])
    g.add_argument("--norm", default="fro", choices=["fro", "rms"])
    g.add_argument("--scales", default="pow2", choices=["pow2", "continuous"])
    g.add_argument("--strength", type=float, default=1.0)
    g = p.add_argument_group("model and training")
    g.add_argument("--hidden", type=int, default=128)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--intermediate", type=int, default=352)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=3e-4)
    g.add_argument("--warmup", type=int, default=50)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--eval-every", type=int, default=50)
    g.add_argument("--eval-batches", type=int, default=8)
    g.add_argument("--train-window", type=int, default=50, help="train loss = mean over the last N steps")
    g = p.add_argument_group("LoRA variant")
    g.add_argument("--lora", action="store_true", help="fine-tune a LoRA adapter instead (the base: "
                   "--steps of pretraining with --lora-base-seed, trained once)")
    g.add_argument("--lora-steps", type=int, default=400)
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-lr", type=float, default=2e-3)
    g.add_argument("--lora-warmup", type=int, default=20)
    g.add_argument("--lora-weight-decay", type=float, default=0.0)
    g.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj")
    g.add_argument("--lora-base-seed", type=int, default=1000)
    p.add_argument("--smoke", action="store_true",
                   help="a few steps, one seed (two with --preset), a smaller model")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep them under OUT/checkpoints")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--combine", type=Path, nargs="+", metavar="RUN",
                   help="only plot: one figure from these runs' results.json, to --png")
    p.add_argument("--png", type=Path, help="with --combine: the figure to write")
    p.add_argument("--titles", nargs="+", help="with --combine: one panel title per run")
    return p


def parse_args(argv):
    p = build_parser()
    first, _ = p.parse_known_args(argv)
    if first.preset:
        p.set_defaults(**PRESETS[first.preset])
    if first.smoke:
        p.set_defaults(**{**SMOKE, **PRESET_SMOKE.get(first.preset, {})})
    args = p.parse_args(argv)
    if args.combine is None and args.out is None and not args.estimate:
        p.error("--out is required")
    if args.random_control and (args.lora or "transform" not in args.optimizer_state.split(",")):
        p.error("--random-control needs the full-model run with --optimizer-state transform")
    if args.combine is not None and args.png is None:
        p.error("--combine needs --png")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    if args.lora and args.device != "cpu":
        p.error("--lora runs on the CPU only")
    if args.precision == "auto":
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    return args


def device_info(args) -> dict:
    info = {"device": args.device, "precision": args.precision, "attn": args.attn, "compile": args.compile,
            "threads": args.threads}
    if args.device == "cuda":
        info.update(name=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    tf32_matmul=torch.get_float32_matmul_precision())
    return info


def write_results(args, argv, task, boundaries: list[int], seeds: list[dict], cost: dict, started: float) -> dict:
    """results.json, results.md and curves.png for the seeds done so far (all of them at the end)."""
    import transformers

    out: Path = args.out
    done = f"{len(seeds)} seed(s)"
    if len(seeds) < args.seeds:
        done += f" of {args.seeds} (partial: the run goes on)"
    rows = summarise(seeds, task.total, args.train_window)
    paired = contrasts(seeds, task.total)
    measured = measured_throughput(seeds, cost) if cost else None
    epochs = args.batch_size * args.seq_len * task.total / task.train_bytes
    run = {
        "command": "python experiments/transition.py " + shlex.join(argv),
        "title": run_title(args),
        "kind": task.kind,
        "complete": len(seeds) == args.seeds,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": task.data_desc,
        "data_bytes": {"train": task.train_bytes, "val": task.val_bytes, "epochs_of_the_baseline": round(epochs, 3)},
        "model": {"parameters": getattr(task, "n_params", None), "parameters_from_shapes": count_parameters(args),
                  "hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                  "intermediate": args.intermediate, "vocab": 256},
        "device": device_info(args),
        "cost": cost,
        "measured_throughput": measured,
        "lora_base": getattr(task, "base_info", None),
        "total_steps": task.total, "boundaries": boundaries, "eval_every": args.eval_every,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "wisca": wisca.__version__},
        "wall_seconds": round(time.time() - started, 1),
        "table": rows,
        "paired": paired,
        "seeds": seeds,
    }
    (out / "results.json").write_text(json.dumps(run, indent=1) + "\n")
    table = table_markdown(rows, task.total, args.train_window)
    diag = transitions_markdown(seeds)
    dev = run["device"]
    speed = ""
    if measured:
        share = (f" ({measured['share_of_h100_bf16_peak']:.1%} of an H100's dense bf16 peak)"
                 if args.device == "cuda" else "")
        speed = (f" Training ran at {measured['tflops']:.3g} TFLOP/s{share}, "
                 f"{measured['bytes_per_second']:,.0f} bytes/s.")
    md = (f"# {run['title']}\n\n`{run['command']}`\n\n{task.data_desc} ({epochs:.2f} epochs in the baseline); "
          f"transition at step(s) {boundaries} of {task.total}; {done}; wall time "
          f"{run['wall_seconds']:.0f}s on {dev.get('name', dev['device'])} ({dev['precision']} training, "
          f"fp32 validation, attention {dev['attn']}).{speed}\n\n"
          f"Model: byte-level GQA Llama, hidden {args.hidden}, {args.layers} layers, {args.heads} query heads on "
          f"{args.kv_heads} kv heads, intermediate {args.intermediate}: {run['model']['parameters_from_shapes']:,} "
          f"parameters.\n\n"
          f"Validation loss at the last step (nats/byte), mean ± std over seeds; Δ = paired difference "
          f"to the baseline of the same seed, mean ± std [min, max].\n\n{table}\n\n"
          f"Paired differences of the final validation loss, mean and 95 % t-interval over seeds "
          f"(* = the interval excludes 0; negative = the arm is lower):\n\n{contrasts_markdown(paired)}\n\n"
          f"Transitions (mean |log2 imbalance| per unit, mean over seeds):\n\n{diag}\n")
    (out / "results.md").write_text(md)
    plot([load_run(out)], out / "curves.png")
    if run["complete"]:
        print("\n" + table + "\n\n" + contrasts_markdown(paired) + "\n\n" + diag)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {out / 'curves.png'} "
          f"({done}, {run['wall_seconds']:.0f}s)", flush=True)
    return run


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.combine:
        plot([load_run(f) for f in args.combine], args.png, args.titles)
        print(f"wrote {args.png}")
        return None
    if args.estimate:
        total = args.lora_steps if args.lora else args.steps
        cost = run_cost(args, count_parameters(args), transition_steps(args.transition_at, total), total)
        print(cost_text(cost))
        return {"cost": cost}
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")   # TF32 for fp32 matmuls (pow2 scales stay exact)
    elif args.preset and not args.smoke:
        print(f"warning: --preset {args.preset} is sized for a GPU; on the CPU it takes many hours", flush=True)

    started = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    tmp = None
    if args.keep_checkpoints:
        workdir = out / "checkpoints"
        workdir.mkdir(exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="wisca-transition-")
        workdir = Path(tmp.name)
    try:
        task = (LoraTask if args.lora else PretrainTask)(args, workdir)
        boundaries = transition_steps(args.transition_at, task.total)
        task.eval_steps = set(range(0, task.total + 1, args.eval_every)) | set(boundaries)
        cost = None if args.lora else run_cost(args, count_parameters(args), boundaries, task.total)
        print(f"data: {task.data_desc}\ntransition at step(s) {boundaries} of {task.total}\n"
              f"device: {device_info(args)}", flush=True)
        if cost:
            print(f"model and cost: {cost_text(cost)}", flush=True)
        seeds = []
        for seed in range(args.seeds):
            seeds.append(run_seed(task, args, seed, boundaries))
            if len(seeds) < args.seeds:   # a run cut short (a time limit) still leaves its results
                write_results(args, argv, task, boundaries, seeds, cost, started)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return write_results(args, argv, task, boundaries, seeds, cost, started)


if __name__ == "__main__":
    main()
