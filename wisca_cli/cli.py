"""The `wisca` command line: a thin shell over wisca_cli.api.

Exit codes: 0 success, 1 verification failed, 2 bad usage or input (one line on stderr),
3 internal error (a bug: please report it), 130/143 interrupted (SIGINT/SIGTERM).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from . import __version__
from .errors import VerificationFailed, WiscaError
from .prefetch import warm_start

out = Console()
err = Console(stderr=True)

app = typer.Typer(
    name="wisca", no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    help=(
        "Bit-exact WISCA weight-scaling transitions for Hugging Face safetensors checkpoints.\n\n"
        "Rescales weight pairs (Q/K, V/O, FFN up/down) by s and 1/s so the model computes the same "
        "function with a balanced weight pattern, verifies that on probe tokens, and only then "
        "writes the output.\n\n"
        "[b]Examples[/b]\n\n"
        "  wisca transform sample_checkpoints/tiny-gqa-llama out/tiny-wisca\n\n"
        "  wisca inspect out/tiny-wisca\n\n"
        "  wisca verify sample_checkpoints/tiny-gqa-llama out/tiny-wisca\n\n"
        "  wisca undo out/tiny-wisca out/tiny-restored\n\n"
        "Exit codes: 0 ok, 1 verification failed, 2 bad usage or input, 3 internal error, "
        "130/143 interrupted."
    ),
)


def _version(value: bool) -> None:
    if value:
        out.print(f"wisca {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


# -- shared helpers ---------------------------------------------------------------------------
@contextmanager
def _progress(total_bytes: int | None, enabled: bool):
    """A rich progress bar over bytes streamed, on stderr, only on a terminal."""
    show = enabled and err.is_terminal
    bar = Progress(TextColumn("{task.description:<12}"), BarColumn(), DownloadColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True,
                   disable=not show)
    with bar:
        task = bar.add_task("reading", total=total_bytes)

        def advance(nbytes: int, label: str) -> None:
            bar.update(task, advance=nbytes, description=label)

        yield advance


def _total_bytes(src: str) -> int | None:
    try:
        from .checkpoint import open_checkpoint
        ckpt = open_checkpoint(src)
        ckpt.close()
        return ckpt.total_bytes
    except WiscaError:
        return None


def _emit_json(report: dict, json_out: bool, report_file: Optional[Path]) -> None:
    text = json.dumps(report, indent=1)
    if report_file:
        try:
            report_file.write_text(text + "\n")
        except OSError as e:
            raise WiscaError(f"{report_file}: cannot write the report: {e.strerror}") from e
    if json_out:
        out.print_json(text) if out.is_terminal else print(text)


def _verification_line(v: dict | None) -> Text:
    if v is None:
        return Text("! not verified (--no-verify)", style="yellow")
    if "products" in v:
        return _adapter_verification_line(v)
    what = "bit-identical" if v["identical"] else (
        f"max |Δ| {v['max_abs_diff']:.3g}, rel {v['rel_diff']:.2g}, KL {v['kl']:.2g}, top-1 {v['top1']:.3f}")
    if v["passed"]:
        return Text(f"✓ verified ({v['mode']}): logits {what} on {v['tokens']} probe tokens", style="green")
    layer = v["first_diverging_layer"]
    at = "logits" if layer is None else ("embeddings" if layer < 0 else f"layer {layer}")
    return Text(f"✗ verification failed ({v['mode']}): {what}; first divergence at {at}", style="bold red")


def _adapter_verification_line(v: dict) -> Text:
    """A LoRA adapter's check: every module's B A product, and base + adapter logits with --base."""
    p, b = v["products"], v.get("base")
    what = "bit-identical" if v["identical"] else f"max rel diff {p['max_rel_diff']:.2g}"
    checked = f"B A of {p['modules']} modules"
    if b:
        checked += f" and base + adapter logits on {b['tokens']} probe tokens"
    if v["passed"]:
        return Text(f"✓ verified ({v['mode']}): {checked} {what}", style="green")
    at = f"module {p['first_failing_module']}" if p["first_failing_module"] else "the base model's logits"
    return Text(f"✗ verification failed ({v['mode']}): {checked}; first divergence at {at}", style="bold red")


def _print_training_state(report: dict, json_out: bool) -> None:
    """The optimizer state's fate; a state left untransformed is a warning on stderr, always."""
    opt = (report.get("training_state") or {}).get("optimizer")
    if not opt:
        return
    if not opt["transformed"]:
        err.print(f"warning: {opt['warning']}", style="bold yellow", markup=False, highlight=False, soft_wrap=True)
    elif not json_out:
        what = opt.get("note") or (f"{opt['tensors']} moments of {opt['scaled_parameters']} parameters rescaled "
                                   f"({opt['optimizer']}, {opt['format']}{', exact' if opt['exact'] else ''})")
        out.print(Text(f"✓ optimizer state {opt['file']}: {what}", style="green"))


