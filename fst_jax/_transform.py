"""``sparsify``: a jaxpr interpreter that rewrites every weight matmul into the FST custom_vjp.

Three passes over the traced function, all keyed by an equation's *path* (its index in its jaxpr,
and for a sub-jaxpr the parameter name and branch index that lead to it):

1. :func:`_walk` computes each value's provenance (constant, weight, activation) and lists every
   ``dot_general`` in pre-order, entering sub-jaxprs in place.
2. :func:`decide` turns each of them into a :class:`Decision` (sparse or dense per GEMM, with the
   reason). :func:`fst_jax.report` prints these; :func:`sparsify` executes them.
3. :func:`_interpret` re-binds every equation under the caller's trace, replacing the planned
   ``dot_general`` s by :func:`fst_jax._dot.sparse_dot` and re-tracing the sub-jaxprs that hold one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fst_jax import _compat
from fst_jax._config import FSTConfig
from fst_jax._dot import MARKER, GemmPlan, sparse_dot

ACT = "activation"  # provenance of anything that depends on a non-parameter argument
# Provenance is None (built from constants only), ACT, or a frozenset of parameter-leaf indices.

_CUSTOM_PRIMS = ("custom_vjp_call", "custom_vjp_call_jaxpr", "custom_jvp_call")


def _join(*provs: Any) -> Any:
    out = None
    for p in provs:
        if p is ACT:
            return ACT
        if p is not None:
            out = p if out is None else out | p
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Site:
    """A ``dot_general`` found by the walk."""

    path: tuple[Any, ...]
    eqn: Any
    lhs: Any  # provenance of each operand
    rhs: Any
    trips: int | None  # iterations per call (product of enclosing scan lengths); None: a while loop
    region: str | None  # None, "custom" (user custom_vjp/jvp) or "fst" (an inner sparsify)


def _subjaxprs(params: dict[str, Any]) -> list[tuple[str, int, Any]]:
    """(param name, index, jaxpr) of every jaxpr-valued parameter."""
    subs = []
    for key, val in params.items():
        if isinstance(val, _compat.JAXPR_TYPES):
            subs.append((key, 0, val))
        elif isinstance(val, tuple) and val and all(isinstance(v, _compat.JAXPR_TYPES) for v in val):
            subs.extend((key, j, v) for j, v in enumerate(val))
    return subs


def _walk(jaxpr: Any, in_provs: Sequence[Any], prefix: tuple[Any, ...], trips: int | None,
          region: str | None, sites: list[Site]) -> list[Any]:
    """Provenance of ``jaxpr`` 's outputs; appends every dot_general to ``sites`` in pre-order."""
    env: dict[Any, Any] = dict(zip(jaxpr.invars, in_provs))

    def read(v: Any) -> Any:
        return None if isinstance(v, _compat.Literal) else env.get(v)

    for i, eqn in enumerate(jaxpr.eqns):
        path = prefix + (i,)
        ins = [read(v) for v in eqn.invars]
        subs = _subjaxprs(eqn.params)
        if eqn.primitive in (_compat.prims.dot_general_p, _compat.prims.conv_general_dilated_p):
            sites.append(Site(path, eqn, ins[0], ins[1], trips, region))
            outs = [_join(*ins)]
        elif subs:
            outs = _walk_higher(eqn, ins, subs, path, trips, region, sites)
        else:
            outs = [_join(*ins)] * len(eqn.outvars)
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _fixpoint(body: Callable[[list[Any]], list[Any]], carry: list[Any]) -> list[Any]:
    """Loop-carried provenance: join the body's carry outputs into its inputs until stable."""
    while True:
        new = [_join(c, o) for c, o in zip(carry, body(carry))]
        if new == carry:
            return carry
        carry = new


