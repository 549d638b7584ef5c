"""Megatron-core's ``torch_dist`` checkpoints, as the DCP backend reads them.

Megatron-LM keeps each checkpoint in ``iter_NNNNNNN/`` beside
``latest_checkpointed_iteration.txt``; the folder is a torch.distributed checkpoint written
through megatron-core's ``dist_checkpointing`` (``metadata.json`` says
``{"sharded_backend": "torch_dist"}``). What makes it more than a DCP folder to wisca:

- **stacked layers**: one tensor per role with a leading layer axis
  (``decoder.layers.self_attention.linear_qkv.weight [L, (H + 2G) d, D]``), each layer its
  own chunks at offset l on axis 0 (the global index under pipeline parallelism, tensor
  parallelism cutting the other axes). ``stack_layers`` shows layer l's chunks as a tensor
  of their own (``dcp.LayerView``), ``decoder.layers.<l>.self_attention...``, so the backend
  balances, verifies and writes a layer at a time, as for any DCP checkpoint;
- **fused tensors** (``linear_qkv`` rows per kv group, ``linear_fc1`` gate then up) and the
  optimizer's **state key before the parameter** (``optimizer.state.exp_avg.<param>``, the
  fp32 masters ``fp32_param`` and the DistributedOptimizer's ``param``): data, in
  ``frameworks/megatron.json``;
- up to 0.15 its ``.metadata`` pickles megatron's own ``MCoreMetadata`` (read into a
  stand-in, written back under megatron's name: ``unpickle.py``) and keeps the common state
  in ``common.pt``; from 0.16 the common state is inside the checkpoint. Both are copied
  as they are, like every entry and file wisca does not rescale.

Nothing here imports megatron.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import WiscaError

TRACKER = "latest_checkpointed_iteration.txt"
BACKEND_FILE = "metadata.json"


def iteration_folder(root: Path) -> str | None:
    """The sub-folder that ``latest_checkpointed_iteration.txt`` names (``iter_0000042``,
    or ``release``), or None when ``root`` holds no tracker file."""
    tracker = root / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text(errors="replace").strip()
    if text == "release":
        sub = "release"
    else:
        try:
            sub = f"iter_{int(text):07d}"
        except ValueError:
            raise WiscaError(f"{tracker}: not an iteration number or 'release' ({text[:40]!r}): "
                             f"a damaged Megatron tracker file") from None
    if not (root / sub).is_dir():
        raise WiscaError(f"{tracker}: names iteration {text}, but {root / sub} is not there")
    return sub


def is_megatron(folder: Path) -> bool:
    """Written by megatron-core's dist_checkpointing (its ``metadata.json``)."""
    p = folder / BACKEND_FILE
    if not p.is_file():
        return False
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "sharded_backend" in data


def check_backend(folder: Path) -> None:
    """Refuse, naming Megatron, a checkpoint of a backend other than torch_dist (zarr)."""
    data = json.loads((folder / BACKEND_FILE).read_text())
    backend = data.get("sharded_backend")
    if backend != "torch_dist":
        raise WiscaError(f"{folder / BACKEND_FILE}: a Megatron-core checkpoint in the {backend!r} format; "
                         f"wisca reads torch_dist (save with --ckpt-format torch_dist)")


def unsupported_family(root: Path, family: str, covered) -> WiscaError:
    return WiscaError(f"{root}: a Megatron-core checkpoint of a {family} model; wisca's Megatron description "
                      f"(frameworks/megatron.json) covers {', '.join(sorted(covered))}")
