"""The one walk over a traced function, shared by ``sparsify``, ``report`` and ``forward_masks``.

:func:`analyze` follows every value of a jaxpr with an abstract :class:`Val`:

* its **provenance** (:class:`Prov`): which parameter leaves it depends on, and whether it depends
  on a non-parameter argument (data). A ``dot_general`` operand that depends on parameters only is
  a weight; one that depends on data is an activation.
* its **view** (:class:`View`): for a value that *is* parameter entries moved by structural ops
  (casts, transposes, reshapes, slices, splits, concatenations, per-layer slices of a scan), the
  recipe to rebuild it from the parameters, which :mod:`fst_jax._export` replays on the values
  (masks) and on index arrays (where each entry came from). A value that combines entries (``mul``,
  ``add``, a loop carry) has a :class:`Broken` view naming the op.

and lists every ``dot_general`` / ``conv_general_dilated`` as a :class:`Site`, in pre-order (sub-jaxprs
entered in place). What each primitive does is looked up in tables keyed by primitive objects:
:data:`STRUCTURAL` (views), :data:`IDENTITY`, and :data:`HIGHER` (one entry per higher-order
primitive). A higher-order primitive without an entry is opaque: its outputs depend on all of its
inputs, and a matmul inside it is listed with the region ``"opaque:<name>"`` and left dense.

:func:`run_jaxpr` is the environment loop that this walk and the rewrite in
:mod:`fst_jax._transform` share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from fst_jax import _compat

P = _compat.P

#: Name-stack marker of the regions fst_jax creates; they are never rewritten again.
MARKER = "fst_jax_sparse"


def run_jaxpr(jaxpr: Any, ins: Sequence[Any], on_eqn: Callable[[int, Any, list[Any]], Sequence[Any]],
              literal: Callable[[Any], Any], consts: Sequence[Any] = ()) -> list[Any]:
    """Runs ``on_eqn(index, eqn, input values)`` over ``jaxpr`` 's equations in order.

    ``consts`` are the values of the jaxpr's constvars, ``literal(v)`` the value of a literal
    operand. Values of dropped outputs are not kept.
    """
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, ins))

    def read(v: Any) -> Any:
        return literal(v) if isinstance(v, _compat.Literal) else env[v]

    for i, eqn in enumerate(jaxpr.eqns):
        outs = on_eqn(i, eqn, [read(v) for v in eqn.invars])
        for v, o in zip(eqn.outvars, outs):
            if not isinstance(v, _compat.DropVar):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def subjaxprs(params: dict[str, Any]) -> list[tuple[str, int, Any]]:
    """(param name, index, jaxpr) of every jaxpr-valued parameter of an equation."""
    subs = []
    for key, val in params.items():
        if isinstance(val, _compat.JAXPR_TYPES):
            subs.append((key, 0, val))
        elif isinstance(val, tuple) and val and all(isinstance(v, _compat.JAXPR_TYPES) for v in val):
            subs.extend((key, j, v) for j, v in enumerate(val))
    return subs


# ------------------------------------------------------------------------------------------------
# Abstract values


@dataclasses.dataclass(frozen=True)
class Prov:
    """Provenance: the parameter leaves (indices) a value depends on, and whether it depends on data."""

    params: frozenset[int] = frozenset()
    data: bool = False

    def __or__(self, other: Prov) -> Prov:
        return Prov(self.params | other.params, self.data or other.data)

    @property
    def is_weight(self) -> bool:
        return bool(self.params) and not self.data

    @property
    def is_constant(self) -> bool:
        return not self.params and not self.data


@dataclasses.dataclass(frozen=True)
class View:
    """Parameter entries moved by structural ops: how to rebuild the value from the parameters.

    ``node`` is ``("leaf", i)``, ``("eqn", eqn, out_index, inputs)`` (``inputs``: the views of the
    equation's non-literal operands, all with the same ``mapped``), or ``("scan", view)`` (a scan's
    per-iteration slice of ``view``). ``mapped``: how many leading axes of the rebuilt array are
    iterated over by enclosing scans (the matmul sees one slice of them at a time).
    """

    leaves: frozenset[int]
    mapped: int
    node: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class Broken:
    """A value computed from parameter ``leaves`` through an op (``why``) that combines entries."""

    leaves: frozenset[int]
    why: str


@dataclasses.dataclass(frozen=True)
class Val:
    """The abstract value of one jaxpr variable."""

    prov: Prov = Prov()
    view: View | Broken | None = None


CONST = Val()


def _leaves(view: Any) -> frozenset[int]:
    return view.leaves if view is not None else frozenset()


def join(*vals: Val, why: str | None = None) -> Val:
    """The value of something computed from ``vals`` by an op that combines entries (``why``)."""
    prov = Prov()
    for v in vals:
        prov = prov | v.prov
    views = [v.view for v in vals if v.view is not None]
    if not views:
        return Val(prov)
    leaves = frozenset().union(*map(_leaves, views))
    if why is None:  # keep the first reason along a chain of combining ops
        why = next((v.why for v in views if isinstance(v, Broken)), "an op")
    elif not any(isinstance(v, View) for v in views):
        why = next(v.why for v in views if isinstance(v, Broken))
    return Val(prov, Broken(leaves, why))


def broken(val: Val, why: str) -> Val:
    """``val`` with its view broken by ``why`` (provenance unchanged)."""
    if isinstance(val.view, View):
        return Val(val.prov, Broken(val.view.leaves, why))
    return val


@dataclasses.dataclass(frozen=True, eq=False)
class Site:
    """A ``dot_general`` or ``conv_general_dilated`` found by the walk."""

    path: tuple[Any, ...]  # index in its jaxpr; for a sub-jaxpr, the (param, branch) that leads there
    eqn: Any
    lhs: Val
    rhs: Val
    trips: int | None  # iterations per call (product of enclosing scan lengths); None: in a while loop
    region: str | None  # None, "custom" (user custom_vjp/jvp), "fst" (inner sparsify), "opaque:<prim>"

    @property
    def conv(self) -> bool:
        return self.eqn.primitive is P["conv_general_dilated"]


@dataclasses.dataclass
class Analysis:
    """What :func:`analyze` found: every matmul site, and the parameter uses outside them."""

    sites: list[Site]
    other_uses: dict[int, str]  # parameter leaf -> the first non-structural op that reads it
    out_vals: list[Val]


# ------------------------------------------------------------------------------------------------
# Rule tables

#: Ops that move or cast parameter entries without combining them. ``convert_element_type`` and
#: ``reduce_precision`` change values but not positions (index arrays skip them, see ``VALUE_OPS``);
#: ``dynamic_slice`` counts only with literal indices; ``split`` has several outputs and
#: ``concatenate`` several inputs.
STRUCTURAL = frozenset(P[n] for n in (
    "convert_element_type", "reduce_precision", "transpose", "reshape", "squeeze", "broadcast_in_dim", "slice",
    "dynamic_slice", "rev", "split", "concatenate") if P[n] is not None)
#: Structural ops that change values, not positions.
VALUE_OPS = frozenset(P[n] for n in ("convert_element_type", "reduce_precision") if P[n] is not None)
#: Ops whose output ``i`` is their input ``i`` (copies, sharding annotations, transfers).
IDENTITY = frozenset(P[n] for n in ("copy", "sharding_constraint", "device_put") if P[n] is not None)
SITES = frozenset({P["dot_general"], P["conv_general_dilated"]})
#: User regions whose inside fst_jax never rewrites.
CUSTOM = frozenset(P[n] for n in ("custom_vjp_call", "custom_jvp_call") if P[n] is not None)


class _Walker:
    def __init__(self) -> None:
        self.sites: list[Site] = []
        self.other: dict[int, str] = {}
        self.recording = True

    def jaxpr(self, jaxpr: Any, ins: Sequence[Val], path: tuple[Any, ...], trips: int | None,
              region: str | None) -> list[Val]:
        return run_jaxpr(jaxpr, ins, lambda i, eqn, vals: self.eqn(eqn, vals, path + (i,), trips, region),
                         lambda v: CONST, [CONST] * len(jaxpr.constvars))

    def sub(self, eqn: Any, key: str, j: int, ins: Sequence[Val], path: tuple[Any, ...], trips: int | None,
            region: str | None, record: bool = True) -> list[Val]:
        jaxpr, _ = _compat.open_jaxpr(eqn.params[key] if not isinstance(eqn.params[key], tuple)
                                      else eqn.params[key][j])
        saved, self.recording = self.recording, self.recording and record
        try:
            return self.jaxpr(jaxpr, ins, path + (key, j), trips, region)
        finally:
            self.recording = saved

    def use(self, vals: Sequence[Val], what: str) -> None:
        """Records that the parameters viewed by ``vals`` are read by ``what`` (not a matmul site)."""
        if self.recording:
            for v in vals:
                if isinstance(v.view, View):
                    for leaf in v.view.leaves:
                        self.other.setdefault(leaf, what)

    def eqn(self, eqn: Any, ins: list[Val], path: tuple[Any, ...], trips: int | None,
            region: str | None) -> list[Val]:
        prim = eqn.primitive
        if prim in SITES:
            if self.recording:
                self.sites.append(Site(path, eqn, ins[0], ins[1], trips, region))
            return [join(*ins, why=f"the {prim.name} it feeds")]
        rule = HIGHER.get(prim)
        if rule is not None:
            return rule(self, eqn, ins, path, trips, region)
        if subjaxprs(eqn.params):
            return _opaque(self, eqn, ins, path, trips, region)
        if prim in IDENTITY and len(ins) == len(eqn.outvars):
            return list(ins)
        if prim in STRUCTURAL:
            return _structural(self, eqn, ins)
        self.use(ins, prim.name)
        return [join(*ins, why=prim.name)] * len(eqn.outvars)


def _structural(w: _Walker, eqn: Any, ins: list[Val]) -> list[Val]:
    prov = join(*ins).prov
    operands = [(v, x) for v, x in zip(eqn.invars, ins) if not isinstance(v, _compat.Literal)]
    views = [x.view for _, x in operands]
    n = len(eqn.outvars)
    if views and all(isinstance(x, View) for x in views) and len({x.mapped for x in views}) == 1 \
            and (eqn.primitive is P["concatenate"] or len(operands) == 1):
        leaves = frozenset().union(*(x.leaves for x in views))
        return [Val(prov, View(leaves, views[0].mapped, ("eqn", eqn, i, tuple(views)))) for i in range(n)]
    if all(x is None for x in views):
        return [Val(prov)] * n
    what = eqn.primitive.name
    if len(operands) > 1 and eqn.primitive is not P["concatenate"]:
        what = f"{what} with computed indices"
    w.use(ins, what)
    return [join(*ins, why=what)] * n


def _call(w: _Walker, eqn: Any, ins: list[Val], path: tuple[Any, ...], trips: int | None,
          region: str | None, views: bool = True) -> list[Val]:
    """jit, closed_call, remat, shard_map: the body's inputs are the operands, one to one."""
    (key, j, sub), = subjaxprs(eqn.params)
    inner = ins if views else [broken(v, f"the {eqn.primitive.name} it sits in") for v in ins]
    outs = w.sub(eqn, key, j, inner, path, trips, region)
    return outs if views else [broken(v, eqn.primitive.name) for v in outs]


