"""Shared network pieces: MLP builder, vectorised ensembles, policy heads, target updates.

Everything numeric that more than one algorithm needs lives here, once. Relu networks run through
fast paths (:func:`relu_mlp`): fused oneDNN layers, a hand-written backward, optional bfloat16 hidden
layers under :func:`compute_precision`; every other activation takes the plain module path.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import itertools
import math
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

T = TypeVar("T")
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU}


def mlp(
    in_dim: int,
    out_dim: int,
    hidden: Sequence[int],
    activation: str = "relu",
    output_activation: str | None = None,
) -> nn.Sequential:
    """``in_dim → hidden… → out_dim`` with ``activation`` between layers."""
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    dims = [in_dim, *hidden]
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), act()]
    layers.append(nn.Linear(dims[-1], out_dim))
    if output_activation is not None:
        layers.append(ACTIVATIONS[output_activation]())
    return nn.Sequential(*layers)


# -- fast relu MLPs ------------------------------------------------------------------------------
# Critic ensembles dominate the cost of continuous CQL (and SAC-style) updates. The relu paths below
# run each hidden layer as one oneDNN matmul with bias and relu fused (CPU), keep only what the
# backward needs, and can run the hidden layers in bfloat16 (AMX / AVX-512 BF16) inside
# ``compute_precision("bf16")``. Master weights stay float32 and the output layer is always float32,
# so Q-values, TD errors and losses keep float32 precision. Under ``no_grad`` (acting, targets) the
# same kernels run without the autograd bookkeeping.

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
_precision = threading.local()
_MKLDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# Below this many observation features, projecting observations once per state (the split first
# layer) costs more memory passes over the (rows, hidden) activations than the matmul work it saves.
SPLIT_MIN_OBS = 32
# Ensembles with fewer rows × widest layer than this run through plain autograd ops in float32: the
# hand-written path only pays once the matmuls outweigh its Python bookkeeping.
FAST_MIN_SIZE = 256 * 1024
_HEAD_ROWS = 1024  # rows cast to float32 at a time for a bfloat16 output layer: the cast stays in cache


def _compute_dtype() -> torch.dtype:
    dtype: torch.dtype = getattr(_precision, "dtype", torch.float32)
    return dtype


@contextlib.contextmanager
def compute_precision(precision: str) -> Iterator[None]:
    """Within the block, hidden layers of relu MLPs and ensembles compute in ``precision``.

    "fp32" or "bf16"; weights, outputs and everything outside the relu paths stay float32. Algorithms
    wrap their ``update`` in it; acting outside the block is unaffected (policies act in float32).
    Without native bfloat16 (see :func:`bf16_supported`), "bf16" computes in float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    previous = _compute_dtype()
    _precision.dtype = PRECISIONS[precision]
    try:
        yield
    finally:
        _precision.dtype = previous


FLUSH_DENORMAL_HELP = (
    "flush subnormal floats to zero on CPU (x86 FTZ/DAZ, process-wide): Adam's moments of "
    "weights that stop getting gradient (dead relu units) decay into subnormals, where CPU "
    "arithmetic is ~100× slower; results differ from a run without it, so it is recorded"
)


def set_cpu_numerics(threads: int, flush_denormal: bool) -> None:
    """A run's process-wide torch settings: intra-op threads and subnormal flushing (both change results)."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush_denormal)


def bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (AVX-512 BF16 / AMX) through oneDNN."""
    return bool(_MKLDNN_LINEAR and torch.ops.mkldnn._is_mkldnn_bf16_supported())


_allocator_tuned: bool | None = None  # None: not tried yet


def keep_freed_memory() -> bool:
    """Let glibc keep freed heap memory for reuse instead of returning it to the system (idempotent).

    The relu ensemble paths allocate and free activations of several MB every step; with glibc's
    defaults each such block comes back as fresh pages, and the page faults cost about a fifth of a
    continuous CQL step on CPU. The process then holds its peak heap until exit. Returns whether the
    allocator was tuned (False on other C libraries).
    """
    global _allocator_tuned
    if _allocator_tuned is None:
        _allocator_tuned = False
        try:
            mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        except (OSError, AttributeError):
            return False
        m_trim_threshold, m_mmap_threshold = -1, -3
        # 32 MB is glibc's upper limit for the mmap threshold on 64-bit systems
        _allocator_tuned = (
            mallopt(m_mmap_threshold, 32 << 20) == 1 and mallopt(m_trim_threshold, 1 << 30) == 1
        )
    return _allocator_tuned


def hidden_dtype(device: torch.device) -> torch.dtype:
    """The dtype relu MLPs' hidden layers compute in on ``device`` under the current :func:`compute_precision`."""
    dt = _compute_dtype()
    if dt != torch.float32 and device.type == "cpu" and not bf16_supported():
        return torch.float32  # emulated bfloat16 would only be slower
    return dt


