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

from fst_jax import _compat, _masks
from fst_jax._analysis import VALUE_OPS, Broken, View
from fst_jax._config import FSTConfig
from fst_jax._decisions import Decision
from fst_jax._tracing import Signature, check_call, trace


def forward_mask(decision: Decision, w: jax.Array) -> jax.Array:
    """The forward 2:4 mask of a sparse-forward decision, on its weight operand ``w`` as the matmul
    sees it (what the FST forward product applies)."""
    plan = decision.plan
    return _masks.weight_mask(w, plan.k_axis, plan.o_axis, plan.grad_input == "transposable")


def replay(view: View, arrays: Sequence[jax.Array], index: bool = False) -> jax.Array:
    """Rebuilds the value ``view`` describes from the parameter ``arrays`` (all leaves, in order),
    with its ``mapped`` scan axes leading. ``index``: the arrays are index arrays, so value-changing
    ops (casts) are skipped."""
    kind = view.node[0]
    if kind == "leaf":
        return arrays[view.node[1]]
    if kind == "scan":
        return replay(view.node[1], arrays, index)
    _, eqn, out_index, inputs = view.node
    xs = [replay(v, arrays, index) for v in inputs]
    if index and eqn.primitive in VALUE_OPS:
        return xs[0]

    def apply(*ys: jax.Array) -> jax.Array:
        it = iter(ys)
        invals = [v.val if isinstance(v, _compat.Literal) else next(it) for v in eqn.invars]
        return _compat.bind_eqn(eqn, invals, context=not index)[out_index]

    for _ in range(view.mapped):
        apply = jax.vmap(apply)
    return apply(*xs)


def view_key(view: View) -> tuple[Any, ...]:
    """A hashable key of what a view computes (its ops and their parameters, not the equation
    objects): two uses that rebuild the same value from the parameters have equal keys."""
    kind = view.node[0]
    if kind == "leaf":
        return ("leaf", view.node[1])
    if kind == "scan":
        return ("scan", view_key(view.node[1]))
    _, eqn, out_index, inputs = view.node
    literals = tuple(repr(v.val) if isinstance(v, _compat.Literal) else None for v in eqn.invars)
    return (eqn.primitive.name, repr(sorted(eqn.params.items())), out_index, literals, view.mapped,
            tuple(view_key(v) for v in inputs))


def _mapped(fn: Callable[[jax.Array], jax.Array], n: int) -> Callable[[jax.Array], jax.Array]:
    for _ in range(n):
        fn = jax.vmap(fn)
    return fn


@dataclasses.dataclass(frozen=True)
class Use:
    """A sparse forward product reading parameter entries through a view."""

    decision: Decision
    view: View
    # global parameter index of every entry of the rebuilt operand (static); None when the operand
    # is a parameter leaf itself (:func:`is_whole_leaf`: every entry in place, no bookkeeping needed)
    index: np.ndarray | None


def is_whole_leaf(view: View) -> bool:
    """Whether a view is a parameter leaf itself (no op between it and the matmul, no scan)."""
    return view.mapped == 0 and view.node[0] == "leaf"


def sparse_uses(decisions: Sequence[Decision], shapes: Sequence[tuple[int, ...]]) -> tuple[list[Use], dict[int, str]]:
    """(the sparse forward products whose weight is a view, leaf -> why a sparse forward product
    reads it through an op that combines entries)."""
    offsets = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
    if offsets[-1] >= 2**31:
        raise ValueError(f"fst_jax: the parameters have {offsets[-1]} entries, more than 2**31")
    uses, bad = [], {}
    views = [d for d in decisions if d.plan is not None and d.plan.forward]
    if not views:
        return uses, bad
    iotas = None
    for d in views:
        w = (d.site.lhs, d.site.rhs)[d.weight_side].view
        if isinstance(w, View) and is_whole_leaf(w):
            uses.append(Use(d, w, None))
        elif isinstance(w, View):
            with _compat.concrete_eval():  # static index arrays
                if iotas is None:
                    iotas = [jnp.arange(offsets[i], offsets[i + 1], dtype=jnp.int32).reshape(s)
                             for i, s in enumerate(shapes)]
                uses.append(Use(d, w, np.asarray(replay(w, iotas, index=True))))
        elif isinstance(w, Broken):
            for leaf in w.leaves:
                bad.setdefault(leaf, f"reaches sparse matmul #{d.index} through {w.why}")
    return uses, bad


