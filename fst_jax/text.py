"""The language-model setting: a character-level corpus that ships offline, and a small GPT.

Text is where FST's fixed token mask leans hardest on an assumption (neighbouring tokens carry
similar values) that text does not give, so the main job and the accuracy study measure it here.

* :func:`load_corpus`: Python's own standard-library sources (on every machine, no download) read
  in a fixed order, a fixed number of characters, mapped to a fixed 98-symbol vocabulary
  (:data:`VOCAB`), split into train and validation. Deterministic for a given Python installation
  (the sources differ between Python versions: :attr:`Corpus.fingerprint` names the corpus).
* :class:`CharGPT`: a Flax linen decoder-only transformer (pre-LayerNorm, causal attention,
  learned positions), 2 layers of ``d_model`` 256 by default over 128 tokens.
* :func:`make_loss`, :func:`sample_batch`, :func:`make_train_step`, :func:`evaluate`: the loss
  ``loss(params, x, y)`` (mean next-character cross-entropy in nats), random training windows,
  an AdamW-style step, and validation loss and bits per character.

Example:
  >>> import jax, optax
  >>> from fst_jax.text import CharGPT, evaluate, load_corpus, make_loss, make_train_step, sample_batch
  >>> corpus = load_corpus(num_chars=200_000)
  >>> model = CharGPT(vocab_size=corpus.vocab_size, d_model=32, num_heads=2, seq_len=32)
  >>> params = model.init(jax.random.key(0), corpus.train[None, :32])["params"]
  >>> loss = make_loss(model)
  >>> step = make_train_step(loss, optax.adamw(3e-3))
  >>> state = step.init(params)
  >>> for i in range(3):
  ...     x, y = sample_batch(corpus.train, jax.random.key(i), batch_size=8, seq_len=32)
  ...     params, state, value = step(params, state, x, y)
  >>> sorted(evaluate(loss, params, corpus.val, seq_len=32, max_windows=64))
  ['bpc', 'loss', 'windows']
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import pathlib
import sys
import sysconfig
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "VOCAB",
    "VOCAB_SIZE",
    "CharGPT",
    "Corpus",
    "TrainStep",
    "decode",
    "encode",
    "evaluate",
    "load_corpus",
    "make_loss",
    "make_train_step",
    "sample_batch",
]

VOCAB: str = "\x00\t\n" + "".join(chr(c) for c in range(32, 127))
"""The 98 symbols: index 0 stands for any character outside the others (non-ASCII, control
characters), then tab, newline and the 95 printable ASCII characters in code-point order."""

VOCAB_SIZE: int = len(VOCAB)

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
"""Directories of the standard library not read: installed packages and the test suites (which
hold deliberately malformed and generated files)."""

_TABLE = np.zeros(129, np.uint8)  # code point (clipped to 128) -> id; 0 for anything unknown
for _i, _ch in enumerate(VOCAB[1:], start=1):
    _TABLE[ord(_ch)] = _i


def encode(text: str) -> np.ndarray:
    """Maps text to ids in ``[0, VOCAB_SIZE)`` (unknown characters to 0).

    Args:
      text: any string.

    Returns:
      A uint8 NumPy array of ``len(text)`` ids.

    Example:
      >>> from fst_jax.text import decode, encode
      >>> ids = encode("def f():\\n\\treturn 'é'")
      >>> ids[:3].tolist(), decode(ids)
      ([71, 72, 73], "def f():\\n\\treturn '\\x00'")
    """
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return _TABLE[np.minimum(codes, 128)]


def decode(ids: Any) -> str:
    """Maps ids back to text (id 0 becomes ``"\\x00"``).

    Args:
      ids: a sequence or array of ids in ``[0, VOCAB_SIZE)``.

    Returns:
      The string.
    """
    return "".join(VOCAB[i] for i in np.asarray(ids).ravel().tolist())


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """A character-level corpus split into train and validation ids.

    Attributes:
      train: the training ids, int32 ``[num_train]``.
      val: the validation ids, int32 ``[num_val]`` (the corpus' last ``val_fraction``).
      files: the number of source files read.
      source: where the files came from (the standard library's directory).
      python: the Python version whose sources these are.
    """

    train: np.ndarray
    val: np.ndarray
    files: int
    source: str
    python: str

    @property
    def vocab_size(self) -> int:
        """The number of symbols, :data:`VOCAB_SIZE`."""
        return VOCAB_SIZE

    @functools.cached_property
    def fingerprint(self) -> str:
        """The first 16 hex digits of the SHA-256 of the ids: names the corpus in results."""
        h = hashlib.sha256(self.train.tobytes())
        h.update(self.val.tobytes())
        return h.hexdigest()[:16]


def _source_files(root: pathlib.Path) -> list[pathlib.Path]:
    """The standard library's ``.py`` files, sorted by their path relative to ``root``."""
    files = [p for p in root.rglob("*.py")
             if not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=4)
def load_corpus(num_chars: int = 2_000_000, val_fraction: float = 0.1) -> Corpus:
    """Python's standard-library sources as a character-level corpus (read once per process).

    The ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (site-packages and the test
    directories left out) are read as UTF-8 (undecodable bytes replaced) in the order of their
    relative paths and concatenated; the first ``num_chars`` characters are encoded with
    :func:`encode`. The last ``val_fraction`` of them is the validation split. Nothing is cached
    on disk; the result is cached in memory for the process.

    Args:
      num_chars: the corpus length in characters.
      val_fraction: the fraction held out for validation, in ``(0, 1)``.

    Returns:
      A :class:`Corpus`.

    Raises:
      ValueError: if the arguments are out of range or the sources hold fewer than ``num_chars``
        characters.

    Example:
      >>> from fst_jax.text import load_corpus
      >>> c = load_corpus(num_chars=100_000)
      >>> len(c.train), len(c.val), c.vocab_size
      (90000, 10000, 98)
    """
    if num_chars < 2 or not 0 < val_fraction < 1:
        raise ValueError(f"load_corpus: need num_chars >= 2 and 0 < val_fraction < 1, got "
                         f"num_chars={num_chars}, val_fraction={val_fraction}")
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, total, files = [], 0, 0
    for path in _source_files(root):
        text = path.read_bytes().decode("utf-8", errors="replace")
        chunks.append(text)
        total += len(text)
        files += 1
        if total >= num_chars:
            break
    if total < num_chars:
        raise ValueError(f"load_corpus: the sources under {root} hold {total} characters, fewer "
                         f"than num_chars={num_chars}")
    ids = encode("".join(chunks)[:num_chars]).astype(np.int32)
    split = num_chars - max(1, int(round(num_chars * val_fraction)))
    train, val = ids[:split], ids[split:]
    train.flags.writeable = False
    val.flags.writeable = False
    return Corpus(train=train, val=val, files=files, source=str(root),
                  python=".".join(map(str, sys.version_info[:3])))


class CausalBlock(nn.Module):
    """A pre-LayerNorm decoder block: ``x + causal MHA(LN(x))``, then ``x + MLP(LN(x))``.

    Attributes:
      num_heads: the number of attention heads (must divide the model width).
      mlp_ratio: the MLP's hidden width as a multiple of the model width.
    """

    num_heads: int = 4
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block to ``[B, T, d_model]`` with a causal mask."""
        d_model = x.shape[-1]
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        y = nn.LayerNorm()(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=d_model)(
            y, mask=mask)
        x = x + y
        y = nn.LayerNorm()(x)
        y = nn.gelu(nn.Dense(self.mlp_ratio * d_model)(y))
        return x + nn.Dense(d_model)(y)


class CharGPT(nn.Module):
    """A small character-level GPT: embeddings → causal blocks → LayerNorm → ``Dense`` head.

    Token and learned position embeddings (``nn.Embed``: gathers, not matmuls), ``num_layers``
    :class:`CausalBlock` s, a final LayerNorm and a ``Dense`` head to ``vocab_size`` logits per
    position.

    Attributes:
      vocab_size: the number of symbols.
      seq_len: the longest sequence (the number of position embeddings).
      d_model: the model width.
      num_heads: the number of attention heads.
      num_layers: the number of blocks.
      mlp_ratio: the MLP's hidden width as a multiple of ``d_model``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fst_jax.text import CharGPT
      >>> model = CharGPT(d_model=32, num_heads=2, seq_len=16)
      >>> x = jnp.zeros((2, 16), jnp.int32)
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> model.apply({"params": params}, x).shape
      (2, 16, 98)
    """

    vocab_size: int = VOCAB_SIZE
    seq_len: int = 128
    d_model: int = 256
    num_heads: int = 4
    num_layers: int = 2
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ids ``[B, T]`` (``T <= seq_len``) to next-character logits ``[B, T, vocab_size]``.

        Args:
          x: integer ids, ``[B, T]``.

        Returns:
          The logits, float32 ``[B, T, vocab_size]``.

        Raises:
          ValueError: if ``x`` is not 2-D or longer than ``seq_len``.
        """
        if x.ndim != 2 or x.shape[1] > self.seq_len:
            raise ValueError(f"CharGPT expects ids of shape [B, T <= {self.seq_len}], got {x.shape}")
        h = nn.Embed(self.vocab_size, self.d_model, name="embed")(x)
        pos = nn.Embed(self.seq_len, self.d_model, name="pos_embed")(jnp.arange(x.shape[1]))
        h = h + pos[None]
        for _ in range(self.num_layers):
            h = CausalBlock(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio)(h)
        h = nn.LayerNorm(name="final_norm")(h)
        return nn.Dense(self.vocab_size, name="head")(h)


def make_loss(model: nn.Module) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """The training loss ``loss(params, x, y)``: mean next-character cross-entropy, in nats.

    Args:
      model: a :class:`CharGPT` (or any module mapping ids ``[B, T]`` to logits ``[B, T, V]``).

    Returns:
      ``loss(params, x, y)`` with ``x, y`` integer ``[B, T]`` (``y`` the next characters).

    Example:
      >>> import jax, jax.numpy as jnp, math
      >>> from fst_jax.text import CharGPT, make_loss
      >>> model = CharGPT(d_model=16, num_heads=2, seq_len=8)
      >>> x = jnp.zeros((1, 8), jnp.int32)
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> 0.5 < float(make_loss(model)(params, x, x)) / math.log(98) < 1.5  # near uniform at init
      True
    """

    def loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss


def sample_batch(ids: Any, key: jax.Array, batch_size: int, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """Random training windows: ``x = ids[o : o + seq_len]``, ``y = ids[o + 1 : o + seq_len + 1]``.

    The offsets ``o`` are drawn uniformly with ``key``; jit-able (``batch_size`` and ``seq_len``
    static).

    Args:
      ids: the ids, ``[N]`` (NumPy or JAX).
      key: a PRNG key.
      batch_size: the number of windows.
      seq_len: the window length.

    Returns:
      ``(x, y)``, int32 ``[batch_size, seq_len]`` each.

    Example:
      >>> import jax, numpy as np
      >>> from fst_jax.text import sample_batch
      >>> x, y = sample_batch(np.arange(100), jax.random.key(0), 4, 8)
      >>> bool((y == x + 1).all()), x.shape
      (True, (4, 8))
    """
    ids = jnp.asarray(ids, jnp.int32)
    if ids.shape[0] < seq_len + 1:
        raise ValueError(f"sample_batch: {ids.shape[0]} ids are too few for windows of {seq_len} + 1")
    offsets = jax.random.randint(key, (batch_size,), 0, ids.shape[0] - seq_len)
    window = jax.vmap(lambda o: jax.lax.dynamic_slice_in_dim(ids, o, seq_len + 1))(offsets)
    return window[:, :-1], window[:, 1:]


class TrainStep(NamedTuple):
    """``init(params) -> opt_state`` and the jitted ``step(params, opt_state, x, y)``."""

    init: Callable[[Any], Any]
    step: Callable[..., tuple[Any, Any, jax.Array]]

    def __call__(self, params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, jax.Array]:
        """One optimizer step: returns ``(params, opt_state, loss)``."""
        return self.step(params, opt_state, x, y)


def make_train_step(loss: Callable[..., jax.Array], optimizer: optax.GradientTransformation) -> TrainStep:
    """A jitted training step for ``loss(params, x, y)`` (dense, or wrapped by ``fst_jax.sparsify``).

    Args:
      loss: the loss function.
      optimizer: an optax optimizer.

    Returns:
      A :class:`TrainStep`.
    """

    @jax.jit
    def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, jax.Array]:
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return TrainStep(init=optimizer.init, step=step)


def evaluate(loss: Callable[..., jax.Array], params: Any, ids: Any, *, seq_len: int = 128,
             batch_size: int = 64, max_windows: int | None = 256) -> dict[str, float]:
    """Validation loss and bits per character over fixed, non-overlapping windows of ``ids``.

    Windows ``ids[i·seq_len : (i+1)·seq_len + 1]`` for ``i = 0, 1, ...`` (at most ``max_windows``,
    all if ``None``), in batches of ``batch_size`` (the last batch may be smaller); the loss is the
    mean over windows of ``loss(params, x, y)`` weighted by window count, so every character
    counts once. Pass the loss of the model to evaluate: for FST, the *dense* loss on the 2:4
    parameters (``fst_jax.prune_params``), which is what the sparse forward computes.

    Args:
      loss: ``loss(params, x, y)``, mean cross-entropy in nats (from :func:`make_loss`).
      params: the parameters.
      ids: the validation ids, ``[N]``.
      seq_len: the window length.
      batch_size: windows per batch.
      max_windows: the most windows to use.

    Returns:
      ``{"loss": nats per character, "bpc": bits per character, "windows": count}``.

    Raises:
      ValueError: if ``ids`` hold no full window.
    """
    ids = np.asarray(ids, np.int32)
    n = (len(ids) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"evaluate: {len(ids)} ids hold no window of {seq_len} + 1")
    starts = np.arange(n) * seq_len
    windows = ids[starts[:, None] + np.arange(seq_len + 1)]
    fn = jax.jit(loss)
    total = 0.0
    for i in range(0, n, batch_size):
        w = windows[i: i + batch_size]
        total += float(fn(params, jnp.asarray(w[:, :-1]), jnp.asarray(w[:, 1:]))) * len(w)
    mean = total / n
    return {"loss": mean, "bpc": mean / math.log(2), "windows": n}
