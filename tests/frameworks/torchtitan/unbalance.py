"""Function-preserving "unbalancing" of a torchtitan model by exact powers of two.

Every transform multiplies one tensor slice by 2**e and its partner by 2**-e,
so the network computes exactly the same function (each product w_i * x_i is
unchanged bit for bit; no rounding is involved because scaling by a power of
two is exact in fp32/bf16 away from overflow/underflow).

Per layer:
  qk  (llama only)  per kv head g and rotary pair j (Llama 3's interleaved
                    rows 2j, 2j+1): k rows of the pair x 2^-a[g, j]; the same
                    rows of every q head reading kv head g x 2^+a[g, j] (a
                    rotation mixes only the two rows of a pair, so each pair's
                    q.k term is unchanged; a balancer that paired the rows
                    otherwise would change the function)
  vo                per kv head g: v rows x 2^b[g]; the wo columns of every q
                    head reading kv head g x 2^-b[g]
  ffn               per hidden channel f: w3 (up) row x 2^c[f]; w2 (down)
                    column x 2^-c[f]   (MoE: per expert e, w3_EFD[e,f,:] and
                    w2_EDF[e,:,f])
  attention_norm    per channel: weight x 2^d; the wq/wk/wv (wqkv) columns x 2^-d
  ffn_norm          per channel: weight x 2^d; w1/w3 columns x 2^-d (MoE: the
                    router gate columns and every expert's w1/w3 columns)
And once: final norm weight x 2^d, lm_head columns x 2^-d.

Qwen3 applies q_norm/k_norm (per-head RMSNorm over head_dim, weight shared by
all heads) right after the projection, so scaling q rows by 2^a is *undone* by
q_norm (up to its eps) and the k partner cannot compensate: the qk transform
is not function-preserving there and is skipped (``qk_breaks_function``
measures how much it would change the logits).  The weights of q_norm/k_norm
themselves are left alone.

Exponents are stored per *logical* tensor (wq/wk/wv split) and then laid out
on the real parameters; for fused attention the wqkv rows are grouped per kv
head as torchtitan's FusedQKVLinear does:
    wqkv.view(n_kv, hpk + 2, head_dim, dim)[g] = [q heads g*hpk .. g*hpk+hpk-1, k_g, v_g]
"""

from __future__ import annotations

import torch

from torchtitan.components.checkpointer.utils import canonical_fqn


