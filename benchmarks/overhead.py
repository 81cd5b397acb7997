"""What FST adds to a training step beyond its GEMMs: the memory floor and the GPU proxy.

Used by ``benchmarks/run.py`` (sections ``floor`` and ``proxy``); nothing here depends on the
internals of ``fst_jax``: the models route their weight matmuls through a :class:`DotHook` (flax's
``dot_general`` attributes), which records each matmul's shapes and, in ``"floor"`` mode, replaces it
by a matmul that keeps only what an ideal compact FST must keep for the backward pass.

**Memory floor.** A weight matmul ``Y = A·W`` in compact FST needs, for its backward pass, the
weight (a parameter, kept anyway) and the kept half of its activation ``A``; everything else the
backward pass keeps is what the rest of the model keeps anyway (a gelu's input, layer-norm
statistics, the attention probabilities, ...). The floor is the residual bytes of the model in
which every sparse weight matmul keeps exactly the kept half of its activation, **once per distinct
activation** (the query, key and value projections read the same activation: one half is kept for
the three), and every dense one (``skip_first`` / ``skip_last``) keeps its whole activation. Its
grad-weight is zero: it is only traced, never trained.

**GPU proxy.** The bytes FST's own passes move per step (masks, the gradient shift, the gather of
the kept half, copies, compression), next to the step's GEMM FLOPs, turned into a fraction of a step
on an H200 (about 4.3 TB/s device copy counting read + write, about 790 TFLOP/s bf16 dense):
``extra_bytes / 4.3 TB/s ÷ (dense GEMM FLOPs / 790 TFLOP/s + other bytes / 4.3 TB/s)``. Two
derivations, printed side by side:

* *HLO*: the non-GEMM bytes of the compiled training step (each instruction of the optimized
  module reads its operands and writes its result once: the CPU compiler's fusion decisions) and
  of the unoptimized module (every op one pass: no fusion), FST minus dense. This counts what
  XLA actually emits, including what FST changes in the rest of the model, but on the CPU
  compiler's fusion, not the GPU's.
* *analytic*: per sparse weight matmul (its shapes from the hook), the passes the recipe needs:
  the forward mask of ``W`` (+ compression), the backward re-mask, SR-STE, the gather of the kept
  half of ``A``, the gradient shift of ``dY``, the interleave of the checkerboard's two halves;
  *unfused*: each its own pass; *fused*: the gather written by ``A``'s producer, the shift read
  inside the grad-weight GEMM (as the Pallas kernel does), the interleave written by the GEMM.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

#: H200 figures measured on this project's GPU machine (DESIGN.md §5).
H200_COPY_BYTES_PER_S = 4.3e12  # device copy, read + write counted
H200_BF16_FLOPS_PER_S = 790e12  # dense bf16 GEMM at 8192³


# ------------------------------------------------------------------------------------------------
# The dot_general hook


@dataclasses.dataclass(frozen=True)
class MatmulShape:
    """One weight matmul as the model called it (``lhs`` = activation, ``rhs`` = weight)."""

    lhs_shape: tuple[int, ...]
    rhs_shape: tuple[int, ...]
    lhs_dtype: str
    rhs_dtype: str
    out_dtype: str
    lhs_contract: tuple[int, ...]
    rhs_contract: tuple[int, ...]
    act_group: int = 0  # index of the first call that read the same activation

    @property
    def k(self) -> int:
        """The contracted size (product of the contracting dims)."""
        return math.prod(self.rhs_shape[d] for d in self.rhs_contract)

    @property
    def o(self) -> int:
        """The weight's free size (product of its free dims)."""
        return math.prod(s for d, s in enumerate(self.rhs_shape) if d not in self.rhs_contract)

    @property
    def n(self) -> int:
        """The activation's free size (tokens × batch)."""
        return math.prod(s for d, s in enumerate(self.lhs_shape) if d not in self.lhs_contract)

    @property
    def token_axis(self) -> int:
        """FST's token axis: the activation's innermost free dimension."""
        return max(d for d in range(len(self.lhs_shape)) if d not in self.lhs_contract)


def _size(dtype: str) -> int:
    return jnp.dtype(dtype).itemsize



@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _floor_dot(lhs: jax.Array, rhs: jax.Array, half: jax.Array, dims: Any, lhs_shape: tuple[int, ...]) -> jax.Array:
    return lax.dot_general(lhs, rhs, dims)


def _floor_dot_fwd(lhs, rhs, half, dims, lhs_shape):
    return lax.dot_general(lhs, rhs, dims), (rhs, half)  # the weight and the kept half only


def _floor_dot_bwd(dims, lhs_shape, res, dy):
    rhs, half = res
    _, vjp_lhs = jax.vjp(lambda a: lax.dot_general(a, rhs, dims), jnp.zeros(lhs_shape, half.dtype))
    return vjp_lhs(dy)[0], jnp.zeros_like(rhs), jnp.zeros_like(half)


_floor_dot.defvjp(_floor_dot_fwd, _floor_dot_bwd)


