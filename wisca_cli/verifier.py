"""Streamed equivalence check: two models, the same probe tokens, one layer at a time.

``StreamVerifier`` carries two residual streams (reference and candidate) through the
reference forward. It is fed each layer's weights of both models as they are read, so
verifying a transform costs no second pass over the checkpoint, and the first layer
whose outputs differ is known the moment it happens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from . import forward
from .errors import WiscaError
from .spec import Layout


@dataclass
class Tolerance:
    max_kl: float = 1e-6        # mean KL(p_ref || p_new) per token
    min_top1: float = 1.0       # fraction of tokens whose argmax agrees
    max_rel: float = 1e-3       # max |logit diff| / max |logit|


DEFAULT_TOLERANCE = {
    "F32": Tolerance(1e-6, 1.0, 1e-3),
    "F64": Tolerance(1e-9, 1.0, 1e-6),
    "BF16": Tolerance(5e-3, 0.95, 0.1),
    "F16": Tolerance(1e-3, 0.98, 0.05),
}


def resolve_tolerance(dtype: str, given: "Tolerance | dict | None" = None) -> Tolerance:
    """The dtype's default tolerance with only the fields given (not None) replaced."""
    base = DEFAULT_TOLERANCE.get(dtype, DEFAULT_TOLERANCE["F32"])
    if given is None:
        return base
    items = asdict(given).items() if isinstance(given, Tolerance) else dict(given).items()
    return Tolerance(**{**asdict(base), **{k: v for k, v in items if v is not None}})


@dataclass
class VerifyResult:
    mode: str                   # "exact" or "tolerance"
    passed: bool
    identical: bool
    max_abs_diff: float
    rel_diff: float
    kl: float
    top1: float
    tokens: int
    first_diverging_layer: int | None
    layer_max_abs_diff: list[float] = field(default_factory=list)
    tolerance: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def failure(self) -> str:
        """The one line for a transform whose output did not verify."""
        where = self.first_diverging_layer
        at = "logits" if where is None else ("embeddings" if where < 0 else f"layer {where}")
        return (f"verification failed: outputs diverge at {at} (max abs diff {self.max_abs_diff:.3g}, "
                f"KL {self.kl:.3g}, top-1 {self.top1:.3f}); nothing written")


def probe_ids(vocab: int, batch: int, length: int, seed: int, file: str | None = None) -> torch.Tensor:
    """Probe tokens: seeded random ids, or a JSON list of lists / whitespace ints from a file."""
    if file:
        path = Path(file)
        try:
            text = path.read_text()
        except OSError as e:
            raise WiscaError(f"{file}: cannot read probe ids: {e.strerror}") from e
        try:
            import json
            data = json.loads(text)
        except ValueError:
            data = [[int(x) for x in line.split()] for line in text.splitlines() if line.strip()]
        if data and isinstance(data[0], int):
            data = [data]
        try:
            ids = torch.tensor(data, dtype=torch.long)
        except (ValueError, TypeError) as e:
            raise WiscaError(f"{file}: probe ids must be rows of integers of equal length") from e
        if ids.dim() != 2 or ids.numel() == 0:
            raise WiscaError(f"{file}: probe ids must be rows of integers of equal length")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise WiscaError(f"{file}: probe ids must lie in [0, {vocab})")
        return ids
    if batch <= 0 or length <= 0:
        from .options import OptionError
        raise OptionError("probe_batch" if batch <= 0 else "probe_len", "must be positive")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen)


def compute_dtype(weights_dtype: torch.dtype, exact: bool) -> torch.dtype:
    """bf16 checkpoints verified exactly run in bf16 (as the model does) where the CPU has
    bf16 matrix units or on a GPU; everything else in float32. Without bf16 units a bf16
    matmul is slower than converting the weights and multiplying in float32 (2.4x, measured
    on an AVX2 CPU: 64 tokens x 2048 x 5632). Power-of-two scales are exact in both, and
    float32 has bf16's exponent range, so the check is the same check."""
    if exact and weights_dtype == torch.bfloat16 and _fast_bf16():
        return torch.bfloat16
    return torch.float32


@lru_cache(maxsize=1)
def _fast_bf16() -> bool:
    """The CPU multiplies bf16 natively (AVX512-BF16 or AMX), per /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def _cast(w: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Vectors (norms, biases) in the compute dtype; matrices stay as stored and are
    converted one at a time where they are multiplied (``forward.linear``)."""
    return {k: v.to(dtype) if v.dim() < 2 else v for k, v in w.items()}