def make_plan(flavor: str, *, n_layers, dim, n_heads, n_kv_heads, head_dim,
              ffn_hidden, n_experts=0, moe_hidden=0, seed=20240611) -> dict:
    """Integer exponents for every transform (a JSON-able dict of lists)."""
    g = torch.Generator().manual_seed(seed)

    def ints(lo, hi, *shape):
        return torch.randint(lo, hi + 1, shape, generator=g).tolist()

    qk_ok = flavor.startswith("llama3")
    plan = {"flavor": flavor, "layers": []}
    for _ in range(n_layers):
        lay = {
            "qk": ints(-3, 3, n_kv_heads, head_dim // 2) if qk_ok else [[0] * (head_dim // 2)] * n_kv_heads,
            "vo": ints(-3, 3, n_kv_heads),
            "attention_norm": ints(-2, 2, dim),
            "ffn_norm": ints(-2, 2, dim),
        }
        if flavor == "qwen3-moe":
            lay["ffn"] = ints(-3, 3, n_experts, moe_hidden)
        else:
            lay["ffn"] = ints(-3, 3, ffn_hidden)
        plan["layers"].append(lay)
    plan["final_norm"] = ints(-2, 2, dim)
    plan["dims"] = dict(n_layers=n_layers, dim=dim, n_heads=n_heads,
                        n_kv_heads=n_kv_heads, head_dim=head_dim)
    return plan


def _rows_per_head(e_per_kv: torch.Tensor, heads_per_kv: int, head_dim: int) -> torch.Tensor:
    """[n_kv] -> rows of all q heads: q head h reads kv head h // heads_per_kv."""
    return e_per_kv.repeat_interleave(heads_per_kv).repeat_interleave(head_dim)


def exponents(plan: dict, param_names: list[str]) -> dict[str, torch.Tensor]:
    """Integer exponent tensor (broadcastable to the full parameter) per FQN."""
    d = plan["dims"]
    nh, nkv, hd = d["n_heads"], d["n_kv_heads"], d["head_dim"]
    hpk = nh // nkv
    out: dict[str, torch.Tensor] = {}
    names = {canonical_fqn(n) for n in param_names}
    t = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731

    for i, lay in enumerate(plan["layers"]):
        p = f"layers.{i}."
        a, b = t(lay["qk"]), t(lay["vo"])
        dA, dF = t(lay["attention_norm"]), t(lay["ffn_norm"])
        pairs = a.repeat_interleave(2, dim=1)                   # [nkv, hd]: rows 2j, 2j+1 of a kv head
        q_rows = pairs.repeat_interleave(hpk, dim=0).reshape(-1)   # [nh*hd]: q head h reads kv head h // hpk
        k_rows = (-pairs).reshape(-1)                           # [nkv*hd]
        v_rows = b.repeat_interleave(hd)                        # [nkv*hd]
        cols = -dA                                              # [dim]
        out[p + "attention_norm.weight"] = dA
        if p + "attention.qkv_linear.wqkv.weight" in names:
            fused_rows = torch.cat(
                [q_rows.view(nkv, hpk, hd), k_rows.view(nkv, 1, hd),
                 v_rows.view(nkv, 1, hd)], dim=1).reshape(-1)
            out[p + "attention.qkv_linear.wqkv.weight"] = fused_rows[:, None] + cols[None, :]
        else:
            out[p + "attention.qkv_linear.wq.weight"] = q_rows[:, None] + cols[None, :]
            out[p + "attention.qkv_linear.wk.weight"] = k_rows[:, None] + cols[None, :]
            out[p + "attention.qkv_linear.wv.weight"] = v_rows[:, None] + cols[None, :]
        out[p + "attention.wo.weight"] = (-_rows_per_head(b, hpk, hd))[None, :]
        out[p + "ffn_norm.weight"] = dF
        c = t(lay["ffn"])
        if p + "moe.router.gate.weight" in names:
            ie = p + "moe.routed_experts.inner_experts."
            out[p + "moe.router.gate.weight"] = (-dF)[None, :]
            out[ie + "w1_EFD"] = (-dF)[None, None, :]
            out[ie + "w3_EFD"] = c[:, :, None] + (-dF)[None, None, :]
            out[ie + "w2_EDF"] = (-c)[:, None, :]
        else:
            out[p + "feed_forward.w1.weight"] = (-dF)[None, :]
            out[p + "feed_forward.w3.weight"] = c[:, None] + (-dF)[None, :]
            out[p + "feed_forward.w2.weight"] = (-c)[None, :]
    dN = t(plan["final_norm"])
    out["norm.weight"] = dN
    out["lm_head.weight"] = (-dN)[None, :]
    missing = set(out) - names
    assert not missing, f"plan names unknown parameters: {sorted(missing)}"
    return out


def apply(model: torch.nn.Module, exps: dict[str, torch.Tensor], sign: int = 1) -> None:
    """Multiply every parameter by 2**(sign*e), exactly (torch.ldexp)."""
    from titan_harness import _full, set_full_

    for name, prm in model.named_parameters():
        e = exps.get(canonical_fqn(name))
        if e is None:
            continue
        full = _full(prm)
        e = (sign * e).expand(full.shape).contiguous()
        set_full_(prm, torch.ldexp(full, e.to(full.dtype)))


def qk_exponents_for_check(plan: dict, param_names: list[str], a: int = 2) -> dict[str, torch.Tensor]:
    """The (function-breaking on Qwen3) q x 2^a / k x 2^-a transform on kv head 0
    of layer 0, laid out like ``exponents`` -- used only to measure the damage."""
    d = plan["dims"]
    fake = {"dims": d, "final_norm": [0] * d["dim"], "layers": []}
    for i, lay in enumerate(plan["layers"]):
        z = {k: [0] * len(v) if not isinstance(v[0], list) else [[0] * len(v[0])] * len(v)
             for k, v in lay.items()}
        if i == 0:
            z["qk"] = [[a] * (d["head_dim"] // 2)] + [[0] * (d["head_dim"] // 2)] * (d["n_kv_heads"] - 1)
        fake["layers"].append(z)
    return exponents(fake, param_names)
