"""One typed decision per matmul: what each of its three products does, why, and what runs it.

:func:`decide` turns the :class:`fst_jax._analysis.Site` s of a traced function into
:class:`Decision` s. ``sparsify`` executes them (each decision with a plan becomes one
``jax.custom_vjp``), ``report`` prints them and ``forward_masks`` exports their forward masks:
strings are made only for display, from the :class:`Reason` s.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fst_jax import _compat
from fst_jax._analysis import Site, View
from fst_jax._config import FSTConfig, Rule, pattern_set
from fst_jax._dot import GemmPlan, cusparselt_ineligible, kernel_eligible, typed_sharded


class Reason(enum.Enum):
    """Why a product is left dense (or runs on another backend than asked). ``.value`` is the
    message template, filled from :attr:`Product.detail`."""

    USER_REGION = "inside a user custom_vjp/custom_jvp region (opaque)"
    INNER_SPARSIFY = "already rewritten by an inner fst_jax.sparsify"
    OPAQUE = "inside {prim} (opaque to fst_jax)"
    NOT_FLOAT = "integer or complex matmul"
    CONSTANT_OPERAND = "constant operand"
    TWO_ACTIVATIONS = "two activations (no weight operand)"
    TWO_WEIGHTS = "two weights"
    NO_CONTRACTION = "no contracting dimension (an elementwise scale, not a layer)"
    CONV_INPUT = "the weight is the convolution's input, not its kernel"
    GROUPED_CONV = "grouped or depthwise convolution"
    TRANSPOSED_CONV = "transposed (lhs-dilated) convolution"
    RULE = "rule {rule!r} sends it to dense"
    SKIP_FIRST = "first weight matmul (skip_first)"
    SKIP_LAST = "last weight matmul (skip_last)"
    SMALL = "small layer (K={K}, O_last={O} < min_features={min})"
    K_NOT_4 = "K={K} not divisible by 4"
    CONFIG = "{field}={value!r}"
    NO_OUTPUT_DIM = "the weight has no free (output) dimension"
    O_NOT_4 = "O_last={O} not divisible by 4"
    NO_TOKEN_AXIS = "no token axis"
    BAD_TOKEN_AXIS = "token_axis={axis} is not a free dimension of the activation {shape}"
    FEW_TOKENS = "{T} token: fewer than 2"
    T_NOT_4 = "T={T} not divisible by 4 ({how} samples dY 2:4 along the tokens)"
    # backend notes (the product stays sparse, on another backend)
    KERNEL_LAYOUT = "not a plain matmul for the kernels (2-D weight, one contracting dim, no batch dims, one float dtype)"


@dataclasses.dataclass(frozen=True)
class Product:
    """What one of the three GEMMs of a matmul does.

    Attributes:
      sparse: whether its weight or activation operand is 2:4 (or half-token) sparse.
      reason: why it is dense (``None`` when sparse).
      detail: the values the reason's message names, as sorted ``(name, value)`` pairs.
      variant: for a sparse product, its config value (``"prune_output_dim"``, ``"fixed_mask"``,
        ``"mvue"``, ...).
      pattern: the grad-weight token pattern (``"checkerboard"``, ``"rotating(4)"``; ``""`` where
        none applies).
      how: how it runs where that varies (``"compact"``, ``"masked (odd T)"``, ...).
      backend: what computes it: ``"xla"`` (a dense GEMM on masked operands, or on the kept half of
        the tokens in compact mode), ``"pallas"`` or ``"none"`` (not computed: an operand that is
        not differentiated).
      executed: fraction of the dense FLOPs the backend executes (1.0, or 0.5 for the compact
        grad-weight product and the sparse tensor cores).
    """

    sparse: bool
    reason: Reason | None = None
    detail: tuple[tuple[str, Any], ...] = ()
    variant: str = ""
    pattern: str = ""
    how: str = ""
    backend: str = "xla"
    executed: float = 1.0
    note: str = ""  # why it runs on ``backend`` rather than the backend the config asks for

    @property
    def message(self) -> str:
        """The reason as text ("" when sparse)."""
        return self.reason.value.format(**dict(self.detail)) if self.reason is not None else ""

    def __str__(self) -> str:
        if not self.sparse:
            return f"dense: {self.message}"
        detail = ", ".join(x for x in (self.variant, self.pattern, self.how) if x)
        return f"sparse ({detail})" if detail else "sparse"


def _dense(reason: Reason, **detail: Any) -> Product:
    return Product(False, reason, tuple(sorted(detail.items())))


@dataclasses.dataclass(frozen=True)
class Decision:
    """The decision for one ``dot_general`` / convolution of the traced function.

    ``plan`` is what ``sparsify`` executes (``None``: the matmul is left exactly as it is, because
    none of its products is sparse). ``sr_ste``: ``"parameter"`` (added once per weight entry per
    step, in parameter space), ``"per use"`` (added in this matmul's backward pass: the weight is
    not a parameter moved by structural ops), or ``"off"``.
    """

    index: int
    site: Site
    weight_side: int | None
    param_path: str | None
    leaves: frozenset[int]
    forward: Product
    grad_input: Product
    grad_weight: Product
    token_axis: int | None
    tokens: int | None
    mode: str
    plan: GemmPlan | None
    sr_ste: str = "off"
    act_differentiated: bool = True

    @property
    def products(self) -> tuple[Product, Product, Product]:
        return self.forward, self.grad_input, self.grad_weight

    @property
    def sparse_products(self) -> int:
        return sum(p.sparse for p in self.products)


def _free_dims(ndim: int, contract: Sequence[int], batch: Sequence[int]) -> list[int]:
    return [d for d in range(ndim) if d not in contract and d not in batch]


def _kind(site: Site) -> tuple[int | None, Product | None]:
    """(weight side, None) for a weight matmul, else (None, the dense product saying why not)."""
    if site.region == "fst":
        return None, _dense(Reason.INNER_SPARSIFY)
    if site.region == "custom":
        return None, _dense(Reason.USER_REGION)
    if site.region is not None:
        return None, _dense(Reason.OPAQUE, prim=site.region.split(":", 1)[1])
    l, r = site.lhs.prov, site.rhs.prov
    if l.is_constant or r.is_constant:
        return None, _dense(Reason.CONSTANT_OPERAND)
    if l.data and r.data:
        return None, _dense(Reason.TWO_ACTIVATIONS)
    if not l.data and not r.data:
        return None, _dense(Reason.TWO_WEIGHTS)
    side = 0 if r.data else 1
    w_dtype = site.eqn.invars[side].aval.dtype
    a_dtype = site.eqn.invars[1 - side].aval.dtype
    if not jnp.issubdtype(w_dtype, jnp.floating) or jnp.issubdtype(a_dtype, jnp.complexfloating):
        return None, _dense(Reason.NOT_FLOAT)
    if not site.conv and not site.eqn.params["dimension_numbers"][0][side]:
        return None, _dense(Reason.NO_CONTRACTION)
    return side, None


@dataclasses.dataclass(frozen=True)
class _Geometry:
    identity: GemmPlan
    K: int
    O: int | None
    t_axis: int | None
    T: int | None
    structural: Product | None  # all three dense for a structural reason
    token_problem: Product | None  # grad-weight dense for a token-axis reason


def _dot_geometry(site: Site, side: int, token_axis: int | None) -> _Geometry:
    eqn = site.eqn
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    w, a = (lhs, rhs) if side == 0 else (rhs, lhs)
    w_c, w_b, a_c, a_b = (lc, lb, rc, rb) if side == 0 else (rc, rb, lc, lb)
    w_free, a_free = _free_dims(w.ndim, w_c, w_b), _free_dims(a.ndim, a_c, a_b)
    k_axis, o_axis = w_c[-1], (w_free[-1] if w_free else None)
    problem = None
    if token_axis is None:
        t_axis = a_free[-1] if a_free else None
        if t_axis is None:
            problem = _dense(Reason.NO_TOKEN_AXIS)
    else:
        t_axis = token_axis % a.ndim if -a.ndim <= token_axis < a.ndim else None
        if t_axis not in a_free:
            problem = _dense(Reason.BAD_TOKEN_AXIS, axis=token_axis, shape=tuple(a.shape))
            t_axis = None
    t_out = None
    if t_axis is not None:
        lhs_free = _free_dims(lhs.ndim, lc, lb)
        t_out = len(lb) + a_free.index(t_axis) + (len(lhs_free) if side == 0 else 0)
    T = a.shape[t_axis] if t_axis is not None else None
    identity = GemmPlan(
        dot_params=tuple(sorted(eqn.params.items())), weight_side=side, forward=False,
        grad_input="dense", grad_weight="dense", k_axis=k_axis, o_axis=o_axis, t_axis=t_axis,
        t_out_axis=t_out, act_contract=tuple(a_c), act_free=tuple(a_free), tokens=T or 0)
    O = w.shape[o_axis] if o_axis is not None else None
    return _Geometry(identity, w.shape[k_axis], O, t_axis, T, None, problem)


def _conv_geometry(site: Site, side: int) -> _Geometry:
    """K = input channels, O = output channels, T = output positions per image (the spatial axes
    flattened row-major in dimension_numbers order)."""
    p = site.eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    w = site.eqn.invars[1].aval
    out = site.eqn.outvars[0].aval
    spatial = tuple(out_spec[2:])
    T = math.prod(out.shape[d] for d in spatial) if spatial else None
    identity = GemmPlan(
        dot_params=tuple(sorted(p.items())), weight_side=side, forward=False, grad_input="dense",
        grad_weight="dense", k_axis=rhs_spec[1], o_axis=rhs_spec[0], t_axis=None, t_out_axis=None,
        act_contract=(lhs_spec[1],), conv=True, t_out_axes=spatial, tokens=T or 0)
    structural = None
    if side != 1:
        structural = _dense(Reason.CONV_INPUT)
    elif p["feature_group_count"] > 1 or p["batch_group_count"] > 1:
        structural = _dense(Reason.GROUPED_CONV)
    elif any(d != 1 for d in p["lhs_dilation"]):
        structural = _dense(Reason.TRANSPOSED_CONV)
    problem = None if T is not None else _dense(Reason.NO_TOKEN_AXIS)
    return _Geometry(identity, w.shape[rhs_spec[1]], w.shape[rhs_spec[0]], None, T, structural, problem)


def _rule_for(rules: Sequence[Rule], path: str, ns: str) -> Rule | None:
    return next((r for r in rules if r.matches(path, ns)), None)


def layer_config(base: FSTConfig, rule: Rule | None) -> FSTConfig:
    """``base`` with a matching rule's per-layer overrides applied."""
    if rule is None or not rule.overrides:
        return base
    changes = dict(rule.overrides)
    if changes.get("forward") is False:
        changes.setdefault("sr_ste", 0.0)
    return base.replace(**changes, rules=())