def _shard_map(w: _Walker, eqn: Any, ins: list[Val], path: tuple[Any, ...], trips: int | None,
               region: str | None) -> list[Val]:
    return _call(w, eqn, ins, path, trips, region, views=False)


def _custom(w: _Walker, eqn: Any, ins: list[Val], path: tuple[Any, ...], trips: int | None,
            region: str | None) -> list[Val]:
    """A user custom_vjp/custom_jvp: its inside is listed but never rewritten."""
    region = region or ("fst" if MARKER in _compat.name_stack(eqn) else "custom")
    w.use(ins, f"a {eqn.primitive.name} region")
    key = "call_jaxpr" if "call_jaxpr" in eqn.params else subjaxprs(eqn.params)[0][0]
    inner = [broken(v, f"the {eqn.primitive.name} it sits in") for v in ins]
    outs = w.sub(eqn, key, 0, inner, path, trips, region)
    return [join(*ins, why=eqn.primitive.name)] * len(eqn.outvars) if len(outs) != len(eqn.outvars) \
        else [join(o, *ins, why=eqn.primitive.name) for o in outs]


def _fixpoint(body: Callable[[list[Val]], list[Val]], carry: list[Val], why: str) -> list[Val]:
    """Loop-carried values: join the body's carry outputs into its inputs until stable."""
    carry = [join(c, why=why) for c in carry]
    while True:
        new = [join(c, o, why=why) for c, o in zip(carry, body(carry))]
        if new == carry:
            return carry
        carry = new


