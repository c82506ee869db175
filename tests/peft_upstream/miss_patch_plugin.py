"""pytest plugin: runs a test session with every PEFT MiSS layer on miss_ext's kernels
(``miss_ext.peft.patch()``), counting the calls of the patched forward, so a run that silently
bypassed the patch cannot pass: the session fails when no patched layer ran, and the count is
written to the file ``MISS_EXT_UPSTREAM_COUNT`` names. Used by tests/peft_upstream/run.sh on
PEFT's own tests.

``MISS_EXT_UPSTREAM_PATCH=0`` loads the plugin without patching (the baseline run)."""

from __future__ import annotations

import os

import pytest

_calls = {"forward": 0}


def pytest_configure(config):
    if os.environ.get("MISS_EXT_UPSTREAM_PATCH", "1") == "0":
        return
    import miss_ext.peft as mp
    from peft.tuners.miss.layer import MissLinear

    mp.patch()
    patched = MissLinear.forward

    def counted(self, *args, **kwargs):
        _calls["forward"] += 1
        return patched(self, *args, **kwargs)

    MissLinear.forward = counted


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if os.environ.get("MISS_EXT_UPSTREAM_PATCH", "1") == "0":
        terminalreporter.write_line("miss_ext: baseline run, PEFT unpatched")
        return
    terminalreporter.write_line(f"miss_ext: patched PEFT MiSS forward ran {_calls['forward']} times")
    if os.environ.get("MISS_EXT_UPSTREAM_COUNT"):
        with open(os.environ["MISS_EXT_UPSTREAM_COUNT"], "w") as f:
            f.write(str(_calls["forward"]))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("MISS_EXT_UPSTREAM_PATCH", "1") != "0" and _calls["forward"] == 0 and session.testscollected:
        session.exitstatus = 1
