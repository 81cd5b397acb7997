"""Tracing a user function once per signature: arguments split into parameters, data and static
values; the trace analysed (:mod:`fst_jax._analysis`) and decided (:mod:`fst_jax._decisions`).

``sparsify``, ``report``, ``forward_masks`` and ``pruned_params`` all start here, so they see the
same jaxpr and the same decisions.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from fst_jax import _compat
from fst_jax._analysis import Analysis, analyze
from fst_jax._config import FSTConfig
from fst_jax._decisions import Decision, decide


#: The keyword argument of a sparsified function that carries the rotating patterns' randomness
#: (a PRNG key or a step counter); it is never passed on to the user's function.
FST_KEY = "fst_key"


def _as_tuple(x: int | Sequence[int], name: str) -> tuple[int, ...]:
    t = (x,) if isinstance(x, int) else tuple(x)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in t):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {x!r}")
    return t


def is_array_like(x: Any) -> bool:
    """Values that are traced (become jaxpr inputs): arrays and Python/NumPy numbers (not bools)."""
    if isinstance(x, (bool, np.bool_)):
        return False
    return isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex, jax.ShapeDtypeStruct,
                          _compat.Tracer))


@dataclasses.dataclass(frozen=True)
class Split:
    """One call's arguments, flattened: the traced leaves and everything that keys the trace."""

    leaves: list[Any]  # traced leaves (parameters first in tree order, as they appear)
    labels: list[str]  # how errors name each traced leaf
    is_param: list[bool]
    static: Any  # hashable: static positional/keyword arguments and automatically static leaves
    tree: Any


class Signature:
    """Splits a call's arguments into parameters, traced data and static values.

    Python ``bool``, ``str`` and other non-array leaves outside the parameters are static (part of
    the cache key, like ``static_argnums``); Python ``int``/``float`` are traced as weakly typed
    scalars, as ``jax.jit`` does, so that an eager step counter does not retrace.
    """

    def __init__(self, fn_name: str, params_argnums: int | Sequence[int], static_argnums: int | Sequence[int],
                 static_argnames: str | Sequence[str]):
        self.fn_name = fn_name
        self.params_argnums = _as_tuple(params_argnums, "params_argnums")
        self.static_argnums = _as_tuple(static_argnums, "static_argnums")
        self.static_argnames = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
        overlap = set(self.params_argnums) & set(self.static_argnums)
        if overlap:
            raise ValueError(f"params_argnums and static_argnums overlap at {sorted(overlap)}: parameters must be arrays")

    def split(self, args: tuple, kwargs: dict) -> Split:
        """The call's arguments split; the keyword ``fst_key`` (the rotating patterns' randomness,
        handled by ``sparsify``) is not passed to the function and is ignored here."""
        kwargs = {k: v for k, v in kwargs.items() if k != FST_KEY}
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
        static_args = (tuple((i, args[i]) for i in sorted(static_pos)),
                       tuple(sorted((k, v) for k, v in kwargs.items() if k in self.static_argnames)))
        dyn_args = tuple(a for i, a in enumerate(args) if i not in static_pos)
        dyn_kwargs = {k: v for k, v in kwargs.items() if k not in self.static_argnames}
        positions = [i for i in range(n) if i not in static_pos]
        leaves_paths, tree = jax.tree_util.tree_flatten_with_path((dyn_args, dyn_kwargs))
        leaves, labels, is_param, auto_static = [], [], [], []
        for j, (kp, leaf) in enumerate(leaves_paths):
            where = kp[0].idx if hasattr(kp[0], "idx") else None
            pos = positions[kp[1].idx] if where == 0 else None
            param = pos in params_pos
            tail = jax.tree_util.keystr(kp[2:])
            if param:
                if not is_array_like(leaf):
                    raise TypeError(
                        f"{self.fn_name}: the parameters (argument {pos}, params_argnums) must be a pytree of "
                        f"arrays, but the leaf at {tail or '<root>'} is a {type(leaf).__name__} ({leaf!r:.60}); "
                        "move non-array values to another argument (they are static there)")
                label = tail if len(self.params_argnums) == 1 else f"[{pos}]{tail}"
            else:
                label = _arg_label(pos, kwargs_key=kp[1] if where == 1 else None, tail=tail)
                if not is_array_like(leaf):
                    auto_static.append((j, leaf))
                    continue
            leaves.append(leaf)
            labels.append(label)
            is_param.append(param)
        static = (static_args, tuple(auto_static))
        try:
            hash(static)
        except TypeError as e:
            raise TypeError(f"{self.fn_name}: static and non-array arguments must be hashable (they key the "
                            f"trace, as in jax.jit's static_argnums): {e}") from e
        return Split(leaves, labels, is_param, static, tree)

    def rebuild(self, split: Split, leaves: Sequence[Any]) -> tuple[tuple, dict]:
        (static_pos, static_kw), auto_static = split.static
        flat = list(leaves)
        for j, value in auto_static:
            flat.insert(j, value)
        dyn_args, dyn_kwargs = jax.tree_util.tree_unflatten(split.tree, flat)
        args, it = [], iter(dyn_args)
        spos = dict(static_pos)
        for i in range(len(dyn_args) + len(static_pos)):
            args.append(spos[i] if i in spos else next(it))
        return tuple(args), {**dyn_kwargs, **dict(static_kw)}


