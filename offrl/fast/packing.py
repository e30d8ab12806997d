"""Packed training: K members of one algorithm updated as one batched model, in one process.

Each member is an ordinary algorithm instance (its own seed, networks, optimiser state and generator);
:class:`PackedStep` stacks their parameters along a leading member dimension and runs the algorithm's own
reference ``_step`` once under ``torch.func.vmap``, so the maths stays in the algorithm file. Three
things a vmapped step cannot do by itself are done here, outside the vmap:

- random draws: a draw from the algorithm's generator is made once per member from that member's own
  generator (the same call, so the same numbers its solo run would draw), and the K results enter the
  vmap stacked;
- backward: ``loss.backward()`` runs on the stacked loss (K,), summed: members are independent, so each
  member's parameters get exactly its own gradient;
- optimiser steps and clipping: :class:`PackedAdam` steps the stacked parameters element-wise with a
  learning rate per member, and :func:`clip_grad_norm` clips each member's global norm separately.

Scalar hyperparameters listed in :data:`SWEEPABLE` may differ between members: learning rates reach the
packed optimiser; the others enter the vmapped step as a per-member value of the config field.

This module uses two private functorch calls (``_add_batch_dim``, ``_remove_batch_dim``) and the
interpreter-stack guard; ``tests/test_packing.py`` checks every algorithm's packed step against its solo
step, so a torch release that changes them fails there, not silently.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
import torch._functorch.pyfunctorch as pyfunctorch
from torch import Tensor, nn
from torch._C import _functorch as functorch

from offrl.errors import ConfigError

# Config fields that may differ between the members of one pack, per algorithm (``NAME`` for its
# continuous variant, ``NAME/discrete`` for its discrete one): learning rates and weight decay (given to
# the packed optimiser per member) and the scalars the step uses only arithmetically (discrete CQL
# branches on ``cql_alpha == 0``, so its ``cql_alpha`` is not one). tests/test_packing.py checks every
# entry: a member with a swept value equals its solo run, and the value changes the result.
SWEEPABLE: dict[str, frozenset[str]] = {
    "bc": frozenset({"lr", "weight_decay"}),
    "bc/discrete": frozenset({"lr", "weight_decay"}),
    "cql": frozenset(
        {"cql_alpha", "actor_lr", "critic_lr", "alpha_lr", "alpha_prime_lr", "gamma", "target_action_gap"}
    ),
    "calql": frozenset(
        {"cql_alpha", "actor_lr", "critic_lr", "alpha_lr", "alpha_prime_lr", "target_action_gap"}
    ),
    "cql/discrete": frozenset({"lr", "gamma"}),
    "iql": frozenset({"expectile", "beta", "actor_lr", "critic_lr", "value_lr", "gamma"}),
    "iql/discrete": frozenset({"expectile", "beta", "actor_lr", "critic_lr", "value_lr", "gamma"}),
    "td3bc": frozenset({"alpha", "actor_lr", "critic_lr", "gamma"}),
    "awac": frozenset({"awac_lambda", "actor_lr", "critic_lr", "gamma"}),
    "bcq": frozenset({"lam", "kl_weight", "actor_lr", "critic_lr", "vae_lr", "gamma"}),
    "bcq/discrete": frozenset({"threshold", "lr", "gamma"}),
}


def sweepable(algo_cls: Any) -> frozenset[str]:
    """The settings members of a pack of ``algo_cls`` may differ in (besides the seed)."""
    return SWEEPABLE.get(f"{algo_cls.name}/discrete" if algo_cls.discrete else algo_cls.name, frozenset())


LR_FIELDS = frozenset({"lr", "actor_lr", "critic_lr", "alpha_lr", "value_lr", "vae_lr", "alpha_prime_lr"})
# fields that only shape the optimiser (checked through the optimiser's own settings instead)
OPTIMIZER_FIELDS = LR_FIELDS | {"weight_decay"}

_active: PackedStep | None = None  # the pack whose vmapped step is running (one at a time)


def clip_grad_norm(params: Sequence[Tensor], max_norm: float) -> None:
    """Clip the global gradient norm of ``params`` to ``max_norm``, as ``nn.utils.clip_grad_norm_``; inside a
    packed step, each member's norm separately."""
    if _active is None:
        nn.utils.clip_grad_norm_(list(params), max_norm, foreach=True)
    else:
        _active.clip(params, max_norm)