def _linear_relu(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``relu(x @ w.T + b)``, one oneDNN call with bias and relu fused on CPU: (R, in), (out, in), (out,)."""
    if _MKLDNN_LINEAR and x.device.type == "cpu":
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "relu", [], "")
    return F.linear(x, w, b).relu_()


def _relu_grad_(grad: Tensor, out: Tensor) -> Tensor:
    """In place: ``grad`` where the relu output ``out`` is positive, else 0."""
    return torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)


def _output_layer(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Float32 ``h @ w.T + b`` for a float32 or bfloat16 ``h`` (R, H); ``w`` (out, H), ``b`` (out,) float32.

    A bfloat16 matmul would round the outputs (Q-values) to 3 significant digits, so a bfloat16 ``h``
    is cast in blocks of rows that stay in cache instead of as one float32 copy in memory.
    """
    if h.dtype == torch.float32:
        return torch.addmm(b, h, w.t())
    out = torch.empty(h.shape[0], w.shape[0], dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], _HEAD_ROWS):
        torch.addmm(b, h[start : start + _HEAD_ROWS].float(), w.t(), out=out[start : start + _HEAD_ROWS])
    return out


def _mlp_forward(
    x_state: Tensor | None,
    x_rest: Tensor,
    low_w: Sequence[Tensor],
    low_b: Sequence[Tensor],
    w: Tensor,
    b: Tensor,
) -> tuple[Tensor, list[Tensor]]:
    """One relu MLP: its output (R, out) and hidden activations (what the backward needs).

    ``low_w``/``low_b``: hidden layers, (out, in)/(out,), in the compute dtype; ``w``/``b``: the float32
    output layer. With ``x_state`` (B, Ds) the input is ``[x_state repeated M times | x_rest]`` (R = B·M
    rows) and the first layer projects each state once: W·[s; a] = W_s·s + W_a·a.
    """
    if x_state is None:
        h = _linear_relu(x_rest, low_w[0], low_b[0])
    else:
        ds = x_state.shape[1]
        per_state = torch.addmm(low_b[0], x_state, low_w[0][:, :ds].t())  # (B, H)
        h = torch.mm(x_rest, low_w[0][:, ds:].t())  # (R, H)
        h.view(x_state.shape[0], -1, h.shape[1]).add_(per_state.unsqueeze(1)).relu_()
    acts = [h]
    for lw, lb in zip(low_w[1:], low_b[1:], strict=True):
        h = _linear_relu(h, lw, lb)
        acts.append(h)
    return _output_layer(h, w, b), acts


def _mlp_backward(
    grad: Tensor,
    acts: Sequence[Tensor],
    x_state: Tensor | None,
    x_rest: Tensor,
    low_w: Sequence[Tensor],
    need: Sequence[bool],
) -> tuple[list[Tensor | None], list[Tensor | None], Tensor | None, Tensor | None]:
    """Float32 gradients of one MLP of :func:`_mlp_forward` from the output gradient (R, out).

    ``low_w``: every layer's weight in the compute dtype; ``need``: (state, rest, weight per layer…,
    bias per layer…). Returns weight grads (out, in), bias grads (out,), state and rest grads.
    """
    n = len(low_w)
    need_state, need_rest, need_w, need_b = need[0], need[1], need[2 : 2 + n], need[2 + n :]
    gw: list[Tensor | None] = [None] * n
    gb: list[Tensor | None] = [None] * n
    g_low = grad.to(low_w[0].dtype)
    if need_w[-1]:
        gw[-1] = torch.mm(g_low.t(), acts[-1]).float()
    if need_b[-1]:
        gb[-1] = grad.sum(0)
    gh = _relu_grad_(torch.mm(g_low, low_w[-1]), acts[-1])
    for i in range(n - 2, 0, -1):
        x = acts[i - 1]
        if need_w[i]:
            gw[i] = torch.mm(gh.t(), x).float()
        if need_b[i]:
            gb[i] = gh.sum(0).float()
        gh = _relu_grad_(torch.mm(gh, low_w[i]), x)
    g_state = g_rest = None
    if x_state is None:
        if need_w[0]:
            gw[0] = torch.mm(gh.t(), x_rest).float()
        if need_b[0]:
            gb[0] = gh.sum(0).float()
        if need_rest:
            g_rest = torch.mm(gh, low_w[0]).float()
        return gw, gb, g_state, g_rest
    ds = x_state.shape[1]
    per_state = gh.view(x_state.shape[0], -1, gh.shape[1]).sum(1)  # (B, H)
    if need_w[0]:
        gw[0] = torch.cat([torch.mm(per_state.t(), x_state), torch.mm(gh.t(), x_rest)], dim=1).float()
    if need_b[0]:
        gb[0] = per_state.sum(0).float()
    if need_rest:
        g_rest = torch.mm(gh, low_w[0][:, ds:]).float()
    if need_state:
        g_state = torch.mm(per_state, low_w[0][:, :ds]).float()
    return gw, gb, g_state, g_rest


def _stack(grads: list[Tensor | None]) -> Tensor | None:
    """Per-member gradients of one tensor stacked to (E, …), or None where none was needed."""
    return None if grads[0] is None else torch.stack(grads)  # type: ignore[arg-type]


def _sum(grads: list[Tensor | None]) -> Tensor | None:
    """Gradient of an input all members share: the sum over members, or None where none was needed."""
    return None if grads[0] is None else torch.stack(grads).sum(0)  # type: ignore[arg-type]


