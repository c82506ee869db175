"""The README's quick start runs as written."""

import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_quick_start_runs():
    text = open(README).read()
    section = text[text.index("## Quick start") :]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(block, "README quick start", "exec"), namespace)
    assert namespace["y"].shape == (8, 128, 1024)
    assert namespace["layer"].miss_block["default"].grad is not None
