"""Every python block of README.md runs as written.

Each fenced block tagged ``python`` runs in a fresh namespace, in a temporary working folder.
A block that cannot run here must be marked by an HTML comment on the line before its fence,
``<!-- readme-test: skip: <why> -->``; a python block that is neither runnable nor marked fails.
Fences must name their language (python, bash or text), so no Python hides in an untagged block.
"""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
LANGUAGES = {"python", "bash", "text"}
SKIP = re.compile(r"<!--\s*readme-test:\s*skip:\s*(\S.*?)\s*-->")
FENCE = re.compile(r"^```(\S*)\s*$")


def blocks(text: str):
    """(heading, language, code, marker line, line number) of every fenced block."""
    lines = text.splitlines()
    heading, i = "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        m = FENCE.match(line)
        if m:
            start = i
            end = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
            before = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            yield heading, m.group(1), "\n".join(lines[start + 1 : end]) + "\n", before, start + 1
            i = end
        i += 1


ALL = list(blocks(open(README).read()))
PYTHON = [b for b in ALL if b[1] == "python"]


def test_every_fence_names_a_known_language():
    bad = [(line, lang or "(none)") for _, lang, _, _, line in ALL if lang not in LANGUAGES]
    assert not bad, f"README fences with no or an unknown language (line, language): {bad}"
    assert len(PYTHON) >= 4, "the README's python blocks went missing"


@pytest.mark.parametrize(
    "heading, code, before, line", [(h, c, b, n) for h, _, c, b, n in PYTHON], ids=[f"line{b[4]}" for b in PYTHON]
)
def test_python_block_runs(heading, code, before, line, tmp_path, monkeypatch):
    if "readme-test" in before:
        reason = SKIP.search(before)
        assert reason, f"README line {line}: malformed readme-test marker {before!r}"
        pytest.skip(f"README line {line} ({heading}) is marked not runnable here: {reason.group(1)}")
    monkeypatch.chdir(tmp_path)  # blocks may write files (save_adapter)
    namespace = {"__name__": "__readme__"}
    exec(compile(code, f"README.md line {line} ({heading})", "exec"), namespace)
    if heading == "MissLinear and the building blocks":
        assert namespace["y"].shape == (8, 128, 1024)
    if "layer" in namespace and heading in ("Quick start", "MissLinear and the building blocks"):
        assert namespace["layer"].miss_block["default"].grad is not None
