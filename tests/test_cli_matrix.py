"""Every documented option of every command, on every input kind it accepts, in human mode
under a pseudo-terminal and in --json mode through a pipe.

The option list comes from the CLI itself (Typer's click command), so an option added
later without a case here fails ``test_every_option_has_cases``. Runs go through
``wisca_cli.cli.run`` in-process (the same code path as the ``wisca`` command, minus
``os._exit``), with stdout/stderr on a pty pair or on pipes; a few go through the real
entry point in a subprocess on a real pty.

Invariants for every run: the expected exit code (0, 1 only where the case is built to
fail verification, 2 for bad values), never 3, no traceback, --json output parses, and
a bad value gives exactly one line on stderr.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from conftest import REPO, SAMPLE, dcp_llama, make_config, synthetic_llama, unbalance

from wisca_cli.cli import app, run

os.environ.setdefault("COLUMNS", "120")

# -- running a command ----------------------------------------------------------------------------


class Result:
    def __init__(self, code: int, stdout: str, stderr: str):
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def lines(self) -> list[str]:
        return [ln for ln in self.stderr.replace("\r", "").splitlines() if ln.strip()]

    def __repr__(self):
        return f"rc={self.code}\n--- stdout\n{self.stdout[-2000:]}\n--- stderr\n{self.stderr[-2000:]}"


def _drain(fd: int, sink: list[bytes]) -> None:
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            return
        if not data:
            return
        sink.append(data)


def run_pipe(argv: list[str]) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run([str(a) for a in argv])
    return Result(code, out.getvalue(), err.getvalue())


def run_tty(argv: list[str]) -> Result:
    """stdout and stderr each on a pseudo-terminal: rich renders tables and progress bars."""
    streams, files, threads = [], [], []
    for _ in range(2):
        master, slave = pty.openpty()
        sink: list[bytes] = []
        t = threading.Thread(target=_drain, args=(master, sink), daemon=True)
        t.start()
        streams.append((master, slave, sink))
        files.append(os.fdopen(slave, "w", buffering=1, encoding="utf-8", closefd=False))
        threads.append(t)
    try:
        with contextlib.redirect_stdout(files[0]), contextlib.redirect_stderr(files[1]):
            assert sys.stdout.isatty() and sys.stderr.isatty()
            code = run([str(a) for a in argv])
    finally:
        for f, (master, slave, _) in zip(files, streams):
            f.flush()
            f.close()
            os.close(slave)
        for t in threads:
            t.join(timeout=10)
        for master, _, _ in streams:
            os.close(master)
    text = [b"".join(sink).decode("utf-8", "replace") for _, _, sink in streams]
    return Result(code, *text)


def check(res: Result, expected: int, json_mode: bool) -> None:
    assert res.code == expected, res
    assert res.code != 3 and "Traceback" not in res.stdout + res.stderr, res
    if json_mode:
        json.loads(res.stdout)   # a report, or the error object for exit 2
    if expected == 2:
        assert len(res.lines()) == 1 and res.lines()[0].startswith("error: "), res


# -- inputs ------------------------------------------------------------------------------------------

IDS = "[[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]"


def _adapter(base: Path, out: Path) -> Path:
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    torch.manual_seed(1)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


def _trainer_checkpoint(run_dir: Path, model_type: str = "llama", **extra) -> Path:
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(model_type, num_attention_heads=4, num_key_value_heads=2,
                                                         **extra), attn_implementation="eager")
    if model_type == "llama":
        unbalance(model)
    ids = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": x, "labels": x} for x in ids]
    args = TrainingArguments(output_dir=str(run_dir), max_steps=2, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-3, weight_decay=0.1, use_cpu=True, report_to=[],
                             dataloader_num_workers=0, logging_steps=1000, seed=0)
    Trainer(model=model, args=args, train_dataset=data).train()
    return run_dir / "checkpoint-2"


def _deepspeed_checkpoint(run_dir: Path) -> Path:
    """A Trainer checkpoint whose only weights are DeepSpeed's: ZeRO 3 without gathered 16-bit
    weights, one rank (``tests/frameworks/deepspeed/ds_trainer.py``)."""
    harness = Path(__file__).parent / "frameworks" / "deepspeed" / "ds_trainer.py"
    res = subprocess.run([sys.executable, str(harness), "make", str(run_dir), "--stage", "3", "--no-gather"],
                         capture_output=True, text=True, timeout=420,
                         env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir / "checkpoint-3"


def _megatron_checkpoint(root: Path) -> Path:
    """Megatron-LM's save folder in megatron-core's torch_dist form (stacked layers, fp32 masters
    and moments; the benchmark's generator, ``benchmarks/megatron.py``), with config.json."""
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks.bench import Shape
        from benchmarks.megatron import make
    finally:
        sys.path.remove(str(REPO))
    make(root, Shape(layers=2, hidden=64, intermediate=96, heads=4, kv_heads=2, vocab=128, dtype="bf16"))
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Every input kind, built once: name -> path (or hub repo id, resolved offline from a
    local hub cache that huggingface_hub reads in-process)."""
    from huggingface_hub import constants

    root = tmp_path_factory.mktemp("matrix")
    saved = constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(root / "hub"), True
    try:
        yield _build_inputs(root)
    finally:
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = saved


def _build_inputs(root: Path) -> dict[str, str]:
    from test_sample_and_hub import make_hub_cache

    k: dict[str, str] = {}
    k["sample"] = str(SAMPLE)                                             # bf16, one file, trained
    k["fp32"] = str(synthetic_llama(root / "fp32", std=0.3))              # fp32, one file
    k["sharded"] = str(synthetic_llama(root / "sharded", dtype=torch.bfloat16, shards=3, layers=3))
    base = root / "base"
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(make_config("llama", num_attention_heads=4, num_key_value_heads=2),
                                     attn_implementation="eager").save_pretrained(base)
    k["base"] = str(base)
    k["adapter"] = str(_adapter(base, root / "adapter"))
    k["trainer"] = str(_trainer_checkpoint(root / "run"))
    cache = root / "hub"
    make_hub_cache(cache, "wisca-test/tiny", SAMPLE, "b" * 40)
    k["hub"] = "wisca-test/tiny"
    k["dcp"] = str(dcp_llama(root / "dcp"))                               # torch.distributed checkpoint
    k["dcpcfg"] = str(root / "dcp" / "config.json")
    k["deepspeed"] = str(_deepspeed_checkpoint(root / "ds"))             # DeepSpeed ZeRO 3, weights in the engine only
    k["megatron"] = str(_megatron_checkpoint(root / "megatron"))          # Megatron-LM's save folder (tracker + iter_N/)
    # transformed outputs, for verify / inspect / undo
    for name, extra in (("sample", ()), ("sharded", ()), ("trainer", ()), ("adapter", ("--base", k["base"])),
                        ("dcp", ()), ("deepspeed", ()), ("megatron", ())):
        dst = root / f"{name}-T"
        res = run_pipe(["transform", k[name], dst, "--json", *extra])
        assert res.code == 0, res
        k[f"{name}-T"] = str(dst)
    dst = root / "sample-Tc"
    assert run_pipe(["transform", k["sample"], dst, "--scales", "continuous", "--json"]).code == 0
    k["sample-Tc"] = str(dst)
    (root / "ids.json").write_text(IDS)
    k["ids"] = str(root / "ids.json")
    k["root"] = str(root)
    return k


# -- the cases -----------------------------------------------------------------------------------------
# per command: option -> valid uses (extra argv; the placeholders {ids}, {base}, {dst} and {root} are
# filled in); and option -> invalid uses (each must exit 2 with one line).
MODEL_INPUTS = ("sample", "fp32", "sharded", "trainer", "hub", "dcp", "deepspeed", "megatron")
PROBE_AND_TOLERANCE = {    # transform and verify share these
        "probe_batch": [["--probe-batch", "3"]],
        "probe_len": [["--probe-len", "8"]],
        "seed": [["--seed", "7"]],
        "probe_ids_file": [["--probe-ids", "{ids}"]],
        "max_kl": [["--max-kl", "0.01"]],
        "min_top1": [["--min-top1", "0.9"]],
        "max_rel": [["--max-rel", "0.05"]],
        "revision": [["--revision", "main"]],
        "config": [["--config", "{cfg}"]],
}
VALID = {
    "transform": {
        "targets": [["--targets", "qk,vo,ffn,norm"], ["--targets", "qk"]],
        "granularity": [["--granularity", "head"], ["--granularity", "layer"]],
        "norm": [["--norm", "rms"]],
        "strength": [["--strength", "0.5"]],
        "scales": [["--scales", "continuous"]],
        "verify": [["--no-verify"], ["--verify"]],
        **PROBE_AND_TOLERANCE,
        "base": [["--base", "{base}"]],
        "training_state": [["--training-state", "transform"], ["--training-state", "drop"]],
        "overwrite": [["--overwrite"]],
        "json_out": [],    # the mode every case also runs in
        "report": [["--report", "{root}/report.json"]],
    },
    "verify": {
        "mode": [["--mode", "exact"], ["--mode", "tolerance"], ["--mode", "auto"]],
        **PROBE_AND_TOLERANCE,
        "json_out": [],
        "report": [["--report", "{root}/report.json"]],
    },
    "inspect": {
        "granularity": [["--granularity", "head"], ["--granularity", "layer"]],
        "norm": [["--norm", "rms"]],
        "targets": [["--targets", "qk,vo,ffn,norm"]],
        "revision": [["--revision", "main"]],
        "plot": [["--plot", "{root}/pattern.png"]],
        "config": [["--config", "{cfg}"]],
        "json_out": [],
        "report": [["--report", "{root}/report.json"]],
    },
    "undo": {
        "verify": [["--no-verify"], ["--verify"]],
        "overwrite": [["--overwrite"]],
        "config": [["--config", "{cfg}"]],
        "json_out": [],
        "report": [["--report", "{root}/report.json"]],
    },
}
INVALID = {
    "targets": [["--targets", "qk,xy"], ["--targets", ","]],
    "granularity": [["--granularity", "row"]],
    "norm": [["--norm", "l1"]],
    "strength": [["--strength", "2"], ["--strength", "-0.1"], ["--strength", "abc"]],
    "scales": [["--scales", "pow3"]],
    "verify": [["--verify=yes"]],
    "probe_batch": [["--probe-batch", "0"], ["--probe-batch", "x"]],
    "probe_len": [["--probe-len", "-1"]],
    "seed": [["--seed", "-1"]],
    "probe_ids_file": [["--probe-ids", "{root}/missing.json"]],
    "max_kl": [["--max-kl", "-1"]],
    "min_top1": [["--min-top1", "1.5"]],
    "max_rel": [["--max-rel", "-1"]],
    "revision": [["--revision"]],
    "base": [["--base", "{root}/no-such-base"]],
    "overwrite": [["--overwrite=1"]],
    "json_out": [["--json=1"]],
    "report": [["--report", "{root}/no/such/dir/r.json"]],
    "mode": [["--mode", "fuzzy"]],
    "plot": [["--plot", "{root}/no/such/dir/p.png"]],
    "config": [["--config", "{root}/no-such-config.json"]],
    "training_state": [["--training-state", "keep"]],
}
# the input kinds each command accepts (verify: pairs A B)
INPUTS = {
    "transform": (*MODEL_INPUTS, "adapter", "sample-T", "dcp-T"),
    "verify": (("sample", "sample-T"), ("sharded", "sharded-T"), ("trainer", "trainer-T"), ("hub", "sample-T"),
               ("adapter", "adapter-T"), ("sample", "sample-Tc"), ("dcp", "dcp-T"), ("deepspeed", "deepspeed-T"),
               ("megatron", "megatron-T")),
    "inspect": (*MODEL_INPUTS, "adapter", "sample-T", "adapter-T", "dcp-T", "deepspeed-T", "megatron-T"),
    "undo": ("sample-T", "sharded-T", "trainer-T", "adapter-T", "dcp-T", "deepspeed-T", "megatron-T"),
}


def expected_code(command: str, option: str | None, args: list[str], src: str | tuple) -> int:
    """What a user should get: 0, 1 where verification is built to fail, 2 for misuse."""
    first = src[0] if isinstance(src, tuple) else src
    if option == "revision":
        return 0 if first == "hub" else 2             # only hub repo ids have revisions
    if option == "base":
        return 0 if first == "adapter" else 2         # --base belongs to adapters
    if option == "config":   # --config belongs to torch.distributed checkpoints and weightless DeepSpeed folders
        return 0 if first.startswith(("dcp", "megatron")) or first == "deepspeed" else 2
    if command == "verify" and src == ("sample", "sample-Tc") and args[:2] == ["--mode", "exact"]:
        return 1                                      # continuous scales round: not bit-identical
    return 0


def _fill(args: list[str], k: dict, dst: str, src: str | tuple = "") -> list[str]:
    """The placeholders filled in; ``{cfg}`` is the config.json of the input it goes with."""
    first = src[0] if isinstance(src, tuple) else src
    cfg = str(Path(k[first.removesuffix("-T")]) / "config.json") if first.startswith(("deepspeed", "megatron")) \
        else k["dcpcfg"]
    return [a.format(ids=k["ids"], base=k["base"], root=k["root"], dst=dst, cfg=cfg) for a in args]


def _command_params() -> dict[str, set[str]]:
    import typer.main

    group = typer.main.get_command(app)
    out = {}
    for name, cmd in group.commands.items():
        out[name] = {p.name for p in cmd.params if p.param_type_name == "option" and p.name != "help"}
    return out


def test_every_option_has_cases():
    """A new option without a valid and an invalid case here fails this test."""
    params = _command_params()
    assert set(params) == set(VALID), "a command without a case table"
    for command, names in params.items():
        assert names == set(VALID[command]), (command, names ^ set(VALID[command]))
        for name in names:
            assert name in INVALID and INVALID[name], f"{command} {name}: no invalid-value case"
            if name != "json_out":
                assert VALID[command][name], f"{command} {name}: no valid case"


def _runs(command: str, k: dict, tmp: Path):
    """(label, argv, expected code) for every option alone on every input, and the combinations."""
    n = 0
    for src in INPUTS[command]:
        ins = [k[s] for s in src] if isinstance(src, tuple) else [k[src]]
        combos = [(opt, a) for opt, uses in VALID[command].items() for a in uses]
        combos.append((None, []))   # defaults
        if command == "transform" and src in ("sample", "adapter", "dcp"):
            combos += [(None, ["--scales", "continuous", t, v]) for t, v in
                       (("--max-kl", "0.01"), ("--min-top1", "0.9"), ("--max-rel", "0.05"))]
            combos += [(None, ["--granularity", g, "--norm", nm, "--strength", st]) for g in ("layer", "head", "channel")
                       for nm in ("fro", "rms") for st in ("0.5", "1")]
            combos += [(None, ["--probe-batch", "1", "--probe-len", "4", "--seed", "3"]),
                       (None, ["--probe-ids", "{ids}", "--probe-batch", "3"]),
                       (None, ["--no-verify", "--probe-len", "4"])]
        if command == "verify" and src == ("sample", "sample-Tc"):
            combos += [(None, ["--mode", "tolerance", t, v]) for t, v in
                       (("--max-kl", "0.01"), ("--min-top1", "0.9"), ("--max-rel", "0.05"))]
        if command == "inspect" and src == "sample":
            combos += [(None, ["--granularity", g, "--norm", nm]) for g in ("layer", "head") for nm in ("fro", "rms")]
        for opt, args in combos:
            n += 1
            dst = str(tmp / f"out{n}")
            full = _fill(args, k, dst, src)
            if command in ("transform", "undo"):
                argv = [command, *ins, dst, *full]
                if opt == "overwrite":
                    Path(dst).mkdir()
            else:
                argv = [command, *ins, *full]
            yield f"{command} {src} {' '.join(args)}", argv, expected_code(command, opt, args, src)


@pytest.mark.parametrize("command", list(VALID))
def test_valid_options_on_every_input(command, inputs, tmp_path):
    ran = 0
    for label, argv, code in _runs(command, inputs, tmp_path):
        for mode in ("json", "tty"):
            if mode == "json":
                res = run_pipe([*argv, "--json"])
            else:
                res = run_tty(argv)
            try:
                check(res, code, mode == "json")
                if mode == "json" and code == 0:
                    report = json.loads(res.stdout)
                    assert isinstance(report["warnings"], list), label
                if mode == "tty" and code == 0:   # tables / status lines (and a progress bar on stderr)
                    assert any(c in res.stdout for c in "┏✓!"), "not rendered"
                    assert "\x1b[?25l" in res.stderr or "adapter" in label, "no progress bar"
            except AssertionError as e:
                raise AssertionError(f"{label} [{mode}]: {e}") from None
            if command in ("transform", "undo"):
                shutil.rmtree(argv[2], ignore_errors=True)   # DST: the json and tty runs write it in turn
            ran += 1
    assert ran >= 2 * len(INPUTS[command])


def _invalid_runs(command: str, k: dict, tmp: Path):
    src = {"transform": "sample", "verify": ("sample", "sample-T"), "inspect": "sample", "undo": "sample-T"}[command]
    ins = [k[s] for s in src] if isinstance(src, tuple) else [k[src]]
    for opt in VALID[command]:
        for args in INVALID[opt]:
            dst = str(tmp / f"bad-{opt}")
            argv = [command, *ins, *([dst] if command in ("transform", "undo") else []), *_fill(args, k, dst)]
            yield f"{command} {' '.join(args)}", argv, dst


@pytest.mark.parametrize("command", list(VALID))
def test_invalid_values_exit_2_with_one_line(command, inputs, tmp_path):
    for label, argv, dst in _invalid_runs(command, inputs, tmp_path):
        for mode in ("pipe", "tty", "json"):
            res = run_tty(argv) if mode == "tty" else run_pipe([*argv, "--json"] if mode == "json" else argv)
            try:
                assert res.code == 2, res
                assert "Traceback" not in res.stdout + res.stderr and len(res.lines()) == 1, res
                if mode == "json" and "--json=1" not in argv:
                    assert json.loads(res.stdout)["exit_code"] == 2, res
                assert not Path(dst).exists()
            except AssertionError as e:
                raise AssertionError(f"{label} [{mode}]: {e}") from None


def test_real_entry_point_on_a_pty(inputs, tmp_path):
    """The installed entry point (python -m wisca_cli) on a real terminal: tables, exit codes."""
    for argv, code in ((["transform", inputs["sample"], tmp_path / "o"], 0),
                       (["inspect", inputs["adapter"]], 0),
                       (["verify", inputs["sample"], inputs["sample-Tc"], "--mode", "exact"], 1),
                       (["undo", inputs["adapter-T"], tmp_path / "r"], 0),
                       (["transform", inputs["sample"], tmp_path / "x", "--max-kl", "-1"], 2)):
        master, slave = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-m", "wisca_cli", *map(str, argv)], stdout=slave, stderr=slave,
                                stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "120"})
        os.close(slave)
        sink: list[bytes] = []
        _drain(master, sink)
        os.close(master)
        assert proc.wait(timeout=120) == code, b"".join(sink)
        text = b"".join(sink).decode("utf-8", "replace")
        assert "Traceback" not in text and (any(c in text for c in "┏✓✗") or code == 2), text


# -- the six cases of the issue ----------------------------------------------------------------------


def test_case1_transform_continuous_with_each_tolerance_flag(inputs, tmp_path):
    for flag, value in (("--max-kl", "0.01"), ("--min-top1", "0.9"), ("--max-rel", "0.05")):
        res = run_pipe(["transform", inputs["sample"], tmp_path / flag, "--scales", "continuous", flag, value, "--json"])
        check(res, 0, True)
        tol = json.loads(res.stdout)["verification"]["tolerance"]
        assert tol[flag[2:].replace("-", "_")] == float(value)
    res = run_pipe(["transform", inputs["sample"], tmp_path / "bad", "--scales", "continuous", "--max-kl", "-1"])
    check(res, 2, False)
    assert "--max-kl" in res.stderr


def test_case2_one_tolerance_changes_only_itself(inputs):
    """bf16 defaults stay for the tolerances not given."""
    from wisca_cli.verifier import DEFAULT_TOLERANCE

    res = run_pipe(["verify", inputs["sample"], inputs["sample-Tc"], "--mode", "tolerance", "--max-kl", "0.01",
                    "--json"])
    check(res, 0, True)
    tol = json.loads(res.stdout)["verification"]["tolerance"]
    bf16 = DEFAULT_TOLERANCE["BF16"]
    assert tol == {"max_kl": 0.01, "min_top1": bf16.min_top1, "max_rel": bf16.max_rel}


def test_case3_undo_of_an_adapter_transformed_with_base_in_human_mode(inputs, tmp_path):
    for runner in (run_pipe, run_tty):
        res = runner(["undo", inputs["adapter-T"], tmp_path / runner.__name__])
        check(res, 0, False)
        assert "verified" in res.stdout


def test_case4_inspect_an_adapter(inputs):
    res = run_pipe(["inspect", inputs["adapter"], "--json"])
    check(res, 0, True)
    report = json.loads(res.stdout)
    assert report["kind"] == "lora-adapter" and len(report["modules"]) == 2 * 4   # 2 layers x 4 modules
    assert all(len(m["channels"]) == m["rank"] == 4 for m in report["modules"])
    res = run_tty(["inspect", inputs["adapter"]])
    check(res, 0, False)
    assert "q_proj" in res.stdout


def test_case5_base_on_a_model_or_missing_is_refused(inputs, tmp_path):
    res = run_pipe(["transform", inputs["sample"], tmp_path / "o", "--base", "/nonexistent"])
    check(res, 2, False)
    assert "--base" in res.stderr and "/nonexistent" in res.stderr
    res = run_pipe(["transform", inputs["sample"], tmp_path / "o", "--base", inputs["base"]])
    check(res, 2, False)
    assert "--base" in res.stderr and "LoRA adapter" in res.stderr
    assert not (tmp_path / "o").exists()


def test_case6_mixtral_trainer_checkpoint_transforms_and_a_bad_one_is_one_readable_line(tmp_path, monkeypatch):
    """transformers 5 fuses Mixtral's experts in memory (optimizer.pt holds the fused moments),
    save_pretrained writes them per expert: the moments are carried over (exit 0); an
    optimizer.pt that fits no parameter order is one readable line, the tried orders in details."""
    ckpt = _trainer_checkpoint(tmp_path / "run", "mixtral", num_local_experts=4, num_experts_per_tok=2,
                               intermediate_size=32)
    res = run_pipe(["transform", ckpt, tmp_path / "ok", "--json"])
    check(res, 0, True)
    opt = json.loads(res.stdout)["training_state"]["optimizer"]
    assert opt["transformed"] and opt["exact"] and opt["parameters"] == 21
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    sd["state"][6]["exp_avg"] = sd["state"][6]["exp_avg"][:, :32]      # half of a fused gate_up_proj
    torch.save(sd, ckpt / "optimizer.pt")
    res = run_pipe(["transform", ckpt, tmp_path / "o"])
    check(res, 2, False)
    line = res.lines()[0]
    assert len(line) - len(str(ckpt)) <= 200 and "gate_up_proj" in line, line   # readable: the path plus a sentence
    res = run_pipe(["transform", ckpt, tmp_path / "o", "--json"])
    check(res, 2, True)
    assert len(json.loads(res.stdout)["details"]) >= 2
    monkeypatch.setenv("WISCA_DEBUG", "1")
    res = run_pipe(["transform", ckpt, tmp_path / "o"])
    assert res.code == 2 and "detail:" in res.stderr
    assert not (tmp_path / "o").exists()


def test_plot_of_a_transformed_checkpoint_shows_before_and_after(inputs, tmp_path):
    import matplotlib.image

    sizes = {}
    for name in ("sample", "sample-T", "sharded", "adapter", "adapter-T"):
        png = tmp_path / f"{name}.png"
        check(run_pipe(["inspect", inputs[name], "--plot", png, "--json"]), 0, True)
        img = matplotlib.image.imread(png)[..., :3]
        assert img.shape[0] > 200 and img.shape[1] > 200, name
        assert len({tuple(p) for p in img.reshape(-1, 3)[::7].tolist()}) > 20 and img.std() > 0.05, f"{name}: blank"
        sizes[name] = img.shape[0]
    assert sizes["sample-T"] > sizes["sample"] and sizes["adapter-T"] > sizes["adapter"]   # two rows of panels
