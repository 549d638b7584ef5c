"""wisca_cli.plot: the weight pattern of an inspect report drawn as heatmaps to a PNG."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from wisca_cli.errors import WiscaError
from wisca_cli.plot import DPI, _colour_range, _figure_size, _panels, plot_pattern

mpimg = pytest.importorskip("matplotlib.image")
np = pytest.importorskip("numpy")

LIGHTGREY = (211 / 255, 211 / 255, 211 / 255)        # matplotlib's "lightgrey": NaN cells


def model_report(layers=4, heads=2, experts=None, scale=1.5, seed=0, kinds=("qk", "vo", "ffn")) -> dict:
    """An inspect report; ``experts(i)`` gives the ffn row length of layer i (default: dense, 1)."""
    rng = random.Random(seed)
    entries = []
    for i in range(layers):
        entry = {"layer": i}
        for kind in kinds:
            n = (experts(i) if experts else 1) if kind == "ffn" else heads
            row = [round(rng.gauss(0, scale), 4) for _ in range(n)]
            entry[kind] = {"heads": row, "mean_abs_log2": sum(map(abs, row)) / n, "units": n, "dead": 0}
        entries.append(entry)
    return {"command": "inspect", "architecture": "llama", "source": "tiny-llama/", "layers": entries}


def lora_report(modules=12, rank=8, seed=1) -> dict:
    rng = random.Random(seed)
    return {"command": "transform", "kind": "lora-adapter", "architecture": "lora", "source": "adapter/",
            "modules": [{"module": f"model.layers.{i // 2}.self_attn.{'qv'[i % 2]}_proj",
                         "channels": [rng.gauss(0, 2) for _ in range(rank)]} for i in range(modules)]}


def read_png(path: Path):
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(path)


def assert_drawn(path: Path):
    """A real PNG of sane size, below the cap, with a heatmap on it (not a blank canvas)."""
    img = read_png(path)
    h, w = img.shape[:2]
    assert 200 < h < 2000 and 200 < w < 2000, img.shape
    rgb = img[..., :3]
    packed = (np.round(rgb * 255).astype(np.int64) * [65536, 256, 1]).sum(axis=-1)   # one int per colour
    assert len(np.unique(packed)) > 20
    assert float(rgb.std()) > 0.05
    return img


def coloured_pixels(img) -> int:
    """Clearly red or blue pixels: heatmap cells (and the colour bar) but no text, grey or white."""
    return int((np.abs(img[..., 0] - img[..., 2]) > 0.25).sum())


def heatmap_pixels(img) -> int:
    """Coloured pixels above the colour bar (which sits in the bottom fifth)."""
    return coloured_pixels(img[: int(img.shape[0] * 0.75)])


def grey_pixels(img, tol=1.5 / 255) -> int:
    """Pixels in the NaN colour; a few hundred come from antialiased text and lines anyway,
    one NaN cell of a small heatmap adds thousands."""
    return int((np.abs(img[..., :3] - np.array(LIGHTGREY)) <= tol).all(axis=-1).sum())


def test_dense_model(tmp_path):
    out = plot_pattern(model_report(), tmp_path / "pattern.png")
    assert out == tmp_path / "pattern.png" and isinstance(out, Path)
    img = assert_drawn(out)
    assert grey_pixels(img) < 1000                 # every cell has a value: no grey cell
    assert heatmap_pixels(img) > 5000              # the cells are drawn, not just the colour bar


def test_str_path_and_title(tmp_path):
    out = plot_pattern(model_report(), str(tmp_path / "p.png"), title="my title")
    assert out == tmp_path / "p.png"
    assert_drawn(out)


def test_moe_and_dead_units_are_grey(tmp_path):
    report = model_report(layers=6, heads=4, experts=lambda i: 4 if i % 2 else 1, kinds=("qk", "vo", "ffn", "norm"))
    report["layers"][0]["qk"]["heads"][1] = None          # a dead kv head
    del report["layers"][2]["norm"]                        # a layer without norms
    img = assert_drawn(plot_pattern(report, tmp_path / "moe.png"))
    assert grey_pixels(img) > 3000                         # NaN cells drawn grey

    panels = _panels(report)
    assert list(panels) == ["qk", "vo", "ffn", "norm"]
    ffn = panels["ffn"]["rows"]
    assert [len(r) for r in ffn] == [4] * 6                # dense rows padded to the widest
    assert math.isfinite(ffn[0][0]) and all(math.isnan(x) for x in ffn[0][1:])
    assert all(math.isfinite(x) for x in ffn[1])
    assert panels["ffn"]["xlabel"] == "expert" and panels["qk"]["xlabel"] == "kv head"
    assert math.isnan(panels["qk"]["rows"][0][1])
    assert all(math.isnan(x) for x in panels["norm"]["rows"][2])
    assert panels["qk"]["labels"] == [str(i) for i in range(6)]


def test_dense_ffn_axis_label():
    assert _panels(model_report())["ffn"]["xlabel"] == "ffn"


def test_lora_adapter(tmp_path):
    report = lora_report()
    img = assert_drawn(plot_pattern(report, tmp_path / "lora.png"))
    assert grey_pixels(img) < 1000
    assert heatmap_pixels(img) > 5000
    panels = _panels(report)
    assert list(panels) == ["lora"] and panels["lora"]["xlabel"] == "rank channel"
    assert panels["lora"]["labels"][:2] == ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"]
    assert len(panels["lora"]["rows"]) == 12 and len(panels["lora"]["rows"][0]) == 8


def test_many_lora_modules(tmp_path):
    assert_drawn(plot_pattern(lora_report(modules=60, rank=16), tmp_path / "lora.png"))


def test_after_adds_a_row_of_panels_on_the_same_scale(tmp_path):
    """A nearly balanced "before" above a far-off "after": the image is taller than the
    "before" alone, and on the one shared scale the top row of panels is almost white while
    the bottom one is strongly coloured."""
    before = model_report(scale=0.3)
    one = read_png(plot_pattern(before, tmp_path / "one.png"))
    two = assert_drawn(plot_pattern(before, tmp_path / "two.png", after=model_report(scale=4, seed=5)))
    assert two.shape[0] > one.shape[0] * 1.4
    half = two.shape[0] // 2
    top, bottom = coloured_pixels(two[:half]), coloured_pixels(two[half:])
    assert bottom > 10000 and top < 0.1 * bottom, (top, bottom)


def test_shared_symmetric_colour_range():
    before = model_report(scale=1.0)
    before["layers"][1]["vo"]["heads"][0] = -3.25
    after = model_report(scale=0.01)
    after["layers"][0]["qk"]["heads"][0] = None
    assert _colour_range(_panels(before), _panels(after)) == 3.25
    after["layers"][2]["ffn"]["heads"][0] = 7.5
    assert _colour_range(_panels(before), _panels(after)) == 7.5      # "after" counts too
    tiny = model_report(scale=0.01)
    assert _colour_range(_panels(tiny)) == 0.5                         # at least 0.5


def test_large_model_stays_below_the_cap(tmp_path):
    wide = model_report(layers=6, heads=8, experts=lambda i: 128)
    img = read_png(plot_pattern(wide, tmp_path / "wide.png"))
    assert 1500 < img.shape[1] <= 2000 and img.shape[0] < 1000          # grows with the columns, capped
    deep = model_report(layers=400, heads=8, experts=lambda i: 128, kinds=("qk", "vo", "ffn", "norm"))
    panels = _panels(deep)
    width, height = _figure_size(panels, 2)                              # (a 1950 x 1950 render is slow)
    assert max(width, height) * DPI <= 2000 and min(width, height) * DPI > 1500
    assert _figure_size(_panels(model_report(layers=8)), 2)[1] < height  # grows with the layers


def test_empty_report_is_an_error(tmp_path):
    with pytest.raises(WiscaError, match="nothing|no layers"):
        plot_pattern({"architecture": "llama", "source": "x/", "layers": []}, tmp_path / "e.png")
    assert not (tmp_path / "e.png").exists()


def test_missing_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(WiscaError, match="matplotlib"):
        plot_pattern(model_report(), tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_unwritable_path(tmp_path):
    missing = tmp_path / "no-such-dir" / "p.png"
    with pytest.raises(WiscaError, match="cannot write the plot") as e:
        plot_pattern(model_report(), missing)
    assert str(missing) in str(e.value)
    with pytest.raises(WiscaError, match="cannot write the plot"):
        plot_pattern(model_report(), tmp_path)                 # a directory


def test_import_does_not_load_matplotlib():
    code = "import sys, wisca_cli.plot; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr
