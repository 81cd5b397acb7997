"""FSTConfig and Rule: frozen, keyword-only, hashable, validated; bad input gets clear errors."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import fst_jax


def test_defaults_are_the_papers_recipe():
    c = fst_jax.FSTConfig()
    assert (c.forward, c.grad_input, c.grad_weight, c.pattern) == (True, "prune_output_dim", "fixed_mask",
                                                                   "checkerboard")
    assert (c.restore_scale, c.sr_ste, c.skip_first, c.skip_last) == (0.03, 2e-4, True, True)
    assert (c.mode, c.backend, c.rules, c.min_features) == ("compact", "xla", (), 0)


def test_frozen_keyword_only_hashable():
    c = fst_jax.FSTConfig(pattern="even", rules=[fst_jax.Rule(pattern="x")])
    assert isinstance(c.rules, tuple)
    assert hash(c) == hash(fst_jax.FSTConfig(pattern="even", rules=(fst_jax.Rule(pattern="x"),)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.pattern = "odd"
    with pytest.raises(TypeError):
        fst_jax.FSTConfig(True)


@pytest.mark.parametrize("field,value", [
    ("grad_input", "transpose"), ("grad_weight", "fixed"), ("pattern", "diagonal"), ("mode", "sparse"),
    ("backend", "cuda"), ("forward", 1), ("skip_first", "yes"), ("restore_scale", "0.5"),
    ("sr_ste", -1.0), ("sr_ste", float("nan")), ("min_features", -4), ("min_features", 2.5),
    ("rules", ("head",)),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"FSTConfig.{field}"):
        fst_jax.FSTConfig(**{field: value})


def test_choice_errors_list_the_allowed_values():
    with pytest.raises(ValueError, match="'checkerboard', 'even', 'odd'"):
        fst_jax.FSTConfig(pattern="diagonal")


def test_sr_ste_needs_a_forward_mask():
    with pytest.raises(ValueError, match="sr_ste=0.0 with forward=False"):
        fst_jax.FSTConfig(forward=False)
    fst_jax.FSTConfig(forward=False, sr_ste=0.0)


def test_backends_accepted():
    assert {fst_jax.FSTConfig(backend=b).backend for b in ("xla", "pallas", "auto")} == {"xla", "pallas", "auto"}


def test_rule_validation():
    with pytest.raises(ValueError, match="Rule.pattern"):
        fst_jax.Rule(pattern="[unclosed")
    with pytest.raises(ValueError, match="Rule.action"):
        fst_jax.Rule(pattern="x", action="skip")
    with pytest.raises(ValueError, match="Rule.on"):
        fst_jax.Rule(pattern="x", on="module")


def loss(params, x):
    return jnp.sum(x @ params["w"])


def test_params_argnums_out_of_range():
    with pytest.raises(ValueError, match=r"params_argnums=2 is out of range .* 2 positional"):
        fst_jax.sparsify(loss, params_argnums=2)({"w": jnp.ones((4, 4))}, jnp.ones((4, 4)))


def test_non_array_leaves_in_params():
    with pytest.raises(TypeError, match=r"leaf at \['name'\] is a str"):
        fst_jax.sparsify(loss)({"w": jnp.ones((4, 4)), "name": "dense"}, jnp.ones((4, 4)))


def test_non_array_leaf_elsewhere_is_static_or_must_be_hashable():
    f = fst_jax.sparsify(lambda p, x, act: jnp.sum(x @ p["w"]) if act == "sum" else 0.0)
    assert float(f({"w": jnp.ones((4, 4))}, jnp.ones((4, 4)), "sum")) == 64.0  # a str is static
    with pytest.raises(TypeError, match="hashable.*static_argnums"):
        f({"w": jnp.ones((4, 4))}, jnp.ones((4, 4)), {1, 2})  # a set is a leaf, and unhashable
    f = fst_jax.sparsify(lambda p, x, act: jnp.sum(x @ p["w"]) if act == "sum" else 0.0, static_argnums=2)
    assert float(f({"w": jnp.ones((4, 4))}, jnp.ones((4, 4)), "sum")) == 64.0


def test_bad_config_type_and_fn():
    with pytest.raises(TypeError, match="config must be an fst_jax.FSTConfig"):
        fst_jax.sparsify(loss, {"forward": True})
    with pytest.raises(TypeError, match="fn must be callable"):
        fst_jax.sparsify(3)
    with pytest.raises(TypeError, match="config must be an fst_jax.FSTConfig"):
        fst_jax.report(loss, "default")


def test_public_names():
    assert sorted(fst_jax.__all__) == fst_jax.__all__
    for name in fst_jax.__all__:
        obj = getattr(fst_jax, name)
        if name == "optax":  # a module: its public functions carry the examples
            obj = obj.sr_ste
        assert obj.__doc__ and "Example:" in obj.__doc__, name


def test_params_argnums_tuple():
    f = lambda a, x, b: jnp.sum(x @ a @ b)  # noqa: E731
    cfg = fst_jax.FSTConfig(skip_first=False, skip_last=False)
    r = fst_jax.report(f, cfg, params_argnums=(0, 2))(jnp.ones((4, 4)), jnp.ones((2, 4, 4)), jnp.ones((4, 4))).rows
    assert [x.param_path for x in r] == ["[0]", "[2]"]
    g = jax.grad(fst_jax.sparsify(f, cfg, params_argnums=(0, 2)), argnums=(0, 2))(
        jnp.ones((4, 4)), jnp.ones((2, 4, 4)), jnp.ones((4, 4)))
    assert g[0].shape == (4, 4)