def _walk_higher(eqn: Any, ins: list[Any], subs: list[tuple[str, int, Any]], path: tuple[Any, ...],
                 trips: int | None, region: str | None, sites: list[Site]) -> list[Any]:
    name = eqn.primitive.name
    p = eqn.params
    if name in _CUSTOM_PRIMS:
        region = region or ("fst" if MARKER in _compat.name_stack(eqn) else "custom")

    def walk(key: str, j: int, sub: Any, provs: Sequence[Any], trips: int | None,
             record: bool = True) -> list[Any]:
        jaxpr, _ = _compat.open_jaxpr(sub)
        return _walk(jaxpr, provs, path + (key, j), trips, region, sites if record else [])

    if name == "scan":
        nc, ncarry = _compat.scan_counts(p)
        consts, carry, xs = ins[:nc], ins[nc:nc + ncarry], ins[nc + ncarry:]
        inner = None if trips is None else trips * p["length"]
        carry = _fixpoint(lambda c: walk("jaxpr", 0, p["jaxpr"], consts + c + xs, inner, False)[:ncarry], carry)
        outs = walk("jaxpr", 0, p["jaxpr"], consts + carry + xs, inner)
        return carry + outs[ncarry:]
    if name == "while":
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cconsts, bconsts, carry = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
        carry = _fixpoint(lambda c: walk("body_jaxpr", 0, p["body_jaxpr"], bconsts + c, None, False), carry)
        pred = walk("cond_jaxpr", 0, p["cond_jaxpr"], cconsts + carry, None)
        walk("body_jaxpr", 0, p["body_jaxpr"], bconsts + carry, None)
        return [_join(c, *pred) for c in carry]
    if name == "cond":
        branch_outs = [walk(key, j, sub, ins[1:], trips) for key, j, sub in subs]
        return [_join(ins[0], *outs) for outs in zip(*branch_outs)]
    # jit, closed_call, remat, shard_map, custom_vjp/jvp, ...: sub-jaxpr inputs map one to one.
    outs = None
    for key, j, sub in subs:
        jaxpr, _ = _compat.open_jaxpr(sub)
        provs = ins if len(jaxpr.invars) == len(ins) else [_join(*ins)] * len(jaxpr.invars)
        sub_outs = walk(key, j, sub, provs, trips)
        if outs is None and len(sub_outs) == len(eqn.outvars):
            outs = sub_outs
    return outs if outs is not None else [_join(*ins)] * len(eqn.outvars)


# ------------------------------------------------------------------------------------------------
# Decisions


@dataclasses.dataclass(frozen=True)
class Decision:
    """What happens to one ``dot_general``: per GEMM ``"sparse"`` or ``"dense: <reason>"``."""

    site: Site
    weight_side: int | None  # 0 lhs, 1 rhs, None: not a weight matmul
    param_path: str | None
    forward: str
    grad_input: str
    grad_weight: str
    plan: GemmPlan | None  # None: left as it is (not routed through the custom_vjp)


def _free_dims(ndim: int, contract: Sequence[int], batch: Sequence[int]) -> list[int]:
    return [d for d in range(ndim) if d not in contract and d not in batch]


def _all_dense(site: Site, reason: str, side: int | None = None, path: str | None = None,
               plan: GemmPlan | None = None) -> Decision:
    r = f"dense: {reason}"
    return Decision(site, side, path, r, r, r, plan)


def _operand_kind(site: Site) -> tuple[int | None, str | None]:
    """(weight side, None) for a weight matmul, else (None, why it is not one)."""
    if site.region == "fst":
        return None, "already rewritten by an inner fst_jax.sparsify"
    if site.region == "custom":
        return None, "inside a user custom_vjp/custom_jvp region (opaque)"
    dtypes = [v.aval.dtype for v in site.eqn.invars[:2]]
    if not all(jnp.issubdtype(d, jnp.floating) for d in dtypes):
        return None, "integer or complex matmul"
    l, r = site.lhs, site.rhs
    if l is None or r is None:
        return None, "constant operand"
    if l is ACT and r is ACT:
        return None, "two activations (no weight operand)"
    if l is not ACT and r is not ACT:
        return None, "two weights"
    return (0 if r is ACT else 1), None


def decide(sites: Sequence[Site], config: FSTConfig, param_paths: Sequence[str]) -> list[Decision]:
    """The decision for every site; ``sparsify`` and ``report`` both call this."""
    kinds = [_operand_kind(s) for s in sites]
    weight_idx = [i for i, (side, _) in enumerate(kinds) if side is not None]
    first, last = (weight_idx[0], weight_idx[-1]) if weight_idx else (-1, -1)
    out = []
    for i, (site, (side, why)) in enumerate(zip(sites, kinds)):
        if side is None:
            out.append(_all_dense(site, why))
            continue
        prov = site.lhs if side == 0 else site.rhs
        path = " + ".join(param_paths[j] for j in sorted(prov))
        out.append(_decide_weight_matmul(site, side, path, config, i == first, i == last))
    return out


def _dot_geometry(site: Site, side: int) -> tuple[GemmPlan, int | None, int | None, int | None, str | None]:
    """(identity plan, K, O_last, T, reason to leave it all dense) of a dot_general."""
    eqn = site.eqn
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    w, a = (lhs, rhs) if side == 0 else (rhs, lhs)
    w_c, w_b, a_c, a_b = (lc, lb, rc, rb) if side == 0 else (rc, rb, lc, lb)
    w_free, a_free = _free_dims(w.ndim, w_c, w_b), _free_dims(a.ndim, a_c, a_b)
    k_axis = w_c[-1] if w_c else None
    o_axis = w_free[-1] if w_free else None
    t_axis = a_free[-1] if a_free else None
    lhs_free = _free_dims(lhs.ndim, lc, lb)
    t_out = None
    if t_axis is not None:
        t_out = len(lb) + (len(a_free) - 1 if side == 1 else len(lhs_free) + len(a_free) - 1)
    identity = GemmPlan(
        dot_params=tuple(sorted(eqn.params.items())), weight_side=side, forward=False,
        grad_input="dense", grad_weight="dense", k_axis=k_axis if k_axis is not None else 0,
        o_axis=o_axis, t_axis=t_axis, t_out_axis=t_out, act_contract=tuple(a_c))
    K = w.shape[k_axis] if k_axis is not None else None
    O = w.shape[o_axis] if o_axis is not None else None
    T = a.shape[t_axis] if t_axis is not None else None
    return identity, K, O, T, None if k_axis is not None else "no contracting dimension"


def _conv_geometry(site: Site, side: int) -> tuple[GemmPlan, int | None, int | None, int | None, str | None]:
    """The same for a conv_general_dilated: K = input channels, O = output channels, T = output
    positions per image (the spatial axes flattened row-major in dimension_numbers order)."""
    p = site.eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    w = site.eqn.invars[1].aval
    out = site.eqn.outvars[0].aval
    spatial = tuple(out_spec[2:])
    T = math.prod(out.shape[d] for d in spatial) if spatial else None
    identity = GemmPlan(
        dot_params=tuple(sorted(p.items())), weight_side=side, forward=False, grad_input="dense",
        grad_weight="dense", k_axis=rhs_spec[1], o_axis=rhs_spec[0], t_axis=None, t_out_axis=None,
        act_contract=(lhs_spec[1],), conv=True, t_out_axes=spatial)
    reason = None
    if side != 1:
        reason = "the weight is the convolution's input, not its kernel"
    elif p["feature_group_count"] > 1 or p["batch_group_count"] > 1:
        reason = "grouped or depthwise convolution"
    elif any(d != 1 for d in p["lhs_dilation"]):
        reason = "transposed (lhs-dilated) convolution"
    return identity, w.shape[rhs_spec[1]], w.shape[rhs_spec[0]], T, reason


def _decide_weight_matmul(site: Site, side: int, path: str, cfg: FSTConfig, first: bool,
                          last: bool) -> Decision:
    eqn = site.eqn
    conv = eqn.primitive is _compat.prims.conv_general_dilated_p
    identity, K, O, T, structural = (_conv_geometry if conv else _dot_geometry)(site, side)
    ns = _compat.name_stack(eqn)
    rule = next((r for r in cfg.rules if r.matches(path, ns)), None)
    reason = None
    if structural is not None:
        reason = structural
    elif rule is not None and rule.action == "dense":
        reason = f"rule {rule.pattern!r} sends it to dense"
    elif rule is None and cfg.skip_first and first:
        reason = "first weight matmul (skip_first)"
    elif rule is None and cfg.skip_last and last:
        reason = "last weight matmul (skip_last)"
    elif cfg.min_features and (K < cfg.min_features or (O is not None and O < cfg.min_features)):
        reason = f"small layer (K={K}, O_last={O} < min_features={cfg.min_features})"
    elif K % 4:
        reason = f"K={K} not divisible by 4"
    if reason is not None:
        return _all_dense(site, reason, side, path, identity)

    fwd = "sparse" if cfg.forward else "dense: forward=False"
    if cfg.grad_input == "dense":
        gi = "dense: grad_input='dense'"
    elif O is None:
        gi = "dense: the weight has no free (output) dimension"
    elif O % 4:
        gi = f"dense: O_last={O} not divisible by 4"
    else:
        gi = f"sparse ({cfg.grad_input})"
    if cfg.grad_weight == "dense":
        gw = "dense: grad_weight='dense'"
    elif T is None:
        gw = "dense: no token axis"
    elif T % 4:
        gw = f"dense: T={T} not divisible by 4"
    else:
        gw = f"sparse ({cfg.grad_weight}, {cfg.pattern}, {cfg.mode})" if cfg.grad_weight == "fixed_mask" \
            else f"sparse ({cfg.grad_weight})"
    gi_sparse, gw_sparse = gi.startswith("sparse"), gw.startswith("sparse")
    plan = dataclasses.replace(
        identity, forward=cfg.forward,
        grad_input=cfg.grad_input if gi_sparse else "dense",
        grad_weight=cfg.grad_weight if gw_sparse else "dense",
        pattern=cfg.pattern, restore_scale=cfg.restore_scale,
        sr_ste=cfg.sr_ste if cfg.forward else 0.0, mode=cfg.mode,
        backend="pallas" if cfg.backend == "pallas" or (cfg.backend == "auto" and jax.default_backend() == "gpu")
        else "xla")
    return Decision(site, side, path, fwd, gi, gw, plan)


# ------------------------------------------------------------------------------------------------
# Rewriting


def _prefixes(paths: Sequence[tuple[Any, ...]]) -> frozenset[tuple[Any, ...]]:
    return frozenset(p[:n] for p in paths for n in range(1, len(p)))


def _interpret(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], plans: dict[tuple, GemmPlan],
               below: frozenset[tuple], prefix: tuple[Any, ...] = ()) -> list[Any]:
    """Evaluates ``jaxpr`` under the current trace with the planned matmuls rewritten."""
    env: dict[Any, Any] = {}
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))

    def read(v: Any) -> Any:
        return v.val if isinstance(v, _compat.Literal) else env[v]

    for i, eqn in enumerate(jaxpr.eqns):
        path = prefix + (i,)
        invals = [read(v) for v in eqn.invars]
        if path in plans:
            with _compat.eqn_context(eqn):
                outs = [sparse_dot(invals[0], invals[1], plans[path])]
        elif path in below:
            outs = _rewrite_higher(eqn, invals, path, plans, below)
        else:
            outs = _compat.bind_eqn(eqn, invals)
        for v, o in zip(eqn.outvars, outs):
            if not isinstance(v, _compat.DropVar):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _rewrite_higher(eqn: Any, invals: list[Any], path: tuple[Any, ...], plans: dict[tuple, GemmPlan],
                    below: frozenset[tuple]) -> list[Any]:
    if eqn.primitive.name == "shard_map":
        jaxpr, consts = _compat.open_jaxpr(eqn.params["jaxpr"])
        return _compat.bind_shard_map(
            eqn, invals, lambda *a: _interpret(jaxpr, consts, a, plans, below, path + ("jaxpr", 0)))
    params = dict(eqn.params)
    for key, j, sub in _subjaxprs(eqn.params):
        sub_path = path + (key, j)
        if sub_path not in below:
            continue
        jaxpr, consts = _compat.open_jaxpr(sub)
        new = jax.make_jaxpr(lambda *a: _interpret(jaxpr, consts, a, plans, below, sub_path))(
            *[v.aval for v in jaxpr.invars])
        new = _compat.like_param(sub, new, eqn.primitive.name)
        if isinstance(params[key], tuple):
            params[key] = params[key][:j] + (new,) + params[key][j + 1:]
        else:
            params[key] = new
    return _compat.bind_eqn(eqn, invals, params)


