"""The hand-written forward and backward of relu MLPs: one implementation for every fast path.

A relu MLP here is its layers' weights in ``x @ W`` orientation, 2-D ``(in, out)`` for one network
(``nn.Linear.weight.t()``) or 3-D ``(E, in, out)`` for an ensemble run as one batched matmul per layer
(``EnsembleLinear.weight``), and biases ``(out,)`` or ``(E, 1, out)``. :func:`forward` runs it outside
autograd and keeps a :class:`Tape` of each layer's input; :func:`backward` turns the gradient of a loss
w.r.t. the outputs into every parameter's gradient, in the parameters' own layout, and optionally the
input's. Hidden layers compute in ``dtype`` (bfloat16 copies of float32 master weights); the output
layer computes in float32, so outputs (actions, Q-values) and losses keep float32 precision.

Two kernel profiles share the code: the default (hidden layers through MKL's ``addmm`` in float32 and
oneDNN's fused linear + relu with a float32 bias in bfloat16, the output layer's input cast to float32
once) and ``member=True``, one member of a critic ensemble on many rows (oneDNN's fused linear + relu in
every dtype, the bias and the output layer's input kept in the compute dtype, that input cast to
float32 in cache-sized blocks). oneDNN's fused linear is 2-D only, so :func:`ensemble_mlp` runs an
ensemble member by member with that profile; measured faster than one batched matmul per layer at
CQL's 7,936 rows (benchmarks/README.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

_MKLDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_HEAD_ROWS = 1024  # rows cast to float32 at a time for a bfloat16 output layer: the cast stays in cache


def bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (AVX-512 BF16 / AMX) through oneDNN."""
    return bool(_MKLDNN_LINEAR and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def hidden_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype hidden layers compute in on ``device`` for the runtime's ``dtype``: float32 where a CPU
    has no native bfloat16 (emulated bfloat16 would only be slower)."""
    if dtype != torch.float32 and device.type == "cpu" and not bf16_supported():
        return torch.float32
    return dtype


def compiling() -> bool:
    """Whether torch.compile is tracing the caller (``torch.compiler.is_compiling`` from torch 2.3 on)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return bool(is_compiling())


class Tape:
    """What :func:`backward` needs from :func:`forward`, for the rows that receive gradient: every
    layer's input and weight in the dtype that layer computes in (a hidden layer's relu output is the
    next layer's input, so it also carries that layer's relu mask), and the state of a split first layer."""

    __slots__ = ("inputs", "low_w", "state")

    def __init__(self, state: Tensor | None = None) -> None:
        self.inputs: list[Tensor] = []
        self.low_w: list[Tensor] = []
        self.state = state


def _linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``x @ w + b``: (R, in), (in, out), (out,) or batched (E, R, in), (E, in, out), (E, 1, out)."""
    return torch.baddbmm(b, x, w) if x.dim() == 3 else F.linear(x, w.t(), b)


def _mm(a: Tensor, b: Tensor) -> Tensor:
    return torch.bmm(a, b) if a.dim() == 3 else torch.mm(a, b)


def _t(x: Tensor) -> Tensor:
    return x.transpose(-2, -1)


def _relu_grad_(grad: Tensor, out: Tensor) -> Tensor:
    """In place: ``grad`` where the relu output ``out`` is positive, else 0."""
    return torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)


def _output_layer(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Float32 ``h @ w + b`` for a float32 or bfloat16 ``h`` (R, H); ``w`` (H, out), ``b`` (out,) float32.

    A bfloat16 matmul would round the outputs (Q-values) to 3 significant digits, so a bfloat16 ``h``
    is cast in blocks of rows that stay in cache instead of as one float32 copy in memory.
    """
    if h.dtype == torch.float32:
        return torch.addmm(b, h, w)
    out = torch.empty(h.shape[0], w.shape[1], dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], _HEAD_ROWS):
        torch.addmm(b, h[start : start + _HEAD_ROWS].float(), w, out=out[start : start + _HEAD_ROWS])
    return out


