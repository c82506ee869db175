"""torch.library.opcheck on every operator: schema, fake kernel, autograd registration and
AOT dispatch, on the sample inputs of the per-op case table (tests/_op_cases.py); and the
table itself covers every registered operator."""

import pytest
import torch

from _op_cases import OPS
from conftest import DEVICES

ops = torch.ops.miss_ext


def test_every_op_is_covered():
    registered = {
        name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("miss_ext::")
    }
    assert registered == set(OPS)


@pytest.mark.parametrize("name", list(OPS))
def test_every_op_has_every_kind_of_case(name):
    """A new operator is tested once its table entry has samples, gradcheck, parity and
    bad-input cases (and a thread-invariance call)."""
    cases = OPS[name]
    assert cases.samples("cpu"), "no opcheck samples"
    assert cases.gradcheck, "no gradcheck cases"
    assert cases.parity, "no parity cases (CPU against the reference, CUDA against the CPU)"
    assert cases.bad and any(c.fake for c in cases.bad), "no bad-input cases the fake kernel can check"
    assert cases.threads, "no thread-invariance case"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(OPS))
def test_opcheck(device, name):
    for args in OPS[name].samples(device):
        torch.library.opcheck(getattr(ops, name).default, args)
