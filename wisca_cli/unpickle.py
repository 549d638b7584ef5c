"""Reading pickles without running code from them.

A checkpoint is data, and wisca runs no code that comes with it. Every pickle wisca reads
goes through one of two doors:

- ``torch.load(..., weights_only=True)`` for ``torch.save`` archives (optimizer states,
  DCP chunks): torch's own allow-list of tensors and containers;
- ``load`` here for the plain pickles a format keeps beside its tensors (DCP's
  ``.metadata``): an unpickler whose ``find_class`` admits exactly the classes that format
  names (``_dcp_metadata_allowed``) and refuses any other global, so no callable outside the
  list can be reached. A class of a framework that need not be installed (OLMo-core's
  storage-info class, megatron-core 0.15's ``MCoreMetadata`` and ``MCoreSavePlan``) is read
  into a stand-in: a subclass of the torch class it extends that remembers the framework's
  module and name, and ``dump`` writes it back under that module and name, so the
  framework's own loader reads the output as it read the source.

Pure: no torch at import, no files (``load`` and ``dump`` take open files).
"""

from __future__ import annotations

import importlib
import pickle
from typing import Callable

from .errors import WiscaError, reason


class Refused(pickle.UnpicklingError):
    """A global outside the allow-list."""


def _dcp_metadata_allowed() -> dict[tuple[str, str], Callable[[], object]]:
    """(module, name) -> the object it may resolve to, for torch DCP's ``.metadata``."""
    def dcp(name):
        return lambda: getattr(importlib.import_module("torch.distributed.checkpoint.metadata"), name)

    def fs(name):
        return lambda: getattr(importlib.import_module("torch.distributed.checkpoint.filesystem"), name)

    allowed = {("torch.distributed.checkpoint.metadata", n): dcp(n)
               for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                         "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")}
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = fs("_StorageInfo")
    for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"):   # all_local_plans (Megatron)
        allowed[("torch.distributed.checkpoint.planner", name)] = \
            (lambda n: lambda: getattr(importlib.import_module("torch.distributed.checkpoint.planner"), n))(name)
    allowed[("torch.serialization", "_get_layout")] = \
        lambda: importlib.import_module("torch.serialization")._get_layout
    allowed[("torch", "Size")] = lambda: importlib.import_module("torch").Size
    for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"):
        allowed[("pathlib", name)] = (lambda n: lambda: getattr(importlib.import_module("pathlib"), n))(name)
    allowed[("collections", "OrderedDict")] = lambda: importlib.import_module("collections").OrderedDict
    for name in ("set", "frozenset", "slice", "complex"):
        allowed[("builtins", name)] = (lambda n: lambda: getattr(importlib.import_module("builtins"), n))(name)
    return allowed


# the torch classes a framework's own class may extend -> where torch keeps them
STAND_IN_BASES = {"_StorageInfo": "torch.distributed.checkpoint.filesystem",
                  "Metadata": "torch.distributed.checkpoint.metadata",
                  "SavePlan": "torch.distributed.checkpoint.planner"}


def _stand_in(module: str, name: str, base: str = "_StorageInfo") -> type:
    """A subclass of torch's ``base`` (``STAND_IN_BASES``) that pickles as ``module.name``."""
    key = (module, name)
    if key not in _STAND_INS:
        parent = getattr(importlib.import_module(STAND_IN_BASES[base]), base)
        extra = {"__slots__": ()} if base == "_StorageInfo" else {}
        _STAND_INS[key] = type(name, (parent,), {"__module__": module, "__qualname__": name,
                                                 "foreign": key, **extra})
    return _STAND_INS[key]


_STAND_INS: dict[tuple[str, str], type] = {}


def _is_dtype(module: str, name: str) -> bool:
    if module != "torch":
        return False
    import torch

    return isinstance(getattr(torch, name, None), torch.dtype)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, allowed: dict, foreign: dict):
        super().__init__(file)
        self.allowed, self.foreign, self.stand_ins = allowed, foreign, set()

    def find_class(self, module: str, name: str):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]()
        if _is_dtype(module, name):
            import torch

            return getattr(torch, name)
        if (module, name) in self.foreign:
            self.stand_ins.add((module, name))
            return _stand_in(module, name, self.foreign[(module, name)])
        raise Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        raise Refused("a persistent id")


def load_dcp_metadata(f, where: str, foreign: dict[tuple[str, str], str] | None = None):
    """The ``Metadata`` pickled in an open ``.metadata`` file; ``WiscaError`` naming the file
    for any global outside torch DCP's classes and ``foreign`` ((module, name) of frameworks'
    own classes -> the torch class each extends: read into stand-ins)."""
    u = _Unpickler(f, _dcp_metadata_allowed(), dict(foreign or {}))
    try:
        return u.load()
    except Refused as e:
        if str(e).startswith("megatron."):
            raise WiscaError(f"{where}: a Megatron-core checkpoint's metadata holds {e}, a class wisca does "
                             f"not know (frameworks/megatron.json names the ones it reads)") from None
        raise WiscaError(f"{where}: refused to unpickle {e}: not one of the classes a torch.distributed "
                         f"checkpoint's metadata holds (wisca runs no code from a checkpoint)") from None
    except Exception as e:   # noqa: BLE001 - any unpickling error of a damaged file
        raise WiscaError(f"{where}: not a torch.distributed.checkpoint metadata file "
                         f"({type(e).__name__}: {reason(e, 60)})") from None


class _Pickler(pickle._Pickler):    # the Python pickler: its save_global can be taken over
    def save_global(self, obj, name=None):
        key = obj.__dict__.get("foreign") if isinstance(obj, type) else None
        if key is None or self.proto < 4:
            return super().save_global(obj, name)
        module, qualname = key         # the framework's class, by name, installed or not
        self.save(module)
        self.save(qualname)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def dump(obj, f) -> None:
    """``pickle.dump``, with stand-ins written under their frameworks' module and name."""
    _Pickler(f, protocol=max(4, pickle.DEFAULT_PROTOCOL)).dump(obj)