def backward(loss: Tensor) -> None:
    """``loss.backward()``; inside a packed step, on the members' stacked losses (K,), summed: members are
    independent, so each member's parameters get exactly its own gradient."""
    pack = _active
    if pack is None:
        loss.backward()
        return
    with pyfunctorch.temporarily_pop_interpreter_stack():
        pack.physical(loss).sum().backward()


def packed_draw(
    draw: Any, shape: Sequence[int], generator: torch.Generator | None, device: Any, dtype: Any
) -> Tensor | None:
    """Inside a packed step, ``draw(shape, generator=…)`` (torch.rand, torch.randn) made once per member from
    that member's own generator, the same call its solo run makes, and entered into the vmap stacked; None
    (nothing drawn) outside one or for another generator."""
    pack = _active
    if pack is None or generator is not pack.template.generator:
        return None
    with pyfunctorch.temporarily_pop_interpreter_stack():
        draws = [draw(shape, generator=a.generator, device=device, dtype=dtype) for a in pack.algos]
        stacked = torch.stack(draws)
    return functorch._add_batch_dim(stacked, 0, pack.level)


def packed_lerp_(target: Sequence[Tensor], source: Sequence[Tensor], weight: float) -> bool:
    """Inside a packed step, ``target ← lerp(target, source, weight)`` on the stacked parameters behind
    these networks' parameters, for all members at once (vmap has no rule for the foreach op); returns
    False, doing nothing, outside one."""
    if _active is None:
        return False
    pack = _active
    tgt: list[Tensor] = [pack.stacked[pack._installed[id(p)]] for p in target]
    src: list[Tensor] = [pack.stacked[pack._installed[id(p)]] for p in source]
    with pyfunctorch.temporarily_pop_interpreter_stack(), torch.no_grad():
        torch._foreach_lerp_(tgt, src, weight)
    return True


def _member_dims(t: Tensor, members: int) -> list[int]:
    return [members] + [1] * (t.dim() - 1)


