"""Not a package: the root of a miss_ext source checkout.

Python imports this file as ``miss_ext`` only when the folder holding the checkout comes first
on sys.path (a script run from there, or that folder as the current directory) and the checkout
folder is itself named ``miss_ext``. Without this file the checkout would import as an empty
namespace package whenever the real package is found through an import hook (an editable
install) or not at all, and fail far from the cause (``module 'miss_ext' has no attribute
'MissLinear'``, ``operator miss_ext::blocksum does not exist``). With it: the installed
miss_ext is imported in its place when there is one, and otherwise the import stops here with
one error naming the folder and the fix.
"""

import importlib.machinery as _machinery
import importlib.util as _util
import os as _os
import sys as _sys


def _installed_spec(name, root):
    """The spec Python would use for ``name`` if the folder holding ``root`` were not searched."""
    parent = _os.path.dirname(root)
    path = [p for p in _sys.path if _os.path.realpath(p or _os.getcwd()) != parent]
    for finder in _sys.meta_path:
        try:
            if finder is _machinery.PathFinder:
                spec = finder.find_spec(name, path)
            elif hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, None)
            else:
                continue
        except Exception:  # an import hook that cannot answer: nothing found there
            continue
        if spec is not None and spec.origin and _os.path.isfile(spec.origin):
            if _os.path.realpath(spec.origin) != _os.path.realpath(__file__):
                return spec
    return None


def _import_installed_instead():
    root = _os.path.dirname(_os.path.realpath(__file__))
    spec = _installed_spec(__name__, root)
    if spec is None:
        raise ImportError(
            f"miss_ext: `import miss_ext` found {root}, a miss_ext source checkout (the package "
            f"is its miss_ext/ subfolder), because {_os.path.dirname(root)} comes first on "
            f"sys.path (the current directory, or the script's), and no built miss_ext is "
            f"installed for {_sys.executable}. Install it with: pip install {root}"
        )
    module = _util.module_from_spec(spec)
    _sys.modules[__name__] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        _sys.modules.pop(__name__, None)
        raise
    # The import system hands out sys.modules[__name__] once this file finishes: the package.


if __name__ == "miss_ext":
    _import_installed_instead()
