"""``sparsify``: the traced function, rewritten once per signature, cached, and executed.

1. :func:`fst_jax._tracing.trace` traces ``fn``, runs the one analysis
   (:mod:`fst_jax._analysis`) and decides every matmul (:mod:`fst_jax._decisions`).
2. :func:`_rewrite` builds the rewritten closed jaxpr: every matmul with a plan becomes
   :func:`fst_jax._dot.sparse_dot` (one ``jax.custom_vjp``), sub-jaxprs that hold one are re-traced,
   everything else is re-bound as it is. Each weight that is a view of the parameters and the
   same array in every iteration of the loops around it is prepared once (its masks, ``W_f``),
   at the top level, shared by the matmuls that read it and closed over by loop bodies; the SR-STE
   term is attached to the parameters once, from the same forward masks.
3. The rewritten jaxpr is cached (bounded, keyed like ``jax.jit``: tree structure, avals, static
   values, JAX's trace context) with one ``jax.jit`` of it, which every call goes through (under
   an outer ``jit`` it is inlined; under an eager ``jax.grad`` it compiles once instead of
   dispatching every op), so a second eager call compiles nothing.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fst_jax import _compat
from fst_jax._analysis import View, run_jaxpr, subjaxprs
from fst_jax._config import FSTConfig
from fst_jax._decisions import sr_ste_coefficient
from fst_jax._dot import MVUE_SEEDS, GemmPlan, prepare, sparse_dot, weight_spec
from fst_jax._export import Use, leaf_masks, replay, sparse_uses, use_mask, view_key
from fst_jax._masks import _as_key, apply_mask
from fst_jax._tracing import FST_KEY, Traced, check_call, cache_key, trace, unflatten_outputs

#: How many rewritten signatures one sparsified function keeps (least recently used dropped).
CACHE_SIZE = 32


def _interpret(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], plans: dict[tuple, GemmPlan],
               below: frozenset[tuple], prefix: tuple[Any, ...] = (),
               outer: dict[tuple, tuple[Any, Any]] | None = None) -> list[Any]:
    """Evaluates ``jaxpr`` under the current trace with the planned matmuls rewritten.

    ``outer`` holds, by path, a keyed matmul's layer key (:func:`_draw` draws its pattern index or
    mvue seed from it; every scan around the matmul has folded its iteration in) and a matmul's
    prepared weight (hoisted): values of the top-level trace, which matmuls inside sub-jaxprs
    close over (see :data:`CLOSURE`).
    """
    outer = {} if outer is None else outer

    def on_eqn(i: int, eqn: Any, invals: list[Any]) -> list[Any]:
        path = prefix + (i,)
        if path in plans:
            key, prepared = outer.get(path, (None, None))
            choice = None if key is None else _draw(plans[path], key)
            with _compat.eqn_context(eqn):
                return [sparse_dot(invals[0], invals[1], plans[path], choice, prepared)]
        if path in below:
            return REWRITE.get(eqn.primitive, _rewrite_subjaxprs)(eqn, invals, path, plans, below, outer)
        return _compat.bind_eqn(eqn, invals)

    return run_jaxpr(jaxpr, args, on_eqn, lambda v: v.val, consts)


def _draw(plan: GemmPlan, key: jax.Array) -> jax.Array:
    """A keyed matmul's draw from its layer key: the pattern index (rotating) or the mvue seed."""
    n = len(plan.patterns) if plan.rotating else MVUE_SEEDS
    return jax.random.randint(key, (), 0, n, dtype=jnp.int32)


def _fold_iteration(outer: dict[tuple, tuple[Any, Any]], prefix: tuple[Any, ...],
                    it: jax.Array) -> dict[tuple, tuple[Any, Any]]:
    """``outer`` with the scan iteration ``it`` folded into the layer key of every keyed matmul
    under ``prefix``: each iteration of a scan (a scan over layers, a time loop) draws anew."""
    return {p: ((jax.random.fold_in(k, it), w) if k is not None and p[:len(prefix)] == prefix else (k, w))
            for p, (k, w) in outer.items()}