HEAD_CHUNK_ROWS = 512   # vocab rows per head matmul: 512 x hidden float32 per thread, two threads
                        # (4 MiB each at hidden 2048: together the one 1024-row buffer of before)


class StreamVerifier:
    """Two residual streams through the reference forward, compared after every layer.

    ``pool`` (an executor) runs the reference model's layer beside the candidate's;
    ``cand_pool`` lets ``finish_layer_async`` run the candidate's layer in the background.
    Each pool has one thread, so a stream's layers run in order.
    """

    def __init__(self, layout: Layout, ids: torch.Tensor, exact: bool, tolerance: Tolerance,
                 dtype: torch.dtype = torch.float32, pool=None, cand_pool=None):
        forward.activation(layout)   # an activation the forward lacks fails here, before any work
        self.layout, self.ids, self.exact, self.tol, self.dtype = layout, ids, exact, tolerance, dtype
        self.pool, self.cand_pool = pool, cand_pool
        self._last_cand = None
        self._contexts: dict[tuple, tuple] = {}
        self.rope, self.mask = self._context(0) if layout.layers else (None, None)
        self._started = 0          # layers whose reference step has been started
        self.h_ref = self.h_new = None
        # what each stream carries across layers besides h: Gemma 4's per-layer inputs and shared kv
        self.ctx_ref, self.ctx_new = {"kv": {}, "ids": ids}, {"kv": {}, "ids": ids}
        self._ple_ref = self._ple_new = None   # the probe tokens' rows of the per-layer embedding
        self.layer_diffs: list[float] = []
        self.first_bad: int | None = None

    def get_state(self) -> dict:
        """Both residual streams and the comparisons so far: what the next rank continues from."""
        return {"h_ref": self.h_ref, "h_new": self.h_new, "started": self._started,
                "layer_diffs": list(self.layer_diffs), "first_bad": self.first_bad,
                "ctx_ref": self.ctx_ref, "ctx_new": self.ctx_new}

    def set_state(self, state: dict) -> None:
        self.h_ref, self.h_new, self._started = state["h_ref"], state["h_new"], state["started"]
        self.layer_diffs, self.first_bad = list(state["layer_diffs"]), state["first_bad"]
        self.ctx_ref, self.ctx_new = state["ctx_ref"], state["ctx_new"]

    def ple_rows(self, start: int, rows_ref: torch.Tensor, rows_new: torch.Tensor) -> None:
        """Take the probe tokens' rows from a block of the per-layer embedding table (Gemma 4)."""
        self._ple_ref, self._ple_new = self._gather(self._ple_ref, self._ple_new, start, rows_ref, rows_new)

    def embed(self, emb_ref: torch.Tensor, emb_new: torch.Tensor) -> None:
        self.embed_rows(0, emb_ref, emb_new)
        self.embed_done()

    def embed_rows(self, start: int, rows_ref: torch.Tensor, rows_new: torch.Tensor) -> None:
        """Take the probe tokens' embeddings from a block of embedding rows."""
        self.h_ref, self.h_new = self._gather(self.h_ref, self.h_new, start, rows_ref, rows_new)

    def _gather(self, ref: torch.Tensor | None, new: torch.Tensor | None, start: int, rows_ref: torch.Tensor,
                rows_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The probe tokens' rows of a table, [batch, length, width], filled from a block of its rows
        (first row ``start``); made at the first block."""
        if ref is None:
            shape = (*self.ids.shape, rows_ref.shape[1])
            ref, new = torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)
        hit = (self.ids >= start) & (self.ids < start + rows_ref.shape[0])
        local = self.ids[hit] - start
        ref[hit] = rows_ref[local].to(self.dtype)
        new[hit] = rows_new[local].to(self.dtype)
        return ref, new

    def embed_done(self, extra_ref: dict | None = None, extra_new: dict | None = None) -> None:
        """The embeddings are complete: add learned positions (``extra["pos"]``, GPT-2) and
        apply the family's embedding scale (Gemma's sqrt(hidden), Granite's multiplier)."""
        self.drain()
        length = self.ids.shape[1]
        for h, extra in ((self.h_ref, extra_ref), (self.h_new, extra_new)):
            if extra and "pos" in extra:
                h += extra["pos"][:length].to(self.dtype)
        scale = forward.embed_scale(self.layout)
        if scale is not None:
            factor = torch.tensor(scale, dtype=self.dtype)
            self.h_ref, self.h_new = self.h_ref * factor, self.h_new * factor
        if self.layout.streams > 1:   # hyper-connections: the embedding starts every stream
            n = self.layout.streams
            self.h_ref, self.h_new = (h.unsqueeze(2).expand(-1, -1, n, -1).contiguous() for h in (self.h_ref, self.h_new))
        if self.layout.ple_size:   # Gemma 4: each layer's input from the embeddings and its own table
            if self._ple_ref is None or any(not extra or "ple_proj" not in extra for extra in (extra_ref, extra_new)):
                raise WiscaError("the per-layer input embeddings (per_layer_input) were not given to the verifier")
            with torch.no_grad():
                for h, rows, extra, ctx in ((self.h_ref, self._ple_ref, extra_ref, self.ctx_ref),
                                            (self.h_new, self._ple_new, extra_new, self.ctx_new)):
                    ctx["ple"] = forward.per_layer_inputs(h, rows, extra["ple_proj"], extra["ple_norm"].to(self.dtype),
                                                          self.layout)
            self._ple_ref = self._ple_new = None
        self._compare(-1, self.h_ref, self.h_new)

    def _context(self, layer: int) -> tuple:
        """RoPE tables and mask of one layer (layers differ in rotary dims, theta, window, chunk)."""
        lay = self.layout
        key = (lay.rotary_dims_at(layer), lay.rope_at(layer)[0], str(lay.rope_at(layer)[1]), lay.window_at(layer),
               lay.chunk_at(layer))
        if key not in self._contexts:
            length = self.ids.shape[1]
            rope = forward.rope_tables(lay, torch.arange(length), layer) if key[0] else None
            self._contexts[key] = (tuple(r.to(self.dtype) for r in rope) if rope else None,
                                   forward.attention_mask(lay, length, layer).to(self.dtype))
        return self._contexts[key]

    def _step(self, h: torch.Tensor, w: dict, layer: int, ctx: dict) -> torch.Tensor:
        rope, mask = self._context(layer)
        with torch.no_grad():
            return forward.decoder_layer(h, _cast(w, self.dtype), self.layout, rope, mask, layer, ctx)

    def start_layer(self, w_ref: dict, before=None):
        """Run the reference model's layer (after ``before()``, e.g. a check) in the pool;
        the future's result is the reference stream after this layer."""
        layer = self._started
        self._started += 1

        def run():
            if before is not None:
                before()
            self.h_ref = self._step(self.h_ref, w_ref, layer, self.ctx_ref)   # the next layer starts from it
            return self.h_ref

        if self.pool is None:
            self._ref_result = run()
            return None
        return self.pool.submit(run)

    def finish_layer(self, index: int, pending, w_new: dict) -> None:
        """The transformed model's layer here, then compare with the reference's."""
        self.drain()
        self._candidate(index, pending, w_new)

    def finish_layer_async(self, index: int, pending, w_new: dict):
        """``finish_layer`` in ``cand_pool``; returns its future. ``w_new`` must stay
        unchanged until the future is done."""
        self._last_cand = self.cand_pool.submit(self._candidate, index, pending, w_new)
        return self._last_cand

    def drain(self) -> None:
        """Wait for the candidate layer running in the background (re-raising its error)."""
        if self._last_cand is not None:
            self._last_cand.result()

    def _candidate(self, index: int, pending, w_new: dict) -> None:
        self.h_new = self._step(self.h_new, w_new, index, self.ctx_new)
        h_ref = pending.result() if pending is not None else self._ref_result
        self._compare(index, h_ref, self.h_new)

    def layer(self, index: int, w_ref: dict, w_new: dict) -> None:
        self._started = index
        self.finish_layer(index, self.start_layer(w_ref), w_new)

    def _compare(self, index: int, h_ref: torch.Tensor, h_new: torch.Tensor) -> None:
        diff = (h_ref.float() - h_new.float()).abs().max().item()
        self.layer_diffs.append(diff)
        if self.first_bad is None:
            if self.exact:
                bad = not torch.equal(h_ref, h_new)
            else:
                scale = h_ref.abs().max().item() or 1.0
                bad = not (diff / scale <= self.tol.max_rel)   # also catches NaN
            if bad:
                self.first_bad = index

    def final_norm(self, norm_ref: torch.Tensor, norm_new: torch.Tensor,
                   extra_ref: dict | None = None, extra_new: dict | None = None) -> None:
        """The final norm; ``extra["norm_bias"]`` for LayerNorm families, ``extra["head_bias"]``
        for a head with a bias (Phi), kept for ``head_rows``."""
        self.drain()

        def get(extra, role):
            return extra[role].to(self.dtype) if extra and role in extra else None

        lay = self.layout
        h_ref, h_new = self.h_ref, self.h_new
        if lay.spec.block.hyper is not None:   # DeepSeek-V4: the streams collapsed first (hc_head)
            with torch.no_grad():
                h_ref, h_new = (forward.hyper_head(h, extra["hc_fn"], extra["hc_base"], extra["hc_scale"], lay)
                                for h, extra in ((h_ref, extra_ref), (h_new, extra_new)))
        self.x_ref = forward.layer_norm(h_ref, norm_ref.to(self.dtype), get(extra_ref, "norm_bias"), lay.eps, lay)
        self.x_new = forward.layer_norm(h_new, norm_new.to(self.dtype), get(extra_new, "norm_bias"), lay.eps, lay)
        self.bias_ref, self.bias_new = get(extra_ref, "head_bias"), get(extra_new, "head_bias")
        self.logits_ref, self.logits_new = [], []

    def head_rows(self, rows_ref: torch.Tensor, rows_new: torch.Tensor, start: int = 0) -> None:
        """Logits for a block of vocabulary rows of the output head (first row ``start``)."""
        def logits(x, rows, b):
            b = None if b is None else b[start:start + rows.shape[0]]
            with torch.no_grad():
                return forward.final_logits(x, None, rows, self.layout, chunk_rows=HEAD_CHUNK_ROWS,
                                            head_bias=b).float()

        # the reference model's block in the reference thread, beside the candidate's here
        ref = self.pool.submit(logits, self.x_ref, rows_ref, self.bias_ref) if self.pool is not None else None
        self.logits_new.append(logits(self.x_new, rows_new, self.bias_new))
        self.logits_ref.append(ref.result() if ref is not None else logits(self.x_ref, rows_ref, self.bias_ref))

    def result(self) -> VerifyResult:
        a = torch.cat(self.logits_ref, -1)
        self.logits_ref = []       # the blocks go as soon as they are joined: a 64-token x 256k-vocab
        b = torch.cat(self.logits_new, -1)                           # logits tensor is 64 MB
        self.logits_new = []
        return compare_logits(a, b, self.exact, self.tol, self.first_bad, self.layer_diffs[1:])


def compare_logits(a: torch.Tensor, b: torch.Tensor, exact: bool, tol: Tolerance,
                   first_bad: int | None = None, layer_diffs: list[float] | None = None) -> VerifyResult:
    """The two models' logits compared; one row at a time where a temporary is needed,
    so the peak memory stays at the two logits tensors."""
    identical = torch.equal(a, b)
    rows_a, rows_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    diff = peak = torch.zeros((), dtype=a.dtype)
    finite = True
    for ra, rb in zip(rows_a, rows_b):   # torch.maximum keeps a NaN
        diff = torch.maximum(diff, torch.sub(ra, rb).abs_().max())
        peak = torch.maximum(peak, ra.abs().max())
        finite = finite and bool(torch.isfinite(ra).all() and torch.isfinite(rb).all())
    diff = diff.item()
    rel = diff / (peak.item() or 1.0)
    kl = _mean_kl(rows_a, rows_b)
    top1 = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    if exact:
        passed = identical and finite
    else:
        passed = finite and kl <= tol.max_kl and top1 >= tol.min_top1 and rel <= tol.max_rel
    return VerifyResult(
        mode="exact" if exact else "tolerance", passed=passed, identical=identical,
        max_abs_diff=diff, rel_diff=rel, kl=max(kl, 0.0), top1=top1, tokens=a.shape[0] * a.shape[1],
        first_diverging_layer=None if passed else first_bad, layer_max_abs_diff=layer_diffs or [],
        tolerance=None if exact else asdict(tol),
    )


def _mean_kl(a: torch.Tensor, b: torch.Tensor, block: int = 8) -> float:
    """Mean over rows of KL(softmax(a) || softmax(b)), in float64, a few rows at a time
    (a 256k vocabulary makes each row's float64 temporaries 2 MB)."""
    total = 0.0
    for i in range(0, a.shape[0], block):
        la = torch.log_softmax(a[i:i + block].double(), -1)
        lb = torch.log_softmax(b[i:i + block].double(), -1)
        total += (la.exp() * (la - lb)).sum(-1).sum().item()
    return total / max(a.shape[0], 1)