# ------------------------------------------------------------------------------------------------
# Tracing and caching


@dataclasses.dataclass(frozen=True)
class Traced:
    """A traced function with its decisions."""

    jaxpr: Any  # closed
    out_tree: Any
    decisions: tuple[Decision, ...]
    param_paths: tuple[str, ...]

    @functools.cached_property
    def plans(self) -> dict[tuple, GemmPlan]:
        return {d.site.path: d.plan for d in self.decisions if d.plan is not None}

    @functools.cached_property
    def below(self) -> frozenset[tuple]:
        return _prefixes(list(self.plans))


def _as_tuple(x: int | Sequence[int], name: str) -> tuple[int, ...]:
    t = (x,) if isinstance(x, int) else tuple(x)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in t):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {x!r}")
    return t


class _Signature:
    """Splits a call's arguments into static values and flat dynamic leaves."""

    def __init__(self, fn_name: str, params_argnums: int | Sequence[int], static_argnums: int | Sequence[int],
                 static_argnames: str | Sequence[str]):
        self.fn_name = fn_name
        self.params_argnums = _as_tuple(params_argnums, "params_argnums")
        self.static_argnums = _as_tuple(static_argnums, "static_argnums")
        self.static_argnames = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
        overlap = set(self.params_argnums) & set(self.static_argnums)
        if overlap:
            raise ValueError(f"params_argnums and static_argnums overlap at {sorted(overlap)}: parameters must be arrays")

    def split(self, args: tuple, kwargs: dict) -> tuple[Any, list[Any], Any, list[str], list[bool]]:
        n = len(args)
        for name, nums in (("params_argnums", self.params_argnums), ("static_argnums", self.static_argnums)):
            bad = [i for i in nums if not -n <= i < n]
            if bad:
                raise ValueError(
                    f"{name}={bad[0] if len(nums) == 1 else nums} is out of range for a call of "
                    f"{self.fn_name} with {n} positional argument(s); pass the parameters positionally "
                    f"and use indices in [0, {n})")
        static_pos = {i % n for i in self.static_argnums}
        params_pos = {i % n for i in self.params_argnums}
        static = (tuple((i, args[i]) for i in sorted(static_pos)),
                  tuple(sorted((k, v) for k, v in kwargs.items() if k in self.static_argnames)))
        dyn_args = tuple(a for i, a in enumerate(args) if i not in static_pos)
        dyn_kwargs = {k: v for k, v in kwargs.items() if k not in self.static_argnames}
        positions = [i for i in range(n) if i not in static_pos]
        leaves_paths, tree = jax.tree_util.tree_flatten_with_path((dyn_args, dyn_kwargs))
        leaves, paths, is_param = [], [], []
        for kp, leaf in leaves_paths:
            where = kp[0].idx if hasattr(kp[0], "idx") else None
            pos = positions[kp[1].idx] if where == 0 else None
            param = pos in params_pos
            tail = jax.tree_util.keystr(kp[2:])
            label = tail if len(self.params_argnums) == 1 else f"[{pos}]{tail}"
            if param and not _is_array_like(leaf):
                raise TypeError(
                    f"{self.fn_name}: the parameters (argument {pos}, params_argnums) must be a pytree of "
                    f"arrays, but the leaf at {tail or '<root>'} is a {type(leaf).__name__} ({leaf!r:.60}); "
                    "move non-array values to another argument marked static_argnums")
            leaves.append(leaf)
            paths.append(label if param else _arg_label(pos, kwargs_key=kp[1] if where == 1 else None, tail=tail))
            is_param.append(param)
        return static, leaves, tree, paths, is_param

    def rebuild(self, static: Any, tree: Any, leaves: Sequence[Any]) -> tuple[tuple, dict]:
        dyn_args, dyn_kwargs = jax.tree_util.tree_unflatten(tree, list(leaves))
        static_pos, static_kw = static
        args, it = [], iter(dyn_args)
        n = len(dyn_args) + len(static_pos)
        spos = dict(static_pos)
        for i in range(n):
            args.append(spos[i] if i in spos else next(it))
        return tuple(args), {**dyn_kwargs, **dict(static_kw)}


