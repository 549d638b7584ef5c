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
from .errors import VerificationFailed, WiscaError, reason
from .options import OPTIONS, OptionError, flag_of
from .output import COMMITTED, remove_staged
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
    """A rich progress bar over bytes streamed, on stderr, only on a terminal; it starts with
    the first bytes, so an error found up front prints its one line and nothing else."""
    show = enabled and err.is_terminal
    bar = Progress(TextColumn("{task.description:<12}"), BarColumn(), DownloadColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True,
                   disable=not show)
    task = bar.add_task("reading", total=total_bytes)
    started = []

    def advance(nbytes: int, label: str) -> None:
        if not started:
            started.append(bar.start())
        bar.update(task, advance=nbytes, description=label)

    try:
        yield advance
    finally:
        if started:
            bar.stop()


def _total_bytes(src: str) -> int | None:
    try:
        from .dcp import is_dcp, open_dcp
        if is_dcp(src):
            ckpt = open_dcp(src, None)
            ckpt.close()
            return sum(e.nbytes for e in ckpt.weights.values())
        from .checkpoint import open_checkpoint
        ckpt = open_checkpoint(src)
        ckpt.close()
        return ckpt.total_bytes
    except WiscaError:
        return None


def _other_rank() -> bool:
    """A torchrun rank other than 0: it works, rank 0 speaks for the job."""
    return os.environ.get("RANK", "0") != "0"


def _emit_json(report: dict, json_out: bool, report_file: Optional[Path]) -> None:
    if _other_rank():
        return
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
    """The optimizer state's fate; a state left out (--training-state drop) is a note on stderr, always."""
    opt = (report.get("training_state") or {}).get("optimizer")
    if not opt:
        return
    if opt.get("dropped"):
        err.print(f"note: --training-state drop: {', '.join(opt['dropped'])} left out of the output; "
                  f"{opt['resume']}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    elif not json_out:
        for opt in (opt, report["training_state"].get("universal")):
            if not opt:
                continue
            if opt.get("engine"):   # DeepSpeed: which entries, of how many parameters, in which files
                kinds = [k for k, v in opt["accounting"].items() if v["scaled"]]
                what = (f"{', '.join(kinds)} of {opt['scaled_parameters']} parameters rescaled in "
                        f"{len(opt['files'])} files ({opt['engine']}{', exact' if opt['exact'] else ''})")
            else:
                what = opt.get("note") or (f"{opt['tensors']} moments of {opt['scaled_parameters']} parameters "
                                           f"rescaled ({opt['optimizer']}, {opt['format']}"
                                           f"{', exact' if opt['exact'] else ''})")
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


def _flag(name: str):
    """A typer option built from the options table (default, choices, help), so the CLI and
    the Python API state each option once."""
    opt = OPTIONS[name]
    decls = [f"{opt.cli_flag}/--no-{opt.cli_flag[2:]}"] if name == "verify" else [opt.cli_flag]
    kw = {}
    if opt.choices and opt.kind != "list":
        kw["metavar"] = "[" + "|".join(opt.choices) + "]"
    elif opt.kind == "path":
        kw["metavar"] = "PATH"
    elif opt.kind in ("int", "float") and (opt.lo is not None or opt.hi is not None):
        rng = opt._range()
        kw["metavar"] = f"{opt.kind.upper()} {rng}" if rng.startswith(">") else f"{opt.kind.upper()} in {rng}"
    return typer.Option(opt.cli_default, *decls, help=opt.help, show_default=opt.default is not None, **kw)


JSON_FLAG = typer.Option(False, "--json", help="Print the JSON report on stdout instead of tables.")
REPORT_FLAG = typer.Option(None, help=OPTIONS["report"].help, metavar="PATH")


def _check_report(report: Optional[Path]) -> None:
    """Refuse a --report path that cannot be written before any work is done."""
    if report is not None and not report.parent.is_dir():
        raise OptionError("report", f"{report}: folder {report.parent} does not exist")
    if report is not None and report.is_dir():
        raise OptionError("report", f"{report}: is a folder")


def _given(ctx: typer.Context) -> dict:
    """The options the user typed (not left at their defaults), by API field name: the API
    applies its own defaults to the rest and warns about given options the input does not use."""
    out = {}
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)
        if name in OPTIONS and name != "report" and source is not None and \
                source.name not in ("DEFAULT", "DEFAULT_MAP"):
            out[name] = value
    return out