class _ReluMLPFunction(torch.autograd.Function):
    """Autograd of E relu MLPs on one shared input (see :func:`relu_mlp`).

    Inputs after ``n_layers, state, rest``: the float32 weights (E, out, in) and biases (E, out) of
    every layer, then every weight and the hidden biases in the compute dtype.
    """

    @staticmethod
    def forward(ctx: Any, n_layers: int, state: Tensor | None, rest: Tensor, *tensors: Tensor) -> Tensor:
        weights, biases = tensors[:n_layers], tensors[n_layers : 2 * n_layers]
        low_w, low_b = tensors[2 * n_layers : 3 * n_layers], tensors[3 * n_layers :]
        dt = low_w[0].dtype
        x_state = None if state is None else state.to(dt)
        x_rest = rest.to(dt)
        outs, acts = [], []
        for e in range(weights[0].shape[0]):
            member_w = [w[e] for w in low_w[:-1]]
            member_b = [b[e] for b in low_b]
            out_e, acts_e = _mlp_forward(x_state, x_rest, member_w, member_b, weights[-1][e], biases[-1][e])
            outs.append(out_e)
            acts += acts_e
        ctx.n_layers = n_layers
        # saved (not kept on ctx) so autograd frees them after backward, unless the graph is retained
        ctx.save_for_backward(x_state, x_rest, *low_w, *acts)
        return torch.stack(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        n = ctx.n_layers
        x_state, x_rest, *saved = ctx.saved_tensors
        low_w, acts = saved[:n], saved[n:]
        need = ctx.needs_input_grad[1 : 3 + 2 * n]
        members = [
            _mlp_backward(
                grad[e], acts[e * (n - 1) : (e + 1) * (n - 1)], x_state, x_rest, [w[e] for w in low_w], need
            )
            for e in range(grad.shape[0])
        ]
        gw = [_stack([m[0][i] for m in members]) for i in range(n)]
        gb = [_stack([m[1][i] for m in members]) for i in range(n)]
        g_state, g_rest = _sum([m[2] for m in members]), _sum([m[3] for m in members])
        return (None, g_state, g_rest, *gw, *gb, *([None] * (2 * n - 1)))


def relu_mlp(
    state: Tensor | None, rest: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor]
) -> Tensor:
    """E relu MLPs on one shared input, hidden layers in the :func:`compute_precision` dtype -> (E, R, out).

    ``weights``/``biases``: every layer's (E, out, in)/(E, out). ``rest`` (R, Da); ``state`` (B, Ds) or
    None, with R = B·M: the input is then ``[state repeated M times | rest]``, and with at least
    ``SPLIT_MIN_OBS`` state features the first layer projects each state once. Equal to the plain
    computation up to float rounding; the output layer is float32.
    """
    if state is not None and state.shape[1] < SPLIT_MIN_OBS:
        rest = torch.cat([state.repeat_interleave(rest.shape[0] // state.shape[0], 0), rest], dim=1)
        state = None
    if _allocator_tuned is None and rest.device.type == "cpu":
        keep_freed_memory()
    dt = hidden_dtype(rest.device)
    low_w = [w.detach().to(dt) for w in weights]
    low_b = [b.detach().to(dt) for b in biases[:-1]]
    tensors = (*weights, *biases)
    inputs = (rest, *tensors) if state is None else (state, rest, *tensors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        out: Tensor = _ReluMLPFunction.apply(len(weights), state, rest, *tensors, *low_w, *low_b)
        return out
    x_state = None if state is None else state.to(dt)
    x_rest = rest.to(dt)
    outs = [
        _mlp_forward(
            x_state,
            x_rest,
            [w[e] for w in low_w[:-1]],
            [b[e] for b in low_b],
            weights[-1][e].detach(),
            biases[-1][e].detach(),
        )[0]
        for e in range(weights[0].shape[0])
    ]
    return torch.stack(outs)


_OUTPUT_SPLIT: weakref.WeakKeyDictionary[nn.Sequential, tuple[nn.Module, nn.Module, nn.Module | None]]
_OUTPUT_SPLIT = weakref.WeakKeyDictionary()


def _output_split(seq: nn.Sequential) -> tuple[nn.Module, nn.Module, nn.Module | None] | None:
    """``seq`` as (hidden part, output Linear, trailing activation or None), for MLPs as :func:`mlp` builds."""
    if seq not in _OUTPUT_SPLIT:
        mods = list(seq)
        tail = mods.pop() if len(mods) > 1 and not isinstance(mods[-1], nn.Linear) else None
        if len(mods) < 2 or not isinstance(mods[-1], nn.Linear):
            return None
        _OUTPUT_SPLIT[seq] = (nn.Sequential(*mods[:-1]), mods[-1], tail)
    return _OUTPUT_SPLIT[seq]


def run_mlp(seq: nn.Sequential, x: Tensor) -> Tensor:
    """``seq(x)``, with the hidden layers in bfloat16 inside ``compute_precision("bf16")``.

    Policy-sized MLPs are bound by per-op overhead, so their hidden layers simply run under autocast
    (bfloat16 matmuls; the hand-written path of :func:`relu_mlp` does not pay at these sizes). The
    output layer stays float32, so actions, log-probabilities and Q-values keep float32 precision.
    """
    dt = hidden_dtype(x.device)
    parts = _output_split(seq) if dt != torch.float32 and x.dtype == torch.float32 else None
    if parts is None:
        return seq(x)
    hidden, output, tail = parts
    with torch.autocast(x.device.type, dtype=dt):
        h = hidden(x)
    y = output(h.float())
    return y if tail is None else tail(y)


# -- hand-written training passes of one relu MLP ------------------------------------------------
# A BC or discrete-CQL step trains one 2×256 MLP on 256 rows: three 256×256×256 matmuls. Through eager
# autograd, building and walking the graph and Optimizer.step's bookkeeping cost about as much again.
# These passes run the same maths as explicit matmuls outside autograd: the forward keeps the hidden
# activations, the algorithm computes its loss gradient w.r.t. the outputs analytically, and the
# backward writes every parameter's ``.grad`` (as ``zero_grad(set_to_none=True)`` + ``backward``
# would). Hidden layers compute in the :func:`compute_precision` dtype, the output layer in float32.

HAND_BACKWARD = True  # False routes BC and discrete CQL through autograd (tests compare the two)


def relu_linears(seq: nn.Module, output_activation: type[nn.Module] | None = None) -> list[nn.Linear] | None:
    """The Linear layers of ``seq`` if it is ``Linear, ReLU, …, Linear`` with float32 parameters, followed
    by an ``output_activation`` module when one is given (the caller applies it); otherwise None."""
    if not isinstance(seq, nn.Sequential):
        return None
    mods = list(seq)
    if output_activation is not None:
        if not mods or type(mods[-1]) is not output_activation:
            return None
        mods.pop()
    linears = mods[::2]
    if len(mods) < 3 or len(mods) % 2 == 0 or not all(type(m) is nn.ReLU for m in mods[1::2]):
        return None
    if not all(type(m) is nn.Linear and m.bias is not None for m in linears):
        return None
    if any(p.dtype != torch.float32 for m in linears for p in m.parameters()):
        return None
    return linears  # type: ignore[return-value]


class MLPTape:
    """What :func:`relu_mlp_backward` needs from :func:`relu_mlp_train_forward`, for the rows that
    receive gradient: every layer's input in the dtype the layer computes in (a hidden layer's relu
    output is the next layer's input) and the hidden weights in that dtype."""

    __slots__ = ("inputs", "low_w")

    def __init__(self, inputs: list[Tensor], low_w: list[Tensor]) -> None:
        self.inputs, self.low_w = inputs, low_w


@torch.no_grad()
def relu_mlp_train_forward(
    layers: Sequence[nn.Linear], x: Tensor, grad_rows: int | None = None
) -> tuple[Tensor, MLPTape]:
    """Outputs (R, out) float32 of the relu MLP ``layers`` on ``x`` (R, in), and the tape of its first
    ``grad_rows`` rows (None: all; 0: no tape) for :func:`relu_mlp_backward`. Equal to ``seq(x)``
    (without a trailing activation) up to float rounding; no autograd graph is built."""
    if _allocator_tuned is None and x.device.type == "cpu":
        keep_freed_memory()  # the (R, 256) activations would otherwise come back as fresh pages each step
    weights, biases = layer_params(layers)
    return mlp_train_forward(weights, biases, x, hidden_dtype(x.device), grad_rows)


@torch.no_grad()
def relu_mlp_backward(layers: Sequence[nn.Linear], tape: MLPTape, grad: Tensor) -> None:
    """Set every parameter's ``.grad`` of the MLP of :func:`relu_mlp_train_forward` to the gradient of a
    loss whose gradient w.r.t. the kept rows' outputs is ``grad`` (rows, out) float32. Overwrites
    (does not accumulate), like ``backward`` after ``zero_grad(set_to_none=True)``."""
    params = [p for lin in layers for p in (lin.weight, lin.bias)]
    set_grads(params, mlp_backward(params[0::2], tape, grad, [p.grad for p in params]))


def layer_params(layers: Sequence[nn.Linear]) -> tuple[list[Tensor], list[Tensor]]:
    """The weights (out, in) and biases (out,) of ``layers``, in order."""
    return [lin.weight for lin in layers], [lin.bias for lin in layers]


def _compiling() -> bool:
    """Whether torch.compile is tracing the caller (``torch.compiler.is_compiling`` from torch 2.3 on)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return bool(is_compiling())


def set_grads(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """Make ``grads`` the parameters' ``.grad`` (those written in place already are left as they are)."""
    for p, g in zip(params, grads, strict=True):
        if p.grad is not g:
            p.grad = g


GradsFn = Callable[..., tuple[dict[str, Tensor], list[Tensor]]]


def hand_step_applies(compile_mode: str | None, device: torch.device) -> bool:
    """Whether an algorithm with a hand-written step runs it: eagerly everywhere, compiled on CPU. On
    CUDA a compiled step stays the autograd one, the one ``benchmarks/gpu_check.py`` checked there."""
    return HAND_BACKWARD and (compile_mode is None or device.type == "cpu")


def run_hand_step(
    grads_fn: GradsFn, layers: Sequence[nn.Linear], *inputs: Any, in_place: bool = True
) -> dict[str, Tensor]:
    """Run a hand-written step's gradient function and leave its gradients in the layers' ``.grad``.

    ``grads_fn(*inputs, weights, biases, dtype, out) -> (metrics, grads)`` computes the float32
    gradients ``[w₀, b₀, w₁, b₁, …]`` of the relu MLP ``layers`` (hidden layers in ``dtype``, as
    :func:`compute_precision` sets) from tensors alone, writing them into ``out`` where given. With
    ``in_place`` they go straight into existing ``.grad`` memory; a compiled ``grads_fn`` returns fresh
    ones instead (writes into its inputs would only be copied back).
    """
    device = layers[0].weight.device
    if _allocator_tuned is None and device.type == "cpu":
        keep_freed_memory()  # the (R, 256) activations would otherwise come back as fresh pages each step
    params = [p for lin in layers for p in (lin.weight, lin.bias)]
    out = [p.grad for p in params] if in_place else None
    metrics, grads = grads_fn(*inputs, params[0::2], params[1::2], hidden_dtype(device), out)
    set_grads(params, grads)
    return metrics


# The two passes below are functions of tensors only, so that a training step built from them can be
# compiled (``compile`` setting) once for every instance; under ``torch.compile`` they use plain ops
# (inductor cannot lower oneDNN's fused linear) and inductor fuses the elementwise work between matmuls.


@torch.no_grad()
def mlp_train_forward(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    x: Tensor,
    dtype: torch.dtype,
    grad_rows: int | None = None,
) -> tuple[Tensor, MLPTape]:
    """:func:`relu_mlp_train_forward` of the relu MLP with these float32 weights (out, in) and biases,
    hidden layers in ``dtype``."""
    fused = _MKLDNN_LINEAR and x.device.type == "cpu" and not _compiling()
    tape = MLPTape([], [])
    h = x
    for weight, bias in zip(weights[:-1], biases[:-1], strict=True):
        if dtype == torch.float32:
            w, inp = weight, h
            h = F.linear(inp, w, bias).relu_()  # MKL's matmul beats oneDNN's fused relu in float32
        elif fused:  # oneDNN adds a float32 bias to the low-precision matmul
            w, inp = weight.to(dtype), h.to(dtype)
            h = torch.ops.mkldnn._linear_pointwise(inp, w, bias, "relu", [], "")
        else:
            w, inp = weight.to(dtype), h.to(dtype)
            h = F.linear(inp, w, bias.to(dtype)).relu_()
        if grad_rows != 0:
            tape.low_w.append(w)
            tape.inputs.append(inp if grad_rows is None else inp[:grad_rows])
    inp = h.float()
    if grad_rows != 0:
        tape.inputs.append(inp if grad_rows is None else inp[:grad_rows])
    return F.linear(inp, weights[-1], biases[-1]), tape


@torch.no_grad()
def mlp_backward(
    weights: Sequence[Tensor], tape: MLPTape, grad: Tensor, out: Sequence[Tensor | None] | None = None
) -> list[Tensor]:
    """Float32 gradients ``[w₀, b₀, w₁, b₁, …]`` of the MLP of :func:`mlp_train_forward` from the gradient
    ``grad`` (rows, out) w.r.t. its kept rows' outputs. ``out``: tensors in that order to write them
    into (None entries, or no ``out``: fresh tensors)."""
    n = len(weights)
    dests: Sequence[Tensor | None] = [None] * (2 * n) if out is None else out
    grads: list[Tensor] = [grad] * (2 * n)  # placeholders, all overwritten below
    g = grad  # gradient w.r.t. layer i's output, in the dtype layer i computes in
    for i in range(n - 1, -1, -1):
        inp = tape.inputs[i]
        g = g.to(inp.dtype)
        w_grad, b_grad = dests[2 * i], dests[2 * i + 1]
        if w_grad is None or b_grad is None:
            grads[2 * i], grads[2 * i + 1] = torch.mm(g.t(), inp).float(), g.sum(0).float()
        elif inp.dtype == torch.float32:  # straight into the gradients' memory
            grads[2 * i] = torch.mm(g.t(), inp, out=w_grad)
            grads[2 * i + 1] = torch.sum(g, 0, out=b_grad)
        else:
            grads[2 * i] = w_grad.copy_(torch.mm(g.t(), inp))
            grads[2 * i + 1] = b_grad.copy_(g.sum(0))
        if i > 0:
            w = weights[i] if i == n - 1 else tape.low_w[i]
            g = _relu_grad_(torch.mm(g, w), inp)  # inp: the relu output of layer i − 1, same dtype
    return grads


class EnsembleLinear(nn.Module):
    """``E`` independent linear layers applied as one batched matmul.

    Input ``(E, B, in)`` → output ``(E, B, out)``. Each member is initialised like ``nn.Linear``.
    """

    def __init__(self, members: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.members, self.in_dim, self.out_dim = members, in_dim, out_dim
        self.weight = nn.Parameter(torch.empty(members, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(members, 1, out_dim))
        bound = 1.0 / math.sqrt(in_dim)
        # nn.Linear's default init (kaiming_uniform with a=sqrt(5)) reduces to U(-1/sqrt(in), 1/sqrt(in))
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleMLP(nn.Module):
    """``E`` MLPs with identical shapes evaluated together (no Python loop over members).

    ``forward`` takes ``(B, in)`` (shared by all members) or ``(E, B, in)`` and returns ``(E, B, out)``.
    """

    def __init__(
        self, members: int, in_dim: int, out_dim: int, hidden: Sequence[int], activation: str = "relu"
    ):
        super().__init__()
        self.members = members
        dims = [in_dim, *hidden, out_dim]
        self.layers = nn.ModuleList(EnsembleLinear(members, a, b) for a, b in itertools.pairwise(dims))
        self.activation = ACTIVATIONS[activation]()
        self.fast = activation == "relu" and len(dims) > 2  # relu between at least two layers
        self.width = max(dims[1:])

    def weights(self) -> tuple[list[Tensor], list[Tensor]]:
        """Every layer's weight as (E, out, in) and bias as (E, out): views of the parameters."""
        layers: list[EnsembleLinear] = list(self.layers)  # type: ignore[arg-type]
        return [lin.weight.transpose(1, 2) for lin in layers], [lin.bias.squeeze(1) for lin in layers]

    def _use_fast(self, rows: int, device: torch.device) -> bool:
        """The relu fast path in bfloat16, or in float32 once the matmuls outweigh its bookkeeping."""
        return self.fast and (hidden_dtype(device) != torch.float32 or rows * self.width >= FAST_MIN_SIZE)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2 and x.dtype == torch.float32 and self._use_fast(x.shape[0], x.device):
            return relu_mlp(None, x, *self.weights())
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.members, -1, -1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = x.relu_() if self.fast else self.activation(x)
        return x

    def forward_split(self, state: Tensor, rest: Tensor) -> Tensor:
        """The MLP on ``[state repeated M times | rest]``: (B, Ds), (B·M, Da) -> (E, B·M, out).

        With enough state features (``SPLIT_MIN_OBS``), the first layer's state part is computed once
        per state, not once per row.
        """
        if state.dtype == rest.dtype == torch.float32 and self._use_fast(rest.shape[0], rest.device):
            return relu_mlp(state, rest, *self.weights())
        m = rest.shape[0] // state.shape[0]
        return self(torch.cat([state.repeat_interleave(m, 0), rest], dim=-1))


class QEnsemble(nn.Module):
    """``E`` critics Q(s, a) → ``(E, B)``, evaluated as one batched network."""

    def __init__(
        self, members: int, obs_dim: int, act_dim: int, hidden: Sequence[int], activation: str = "relu"
    ):
        super().__init__()
        self.net = EnsembleMLP(members, obs_dim + act_dim, 1, hidden, activation)

    def forward(self, obs: Tensor, actions: Tensor) -> Tensor:
        # obs (B, obs_dim) or (E, B, obs_dim); actions likewise → (E, B)
        if obs.dim() == actions.dim() == 2:
            return self.net.forward_split(obs, actions).squeeze(-1)
        if obs.dim() != actions.dim():
            if obs.dim() == 2:
                obs = obs.unsqueeze(0).expand(actions.shape[0], -1, -1)
            else:
                actions = actions.unsqueeze(0).expand(obs.shape[0], -1, -1)
        return self.net(torch.cat([obs, actions], dim=-1)).squeeze(-1)

    def q_sampled(self, obs: Tensor, actions: Tensor) -> Tensor:
        """Q at M actions per state: (B, obs_dim), (B, M, act_dim) -> (E, B, M).

        The observation part of the first layer (W·[s; a] = W_s·s + W_a·a) is computed once per
        state and broadcast over its M actions.
        """
        batch, m = actions.shape[0], actions.shape[1]
        q = self.net.forward_split(obs, actions.reshape(batch * m, -1))  # (E, B·M, 1)
        return q.view(-1, batch, m)


# -- hand-written training passes of a relu ensemble (as above, one batched matmul per layer) --------


def relu_ensemble_linears(ens: nn.Module) -> list[EnsembleLinear] | None:
    """The layers of ``ens`` if it is a relu :class:`EnsembleMLP` with float32 parameters; otherwise None."""
    if not isinstance(ens, EnsembleMLP) or not ens.fast:
        return None
    if any(p.dtype != torch.float32 for p in ens.parameters()):
        return None
    return list(ens.layers)  # type: ignore[arg-type]


@torch.no_grad()
def relu_ensemble_train_forward(
    layers: Sequence[EnsembleLinear], x: Tensor, tape: bool = True
) -> tuple[Tensor, MLPTape]:
    """Outputs (E, R, out) float32 of the relu ensemble ``layers`` on the input ``x`` (R, in) shared by
    every member, and (``tape``) what :func:`relu_ensemble_backward` needs. Equal to the ensemble's
    forward up to float rounding; hidden layers in the :func:`compute_precision` dtype, the output
    layer in float32; no autograd graph is built."""
    if _allocator_tuned is None and x.device.type == "cpu":
        keep_freed_memory()
    dt = hidden_dtype(x.device)
    kept = MLPTape([], [])
    h = x.to(dt).unsqueeze(0).expand(layers[0].members, -1, -1)
    for lin in layers[:-1]:
        w, b = (lin.weight, lin.bias) if dt == torch.float32 else (lin.weight.to(dt), lin.bias.to(dt))
        if tape:
            kept.inputs.append(h)
            kept.low_w.append(w)
        h = torch.baddbmm(b, h, w).relu_()
    h = h.float()
    if tape:
        kept.inputs.append(h)
    return torch.baddbmm(layers[-1].bias, h, layers[-1].weight), kept


@torch.no_grad()
def relu_ensemble_backward(
    layers: Sequence[EnsembleLinear],
    tape: MLPTape,
    grad: Tensor,
    *,
    params: bool = True,
    input_grad: bool = False,
) -> Tensor | None:
    """Backward of :func:`relu_ensemble_train_forward` from ``grad`` (E, R, out) float32, the gradient
    of a loss w.r.t. the outputs. ``params``: set every parameter's ``.grad`` (overwriting, as after
    ``zero_grad(set_to_none=True)``); False treats the weights as constants (e.g. an actor loss through
    the critics). ``input_grad``: return the gradient w.r.t. the shared input (R, in), summed over
    members; otherwise None."""
    g = grad
    last = len(layers) - 1
    for i in range(last, -1, -1):
        lin, inp = layers[i], tape.inputs[i]
        g = g.to(inp.dtype)
        if params:
            w_grad, b_grad = lin.weight.grad, lin.bias.grad
            if w_grad is None or b_grad is None or inp.dtype != torch.float32:
                lin.weight.grad = torch.bmm(inp.transpose(1, 2), g).float()
                lin.bias.grad = g.sum(1, keepdim=True).float()
            else:  # straight into the gradients' memory
                torch.bmm(inp.transpose(1, 2), g, out=w_grad)
                torch.sum(g, 1, keepdim=True, out=b_grad)
        w = lin.weight if i == last else tape.low_w[i]
        if i > 0:
            g = _relu_grad_(torch.bmm(g, w.transpose(1, 2)), inp)
        elif input_grad:
            return torch.bmm(g, w.transpose(1, 2)).sum(0).float()
    return None


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def compiled(fn: Callable[..., T], mode: str | None) -> Callable[..., T]:
    """``fn`` through ``torch.compile(mode=mode)`` (``mode`` None: ``fn`` itself), falling back cleanly.

    A frame that fails to compile runs eagerly (dynamo's ``suppress_errors``), and if compiling is not
    possible at all here, ``fn`` runs eagerly with a warning. Compilation happens on the first call.
    """
    if mode is None:
        return fn
    try:
        inner = torch.compile(fn, mode=mode)
    except Exception as exc:  # any failure to set up compilation means: run eagerly
        warnings.warn(f"torch.compile unavailable ({exc}); running eagerly", RuntimeWarning, stacklevel=2)
        return fn

    def run(*args: Any) -> T:
        with torch._dynamo.config.patch(suppress_errors=True):
            return inner(*args)

    return run


# eager steps per distinct step before capture (allocator, cuBLAS and optimiser state settle)
CUDA_GRAPH_WARMUP = 3


class CudaGraphSteps:
    """Runs an algorithm's update step as a replayed CUDA graph: one launch instead of hundreds.

    At batch 256 a CQL step is a few hundred small kernels, so on a GPU it is bound by launch
    latency, not arithmetic. Each distinct step (function, static arguments, batch shapes) first runs
    eagerly ``warmup`` times on a side stream, then is captured once and replayed: the batch is copied
    into the graph's static input tensors, the graph replays, and its metrics come back as fresh tensors.

    What a captured step must satisfy (the algorithms that opt in are checked on a GPU by
    ``benchmarks/gpu_check.py``): every tensor it reads or writes outside the batch keeps its storage
    (parameters are updated in place, optimisers are capturable), its randomness comes from
    ``generators``, it makes no host sync and no host-dependent branch beyond its static arguments.
    Anything that replaces parameter or optimiser-state storage (loading a state, moving devices)
    must drop this object and start a new one.
    """

    def __init__(self, generators: Sequence[torch.Generator], warmup: int = CUDA_GRAPH_WARMUP) -> None:
        self.generators = list(generators)
        self.warmup = warmup
        self._steps: dict[Any, _Step] = {}

    @staticmethod
    def supported() -> bool:
        """Graphs need CUDA and registration of the algorithms' own generators (torch >= 2.5)."""
        return torch.cuda.is_available() and hasattr(torch.cuda.CUDAGraph, "register_generator_state")

    @property
    def captured(self) -> int:
        """How many distinct steps replay as graphs."""
        return sum(s.graph is not None for s in self._steps.values())

    def run(
        self, fn: Callable[..., dict[str, Tensor]], batch: Any, args: tuple[Any, ...]
    ) -> dict[str, Tensor]:
        inputs = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
        key = (
            getattr(fn, "__name__", id(fn)),
            tuple(a if isinstance(a, (bool, int, float, str, type(None))) else id(a) for a in args),
            tuple((tuple(t.shape), t.dtype) for t in inputs),
        )
        step = self._steps.get(key)
        if step is None:
            # warm-up steps read the same static tensors as the capture, so a compiled step meets
            # no new guard (and recompiles, which a capture cannot) when it is captured
            static = [t.clone() for t in inputs]
            fields = dataclasses.fields(batch)
            step = _Step(
                static, dataclasses.replace(batch, **{f.name: t for f, t in zip(fields, static, strict=True)})
            )
            self._steps[key] = step
        else:
            torch._foreach_copy_(step.inputs, inputs)
        if step.graph is None:
            if step.eager_calls < self.warmup:
                step.eager_calls += 1
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = fn(step.batch, *args)
                torch.cuda.current_stream().wait_stream(side)
                return out
            self._capture(step, fn, args)
        step.graph.replay()
        assert step.metrics is not None  # set with the graph
        return dict(zip(step.names, step.metrics.clone().unbind(), strict=True))

    def _capture(self, step: _Step, fn: Callable[..., dict[str, Tensor]], args: tuple[Any, ...]) -> None:
        graph = torch.cuda.CUDAGraph()
        default = torch.cuda.default_generators
        for g in self.generators:
            if g not in default:
                graph.register_generator_state(g)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            metrics = fn(step.batch, *args)
            stacked = torch.stack([m.reshape(()).float() for m in metrics.values()])
        step.graph, step.names, step.metrics = graph, list(metrics), stacked


@dataclasses.dataclass
class _Step:
    """One distinct update step: its static batch, then (once captured) its graph and metric slots."""

    inputs: list[Tensor]  # the batch's static copies, in field order
    batch: Any  # the batch built from them
    eager_calls: int = 0
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    names: list[str] = dataclasses.field(default_factory=list)
    metrics: Tensor | None = None  # (n_metrics,) float32, rewritten by each replay


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def tanh_log_det_jacobian(pre_tanh: Tensor) -> Tensor:
    """log |d tanh(u)/du| = log(1 - tanh(u)^2), computed stably as 2·(log 2 − u − softplus(−2u))."""
    return 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))


def gaussian_log_prob(u: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """Sum over the last axis of the diagonal Gaussian log-density."""
    z = (u - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


class TanhGaussianActor(nn.Module):
    """A Gaussian in pre-tanh space squashed into (−1, 1): samples already lie in the bounds.

    ``sample`` returns actions with exact log-probabilities (tanh Jacobian included);
    ``mode`` is tanh of the mean.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], activation: str = "relu"):
        super().__init__()
        self.act_dim = act_dim
        self.net = mlp(obs_dim, 2 * act_dim, hidden, activation)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_std = run_mlp(self.net, obs).chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(
        self, obs: Tensor, generator: torch.Generator | None = None, std_scale: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """Reparameterised sample and its log-probability: ``(…, act_dim)``, ``(…)``. ``std_scale``
        samples a narrower (< 1) or wider Gaussian than the learned one, with its own exact density."""
        mean, log_std = self(obs)
        if std_scale != 1.0:
            log_std = log_std + math.log(std_scale)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        u = mean + noise * log_std.exp()
        log_prob = gaussian_log_prob(u, mean, log_std) - tanh_log_det_jacobian(u).sum(-1)
        return torch.tanh(u), log_prob

    def mode(self, obs: Tensor) -> Tensor:
        return torch.tanh(self(obs)[0])

    def log_prob(self, obs: Tensor, actions: Tensor, eps: float = 1e-6, std_scale: float = 1.0) -> Tensor:
        """Log-density of given actions in (−1, 1) (clamped by ``eps`` away from ±1)."""
        mean, log_std = self(obs)
        if std_scale != 1.0:
            log_std = log_std + math.log(std_scale)
        a = actions.clamp(-1.0 + eps, 1.0 - eps)
        u = torch.atanh(a)
        return gaussian_log_prob(u, mean, log_std) - tanh_log_det_jacobian(u).sum(-1)


class DeterministicActor(nn.Module):
    """obs → tanh-squashed action in (−1, 1)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], activation: str = "relu"):
        super().__init__()
        self.net = mlp(obs_dim, act_dim, hidden, activation, output_activation="tanh")

    def forward(self, obs: Tensor) -> Tensor:
        return run_mlp(self.net, obs)


class DiscreteHead(nn.Module):
    """obs → one score per action: logits for a categorical policy, or Q-values."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: Sequence[int], activation: str = "relu"):
        super().__init__()
        self.net = mlp(obs_dim, n_actions, hidden, activation)

    def forward(self, obs: Tensor) -> Tensor:
        return run_mlp(self.net, obs)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """Polyak averaging ``target ← (1 − τ)·target + τ·source`` as one fused foreach op."""
    tgt: list[Tensor] = list(target.parameters())
    src: list[Tensor] = list(source.parameters())
    torch._foreach_lerp_(tgt, src, tau)


@torch.no_grad()
def hard_update(target: nn.Module, source: nn.Module) -> None:
    target.load_state_dict(source.state_dict())


def freeze(module: nn.Module) -> nn.Module:
    """Mark a (target) network as not trainable, so no gradient can reach it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module