def _scan(w: _Walker, eqn: Any, ins: list[Val], path: tuple[Any, ...], trips: int | None,
          region: str | None) -> list[Val]:
    nc, ncarry = _compat.scan_counts(eqn.params)
    consts, carry, xs = ins[:nc], ins[nc:nc + ncarry], ins[nc + ncarry:]
    sliced = [Val(x.prov, View(x.view.leaves, x.view.mapped + 1, ("scan", x.view)))
              if isinstance(x.view, View) else x for x in xs]
    inner = None if trips is None else trips * eqn.params["length"]

    def body(c: list[Val], record: bool) -> list[Val]:
        return w.sub(eqn, "jaxpr", 0, consts + c + sliced, path, inner, region, record)

    w.use(carry, "a scan carry")
    carry = _fixpoint(lambda c: body(c, False)[:ncarry], carry, "a scan carry")
    outs = body(carry, True)
    return carry + [broken(y, "a scan output") for y in outs[ncarry:]]


def _while(w: _Walker, eqn: Any, ins: list[Val], path: tuple[Any, ...], trips: int | None,
           region: str | None) -> list[Val]:
    cn, bn = _compat.while_counts(eqn.params)
    cconsts, bconsts, carry = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
    w.use(carry, "a while carry")
    carry = _fixpoint(lambda c: w.sub(eqn, "body_jaxpr", 0, bconsts + c, path, None, region, False), carry,
                      "a while carry")
    pred = w.sub(eqn, "cond_jaxpr", 0, cconsts + carry, path, None, region)
    w.sub(eqn, "body_jaxpr", 0, bconsts + carry, path, None, region)
    return [join(c, *pred, why="a while carry") for c in carry]