def _arg_label(pos: int | None, kwargs_key: Any = None, tail: str = "") -> str:
    """How an error names a non-parameter leaf: ``args[1]['x']`` or ``kwargs['x']``."""
    head = f"args[{pos}]" if pos is not None else f"kwargs{jax.tree_util.keystr((kwargs_key,))}"
    return head + tail


def _is_array_like(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, jax.ShapeDtypeStruct,
                          _compat.Tracer))


def _spec(leaf: Any, path: str) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    try:
        return jax.typeof(leaf)
    except TypeError as e:
        raise TypeError(f"argument leaf {path} of type {type(leaf).__name__} is not an array; mark that "
                        "argument static (static_argnums / static_argnames)") from e


def _spec_key(spec: Any) -> Any:
    if isinstance(spec, jax.ShapeDtypeStruct):
        return ("sds", spec.shape, spec.dtype, spec.weak_type, spec.sharding)
    return spec


def _trace(fn: Callable, sig: _Signature, config: FSTConfig, args: tuple, kwargs: dict,
           cache: dict | None) -> tuple[Traced, list[Any]]:
    static, leaves, tree, paths, is_param = sig.split(args, kwargs)
    specs = [_spec(x, p) for x, p in zip(leaves, paths)]
    key = (tree, tuple(_spec_key(s) for s in specs), static)
    try:
        hit = cache.get(key) if cache is not None else None
    except TypeError as e:  # an unhashable static argument
        raise TypeError(f"static arguments of {sig.fn_name} must be hashable: {e}") from e
    if hit is not None:
        return hit, leaves
    out_tree = []

    def flat_fn(*flat: Any) -> list[Any]:
        a, kw = sig.rebuild(static, tree, flat)
        out, t = jax.tree_util.tree_flatten(fn(*a, **kw))
        out_tree.append(t)
        return out

    closed = jax.make_jaxpr(flat_fn)(*specs)
    jaxpr, consts = _compat.open_jaxpr(closed)
    param_paths = [p for p, isp in zip(paths, is_param) if isp]
    ids = iter(range(len(param_paths)))
    provs = [frozenset({next(ids)}) if isp else ACT for isp in is_param]
    sites: list[Site] = []
    _walk(jaxpr, provs, (), 1, None, sites)
    traced = Traced(closed, out_tree[0], tuple(decide(sites, config, param_paths)), tuple(param_paths))
    if cache is not None and not any(isinstance(c, _compat.Tracer) for c in consts):
        cache[key] = traced
    return traced, leaves


_FORWARD_MODE_ERROR = (
    "fst_jax.sparsify does not support forward-mode autodiff (jax.jvp, jax.jacfwd, jax.hessian, "
    "jax.linearize of the forward pass): each rewritten matmul is a jax.custom_vjp, which defines "
    "only a reverse-mode derivative. Use jax.grad / jax.vjp / jax.jacrev, or call the function "
    "without fst_jax.sparsify for forward-mode derivatives."
)