def _has_tracer_consts(closed: Any) -> bool:
    return any(isinstance(c, _compat.Tracer) for c in _compat.open_jaxpr(closed)[1])


def _rewrite_subjaxprs(eqn: Any, invals: list[Any], path: tuple[Any, ...], plans: dict[tuple, GemmPlan],
                       below: frozenset[tuple], outer: dict[tuple, tuple[Any, Any]]) -> list[Any]:
    """Any higher-order primitive: re-trace each sub-jaxpr that holds a planned matmul, re-bind.

    A re-traced body that closes over a value of an outer trace (the drawn choice of a rotating
    matmul, a hoisted prepared weight) has tracer constants, which a re-bound primitive cannot
    hold: such an equation is re-invoked through the primitive's public API (:data:`CLOSURE`),
    which closure-converts.
    """
    new_subs: dict[tuple[str, int], Any] = {}
    extra: list[Any] = []  # operands the rewritten equation takes beyond ``invals``
    for key, j, sub in subjaxprs(eqn.params):
        sub_path = path + (key, j)
        if sub_path not in below:
            continue
        jaxpr, consts = _compat.open_jaxpr(sub)
        avals = [v.aval for v in jaxpr.invars]
        if eqn.primitive is _compat.P["scan"] and any(
                k is not None and p[:len(sub_path)] == sub_path for p, (k, _) in outer.items()):
            # a keyed matmul in a scan body: the body takes the iteration as one more (last) x
            new_subs[key, j] = jax.make_jaxpr(
                lambda *a, jaxpr=jaxpr, consts=consts, sub_path=sub_path:
                _interpret(jaxpr, consts, a[:-1], plans, below, sub_path, _fold_iteration(outer, sub_path, a[-1]))
            )(*avals, jax.ShapeDtypeStruct((), jnp.int32))
            extra.append(jnp.arange(eqn.params["length"], dtype=jnp.int32))  # the iterations, as xs
            continue
        new_subs[key, j] = jax.make_jaxpr(
            lambda *a, jaxpr=jaxpr, consts=consts, sub_path=sub_path:
            _interpret(jaxpr, consts, a, plans, below, sub_path, outer))(*avals)
    # A body with an extra operand changes the equation's arity, so it is never re-bound; a keyed
    # body always closes over its layer keys (tracers of the top-level trace) anyway.
    if extra or any(_has_tracer_consts(new) for new in new_subs.values()):
        rule = CLOSURE.get(eqn.primitive)
        if rule is None:
            raise NotImplementedError(
                f"fst_jax: a rotating-pattern or grad_weight='mvue' matmul inside {eqn.primitive.name!r} is "
                "not supported (its rewritten body closes over the layer's draw); give that layer a fixed "
                "pattern and grad weight (Rule(pattern=..., overrides={'pattern': 'checkerboard', "
                "'grad_weight': 'fixed_mask'})) or report this")
        subs = {(key, j): new_subs.get((key, j), sub) for key, j, sub in subjaxprs(eqn.params)}
        with _compat.eqn_context(eqn):
            return list(rule(eqn, [*invals, *extra], subs))
    params = dict(eqn.params)
    for (key, j), new in new_subs.items():
        new = _compat.like_param(params[key][j] if isinstance(params[key], tuple) else params[key], new,
                                 eqn.primitive.name)
        params[key] = params[key][:j] + (new,) + params[key][j + 1:] if isinstance(params[key], tuple) else new
    return _compat.bind_eqn(eqn, invals, params)


def _rewrite_shard_map(eqn: Any, invals: list[Any], path: tuple[Any, ...], plans: dict[tuple, GemmPlan],
                       below: frozenset[tuple], outer: dict[tuple, tuple[Any, Any]]) -> list[Any]:
    """shard_map re-traces its body itself, inside its manual-axes environment."""
    jaxpr, consts = _compat.open_jaxpr(eqn.params["jaxpr"])
    return _compat.bind_shard_map(
        eqn, invals, lambda *a: _interpret(jaxpr, consts, a, plans, below, path + ("jaxpr", 0), outer))


