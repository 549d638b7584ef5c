"""The symmetry core on pieces of tensors: statistics of random chunks merge to the whole
tensor's, multipliers applied chunk by chunk give the whole tensor's result bit for bit,
and the core imports no I/O, no threads and no CLI (and no module imports in a circle)."""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ARCH_FAMILIES, REPO

from wisca_cli.balance import apply_multiplier, chunk_multiplier, member_multipliers, scales_from_stats
from wisca_cli.pairs import layer_pairs
from wisca_cli.spec import layout_from_config
from wisca_cli.stats import UnitStats, chunk_stats, unit_stats


def _boxes(shape: tuple[int, ...], rng: random.Random) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """A random grid of boxes covering a tensor: (offsets, sizes), in random order."""
    cuts = []
    for n in shape:
        inner = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(0, 3)))) if n > 1 else []
        edges = [0, *inner, n]
        cuts.append(list(zip(edges[:-1], edges[1:])))
    boxes = [((), ())]
    for dim in cuts:
        boxes = [(o + (a,), s + (b - a,)) for o, s in boxes for a, b in dim]
    rng.shuffle(boxes)
    return boxes


def _piece(t: torch.Tensor, offsets, sizes) -> torch.Tensor:
    for d, (o, n) in enumerate(zip(offsets, sizes)):
        t = t.narrow(d, o, n)
    return t


def _family_layers(arch_ckpt, family: str):
    path = arch_ckpt(family)
    tensors = load_file(path / "model.safetensors")
    layout = layout_from_config(json.loads((path / "config.json").read_text()), tensor_names=tensors)
    for layer in range(layout.layers):
        names = layout.layer_roles(layer)
        yield layout, layer, {role: tensors[n] for role, n in names.items()}


@pytest.mark.parametrize("family", list(ARCH_FAMILIES))
def test_chunked_statistics_give_the_whole_tensor_scales(arch_ckpt, family):
    rng = random.Random(family)
    for layout, layer, w in _family_layers(arch_ckpt, family):
        for granularity in ("channel", "head"):
            for pair in layer_pairs(layout, layer, layout.spec.targets, granularity):
                whole = unit_stats(pair, w)
                pieces = []
                for m in pair.members:
                    for offsets, sizes in _boxes(tuple(w[m.role].shape), rng):
                        pieces.append(chunk_stats(m, pair.n_units, _piece(w[m.role], offsets, sizes), offsets))
                rng.shuffle(pieces)
                merged = UnitStats.zeros(pair.n_units)
                for p in pieces:
                    merged = merged.merge(p)
                for f in ("sumsq_a", "sumsq_b"):
                    assert torch.allclose(getattr(merged, f), getattr(whole, f), rtol=1e-5, atol=0), (family, pair.kind)  # float32 within a chunk
                for f in ("count_a", "count_b", "maxabs_a", "maxabs_b", "minabs_a", "minabs_b"):
                    assert torch.equal(getattr(merged, f), getattr(whole, f)), (family, pair.kind, f)
                dtype = torch.float32
                a = scales_from_stats(pair.kind, whole, pow2=True, dtype=dtype)
                b = scales_from_stats(pair.kind, merged, pow2=True, dtype=dtype)
                assert torch.equal(a.scales, b.scales), (family, layer, pair.kind, granularity)
                a = scales_from_stats(pair.kind, whole, pow2=False, dtype=dtype)
                b = scales_from_stats(pair.kind, merged, pow2=False, dtype=dtype)
                assert torch.allclose(a.scales.double(), b.scales.double(), rtol=1e-6, atol=0), (family, pair.kind)


def test_statistics_pack_for_all_reduce_round_trips():
    s = UnitStats(*[torch.rand(5, dtype=torch.float64) for _ in range(8)])
    back = UnitStats.unpack(s.pack())
    assert all(torch.equal(getattr(s, f), getattr(back, f)) for f in UnitStats.SUMS + UnitStats.MAXES + UnitStats.MINS)
    doubled = s.merge(s)
    assert torch.equal(doubled.sumsq_a, 2 * s.sumsq_a) and torch.equal(doubled.maxabs_b, s.maxabs_b)


@pytest.mark.parametrize("family", list(ARCH_FAMILIES))
def test_multipliers_applied_chunk_by_chunk_are_bit_identical(arch_ckpt, family):
    rng = random.Random(family + "m")
    g = torch.Generator().manual_seed(0)
    for layout, layer, w in _family_layers(arch_ckpt, family):
        for pair in layer_pairs(layout, layer, layout.spec.targets, "channel"):
            shapes = {r: tuple(t.shape) for r, t in w.items()}
            for pow2 in (True, False):
                e = torch.randn(pair.n_units, generator=g) * 2
                s = torch.exp2(torch.round(e)) if pow2 else torch.exp2(e)
                for role, mult in member_multipliers(pair, s.double(), shapes).items():
                    t = w[role]
                    for power in (1, -1, -2):
                        whole = apply_multiplier(t, mult, power)
                        out = torch.empty_like(t)
                        for offsets, sizes in _boxes(tuple(t.shape), rng):
                            piece = _piece(t, offsets, sizes)
                            _piece(out, offsets, sizes).copy_(
                                apply_multiplier(piece, chunk_multiplier(mult, offsets, sizes, 1), power))
                        assert torch.equal(whole.view(torch.int8) if whole.dtype == torch.bool else whole, out), \
                            (family, pair.kind, role, power, pow2)