def sparsify(fn: Callable, config: FSTConfig | None = None, *, params_argnums: int | Sequence[int] = 0,
             static_argnums: int | Sequence[int] = (), static_argnames: str | Sequence[str] = ()) -> Callable:
    """Rewrites every weight matmul of ``fn`` into the FST 2:4 ``custom_vjp``.

    ``fn`` is traced to a jaxpr; each ``dot_general`` with one operand that depends only on the
    parameters (``params_argnums``) and one that depends on the other arguments is replaced by a
    ``jax.custom_vjp`` computing the forward, grad-input and grad-weight products of the FST recipe
    (``config``). Everything else is re-bound as it is. Sub-jaxprs (``jit``, ``scan``, ``while``,
    ``cond``, ``remat``, ``shard_map``, ``pmap``) are rewritten in place; user ``custom_vjp`` /
    ``custom_jvp`` regions are left alone. The traced jaxpr is cached by (tree structure, avals,
    static arguments), so a second call with the same shapes does not trace ``fn`` again.

    Args:
      fn: the function, typically a loss ``loss(params, batch)``; pytrees in and out.
      config: an :class:`FSTConfig`; ``None`` means ``FSTConfig()``, the paper's recipe.
      params_argnums: the positional argument(s) holding the parameters (the weights).
      static_argnums: positional arguments that are not arrays (hashable values).
      static_argnames: keyword arguments that are not arrays.

    Returns:
      A function with ``fn`` 's signature.

    Raises:
      ValueError: ``params_argnums`` out of range for a call.
      TypeError: a parameter leaf is not an array; forward-mode autodiff was requested.

    Example:
      >>> import jax, jax.numpy as jnp, fst_jax
      >>> def loss(params, x):
      ...     h = jnp.tanh(x @ params["w1"])
      ...     h = jnp.tanh(h @ params["w2"])
      ...     return jnp.mean((h @ params["w3"]) ** 2)
      >>> k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
      >>> params = {"w1": jax.random.normal(k1, (8, 16)), "w2": jax.random.normal(k2, (16, 16)),
      ...           "w3": jax.random.normal(k3, (16, 4))}
      >>> x = jax.random.normal(k4, (4, 8, 8))
      >>> grads = jax.jit(jax.grad(fst_jax.sparsify(loss)))(params, x)
      >>> [g.shape for g in jax.tree.leaves(grads)]
      [(8, 16), (16, 16), (16, 4)]
    """
    config = FSTConfig() if config is None else config
    if not isinstance(config, FSTConfig):
        raise TypeError(f"config must be an fst_jax.FSTConfig or None, got {type(config).__name__}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    sig = _Signature(getattr(fn, "__name__", "fn"), params_argnums, static_argnums, static_argnames)
    cache: dict[Any, Traced] = {}

    @functools.wraps(fn)
    def sparsified(*args: Any, **kwargs: Any) -> Any:
        traced, leaves = _trace(fn, sig, config, args, kwargs, cache)
        jaxpr, consts = _compat.open_jaxpr(traced.jaxpr)
        try:
            outs = _interpret(jaxpr, consts, leaves, traced.plans, traced.below)
        except TypeError as e:
            if "forward-mode" in str(e) or "jvp" in str(e) and "custom_vjp" in str(e):
                raise TypeError(_FORWARD_MODE_ERROR) from e
            raise
        return jax.tree_util.tree_unflatten(traced.out_tree, outs)

    sparsified._fst_cache = cache  # for tests: the number of traces  # type: ignore[attr-defined]
    return sparsified


def flops(site: Site) -> int:
    """FLOPs of one ``dot_general`` or convolution (one call of it, one iteration)."""
    eqn = site.eqn
    if eqn.primitive is _compat.prims.conv_general_dilated_p:
        rhs = eqn.invars[1].aval
        cout = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
        return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs.shape) // cout
    (lc, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval
    return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in lc)
