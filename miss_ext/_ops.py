"""Fake (meta) kernels and autograd formulas of the torch.ops.miss_ext operators, one module per
op family; importing this module registers all of them.

Every backward is built from registered operators only (ours and aten's), so
torch.compile(fullgraph=True) traces forward and backward without a graph break.
Formulas: docs/MATH.md sections 1-4, 6, 9 and 12.
"""

from . import _ops_bat, _ops_blocksum, _ops_gathered, _ops_merge, _ops_miss  # noqa: F401