def _print_warnings(result: dict) -> None:
    for w in result.get("warnings") or []:
        err.print(f"warning: {flag_of(w['option'])}: {w['message']}", style="yellow", markup=False,
                  highlight=False, soft_wrap=True)


# -- commands ---------------------------------------------------------------------------------
@app.command(epilog=(
    "[b]Examples[/b]\n\n"
    "  wisca transform ckpt/ ckpt-wisca/                  # pow2 scales, bit-exact, verified\n\n"
    "  wisca transform org/model out/ --revision main     # a hub repo id (cache, HF_HUB_OFFLINE honoured)\n\n"
    "  wisca transform ckpt/ out/ --scales continuous --granularity head --strength 0.5 --max-kl 1e-4\n\n"
    "  wisca transform adapter/ adapter-wisca/ --base base-model/   # a PEFT LoRA adapter\n\n"
    "  wisca transform ckpt/ out/ --json --report wisca-report.json   # for CI\n\n"
    "  wisca transform checkpoint-500/ out/ --training-state drop   # weights only, no optimizer state\n\n"
    "  wisca transform checkpoint-500/ out/   # Trainer + DeepSpeed ZeRO: global_step500/ rescaled too\n\n"
    "  wisca transform ds_ckpt/ out/ --config config.json   # a bare DeepSpeed save_checkpoint folder\n\n"
    "  wisca transform step-1000/ step-1000-wisca/ --config config.json   # torch.distributed checkpoint\n\n"
    "  torchrun --nproc-per-node 8 -m wisca_cli transform checkpoint-500/ out/   # split across ranks"))
def transform(
    ctx: typer.Context,
    src: str = typer.Argument(..., help="Checkpoint folder (config.json + safetensors), torch.distributed "
                                        "checkpoint folder (.metadata), LoRA adapter folder or hub repo id."),
    dst: Path = typer.Argument(..., help="Output folder; must not exist (unless --overwrite)."),
    targets: str = _flag("targets"),
    granularity: str = _flag("granularity"),
    norm: str = _flag("norm"),
    strength: float = _flag("strength"),
    scales: str = _flag("scales"),
    verify: bool = _flag("verify"),
    probe_batch: int = _flag("probe_batch"),
    probe_len: int = _flag("probe_len"),
    seed: int = _flag("seed"),
    probe_ids_file: Optional[str] = _flag("probe_ids_file"),
    max_kl: Optional[float] = _flag("max_kl"),
    min_top1: Optional[float] = _flag("min_top1"),
    max_rel: Optional[float] = _flag("max_rel"),
    revision: Optional[str] = _flag("revision"),
    base: Optional[str] = _flag("base"),
    config: Optional[str] = _flag("config"),
    training_state: str = _flag("training_state"),
    overwrite: bool = _flag("overwrite"),
    json_out: bool = JSON_FLAG,
    report: Optional[Path] = REPORT_FLAG,
) -> None:
    """Balance a checkpoint's weight pattern, verify it computes the same function, write it."""
    warm_start(src)   # the disk starts on the checkpoint while torch imports
    _check_report(report)
    api = _import_api()
    given = _given(ctx)
    options = api.TransformOptions.build(**given)
    if not options.verify:
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
    _print_warnings(result)
    _emit_json(result, json_out, report)
    if not json_out:
        if result.get("note"):
            out.print(f"[yellow]{result['note']}[/yellow]")
        out.print(_imbalance_table(result["summary"], f"wisca transform: {result['architecture']} "
                                   f"({result['dtype']}), {result['options']['scales']} scales, "
                                   f"{result['options']['granularity']} granularity"))
        for t in result["targets_not_applicable"]:
            out.print(f"[yellow]target {t}: not applicable to {result['architecture']}[/yellow]")
        for t in result.get("other_towers") or []:   # a multimodal checkpoint: only its language model changes
            out.print(f"{t['module']}: {t['tensors']} tensors ({t['bytes'] / 2**20:.1f} MiB) copied byte for byte "
                      f"(not part of the language model)")
        out.print(_verification_line(result["verification"]))
    _print_training_state(result, json_out)
    if not json_out:
        out.print(f"wrote {result['output']} in {result['seconds']:.1f} s; undo with: "
                  f"wisca undo {result['output']} RESTORED")


