"""What the operator families share: the ``torch.ops.miss_ext`` handle, the argument rules their
fake kernels apply (those of csrc/front/, with the same messages, so meta tensors,
FakeTensor and torch.compile tracing reject exactly what the real kernels reject), the dtype
relation ``holds``, the autograd helper ``needs``, the half-type GEMM helpers, and the autograd
registration every family uses (``register_autograd``) with its eager path (``call``)."""

import os
from typing import Optional

import torch
from torch._library.utils import is_tensorlist_like_type

from ._checks import FLOATS

ops = torch.ops.miss_ext
LIB = "miss_ext::"

# Dtypes as the C++ checks print them (c10::ScalarType names), so both kernels' messages agree.
_CPP_DTYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16", torch.float16: "Half",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool",
}


def cpp_dtype(dtype):
    return _CPP_DTYPE_NAMES.get(dtype, str(dtype))


def needs(ctx, i):
    return ctx.needs_input_grad[i]


def check_float(op, name, t):
    torch._check(
        t.dtype in FLOATS,
        lambda: f"miss_ext.{op}: argument '{name}' must be float32, float64, bfloat16 or float16 "
        f"(got {cpp_dtype(t.dtype)}); cast it with .float() or .to(dtype)",
    )


def check_rank(op, name, r):
    torch._check(r > 0, lambda: f"miss_ext.{op}: argument '{name}' (the block size r) must be a positive integer (got {r})")


def check_dim(op, name, t, dim, shape):
    torch._check(
        t.dim() == dim,
        lambda: f"miss_ext.{op}: argument '{name}' must be {dim}-D with shape {shape} (got {t.dim()}-D shape {list(t.shape)})",
    )


def same_dtype(op, name_a, a, name_b, b):
    torch._check(
        a.dtype == b.dtype,
        lambda: f"miss_ext.{op}: arguments '{name_a}' ({cpp_dtype(a.dtype)}) and '{name_b}' ({cpp_dtype(b.dtype)}) must have "
        f"the same dtype; cast one with .to(dtype)",
    )


def same_device(op, **tensors):
    (first_name, first), *rest = [(k, v) for k, v in tensors.items() if v is not None]
    for name, t in rest:
        torch._check(
            t.device == first.device,
            lambda: f"miss_ext.{op}: arguments '{first_name}' (on {first.device}) and '{name}' "
            f"(on {t.device}) must be on the same device; move one with .to(device)",
        )


def check_features_last(op, name, t, what):
    torch._check(t.dim() >= 1, lambda: f"miss_ext.{op}: argument '{name}' must have at least 1 dimension ({what} last), got a scalar")


def check_dropout(op, p, seed):
    torch._check(0.0 <= p <= 1.0, lambda: f"miss_ext.{op}: argument 'p' (the dropout probability) must be in [0, 1] (got {p:g})")
    torch._check(
        seed.device.type == "cpu" and seed.dtype == torch.int64 and seed.numel() == 1,
        lambda: f"miss_ext.{op}: argument 'seed' must be a CPU int64 tensor with one element (got {seed.type()} of shape {list(seed.shape)}); "
        "draw one with miss_ext.functional.dropout_seed()",
    )


_WIDER = {torch.bfloat16: (torch.float32, torch.float64), torch.float16: (torch.float32, torch.float64),
          torch.float32: (torch.float64,), torch.float64: ()}


def holds(narrow, wide):
    """Whether dtype ``wide`` holds every value of ``narrow`` (csrc/front/checks.cpp ``holds``)."""
    return wide == narrow or wide in _WIDER.get(narrow, ())


def check_holds(op, x_name, x, block):
    torch._check(
        holds(x.dtype, block.dtype),
        lambda: f"miss_ext.{op}: argument 'block' ({cpp_dtype(block.dtype)}) must have {x_name}'s dtype ({cpp_dtype(x.dtype)}) or a "
        "wider float that holds it (a float32 block on a bfloat16 base is the mixed-precision layer); cast one of them",
    )


def check_bias(op, bias, out_f):
    """The optional bias of a linear op (csrc/front/checks.cpp checked_bias)."""
    if bias is None:
        return
    check_float(op, "bias", bias)
    torch._check(
        bias.dim() == 1 and bias.shape[0] == out_f,
        lambda: f"miss_ext.{op}: argument 'bias' must have shape (out_features,) = ({out_f},) (got {list(bias.shape)})",
    )


_EMULATED = {}
_HALF = (torch.bfloat16, torch.float16)
_UPCAST_ELEMS = 1 << 22  # fp32 elements of one upcast weight slab (16 MB)