# -- the import graph --------------------------------------------------------------------------------
PACKAGE = REPO / "wisca_cli"
CORE = ("options", "spec", "pairs", "stats", "balance", "solve", "errors", "gl", "mxfp4", "fp8")
NOT_IN_CORE = {"os", "io", "threading", "concurrent", "subprocess", "socket", "mmap", "shutil", "tempfile",
               "safetensors", "typer", "rich", "click", "huggingface_hub",
               "checkpoint", "fileio", "output", "hub", "record", "prefetch", "launch", "memory", "stream", "api", "cli",
               "lora", "training", "verify", "forward", "plot", "formats"}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions: 'torch', or the
    project's own module name for relative imports ('.stats' -> 'stats')."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.module:
                    out.add(node.module.split(".")[0])
                else:
                    out |= {a.name for a in node.names}
            elif node.module:
                root = node.module.split(".")
                out.add(root[1] if root[0] == "wisca_cli" and len(root) > 1 else root[0])
    return out


def test_the_import_graph_has_no_cycle():
    own = {p.stem for p in PACKAGE.glob("*.py")}
    graph = {p.stem: (_imports(p) & own) - {"__init__", p.stem} for p in PACKAGE.glob("*.py")}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [node, nxt]))
            if not state.get(nxt):
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [])
    assert "api" in graph["cli"] and "stream" in graph["api"]   # the graph is the real one


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_no_io_threads_or_cli(module):
    found = _imports(PACKAGE / f"{module}.py") & NOT_IN_CORE
    assert not found, f"{module}.py imports {sorted(found)}"


def test_the_same_input_gives_the_same_bytes(tmp_path):
    """Two runs of the same transform write identical files, record included (the order of
    safetensors header keys used to vary between runs)."""
    import hashlib
    import subprocess
    import sys

    from conftest import SAMPLE

    digests = []
    for run in range(2):
        dst = tmp_path / "out"
        res = subprocess.run([sys.executable, "-m", "wisca_cli", "transform", str(SAMPLE), str(dst), "--json",
                              "--targets", "qk,vo,ffn,norm", "--scales", "continuous"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(dst.iterdir())})
        subprocess.run(["rm", "-rf", str(dst)], check=True)
    assert digests[0] == digests[1]
    assert {"wisca.json", "wisca_scales.safetensors", "model.safetensors"} <= set(digests[0])


# -- GL(r) balancing of a low-rank pair ----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gl_balance_preserves_the_product_and_balances_the_pair(dtype):
    from wisca_cli.gl import gl_apply, gl_balance, gl_imbalance

    g = torch.Generator().manual_seed(0)
    A = (torch.randn(5, 4, 20, generator=g) * 8).to(dtype)            # batched: 5 pairs, rank 4
    B = (torch.randn(5, 30, 4, generator=g) / 8).to(dtype)
    M, Minv = gl_balance(A, B)
    assert torch.allclose(M @ Minv, torch.eye(4, dtype=torch.float64).expand(5, 4, 4), atol=1e-10)
    A2, B2 = gl_apply(A, B, M, Minv)
    assert A2.dtype == dtype and B2.dtype == dtype
    before, after = (B.double() @ A.double()), (B2.double() @ A2.double())
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert ((after - before).norm() / before.norm()) < tol            # the product, to rounding
    assert float(gl_imbalance(A, B).min()) > 0.1
    assert float(gl_imbalance(A2, B2).max()) < (1e-12 if dtype == torch.float64 else 1e-6)
    P, Q = A2.double() @ A2.double().transpose(1, 2), B2.double().transpose(1, 2) @ B2.double()
    assert torch.allclose(P, Q, rtol=0, atol=tol * float(P.abs().max()))   # A A^T = B^T B
    assert torch.allclose(M, M.transpose(1, 2)) and bool((torch.linalg.eigvalsh(M) > 0).all())
    # the norm sum is the minimum over GL(r): any other invertible map does no better
    N = torch.linalg.qr(torch.randn(5, 4, 4, generator=g, dtype=torch.float64))[0] @ torch.diag_embed(
        torch.rand(5, 4, generator=g, dtype=torch.float64) + 0.5)
    cost = lambda a, b: a.square().sum((1, 2)) + b.square().sum((1, 2))  # noqa: E731
    assert bool((cost(A2.double(), B2.double()) <= cost(N @ A2.double(), B2.double() @ torch.linalg.inv(N)) * (1 + 1e-9)).all())


def test_gl_balance_leaves_a_rank_deficient_or_non_finite_pair_alone():
    from wisca_cli.gl import gl_balance

    A = torch.randn(2, 4, 20, dtype=torch.float64)
    B = torch.zeros(2, 30, 4, dtype=torch.float64)                    # LoRA's B = 0
    B[1, 0, 0] = float("inf")
    M, Minv = gl_balance(A, B)
    eye = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    assert torch.equal(M, eye) and torch.equal(Minv, eye)