@app.command(epilog=(
    "[b]Examples[/b]\n\n"
    "  wisca verify ckpt/ ckpt-wisca/            # exit 0 if equivalent, 1 if not\n\n"
    "  wisca verify ckpt/ other/ --mode tolerance --max-kl 1e-4 --json\n\n"
    "  wisca verify adapter/ adapter-wisca/      # two LoRA adapters: every module's B A product"))
def verify(
    ctx: typer.Context,
    a: str = typer.Argument(..., help="Reference checkpoint (folder or hub repo id) or LoRA adapter folder."),
    b: str = typer.Argument(..., help="Checkpoint (or adapter) folder to compare."),
    mode: str = _flag("mode"),
    probe_batch: int = _flag("probe_batch"),
    probe_len: int = _flag("probe_len"),
    seed: int = _flag("seed"),
    probe_ids_file: Optional[str] = _flag("probe_ids_file"),
    max_kl: Optional[float] = _flag("max_kl"),
    min_top1: Optional[float] = _flag("min_top1"),
    max_rel: Optional[float] = _flag("max_rel"),
    revision: Optional[str] = _flag("revision"),
    config: Optional[str] = _flag("config"),
    json_out: bool = JSON_FLAG,
    report: Optional[Path] = REPORT_FLAG,
) -> None:
    """Check that two checkpoints compute the same function (streamed, layer by layer)."""
    warm_start(a, b)
    _check_report(report)
    api = _import_api()
    given = _given(ctx)
    with _progress(None, not json_out) as advance:
        result = api.verify(a, b, progress=advance, **given)
    _print_warnings(result)
    _emit_json(result, json_out, report)
    v = result["verification"]
    if not json_out:
        out.print(_verification_line(v))
    if not v["passed"]:
        raise typer.Exit(1)


def _heat(values: list[float | None] | None) -> Text:
    """A colour map of per-head log2 ratios: blue = A smaller, red = A larger."""
    text = Text()
    for v in values or []:
        if v is None:
            text.append("×", style="dim")
            continue
        mag = min(abs(v) / 2.0, 1.0)
        level = int(round(mag * 4))
        style = ("red" if v > 0 else "blue") if level else "green"
        text.append(" ▁▃▅▇"[level] if level else "·", style=style)
    return text


HEAT_CAPTION = "· balanced, ▁▃▅▇ |log2| up to 2+, × dead; red = A (q/v/up/norm, lora_A) larger, blue = B larger"


