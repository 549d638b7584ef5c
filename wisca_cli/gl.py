"""GL(r) balancing of a low-rank pair: the full symmetry of ``B A``, not just its diagonal.

For ``A`` [r, n] and ``B`` [m, r], every invertible M gives the same product
``(B M^-1)(M A) = B A``. The sum ``||M A||^2 + ||B M^-1||^2`` is smallest exactly when the
pair is balanced, ``(M A)(M A)^T = (B M^-1)^T (B M^-1)``; the symmetric positive-definite
such M is

    G = P^-1/2 (P^1/2 Q P^1/2)^1/2 P^-1/2      (P = A A^T, Q = B^T B: G P G = Q)
    M = G^1/2

(G is the matrix geometric mean of P^-1 and Q). Any other balancing M is an orthogonal
matrix times this one. A diagonal M is WISCA's per-rank-channel symmetry (``lora_pair``);
the GL solution also mixes the rank channels. It is continuous: the product is preserved
up to rounding, never bit for bit. Pure functions, batched over leading dimensions;
computed in float64.
"""

from __future__ import annotations

import torch

# P or Q this close to singular (smallest / largest eigenvalue): the pair is left as it is
RANK_TOL = 1e-12


def _sym_pow(S: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """S**p for symmetric positive semi-definite S (eigenvalues clamped at 0), and S's
    eigenvalues."""
    lam, V = torch.linalg.eigh(S)
    lam_c = lam.clamp(min=0) if p > 0 else torch.where(lam > 0, lam, torch.ones_like(lam))  # < 0: not ok
    return (V * lam_c.unsqueeze(-2) ** p) @ V.transpose(-1, -2), lam


def gl_balance(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, M^-1), float64 [..., r, r], such that M A and B M^-1 are balanced.

    A: [..., r, n] (LoRA's lora_A), B: [..., m, r] (lora_B). Where A A^T or B^T B is
    (numerically) singular, for example B = 0 at LoRA's initialisation, M is the identity:
    no invertible M balances a rank-deficient pair.
    """
    A, B = A.double(), B.double()
    P = A @ A.transpose(-1, -2)
    Q = B.transpose(-1, -2) @ B
    finite = torch.isfinite(P).all(-1).all(-1) & torch.isfinite(Q).all(-1).all(-1)
    eye = torch.eye(A.shape[-2], dtype=torch.float64).expand_as(P)
    P = torch.where(finite[..., None, None], 0.5 * (P + P.transpose(-1, -2)), eye)
    Q = torch.where(finite[..., None, None], 0.5 * (Q + Q.transpose(-1, -2)), eye)
    # G is homogeneous, G(aP, bQ) = sqrt(b / a) G(P, Q): solve for unit-trace P and Q
    tp = torch.diagonal(P, dim1=-2, dim2=-1).sum(-1).clamp(min=1e-300)
    tq = torch.diagonal(Q, dim1=-2, dim2=-1).sum(-1).clamp(min=1e-300)
    P, Q = P / tp[..., None, None], Q / tq[..., None, None]
    P_half, lam_p = _sym_pow(P, 0.5)
    P_mhalf, _ = _sym_pow(P, -0.5)
    inner, _ = _sym_pow(0.5 * (P_half @ Q @ P_half + (P_half @ Q @ P_half).transpose(-1, -2)), 0.5)
    G = P_mhalf @ inner @ P_mhalf
    G = 0.5 * (G + G.transpose(-1, -2)) * (tq / tp).sqrt()[..., None, None]
    finite = finite & torch.isfinite(G).all(-1).all(-1)
    G = torch.where(finite[..., None, None], G, eye)
    lam_g, V = torch.linalg.eigh(G)
    lam_q = torch.linalg.eigvalsh(Q)
    ok = (finite & (lam_p.min(-1).values > RANK_TOL * lam_p.max(-1).values.clamp(min=1e-300))
          & (lam_q.min(-1).values > RANK_TOL * lam_q.max(-1).values.clamp(min=1e-300))
          & (lam_g.min(-1).values > 0) & torch.isfinite(lam_g).all(-1))
    safe = torch.where(ok[..., None], lam_g, torch.ones_like(lam_g))
    M = (V * safe.sqrt().unsqueeze(-2)) @ V.transpose(-1, -2)
    Minv = (V * safe.rsqrt().unsqueeze(-2)) @ V.transpose(-1, -2)
    return torch.where(ok[..., None, None], M, eye), torch.where(ok[..., None, None], Minv, eye)


def gl_apply(A: torch.Tensor, B: torch.Tensor, M: torch.Tensor, Minv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M A, B M^-1) in A's and B's dtypes (computed in float64, rounded once)."""
    return (M @ A.double()).to(A.dtype), (B.double() @ Minv).to(B.dtype)


def gl_imbalance(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """||A A^T - B^T B||_F / (||A||_F^2 + ||B||_F^2): 0 when balanced, at most 1."""
    A, B = A.double(), B.double()
    num = torch.linalg.matrix_norm(A @ A.transpose(-1, -2) - B.transpose(-1, -2) @ B)
    return num / (A.square().sum((-1, -2)) + B.square().sum((-1, -2))).clamp(min=1e-300)