def _resolve_backend(cfg: FSTConfig) -> tuple[str, str]:
    """(the backend a config asks for, a note when ``"auto"`` fell back)."""
    if cfg.backend != "auto":
        return cfg.backend, ""
    if jax.default_backend() != "gpu":
        return "xla", f"auto: no GPU ({jax.default_backend()})"
    from fst_jax import cusparselt  # noqa: PLC0415

    ok, why = cusparselt.available()
    return ("cusparselt", "") if ok else ("xla", f"auto: cuSPARSELt unavailable ({why})")


def decide(sites: Sequence[Site], config: FSTConfig, param_paths: Sequence[str]) -> tuple[Decision, ...]:
    """The decision for every site, in order; ``sparsify``, ``report`` and ``forward_masks`` share it."""
    kinds = [_kind(s) for s in sites]
    weight_idx = [i for i, (side, _) in enumerate(kinds) if side is not None]
    first, last = (weight_idx[0], weight_idx[-1]) if weight_idx else (-1, -1)
    out = []
    for i, (site, (side, why)) in enumerate(zip(sites, kinds)):
        if side is None:
            out.append(Decision(i, site, None, None, frozenset(), why, why, why, None, None, config.mode, None))
            continue
        w_val = (site.lhs, site.rhs)[side]
        path = " + ".join(param_paths[j] for j in sorted(w_val.prov.params))
        out.append(_decide_weight(i, site, side, path, config, i == first, i == last))
    return tuple(out)