def use_mask(use: Use, params: Sequence[jax.Array | None]) -> jax.Array:
    """The forward mask of one use, on its operand rebuilt from ``params`` (its scan axes leading)."""
    return _mapped(lambda w: forward_mask(use.decision, w), use.view.mapped)(replay(use.view, params))


def leaf_masks(uses: Sequence[Use], masks: Sequence[jax.Array | None], leaves: Sequence[int],
               shapes: Sequence[tuple[int, ...]]) -> dict[int, tuple[jax.Array, jax.Array, np.ndarray]]:
    """leaf -> (AND, OR of the forward masks over the places each entry reaches, reached (static)).

    ``masks``: each use's forward mask (:func:`use_mask`; ``None`` for a use that reads none of
    ``leaves``). ``shapes``: every parameter leaf's shape (the index arrays of :func:`sparse_uses`
    count entries over all of them). Unreached entries are ``True`` in the AND and ``False`` in the
    OR. A use whose operand is a leaf itself (``index=None``) combines its mask in place, without
    the index bookkeeping (sorts over every entry) that moved or sliced views need. Traceable.
    """
    sizes = [int(np.prod(s)) for s in shapes]
    offsets = np.cumsum([0] + sizes)
    seen = [(u, m) for u, m in zip(uses, masks) if u.view.leaves & set(leaves)]
    out = {}
    for leaf in leaves:
        size, off = sizes[leaf], offsets[leaf]
        lo = hi = None
        reached = np.zeros(size, bool)
        for u, m in seen:
            if u.index is None:  # the leaf itself: its mask in place, every entry reached
                if leaf in u.view.leaves:
                    lo = m.reshape(-1) if lo is None else lo & m.reshape(-1)
                    hi = m.reshape(-1) if hi is None else hi | m.reshape(-1)
                    reached[:] = True
                continue
            flat_idx = u.index.reshape(-1)
            pos = np.nonzero((flat_idx >= off) & (flat_idx < off + size))[0]
            if not len(pos):
                continue
            tgt = flat_idx[pos] - off
            m = m.reshape(-1)
            if len(tgt) == size and np.array_equal(np.sort(tgt), np.arange(size)):  # a permutation
                src = pos[np.argsort(tgt)]
                u_lo = u_hi = m if np.array_equal(src, np.arange(m.size)) else m[src]
            else:
                u_lo = jnp.ones(size, bool).at[tgt].min(m[pos])
                u_hi = jnp.zeros(size, bool).at[tgt].max(m[pos])
            reached[tgt] = True
            lo = u_lo if lo is None else lo & u_lo
            hi = u_hi if hi is None else hi | u_hi
        if lo is not None:
            out[leaf] = (lo.reshape(shapes[leaf]), hi.reshape(shapes[leaf]), reached.reshape(shapes[leaf]))
    return out


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
    config, sig = check_call(fn, config, params_argnums, static_argnums, static_argnames)

    def run(*args: Any, **kwargs: Any) -> Masks:
        split = sig.split(args, kwargs)
        traced = trace(fn, sig, config, split)
        params = [x for x, p in zip(split.leaves, split.is_param) if p]
        paths = traced.param_paths
        for x, p in zip(params, paths):
            if isinstance(x, (jax.ShapeDtypeStruct, _compat.Tracer)):
                raise TypeError(f"forward_masks needs the parameters' values, but the parameter {p or '<root>'} "
                                f"is a {type(x).__name__}; pass concrete arrays and call it outside jit")
        shapes = [tuple(np.shape(x)) for x in params]
        uses, bad = sparse_uses(traced.decisions, shapes)
        other = dict(traced.analysis.other_uses)
        for d in traced.decisions:  # a dense use of a weight is a use outside the sparse forward products
            if d.weight_side is not None and not (d.plan is not None and d.plan.forward):
                w = (d.site.lhs, d.site.rhs)[d.weight_side].view
                if isinstance(w, View):
                    for leaf in w.leaves:
                        other.setdefault(leaf, f"matmul #{d.index} ({d.forward})")
        used = sorted({leaf for u in uses for leaf in u.view.leaves})
        not_exportable: dict[str, str] = {}
        todo = []
        for leaf in used:
            if leaf in bad:
                not_exportable[paths[leaf]] = bad[leaf]
            elif leaf in other:
                not_exportable[paths[leaf]] = (f"also used by {other[leaf]}, outside the sparse "
                                               "forward products; pruning it would change that use")
            else:
                todo.append(leaf)
        for leaf, why in bad.items():
            not_exportable.setdefault(paths[leaf], why)

        def compute(ps: list[jax.Array]) -> dict[int, tuple[jax.Array, jax.Array]]:
            return {k: (lo, jnp.sum(jnp.asarray(reached) & (lo != hi)))
                    for k, (lo, hi, reached) in leaf_masks(
                        uses, [use_mask(u, ps) if u.view.leaves & set(todo) else None for u in uses],
                        todo, shapes).items()}

        computed = jax.jit(compute)([jnp.asarray(x) for x in params]) if todo else {}
        masks: list[Any] = [None] * len(params)
        used_by = {}
        for leaf, (mask, conflicts) in computed.items():
            rows = tuple(sorted({u.decision.index for u in uses if leaf in u.view.leaves}))
            if int(conflicts):
                not_exportable[paths[leaf]] = (
                    f"{int(conflicts)} of its entries get different forward masks at different places of "
                    f"matmul(s) {', '.join(f'#{r}' for r in rows)} (a shared or broadcast weight)")
            else:
                masks[leaf], used_by[paths[leaf]] = mask, rows
        unmasked = {p: _why_unmasked(traced.decisions, leaf) for leaf, p in enumerate(paths)
                    if masks[leaf] is None and p not in not_exportable}
        return Masks(_param_tree(sig, args, masks), paths, tuple(shapes), not_exportable, unmasked, used_by)

    return run


