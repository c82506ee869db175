"""Loads the compiled core after checking it was built for the running torch.

The check comes first because a C++ extension built against another torch usually fails to
load with an undefined-symbol error that names neither version.
"""

import torch

_REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps ."


def _release(version: str) -> str:
    return version.split("+")[0]


def load_core():
    try:
        from . import _build_meta
    except ImportError:
        raise ImportError(
            "miss_ext: the compiled extension is not built (miss_ext/_build_meta.py is missing); "
            "build it from the repository root with: pip install --no-build-isolation ."
        ) from None
    built, running = _build_meta.TORCH_VERSION, torch.__version__
    if _release(built) != _release(running):
        raise ImportError(
            f"miss_ext: the extension was built against torch {built} but torch {running} is "
            f"running; rebuild it against this torch with: {_REBUILD}"
        )
    try:
        from . import _C
    except ImportError as err:
        raise ImportError(
            f"miss_ext: the compiled extension failed to load ({err}); it was built against torch "
            f"{built}, running torch {running}; rebuild it with: {_REBUILD}"
        ) from err
    return _C
