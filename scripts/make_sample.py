"""Train and save the bundled sample checkpoint ``sample_checkpoints/tiny-gqa-llama``.

The sample is a tiny byte-level Llama (GQA: 8 query heads sharing 2 key/value
heads) trained for a few minutes on a single CPU thread over the Python
standard library's own source code.  It exists so that wisca has a small but
*real* (trained, bf16, safetensors) checkpoint to test and demo against, and it
is small enough (< 5 MB) to live in the repository.

Everything is deterministic given the same Python stdlib on disk: the data is
every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (excluding
``site-packages``/``dist-packages``), sorted by relative path, concatenated and
capped at ``--max-bytes``; the last ``--val-frac`` of it is held out for
validation.  Tokens are raw bytes, so ``vocab_size == 256`` and no tokenizer is
needed (token id == byte value).

To regenerate the sample (about 3-4 minutes on one CPU thread)::

    OMP_WAIT_POLICY=PASSIVE python scripts/make_sample.py \\
        --out sample_checkpoints/tiny-gqa-llama

Run ``python scripts/make_sample.py --help`` for the knobs.  Different Python
versions ship different stdlib sources, so the exact losses (and weights) only
reproduce on the same interpreter; the numbers recorded in the sample's
README.md say which one was used.
"""

import argparse
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

# -----------------------------------------------------------------------------
# defaults (nanoGPT-style: plain constants, overridable from the command line)
out_dir = "sample_checkpoints/tiny-gqa-llama"
seed = 1337
max_bytes = 8 * 1024 * 1024  # cap on the concatenated stdlib text
val_frac = 0.05  # last 5% held out for validation
# model
hidden_size = 128
num_hidden_layers = 4
num_attention_heads = 8
num_key_value_heads = 2  # GQA: 4 query heads per kv head, head_dim 16
intermediate_size = 352
max_position_embeddings = 512
# training
steps = 1000
batch_size = 16
seq_len = 128
lr = 3e-3
min_lr = 3e-4
warmup_steps = 50
weight_decay = 0.1
beta1, beta2 = 0.9, 0.95
grad_clip = 1.0
log_every = 25
eval_batches = 40  # batches of (batch_size, seq_len) for the validation loss
threads = 1
# -----------------------------------------------------------------------------


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default=out_dir, help="output directory")
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--max-bytes", type=int, default=max_bytes)
    p.add_argument("--val-frac", type=float, default=val_frac)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--seq-len", type=int, default=seq_len)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--min-lr", type=float, default=min_lr)
    p.add_argument("--warmup-steps", type=int, default=warmup_steps)
    p.add_argument("--weight-decay", type=float, default=weight_decay)
    p.add_argument("--log-every", type=int, default=log_every)
    p.add_argument("--eval-batches", type=int, default=eval_batches)
    p.add_argument("--threads", type=int, default=threads)
    return p.parse_args()


# -----------------------------------------------------------------------------
# data


def load_stdlib_bytes(cap):
    """All stdlib *.py sources, sorted by relative path, concatenated, capped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = sorted(
        (p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    chunks, total, used = [], 0, 0
    for path in files:
        if total >= cap:
            break
        try:
            b = path.read_bytes()
        except OSError:
            continue
        chunks.append(b)
        total += len(b)
        used += 1
    data = b"".join(chunks)[:cap]
    return data, root, used


def get_batch(data, batch_size, seq_len, generator):
    """Random (x, y) windows; y is x shifted by one byte."""
    ix = torch.randint(len(data) - seq_len - 1, (batch_size,), generator=generator)
    x = torch.stack([data[i : i + seq_len] for i in ix.tolist()])
    y = torch.stack([data[i + 1 : i + 1 + seq_len] for i in ix.tolist()])
    return x.long(), y.long()


@torch.no_grad()
def evaluate(model, data, n_batches, batch_size, seq_len, seed):
    """Mean cross-entropy (nats/byte) over a fixed, seeded set of windows."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n_batches):
        x, y = get_batch(data, batch_size, seq_len, g)
        logits = model(input_ids=x).logits.float()
        losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item())
    model.train()
    return sum(losses) / len(losses)


