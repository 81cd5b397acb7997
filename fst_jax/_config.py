"""Configuration of the FST recipe: :class:`FSTConfig` and :class:`Rule`.

Both are frozen, keyword-only, hashable dataclasses, validated on construction, so that they can
be used as static arguments of ``jax.jit`` and as cache keys.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, Literal

GradInput = Literal["prune_output_dim", "transposable", "dense"]
GradWeight = Literal["fixed_mask", "prune_grad_output", "mvue", "dense"]
Pattern = Literal["checkerboard", "even", "odd", "rotating"] | tuple[str, ...]
Mode = Literal["masked", "compact"]
Backend = Literal["xla", "pallas", "cusparselt", "auto"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "grad_input": ("prune_output_dim", "transposable", "dense"),
    "grad_weight": ("fixed_mask", "prune_grad_output", "mvue", "dense"),
    "mode": ("masked", "compact"),
    "backend": ("xla", "pallas", "cusparselt", "auto"),
}


#: The fixed token patterns (one mask for every step).
FIXED_PATTERNS = ("checkerboard", "even", "odd")

#: The half-token patterns a rotating set may name (``fst_jax._masks.TOKEN_PATTERNS``).
ROTATING_PATTERNS = ("alternating", "odd", "anti_checkerboard", "checkerboard", "even", "anti_alternating")

#: ``pattern="rotating"``: the authors' four patterns, drawn per layer per step
#: (``fst_jax._masks.AUTHORS_PATTERNS``).
AUTHORS_PATTERNS = ROTATING_PATTERNS[:4]


def pattern_set(pattern: Any) -> tuple[str, ...] | None:
    """The rotating set a (validated) ``pattern`` value draws from, or None for a fixed pattern.

    Example:
      >>> from fst_jax._config import pattern_set
      >>> pattern_set("rotating"), pattern_set(("even", "odd")), pattern_set("even")
      (('alternating', 'odd', 'anti_checkerboard', 'checkerboard'), ('even', 'odd'), None)
    """
    if pattern == "rotating":
        return AUTHORS_PATTERNS
    if isinstance(pattern, tuple):
        return pattern
    return None


def _check_pattern(owner: str, value: Any) -> Any:
    """Validates ``pattern`` and returns its canonical form (a list becomes a tuple)."""
    if isinstance(value, str):
        if value in FIXED_PATTERNS or value == "rotating":
            return value
        raise ValueError(
            f"{owner}.pattern={value!r} is not valid; allowed values: "
            + ", ".join(repr(a) for a in FIXED_PATTERNS + ("rotating",))
            + ", or a tuple of pattern names to draw from per layer per step, from: "
            + ", ".join(repr(a) for a in ROTATING_PATTERNS))
    if isinstance(value, (tuple, list)):
        names = tuple(value)
        bad = [n for n in names if not isinstance(n, str) or n not in ROTATING_PATTERNS]
        if not names or bad:
            raise ValueError(
                f"{owner}.pattern={value!r}: a rotating pattern set must be a non-empty tuple of pattern "
                f"names{f' ({bad[0]!r} is not one)' if bad else ''}; allowed names: "
                + ", ".join(repr(a) for a in ROTATING_PATTERNS))
        if len(set(names)) != len(names):
            raise ValueError(f"{owner}.pattern={value!r} repeats a pattern; each name may appear once")
        return names
    raise ValueError(
        f"{owner}.pattern={value!r} is not valid: pass one of "
        + ", ".join(repr(a) for a in FIXED_PATTERNS + ("rotating",)) + " or a tuple of pattern names")


#: The FSTConfig fields a :class:`Rule` can override per layer.
LAYER_FIELDS = ("forward", "grad_input", "grad_weight", "pattern", "restore_scale", "token_axis")


def _check_choice(owner: str, field: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"{owner}.{field}={value!r} is not valid; allowed values: "
            + ", ".join(repr(a) for a in allowed)
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """Sends matching weight matmuls to sparse or dense, or gives them their own recipe.

    A rule overrides ``skip_first``/``skip_last`` for the matmuls it matches; the first matching
    rule of :attr:`FSTConfig.rules` wins.

    Args:
      pattern: a regular expression, matched with ``re.search`` (or ``re.fullmatch`` with
        ``full_match=True``).
      action: ``"sparse"`` or ``"dense"``.
      on: what the pattern is matched against: ``"param_path"`` (``jax.tree_util.keystr`` of the
        weight's parameter path, e.g. ``"['params']['Dense_0']['kernel']"``) or ``"name_stack"``
        (the equation's name stack, e.g. ``"MLP/Dense_0"`` under Flax).
      full_match: match the whole string, so that ``Dense_1`` does not also match ``Dense_10``.
      overrides: per-layer values of :data:`LAYER_FIELDS` (``forward``, ``grad_input``,
        ``grad_weight``, ``pattern``, ``restore_scale``, ``token_axis``) for the matched matmuls,
        validated like :class:`FSTConfig`; only with ``action="sparse"``. ``forward=False`` turns
        SR-STE off for those layers (it acts on the forward mask).

    Raises:
      ValueError: an invalid regular expression, action, key or value.

    Example:
      >>> import fst_jax
      >>> rule = fst_jax.Rule(pattern=r"Dense_0", action="dense")
      >>> rule.on
      'param_path'
      >>> fst_jax.Rule(pattern=r".*attn.*", full_match=True, overrides={"pattern": "even"}).overrides
      (('pattern', 'even'),)
    """

    pattern: str
    action: Literal["sparse", "dense"] = "sparse"
    on: Literal["param_path", "name_stack"] = "param_path"
    full_match: bool = False
    overrides: Any = ()

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str):
            raise ValueError(f"Rule.pattern must be a str (a regular expression), got {self.pattern!r}")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"Rule.pattern={self.pattern!r} is not a valid regular expression: {e}") from e
        _check_choice("Rule", "action", self.action, ("sparse", "dense"))
        _check_choice("Rule", "on", self.on, ("param_path", "name_stack"))
        if not isinstance(self.full_match, bool):
            raise ValueError(f"Rule.full_match must be a bool, got {self.full_match!r}")
        overrides = self.overrides if self.overrides is not None else ()
        if isinstance(overrides, Mapping):
            overrides = tuple(sorted(overrides.items()))

        if not isinstance(overrides, tuple) or not all(isinstance(o, tuple) and len(o) == 2 for o in overrides):
            raise ValueError(f"Rule.overrides must be a dict of FSTConfig fields, got {self.overrides!r}")
        unknown = [k for k, _ in overrides if k not in LAYER_FIELDS]
        if unknown:
            raise ValueError(f"Rule.overrides: {unknown[0]!r} cannot be set per layer; allowed keys: "
                             + ", ".join(repr(f) for f in LAYER_FIELDS))
        if overrides and self.action == "dense":
            raise ValueError("Rule.overrides apply to sparse layers; a rule with action='dense' cannot have them")
        if "pattern" in dict(overrides):  # canonical form: a rotating set given as a list is a tuple
            overrides = tuple((k, _check_pattern("Rule.overrides", v) if k == "pattern" else v)
                              for k, v in overrides)
        changes = dict(overrides)
        if changes.get("forward") is False:
            changes["sr_ste"] = 0.0
        FSTConfig(**changes)  # validates the values
        object.__setattr__(self, "overrides", overrides)

    def matches(self, param_path: str | None, name_stack: str) -> bool:
        """Whether this rule applies to a matmul with the given parameter path and name stack.

        Example:
          >>> import fst_jax
          >>> fst_jax.Rule(pattern="head").matches("['head']['kernel']", "")
          True
          >>> fst_jax.Rule(pattern="Dense_1", on="name_stack", full_match=True).matches(None, "Dense_10")
          False
        """
        target = param_path if self.on == "param_path" else name_stack
        if target is None:
            return False
        match = re.fullmatch if self.full_match else re.search
        return match(self.pattern, target) is not None


@dataclasses.dataclass(frozen=True, kw_only=True)
class FSTConfig:
    """What FST does to each weight matmul. Defaults are the paper's recipe.

    The defaults of ``pattern``, ``restore_scale``, ``sr_ste`` and ``min_features`` were chosen
    by the accuracy study (``python -m benchmarks.accuracy --suite all``, tables in
    ``benchmarks/RESULTS.md``): paired seeds, MNIST-1D, an MLP (width 256), a CNN (64) and a
    ResNet (32), AdamW and SGD.

    Args:
      forward: prune the weight 2:4 along its contracting dimension ``K`` in the forward product.
      grad_input: how the grad-input product ``dA = dY·Wᵀ`` gets its sparse operand:
        ``"prune_output_dim"`` re-prunes the forward weight 2:4 along ``O_last``;
        ``"transposable"`` uses one mask that is 2:4 along both ``K`` and ``O_last`` for the
        forward and backward products; ``"dense"`` uses the forward weight as it is. On the
        character-level GPT (``benchmarks/RESULTS.md``, 2026-11-30) ``"transposable"`` with the
        mvue grad-weight gave +2.8 % validation loss over dense against +3.3 % (2 seeds, within
        noise), with the fixed mask +5.9 % against +7.4 % (1 seed); its mask searches 90
        patterns per 4×4 tile every step (46 ms for a 1024×1024 f32 weight on a CPU, the plain
        2:4 mask 1.3 ms).
      grad_weight: how the grad-weight product ``dW = Aᵀ·dY`` is sparsified:
        ``"fixed_mask"`` (a fixed 2:4 token mask on the activation, with the gradient shift),
        ``"prune_grad_output"`` (magnitude 2:4 on ``dY`` along the token axis), ``"mvue"`` or
        ``"dense"``. ``"mvue"``: the minimum-variance unbiased 2:4 sample of ``dY`` along the
        token axis (:func:`fst_jax.mvue_2to4`; ``T % 4 == 0``), an unbiased estimate of ``dW``
        with no fixed token mask and no gradient shift (``pattern`` and ``restore_scale`` do not
        apply); random, so it needs ``fst_key`` like a rotating pattern (each layer draws its own
        seed per call, and each iteration of a scan around it draws anew; inside ``shard_map``
        each shard draws from the key it is given: fold ``axis_index`` into it on a
        data-parallel axis, ``docs/multi_device.md``). It keeps the whole
        activation for the backward pass and, on XLA, runs a dense GEMM on the sampled ``dY``
        (a GPU's 2:4 tensor cores would take ``dY`` as the sparse operand). Measured
        (``benchmarks/RESULTS.md``, 2026-11-30): on the character-level GPT (``python -m
        benchmarks.lm_study``, 3 seeds) ``"mvue"`` is +3.8 % validation loss over dense where the
        fixed checkerboard is +7.2 % (the forward and grad-input products alone: +2.5 %, 2 seeds);
        on MNIST-1D at width 64 −1.5 pt vs −3.2 (MLP), −2.7 vs −2.9 (Flax NNX MLP), −0.0 vs −1.0
        (CNN; 5 seeds), −0.9 vs −0.8 (transformer; 3 seeds), and with ``grad_input="transposable"``
        as well −1.6, −1.6 and −0.1 (the best measured on these narrow models). Over the accuracy
        grid (5 seeds) it is at parity with dense on 17 of its 20 settings (the
        fixed mask: 15 of 20) and never behind the fixed mask beyond noise; it misses on the two
        narrow MNIST-1D MLPs and the MNIST-1D ResNet at width 32 (−1.4 pt vs −1.7).
        ``"fixed_mask"`` stays the default: it needs no key, keeps half the activation and
        halves the grad-weight GEMM; prefer ``"mvue"`` for language models and narrow models.
      pattern: the fixed token mask: ``"checkerboard"`` keeps ``(t + k) % 2 == 0``, ``"even"``
        keeps even tokens, ``"odd"`` odd tokens. Default ``"checkerboard"`` (the paper's).
        In compact mode ``"even"``/``"odd"`` run one half GEMM and the checkerboard its two
        quarters as one GEMM batched over the two parities (a transformer block's CPU step
        1.11–1.15× dense with ``"even"``, 1.21× with the checkerboard since 2026-11-30; two
        separate quarter GEMMs had given 1.00–1.03×). ``"odd"`` was within noise of the checkerboard on MLPs and CNNs, but not on transformers:
        MNIST-1D transformer (width 64, 3 seeds) −5.7 ± 2.0 pt vs −0.8 ± 1.5, character-level GPT
        +7.8 % vs +6.6 % validation loss (2 seeds).

        **Rotating patterns** (the authors' released code): ``"rotating"`` draws, per layer and
        per step, one of the authors' four half-token patterns ``("alternating", "odd",
        "anti_checkerboard", "checkerboard")``, so that every activation entry feeds the
        grad-weight product in some steps; a tuple of names (any of ``"alternating"``, ``"odd"``,
        ``"anti_checkerboard"``, ``"checkerboard"``, ``"even"``, ``"anti_alternating"``, each
        once) draws from that set. The draw comes from the ``fst_key=`` keyword argument of the
        sparsified function (a PRNG key, or an integer step counter; traced, so one compiled step
        serves every step): the same key gives the same draw, and layers draw independently —
        the iterations of a ``lax.scan`` too (a scanned stack of layers, a time loop: the
        iteration is folded into the layer's key); a ``while_loop`` 's iterations share one draw.
        A rotating config called without ``fst_key`` raises an error; fixed patterns accept and
        ignore it. The forward product does not use the pattern (``forward_masks`` and export are
        unaffected). Compact mode keeps half the activation and one compiled step for every draw;
        convolutions, a ``token_axis`` that is not the innermost free axis and an activation
        whose type is sharded (an explicit-sharding mesh) run the masked rotating product (the
        report says so). Measured (``benchmarks/RESULTS.md``, the accuracy grid, 5 seeds): ahead
        of the fixed checkerboard on the wide MNIST-1D MLPs (+1.5 and +0.9 pt over dense against
        +1.0 and −0.5), behind it on the ResNets (digits width 32: −3.1 against −1.2), the CNNs
        (MNIST-1D: −1.3 and −1.8 against −1.0 and −0.5), the MNIST-1D transformer (width 64:
        −1.9) and text (+7.2 % validation loss against +6.6 %, 2 seeds), so it is not the default.
      restore_scale: ``s`` of the gradient shift ``dY'[t] = dY[t] + s·dY[t-1]``, any finite float
        (negative values are allowed: the shift is a linear combination, and tests use them to
        check the sign convention). Default 0.03
        (the authors' code): 0 and 0.03 were indistinguishable, and 1 was the worst value at all
        three ablation settings (benchmarks/RESULTS.md).
      sr_ste: SR-STE coefficient ``λ``: adds ``λ·(1 − mask_f)⊙W`` to the weight gradient.
        Default 2e-4, for AdamW and for SGD with momentum: with AdamW 0 and 2e-4 were within
        noise and 2e-3 / 2e-2 worse; with SGD 2e-4 was best or tied and 2e-3 / 2e-2 worse.
        Must be 0 when ``forward=False``.
      skip_first: leave the first weight matmul (pre-order walk of the jaxpr) dense.
      skip_last: leave the last weight matmul dense.
      min_features: leave weight matmuls with ``K < min_features`` or ``O_last < min_features``
        dense ("small layer"). Default 0 (off): in the study it only bound on the layers that
        ``skip_first``/``skip_last`` already leave dense, or on every layer of a narrow model.
      rules: ordered :class:`Rule` s; the first match wins and overrides skip_first/skip_last
        (and, with ``Rule.overrides``, any of the per-layer fields).
      token_axis: the activation axis the grad-weight mask and the gradient shift run along,
        counted on the activation as the matmul receives it (negative counts from the end; e.g.
        ``0`` for a time-major ``[T, B, D]`` input). ``None`` (default): the activation's last
        free dimension (the sequence of ``[B, T, D]``). Must be a free (not contracting, not
        batch) dimension, else the grad-weight product is left dense with that reason.
        Convolutions always use their output positions.
      mode: ``"compact"`` (default: the grad-weight product runs as dense GEMMs over the kept
        half of the tokens, and only that half of the activation is saved for the backward pass)
        or ``"masked"`` (dense GEMMs on masked operands, the reference). Both compute the same
        numbers to float tolerance.
      backend: what runs the forward and grad-input products. ``"xla"`` (default): dense GEMMs on
        masked operands. ``"cusparselt"``: the 2:4 sparse tensor cores of an NVIDIA GPU (compute
        capability 8.x/9.x) through :mod:`fst_jax.cusparselt`, for float16/bfloat16 matmuls at
        default precision whose dims collapse to a plain matmul (others run on XLA, and the report
        says why); build it once with ``python -m fst_jax.cusparselt build``; it lowers for CUDA
        anywhere and fails to run without a GPU, naming cuSPARSELt. ``"pallas"``: the Pallas-Triton
        kernels of :mod:`fst_jax.kernels` (and in compact mode the fused-shift grad-weight kernel)
        wherever the matmul is a plain one (a 2-D weight, one contracting dimension, no batch
        dimensions, f32/bf16/f16), XLA elsewhere; on a CPU they run in interpret mode (slow: for
        testing). ``"auto"``: ``"cusparselt"`` where :func:`fst_jax.cusparselt.available` (a
        CUDA GPU of compute capability 8.x/9.x and the extension already built; it never starts
        a build), else ``"xla"``; the report says which and why. The compact grad-weight product
        runs on XLA with every backend but ``"pallas"``; with ``grad_weight="mvue"``,
        ``"cusparselt"`` runs the grad-weight product on the sparse tensor cores as well (the
        sampled ``dY`` is 2:4 along the tokens, its contracting dimension), where the token axis
        is the activation's innermost free axis.

    Raises:
      ValueError: a field has a value outside its allowed set.

    Example:
      >>> import fst_jax
      >>> cfg = fst_jax.FSTConfig(restore_scale=1.0)
      >>> cfg.grad_weight
      'fixed_mask'
      >>> hash(cfg) == hash(fst_jax.FSTConfig(restore_scale=1.0))
      True
      >>> fst_jax.FSTConfig(pattern=["even", "odd"]).pattern  # a rotating set, as a tuple
      ('even', 'odd')

      A rotating pattern needs ``fst_key`` (here a traced step counter, one compile for all steps):

      >>> import jax, jax.numpy as jnp
      >>> cfg = fst_jax.FSTConfig(pattern="rotating", skip_first=False, skip_last=False)
      >>> loss = fst_jax.sparsify(lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2), cfg)
      >>> w, x = jnp.ones((8, 8)), jnp.ones((2, 4, 8))
      >>> step_grad = jax.jit(lambda w, x, step: jax.grad(loss)(w, x, fst_key=step))
      >>> [step_grad(w, x, jnp.int32(s)).shape for s in range(2)]
      [(8, 8), (8, 8)]
    """

    forward: bool = True
    grad_input: GradInput = "prune_output_dim"
    grad_weight: GradWeight = "fixed_mask"
    pattern: Pattern = "checkerboard"
    restore_scale: float = 0.03
    sr_ste: float = 2e-4
    skip_first: bool = True
    skip_last: bool = True
    min_features: int = 0
    rules: tuple[Rule, ...] = ()
    mode: Mode = "compact"
    backend: Backend = "xla"
    token_axis: int | None = None

    def __post_init__(self) -> None:
        for name in ("forward", "skip_first", "skip_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"FSTConfig.{name} must be a bool (True or False), got {getattr(self, name)!r}")
        for name, allowed in _CHOICES.items():
            _check_choice("FSTConfig", name, getattr(self, name), allowed)
        object.__setattr__(self, "pattern", _check_pattern("FSTConfig", self.pattern))
        for name in ("restore_scale", "sr_ste"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"FSTConfig.{name} must be a finite float, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.sr_ste < 0:
            raise ValueError(f"FSTConfig.sr_ste must be >= 0, got {self.sr_ste!r}")
        if isinstance(self.min_features, bool) or not isinstance(self.min_features, int) or self.min_features < 0:
            raise ValueError(f"FSTConfig.min_features must be an int >= 0, got {self.min_features!r}")
        if self.token_axis is not None and (isinstance(self.token_axis, bool) or not isinstance(self.token_axis, int)):
            raise ValueError(f"FSTConfig.token_axis must be an int (an axis of the activation) or None, "
                             f"got {self.token_axis!r}")
        if isinstance(self.rules, list):
            object.__setattr__(self, "rules", tuple(self.rules))
        if not isinstance(self.rules, tuple) or not all(isinstance(r, Rule) for r in self.rules):
            raise ValueError(f"FSTConfig.rules must be a tuple of fst_jax.Rule, got {self.rules!r}")
        if not self.forward and self.sr_ste > 0:
            raise ValueError(
                f"FSTConfig.sr_ste={self.sr_ste} acts on the weights that the forward mask drops, but "
                "forward=False has no forward mask: pass sr_ste=0.0 with forward=False"
            )

    def replace(self, **changes: object) -> FSTConfig:
        """A copy with some fields changed (validated again).

        Example:
          >>> import fst_jax
          >>> fst_jax.FSTConfig().replace(pattern="even").pattern
          'even'
        """
        return dataclasses.replace(self, **changes)

    @property
    def needs_fst_key(self) -> bool:
        """Whether a function sparsified with this config takes ``fst_key=``: a rotating pattern or
        ``grad_weight="mvue"``, in the config or in one of its rules' overrides.

        Example:
          >>> import fst_jax
          >>> fst_jax.FSTConfig().needs_fst_key, fst_jax.FSTConfig(pattern="rotating").needs_fst_key
          (False, True)
          >>> fst_jax.FSTConfig(grad_weight="mvue").needs_fst_key
          True
        """
        layers = [self.__dict__] + [dict(r.overrides) for r in self.rules]
        return any(pattern_set(f.get("pattern")) is not None or f.get("grad_weight") == "mvue" for f in layers)