@torch.no_grad()
def forward(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    x: Tensor,
    dtype: torch.dtype,
    keep_rows: int | None = None,
    *,
    state: Tensor | None = None,
    member: bool = False,
) -> tuple[Tensor, Tape]:
    """Outputs (R, out) or (E, R, out) float32 of the relu MLP on ``x`` (R, in), shared by every member of
    an ensemble, and the tape of its first ``keep_rows`` rows (None: all; 0: no tape).

    ``state`` (B, Ds), with ``member``: the input is ``[state repeated R/B times | x]`` and the first
    layer projects each state once (W·[s; a] = W_s·s + W_a·a). Equal to the plain computation up to
    float rounding; no autograd graph is built.
    """
    batched = weights[0].dim() == 3
    fused = not batched and _MKLDNN_LINEAR and x.device.type == "cpu" and not compiling()
    tape = Tape(state)
    h = x.to(dtype).unsqueeze(0).expand(weights[0].shape[0], -1, -1) if batched else x
    for i, (weight, bias) in enumerate(zip(weights[:-1], biases[:-1], strict=True)):
        w, inp = weight.to(dtype), h.to(dtype)
        if i == 0 and state is not None:
            ds = state.shape[1]
            per_state = torch.addmm(bias, state, w[:ds])  # (B, H)
            h = torch.mm(inp, w[ds:])  # (R, H)
            h.view(state.shape[0], -1, h.shape[1]).add_(per_state.unsqueeze(1)).relu_()
        elif fused and member:  # oneDNN's fused linear + relu, bias in the compute dtype
            h = torch.ops.mkldnn._linear_pointwise(inp, w.t(), bias, "relu", [], "")
        elif dtype == torch.float32 or not fused:
            h = _linear(inp, w, bias if dtype == torch.float32 else bias.to(dtype)).relu_()
        else:  # oneDNN adds a float32 bias to the low-precision matmul
            h = torch.ops.mkldnn._linear_pointwise(inp, w.t(), bias, "relu", [], "")
        if keep_rows != 0:
            tape.low_w.append(w)
            tape.inputs.append(inp if keep_rows is None else inp[..., :keep_rows, :])
    if member:  # the output layer reads the hidden activations in the compute dtype
        out = _output_layer(h, weights[-1], biases[-1])
        inp, w = h, weights[-1].to(h.dtype)
    else:
        inp, w = h.float(), weights[-1]
        out = _linear(inp, w, biases[-1])
    if keep_rows != 0:
        tape.low_w.append(w)
        tape.inputs.append(inp if keep_rows is None else inp[..., :keep_rows, :])
    return out, tape


def _weight_grad(g: Tensor, inp: Tensor, out: Tensor | None = None) -> Tensor:
    """A layer's weight gradient in its parameter's layout: (out, in) for nn.Linear, (E, in, out) batched."""
    if g.dim() == 3:
        return torch.bmm(_t(inp), g) if out is None else torch.bmm(_t(inp), g, out=out)
    return torch.mm(g.t(), inp) if out is None else torch.mm(g.t(), inp, out=out)


def _bias_grad(g: Tensor, out: Tensor | None = None) -> Tensor:
    """A layer's bias gradient in its parameter's layout: (out,), or (E, 1, out) batched."""
    if g.dim() == 3:
        return g.sum(1, keepdim=True) if out is None else torch.sum(g, 1, keepdim=True, out=out)
    return g.sum(0) if out is None else torch.sum(g, 0, out=out)


@torch.no_grad()
def backward(
    tape: Tape,
    grad: Tensor,
    *,
    need_w: Sequence[bool] | None = None,
    need_b: Sequence[bool] | None = None,
    input_grad: bool = False,
    state_grad: bool = False,
    out: Sequence[Tensor | None] | None = None,
) -> tuple[list[Tensor | None], Tensor | None, Tensor | None]:
    """Float32 gradients of the MLP of :func:`forward` from ``grad`` (rows, out) or (E, rows, out) float32,
    the gradient of a loss w.r.t. its kept rows' outputs.

    Returns ``[w₀, b₀, w₁, b₁, …]`` (None where ``need_w``/``need_b`` say a layer's weight or bias needs
    none), the input's gradient (``input_grad``; summed over an ensemble's members) and a split first
    layer's state gradient (``state_grad``). ``out``: tensors in parameter order to write the gradients
    into (None entries, or no ``out``: fresh tensors).
    """
    n = len(tape.inputs)
    need_w = [True] * n if need_w is None else need_w
    need_b = [True] * n if need_b is None else need_b
    dests: Sequence[Tensor | None] = [None] * (2 * n) if out is None else out
    grads: list[Tensor | None] = [None] * (2 * n)
    g_in = g_state = None
    g = grad  # gradient w.r.t. layer i's output
    for i in range(n - 1, -1, -1):
        inp = tape.inputs[i]
        g_b = g  # the output layer's bias takes the float32 output gradient
        g = g.to(inp.dtype)
        if i < n - 1:
            g_b = g
        if i == 0 and tape.state is not None:
            state, ds = tape.state, tape.state.shape[1]
            per_state = g.view(state.shape[0], -1, g.shape[1]).sum(1)  # (B, H)
            if need_w[0]:
                grads[0] = torch.cat([torch.mm(per_state.t(), state), torch.mm(g.t(), inp)], dim=1).float()
            if need_b[0]:
                grads[1] = per_state.sum(0).float()
            if input_grad:
                g_in = torch.mm(g, _t(tape.low_w[0][ds:])).float()
            if state_grad:
                g_state = torch.mm(per_state, _t(tape.low_w[0][:ds])).float()
            break
        w_dest, b_dest = dests[2 * i], dests[2 * i + 1]
        if w_dest is None or b_dest is None:
            if need_w[i]:
                grads[2 * i] = _weight_grad(g, inp).float()
            if need_b[i]:
                grads[2 * i + 1] = _bias_grad(g_b).float()
        elif inp.dtype == torch.float32:  # straight into the gradients' memory
            grads[2 * i] = _weight_grad(g, inp, out=w_dest)
            grads[2 * i + 1] = _bias_grad(g_b, out=b_dest)
        else:
            grads[2 * i] = w_dest.copy_(_weight_grad(g, inp))
            grads[2 * i + 1] = b_dest.copy_(_bias_grad(g_b))
        if i > 0:
            g = _relu_grad_(_mm(g, _t(tape.low_w[i])), inp)  # inp: the relu output of layer i − 1
        elif input_grad:
            g_in = _mm(g, _t(tape.low_w[0]))
            g_in = (g_in.sum(0) if g_in.dim() == 3 else g_in).float()
    return grads, g_in, g_state