def _pattern_table(result: dict, granularity: str, norm: str) -> Table:
    kinds = list(result["summary"])
    table = Table(title=f"weight pattern of {result['source']} ({result['architecture']}, "
                        f"{granularity} granularity, {norm} norm)", title_justify="left")
    table.add_column("layer", justify="right")
    per_head = {k: any(len(e[k]["heads"] or []) > 1 for e in result["layers"] if k in e) for k in kinds}
    for kind in kinds:
        table.add_column(f"{kind} mean|log2|", justify="right")
        if per_head[kind]:
            table.add_column(f"{kind} per {'expert' if kind == 'ffn' else 'head'}", justify="left")
    for entry in result["layers"]:
        row: list = [str(entry["layer"])]
        for kind in kinds:
            e = entry.get(kind)
            row.append(f"{e['mean_abs_log2']:.3f}" if e else "–")
            if per_head[kind]:
                row.append(_heat(e["heads"]) if e else "")
        table.add_row(*row)
    table.add_row("all", *[x for k in kinds for x in
                           ([f"{result['summary'][k]['mean_abs_log2']:.3f}"] + ([""] if per_head[k] else []))],
                  style="bold")
    table.caption = "per head: " + HEAT_CAPTION
    return table


def _adapter_table(result: dict) -> Table:
    table = Table(title=f"weight pattern of {result['source']} (LoRA adapter, per rank channel, "
                        f"{result['norm']} norm)", title_justify="left")
    for col in ("module", "rank", "mean|log2|", "per rank channel"):
        table.add_column(col, justify="left" if col in ("module", "per rank channel") else "right")
    for m in result["modules"]:
        table.add_row(m["module"], str(m["rank"]), f"{m['mean_abs_log2']:.3f}", _heat(m["channels"]))
    table.add_row("all", "", f"{result['summary']['lora']['mean_abs_log2']:.3f}", "", style="bold")
    table.caption = HEAT_CAPTION
    return table


@app.command(epilog=(
    "[b]Examples[/b]\n\n"
    "  wisca inspect ckpt/                       # per-layer table with per-head colour map\n\n"
    "  wisca inspect ckpt/ --granularity head --json\n\n"
    "  wisca inspect ckpt-wisca/ --plot pattern.png   # heatmaps; before and after for a transformed folder\n\n"
    "  wisca inspect adapter/                    # a LoRA adapter: per module and rank channel"))
def inspect(
    ctx: typer.Context,
    src: str = typer.Argument(..., help="Checkpoint folder, LoRA adapter folder or hub repo id."),
    granularity: str = _flag("granularity"),
    norm: str = _flag("norm"),
    targets: str = _flag("targets"),
    revision: Optional[str] = _flag("revision"),
    plot: Optional[str] = _flag("plot"),
    config: Optional[str] = _flag("config"),
    json_out: bool = JSON_FLAG,
    report: Optional[Path] = REPORT_FLAG,
) -> None:
    """Show the weight pattern: per layer and pair kind, the imbalance log2(||A|| / ||B||)."""
    _check_report(report)
    api = _import_api()
    given = _given(ctx)
    with _progress(None, not json_out) as advance:
        result = api.inspect(src, progress=advance, **given)
    _print_warnings(result)
    _emit_json(result, json_out, report)
    if json_out:
        return
    if result.get("kind") == "lora-adapter":
        out.print(_adapter_table(result))
    else:
        out.print(_pattern_table(result, result["granularity"], result["norm"]))
        if result.get("before"):
            out.print("before the transform (from its record): mean |log2| " + ", ".join(
                f"{k} {v['mean_abs_log2']:.3f}" for k, v in result["before"]["summary"].items()))
    if result.get("plot"):
        out.print(f"plot: {result['plot']}")


@app.command(epilog="[b]Examples[/b]\n\n  wisca undo ckpt-wisca/ ckpt-restored/\n\n"
                    "  wisca undo adapter-wisca/ adapter-restored/ --json")
def undo(
    ctx: typer.Context,
    transformed: str = typer.Argument(..., help="A folder written by wisca transform (model or adapter)."),
    restored: Path = typer.Argument(..., help="Output folder for the restored checkpoint."),
    verify: bool = _flag("verify"),
    overwrite: bool = _flag("overwrite"),
    config: Optional[str] = _flag("config"),
    json_out: bool = JSON_FLAG,
    report: Optional[Path] = REPORT_FLAG,
) -> None:
    """Undo a transform with its recorded scales (bit-exact for pow2 scales)."""
    warm_start(transformed)
    _check_report(report)
    api = _import_api()
    given = _given(ctx)
    with _progress(_total_bytes(transformed) if err.is_terminal else None, not json_out) as advance:
        result = api.undo(transformed, restored, progress=advance, **given)
    _emit_json(result, json_out, report)
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


