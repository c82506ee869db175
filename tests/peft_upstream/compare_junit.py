"""Compares two junit reports of the same tests, unpatched then patched: exits 1 when a test the
first run passed did not pass in the second (skipped counts as not passed) or when the second
passed nothing, or when the patched forward never ran (its call count, written by
miss_patch_plugin.py, is the third argument's file), and says which. Tests that fail in both runs fail without miss_ext (here: the
few that load a model from the Hugging Face Hub); they are listed, not counted against it."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def outcomes(path: str) -> dict[str, str]:
    result = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            result[name] = "failed"
        elif "skipped" in kinds:
            result[name] = "skipped"
        else:
            result[name] = "passed"
    return result


def main(base_path: str, patched_path: str, count_path: str) -> int:
    base, patched = outcomes(base_path), outcomes(patched_path)
    failed = sorted(n for n, o in patched.items() if o == "failed" and base.get(n) == "passed")
    both = sorted(n for n, o in patched.items() if o == "failed" and base.get(n) != "passed")
    lost = sorted(n for n, o in base.items() if o == "passed" and patched.get(n) != "passed")
    count = lambda d, o: sum(v == o for v in d.values())  # noqa: E731
    print(
        f"[peft_upstream] baseline: {count(base, 'passed')} passed, {count(base, 'skipped')} skipped, "
        f"{count(base, 'failed')} failed; patched: {count(patched, 'passed')} passed, "
        f"{count(patched, 'skipped')} skipped, {count(patched, 'failed')} failed"
    )
    for name in failed:
        print(f"[peft_upstream] failed under the patch: {name}")
    for name in both:
        print(f"[peft_upstream] fails without the patch too (not counted): {name}")
    for name in lost:
        if name not in failed:
            print(f"[peft_upstream] passed unpatched, not under the patch: {name}")
    try:
        calls = int(open(count_path).read())
    except (OSError, ValueError):
        calls = 0
    print(f"[peft_upstream] the patched MiSS forward ran {calls} times")
    if not calls:
        print("[peft_upstream] no patched layer ran: the patch was bypassed")
        return 1
    if not count(patched, "passed"):
        print("[peft_upstream] the patched run passed no test")
        return 1
    return 1 if failed or lost else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