#: The rewrite's table of higher-order primitives that need more than re-tracing their sub-jaxprs.
REWRITE = {p: rule for p, rule in ((_compat.P["shard_map"], _rewrite_shard_map),) if p is not None}


# ------------------------------------------------------------------------------------------------
# Closure conversion: a rewritten body that closes over values of the outer trace (the drawn choice
# of a rotating matmul, a prepared weight hoisted out of the body) is run through the primitive's
# public API, which turns those values into operands. Each rule gets the equation, its operands
# and every sub-jaxpr (rewritten or not) by (param name, index), and returns the outputs.


def _body(closed: Any) -> Callable[..., list[Any]]:
    """A closed jaxpr as a Python function (its constants, tracers included, closed over)."""
    return lambda *a: _compat.eval_closed(closed, *a)


def _closure_scan(eqn: Any, invals: list[Any], subs: dict) -> list[Any]:
    n_consts, n_carry = _compat.scan_counts(eqn.params)
    consts, init, xs = invals[:n_consts], invals[n_consts:n_consts + n_carry], invals[n_consts + n_carry:]
    body = _body(subs["jaxpr", 0])  # xs may end with the iterations (see _rewrite_subjaxprs)

    def step(carry: list[Any], x: list[Any]) -> tuple[list[Any], list[Any]]:
        outs = body(*consts, *carry, *x)
        return outs[:n_carry], outs[n_carry:]

    carry, ys = jax.lax.scan(step, list(init), list(xs), length=eqn.params["length"],
                             reverse=eqn.params["reverse"], unroll=eqn.params["unroll"])
    return [*carry, *ys]


def _closure_while(eqn: Any, invals: list[Any], subs: dict) -> list[Any]:
    nc, nb = _compat.while_counts(eqn.params)
    c_consts, b_consts, init = invals[:nc], invals[nc:nc + nb], invals[nc + nb:]
    cond, body = _body(subs["cond_jaxpr", 0]), _body(subs["body_jaxpr", 0])
    return list(jax.lax.while_loop(lambda c: cond(*c_consts, *c)[0], lambda c: body(*b_consts, *c), list(init)))


def _closure_cond(eqn: Any, invals: list[Any], subs: dict) -> list[Any]:
    n = len(eqn.params["branches"])
    branches = [_body(subs["branches", j]) for j in range(n)]
    return list(jax.lax.switch(invals[0], branches, *invals[1:]))


def _closure_remat(eqn: Any, invals: list[Any], subs: dict) -> list[Any]:
    fun = jax.checkpoint(_body(subs["jaxpr", 0]), prevent_cse=eqn.params["prevent_cse"],
                         policy=eqn.params["policy"])
    return list(fun(*invals))


def _closure_jit(eqn: Any, invals: list[Any], subs: dict) -> list[Any]:
    body = _body(subs[_compat.CALL_JAXPR[eqn.primitive], 0])
    body.__name__ = eqn.params.get("name", "jit")  # type: ignore[attr-defined]
    return list(jax.jit(body)(*invals))


def _closure_inline(eqn: Any, invals: list[Any], subs: dict) -> list[Any]:
    return list(_body(subs[_compat.CALL_JAXPR[eqn.primitive], 0])(*invals))


#: Closure conversion through the public API, by primitive (used only when a rewritten body has
#: constants from an outer trace; otherwise the equation is re-bound with its new body).
CLOSURE: dict[Any, Callable[[Any, list[Any], dict], list[Any]]] = {
    p: rule for p, rule in (
        (_compat.P["scan"], _closure_scan), (_compat.P["while"], _closure_while),
        (_compat.P["cond"], _closure_cond), (_compat.P["remat"], _closure_remat),
        (_compat.P["jit"], _closure_jit), (_compat.P["closed_call"], _closure_inline),
    ) if p is not None}


# ------------------------------------------------------------------------------------------------
# Prepared weights and SR-STE in parameter space, once per weight per step


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sr_ste_tap(lams: tuple[float, ...], read: tuple[jax.Array, ...], drops: tuple[jax.Array, ...]) -> tuple:
    return read