def emulated_half_gemm(t: torch.Tensor) -> bool:
    """True for a bf16/fp16 CPU tensor where torch has no native GEMM of that type (oneDNN lacks
    the ISA, e.g. AVX2 only) and emulates it: measured there (AMD EPYC, AVX2, torch 2.13) at
    0.7 GFLOP/s for ``G @ W`` (a linear layer's input gradient) against 110 for the same product
    upcast to fp32, conversions included."""
    if t.dtype not in _HALF or t.device.type != "cpu":  # dtype first: the cheaper test
        return False
    if t.dtype not in _EMULATED:
        # MISS_EXT_CPU_HALF_GEMM=upcast or =aten forces the choice, as for the C++ ops
        # (csrc/front/half_gemm.cpp); tests run both on any CPU.
        force = os.environ.get("MISS_EXT_CPU_HALF_GEMM", "")
        if force in ("upcast", "aten"):
            _EMULATED[t.dtype] = force == "upcast"
            return _EMULATED[t.dtype]
        if force:
            raise ValueError(f"miss_ext: MISS_EXT_CPU_HALF_GEMM must be 'upcast', 'aten' or unset (got {force!r})")
        query = "_is_mkldnn_bf16_supported" if t.dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
        try:
            _EMULATED[t.dtype] = not getattr(torch.ops.mkldnn, query)()
        except (AttributeError, RuntimeError):  # a build without the query: take torch's GEMM
            _EMULATED[t.dtype] = False
    return _EMULATED[t.dtype]


def half_mm(a: torch.Tensor, b: torch.Tensor, a32: Optional[torch.Tensor] = None,
            b32: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ b`` in a's dtype (e.g. ``G @ W``, the frozen layer's input gradient). Where torch
    emulates the half type's GEMM, the product runs in fp32 on the exact upcast operands and is
    rounded once: the half-type GEMM's own arithmetic (fp32 accumulation, one rounding), summed in
    another order. ``b`` is upcast a column slab at a time, so for a weight the transient fp32
    copy stays near 16 MB, not weight-sized. ``a32``/``b32``: an operand already upcast, for a
    caller that uses it in several products (G is then read once)."""
    if not (emulated_half_gemm(a) and b.dtype == a.dtype):
        return a @ b
    if a32 is None:
        a32 = a.float()
    k, n = b.shape
    width = max(1, _UPCAST_ELEMS // max(1, k))
    if b32 is not None or width >= n:
        return torch.mm(a32, b.float() if b32 is None else b32).to(a.dtype)
    out = a.new_empty((a.shape[0], n))
    for c0 in range(0, n, width):
        c1 = min(n, c0 + width)
        out[:, c0:c1] = torch.mm(a32, b[:, c0:c1].float())
    return out


def upcast_if_emulated(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t`` in fp32 where torch emulates its half type's GEMM (to be shared by several
    products), else None."""
    return t.float() if emulated_half_gemm(t) else None


# ---------------------------------------------------------------- eager autograd
#
# torch.library.register_autograd wraps each op in Python glue that runs on every call, with or
# without grad: a generated autograd.Function, a Python redispatch and a rebuild of the argument
# list from the schema (~60-100 us per call on a 2-core CPU, more than a small layer's kernels).
# In eager mode the functional wrappers call the op through a lean autograd.Function of the same
# setup/backward formulas instead, and run the backward below autograd, so the ops inside it go
# straight to their kernels. torch.compile, functorch transforms, tensor subclasses and
# torch-function modes keep the registered path (the op itself), which is what they trace.

_EAGER = {}  # op name -> (autograd.Function, OpOverload, schema defaults, tensor-list positions)
_peek_functorch = getattr(torch._C._functorch, "peek_interpreter_stack", None)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


# MISS_EXT_EAGER_AUTOGRAD=0 (read at import) keeps every call on torch.library's path; tests and
# bench.overhead_bench switch "enabled" at run time to compare the two.
EAGER_AUTOGRAD = {"enabled": os.environ.get("MISS_EXT_EAGER_AUTOGRAD", "1") != "0"}


class _Unpacked:
    """A backward's ctx with its saved tensors unpacked once (checkpointing allows one unpack)
    and, for an op with tensor-list arguments, ``needs_input_grad`` in the op's argument
    structure (a list of flags for a list argument, as torch.library passes it)."""

    __slots__ = ("_ctx", "saved_tensors", "needs_input_grad")

    def __init__(self, ctx, needs_input_grad) -> None:
        self._ctx = ctx
        self.saved_tensors = ctx.saved_tensors
        self.needs_input_grad = needs_input_grad

    def __getattr__(self, name):
        return getattr(self._ctx, name)


