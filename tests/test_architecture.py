"""The package's import structure: the import-linter contracts of .importlinter hold (layers that
import one way; only the PEFT integration imports PEFT), every module is placed in a layer, and no
miss_ext module imports a miss_ext module inside a function (an import there would hide a cycle
from the contracts). Each check is also run once on a copy with a planted violation, which it
must catch."""

import ast
import configparser
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "miss_ext")
CONFIG = os.path.join(ROOT, ".importlinter")
# The loader imports the compiled extension and its build record only after checking that the
# build matches the running torch (miss_ext/_load.py); those two imports must stay in a function.
DEFERRED_OK = {("_load", "_build_meta"), ("_load", "_C")}


def _modules(folder=PKG):
    return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py"))


def _lint_imports(root):
    """Runs import-linter on the package under ``root`` with the config there; (ok, output)."""
    code = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    env = dict(os.environ, PYTHONPATH=root)
    proc = subprocess.run(
        [sys.executable, "-c", code, "--no-cache", "--no-logo"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    return proc.returncode == 0, proc.stdout + proc.stderr


def _copy(tmp_path):
    """The package's sources and the config, in a folder of their own."""
    root = tmp_path / "repo"
    (root / "miss_ext").mkdir(parents=True)
    for name in os.listdir(PKG):
        if name.endswith(".py"):
            shutil.copy(os.path.join(PKG, name), root / "miss_ext" / name)
    shutil.copy(CONFIG, root / ".importlinter")
    return root


def test_import_contracts_hold():
    pytest.importorskip("importlinter")
    ok, out = _lint_imports(ROOT)
    assert ok, out
    assert "2 kept, 0 broken" in out, out


def test_import_contracts_catch_an_upward_import(tmp_path):
    pytest.importorskip("importlinter")
    root = _copy(tmp_path)
    core = root / "miss_ext" / "_core_forward.py"
    core.write_text(core.read_text() + "\nfrom .layer import MissLinear  # noqa\n")
    ok, out = _lint_imports(str(root))
    assert not ok
    assert "miss_ext._core_forward is not allowed to import miss_ext.layer" in out, out


def test_every_module_is_in_a_layer():
    config = configparser.ConfigParser()
    config.read(CONFIG)
    layers = config["importlinter:contract:layers"]["layers"]
    placed = {m.strip() for line in layers.split("\n") for m in line.split("|") if m.strip()}
    missing = sorted(f"miss_ext.{m}" for m in _modules() if m != "__init__" and f"miss_ext.{m}" not in placed)
    assert not missing, f"modules in no layer of .importlinter: {missing}"


def _deferred_imports(module, source):
    """(module, imported miss_ext module, line) of every miss_ext import inside a function."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom):
                if node.level > 0:
                    targets = [node.module] if node.module else [a.name for a in node.names]
                elif node.module == "miss_ext" or (node.module or "").startswith("miss_ext."):
                    targets = [node.module.partition(".")[2] or a.name for a in node.names]
                else:
                    continue
            elif isinstance(node, ast.Import):
                targets = [a.name.partition(".")[2] for a in node.names if a.name.split(".")[0] == "miss_ext"]
            else:
                continue
            found += [(module, t.split(".")[0], node.lineno) for t in targets]
    return found


def test_no_package_import_inside_a_function():
    found = []
    for m in _modules():
        with open(os.path.join(PKG, m + ".py")) as f:
            found += _deferred_imports(m, f.read())
    bad = [f for f in found if f[:2] not in DEFERRED_OK]
    assert not bad, f"miss_ext imports inside functions (module, imported, line): {bad}"


def test_deferred_import_check_catches_a_planted_one():
    planted = "import torch\n\ndef f():\n    from .layer import MissLinear\n    import miss_ext.serving\n    return 1\n"
    assert _deferred_imports("inject", planted) == [("inject", "layer", 4), ("inject", "serving", 5)]
    assert _deferred_imports("inject", "def f():\n    import peft\n") == []