def _sr_ste_tap_fwd(lams: tuple[float, ...], read: tuple, drops: tuple):
    return read, (read, drops)  # the parameters themselves and the masks the forward pass computed


def _sr_ste_tap_bwd(lams: tuple[float, ...], res: tuple, g: tuple):
    read, drops = res
    return tuple(gi + (lam * apply_mask(w, d)).astype(gi.dtype)
                 for lam, w, d, gi in zip(lams, read, drops, g)), None


_sr_ste_tap.defvjp(_sr_ste_tap_fwd, _sr_ste_tap_bwd)


def _hoistable(jaxpr: Any, path: tuple[Any, ...]) -> bool:
    """Whether the matmul at ``path`` sits only inside sub-jaxprs that :data:`CLOSURE` can close
    over top-level values (so its prepared weight can be computed once, at the top level)."""
    jaxpr = _compat.open_jaxpr(jaxpr)[0]
    for n in range(0, len(path) - 1, 3):
        eqn = jaxpr.eqns[path[n]]
        if eqn.primitive not in CLOSURE:
            return False
        sub = dict(((k, j), v) for k, j, v in subjaxprs(eqn.params))[path[n + 1], path[n + 2]]
        jaxpr = _compat.open_jaxpr(sub)[0]
    return True


class _Prep:
    """The static plan of a trace's prepared weights and parameter-space SR-STE."""

    def __init__(self, traced: Traced, shapes: Sequence[tuple[int, ...]]):
        decisions = [d for d in traced.decisions if d.plan is not None]
        uses = sparse_uses(decisions, shapes)[0]
        by_index = {u.decision.index: u for u in uses}
        # hoisted: a weight that is a view of the parameters and the same array in every iteration
        # of the loops around it (mapped == 0), inside sub-jaxprs that CLOSURE converts
        self.hoisted = []
        for d in decisions:
            view = (d.site.lhs, d.site.rhs)[d.weight_side].view
            if isinstance(view, View) and view.mapped == 0 and _hoistable(traced.jaxpr, d.site.path):
                self.hoisted.append((d.site.path, view, weight_spec(d.plan), by_index.get(d.index)))
        self.sr_uses = [u for u in uses if u.decision.sr_ste == "parameter"]
        lams: dict[int, float] = {}
        for u in self.sr_uses:
            for leaf in u.view.leaves:
                lams[leaf] = max(lams.get(leaf, 0.0), sr_ste_coefficient(u.decision, traced.config))
        self.lams = {k: v for k, v in lams.items() if v > 0}
        self.shapes = list(shapes)

    def __call__(self, params: list[Any]) -> tuple[list[Any], dict[tuple, tuple[jax.Array, jax.Array, Any]]]:
        """(the parameters, SR-STE attached; the prepared weight of every hoisted matmul by path).

        Each forward mask is computed once: the masks of the uses that SR-STE reads (on the
        parameters as given) are reused by the hoisted weights that share them."""
        masks: dict[Any, jax.Array] = {}

        def mask(use: Use) -> jax.Array:
            key = (view_key(use.view), use.decision.plan.k_axis, use.decision.plan.o_axis,
                   use.decision.plan.grad_input == "transposable")
            if key not in masks:
                masks[key] = use_mask(use, params)
            return masks[key]

        if self.lams:
            read = sorted(self.lams)
            combined = leaf_masks(self.sr_uses, [mask(u) if u.view.leaves & set(read) else None
                                                 for u in self.sr_uses], read, self.shapes)
            read = [leaf for leaf in read if leaf in combined]
            # SR-STE decays the entries that every sparse product drops, among those it reaches
            drops = tuple(jnp.logical_not(hi) if reached.all() else jnp.logical_and(jnp.asarray(reached),
                                                                                   jnp.logical_not(hi))
                          for _, hi, reached in (combined[leaf] for leaf in read))
            tapped = _sr_ste_tap(tuple(self.lams[leaf] for leaf in read), tuple(params[leaf] for leaf in read),
                                 drops)
            params = list(params)
            for leaf, value in zip(read, tapped):
                params[leaf] = value
        shared: dict[Any, tuple[jax.Array, jax.Array, Any]] = {}
        prepared = {}
        for path, view, spec, use in self.hoisted:
            key = (view_key(view), spec)
            if key not in shared:
                given = mask(use) if use is not None and use.decision.sr_ste == "parameter" else None
                shared[key] = prepare(replay(view, params), spec, given)
            prepared[path] = shared[key]
        return params, prepared