def _unflatten(lengths, flat):
    """The op's arguments from the Function's flat inputs: ``lengths[i]`` is None for a plain
    argument, the list's length for a tensor list (an autograd.Function sees no tensors inside
    lists, so they travel as separate inputs)."""
    args, k = [], 0
    for n in lengths:
        if n is None:
            args.append(flat[k])
            k += 1
        else:
            args.append(list(flat[k:k + n]))
            k += n
    return args


def register_autograd(name: str, backward, setup_context) -> None:
    """``torch.library.register_autograd`` for ``miss_ext::name``, plus the eager
    ``autograd.Function`` of the same two formulas that :func:`call` uses."""
    torch.library.register_autograd(LIB + name, backward, setup_context=setup_context)
    op = getattr(ops, name).default
    arguments = op._schema.arguments
    defaults = tuple(a.default_value if a.has_default_value() else None for a in arguments)
    lists = tuple(i for i, a in enumerate(arguments) if is_tensorlist_like_type(a.type))

    def forward(ctx, lengths, *flat):
        args = _unflatten(lengths, flat) if lists else flat
        with torch._C._AutoDispatchBelowAutograd():
            out = op(*args)
        # The formulas read needs_input_grad in the op's argument structure, without `lengths`.
        flags = ctx.needs_input_grad
        ctx.needs_input_grad = tuple(_unflatten(lengths, flags[1:])) if lists else flags[1:]
        try:
            setup_context(ctx, tuple(args), out)
        finally:
            ctx.needs_input_grad = flags
        ctx.miss_ext_lengths = lengths
        return out

    def backward_eager(ctx, *grads):
        lengths = ctx.miss_ext_lengths
        needs = ctx.needs_input_grad[1:]  # the first input is `lengths`
        # Saved tensors are unpacked first, outside the guard below: unpacking may run user code
        # that must record autograd (non-reentrant checkpointing recomputes the forward there).
        unpacked = _Unpacked(ctx, _unflatten(lengths, needs) if lists else needs)
        if torch.is_grad_enabled():  # create_graph: the backward's own ops record their graph
            result = backward(unpacked, *grads)
        else:
            with torch._C._AutoDispatchBelowAutograd():
                result = backward(unpacked, *grads)
        if not isinstance(result, tuple):
            result = (result,)
        flat = [None]
        for i, n in enumerate(lengths):
            g = result[i] if i < len(result) else None
            if n is None:
                flat.append(g)
            else:
                flat.extend(g if g is not None else [None] * n)
        return tuple(flat)

    fn = type(f"MissExt_{name}", (torch.autograd.Function,),
              {"forward": staticmethod(forward), "backward": staticmethod(backward_eager)})
    _EAGER[name] = (fn, op, defaults, lists)


def _eager_context() -> bool:
    """Whether the call may bypass the op's registered autograd: not while torch.compile traces,
    not inside a functorch transform, not under a torch-function mode."""
    return not (
        torch.compiler.is_compiling()
        or _peek_functorch is None
        or _peek_functorch() is not None
        or torch._C._is_torch_function_mode_enabled()
    )


def call(name: str, *args):
    """``torch.ops.miss_ext.<name>(*args)``, taken through the eager autograd.Function where
    :func:`_eager_context` allows and every tensor is a plain one (same kernels, same formulas,
    same numbers); otherwise through the op and its registered autograd."""
    entry = _EAGER.get(name)
    if entry is None or not EAGER_AUTOGRAD["enabled"] or not _eager_context():
        return getattr(ops, name)(*args)
    fn, op, defaults, lists = entry
    if len(args) < len(defaults):
        args = args + defaults[len(args):]
    flat, lengths = args, (None,) * len(args)
    if lists:
        flat, lengths = [], []
        for i, a in enumerate(args):
            if i in lists:
                flat.extend(a)
                lengths.append(len(a))
            else:
                flat.append(a)
                lengths.append(None)
        lengths = tuple(lengths)
    grad = False
    for a in flat:  # one pass: plain tensors only (a subclass keeps the registered op), any grad
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN:
                return getattr(ops, name)(*args)
            grad = grad or a.requires_grad
    if grad and torch.is_grad_enabled():
        return fn.apply(lengths, *flat)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


class _EagerOps:
    """``torch.ops.miss_ext`` for the functional wrappers: ``eager_ops.name(*args)`` is
    :func:`call`. Positional arguments only (the eager path fills the schema's defaults)."""

    def __getattr__(self, name):
        getattr(ops, name)  # an unknown op fails here, as on torch.ops
        caller = lambda *args: call(name, *args)  # noqa: E731
        setattr(self, name, caller)  # found as an attribute from now on: no lookup per call
        return caller


eager_ops = _EagerOps()