class PackedAdam:
    """Adam (as ``torch.optim.Adam``, no amsgrad) over stacked parameters (K, ...), with a learning rate
    per member and a mask of members that still learn (a diverged member's parameters stay as they were).
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        lrs: Tensor,  # (K,)
        betas: tuple[float, float],
        eps: float,
        weight_decays: Tensor,  # (K,)
        param_names: list[str],
    ) -> None:
        self.params = params
        self.param_names = param_names  # the networks' names of ``params``
        self.members = int(lrs.shape[0])
        self.lrs = lrs
        self.betas, self.eps = betas, eps
        self.decays = (
            [weight_decays.reshape(_member_dims(p, self.members)).to(p) for p in params]
            if bool((weight_decays != 0).any())
            else None
        )
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = 0
        self.active: Tensor | None = None  # (K,) bool, None while every member learns
        self._lr_views = [lrs.reshape(_member_dims(p, self.members)).to(p) for p in params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        pairs = [(i, p) for i, p in enumerate(self.params) if p.grad is not None]
        if not pairs:
            return
        idx = [i for i, _ in pairs]
        params: list[Tensor] = [p for _, p in pairs]
        grads: list[Tensor] = [cast(Tensor, p.grad) for p in params]
        beta1, beta2 = self.betas
        exp_avg = [self.exp_avg[i] for i in idx]
        exp_avg_sq = [self.exp_avg_sq[i] for i in idx]
        if self.decays is not None:  # L2 penalty as torch's Adam adds it, a rate per member
            grads = [g + self.decays[i] * p for i, g, p in zip(idx, grads, params, strict=True)]
        self.steps += 1
        torch._foreach_lerp_(exp_avg, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1.0 - beta2)
        bias1 = 1.0 - beta1**self.steps
        bias2_sqrt = (1.0 - beta2**self.steps) ** 0.5
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, self.eps)
        updates = torch._foreach_div(exp_avg, denom)
        torch._foreach_mul_(updates, [self._lr_views[i] for i in idx])  # broadcast over each member
        if self.active is not None:
            torch._foreach_mul_(updates, [self.active.reshape(_member_dims(p, self.members)) for p in params])
        torch._foreach_add_(params, updates, alpha=-1.0 / bias1)


class PackedStep:
    """The update of K algorithm instances (same class, architecture and batch size) as one vmapped step.

    ``algos`` are the members; they are not touched while the pack trains: :meth:`unpack` writes the
    packed state back into them (before they evaluate or save), :meth:`pack` reads it from them (after
    they load a checkpoint). Their generators are the pack's: a packed step draws from them directly.
    """

    def __init__(self, algos: Sequence[Any]) -> None:
        if not algos:
            raise ConfigError("a pack needs at least one member")
        self.algos = list(algos)
        self.members = len(self.algos)
        first = self.algos[0]
        self.sweep = _swept_fields(self.algos)
        if first.runtime.dtype != torch.float32:
            raise ConfigError(
                f"packing: packed runs train in float32; runtime.precision={first.runtime.precision} is for "
                "solo runs"
            )
        # the template runs the step: a member's twin whose parameters are the stacked ones (building it
        # seeds torch's global RNG, which is put back: the members' runs own it)
        rng = torch.get_rng_state()
        self.template = type(first)(
            first.config,
            first.observation_space,
            first.action_space,
            normalizer=copy.deepcopy(first.normalizer),
            device=first.device,
            seed=first.seed,
            runtime=first.runtime,
        )
        torch.set_rng_state(rng)
        self._installed: dict[int, str] = {}
        self.level = -1  # the vmap level of the running step
        self.names = [n for n, _ in self.template.nets.named_parameters()]
        self._stack_parameters()
        self._build_optimizers()
        self.hyper = {
            f: torch.tensor([float(getattr(a.config, f)) for a in self.algos], device=first.device)
            for f in sorted(self.sweep - OPTIMIZER_FIELDS)
        }
        self.pack()

    # -- construction ----------------------------------------------------------------------------
    def _stack_parameters(self) -> None:
        self.stacked: dict[str, nn.Parameter] = {}
        self._slots: list[tuple[nn.Module, str, str]] = []  # (module, attribute, parameter name)
        for name, p in list(self.template.nets.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            module = self.template.nets.get_submodule(owner)
            stacked = nn.Parameter(
                torch.zeros((self.members, *p.shape), dtype=p.dtype, device=p.device),
                requires_grad=p.requires_grad,
            )
            setattr(module, leaf, stacked)
            self.stacked[name] = stacked
            self._slots.append((module, leaf, name))

    def _build_optimizers(self) -> None:
        self.optimizers: dict[str, PackedAdam] = {}
        member_params = [dict(a.nets.named_parameters()) for a in self.algos]
        for opt_name in self.template.optimizers:
            groups = [a.optimizers[opt_name].param_groups for a in self.algos]
            if any(len(g) != 1 for g in groups):
                raise ConfigError(f"packing: optimiser '{opt_name}' has several parameter groups")
            g0 = groups[0][0]
            for g, a in zip(groups, self.algos, strict=True):
                for key in ("betas", "eps", "amsgrad", "maximize", "decoupled_weight_decay"):
                    if g[0].get(key) != g0.get(key):
                        raise ConfigError(
                            f"packing: members differ in optimiser '{opt_name}' setting {key} "
                            f"({g0.get(key)} for seed {self.algos[0].seed}, {g[0].get(key)} for seed {a.seed})"
                        )
            if g0.get("amsgrad") or g0.get("maximize"):
                raise ConfigError(f"packing: optimiser '{opt_name}' uses amsgrad or maximize")
            ids = {id(p): n for n, p in member_params[0].items()}
            names = [ids[id(p)] for p in g0["params"]]
            lrs = torch.tensor([float(g[0]["lr"]) for g in groups], dtype=torch.float32)
            decays = torch.tensor([float(g[0]["weight_decay"]) for g in groups], dtype=torch.float32)
            self.optimizers[opt_name] = PackedAdam(
                [self.stacked[n] for n in names],
                lrs.to(self.template.device),
                (float(g0["betas"][0]), float(g0["betas"][1])),
                float(g0["eps"]),
                decays.to(self.template.device),
                names,
            )
        self.template.optimizers = self.optimizers
        self.template.generator = torch.Generator(self.template.device)  # a marker: draws come from members

    # -- members <-> pack ------------------------------------------------------------------------
    @torch.no_grad()
    def pack(self) -> None:
        """Read the members' networks, optimiser states and update counters into the pack."""
        for name, stacked in self.stacked.items():
            stacked.copy_(torch.stack([a.nets.get_parameter(name).detach() for a in self.algos]))
        # buffers (normalisers) are shared and equal: they are fitted on the one dataset
        self.template.nets.load_state_dict(
            {k: v for k, v in self.algos[0].nets.state_dict().items() if k not in self.stacked}, strict=False
        )
        counts = {a.num_updates for a in self.algos}
        if len(counts) != 1:
            raise ConfigError(f"packing: members are at different update counts {sorted(counts)}")
        self.template.num_updates = counts.pop()
        for opt_name, opt in self.optimizers.items():
            member_opts = [a.optimizers[opt_name] for a in self.algos]
            params = [dict(a.nets.named_parameters()) for a in self.algos]
            steps = set()
            for i, name in enumerate(opt.param_names):
                states = [o.state.get(params[k][name], {}) for k, o in enumerate(member_opts)]
                if all("exp_avg" in s for s in states):
                    opt.exp_avg[i].copy_(torch.stack([s["exp_avg"] for s in states]))
                    opt.exp_avg_sq[i].copy_(torch.stack([s["exp_avg_sq"] for s in states]))
                    steps |= {int(s["step"]) for s in states}
                else:
                    opt.exp_avg[i].zero_()
                    opt.exp_avg_sq[i].zero_()
                    steps |= {0}
            if len(steps) > 1:
                raise ConfigError(f"packing: members' optimiser '{opt_name}' are at different steps")
            opt.steps = steps.pop() if steps else 0

    @torch.no_grad()
    def unpack(self) -> None:
        """Write the pack's state into the members (each then evaluates, diagnoses and saves as a solo run)."""
        for k, a in enumerate(self.algos):
            for name, stacked in self.stacked.items():
                a.nets.get_parameter(name).copy_(stacked[k])
            a.num_updates = self.template.num_updates
            params = dict(a.nets.named_parameters())
            for opt_name, opt in self.optimizers.items():
                member_opt = a.optimizers[opt_name]
                for i, name in enumerate(opt.param_names):
                    p = params[name]
                    if opt.steps == 0:
                        member_opt.state.pop(p, None)
                        continue
                    state = member_opt.state.setdefault(p, {})
                    step = state.get("step")
                    state["step"] = torch.tensor(
                        float(opt.steps),
                        dtype=step.dtype if isinstance(step, Tensor) else torch.float32,
                        device=step.device if isinstance(step, Tensor) else p.device,
                    )
                    state["exp_avg"] = opt.exp_avg[i][k].clone()
                    state["exp_avg_sq"] = opt.exp_avg_sq[i][k].clone()

    def physical(self, t: Tensor) -> Tensor:
        """The stacked (K, ...) tensor behind a tensor of the running vmapped step."""
        if functorch.maybe_get_level(t) == self.level:
            return functorch._remove_batch_dim(t, self.level, self.members, 0)
        return t.unsqueeze(0).expand(self.members, *t.shape)

    def stop(self, member: int) -> None:
        """Mask ``member`` out of later updates (it diverged): its parameters no longer change."""
        for opt in self.optimizers.values():
            if opt.active is None:
                opt.active = torch.ones(self.members, device=self.template.device)
            opt.active[member] = 0.0

    # -- the step --------------------------------------------------------------------------------
    def update(self, batch: Any) -> dict[str, Tensor]:
        """One update of every member; ``batch`` fields are stacked (K, B, ...). Metrics are (K,)."""
        global _active
        template = self.template
        args = template.step_args()
        slots = self._slots

        batch_type = type(batch)
        field_names = [f.name for f in dataclasses.fields(batch)]
        present = [n for n in field_names if isinstance(getattr(batch, n), Tensor)]
        names, hyper_names = list(self.stacked), list(self.hyper)
        n_params, n_fields = len(names), len(present)

        def member_step(*flat: Tensor) -> dict[str, Tensor]:
            params = flat[:n_params]
            fields = dict(zip(present, flat[n_params : n_params + n_fields], strict=True))
            member_batch = batch_type(**{n: fields.get(n, getattr(batch, n)) for n in field_names})
            hyper = dict(zip(hyper_names, flat[n_params + n_fields :], strict=True))
            self.level = functorch.current_level()
            self._installed = {id(v): n for n, v in zip(names, params, strict=True)}
            # the networks see each member's parameters (as torch.func.functional_call swaps them, without
            # its per-call walk over the modules)
            for (module, leaf, _), value in zip(slots, params, strict=True):
                module._parameters[leaf] = value  # type: ignore[assignment]
            try:
                with self._configured(hyper):
                    out: dict[str, Tensor] = template._step(member_batch, *args)
            finally:
                for module, leaf, name in slots:
                    module._parameters[leaf] = self.stacked[name]
            return out

        if _active is not None:
            raise RuntimeError("packed steps do not nest")
        flat = [*self.stacked.values(), *(getattr(batch, n) for n in present), *self.hyper.values()]
        _active = self
        try:
            metrics = torch.func.vmap(member_step, randomness="error")(*flat)
        finally:
            _active = None
        template.num_updates += 1
        return template.after_update(metrics)

    @contextlib.contextmanager
    def _configured(self, hyper: dict[str, Tensor]) -> Iterator[None]:
        if not hyper:
            yield
            return
        original = self.template.config
        swept = copy.copy(original)
        for field, value in hyper.items():
            object.__setattr__(swept, field, value)
        self.template.config = swept
        try:
            yield
        finally:
            self.template.config = original

    @torch.no_grad()
    def clip(self, params: Sequence[Tensor], max_norm: float) -> None:
        grads = []
        for p in params:
            name = self._installed.get(id(p))
            grad = self.stacked[name].grad if name is not None else None
            if grad is not None:
                grads.append(grad)
        if not grads:
            return
        with pyfunctorch.temporarily_pop_interpreter_stack():
            norms = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt()  # (K,)
            coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.reshape(_member_dims(g, self.members)))


def _swept_fields(algos: Sequence[Any]) -> frozenset[str]:
    """Config fields whose values differ between members; an error unless the algorithm may sweep them."""
    first = algos[0]
    for a in algos[1:]:
        if type(a) is not type(first):
            raise ConfigError(f"packing: members must be one algorithm ({first.name} and {a.name} given)")
        if a.device != first.device:
            raise ConfigError("packing: members must be on one device")
    fields = [f for f in vars(first.config) if not f.startswith("_")]
    differing = {f for f in fields if any(getattr(a.config, f) != getattr(first.config, f) for a in algos)}
    allowed = sweepable(type(first))
    refused = sorted(differing - allowed)
    if refused:
        ok = ", ".join(sorted(allowed)) or "none"
        raise ConfigError(
            f"packing: members of '{first.name}' may differ only in seed and in {ok}; they differ in "
            f"{', '.join(refused)}"
        )
    return frozenset(differing)