def check_call(fn: Callable, config: FSTConfig | None, params_argnums: int | Sequence[int],
               static_argnums: int | Sequence[int], static_argnames: str | Sequence[str]
               ) -> tuple[FSTConfig, Signature]:
    """(the config, ``FSTConfig()`` for None, and the signature) of a ``sparsify``-style call,
    with the errors ``sparsify``, ``report`` and ``forward_masks`` share."""
    if config is not None and not isinstance(config, FSTConfig):
        raise TypeError(f"config must be an fst_jax.FSTConfig or None, got {type(config).__name__}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    sig = Signature(getattr(fn, "__name__", "fn"), params_argnums, static_argnums, static_argnames)
    return FSTConfig() if config is None else config, sig


def _arg_label(pos: int | None, kwargs_key: Any = None, tail: str = "") -> str:
    """How an error names a non-parameter leaf: ``args[1]['x']`` or ``kwargs['x']``."""
    head = f"args[{pos}]" if pos is not None else f"kwargs{jax.tree_util.keystr((kwargs_key,))}"
    return head + tail


def _spec(leaf: Any) -> Any:
    return leaf if isinstance(leaf, jax.ShapeDtypeStruct) else jax.typeof(leaf)


def spec_key(spec: Any) -> Any:
    if isinstance(spec, jax.ShapeDtypeStruct):
        return ("sds", spec.shape, spec.dtype, spec.weak_type, spec.sharding)
    return spec


@dataclasses.dataclass(frozen=True)
class Traced:
    """A traced function with its analysis and decisions."""

    jaxpr: Any  # closed
    out_tree: Any
    static_outs: tuple[tuple[int, Any], ...]  # non-array outputs: (flat position, value)
    analysis: Analysis
    decisions: tuple[Decision, ...]
    param_paths: tuple[str, ...]
    is_param: tuple[bool, ...]
    config: FSTConfig


def _is_static_out(x: Any) -> bool:
    """An output that does not depend on the traced inputs (a Python value, a constant array) is
    returned as it is, as ``jax.value_and_grad(has_aux=True)`` returns its auxiliary values."""
    return not isinstance(x, _compat.Tracer)


def trace(fn: Callable, sig: Signature, config: FSTConfig, split: Split) -> Traced:
    """Traces ``fn`` for the call ``split`` describes, analyses and decides it."""
    specs = [_spec(x) for x in split.leaves]
    out_info: list[Any] = []

    def flat_fn(*flat: Any) -> list[Any]:
        a, kw = sig.rebuild(split, flat)
        outs, t = jax.tree_util.tree_flatten(fn(*a, **kw))
        out_info.append((t, tuple((i, o) for i, o in enumerate(outs) if _is_static_out(o))))
        return [o for o in outs if not _is_static_out(o)]

    try:
        closed = jax.make_jaxpr(flat_fn)(*specs)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError,
            jax.errors.TracerArrayConversionError) as e:
        m = re.search(r"flat\[(\d+)\]", str(e))
        which = split.labels[int(m.group(1))] if m else "one of the traced arguments"
        raise TypeError(
            f"{sig.fn_name}: {which} is traced (a JAX array or a Python int/float), but it is used where "
            "Python needs a concrete value (an `if`, `bool()`, `int()`, a shape). Mark that argument static "
            "with fst_jax.sparsify(..., static_argnums=...) or static_argnames=... (as for jax.jit), or pass "
            "a Python bool, which is static automatically.") from e
    jaxpr, _ = _compat.open_jaxpr(closed)
    param_paths = tuple(lbl for lbl, p in zip(split.labels, split.is_param) if p)
    analysis = analyze(jaxpr, split.is_param)
    decisions = decide(analysis.sites, config, param_paths)
    out_tree, static_outs = out_info[0]
    return Traced(closed, out_tree, static_outs, analysis, decisions, param_paths, tuple(split.is_param), config)


def cache_key(split: Split) -> Any:
    """What a trace depends on: tree structure, avals, static values, and JAX's trace context."""
    return (split.tree, tuple(spec_key(_spec(x)) for x in split.leaves), split.static, tuple(split.is_param),
            _compat.trace_context())


def unflatten_outputs(traced: Traced, outs: Sequence[Any]) -> Any:
    flat = list(outs)
    for i, value in traced.static_outs:
        flat.insert(i, value)
    return jax.tree_util.tree_unflatten(traced.out_tree, flat)
