"""Forward 2:4 masks in parameter space: :func:`forward_masks`, :func:`prune_params`.

FST prunes the weight operand of each sparse forward product with ``mask_2to4`` along its
contracting axis, computed on the operand *as the matmul sees it* (after casts, transposes,
reshapes, slices, and per layer of a scan). :func:`forward_masks` walks the traced function
(the same trace and the same decisions as :func:`fst_jax.sparsify`), follows each parameter leaf
through those structural ops to the matmuls, computes the masks there with the functions the FST
forward uses (so they are bit-identical), and maps them back to the leaf by pushing an index array
through the same ops. :func:`prune_params` applies them: a plain dense forward with the pruned
parameters then computes what the FST forward computes.

Example:
  >>> import jax, jax.numpy as jnp, numpy as np, fst_jax
  >>> def f(params, x):
  ...     for w in params:
  ...         x = jnp.tanh(x @ w)
  ...     return x
  >>> rng = np.random.default_rng(0)
  >>> params = [jnp.asarray(rng.normal(size=(8, 8)), jnp.float32) for _ in range(3)]
  >>> x = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
  >>> masks = fst_jax.forward_masks(f)(params, x)
  >>> [None if m is None else m.shape for m in masks.tree]  # first and last layers stay dense
  [None, (8, 8), None]
  >>> bool(jnp.array_equal(f(fst_jax.prune_params(params, masks), x), fst_jax.sparsify(f)(params, x)))
  True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fst_jax import _compat
from fst_jax._config import FSTConfig
from fst_jax._dot import GemmPlan, _forward_weight
from fst_jax._transform import Decision, _Signature, _subjaxprs, _trace

#: Ops that move or cast a weight's entries without combining them. ``convert_element_type``
#: changes values but not positions; ``dynamic_slice`` counts only with constant indices.
_STRUCTURAL = frozenset({"convert_element_type", "transpose", "reshape", "squeeze", "expand_dims",
                         "broadcast_in_dim", "slice", "dynamic_slice", "copy", "copy_p", "rev"})
_CASTS = frozenset({"convert_element_type"})
#: Higher-order primitives whose body sees its operands unchanged (one input per operand).
_TRANSPARENT = frozenset({"jit", "pjit", "closed_call", "core_call", "checkpoint", "remat2"})
#: A step of a view: "this axis 0 is a scan's xs, sliced per iteration" (the rest runs per slice).
_SCAN = "scan"


@dataclasses.dataclass(frozen=True)
class _View:
    """A value that is parameter leaf ``leaf`` after the structural ``steps`` (eqns or _SCAN)."""

    leaf: int
    steps: tuple[Any, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Broken:
    """A value computed from parameter ``leaves`` through a non-structural op (``why``)."""

    leaves: frozenset[int]
    why: str


def _leaves(state: Any) -> frozenset[int]:
    if isinstance(state, _View):
        return frozenset({state.leaf})
    return state.leaves if isinstance(state, _Broken) else frozenset()


def _first_why(states: Sequence[Any]) -> str:
    return next(s.why for s in states if isinstance(s, _Broken))


@dataclasses.dataclass
class _Use:
    steps: tuple[Any, ...]
    plan: GemmPlan
    row: int  # index of the decision (the row of fst_jax.report)


class _Walker:
    """Follows parameter leaves through a jaxpr; collects the sparse forward uses of each."""

    def __init__(self, decisions: Sequence[Decision]):
        self.rows = {d.site.path: (i, d) for i, d in enumerate(decisions)}
        self.uses: dict[int, list[_Use]] = {}
        self.bad: dict[int, str] = {}  # leaf -> why it cannot be exported
        self.other: dict[int, str] = {}  # leaf -> first use outside the sparse forward products
        self.seen: set[tuple[Any, ...]] = set()

    def _other_use(self, states: Sequence[Any], what: str, record: bool) -> None:
        for s in states:
            if record and isinstance(s, _View):
                self.other.setdefault(s.leaf, what)

    def _break(self, states: Sequence[Any], what: str, record: bool) -> Any:
        """The state of a value computed from ``states`` by a non-structural op ``what``."""
        self._other_use(states, what, record)
        leaves = frozenset().union(*map(_leaves, states))
        if not leaves:
            return None
        fresh = any(isinstance(s, _View) for s in states)  # a weight itself goes through ``what``
        return _Broken(leaves, what if fresh else _first_why(states))

    def walk(self, jaxpr: Any, states: Sequence[Any], prefix: tuple[Any, ...], record: bool) -> list[Any]:
        env: dict[Any, Any] = dict(zip(jaxpr.invars, states))

        def read(v: Any) -> Any:
            return None if isinstance(v, _compat.Literal) else env.get(v)

        for i, eqn in enumerate(jaxpr.eqns):
            path = prefix + (i,)
            ins = [read(v) for v in eqn.invars]
            name = eqn.primitive.name
            if path in self.rows:
                outs = [self._site(path, ins, record)]
            elif name in _STRUCTURAL and ins[0] is not None and not any(ins[1:]):
                outs = [self._structural(eqn, ins[0], record)]
            elif _subjaxprs(eqn.params):
                outs = self._higher(eqn, ins, path, record)
            else:
                outs = [self._break(ins, name, record)] * len(eqn.outvars)
            env.update(zip(eqn.outvars, outs))
        return [read(v) for v in jaxpr.outvars]

    def _structural(self, eqn: Any, state: Any, record: bool) -> Any:
        if isinstance(state, _Broken):
            return state
        if not all(isinstance(v, _compat.Literal) for v in eqn.invars[1:]):
            return self._break([state], f"{eqn.primitive.name} with computed indices", record)
        return _View(state.leaf, state.steps + (eqn,))

    def _site(self, path: tuple[Any, ...], ins: list[Any], record: bool) -> Any:
        row, d = self.rows[path]
        if record:
            self.seen.add(path)
        sparse = d.plan is not None and d.plan.forward and d.weight_side is not None
        if not sparse:
            what = f"matmul #{row} ({d.forward})" if d.weight_side is not None else f"matmul #{row}"
            return self._break(ins[:2], what, record)
        w = ins[d.weight_side]
        if record and isinstance(w, _View):
            self.uses.setdefault(w.leaf, []).append(_Use(w.steps, d.plan, row))
        elif record and isinstance(w, _Broken):
            for leaf in w.leaves:
                self.bad.setdefault(leaf, f"reaches sparse matmul #{row} through {w.why}")
        return self._break(ins[:2], f"matmul #{row}", False)

    def _higher(self, eqn: Any, ins: list[Any], path: tuple[Any, ...], record: bool) -> list[Any]:
        name = eqn.primitive.name
        subs = _subjaxprs(eqn.params)

        def sub_walk(key: str, j: int, sub: Any, states: Sequence[Any], rec: bool = record) -> list[Any]:
            return self.walk(_compat.open_jaxpr(sub)[0], states, path + (key, j), rec)

        if name == "scan":
            return self._scan(eqn, ins, lambda states, rec: sub_walk("jaxpr", 0, eqn.params["jaxpr"], states, rec),
                              record)
        if name in _TRANSPARENT and len(subs) == 1:
            key, j, sub = subs[0]
            inner = _compat.open_jaxpr(sub)[0]
            if len(inner.invars) == len(ins) and len(inner.outvars) == len(eqn.outvars):
                return sub_walk(key, j, sub, ins)
        # Anything else is opaque: its operands count as used, and a sparse matmul inside
        # sees them through the primitive.
        out = self._break(ins, name, record)
        for key, j, sub in subs:
            n = len(_compat.open_jaxpr(sub)[0].invars)
            inner = [self._break([s], f"the {name} it sits in", False) for s in ins] if n == len(ins) \
                else [out] * n
            sub_walk(key, j, sub, inner)
        return [out] * len(eqn.outvars)

    def _scan(self, eqn: Any, ins: list[Any], body: Callable[[list[Any], bool], list[Any]],
              record: bool) -> list[Any]:
        nc, ncarry = _compat.scan_counts(eqn.params)
        consts, carry, xs = ins[:nc], ins[nc:nc + ncarry], ins[nc + ncarry:]
        sliced = [_View(s.leaf, s.steps + (_SCAN,)) if isinstance(s, _View) else s for s in xs]
        carry = [self._break([c], "a scan carry", record) for c in carry]
        while True:  # loop-carried states: join the body's carry outputs until stable
            outs = body(consts + carry + sliced, False)[:ncarry]
            new = [self._break([c, o], "a scan carry", False) for c, o in zip(carry, outs)]
            if new == carry:
                break
            carry = new
        outs = body(consts + carry + sliced, record)
        ys = [self._break([y], "a scan output", record) for y in outs[ncarry:]]
        return carry + ys


def _apply(steps: Sequence[Any], x: jax.Array, last: Callable[[jax.Array], jax.Array], index: bool) -> jax.Array:
    """``last(steps(x))``, vmapped over the scan axes; ``index``: skip casts (x is an index array)."""
    for n, step in enumerate(steps):
        if step is _SCAN:
            return jax.vmap(lambda xi, rest=steps[n + 1:]: _apply(rest, xi, last, index))(x)
        if not (index and step.primitive.name in _CASTS):
            literals = [v.val for v in step.invars[1:]]
            (x,) = _compat.bind_eqn(step, [x, *literals])
    return last(x)


def _leaf_mask(leaf: jax.Array, uses: Sequence[_Use]) -> tuple[jax.Array, jax.Array]:
    """(mask, number of entries whose masks disagree) of one parameter leaf."""
    size = leaf.size
    if size >= 2**31:
        raise ValueError(f"forward_masks: a parameter of shape {leaf.shape} has more than 2**31 entries")
    iota = jnp.arange(size, dtype=jnp.int32).reshape(leaf.shape)
    lo = jnp.ones(size, jnp.uint8)  # AND of the masks over every position an entry reaches
    hi = jnp.zeros(size, jnp.uint8)  # OR of them
    reached = jnp.zeros(size, bool)
    for u in uses:
        m = _apply(u.steps, leaf, lambda w, plan=u.plan: _forward_weight(plan, w)[1], index=False)
        idx = _apply(u.steps, iota, lambda i: i, index=True).reshape(-1)
        m = m.reshape(-1).astype(jnp.uint8)
        lo, hi = lo.at[idx].min(m), hi.at[idx].max(m)
        reached = reached.at[idx].set(True)
    return lo.astype(bool).reshape(leaf.shape), jnp.sum(reached & (lo != hi))


@dataclasses.dataclass(frozen=True)
class Masks:
    """The forward 2:4 masks of :func:`forward_masks`, in parameter space.

    Attributes:
      tree: a pytree with the structure of the parameters (as ``jax.grad`` returns for
        ``params_argnums``): a bool array of the leaf's shape (``True`` = kept) for every leaf
        pruned by a sparse forward product, ``None`` for every other leaf (kept whole).
      paths: every parameter leaf's path (``jax.tree_util.keystr``), in ``tree`` order.
      shapes: every parameter leaf's shape, in the same order.
      not_exportable: path -> why, for leaves that a sparse forward product prunes but that no
        single parameter mask reproduces (their ``tree`` entry is ``None``).
      unmasked: path -> why, for the leaves that no sparse forward product uses.
      used_by: path -> the sparse matmuls (row numbers of :func:`fst_jax.report`) whose masks a
        masked leaf combines.

    Example:
      >>> import jax.numpy as jnp, fst_jax
      >>> cfg = fst_jax.FSTConfig(skip_first=False, skip_last=False)
      >>> params = {"b": jnp.ones(2), "w": jnp.ones((8, 2))}
      >>> masks = fst_jax.forward_masks(lambda p, x: x @ p["w"] + p["b"], cfg)(params, jnp.ones(8))
      >>> masks.sparsity()
      {"['w']": (8, 16)}
      >>> print(masks)
      parameter  shape  forward mask                      kept/total
      ---------  -----  --------------------------------  ----------
      ['b']      (2)    none: not a weight of any matmul  -
      ['w']      (8,2)  2:4 from matmul #0                8/16 (0.5)
      1 of 2 parameters masked, 0 not exportable; 8 of 16 entries kept (0.5)
    """

    tree: Any
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    not_exportable: Mapping[str, str]
    unmasked: Mapping[str, str]
    used_by: Mapping[str, tuple[int, ...]]

    def _flat(self) -> list[Any]:
        return jax.tree_util.tree_leaves(self.tree, is_leaf=lambda x: x is None)

    def sparsity(self) -> dict[str, tuple[int, int]]:
        """path -> (kept entries, all entries) of every masked leaf; exactly half for a 2:4 mask."""
        return {p: (int(np.sum(np.asarray(m))), int(m.size))
                for p, m in zip(self.paths, self._flat()) if m is not None}

    def __str__(self) -> str:
        counts = self.sparsity()
        head = ("parameter", "shape", "forward mask", "kept/total")
        body = []
        for p, shape, m in zip(self.paths, self.shapes, self._flat()):
            shape_str = f"({','.join(map(str, shape))})"
            if m is not None:
                kept, total = counts[p]
                where = ", ".join(f"#{r}" for r in self.used_by[p])
                body.append((p, shape_str, f"2:4 from matmul {where}", f"{kept}/{total} ({kept / total:.3g})"))
            elif p in self.not_exportable:
                body.append((p, shape_str, f"not exportable: {self.not_exportable[p]}", "-"))
            else:
                body.append((p, shape_str, f"none: {self.unmasked[p]}", "-"))
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*b).rstrip() for b in body]
        kept, total = sum(k for k, _ in counts.values()), sum(t for _, t in counts.values())
        frac = f" ({kept / total:.3g})" if total else ""
        lines.append(f"{len(counts)} of {len(self.paths)} parameters masked, {len(self.not_exportable)} "
                     f"not exportable; {kept} of {total} entries kept{frac}")
        return "\n".join(lines)


def forward_masks(fn: Callable, config: FSTConfig | None = None, *, params_argnums: int | Sequence[int] = 0,
                  static_argnums: int | Sequence[int] = (), static_argnames: str | Sequence[str] = ()
                  ) -> Callable[..., Masks]:
    """The forward 2:4 mask of every parameter leaf, as :func:`fst_jax.sparsify` computes it.

    ``fn`` is traced and decided exactly as by ``sparsify`` (and :func:`fst_jax.report`). For each
    matmul (``dot_general`` or convolution) whose forward product is 2:4-sparse, the weight operand
    is followed back to a parameter leaf through casts, transposes, reshapes, squeezes,
    ``broadcast_in_dim``, slices (``dynamic_slice`` with constant indices), ``rev``, ``jit`` /
    ``remat`` bodies, and the per-layer slices of a ``scan`` over stacked layers (Flax ``nn.scan``).
    The mask is computed on the operand as the matmul sees it (e.g. after a bf16 cast, ties decided
    as in :func:`fst_jax.mask_2to4`) and carried back to the leaf; entries that the matmul does not
    read stay kept.

    A leaf is **not exportable** (its entry is ``None`` and ``Masks.not_exportable`` says why) when
    no single pruned parameter would give every product the operand FST gives it:

    * it reaches a sparse product through any other op (``mul``, ``add``, a gather, a loop carry,
      a ``while_loop`` / ``cond`` / ``shard_map`` or a user ``custom_vjp`` / ``custom_jvp``);
    * it is also used outside the sparse forward products (another op, or a dense matmul), which
      the pruning would change;
    * it feeds several sparse products (or one product at repeated positions, by broadcasting)
      whose masks disagree on an entry. When they agree, the mask is their AND (e.g. disjoint
      slices of a fused weight, or one weight shared by several sparse matmuls with equal masks).

    Args:
      fn: the function, as for ``sparsify``.
      config: an :class:`FSTConfig`; ``None`` means ``FSTConfig()``.
      params_argnums: the positional argument(s) holding the parameters.
      static_argnums: positional arguments that are not arrays.
      static_argnames: keyword arguments that are not arrays.

    Returns:
      A function taking ``fn`` 's arguments and returning a :class:`Masks`. The parameters must be
      concrete arrays (call it outside ``jit``); the other arguments may be
      ``jax.ShapeDtypeStruct`` s, since only their shapes matter.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, fst_jax
      >>> cfg = fst_jax.FSTConfig(skip_first=False, skip_last=False)
      >>> w = jnp.asarray(np.arange(16.0).reshape(4, 4) % 5)
      >>> masks = fst_jax.forward_masks(lambda w, x: x @ w.T, cfg)(w, jax.ShapeDtypeStruct((2, 4), jnp.float32))
      >>> print(masks.tree.astype(int))  # x @ w.T contracts w's axis 1: 2:4 along rows
      [[0 0 1 1]
       [1 0 0 1]
       [1 1 0 0]
       [0 1 1 0]]
      >>> masks = fst_jax.forward_masks(lambda w, x: x @ (2 * w), cfg)(w, jnp.ones((2, 4)))
      >>> masks.not_exportable
      {'': 'reaches sparse matmul #0 through mul'}
    """
    config = FSTConfig() if config is None else config
    if not isinstance(config, FSTConfig):
        raise TypeError(f"config must be an fst_jax.FSTConfig or None, got {type(config).__name__}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    sig = _Signature(getattr(fn, "__name__", "fn"), params_argnums, static_argnums, static_argnames)

    def run(*args: Any, **kwargs: Any) -> Masks:
        traced, leaves = _trace(fn, sig, config, args, kwargs, cache=None)
        _, _, _, _, is_param = sig.split(args, kwargs)
        params = [x for x, p in zip(leaves, is_param) if p]
        paths = traced.param_paths
        for x, p in zip(params, paths):
            if isinstance(x, (jax.ShapeDtypeStruct, _compat.Tracer)):
                raise TypeError(f"forward_masks needs the parameters' values, but the parameter {p or '<root>'} "
                                f"is a {type(x).__name__}; pass concrete arrays and call it outside jit")
        walker = _Walker(traced.decisions)
        jaxpr, _ = _compat.open_jaxpr(traced.jaxpr)
        in_states = []
        ids = iter(range(len(params)))
        for p in is_param:
            in_states.append(_View(next(ids)) if p else None)
        walker.walk(jaxpr, in_states, (), record=True)
        for i, d in enumerate(traced.decisions):  # a safety net: every sparse product was reached
            if d.plan is not None and d.plan.forward and d.site.path not in walker.seen:
                for leaf in d.site.lhs if d.weight_side == 0 else d.site.rhs:
                    walker.bad.setdefault(leaf, f"sparse matmul #{i} was not reached by the export walk")

        masks: list[Any] = [None] * len(params)
        not_exportable, unmasked, used_by = {}, {}, {}
        todo = {}
        for leaf, uses in walker.uses.items():
            if leaf in walker.bad:
                not_exportable[paths[leaf]] = walker.bad[leaf]
            elif leaf in walker.other:
                not_exportable[paths[leaf]] = (f"also used by {walker.other[leaf]}, outside the sparse "
                                               "forward products; pruning it would change that use")
            else:
                todo[leaf] = uses
        for leaf, why in walker.bad.items():
            not_exportable.setdefault(paths[leaf], why)
        computed = jax.jit(lambda ps: {k: _leaf_mask(ps[k], u) for k, u in todo.items()})(
            {k: jnp.asarray(params[k]) for k in todo})
        for leaf, (mask, conflicts) in computed.items():
            rows = tuple(sorted({u.row for u in todo[leaf]}))
            if int(conflicts):
                not_exportable[paths[leaf]] = (
                    f"{int(conflicts)} of its entries get different forward masks at different places of "
                    f"matmul(s) {', '.join(f'#{r}' for r in rows)} (a shared or broadcast weight)")
            else:
                masks[leaf], used_by[paths[leaf]] = mask, rows
        for leaf, p in enumerate(paths):
            if masks[leaf] is None and p not in not_exportable:
                unmasked[p] = _why_unmasked(traced.decisions, leaf)
        return Masks(_param_tree(sig, args, kwargs, masks), paths, tuple(np.shape(x) for x in params),
                     not_exportable, unmasked, used_by)

    return run


def _why_unmasked(decisions: Sequence[Decision], leaf: int) -> str:
    for i, d in enumerate(decisions):
        if d.weight_side is not None and leaf in (d.site.lhs if d.weight_side == 0 else d.site.rhs):
            return f"matmul #{i} forward is {d.forward}"
    return "not a weight of any matmul"


def _param_tree(sig: _Signature, args: tuple, kwargs: dict, flat: list[Any]) -> Any:
    """``flat`` (one entry per parameter leaf) in the structure ``jax.grad(argnums=...)`` returns."""
    n = len(args)
    sorted_pos = sorted({i % n for i in sig.params_argnums})
    per_arg, start = {}, 0
    for pos in sorted_pos:
        tree = jax.tree_util.tree_structure(args[pos])
        per_arg[pos] = jax.tree_util.tree_unflatten(tree, flat[start:start + tree.num_leaves])
        start += tree.num_leaves
    if len(sig.params_argnums) == 1:
        return per_arg[sig.params_argnums[0] % n]
    return tuple(per_arg[i % n] for i in sig.params_argnums)


def prune_params(params: Any, masks: Masks | Any) -> Any:
    """``params`` with every masked leaf pruned: ``where(mask, p, 0)``; ``None`` masks keep a leaf.

    Args:
      params: the parameter pytree (the one given to :func:`forward_masks`).
      masks: a :class:`Masks`, or its ``tree``: the structure of ``params`` with a bool array of
        the leaf's shape or ``None`` at each leaf.

    Returns:
      A pytree like ``params``.

    Raises:
      ValueError: the structures differ, or a mask's shape is not its leaf's.
      TypeError: a mask is not a bool array.

    Example:
      >>> import jax.numpy as jnp, fst_jax
      >>> params = {"b": jnp.ones(2), "w": jnp.array([[1.0, -4.0, 3.0, 2.0]])}
      >>> masks = {"b": None, "w": jnp.array([[False, True, True, False]])}
      >>> fst_jax.prune_params(params, masks)["w"]
      Array([[ 0., -4.,  3.,  0.]], dtype=float32)
    """
    tree = masks.tree if isinstance(masks, Masks) else masks
    p_flat, p_def = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)
    m_flat, m_def = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is None)
    if p_def != m_def:
        raise ValueError(f"prune_params: masks must have the structure of params (a bool array or None per "
                         f"leaf), but params is {p_def} and masks is {m_def}; pass the Masks that "
                         "forward_masks returned for these parameters")
    out = []
    for (kp, p), m in zip(p_flat, m_flat):
        if m is None:
            out.append(p)
            continue
        where = jax.tree_util.keystr(kp) or "<root>"
        if getattr(m, "dtype", None) != np.dtype(bool):
            raise TypeError(f"prune_params: the mask at {where} must be a bool array, got "
                            f"{getattr(m, 'dtype', type(m).__name__)}")
        if np.shape(p) != m.shape:
            raise ValueError(f"prune_params: the mask at {where} has shape {m.shape} but the parameter has "
                             f"shape {np.shape(p)}; the masks belong to differently shaped parameters")
        p = jnp.asarray(p)
        out.append(jnp.where(m, p, jnp.zeros_like(p)))
    return jax.tree_util.tree_unflatten(p_def, out)