def _decide_weight(i: int, site: Site, side: int, path: str, base: FSTConfig, first: bool,
                   last: bool) -> Decision:
    ns = _compat.name_stack(site.eqn)
    rule = _rule_for(base.rules, path, ns)
    cfg = layer_config(base, rule)
    geo = _conv_geometry(site, side) if site.conv else _dot_geometry(site, side, cfg.token_axis)
    w_val, a_val = (site.lhs, site.rhs) if side == 0 else (site.rhs, site.lhs)
    act_diff = bool(a_val.prov.params)
    dense = geo.structural
    if dense is None:
        if rule is not None and rule.action == "dense":
            dense = _dense(Reason.RULE, rule=rule.pattern)
        elif rule is None and cfg.skip_first and first:
            dense = _dense(Reason.SKIP_FIRST)
        elif rule is None and cfg.skip_last and last:
            dense = _dense(Reason.SKIP_LAST)
        elif cfg.min_features and (geo.K < cfg.min_features or (geo.O is not None and geo.O < cfg.min_features)):
            dense = _dense(Reason.SMALL, K=geo.K, O=geo.O, min=cfg.min_features)
        elif geo.K % 4:
            dense = _dense(Reason.K_NOT_4, K=geo.K)
    common = dict(index=i, site=site, weight_side=side, param_path=path, leaves=w_val.prov.params,
                  token_axis=geo.t_axis, tokens=geo.T, mode=cfg.mode, act_differentiated=act_diff)
    if dense is not None:
        gi = dense if act_diff else dataclasses.replace(dense, backend="none")
        return Decision(forward=dense, grad_input=gi, grad_weight=dense, plan=None, **common)

    backend, note = _resolve_backend(cfg)
    fwd_backend = "xla"
    if backend == "pallas":
        fwd_backend = "pallas" if kernel_eligible(site.eqn, side) else "xla"
        note = note or ("" if fwd_backend == "pallas" else f"pallas: {Reason.KERNEL_LAYOUT.value}")
    elif backend == "cusparselt":
        why = cusparselt_ineligible(site.eqn, side)
        fwd_backend = "cusparselt" if why is None else "xla"
        note = note or ("" if why is None else f"cusparselt: {why}")
    half = 0.5 if fwd_backend == "cusparselt" else 1.0  # the sparse tensor cores skip the zeros
    fwd = Product(True, backend=fwd_backend, note=note, executed=half) if cfg.forward \
        else _dense(Reason.CONFIG, field="forward", value=False)
    if cfg.grad_input == "dense":
        gi = _dense(Reason.CONFIG, field="grad_input", value="dense")
    elif geo.O is None:
        gi = _dense(Reason.NO_OUTPUT_DIM)
    elif geo.O % 4:
        gi = _dense(Reason.O_NOT_4, O=geo.O)
    else:
        gi = Product(True, variant=cfg.grad_input, backend=fwd_backend, note=note, executed=half)
    if not act_diff:
        gi = dataclasses.replace(gi, backend="none")
    rotating = pattern_set(cfg.pattern)
    if cfg.grad_weight == "dense":
        gw = _dense(Reason.CONFIG, field="grad_weight", value="dense")
    elif geo.token_problem is not None:
        gw = geo.token_problem
    elif geo.T < 2:
        gw = _dense(Reason.FEW_TOKENS, T=geo.T)
    elif cfg.grad_weight in ("prune_grad_output", "mvue") and geo.T % 4:
        gw = _dense(Reason.T_NOT_4, T=geo.T, how=cfg.grad_weight)
    elif cfg.grad_weight == "fixed_mask":  # how it runs: from the plan (below)
        gw = Product(True, variant="fixed_mask",
                     pattern=cfg.pattern if rotating is None else f"rotating({len(rotating)})")
    else:
        gw = Product(True, variant=cfg.grad_weight)
    if not (fwd.sparse or gi.sparse or gw.sparse):
        return Decision(forward=fwd, grad_input=gi, grad_weight=gw, plan=None, **common)
    per_use = cfg.forward and cfg.sr_ste > 0 and not isinstance(w_val.view, View)
    act_aval = site.eqn.invars[1 - side].aval
    plan = dataclasses.replace(
        geo.identity, forward=cfg.forward,
        grad_input=cfg.grad_input if gi.sparse else "dense",
        grad_weight=cfg.grad_weight if gw.sparse else "dense",
        pattern=cfg.pattern if rotating is None else "rotating", restore_scale=cfg.restore_scale,
        patterns=rotating if rotating is not None and gw.sparse and cfg.grad_weight == "fixed_mask" else (),
        act_shape=tuple(act_aval.shape), sharded=typed_sharded(act_aval),
        sr_ste=cfg.sr_ste if per_use else 0.0, mode=cfg.mode, backend=fwd_backend)
    if plan.grad_weight in ("fixed_mask", "mvue"):
        gw = dataclasses.replace(gw, **_grad_weight_runs(plan, backend, note))
    sr = "off" if not (cfg.forward and cfg.sr_ste > 0) else ("per use" if per_use else "parameter")
    return Decision(forward=fwd, grad_input=gi, grad_weight=gw, plan=plan, sr_ste=sr, **common)