def _fail(message: str, code: int, details: list[str], argv: list[str] | None) -> int:
    """One line on stderr; with --json also the error as JSON on stdout; with WISCA_DEBUG=1
    the details (e.g. every parameter order tried) below the line."""
    err.print(f"error: {message}", style="red", markup=False, highlight=False, soft_wrap=True)
    if os.environ.get("WISCA_DEBUG"):
        for line in details:
            err.print(f"  detail: {line}", markup=False, highlight=False, soft_wrap=True)
    if "--json" in (sys.argv[1:] if argv is None else argv):
        print(json.dumps({"error": message, "exit_code": code, "details": details}, indent=1))
    return code


def _interrupted(signum: int) -> int:
    """A run ended by SIGINT or SIGTERM: remove what is not committed, say what is, 128 + N."""
    remove_staged()   # also a folder the signal caught between its creation and its cleanup
    name = signal.Signals(signum).name
    if COMMITTED:     # the signal came after the rename: the output is whole, only the report is missing
        err.print(f"{name}: interrupted after the output was complete: {COMMITTED[-1]} is in place, "
                  f"only the report was not printed", style="red", markup=False, highlight=False, soft_wrap=True)
    else:
        err.print(f"{name}: interrupted, no output written", style="red")
    return 128 + signum


def run(argv: list[str] | None = None) -> int:
    """The CLI's work; returns the exit code (0 ok, 1 verification failed, 2 bad input,
    3 internal error, 128 + N for signal N)."""
    from .memory import tune_allocator

    tune_allocator()
    COMMITTED.clear()   # this run's outputs only (run() may be called again in one process)
    if _other_rank():   # one voice per job: rank 0 prints the result or the first error of any rank
        sys.stdout = sys.stderr = open(os.devnull, "w")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:   # the ranks leave together, after rank 0 has spoken (``dcp_api.end_distributed``)
        from .dcp_api import defer_teardown
        defer_teardown()
    try:
        return _run_command(argv)
    finally:
        if distributed:
            from .dcp_api import end_distributed
            end_distributed()


def _run_command(argv: list[str] | None) -> int:
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
        message = f"{flag_of(e.field)}: {e.detail}" if isinstance(e, OptionError) else str(e)
        for field in e.fields:   # the library names option fields; the user typed flags
            message = message.replace(f"`{field}`", flag_of(field))
        code = _fail(message, e.exit_code, e.details, argv)
    except (click.exceptions.Exit, *_typer_click("Exit")) as e:
        code = e.exit_code
    except (click.exceptions.Abort, *_typer_click("Abort")):
        code = _interrupted(signal.SIGINT)
    except (click.ClickException, *_typer_click("ClickException")) as e:
        # one line, like every other error (click's own would add a usage block)
        hint = " (see --help)" if isinstance(e, (click.UsageError, *_typer_click("UsageError"))) else ""
        code = _fail(f"{' '.join(e.format_message().split())}{hint}", e.exit_code, [], argv)
    except (KeyboardInterrupt, Interrupted) as e:
        code = _interrupted(getattr(e, "signum", signal.SIGINT))
    except Exception as e:  # a bug: one line, the traceback on request
        if os.environ.get("WISCA_DEBUG"):
            raise
        msg = reason(e, 300)
        err.print(f"internal error: {type(e).__name__}: {msg} (set WISCA_DEBUG=1 for the traceback; "
                  f"please report it)", style="red", markup=False, highlight=False, soft_wrap=True)
        code = 3
    return code
