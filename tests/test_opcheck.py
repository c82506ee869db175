"""torch.library.opcheck on every operator: schema, fake kernel, autograd registration and
AOT dispatch, on representative inputs."""

import pytest
import torch

from conftest import DEVICES

ops = torch.ops.miss_ext


def _cases(device):
    f = dict(device=device)
    seed = torch.tensor([99], dtype=torch.int64)
    x = torch.randn(2, 3, 10, **f, requires_grad=True)
    s = torch.randn(2, 3, 4, **f, requires_grad=True)
    w = torch.randn(8, 12, **f, requires_grad=True)
    b = (0.1 * torch.randn(2, 4, 4, **f)).requires_grad_()
    g = torch.randn(8, 12, **f, requires_grad=True)
    xb = torch.randn(5, 12, **f, requires_grad=True)
    bias = torch.randn(8, **f, requires_grad=True)
    # Mixed precision: bfloat16 activations/weights with float32 blocks.
    bf = dict(device=device, dtype=torch.bfloat16)
    xh = torch.randn(2, 3, 10, **bf, requires_grad=True)
    wh = torch.randn(8, 12, **bf)
    xbh = torch.randn(5, 12, **bf, requires_grad=True)
    gh = torch.randn(5, 8, **bf, requires_grad=True)
    return {
        "blocksum": [(x, 4), (x.detach(), 16), (xh, 4, torch.float32)],
        "blocksum_dropout": [(x, 4, 0.3, seed), (xh, 4, 0.3, seed, torch.float32)],
        "tile": [(s, 10), (s.detach(), 3), (s, 10, torch.bfloat16)],
        "tile_dropout": [(s, 10, 0.5, seed), (s, 10, 0.5, seed, torch.float16)],
        "tile_add": [(x, s), (xh, s)],
        "bat_transform": [(w, b), (w.detach(), b), (wh, b, torch.bfloat16)],
        "bat_block_grad": [(g, w, 4)],
        "bat_input_grad": [(torch.randn(5, 8, **f, requires_grad=True), w, [b]),
                           (torch.randn(5, 8, **f), w.detach(), [b, b]),
                           (gh, wh, [b]), (gh.detach(), wh, [b, b])],
        "bat_io_block_grad": [(torch.randn(5, 8, **f, requires_grad=True), xb, w, 4), (gh, xbh, wh, 4),
                              (gh.detach(), xbh.detach(), wh, 2, torch.float64)],
        "bat_weight_grad": [(g, b)],
        "bat_linear": [(xb, w, bias, [b]), (xb, w.detach(), None, [b, b]),
                       (xbh, wh, bias.detach().bfloat16(), [b]), (xbh, wh, None, [b, b])],
        "bat_unmerge": [(w, b)],
        "miss_linear": [
            (xb, w.detach(), bias, torch.randn(4, 8, **f, requires_grad=True), 0.0, None),
            (xb, w, None, torch.randn(4, 2, **f, requires_grad=True), 0.25, seed),
            (xbh, wh, None, torch.randn(4, 8, **f, requires_grad=True), 0.0, None),
            (xbh, wh, bias.detach().bfloat16(), torch.randn(4, 2, **f, requires_grad=True), 0.25, seed),
        ],
        "miss_add_product": [(torch.randn(5, 8, **f, requires_grad=True), torch.randn(5, 4, **f, requires_grad=True),
                              torch.randn(4, 8, **f, requires_grad=True)),
                             (gh, torch.randn(5, 4, **f, requires_grad=True), torch.randn(4, 8, **f, requires_grad=True))],
        "miss_block_grads": [(torch.randn(5, 8, **f, requires_grad=True), torch.randn(5, 4, **f, requires_grad=True),
                              torch.randn(4, 8, **f, requires_grad=True)),
                             (gh, torch.randn(5, 4, **f), torch.randn(4, 8, **f, requires_grad=True))],
        "miss_merge": [(w, torch.randn(4, 8, **f, requires_grad=True), 1.0), (w, torch.randn(3, 2, **f), -1.0)],
        # Mixed-adapter rows: a standard and a mini block, index -1 for base rows.
        "miss_gathered_product": [
            (torch.randn(2, 3, 8, **f, requires_grad=True), torch.randn(2, 3, 4, **f, requires_grad=True),
             [torch.randn(4, 8, **f, requires_grad=True), torch.randn(4, 2, **f, requires_grad=True)],
             torch.tensor([[0, 1, -1], [1, 1, 0]], device=device)),
            (torch.randn(5, 8, **bf), torch.randn(5, 4, **f, requires_grad=True),
             [torch.randn(4, 8, **f, requires_grad=True)], torch.tensor([0, -1, 0, 0, -1], device=device)),
        ],
    }


OP_NAMES = list(_cases("cpu"))


def test_every_op_is_covered():
    registered = {
        name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("miss_ext::")
    }
    assert registered == set(OP_NAMES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OP_NAMES)
def test_opcheck(device, name):
    for args in _cases(device)[name]:
        torch.library.opcheck(getattr(ops, name).default, args)