def _cond(w: _Walker, eqn: Any, ins: list[Val], path: tuple[Any, ...], trips: int | None,
          region: str | None) -> list[Val]:
    inner = [broken(v, "the cond it sits in") for v in ins[1:]]
    branch_outs = [w.sub(eqn, key, j, inner, path, trips, region) for key, j, _ in subjaxprs(eqn.params)]
    return [join(ins[0], *outs, why="cond") for outs in zip(*branch_outs)]


def _opaque(w: _Walker, eqn: Any, ins: list[Val], path: tuple[Any, ...], trips: int | None,
            region: str | None) -> list[Val]:
    """A higher-order primitive without a table entry (pallas_call, ...): listed, never rewritten."""
    name = eqn.primitive.name
    w.use(ins, name)
    out = join(*ins, why=name)
    for key, j, sub in subjaxprs(eqn.params):
        n = len(_compat.open_jaxpr(sub)[0].invars)
        inner = [broken(v, f"the {name} it sits in") for v in ins] if n == len(ins) else [out] * n
        w.sub(eqn, key, j, inner, path, trips, region or f"opaque:{name}")
    return [out] * len(eqn.outvars)


#: One entry per higher-order primitive: how its sub-jaxprs are walked.
HIGHER: dict[Any, Callable[..., list[Val]]] = {
    prim: rule for prim, rule in (
        (P["jit"], _call), (P["closed_call"], _call), (P["remat"], _call), (P["shard_map"], _shard_map),
        (P["custom_vjp_call"], _custom), (P["custom_jvp_call"], _custom), (P["scan"], _scan),
        (P["while"], _while), (P["cond"], _cond)) if prim is not None}


def analyze(jaxpr: Any, is_param: Sequence[bool]) -> Analysis:
    """Walks an open jaxpr whose inputs are parameters (``True``) or data (``False``)."""
    ins, leaf = [], 0
    for p in is_param:
        if p:
            ins.append(Val(Prov(frozenset({leaf})), View(frozenset({leaf}), 0, ("leaf", leaf))))
            leaf += 1
        else:
            ins.append(Val(Prov(data=True)))
    w = _Walker()
    outs = w.jaxpr(jaxpr, ins, (), 1, None)
    w.use(outs, "the function's output")
    return Analysis(w.sites, w.other, outs)
