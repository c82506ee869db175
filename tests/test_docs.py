"""Docs hold in a clone: nothing points outside the repository, and every "docs/MATH.md section N"
(or "§N") cited in code, tests, benchmarks and docs names a section that exists."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", "results"}
TEXT = (".py", ".md", ".cpp", ".h", ".cu", ".cuh", ".sh", ".toml", ".txt")


def files():
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in names:
            if name.endswith(TEXT) or root.endswith(".ci"):
                yield os.path.join(root, name)


def read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def test_nothing_points_outside_the_repository():
    me = os.path.abspath(__file__)
    bad = []
    for path in files():
        if path == me:
            continue
        for n, line in enumerate(read(path).splitlines(), 1):
            if "../shared" in line or re.search(r"\bSPEC\b", line):
                bad.append(f"{os.path.relpath(path, REPO)}:{n}: {line.strip()}")
    assert not bad, "references to files outside a clone:\n" + "\n".join(bad)


def test_cited_math_sections_exist():
    math = read(os.path.join(REPO, "docs", "MATH.md"))
    sections = set(re.findall(r"^##+ (\d+(?:\.\d+)?)\.? ", math, re.M))
    assert {"1", "3.1", "8", "10", "11"} <= sections, sections
    cite = re.compile(r"MATH\.md(?:\)?,)?\s*(?:\(?sections?|§)\s*([\d.,\s\-andor/]+)")
    bad = []
    for path in files():
        for m in cite.finditer(read(path)):
            for num in re.findall(r"\d+(?:\.\d+)?", m.group(1)):
                if num not in sections:
                    bad.append(f"{os.path.relpath(path, REPO)}: {m.group(0).strip()!r} (no section {num})")
    assert not bad, "\n".join(bad)