def _imbalance_table(summary: dict, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("pair", "units", "imbalance before", "after", "log2 scale range", "dead", "clamped"):
        table.add_column(col, justify="left" if col == "pair" else "right")
    for kind, s in summary.items():
        table.add_row(kind, str(s["units"]), f"{s['imbalance_before']:.3f}", f"{s['imbalance_after']:.3f}",
                      f"[{s['log2_scale_min']:+.0f}, {s['log2_scale_max']:+.0f}]"
                      if float(s['log2_scale_min']).is_integer() and float(s['log2_scale_max']).is_integer()
                      else f"[{s['log2_scale_min']:+.2f}, {s['log2_scale_max']:+.2f}]",
                      str(s["dead"]), str(s["clamped"]))
    table.caption = "imbalance = mean |log2(||A|| / ||B||)| over units (0 = balanced)"
    return table


def _import_api():
    """Import the API (and torch, most of the start-up time) with the garbage collector off,
    then freeze what the import made: a second less of collections over objects that live
    for the whole run, during start-up and again at exit."""
    import gc

    gc.disable()
    try:
        from . import api
    finally:
        gc.freeze()
        gc.enable()
    return api


def _split_targets(targets: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in targets.split(",") if t.strip())


# -- commands ---------------------------------------------------------------------------------
@app.command(epilog=(
    "[b]Examples[/b]\n\n"
    "  wisca transform ckpt/ ckpt-wisca/                  # pow2 scales, bit-exact, verified\n\n"
    "  wisca transform org/model out/ --revision main     # a hub repo id (cache, HF_HUB_OFFLINE honoured)\n\n"
    "  wisca transform ckpt/ out/ --scales continuous --granularity head --strength 0.5\n\n"
    "  wisca transform ckpt/ out/ --json --report wisca-report.json   # for CI"))
def transform(
    src: str = typer.Argument(..., help="Checkpoint folder (config.json + safetensors) or hub repo id."),
    dst: Path = typer.Argument(..., help="Output folder; must not exist (unless --overwrite)."),
    targets: str = typer.Option("qk,vo,ffn", help="Comma-separated pair kinds: qk, vo, ffn, norm (norm -> linear, off by default)."),
    granularity: str = typer.Option("channel", help="One scale per layer, head (kv group) or channel."),
    norm: str = typer.Option("fro", help="Balance Frobenius norms (fro) or per-element RMS (rms)."),
    strength: float = typer.Option(1.0, help="Use s**strength; 0 = identity, 1 = fully balanced."),
    scales: str = typer.Option("pow2", help="pow2 (bit-exact) or continuous (exact balance, rounds)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check logits before committing."),
    probe_batch: int = typer.Option(2, help="Probe sequences."),
    probe_len: int = typer.Option(32, help="Tokens per probe sequence."),
    seed: int = typer.Option(0, help="Seed of the random probe tokens."),
    probe_ids: Optional[Path] = typer.Option(None, help="File of probe token ids (JSON rows or lines)."),
    max_kl: Optional[float] = typer.Option(None, help="Tolerance mode: max mean KL (default by dtype)."),
    min_top1: Optional[float] = typer.Option(None, help="Tolerance mode: min top-1 agreement."),
    max_rel: Optional[float] = typer.Option(None, help="Tolerance mode: max |Δlogit| / max |logit|."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)."),
    base: Optional[Path] = typer.Option(None, help="LoRA adapter SRC: the base model folder; also compare "
                                                   "base + adapter logits before and after."),
    overwrite: bool = typer.Option(False, help="Replace DST (the old one stays until the new one verified)."),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON report instead of tables."),
    report: Optional[Path] = typer.Option(None, help="Also write the JSON report to this file."),
) -> None:
    """Balance a checkpoint's weight pattern, verify it computes the same function, write it."""
    warm_start(src)   # the disk starts on the checkpoint while torch imports
    api = _import_api()
    from .verify import DEFAULT_TOLERANCE, Tolerance

    tolerance = None
    if any(x is not None for x in (max_kl, min_top1, max_rel)):
        base = DEFAULT_TOLERANCE["F32"]
        tolerance = Tolerance(max_kl if max_kl is not None else base.max_kl,
                              min_top1 if min_top1 is not None else base.min_top1,
                              max_rel if max_rel is not None else base.max_rel)
    options = api.TransformOptions(
        targets=_split_targets(targets), granularity=granularity, norm=norm, strength=strength,
        scales=scales, verify=verify, probe_batch=probe_batch, probe_len=probe_len, seed=seed,
        probe_ids_file=str(probe_ids) if probe_ids else None, tolerance=tolerance,
        overwrite=overwrite, revision=revision, base=str(base) if base else None)
    options.check()
    if not verify:
        err.print("[yellow]warning: --no-verify: the output is written without checking that it "
                  "computes the same function[/yellow]", soft_wrap=True)
    try:
        with _progress(_total_bytes(src) if err.is_terminal else None, not json_out) as advance:
            result = api.transform(src, dst, options, progress=advance)
    except VerificationFailed as e:
        if e.report:
            _emit_json(e.report, json_out, report)
            if not json_out:
                err.print(_verification_line(e.report.get("verification")))
        raise
    _emit_json(result, json_out, report)
    if not json_out:
        if result.get("note"):
            out.print(f"[yellow]{result['note']}[/yellow]")
        out.print(_imbalance_table(result["summary"], f"wisca transform: {result['architecture']} "
                                   f"({result['dtype']}), {result['options']['scales']} scales, "
                                   f"{result['options']['granularity']} granularity"))
        for t in result["targets_not_applicable"]:
            out.print(f"[yellow]target {t}: not applicable to {result['architecture']}[/yellow]")
        out.print(_verification_line(result["verification"]))
    _print_training_state(result, json_out)
    if not json_out:
        out.print(f"wrote {result['output']} in {result['seconds']:.1f} s; undo with: "
                  f"wisca undo {result['output']} RESTORED")


@app.command(epilog=(
    "[b]Examples[/b]\n\n"
    "  wisca verify ckpt/ ckpt-wisca/            # exit 0 if equivalent, 1 if not\n\n"
    "  wisca verify ckpt/ other/ --mode tolerance --max-kl 1e-4 --json"))
def verify(
    a: str = typer.Argument(..., help="Reference checkpoint (folder or hub repo id)."),
    b: str = typer.Argument(..., help="Checkpoint to compare (folder)."),
    mode: str = typer.Option("auto", help="exact, tolerance, or auto (exact unless B's wisca record "
                                         "says continuous scales)."),
    probe_batch: int = typer.Option(2, help="Probe sequences."),
    probe_len: int = typer.Option(32, help="Tokens per probe sequence."),
    seed: int = typer.Option(0, help="Seed of the random probe tokens."),
    probe_ids: Optional[Path] = typer.Option(None, help="File of probe token ids (JSON rows or lines)."),
    max_kl: Optional[float] = typer.Option(None, help="Tolerance mode: max mean KL (default by dtype)."),
    min_top1: Optional[float] = typer.Option(None, help="Tolerance mode: min top-1 agreement."),
    max_rel: Optional[float] = typer.Option(None, help="Tolerance mode: max |Δlogit| / max |logit|."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of A."),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON report."),
    report: Optional[Path] = typer.Option(None, help="Also write the JSON report to this file."),
) -> None:
    """Check that two checkpoints compute the same function (streamed, layer by layer)."""
    warm_start(a, b)
    api = _import_api()
    from .verify import DEFAULT_TOLERANCE, Tolerance

    tolerance = None
    if any(x is not None for x in (max_kl, min_top1, max_rel)):
        base = DEFAULT_TOLERANCE["F32"]
        tolerance = Tolerance(max_kl if max_kl is not None else base.max_kl,
                              min_top1 if min_top1 is not None else base.min_top1,
                              max_rel if max_rel is not None else base.max_rel)
    with _progress(None, not json_out) as advance:
        result = api.verify(a, b, mode=mode, probe_batch=probe_batch, probe_len=probe_len, seed=seed,
                            probe_ids_file=str(probe_ids) if probe_ids else None, tolerance=tolerance,
                            progress=advance, revision=revision)
    _emit_json(result, json_out, report)
    v = result["verification"]
    if not json_out:
        out.print(_verification_line(v))
    if not v["passed"]:
        raise typer.Exit(1)


def _heat(values: list[float] | None) -> Text:
    """A colour map of per-head log2 ratios: blue = A smaller, red = A larger."""
    text = Text()
    for v in values or []:
        mag = min(abs(v) / 2.0, 1.0)
        level = int(round(mag * 4))
        style = ("red" if v > 0 else "blue") if level else "green"
        text.append(" ▁▃▅▇"[level] if level else "·", style=style)
    return text


@app.command(epilog=(
    "[b]Examples[/b]\n\n"
    "  wisca inspect ckpt/                       # per-layer table with per-head colour map\n\n"
    "  wisca inspect ckpt/ --granularity head --json"))
def inspect(
    src: str = typer.Argument(..., help="Checkpoint folder or hub repo id."),
    granularity: str = typer.Option("channel", help="Units averaged: layer, head or channel."),
    norm: str = typer.Option("fro", help="fro or rms."),
    targets: str = typer.Option("qk,vo,ffn", help="Pair kinds to show."),
    revision: Optional[str] = typer.Option(None, help="Hub revision."),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON report."),
    report: Optional[Path] = typer.Option(None, help="Also write the JSON report to this file."),
) -> None:
    """Show the weight pattern: per layer and pair kind, the imbalance log2(||A|| / ||B||)."""
    api = _import_api()

    with _progress(None, not json_out) as advance:
        result = api.inspect(src, granularity=granularity, norm=norm, targets=_split_targets(targets),
                             revision=revision, progress=advance)
    _emit_json(result, json_out, report)
    if json_out:
        return
    kinds = list(result["summary"])
    table = Table(title=f"weight pattern of {result['source']} ({result['architecture']}, "
                        f"{granularity} granularity, {norm} norm)", title_justify="left")
    table.add_column("layer", justify="right")
    for kind in kinds:
        table.add_column(f"{kind} mean|log2|", justify="right")
        if kind != "ffn":
            table.add_column(f"{kind} per head", justify="left")
    for entry in result["layers"]:
        row = [str(entry["layer"])]
        for kind in kinds:
            e = entry[kind]
            row.append(f"{e['mean_abs_log2']:.3f}")
            if kind != "ffn":
                row.append(_heat(e["heads"]))
        table.add_row(*row)
    table.add_row("all", *[x for k in kinds for x in
                           ([f"{result['summary'][k]['mean_abs_log2']:.3f}"] + ([""] if k != "ffn" else []))],
                  style="bold")
    table.caption = "per head: · balanced, ▁▃▅▇ |log2| up to 2+; red = A (q/v) larger, blue = B (k/o) larger"
    out.print(table)


@app.command(epilog="[b]Example[/b]\n\n  wisca undo ckpt-wisca/ ckpt-restored/")
def undo(
    transformed: str = typer.Argument(..., help="A folder written by wisca transform."),
    restored: Path = typer.Argument(..., help="Output folder for the restored checkpoint."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check logits before committing."),
    overwrite: bool = typer.Option(False, help="Replace RESTORED if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON report."),
) -> None:
    """Undo a transform with its recorded scales (bit-exact for pow2 scales)."""
    warm_start(transformed)
    api = _import_api()

    with _progress(_total_bytes(transformed) if err.is_terminal else None, not json_out) as advance:
        result = api.undo(transformed, restored, overwrite=overwrite, verify=verify, progress=advance)
    _emit_json(result, json_out, None)
    if not json_out:
        out.print(_verification_line(result["verification"]))
    _print_training_state(result, json_out)
    if not json_out:
        out.print(f"restored {result['output']} in {result['seconds']:.1f} s")


# -- entry point ------------------------------------------------------------------------------
class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised so that cleanup (temporary output) runs.

    Not a KeyboardInterrupt: Typer would turn that into a silent exit.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    raise Interrupted(signum)


def _typer_click(name: str) -> tuple:
    """Newer typer bundles its own copy of click: catch its exceptions too."""
    try:
        from typer._click import exceptions as bundled
    except ImportError:
        return ()
    cls = getattr(bundled, name, None)
    return (cls,) if isinstance(cls, type) else ()


def main(argv: list[str] | None = None) -> None:
    """The ``wisca`` command: run, flush, and leave without the interpreter's teardown.

    Once the output is committed (fsynced and renamed) and the report flushed there is
    nothing left to clean up, and tearing down torch's modules takes half a second.
    Use ``run(argv)`` to get the exit code without leaving the process.
    """
    code = run(argv)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe (wisca ... | head): nothing to save
            pass
    os._exit(code)


def run(argv: list[str] | None = None) -> int:
    """The CLI's work; returns the exit code (0 ok, 1 verification failed, 2 bad input,
    3 internal error, 128 + N for signal N)."""
    from .memory import tune_allocator

    tune_allocator()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    code = 0
    try:
        rv = app(args=argv, standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except VerificationFailed as e:
        err.print(f"error: {e}", style="red", markup=False, highlight=False, soft_wrap=True)
        code = 1
    except WiscaError as e:
        err.print(f"error: {e}", style="red", markup=False, highlight=False, soft_wrap=True)
        code = e.exit_code
    except (click.exceptions.Exit, *_typer_click("Exit")) as e:
        code = e.exit_code
    except (click.exceptions.Abort, *_typer_click("Abort")):
        err.print("interrupted", style="red")
        code = 130
    except (click.ClickException, *_typer_click("ClickException")) as e:
        e.show()
        code = e.exit_code
    except (KeyboardInterrupt, Interrupted) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        err.print(f"{signal.Signals(signum).name}: interrupted, no output written", style="red")
        code = 128 + signum
    except Exception as e:  # a bug: one line, the traceback on request
        if os.environ.get("WISCA_DEBUG"):
            raise
        msg = " ".join(str(e).split())[:300]
        err.print(f"internal error: {type(e).__name__}: {msg} (set WISCA_DEBUG=1 for the traceback; "
                  f"please report it)", style="red", markup=False, highlight=False, soft_wrap=True)
        code = 3
    return code
