"""miss_ext: compiled CPU and CUDA kernels for MiSS (Matrix Shard Sharing) fine-tuning.

``import miss_ext`` loads the operators into ``torch.ops.miss_ext`` and gives
``miss_ext.MissLinear``, ``miss_ext.functional``, ``miss_ext.inject`` and the whole-model
operations (merge and unload, save and load in PEFT's format, adapter switching). PEFT itself is
never imported here: ``miss_ext.peft`` imports it only when its functions run.

The modules import one way, each layer only from the ones below it (checked by .importlinter):
loading, checks and the fp64 reference; the operators' fake kernels and autograd
(``_ops_*``); ``functional``; the core (``_core_*``: the variant table, the adapter views, the
one forward path, the one mixed-batch path, merging); ``layer`` (MissLinear); the model level
(``inject``, ``model``, ``saving``, ``export``, ``serving``); the PEFT integration (``peft``).
"""

from ._load import load_core as _load_core

_C = _load_core()

from . import _ops  # noqa: E402,F401  (fake kernels and autograd of torch.ops.miss_ext)
from . import functional, reference  # noqa: E402,F401
from .layer import MissLinear  # noqa: E402
from .inject import (  # noqa: E402
    adapters_disabled,
    inject,
    print_trainable_parameters,
    reset_adapter_parameters,
    set_adapter,
    to_injected_state_dict,
)
from .model import merge_adapters, merge_and_unload, unload, unmerge_adapters  # noqa: E402
from .saving import load_adapter, save_adapter  # noqa: E402
from .serving import bat_cache_bytes, cache_bat_weights, mixed_batch  # noqa: E402
from .export import export_lora  # noqa: E402
from . import peft  # noqa: E402,F401  (PEFT itself is imported only when its functions run)

__version__ = "0.1.0"


def empty_cache() -> int:
    """Frees the large CPU temporaries miss_ext keeps for reuse (a BAT layer's transformed weight
    and packed operands: mapping fresh multi-megabyte buffers costs page faults every step) and
    returns the bytes released. At most a few buffers are kept, each the size of the largest
    weight that needed one; ``MISS_EXT_CPU_WORKSPACE=0`` turns the reuse off."""
    return int(_C.cpu_workspace_release())


def build_info() -> dict:
    """How the compiled core was built (torch version, OpenMP, CUDA and its archs) and which CPU
    paths run: ``cpu_brgemm`` / ``cpu_brgemm_status`` (torch's bf16 micro-kernel on AMX or
    AVX512-BF16, or why not), ``cpu_brgemm_fp32`` (its fp32 micro-kernel, for the fp32 products
    no bf16 piece makes cheaper), ``cpu_brgemm_amx`` (its bf16 runs on AMX tiles) and
    ``cpu_vector_isa`` (``avx512``, ``avx2`` or ``portable``)."""
    return dict(_C.build_info())


__all__ = [
    "MissLinear",
    "functional",
    "reference",
    "inject",
    "print_trainable_parameters",
    "reset_adapter_parameters",
    "to_injected_state_dict",
    "set_adapter",
    "adapters_disabled",
    "merge_adapters",
    "unmerge_adapters",
    "merge_and_unload",
    "unload",
    "save_adapter",
    "load_adapter",
    "mixed_batch",
    "cache_bat_weights",
    "bat_cache_bytes",
    "export_lora",
    "build_info",
    "empty_cache",
    "__version__",
]