class DotHook:
    """A ``dot_general`` for flax's ``dot_general=`` attributes: records every weight matmul and,
    in ``"floor"`` mode, keeps only the floor's residuals (see the module docstring).

    Args:
      mode: ``"plain"`` (``lax.dot_general``, only recording) or ``"floor"``.
      dense_calls: call indices (in call order) that stay dense in the floor: they keep their
        whole activation, as dense matmuls do (``skip_first`` / ``skip_last``).
    """

    def __init__(self, mode: str = "plain", dense_calls: Iterable[int] = ()) -> None:
        self.mode = mode
        self.dense_calls = frozenset(dense_calls)
        self.calls: list[MatmulShape] = []
        self._halves: dict[int, tuple[jax.Array, jax.Array]] = {}
        self._groups: dict[int, tuple[jax.Array, int]] = {}

    def reset(self) -> None:
        """Forgets the recorded calls (call before each trace)."""
        self.calls = []
        self._halves = {}
        self._groups = {}

    def __call__(self, lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                 preferred_element_type: Any = None, **_: Any) -> jax.Array:
        (lc, rc), (lb, rb) = dimension_numbers
        out = jax.eval_shape(lambda a, b: lax.dot_general(a, b, dimension_numbers, precision,
                                                          preferred_element_type), lhs, rhs)
        index = len(self.calls)
        group = self._groups.setdefault(id(lhs), (lhs, index))[1]
        shape = MatmulShape(tuple(lhs.shape), tuple(rhs.shape), jnp.dtype(lhs.dtype).name,
                            jnp.dtype(rhs.dtype).name, jnp.dtype(out.dtype).name, tuple(lc), tuple(rc), group)
        self.calls.append(shape)
        if self.mode != "floor" or index in self.dense_calls or lb:
            return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
        key = id(lhs)
        if key not in self._halves:  # one kept half per distinct activation
            t = shape.token_axis
            self._halves[key] = (lhs, lax.slice_in_dim(lhs, 0, lhs.shape[t], stride=2, axis=t))
        dims = (tuple(map(tuple, dimension_numbers[0])), tuple(map(tuple, dimension_numbers[1])))
        return _floor_dot(lhs, rhs, self._halves[key][1], dims, tuple(lhs.shape))


# ------------------------------------------------------------------------------------------------
# HLO byte accounting

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_HEADER = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "reshape", "broadcast", "iota",
             "after-all", "partition-id", "replica-id", "opt-barrier", "optimization-barrier"}
_GEMM_OPS = {"dot", "convolution"}


def _shape_bytes(text: str) -> int:
    return sum(_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x) for d, dims in _SHAPE.findall(text))


def _shape_dims(text: str) -> tuple[int, ...]:
    m = _SHAPE.search(text)
    return tuple(int(x) for x in m.group(2).split(",") if x) if m else ()


@dataclasses.dataclass
class HloBytes:
    """Bytes (read + write) of one HLO module's instructions, split into GEMMs and the rest."""

    gemm_bytes: int = 0
    other_bytes: int = 0
    gemm_flops: int = 0
    by_op: dict[str, int] = dataclasses.field(default_factory=dict)