def lr_at(step, args):
    """Linear warmup then cosine decay to min_lr."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# -----------------------------------------------------------------------------


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()

    raw, root, n_files = load_stdlib_bytes(args.max_bytes)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    n_val = int(len(data) * args.val_frac)
    train_data, val_data = data[:-n_val], data[-n_val:]
    print(f"data: {len(data):,} bytes from {n_files} files under {root}")
    print(f"      train {len(train_data):,} / val {len(val_data):,} bytes")

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    # eager attention: its backward is faster than SDPA's on CPU
    model = LlamaForCausalLM._from_config(config, attn_implementation="eager")
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: LlamaForCausalLM, {n_params:,} parameters")

    # nanoGPT-style param groups: no weight decay on norms (1-d params)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(beta1, beta2),
    )

    g = torch.Generator().manual_seed(args.seed)
    t_train = time.time()
    running = None
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        x, y = get_batch(train_data, args.batch_size, args.seq_len, g)
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % args.log_every == 0 or step == args.steps - 1:
            dt = time.time() - t_train
            print(
                f"step {step:5d} | loss {loss.item():.4f} (ema {running:.4f}) "
                f"| lr {lr_at(step, args):.2e} | {dt:6.1f}s"
            )
    train_time = time.time() - t_train
    final_train_loss = running

    val_fp32 = evaluate(model, val_data, args.eval_batches, args.batch_size, args.seq_len, args.seed + 1)
    print(f"val loss (fp32): {val_fp32:.4f} nats/byte = {val_fp32 / math.log(2):.3f} bits/byte")

    # save as a realistic bf16 safetensors checkpoint (transformers>=5 always
    # writes safetensors; older versions need safe_serialization=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.bfloat16)
    model.config.use_cache = True
    model.save_pretrained(out)

    # reload through the Auto* API as a user would, and re-measure in bf16
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"loading info not clean: {bad}"
    assert loaded.dtype == torch.bfloat16, loaded.dtype
    val_bf16 = evaluate(loaded, val_data, args.eval_batches, args.batch_size, args.seq_len, args.seed + 1)
    print(f"val loss (bf16 reload): {val_bf16:.4f} nats/byte = {val_bf16 / math.log(2):.3f} bits/byte")
    assert math.isfinite(val_bf16) and val_bf16 < math.log(256) - 1.0, val_bf16

    cmd = "OMP_WAIT_POLICY=PASSIVE python scripts/make_sample.py " + " ".join(sys.argv[1:])
    write_readme(out, args, config, n_params, n_files, len(train_data), len(val_data),
                 final_train_loss, val_fp32, val_bf16, train_time, cmd.strip())

    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"saved to {out} ({total / 1e6:.2f} MB):")
    for f in sorted(out.iterdir()):
        print(f"  {f.name:28s} {f.stat().st_size:>10,d} bytes")
    print(f"total wall time {time.time() - t0:.1f}s (training {train_time:.1f}s)")


def write_readme(out, args, config, n_params, n_files, n_train, n_val,
                 train_loss, val_fp32, val_bf16, train_time, cmd):
    ln2 = math.log(2)
    text = f"""# tiny-gqa-llama

A tiny **byte-level** Llama checkpoint bundled with wisca for tests and demos.
It is genuinely trained (not random weights), stored in **bfloat16** as
`model.safetensors`, and loads with
`transformers.AutoModelForCausalLM.from_pretrained("{out.as_posix()}")`.

There is no tokenizer: token id == byte value (`vocab_size` 256).
No BOS/EOS/pad tokens are defined.

## Architecture

`LlamaForCausalLM` with grouped-query attention:

| field | value |
|---|---|
| hidden_size | {config.hidden_size} |
| num_hidden_layers | {config.num_hidden_layers} |
| num_attention_heads | {config.num_attention_heads} |
| num_key_value_heads | {config.num_key_value_heads} (GQA, {config.num_attention_heads // config.num_key_value_heads} q heads per kv head) |
| head_dim | {config.head_dim} |
| intermediate_size | {config.intermediate_size} |
| max_position_embeddings | {config.max_position_embeddings} |
| vocab_size | {config.vocab_size} |
| tie_word_embeddings | {config.tie_word_embeddings} |
| rope theta | default |
| parameters | {n_params:,} |
| dtype on disk | bfloat16 |

## Data

The Python {platform.python_version()} standard library's own `*.py` sources
(everything under `sysconfig.get_paths()["stdlib"]` except site-packages),
sorted by relative path, concatenated and capped at {args.max_bytes:,} bytes
({n_files} files). The last {args.val_frac:.0%} is held out for validation:
{n_train:,} train bytes / {n_val:,} validation bytes.

## Training

AdamW (betas {beta1}/{beta2}, weight decay {args.weight_decay} on matrices),
peak lr {args.lr} with {args.warmup_steps} warmup steps and cosine decay to
{args.min_lr}, grad clip {grad_clip}, batch {args.batch_size} x
{args.seq_len} bytes, **{args.steps} steps**, seed {args.seed}, fp32 on
{args.threads} CPU thread (torch {torch.__version__}, transformers
{transformers.__version__}); training took {train_time:.0f}s.

| metric | nats/byte | bits/byte |
|---|---|---|
| final train loss (EMA) | {train_loss:.4f} | {train_loss / ln2:.3f} |
| validation loss, fp32 | {val_fp32:.4f} | {val_fp32 / ln2:.3f} |
| validation loss, bf16 checkpoint as saved | {val_bf16:.4f} | {val_bf16 / ln2:.3f} |
| uniform baseline, ln(256) | {math.log(256):.4f} | 8.000 |

Validation loss is the mean over {args.eval_batches} fixed, seeded batches of
{args.batch_size} x {args.seq_len}-byte windows from the held-out split.

## Regenerate

From the repository root:

```
{cmd}
```

Losses reproduce exactly only on the same Python stdlib and torch version.
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    main()
