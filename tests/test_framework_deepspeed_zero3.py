"""DeepSpeed ZeRO 3, resumed by DeepSpeed itself through transformers' Trainer: one rank, two in
bf16, a Mixtral saved without gathered weights (its fused experts are DeepSpeed's parameters;
the weights are the engine's fp32 masters only), and ZeRO 3's universal form
(``deepspeed_checks``: the harness and the tests every case runs)."""

from __future__ import annotations

import pytest

import deepspeed  # noqa: F401  - a test dependency: the format is checked against DeepSpeed itself
from deepspeed_checks import (make_case, test_deepspeed_resumes_the_transformed_state,  # noqa: F401
                              test_transform_reports_the_engine_state, test_undo_gives_every_file_back,
                              test_verify_and_inspect_take_the_folder)

CASES = {   # name -> (ranks, harness flags)
    "zero3": (1, ["--stage", "3"]),
    "zero3-2ranks-bf16": (2, ["--stage", "3", "--bf16"]),
    # no model.safetensors: the weights are the engine's fp32 masters only; a Mixtral, whose experts
    # DeepSpeed holds fused as transformers 5 does in memory ([E, 2I, H], [E, H, I])
    "zero3-2ranks-no-gather-moe": (2, ["--stage", "3", "--no-gather", "--moe"]),
    "zero3-2ranks-universal": (2, ["--stage", "3", "--universal"]),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    return make_case(request.param, *CASES[request.param], tmp_path_factory)
