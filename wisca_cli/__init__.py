"""wisca: bit-exact, verified WISCA weight-scaling transitions of LLM checkpoints.

    import wisca_cli as wisca
    wisca.transform("ckpt/", "ckpt-wisca/")

The API is imported lazily so that `wisca --help` does not pay for importing torch.
"""

__version__ = "0.1.0"

_API = {
    "transform": "api", "verify": "api", "inspect": "api", "undo": "api", "TransformOptions": "api",
    "scale_multipliers": "api", "transform_adapter": "lora", "undo_adapter": "lora",
    "transform_training_state": "training",
    "WiscaError": "errors", "VerificationFailed": "errors", "Tolerance": "verifier",
    "transition": "live", "transition_lora": "live", "WiscaCallback": "callbacks",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'wisca_cli' has no attribute {name!r}")
