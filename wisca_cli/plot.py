"""Draw the weight pattern of a ``wisca inspect`` report as heatmaps to a PNG.

One panel per pair kind (qk, vo, ffn, norm; or "lora" for an adapter): rows are layers
(or adapter modules), columns are kv heads / experts / rank channels, and the colour is
the signed log2(||A|| / ||B||) of each unit on a diverging scale centred on balance (0).
With ``after``, a second row of panels shows the transformed checkpoint on the same scale.

matplotlib is imported only when a plot is drawn, so ``import wisca_cli.plot`` is cheap
and works without it.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from .errors import WiscaError

COLORBAR_LABEL = "log2(||A|| / ||B||)  (0 = balanced; red: A = q/v/up/norm larger)"
MIN_RANGE = 0.5          # the colour scale spans at least [-0.5, 0.5]
MAX_INCHES = 19.5        # at dpi 100 the PNG stays below 2000 x 2000 px
DPI = 100
MAX_TICKS = 40           # label every k-th row / column beyond this many


# -- the data: report -> panels ---------------------------------------------------------------
def _value(x) -> float:
    """A JSON value of the pattern as a float; None (a dead unit) is NaN."""
    return math.nan if x is None else float(x)


def _pad(rows: list[list[float]]) -> list[list[float]]:
    """Pad rows with NaN to the widest (at least one column, so an empty kind still draws)."""
    width = max([len(r) for r in rows] + [1])
    return [r + [math.nan] * (width - len(r)) for r in rows]


def _short_module(name: str) -> str:
    """model.layers.0.self_attn.q_proj -> layers.0.self_attn.q_proj (also peft's base_model.model.)."""
    for prefix in ("base_model.model.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _panels(report: dict) -> dict[str, dict]:
    """{kind: {"rows": [[float]], "labels": [str], "xlabel": str}} in the order kinds first appear."""
    if report.get("kind") == "lora-adapter":
        modules = report.get("modules") or []
        rows = [[_value(x) for x in (m.get("channels") or [])] for m in modules]
        if not rows:
            return {}
        return {"lora": {"rows": _pad(rows), "labels": [_short_module(str(m.get("module", "?"))) for m in modules],
                         "xlabel": "rank channel", "ylabel": "module"}}

    layers = report.get("layers") or []
    kinds: list[str] = []
    for entry in layers:
        kinds += [k for k, v in entry.items() if isinstance(v, dict) and k not in kinds]
    panels = {}
    for kind in kinds:
        # a layer without this kind is an empty row, padded to an all-NaN (grey) row
        rows = [[_value(x) for x in ((entry.get(kind) or {}).get("heads") or [])] for entry in layers]
        widest = max(len(r) for r in rows)
        xlabel = {"qk": "kv head", "vo": "kv head", "norm": "norm"}.get(kind, kind)
        if kind == "ffn":
            xlabel = "expert" if widest > 1 else "ffn"
        panels[kind] = {"rows": _pad(rows), "labels": [str(e.get("layer", i)) for i, e in enumerate(layers)],
                        "xlabel": xlabel, "ylabel": "layer"}
    return panels


def _colour_range(*panel_sets: dict) -> float:
    """max |finite value| over every panel, before and after, at least MIN_RANGE."""
    finite = [abs(x) for panels in panel_sets for p in panels.values() for row in p["rows"] for x in row
              if math.isfinite(x)]
    return max(finite + [MIN_RANGE])


# -- the figure -------------------------------------------------------------------------------
def _ticks(n: int) -> list[int]:
    """Every index up to MAX_TICKS items, else every k-th."""
    step = max(1, math.ceil(n / MAX_TICKS))
    return list(range(0, n, step))


def _widths(panels: dict) -> list[float]:
    """Relative panel widths: the number of columns, but no panel below a sixth of the widest
    (and two columns), so a 2-norm panel stays readable next to a 64-expert one."""
    n = [len(p["rows"][0]) for p in panels.values()]
    floor = max(2.0, max(n) / 6)
    return [max(float(x), floor) for x in n]


def _figure_size(panels: dict, n_rows: int) -> tuple[float, float]:
    """Inches that grow with columns and layers, capped at MAX_INCHES."""
    columns = sum(_widths(panels))
    label = max(len(s) for p in panels.values() for s in p["labels"])
    height_rows = max(len(p["rows"]) for p in panels.values())
    width = 1.0 + 0.07 * label + 1.0 * len(panels) + 0.3 * columns
    height = 1.6 + n_rows * (1.1 + 0.2 * min(height_rows, MAX_TICKS) + 0.05 * max(height_rows - MAX_TICKS, 0))
    return min(max(width, 6.0), MAX_INCHES), min(max(height, 3.5), MAX_INCHES)


def plot_pattern(report: dict, path: str | os.PathLike, after: dict | None = None,
                 title: str | None = None) -> Path:
    """Write the weight pattern of ``report`` (and of ``after``, below it) as a PNG to ``path``."""
    try:
        import matplotlib
        import numpy as np
        from matplotlib.figure import Figure
    except ImportError as e:
        raise WiscaError("`plot` needs matplotlib: pip install 'wisca-cli[plot]'", fields=("plot",)) from e
    if "matplotlib.pyplot" not in sys.modules:
        # no display needed; left alone if pyplot is already in use (switching would close its figures)
        matplotlib.use("Agg")

    source, arch = report.get("source", "?"), report.get("architecture", "?")
    before = _panels(report)
    if not before:
        raise WiscaError(f"{source}: the report has no layers or modules to plot")
    rows = [("before", before)]
    if after is not None:
        after_panels = _panels(after)
        if not after_panels:
            raise WiscaError(f"{after.get('source', '?')}: the report has no layers or modules to plot")
        rows.append(("after", after_panels))
    kinds = list(dict.fromkeys(k for _, panels in rows for k in panels))
    m = _colour_range(*(panels for _, panels in rows))

    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="lightgrey")     # NaN (dead, missing) grey
    norm = matplotlib.colors.Normalize(vmin=-m, vmax=m)

    merged = {k: next(p[k] for _, p in rows if k in p) for k in kinds}
    width, height = _figure_size(merged, len(rows))
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(rows), len(kinds), squeeze=False, gridspec_kw={"width_ratios": _widths(merged)})
    image = None
    for r, (when, panels) in enumerate(rows):
        labelled = False                     # rows are labelled on the leftmost drawn panel only
        for c, kind in enumerate(kinds):
            ax = axes[r][c]
            if kind not in panels:
                ax.set_axis_off()
                ax.set_title(f"{kind}: not in the {when} report", fontsize=9)
                continue
            p = panels[kind]
            data = np.array(p["rows"], dtype=float)
            image = ax.imshow(data, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
            ax.set_title(f"{kind} ({when})" if after is not None else kind, fontsize=10)
            ax.set_xlabel(p["xlabel"], fontsize=9)
            ys, xs = _ticks(data.shape[0]), _ticks(data.shape[1])
            ax.set_xticks(xs, [str(x) for x in xs], fontsize=7)
            if not labelled:
                ax.set_ylabel(p["ylabel"], fontsize=9)
                ax.set_yticks(ys, [p["labels"][y] for y in ys], fontsize=7)
                labelled = True
            else:
                ax.set_yticks(ys, [])        # same rows as the panel on the left
    # a bar about 0.2 in tall whatever the figure's size (the default 15 % of a tall figure
    # leaves a big gap and pushes the label off the bottom edge)
    fig.colorbar(image, ax=axes.ravel().tolist(), location="bottom", shrink=0.7, fraction=0.2 / height,
                 aspect=0.7 * width / 0.2,
                 label=COLORBAR_LABEL)
    fig.suptitle(title or f"weight pattern of {source} ({arch})", fontsize=11)
    try:
        fig.savefig(path, dpi=DPI, format="png")    # format given: no ".png" appended to the name
    except OSError as e:
        raise WiscaError(f"{path}: cannot write the plot: {e.strerror or e}") from e
    finally:
        fig.clear()
    return Path(path)