# ------------------------------------------------------------------------------------------------
# Rewrite and cache


class _Entry:
    """One cached signature: its trace and decisions, and per ``fst_key`` aval (``None`` when no
    matmul draws from it) the rewritten jaxpr and its jitted form."""

    def __init__(self, traced: Traced, cacheable: bool):
        self.traced = traced
        self.cacheable = cacheable
        self.keyed = keyed(traced)
        self._rewrites: dict[Any, tuple[Any, Any]] = {}

    def rewrite(self, key_spec: Any) -> tuple[Any, Any]:
        """(rewritten closed jaxpr, its ``jax.jit`` or None) for an ``fst_key`` of ``key_spec``."""
        hit = self._rewrites.get(key_spec)
        if hit is None:
            rewritten = _rewrite(self.traced, key_spec)
            # nothing rewritten: evaluated as traced (bit-identical to calling fn), else one jit
            jit = self.cacheable and rewritten is not self.traced.jaxpr
            hit = (rewritten, jax.jit(_compat.jaxpr_fun(rewritten)) if jit else None)
            if self.cacheable:
                self._rewrites[key_spec] = hit
        return hit


def keyed(traced: Traced) -> bool:
    """Whether a trace has a matmul that draws from ``fst_key`` (a rotating pattern or ``"mvue"``)."""
    return any(d.plan is not None and d.plan.keyed for d in traced.decisions)


def _rewrite(traced: Traced, key_aval: Any = None) -> Any:
    """The rewritten closed jaxpr of a trace (the original one when nothing is sparse).

    With keyed matmuls (rotating patterns, ``"mvue"``), the jaxpr takes one more input, ``fst_key``
    (of ``key_aval``). Each such matmul's layer key is ``fold_in(fst_key, decision.index)``, with
    the iteration of every scan around it folded in (outermost first); it draws its pattern index
    or mvue seed with ``randint(layer key, len(patterns) or MVUE_SEEDS)``. Outside scans that is
    ``draw_pattern(fst_key, decision.index, n)``.
    """
    plans = {d.site.path: d.plan for d in traced.decisions if d.plan is not None}
    if not plans:
        return traced.jaxpr
    below = frozenset(p[:n] for p in plans for n in range(1, len(p)))
    jaxpr, consts = _compat.open_jaxpr(traced.jaxpr)
    in_avals = [v.aval for v in jaxpr.invars]
    where = [i for i, p in enumerate(traced.is_param) if p]  # flat position of each parameter leaf
    prep = _Prep(traced, [tuple(in_avals[i].shape) for i in where])
    draws = [(d.site.path, d.index) for d in traced.decisions if d.plan is not None and d.plan.keyed]

    def flat_fn(*leaves: Any) -> list[Any]:
        leaves = list(leaves)
        choices = {}
        if draws:
            key = leaves.pop()
            key = _as_key(key)
            choices = {path: jax.random.fold_in(key, index) for path, index in draws}
        params, prepared = prep([leaves[i] for i in where])
        for i, value in zip(where, params):
            leaves[i] = value
        outer = {path: (choices.get(path), prepared.get(path)) for path in choices.keys() | prepared.keys()}
        return _interpret(jaxpr, consts, leaves, plans, below, (), outer)

    return jax.make_jaxpr(flat_fn)(*in_avals, *([key_aval] if draws else []))