def _why_unmasked(decisions: Sequence[Decision], leaf: int) -> str:
    for d in decisions:
        if d.weight_side is not None and leaf in d.leaves:
            return f"matmul #{d.index} forward is {d.forward}"
    return "not a weight of any matmul"


def _param_tree(sig: Signature, args: tuple, flat: list[Any]) -> Any:
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


def pruned_params(fn: Callable, config: FSTConfig | None = None, *, params_argnums: int | Sequence[int] = 0,
                  static_argnums: int | Sequence[int] = (), static_argnames: str | Sequence[str] = ()
                  ) -> Callable[..., Any]:
    """The 2:4 model FST trains: the parameters of ``fn`` with every forward mask applied.

    ``pruned_params(fn, config)(params, *args)`` is ``prune_params(params, forward_masks(fn,
    config)(params, *args))``: a plain (dense) call ``fn(pruned, *args)`` then computes what the
    FST forward computes, so evaluate and export this, not the raw master weights (entries the
    forward mask drops never acted in training and are not decayed to zero).

    Args:
      fn: the function, as for :func:`fst_jax.sparsify`.
      config: an :class:`FSTConfig`; ``None`` means ``FSTConfig()``.
      params_argnums: the positional argument(s) holding the parameters.
      static_argnums: positional arguments that are not arrays.
      static_argnames: keyword arguments that are not arrays.

    Returns:
      A function taking ``fn`` 's arguments and returning the pruned parameters, in the structure
      of ``params`` (a tuple for several ``params_argnums``).

    Raises:
      ValueError: a weight that a sparse forward product prunes cannot be pruned in parameter space
        (:attr:`Masks.not_exportable` says why); evaluate with ``sparsify(fn)`` instead.

    Example:
      >>> import jax, jax.numpy as jnp, fst_jax
      >>> def f(params, x):
      ...     for w in params:
      ...         x = jnp.tanh(x @ w)
      ...     return x
      >>> params = [jax.random.normal(jax.random.key(i), (8, 8)) for i in range(3)]
      >>> x = jnp.ones((4, 8))
      >>> pruned = fst_jax.pruned_params(f)(params, x)
      >>> [int((p == 0).sum()) for p in pruned]  # the first and last layers stay dense
      [0, 32, 0]
      >>> bool(jnp.allclose(f(pruned, x), fst_jax.sparsify(f)(params, x)))
      True
    """
    masks_fn = forward_masks(fn, config, params_argnums=params_argnums, static_argnums=static_argnums,
                             static_argnames=static_argnames)

    def run(*args: Any, **kwargs: Any) -> Any:
        masks = masks_fn(*args, **kwargs)
        if masks.not_exportable:
            path, why = next(iter(masks.not_exportable.items()))
            raise ValueError(f"pruned_params: the parameter {path or '<root>'} cannot be pruned in parameter space "
                             f"({why}); evaluate the 2:4 model with fst_jax.sparsify(fn) instead")
        nums = (params_argnums,) if isinstance(params_argnums, int) else tuple(params_argnums)
        params = args[nums[0]] if len(nums) == 1 else tuple(args[i] for i in nums)
        return prune_params(params, masks)

    return run


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
