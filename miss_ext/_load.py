"""Loads the compiled core after checking it was built for the running torch.

The check comes first because a C++ extension built against another torch usually fails to
load with an undefined-symbol error that names neither version.

Running Python from the repository root puts the source folder ``miss_ext/`` first on
``sys.path``. After a non-editable install that folder has no compiled ``_C`` (pip put it in
site-packages), so, before anything else, :func:`load_core` looks for the installed copy: when
it was built from the same sources it is used instead (``import miss_ext`` returns it); when
not, the error names both folders and the one command that makes the source folder importable.
"""

import importlib.machinery
import importlib.util
import os
import sys

import torch

_PKG = __name__.rpartition(".")[0]  # "miss_ext"
_HERE = os.path.dirname(os.path.abspath(__file__))


def _release(version: str) -> str:
    return version.split("+")[0]


def _has_binary(folder: str) -> bool:
    return any(
        os.path.isfile(os.path.join(folder, "_C" + suffix))
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )


def _source_checkout(folder: str) -> bool:
    """True when ``folder`` is the ``miss_ext/`` of a repository checkout (setup.py beside it)."""
    return os.path.isfile(os.path.join(os.path.dirname(folder), "setup.py"))


def rebuild_command(folder=None) -> str:
    folder = folder or _HERE
    if _source_checkout(folder):
        # Built in place, the source folder imports from anywhere, the repository root included.
        return f"pip install -e {os.path.dirname(folder)}"
    return "pip install --force-reinstall --no-deps <your miss_ext checkout>"


def _other_copies(folder: str):
    """Folders of the other ``miss_ext`` packages this Python could import, in its own search
    order: sys.path without the folder holding ``folder``, then the other import hooks
    (an editable install of another checkout)."""
    here = os.path.realpath(folder)
    parent = os.path.dirname(here)
    path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != parent]
    seen = []
    for finder in sys.meta_path:
        try:
            if finder is importlib.machinery.PathFinder:
                spec = finder.find_spec(_PKG, path)
            elif hasattr(finder, "find_spec"):
                spec = finder.find_spec(_PKG, None)
            else:
                continue
        except Exception:  # a third-party import hook that cannot answer: not a copy
            continue
        for loc in (spec.submodule_search_locations or []) if spec else []:
            if os.path.realpath(loc) != here and loc not in seen:
                seen.append(loc)
                yield spec, loc


def _differing_sources(a: str, b: str) -> list[str]:
    def sources(d):
        return {f for f in os.listdir(d) if f.endswith(".py") and f != "_build_meta.py"}

    sa, sb = sources(a), sources(b)
    differ = sorted(sa ^ sb)
    for name in sorted(sa & sb):
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            if fa.read() != fb.read():
                differ.append(name)
    return differ


def _use_installed_copy(spec, folder: str):
    """Makes ``import miss_ext`` return the package of ``spec`` (executed here, in place of the
    source folder being imported) and returns its ``_C``."""
    source = sys.modules[_PKG]
    for key in [k for k in sys.modules if k.startswith(_PKG + ".")]:
        del sys.modules[key]  # this folder's submodules (this one too): the copy brings its own
    module = importlib.util.module_from_spec(spec)
    sys.modules[_PKG] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules[_PKG] = source
        raise
    # The import system returns sys.modules[_PKG] once the source __init__ finishes; its
    # remaining relative imports resolve against the copy, whose sources are the same.
    return module._C


def _from_source_folder():
    """This folder has no compiled core: use a built copy of the same sources, or say why not."""
    candidates = [(spec, loc) for spec, loc in _other_copies(_HERE) if _has_binary(loc)]
    if not candidates:
        raise ImportError(
            f"miss_ext is not built: {_HERE} has no compiled extension (_C) and no built miss_ext "
            f"is installed elsewhere for this Python ({sys.executable}); build it with: "
            f"{rebuild_command()}"
        )
    spec, other = candidates[0]
    differ = _differing_sources(_HERE, other)
    if differ:
        shown = ", ".join(differ[:5]) + (", ..." if len(differ) > 5 else "")
        raise ImportError(
            f"miss_ext: Python imported the source folder {_HERE} (the current directory, or the "
            f"script's, comes first on sys.path), which has no compiled extension; the miss_ext "
            f"installed at {other} was built from other sources ({shown} differ), so it cannot "
            f"stand in for this folder. Build this folder in place (then it imports from "
            f"anywhere) with: {rebuild_command()}"
        )
    return _use_installed_copy(spec, other)


def load_core():
    if not _has_binary(_HERE):
        return _from_source_folder()
    try:
        from . import _build_meta
    except ImportError:
        raise ImportError(
            f"miss_ext: {_HERE} has a compiled extension but no _build_meta.py (an interrupted or "
            f"manual build); rebuild it with: {rebuild_command()}"
        ) from None
    built, running = _build_meta.TORCH_VERSION, torch.__version__
    if _release(built) != _release(running):
        raise ImportError(
            f"miss_ext: the extension was built against torch {built} but torch {running} is "
            f"running; rebuild it against this torch with: {rebuild_command()}"
        )
    try:
        from . import _C
    except ImportError as err:
        raise ImportError(
            f"miss_ext: the compiled extension failed to load ({err}); it was built against torch "
            f"{built}, running torch {running}; rebuild it with: {rebuild_command()}"
        ) from err
    return _C
