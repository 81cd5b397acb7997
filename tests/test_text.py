"""The language-model setting: the stdlib corpus and the character-level GPT."""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fst_jax
from fst_jax import text


def test_corpus_is_deterministic_and_fast():
    text.load_corpus.cache_clear()
    start = time.perf_counter()
    a = text.load_corpus(num_chars=300_000)
    elapsed = time.perf_counter() - start
    text.load_corpus.cache_clear()
    b = text.load_corpus(num_chars=300_000)
    assert elapsed < 30  # seconds, not minutes (a loaded CI machine; ~0.1 s when idle)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    assert len(a.train) == 270_000 and len(a.val) == 30_000
    assert a.train.dtype == np.int32 and a.train.min() >= 0 and a.train.max() < text.VOCAB_SIZE
    assert a.files > 1 and a.python.count(".") == 2
    # A prefix of a longer corpus is the shorter corpus (a fixed order, a fixed cut).
    longer = text.load_corpus(num_chars=400_000)
    np.testing.assert_array_equal(longer.train[:270_000], a.train)
    assert not a.train.flags.writeable


def test_corpus_is_python_source():
    corpus = text.load_corpus(num_chars=100_000)
    s = text.decode(corpus.train[:20_000])
    assert "def " in s and "import " in s and "\n" in s
    unknown = (corpus.train == 0).mean()
    assert unknown < 0.01  # almost everything is in the vocabulary
    counts = np.bincount(corpus.train, minlength=text.VOCAB_SIZE)
    assert counts[text.VOCAB.index(" ")] == counts.max()  # spaces: the commonest character


def test_encode_decode_roundtrip():
    s = "class A:\n\tpass  # ~{}|\n"
    assert text.decode(text.encode(s)) == s
    assert text.encode("é€\x07").tolist() == [0, 0, 0]
    assert len(text.VOCAB) == len(set(text.VOCAB)) == text.VOCAB_SIZE == 98


def test_load_corpus_errors():
    with pytest.raises(ValueError, match="val_fraction"):
        text.load_corpus(num_chars=1000, val_fraction=1.0)
    with pytest.raises(ValueError, match="fewer"):
        text.load_corpus(num_chars=10**10)


def test_model_shapes_and_causality():
    model = text.CharGPT(d_model=32, num_heads=2, seq_len=16)
    x = jax.random.randint(jax.random.key(0), (2, 16), 0, text.VOCAB_SIZE)
    params = model.init(jax.random.key(1), x)["params"]
    logits = model.apply({"params": params}, x)
    assert logits.shape == (2, 16, text.VOCAB_SIZE) and logits.dtype == jnp.float32
    # Changing a later character leaves the logits of earlier positions unchanged.
    x2 = x.at[:, 10].set((x[:, 10] + 1) % text.VOCAB_SIZE)
    logits2 = model.apply({"params": params}, x2)
    np.testing.assert_allclose(logits[:, :10], logits2[:, :10], rtol=1e-6, atol=1e-6)
    assert not np.allclose(logits[:, 10:], logits2[:, 10:])
    with pytest.raises(ValueError, match="T <= 16"):
        model.apply({"params": params}, jnp.zeros((1, 17), jnp.int32))


def test_default_model_is_the_issue_gpt():
    model = text.CharGPT()
    assert (model.num_layers, model.d_model, model.seq_len) == (2, 256, 128)


def test_sample_batch_and_evaluate():
    ids = np.arange(1000) % text.VOCAB_SIZE
    x, y = jax.jit(text.sample_batch, static_argnums=(2, 3))(ids, jax.random.key(0), 5, 16)
    assert x.shape == y.shape == (5, 16)
    np.testing.assert_array_equal(np.asarray(y)[:, :-1], np.asarray(x)[:, 1:])
    x2, _ = text.sample_batch(ids, jax.random.key(0), 5, 16)
    np.testing.assert_array_equal(x, x2)  # deterministic in the key

    def uniform(params, x, y):  # a model that predicts uniformly: log(V) nats per character
        logits = jnp.zeros(x.shape + (text.VOCAB_SIZE,))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    out = text.evaluate(uniform, None, ids, seq_len=16, batch_size=7, max_windows=20)
    assert out["windows"] == 20
    assert out["loss"] == pytest.approx(math.log(text.VOCAB_SIZE), rel=1e-6)
    assert out["bpc"] == pytest.approx(math.log2(text.VOCAB_SIZE), rel=1e-6)


def _train(loss, params, corpus, steps, seq_len):
    step = text.make_train_step(loss, optax.adamw(3e-3))
    state = step.init(params)
    losses = []
    for i in range(steps):
        x, y = text.sample_batch(corpus.train, jax.random.key(i), 16, seq_len)
        params, state, value = step(params, state, x, y)
        losses.append(float(value))
    return params, losses


def test_a_few_steps_decrease_the_loss():
    corpus = text.load_corpus(num_chars=200_000)
    model = text.CharGPT(d_model=32, num_heads=2, seq_len=32)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32))["params"]
    loss = text.make_loss(model)
    before = text.evaluate(loss, params, corpus.val, seq_len=32, max_windows=64)
    params, losses = _train(loss, params, corpus, 40, 32)
    after = text.evaluate(loss, params, corpus.val, seq_len=32, max_windows=64)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert after["loss"] < before["loss"] - 0.5


def test_sparsify_runs_on_the_gpt():
    corpus = text.load_corpus(num_chars=200_000)
    model = text.CharGPT(d_model=32, num_heads=2, seq_len=32)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32))["params"]
    loss = text.make_loss(model)
    sparse = fst_jax.sparsify(loss)
    x, y = text.sample_batch(corpus.train, jax.random.key(0), 4, 32)
    value, grads = jax.jit(jax.value_and_grad(sparse))(params, x, y)
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    report = str(fst_jax.report(loss)(params, x, y))
    assert "sparse" in report
    params, losses = _train(sparse, params, corpus, 20, 32)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