def _check_fst_key(fst_key: Any, traced: Traced, fn_name: str) -> Any:
    """``fst_key`` as an array, or a clear error when it is missing or not a key or step."""
    layers = [d.index for d in traced.decisions if d.plan is not None and d.plan.keyed]
    if fst_key is None:
        plans = [d.plan for d in traced.decisions if d.plan is not None and d.plan.keyed]
        why = ([f"a rotating pattern (FSTConfig.pattern={traced.config.pattern!r})"] if any(p.rotating for p in plans)
               else []) + (["grad_weight='mvue'"] if any(p.grad_weight == "mvue" for p in plans) else [])
        raise TypeError(
            f"{fn_name}: {' and '.join(why)}, in the config or a rule's override (matmuls {layers}), draws "
            f"each layer's grad-weight token pattern or sample per step from the keyword argument `fst_key`, and "
            f"this call passed none. Pass a step counter or a PRNG key, e.g. "
            f"`jax.grad(loss)(params, batch, fst_key=step)` inside your jitted train step (a traced step: one "
            f"compile serves every step), or `fst_key=jax.random.fold_in(key, step)`; or use a fixed pattern "
            f"(FSTConfig(pattern='checkerboard'), 'even' or 'odd') and grad_weight='fixed_mask', which need no "
            f"key.")
    if isinstance(fst_key, (bool, float, str)):
        raise TypeError(f"{fn_name}: fst_key must be a PRNG key (jax.random.key(...) or a raw uint32[2] key) or an "
                        f"integer step counter, got {type(fst_key).__name__} ({fst_key!r:.60})")
    if not isinstance(fst_key, (jax.Array, _compat.Tracer)):
        fst_key = jnp.asarray(fst_key)
    try:
        jax.eval_shape(_as_key, fst_key)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{fn_name}: fst_key: " + str(e).replace("draw_pattern: ", "")) from None
    return fst_key


_FORWARD_MODE_ERROR = (
    "fst_jax.sparsify does not support forward-mode autodiff (jax.jvp, jax.jacfwd, jax.hessian, and "
    "evaluating the linear function of jax.linearize) of a function with a sparse matmul: each "
    "rewritten matmul is a jax.custom_vjp, which defines only a reverse-mode derivative. Use jax.grad / "
    "jax.vjp / jax.jacrev, or call the function without fst_jax.sparsify (or with every matmul dense) "
    "for forward-mode derivatives."
)