def _parse(text: str) -> tuple[dict[str, list[tuple[str, str, str, str]]], str | None]:
    comps: dict[str, list[tuple[str, str, str, str]]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and "=" not in line.split("{")[0].split("(")[0]:
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            comps[current].append((m.group(1), m.group(2), m.group(3), m.group(4)))
    return comps, entry


def hlo_bytes(text: str) -> HloBytes:
    """The bytes each executed instruction of an HLO module moves (operands read once, result
    written once), GEMMs (``dot``, ``convolution``, or a fusion that contains one) apart.

    Free ops (parameters, constants, bitcasts, reshapes, broadcasts, tuples) move nothing; ``call``
    and ``while`` bodies are entered once; a fusion is one pass. Works on optimized modules
    (``compiled.as_text()``) and unoptimized ones (``lowered.as_text(dialect="hlo")``).
    """
    comps, entry = _parse(text)
    called_gemm = {name: any(op in _GEMM_OPS or "dot(" in rest for _, _, op, rest in instrs)
                   for name, instrs in comps.items()}
    out = HloBytes()

    def visit(name: str, seen: frozenset[str]) -> None:
        sizes: dict[str, str] = {}
        for iname, shape, op, rest in comps.get(name, []):
            sizes[iname] = shape
            callees = re.findall(r"(?:calls|to_apply|body|branch_computations)=\{?%?([\w.\-]+)", rest)
            if op in ("call", "while", "conditional") and callees:
                for c in callees:
                    if c not in seen:
                        visit(c, seen | {c})
                continue
            if op in _FREE_OPS:
                continue
            operands = re.findall(r"%?([\w.\-]+)", rest.split("),")[0].split(")")[0]) if rest else []
            nbytes = _shape_bytes(shape) + sum(_shape_bytes(sizes[o]) for o in operands if o in sizes)
            is_gemm = op in _GEMM_OPS or (op == "fusion" and any(called_gemm.get(c, False) for c in callees)) \
                or (op == "custom-call" and re.search(r"matmul|gemm|dot", rest, re.I) is not None)
            if is_gemm:
                out.gemm_bytes += nbytes
                lhs = operands[0] if operands else None
                m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
                if op == "dot" and lhs in sizes and m:
                    k = math.prod(_shape_dims(sizes[lhs])[int(d)] for d in m.group(1).split(",") if d)
                    out.gemm_flops += 2 * k * math.prod(_shape_dims(shape))
                elif op == "fusion":
                    for c in callees:
                        for _, cshape, cop, crest in comps.get(c, []):
                            if cop == "dot":
                                out.gemm_flops += _fusion_dot_flops(comps[c], cshape, crest)
            else:
                out.other_bytes += nbytes
                out.by_op[op] = out.by_op.get(op, 0) + nbytes

    if entry is not None:
        visit(entry, frozenset({entry}))
    return out


def _fusion_dot_flops(instrs: list[tuple[str, str, str, str]], shape: str, rest: str) -> int:
    sizes = {n: s for n, s, _, _ in instrs}
    operands = re.findall(r"%?([\w.\-]+)", rest.split(")")[0])
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    if not operands or operands[0] not in sizes or not m:
        return 0
    k = math.prod(_shape_dims(sizes[operands[0]])[int(d)] for d in m.group(1).split(",") if d)
    return 2 * k * math.prod(_shape_dims(shape))


# ------------------------------------------------------------------------------------------------
# Analytic count


def analytic_extra_bytes(calls: list[MatmulShape], sparse: Iterable[int], pattern: str = "checkerboard",
                         sr_ste: bool = True) -> dict[str, dict[str, int]]:
    """Bytes (read + write) that FST's own passes move per training step, per kind of pass.

    For each sparse weight matmul ``A [N, K] · W [K, O]`` (``N`` tokens, element sizes ``e_a``,
    ``e_w``, ``e_y``), compact mode, grad-input ``prune_output_dim``:

    ============  ================================  =======================================
    pass          unfused (each its own pass)        fused (the best a GPU kernel can do)
    ============  ================================  =======================================
    W mask fwd    read W, write W_f: 2·K·O·e_w      same (fused with the 2:4 compression)
    W mask bwd    read W, write W_b: 2·K·O·e_w      same
    SR-STE        read W, dW, write dW: 3·K·O·e_w   read W, dW, write dW (in the optimizer)
    gather A      read A, write A/2: 1.5·N·K·e_a    write A/2 (by A's producer): 0.5·N·K·e_a
    shift dY      read dY, write kept dY'            0 (read inside the grad-weight GEMM)
    interleave    read + write dW: 2·K·O·e_w         0 (written strided by the GEMM)
    ============  ================================  =======================================

    The shift writes ``N·O·e_y`` for the checkerboard (both parities), ``N·O·e_y/2`` for
    ``"even"``/``"odd"``; the interleave is the checkerboard's only.

    Args:
      calls: the model's weight matmuls (from :class:`DotHook`).
      sparse: indices into ``calls`` of the matmuls FST makes sparse.
      pattern: the token pattern.
      sr_ste: whether SR-STE is on.

    Returns:
      ``{"unfused": {pass: bytes}, "fused": {pass: bytes}}``.
    """
    out: dict[str, dict[str, int]] = {"unfused": {}, "fused": {}}

    def add(bound: str, what: str, nbytes: float) -> None:
        out[bound][what] = out[bound].get(what, 0) + int(nbytes)

    gathered: set[int] = set()
    for i in sparse:
        c = calls[i]
        ea, ew, ey = _size(c.lhs_dtype), _size(c.rhs_dtype), _size(c.out_dtype)
        kw = c.k * c.o * ew
        for bound in ("unfused", "fused"):
            add(bound, "W mask fwd", 2 * kw)
            add(bound, "W mask bwd", 2 * kw)
            if sr_ste:
                add(bound, "SR-STE", 3 * kw)
        act = c.n * c.k * ea
        add("unfused", "gather A", 1.5 * act)
        if c.act_group not in gathered:  # one kept half per distinct activation
            gathered.add(c.act_group)
            add("fused", "gather A", 0.5 * act)
        shift_write = c.n * c.o * ey * (1.0 if pattern == "checkerboard" else 0.5)
        add("unfused", "shift dY", c.n * c.o * ey + shift_write)
        add("fused", "shift dY", 0)
        if pattern == "checkerboard":
            add("unfused", "interleave dW", 2 * kw)
            add("fused", "interleave dW", 0)
    return out


def step_fraction(extra_bytes: float, gemm_flops: float, other_bytes: float) -> float:
    """The H200 proxy: ``extra_bytes / copy_bw ÷ (gemm_flops / bf16_flops + other_bytes / copy_bw)``."""
    base = gemm_flops / H200_BF16_FLOPS_PER_S + other_bytes / H200_COPY_BYTES_PER_S
    return (extra_bytes / H200_COPY_BYTES_PER_S) / base if base > 0 else float("nan")