# -- a relu ensemble under autograd, member by member ---------------------------------------------
class _EnsembleFunction(torch.autograd.Function):
    """Autograd of :func:`ensemble_mlp`. Inputs after ``n_layers, state, rest``: every layer's float32
    weight (E, in, out) and bias (E, 1, out), then every weight and hidden bias in the compute dtype."""

    @staticmethod
    def forward(ctx: Any, n_layers: int, state: Tensor | None, rest: Tensor, *tensors: Tensor) -> Tensor:
        weights, biases = tensors[:n_layers], tensors[n_layers : 2 * n_layers]
        low_w, low_b = tensors[2 * n_layers : 3 * n_layers], tensors[3 * n_layers :]
        dt = low_w[0].dtype
        x_state = None if state is None else state.to(dt)
        x_rest = rest.to(dt)
        outs, acts = [], []
        for e in range(weights[0].shape[0]):
            out_e, tape = _member_forward(e, x_state, x_rest, low_w, low_b, weights[-1], biases[-1])
            outs.append(out_e)
            acts += tape.inputs[1:]
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
        members = []
        for e in range(grad.shape[0]):
            tape = Tape(x_state)
            tape.inputs = [x_rest, *acts[e * (n - 1) : (e + 1) * (n - 1)]]
            tape.low_w = [w[e] for w in low_w]
            members.append(
                backward(
                    tape,
                    grad[e],
                    need_w=need[2 : 2 + n],
                    need_b=need[2 + n :],
                    input_grad=need[1],
                    state_grad=need[0],
                )
            )
        # per member (out, in) and (out,): stacked into the ensemble's (E, in, out) and (E, 1, out)
        gw = [_stack([m[0][2 * i] for m in members], lambda t: t.transpose(1, 2)) for i in range(n)]
        gb = [_stack([m[0][2 * i + 1] for m in members], lambda t: t.unsqueeze(1)) for i in range(n)]
        g_rest, g_state = _sum([m[1] for m in members]), _sum([m[2] for m in members])
        return (None, g_state, g_rest, *gw, *gb, *([None] * (2 * n - 1)))


def _member_forward(
    e: int,
    x_state: Tensor | None,
    x_rest: Tensor,
    low_w: Sequence[Tensor],
    low_b: Sequence[Tensor],
    w_out: Tensor,
    b_out: Tensor,
) -> tuple[Tensor, Tape]:
    weights = [w[e] for w in low_w[:-1]] + [w_out[e]]
    biases = [b[e].squeeze(0) for b in low_b] + [b_out[e].squeeze(0)]
    return forward(weights, biases, x_rest, low_w[0].dtype, state=x_state, member=True)


def _stack(grads: list[Tensor | None], view: Any) -> Tensor | None:
    """Per-member gradients of one tensor stacked to (E, …) in the parameter's layout, or None."""
    return None if grads[0] is None else view(torch.stack(grads))  # type: ignore[arg-type]


def _sum(grads: list[Tensor | None]) -> Tensor | None:
    """Gradient of an input all members share: the sum over members, or None where none was needed."""
    return None if grads[0] is None else torch.stack(grads).sum(0)  # type: ignore[arg-type]


def ensemble_mlp(
    state: Tensor | None,
    rest: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    dtype: torch.dtype,
) -> Tensor:
    """E relu MLPs on one shared input, hidden layers in ``dtype``, under autograd -> (E, R, out).

    ``weights``/``biases``: every layer's (E, in, out)/(E, 1, out) parameters. ``rest`` (R, Da); ``state``
    (B, Ds) or None, with R = B·M: the input is then ``[state repeated M times | rest]`` with the first
    layer projecting each state once. The backward keeps only the activations, masks gradients in
    place and skips gradients nobody needs (weights entering as constants, inputs).
    """
    low_w = [w.detach().to(dtype) for w in weights]
    low_b = [b.detach().to(dtype) for b in biases[:-1]]
    tensors = (*weights, *biases)
    inputs = (rest, *tensors) if state is None else (state, rest, *tensors)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        out: Tensor = _EnsembleFunction.apply(len(weights), state, rest, *tensors, *low_w, *low_b)
        return out
    x_state = None if state is None else state.to(dtype)
    x_rest = rest.to(dtype)
    w_out, b_out = weights[-1].detach(), biases[-1].detach()
    members = range(weights[0].shape[0])
    return torch.stack([_member_forward(e, x_state, x_rest, low_w, low_b, w_out, b_out)[0] for e in members])
