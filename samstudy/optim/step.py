"""The train-step protocol: one code path for every preset, ascent and second-gradient mode.

Long because it is the whole step (two passes, three second-gradient modes, micro-batches, the
rule and its statistics) and its hot path is tuned: see "Cost" in docs/optimizers.md.

``opt.train_step(model, loss_fn, inputs, targets) -> (loss, logits)`` performs a whole step:

1. first forward/backward at w (BatchNorm updates its running statistics here only);
2. the ascent e (``sam`` / ``adaptive`` / ``clamp``) and w + e in tensors of their own: on a
   GPU fresh ones (one multi-tensor launch); on CPU g's own storage when nothing needs g any
   more (plain ``sam`` on an unmeasured step), else buffers kept from step to step; w itself
   is never written;
3. the second pass at w + e on the model itself (each parameter's ``.data`` points at its w + e
   for the pass and back at w after it, even on errors) with BatchNorm running statistics
   frozen, giving g_p by the ``second_grad`` mode:

   * ``full``: g_p = grad L(w + e)  (SAM);
   * ``jacobian`` (J-SAM): g_p = J(w + e)^T dL/dz(w): the loss-derivative factor of the first
     pass, the network Jacobian at w + e (backward of the perturbed logits with
     ``grad_outputs`` = dL/dz at w);
   * ``logit`` (logit-SAM): g_p = J(w)^T dL/dz(w + e): the loss derivative at the perturbed
     logits, pulled back through the graph of the first pass (kept alive for it);

4. with ``m`` (m-sharpness), steps 1-3 run per micro-batch of m examples, each with its own e;
   g and g_p are the size-weighted means over micro-batches (= whole-batch gradients);
5. the combination rule d = a_k g_p + b_k g by region, the statistics, then the base optimizer
   (SGD / AdamW) steps with d as the gradient, and the gradients are cleared.

``loss_fn(logits, targets)`` must return the mean loss and (for ``jacobian`` / ``logit``) depend
on the parameters only through the logits. The returned loss and logits are detached values of
the first pass at w. Nothing in a step synchronises with the host.

The ``sgd`` preset (``two_step = False``) runs one forward/backward and the base step; its
``train_step`` has the same signature, so the trainer never branches.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.modules.batchnorm import _NormBase

from samstudy.optim import native
from samstudy.optim.ascent import EPS, AscentConfig, adaptive_perturbed, ascent, global_norm
from samstudy.optim.flat import FlatSpace
from samstudy.optim.lazy_dynamo import defer_dynamo_import
from samstudy.optim.params import normalize_params
from samstudy.optim.presets import Table
from samstudy.optim.rules import Operand, RegionRule, regions_from_thresholds
from samstudy.optim.stats import STAT_KEYS, StepStats

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

defer_dynamo_import()  # a trial worker's first optimizer needs no torch._dynamo (~1 s)

# ``used`` when every parameter got a gradient (the common case: no per-step list to build)
_ALL_USED: list[bool] = []


def _private(grads: list[torch.Tensor], weights: list[torch.Tensor]) -> bool:
    """May the ascent overwrite ``grads``? Only if each is laid out like its weight and owns its
    memory: autograd may hand two parameters one tensor (the gradient of ``a + b``), or an
    expanded view of one value (stride 0)."""
    seen = {w.untyped_storage().data_ptr() for w in weights}
    for g, w in zip(grads, weights, strict=True):
        ptr = g.untyped_storage().data_ptr()
        if g.stride() != w.stride() or ptr in seen:
            return False
        seen.add(ptr)
    return True


def _used(grads: list[torch.Tensor | None], params: list[torch.Tensor]) -> list[bool]:
    """Which parameters got a gradient; missing ones become zeros in ``grads`` (in place)."""
    if all(g is not None for g in grads):
        return _ALL_USED
    used = [g is not None for g in grads]
    for i, (g, p) in enumerate(zip(grads, params, strict=True)):
        if g is None:
            grads[i] = torch.zeros_like(p)
    return used


class SamOptimizer(torch.optim.Optimizer):
    """A SAM-family optimizer around a base torch optimizer (built by ``create_optimizer``).

    ``param_groups`` are the base optimizer's own dicts, so LR schedulers, ``state_dict`` and
    checkpoints behave as with the base optimizer.
    """

    def __init__(
        self,
        params: Any,
        base_cls: type[torch.optim.Optimizer],
        base_kwargs: dict[str, Any],
        *,
        name: str,
        two_step: bool,
        table: Table,
        rho: float,
        ascent_cfg: AscentConfig,
        m: int | None,
        second_grad: str,
        stats: bool,
        stats_every: int,
        compile: bool | str,
    ) -> None:
        groups, self._given_names = normalize_params(params)
        super().__init__(groups, {"rho": rho})
        self.base_optimizer = base_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.name = name
        self.two_step = two_step
        self.rule = RegionRule(table, compile=compile)
        self.ascent_cfg = ascent_cfg
        self.m = m
        self.second_grad = second_grad
        self.stats_enabled = stats
        self.stats_every = stats_every
        # The GPU path (gathered flat buffers, fresh e) on CPU too (tests), or never; None: on
        # GPUs only. Set it before the first step: a change rebuilds the layout and its stats.
        self.flat_sources: bool | None = None
        self._steps = 0
        # steps since the last read_stats(reset=True): every read period starts measured
        self._phase = 0
        self._layout_key: tuple[Any, ...] | None = None
        self._spaces: list[_Part] = []
        self._stats: StepStats | None = None
        self._module_names: tuple[Any, tuple[int, ...], list[str]] | None = None

    # -- torch.optim.Optimizer plumbing -----------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """During construction: our groups; afterwards: the base optimizer's (shared) groups."""
        if "base_optimizer" in self.__dict__:
            self.base_optimizer.add_param_group(param_group)
            self.param_groups = self.base_optimizer.param_groups
        else:
            super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (momentum buffers, ...) plus our step counter."""
        sd = self.base_optimizer.state_dict()
        sd["samstudy"] = {"steps": self._steps, "phase": self._phase}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        state_dict = dict(state_dict)
        ours = state_dict.pop("samstudy", {})
        self.base_optimizer.load_state_dict(state_dict)
        # Loading replaces the base optimizer's group dicts: share the new ones again.
        self.param_groups = self.base_optimizer.param_groups
        self._steps = int(ours.get("steps", 0))
        self._phase = int(ours.get("phase", 0))

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One-pass presets: the base optimizer's step. Two-step presets need :meth:`train_step`."""
        if self.two_step:
            raise RuntimeError(
                f"the {self.name!r} optimizer needs the model and the batch: call "
                "opt.train_step(model, loss_fn, inputs, targets) instead of opt.step()"
            )
        return self.base_optimizer.step(closure)

    # -- statistics -------------------------------------------------------------------------

    def read_stats(self, reset: bool = True) -> dict[str, float]:
        """Means since the last reset of every key in ``STAT_KEYS`` (NaN = not measured)."""
        if reset:
            self._phase = 0
        if self._stats is None:
            return {k: float("nan") for k in STAT_KEYS}
        return self._stats.read(reset)

    def _measuring(self) -> bool:
        """Measure this step? The first after each reset, then every ``stats_every``-th."""
        return self._stats is not None and self._phase % self.stats_every == 0

    def read_param_stats(self, reset: bool = True) -> dict[str, dict[str, float]]:
        """Per parameter tensor: ``{name: {region: share}}`` since the last reset."""
        if self._stats is None:
            return {}
        return self._stats.read_params(self._stat_names(), reset)

    # -- the step ---------------------------------------------------------------------------

    def train_step(
        self, model: torch.nn.Module, loss_fn: LossFn, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a batch; returns the detached first-pass (loss, logits)."""
        self._opt_called = True  # this is our step(): LR schedulers check the flag
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        self._ensure_layout(params)
        if not self.two_step:
            loss, logits = self._one_pass(model, loss_fn, inputs, targets, params)
        else:
            loss, logits = self._two_step(model, loss_fn, inputs, targets, params)
        self._steps += 1
        self._phase += 1
        return loss, logits

    def _one_pass(self, model, loss_fn, inputs, targets, params):
        logits = model(inputs)
        loss = loss_fn(logits, targets)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            if self._measuring():
                used = [g for g in grads if g is not None]
                if used:
                    self._stats.add_grad_norm(global_norm(used))
        self._base_step()
        self._clear_grads()
        return loss.detach(), logits.detach()

    def _two_step(self, model, loss_fn, inputs, targets, params):
        norms = self._model_plan(model, params)
        rhos = self._rhos()
        n = inputs.shape[0]
        if self.m is None or self.m >= n:
            chunks = [(inputs, targets)]
        else:
            chunks = list(zip(inputs.split(self.m), targets.split(self.m), strict=True))
        measure = self._measuring()
        # g after the ascent: for the rule and the statistics only (plain sam: its storage
        # becomes w + e)
        keep_g = measure or not self.rule.identity
        g_acc: list[torch.Tensor] = []
        gp_acc: list[torch.Tensor] = []
        used: list[bool] | None = None
        losses, logits_all, enorms = [], [], []
        gnorm = None
        for x, t in chunks:
            logits, loss, g, gp, enorm, gnorm, chunk_used = self._passes(
                model, norms, loss_fn, x, t, params, rhos, measure, keep_g
            )
            if used is None or chunk_used is _ALL_USED:
                used = chunk_used
            elif used is not _ALL_USED:
                used = [a or b for a, b in zip(used, chunk_used, strict=True)]
            losses.append(loss)
            logits_all.append(logits)
            if measure:
                enorms.append(enorm)
            with torch.no_grad():
                if len(chunks) == 1:
                    g_acc, gp_acc = g, gp
                else:
                    w = x.shape[0] / n  # chunk losses are means: weight by chunk size
                    if not gp_acc:
                        gp_acc = torch._foreach_mul(gp, w)
                        g_acc = torch._foreach_mul(g, w) if keep_g else []
                    else:
                        torch._foreach_add_(gp_acc, gp, alpha=w)
                        if keep_g:
                            torch._foreach_add_(g_acc, g, alpha=w)
        if len(chunks) > 1:
            gnorm = None  # the ascent's norm was a micro-batch's, not the step's
        with torch.no_grad():
            stepped = keep_g and not measure and self._rule_and_step(g_acc, gp_acc, used, params)
            if not stepped:
                if keep_g:
                    d = self._combine_and_measure(g_acc, gp_acc, used, gnorm, enorms, measure)
                else:
                    d = gp_acc
                self._set_grads(params, d, used)
        if not stepped:
            self._base_step()
        self._clear_grads()
        if len(chunks) == 1:
            return losses[0], logits_all[0]
        weights = [x.shape[0] / n for x, _ in chunks]
        loss = sum(w * v for w, v in zip(weights, losses, strict=True))
        return loss, torch.cat(logits_all)

    @staticmethod
    def _set_grads(params: list[torch.Tensor], d: list[torch.Tensor], used) -> None:
        """Each parameter's ``.grad`` is its d; None for one without a gradient this step."""
        if used is _ALL_USED:
            for p, dp in zip(params, d, strict=True):
                p.grad = dp
        else:
            for p, dp, u in zip(params, d, used, strict=True):
                p.grad = dp if u else None

    def _rule_and_step(self, g, gp, used, params) -> bool:
        """The rule and torch's SGD step in one C loop per tensor (``native.sgd_step`` with the
        rule), d never written: on CPU tensors, with the C rule, a step measuring nothing. False
        (nothing done) where that does not apply."""
        if self.rule.identity or self._flat_path(self._on_cpu):
            return False
        if any(self.rule.compiled_for(part.space) for part in self._spaces):
            return False
        rule = self.rule.native_rule()  # sgd_step checks g, g_p and p of every tensor
        if rule is None:
            return False
        self._set_grads(params, gp, used)  # sgd_step reads g_p as .grad, g from firsts
        firsts = {id(p): gi for p, gi in zip(params, g, strict=True)}
        return native.sgd_step(self.base_optimizer, rule, firsts)

    def _base_step(self) -> None:
        """The base optimizer's step: torch's SGD on CPU tensors as one C loop per tensor
        (``native.sgd_step``, bit for bit torch's, a third to a half of its time), else its own."""
        if not (self.rule.native and native.sgd_step(self.base_optimizer)):
            self.base_optimizer.step()

    def _clear_grads(self) -> None:
        """``zero_grad(set_to_none=True)`` without its per-call profiling and hook machinery."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _passes(self, model, norms, loss_fn, x, t, params, rhos, measure, keep_g):
        """First pass at w, ascent, second pass at w + e for one (micro-)batch; returns
        (logits, loss, g or None unless ``keep_g``, g_p, ||e|| if ``measure``, ||g|| or None,
        which params were used).

        The second pass runs on the model itself: each parameter's ``.data`` points at its
        w + e for the pass and back at w right after it (the popular port's own mechanism for
        restoring w, and cheaper than ``functional_call``: no copy, no module walk). w itself
        is never written, so the first pass's graph (kept for ``logit``) stays valid.
        """
        mode = self.second_grad
        logits = model(x)
        loss = loss_fn(logits, t)
        if mode == "jacobian":
            *g, delta = torch.autograd.grad(loss, [*params, logits], allow_unused=True)
        else:
            g = list(
                torch.autograd.grad(loss, params, allow_unused=True, retain_graph=mode == "logit")
            )
        with torch.no_grad():
            used = _used(g, params)
            w = [p.data for p in params]
            # Where e and then w + e go. GPU: fresh tensors from the caching allocator, each
            # product one multi-tensor launch (a step there is bound by the host's launches).
            # CPU (fresh memory costs page faults): g's own storage when g is not needed
            # afterwards (unless shared or laid out unlike w), else tensors kept between steps.
            if self._flat_path(self._on_cpu):
                out = None
            elif not keep_g and self.ascent_cfg.kind != "adaptive" and _private(g, w):
                out = g
            else:
                out = self._perturbed_buffers(params)
            cfg = self.ascent_cfg
            wp = None
            if cfg.kind == "adaptive" and not cfg.eta and out is not None and not measure:
                # CPU: w + e in one C pass after w g's norm (None: the torch passes)
                wp = adaptive_perturbed(g, w, rhos, out) if self.rule.native else None
                gnorm = enorm = None
            if wp is None:
                e, gnorm = ascent(cfg, g, w, rhos, out=out)
                enorm = self._ascent_norm(e, gnorm, rhos) if measure else None
                torch._foreach_add_(e, w)  # w + e in place: e itself is not needed any more
                wp = e
            if not keep_g:
                g = None  # on a GPU e is a copy: g's memory is free for the second pass
        # BatchNorm: running statistics move in the first pass only (as bn.running_stats_frozen)
        frozen = [m for m in norms if m.track_running_stats]
        for m in frozen:
            m.track_running_stats = False
        try:
            for p, wpi in zip(params, wp, strict=True):
                p.data = wpi
            # Autocast caches each weight's low-precision copy by the parameter, which .data
            # leaves in place: without this the second pass would run at w's copies.
            torch.clear_autocast_cache()
            if mode == "logit":
                with torch.no_grad():
                    zp = model(x)
            else:
                zp = model(x)
                if mode == "full":
                    gp = torch.autograd.grad(loss_fn(zp, t), params, allow_unused=True)
                else:
                    gp = torch.autograd.grad(zp, params, grad_outputs=delta, allow_unused=True)
        finally:
            for p, wi in zip(params, w, strict=True):
                p.data = wi
            torch.clear_autocast_cache()  # nor may later passes in the context see w + e
            for m in frozen:
                m.track_running_stats = True
        if mode == "logit":
            zp = zp.detach().requires_grad_()
            with torch.enable_grad():
                (delta_p,) = torch.autograd.grad(loss_fn(zp, t), zp)
            gp = torch.autograd.grad(logits, params, grad_outputs=delta_p, allow_unused=True)
        gp = list(gp)
        if not all(gi is not None for gi in gp):
            gp = [
                gi if gi is not None else torch.zeros_like(p)
                for gi, p in zip(gp, params, strict=True)
            ]
        return logits.detach(), loss.detach(), g, gp, enorm, gnorm, used

    def _perturbed_buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """e and then w + e, in tensors kept from step to step (fresh ones cost page faults):
        the views of the flat buffer that receives d later in the step (free until the rule
        runs, after the second pass), or tensors of their own where a parameter's layout
        differs from its view's (channels_last)."""
        if self._wp is None:
            wp: list[torch.Tensor] = list(params)
            for part in self._spaces:
                part.space.buffer("D")
                for i, view in zip(part.idx, part.space.views("D"), strict=True):
                    p = params[i]
                    wp[i] = view if view.stride() == p.stride() else torch.empty_like(p)
            self._wp = wp
        return self._wp

    def _ascent_norm(self, e, gnorm, rhos) -> torch.Tensor:
        if self.ascent_cfg.kind == "sam" and gnorm is not None and self._one_rho:
            return rhos[0] * gnorm / (gnorm + EPS)  # ||e|| in closed form: saves a pass
        return global_norm(e)

    def _combine_and_measure(self, g, gp, used, gnorm, enorms, measure) -> list[torch.Tensor]:
        """d per parameter (views of a flat buffer, or g_p itself for ``sam``) and statistics."""
        d: list[torch.Tensor] = list(gp)
        dots, regions = [], []
        for part in self._spaces:
            G: Operand = [g[i] for i in part.idx]
            P: Operand = [gp[i] for i in part.idx]
            flat = self._flat_path(part.space.device.type == "cpu")
            compiled = self.rule.compiled_for(part.space)
            if flat and not compiled and (measure or not self.rule.identity):
                # one multi-tensor copy each beats a launch per tensor and pass on a GPU
                G, P = part.space.gather("G", G), part.space.gather("P", P)
            D, thresholds, part_dots = self.rule.combine(part.space, G, P, measure)
            if D is not None:
                for i, view in zip(part.idx, part.space.views("D"), strict=True):
                    d[i] = view
            if measure:
                regions.append((part, regions_from_thresholds(thresholds, part.numels)))
                dots.append(part_dots.to(self._stats.device))
        if measure:
            dot, gp_sq = torch.stack(dots).sum(0) if len(dots) > 1 else dots[0]
            gn = gnorm if gnorm is not None else global_norm(g)
            en = torch.stack(enorms).mean() if len(enorms) > 1 else enorms[0]
            self._stats.add_two_step(gn, gp_sq.sqrt(), en, dot)
            self._stats.add_regions(self._gather_regions(regions, used))
        return d

    def _flat_path(self, on_cpu: bool) -> bool:
        """The GPU path (multi-tensor ops, gathered buffers): off the CPU, or forced by
        ``flat_sources`` (how the tests run it on a CPU)."""
        return self.flat_sources if self.flat_sources is not None else not on_cpu

    # -- layout and names -------------------------------------------------------------------

    def _ensure_layout(self, params: list[torch.Tensor]) -> None:
        key = (*map(id, params), self.flat_sources)
        if key == self._layout_key:
            return
        self._layout_key = key
        by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            by_kind.setdefault((p.device, p.dtype), []).append(i)
        self._params = params
        self._on_cpu = all(p.device.type == "cpu" for p in params)
        self._stats = StepStats(len(params), params[0].device) if self.stats_enabled else None
        self._spaces = []
        for (device, dtype), idx in by_kind.items():
            shapes = [params[i].shape for i in idx]
            if self._flat_path(device.type == "cpu"):  # d's views laid out like the parameters
                space = FlatSpace(shapes, device, dtype, [params[i].stride() for i in idx])
            else:
                space = FlatSpace(shapes, device, dtype)
            self._spaces.append(_Part(idx, space, self._stats))
        self._unused_masks: dict[tuple[bool, ...], torch.Tensor] = {}
        self._wp: list[torch.Tensor] | None = None
        self._rho_key: tuple[Any, ...] | None = None

    def _rhos(self) -> list[float]:
        """Each parameter's rho (its group's), rebuilt only when a group's rho changes."""
        default = self.defaults["rho"]
        key = tuple(g.get("rho", default) for g in self.param_groups)
        if key != self._rho_key:
            rho_of = {
                id(p): float(r)
                for g, r in zip(self.param_groups, key, strict=True)
                for p in g["params"]
            }
            self._rho_list = [rho_of[id(p)] for p in self._params]
            self._one_rho = len(set(self._rho_list)) == 1
            self._rho_key = key
        return self._rho_list

    def _gather_regions(self, parts, used: list[bool]) -> torch.Tensor:
        """One [T, 5] count matrix from the spaces' parts; unused tensors count nothing."""
        if len(parts) == 1 and len(parts[0][0].idx) == len(self._params):
            full = parts[0][1]
        else:
            full = torch.zeros(len(self._params), 5, dtype=torch.int64, device=self._stats.device)
            for part, counts in parts:
                full.index_copy_(0, part.stat_index, counts.to(full.device))
        if used is not _ALL_USED and not all(used):
            key = tuple(used)
            mask = self._unused_masks.get(key)
            if mask is None:  # built once per pattern: a host-to-device copy syncs
                mask = torch.tensor(key, dtype=torch.int64, device=full.device)[:, None]
                self._unused_masks[key] = mask
            full = full * mask
        return full

    def _model_plan(self, model: torch.nn.Module, params: list[torch.Tensor]) -> list[Any]:
        """Check once per model and layout that ``params`` belong to ``model`` (the second pass
        substitutes every one of them) and find its normalisation layers (the second pass
        freezes those that track running statistics); cached until either changes."""
        cached = self._module_names
        if cached is not None and cached[0]() is model and cached[1] == self._layout_key:
            return self._norms
        by_id = {id(p): n for n, p in model.named_parameters()}
        missing = [i for i, p in enumerate(params) if id(p) not in by_id]
        if missing:
            raise ValueError(
                f"train_step: {len(missing)} optimizer parameter(s) are not parameters of the "
                "model passed in (the second pass must substitute every one of them)"
            )
        names = [by_id[id(p)] for p in params]
        self._module_names = (weakref.ref(model), self._layout_key, names)
        self._norms = [m for m in model.modules() if isinstance(m, _NormBase)]
        return self._norms

    def _stat_names(self) -> list[str]:
        params = getattr(self, "_params", [])
        module = self._module_names[2] if self._module_names is not None else None
        names = []
        for i, p in enumerate(params):
            name = self._given_names.get(id(p))
            if name is None:
                name = module[i] if module is not None and i < len(module) else f"param{i}"
            names.append(name)
        return names


class _Part:
    """The parameters of one (device, dtype): their flat space and index tensors (built once)."""

    def __init__(self, idx: list[int], space: FlatSpace, stats: StepStats | None) -> None:
        self.idx = idx
        self.space = space
        self.numels = torch.tensor(space.numels, dtype=torch.int64, device=space.device)
        device = stats.device if stats is not None else space.device
        self.stat_index = torch.tensor(idx, dtype=torch.int64, device=device)