def _grad_weight_runs(plan: GemmPlan, backend: str, note: str) -> dict[str, Any]:
    """How a plan's token-sampled grad-weight product runs (``how``, ``backend``, ``executed``,
    ``note``): the plan's own properties decide, so the report says what :mod:`fst_jax._dot` does."""
    if plan.sparse_dy:
        return dict(how="sparse dY (keeps the whole activation)", backend="cusparselt", executed=0.5)
    if plan.grad_weight == "mvue":
        why = note or "cusparselt: the token axis is not the activation's innermost free axis"
        return dict(how="masked (keeps the whole activation)", note=why if backend == "cusparselt" else "")
    if plan.compact or plan.pair_select:
        return dict(how="compact", executed=0.5)
    if plan.mode == "masked":
        return dict(how="masked")
    if plan.rotating:
        if plan.conv:
            return dict(how="masked (convolution)")
        if plan.sharded:
            return dict(how="masked (explicit-sharding mesh: the activation's type is sharded)")
        return dict(how="masked (token_axis not the innermost free axis)")
    return dict(how="masked (odd T)")


def sr_ste_coefficient(decision: Decision, base: FSTConfig) -> float:
    """The SR-STE λ of a decision's weight (per-layer overrides included)."""
    rule = _rule_for(base.rules, decision.param_path or "", _compat.name_stack(decision.site.eqn))
    cfg = layer_config(base, rule)
    return cfg.sr_ste if cfg.forward else 0.0


def flops(site: Site) -> int:
    """FLOPs of one ``dot_general`` or convolution (one call of it, one iteration)."""
    eqn = site.eqn
    if site.conv:
        rhs = eqn.invars[1].aval
        cout = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
        return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs.shape) // cout
    (lc, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval
    return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in lc)

