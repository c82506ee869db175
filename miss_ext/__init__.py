"""miss_ext: compiled CPU and CUDA kernels for MiSS (Matrix Shard Sharing) fine-tuning.

``import miss_ext`` loads the operators into ``torch.ops.miss_ext`` and gives
``miss_ext.MissLinear`` and ``miss_ext.functional``; PEFT is never imported here.
"""

from ._load import load_core as _load_core

_C = _load_core()

from . import _ops  # noqa: E402,F401  (fake kernels and autograd of torch.ops.miss_ext)
from . import functional, reference  # noqa: E402,F401
from .layer import MissLinear  # noqa: E402
from .inject import inject, print_trainable_parameters, reset_adapter_parameters, to_injected_state_dict  # noqa: E402

__version__ = "0.1.0"


def build_info() -> dict:
    """How the compiled core was built: torch version, OpenMP, CUDA and its archs."""
    return dict(_C.build_info())


def __getattr__(name: str):
    # `miss_ext.peft` imports on first use, so `import miss_ext` never pulls in PEFT.
    if name == "peft":
        import importlib

        return importlib.import_module(".peft", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MissLinear",
    "functional",
    "reference",
    "inject",
    "print_trainable_parameters",
    "reset_adapter_parameters",
    "to_injected_state_dict",
    "build_info",
    "__version__",
]