def sparsify(fn: Callable, config: FSTConfig | None = None, *, params_argnums: int | Sequence[int] = 0,
             static_argnums: int | Sequence[int] = (), static_argnames: str | Sequence[str] = ()) -> Callable:
    """Rewrites every weight matmul of ``fn`` into the FST 2:4 ``custom_vjp``.

    ``fn`` is traced to a jaxpr; each ``dot_general`` (or convolution) with one operand that
    depends only on the parameters (``params_argnums``) and one that depends on the other arguments
    is replaced by a ``jax.custom_vjp`` computing the forward, grad-input and grad-weight products
    of the FST recipe (``config``); a matmul left dense in all three products is left as it is.
    Everything else is re-bound as it is. Sub-jaxprs (``jit``, ``scan``, ``while``, ``cond``,
    ``remat``, ``shard_map``) are rewritten in place; user ``custom_vjp`` / ``custom_jvp`` regions
    and ``pallas_call`` kernels are left alone (and reported).

    The rewritten jaxpr is cached per signature (tree structure, shapes, dtypes, static values,
    and JAX's trace context such as the x64 flag), keeping the :data:`CACHE_SIZE` most recent.
    Each call runs that jaxpr through one cached ``jax.jit`` (inlined under an outer ``jit``), so a
    second eager call with the same shapes compiles nothing, eager ``jax.grad`` included.

    Arguments are passed as to ``jax.jit``-ed functions: arrays and Python ``int``/``float`` are
    traced (an eager step counter does not retrace), Python ``bool``, ``str`` and other non-array
    values are static automatically (hashable; they key the cache), ``static_argnums`` /
    ``static_argnames`` make whole arguments static. Non-array outputs (e.g. a string in the
    auxiliary output of ``jax.value_and_grad(..., has_aux=True)``) are returned as traced.

    **Rotating patterns** (``FSTConfig(pattern="rotating")`` or a tuple of pattern names): the
    sparsified function takes one more keyword argument, ``fst_key``: a PRNG key
    (``jax.random.key(...)`` or a raw ``uint32[2]`` key) or an integer step counter, traced (one
    compiled step serves every step; only its shape and dtype key the cache). It is not passed to
    ``fn``. Each rotating matmul draws its grad-weight token pattern from it once per call,
    ``draw_pattern(fst_key, matmul index, len(set))``: the same key gives the same gradient, and
    layers draw independently (inside a ``lax.scan`` each iteration folds its index into the
    layer's key, so a scanned stack of layers draws per layer too). Without ``fst_key`` a rotating config raises a ``TypeError``
    naming it; a fixed pattern accepts and ignores it (so a training loop can always pass it), as
    do :func:`report`, :func:`forward_masks` and :func:`pruned_params`. The name ``fst_key`` is
    therefore reserved: ``fn`` cannot take a keyword argument of that name.

    Args:
      fn: the function, typically a loss ``loss(params, batch)``; pytrees in and out.
      config: an :class:`FSTConfig`; ``None`` means ``FSTConfig()``, the paper's recipe.
      params_argnums: the positional argument(s) holding the parameters (the weights).
      static_argnums: positional arguments that are static (hashable values).
      static_argnames: keyword arguments that are static.

    Returns:
      A function with ``fn`` 's signature.

    Raises:
      ValueError: ``params_argnums`` out of range for a call.
      TypeError: a parameter leaf is not an array; a traced argument is used in Python control flow
        (the message names it); forward-mode autodiff through a sparse matmul.

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

      With the authors' rotating patterns, pass the step (or a key) as ``fst_key``:

      >>> loss_rot = fst_jax.sparsify(loss, fst_jax.FSTConfig(pattern="rotating"))
      >>> step_grad = jax.jit(lambda p, x, step: jax.grad(loss_rot)(p, x, fst_key=step))
      >>> g0 = step_grad(params, x, jnp.int32(0))  # compiles once for every step
      >>> bool(jnp.array_equal(g0["w2"], step_grad(params, x, jnp.int32(0))["w2"]))
      True
      >>> try:
      ...     loss_rot(params, x)
      ... except TypeError as e:
      ...     print(str(e)[:54])
      loss: a rotating pattern (FSTConfig.pattern='rotating'
    """
    config, sig = check_call(fn, config, params_argnums, static_argnums, static_argnames)
    cache: collections.OrderedDict[Any, _Entry] = collections.OrderedDict()

    def entry_for(split: Any) -> _Entry:
        key = cache_key(split)
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
            return hit
        traced = trace(fn, sig, config, split)
        consts = _compat.open_jaxpr(traced.jaxpr)[1]
        cacheable = not any(isinstance(c, _compat.Tracer) for c in consts)
        entry = _Entry(traced, cacheable)
        if cacheable:
            cache[key] = entry
            while len(cache) > CACHE_SIZE:
                cache.popitem(last=False)
        return entry

    @functools.wraps(fn)
    def sparsified(*args: Any, **kwargs: Any) -> Any:
        fst_key = kwargs.pop(FST_KEY, None)
        split = sig.split(args, kwargs)
        entry = entry_for(split)
        leaves = list(split.leaves)
        key_spec = None
        if entry.keyed:
            fst_key = _check_fst_key(fst_key, entry.traced, sig.fn_name)
            key_spec = jax.typeof(fst_key)
            leaves.append(fst_key)
        rewritten, jitted = entry.rewrite(key_spec)
        try:
            outs = jitted(*leaves) if jitted is not None else _compat.eval_closed(rewritten, *leaves)
        except TypeError as e:
            if "forward-mode" in str(e) or "jvp" in str(e) and "custom_vjp" in str(e):
                raise TypeError(_FORWARD_MODE_ERROR) from e
            raise
        return unflatten_outputs(entry.traced, outs)

    sparsified._fst_cache = cache  # for tests: the cached signatures  # type: ignore[attr-defined]
    return sparsified
