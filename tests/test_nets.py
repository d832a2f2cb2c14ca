"""Tests of jaxdiff.nets: the network contract, configs, adapters, CEP and the potential network.

Speed. On CPU, building a network is dominated by compiling one random initialiser per
parameter shape (threefry truncated normals: ~0.2 s each; ``rbg`` keys: ~0.08 s, shared by every
network with that shape), and running one eagerly by op-by-op compilation. So networks are built
once per module from ``rbg`` keys with tiny widths, every forward pass is jitted (at XLA
optimisation level 0) and cached per graphdef, test inputs come from NumPy, and the functional
tests use the MLP.
"""

import functools
import json
import math

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import jaxdiff  # noqa: E402
from jaxdiff import nets  # noqa: E402
from jaxdiff.nets.dit import patchify, unpatchify  # noqa: E402

B = 3
CTX_LEN, CTX_DIM = 3, 6


# Test-internal jits compile at XLA CPU optimisation level 0 without the fusion emitters: 3-5x
# faster to compile, the same operations.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def _rngs(seed=0):
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _build(name, config, seed=0):
    return nets.create(name, config, rngs=_rngs(seed))


# Tiny configurations of the denoising networks; the third entry is the conditioning they take
# (labels are covered by the MLPs and the U-Net, a context alone by the DiT).
CONFIGS = {
    "mlp": ("mlp", {"dim": 2, "hidden": 16, "depth": 2, "emb_dim": 8}, None),
    "mlp_label": ("mlp", {"dim": 2, "hidden": 16, "depth": 2, "emb_dim": 8, "num_classes": 4},
                  "label"),
    "potential": ("potential_mlp", {"dim": 2, "hidden": 16, "depth": 2, "emb_dim": 8}, None),
    "potential_label": ("potential_mlp", {"dim": 2, "hidden": 16, "depth": 2, "emb_dim": 8,
                                          "num_classes": 4, "activation": "softplus"}, "label"),
    "unet": ("unet", {"channels": 1, "image_size": 8, "base_channels": 8, "channel_mult": [1, 2],
                      "num_res_blocks": 1, "attn_resolutions": [4], "norm_groups": 4}, None),
    "unet_cond": ("unet", {"channels": 1, "image_size": 8, "base_channels": 8,
                           "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4],
                           "norm_groups": 4, "num_classes": 4, "context_dim": CTX_DIM,
                           "context_len": CTX_LEN}, "label+context"),
    "dit": ("dit", {"channels": 1, "patch_size": 2, "hidden": 16, "depth": 2, "num_heads": 2},
            None),
    "dit_context": ("dit", {"channels": 1, "patch_size": 2, "hidden": 16, "depth": 2,
                            "num_heads": 2, "context_dim": CTX_DIM, "context_len": CTX_LEN},
                    "context"),
}
DENOISERS = list(CONFIGS)


@functools.cache
def _net(config_id, seed=0):
    name, config, _ = CONFIGS[config_id]
    return _build(name, config, seed)


def _x(config_id, dtype=jnp.float32, key=1, size=None):
    name, config, _ = CONFIGS[config_id]
    # The unconditional U-Net runs at 28x28 (configured for 8x8): other sizes are accepted.
    size = size or (28 if config_id == "unet" else 8)
    shape = (B, config["dim"]) if "mlp" in name else (B, size, size, 1)
    return _host(np.random.default_rng(key).standard_normal(shape), dtype)


def _cond(config_id, key=2):
    kind = CONFIGS[config_id][2]
    labels = jnp.array([0, 3, 4], jnp.int32)  # 4 is the null label
    tokens = _host(np.random.default_rng(key).standard_normal((B, CTX_LEN, CTX_DIM)), np.float32)
    mask = jnp.array([[True, True, False], [True, False, False], [False, False, False]])
    if kind == "label":
        return labels
    if kind == "context":
        return {"tokens": tokens, "mask": mask}
    if kind == "label+context":
        return {"label": labels, "tokens": tokens, "mask": mask}
    return None


@functools.cache
def _jitted(graphdef, cep_kind=None):
    """Jitted forward ``(params, x, c_noise, cond[, key, gamma]) -> out`` for a graphdef."""
    if cep_kind is None:
        return _jit(lambda p, x, c, cond: nnx.merge(graphdef, p)(x, c, cond))
    return _jit(
        lambda p, x, c, cond, key, gamma: nnx.merge(graphdef, p)(
            x, c, cond, cep=(key, gamma, cep_kind)
        )
    )


def _host(array, dtype):
    """``array`` converted to ``dtype`` by NumPy, then placed on the device (no compilation)."""
    return jax.device_put(np.asarray(array).astype(dtype))


def _perturb(params, seed, scale=0.3):
    """Parameters plus independent noise (so zero-initialised layers do not hide inputs).

    The noise comes from NumPy: drawing it with JAX would compile one sampler per leaf shape.
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda leaf: _host(np.asarray(leaf) + scale * rng.standard_normal(leaf.shape), leaf.dtype),
        params,
    )


def _cast(tree, dtype):
    """Floating leaves cast to ``dtype`` on the host (eager casts compile once per shape)."""
    return jax.tree.map(
        lambda a: _host(a, dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


# ------------------------------------------------------------------------------------------------
# Embeddings
# ------------------------------------------------------------------------------------------------


def test_sinusoidal_embedding_matches_formula():
    c = jnp.asarray([-1.5, 0.0, 0.3, 2.0], jnp.float64)
    out = nets.sinusoidal_embedding(c, 6, max_period=100.0, scale=2.0)
    k = np.arange(3)
    args = 2.0 * np.asarray(c)[:, None] * 100.0 ** (-k / 3)[None, :]
    np.testing.assert_allclose(out, np.concatenate([np.cos(args), np.sin(args)], 1), rtol=1e-14)
    assert nets.sinusoidal_embedding(c.astype(jnp.float32), 6).dtype == jnp.float32
    with pytest.raises(ValueError, match="even"):
        nets.sinusoidal_embedding(c, 5)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        nets.sinusoidal_embedding(c[:, None], 6)


def test_fourier_embedding_is_a_fixed_gaussian_draw():
    c = jnp.linspace(-2.0, 2.0, 5)
    a = nets.fourier_embedding(c, 8, scale=3.0, seed=5)
    np.testing.assert_array_equal(a, nets.fourier_embedding(c, 8, scale=3.0, seed=5))
    freqs = 3.0 * np.random.default_rng(5).standard_normal(4)
    args = 2 * np.pi * np.asarray(c)[:, None] * freqs[None, :]
    np.testing.assert_allclose(a, np.concatenate([np.cos(args), np.sin(args)], 1), rtol=1e-12)
    assert not np.allclose(a, nets.fourier_embedding(c, 8, scale=3.0, seed=6))


# ------------------------------------------------------------------------------------------------
# The network contract: shapes, dtypes, null condition, validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_id", DENOISERS)
def test_output_shape_and_float32(config_id):
    net = _net(config_id)
    graphdef, params = nnx.split(net)
    fn = _jitted(graphdef)
    x = _x(config_id)
    c_noise = jnp.linspace(-1.0, 1.0, B)  # float64: must not promote the float32 network
    out = fn(params, x, c_noise, _cond(config_id))
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    if CONFIGS[config_id][2] is not None and not config_id.startswith("dit"):
        # (DiT's output is exactly 0 at initialisation; see test_dit_blocks_are_identity_at_init.)
        null = fn(params, x, c_noise, net.null_cond(B))
        assert not np.allclose(null[:2], out[:2])  # rows 0, 1 have real conditions
        np.testing.assert_allclose(null[2], out[2], rtol=1e-6, atol=1e-6)  # row 2 is null


def test_cond_none_is_null_cond():
    net = _net("mlp_label")
    graphdef, params = nnx.split(net)
    x, c = _x("mlp_label"), jnp.zeros(B, jnp.float32)
    fn = _jitted(graphdef)
    np.testing.assert_array_equal(fn(params, x, c, None), fn(params, x, c, net.null_cond(B)))
    conditioning = _net("unet_cond").conditioning
    for a, b in zip(conditioning(None, B, jnp.float32),
                    conditioning(conditioning.null_cond(B), B, jnp.float32)):
        np.testing.assert_array_equal(a, b)


def _float64_ops(jaxpr, found=None):
    """Primitives (recursively, sub-jaxprs included) with a float64 output."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        if any(getattr(v.aval, "dtype", None) == jnp.float64 for v in eqn.outvars):
            found.append(str(eqn.primitive))
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _float64_ops(inner, found)
    return found


@pytest.mark.parametrize("config_id", ["mlp_label", "potential_label", "unet_cond", "dit_context"])
def test_no_float64_inside_float32_networks(config_id):
    """With x64 on, float32 inputs and a float64 c_noise: no operation computes in float64."""
    graphdef, params = nnx.split(_net(config_id))

    def fn(p, x, c, cond, key):
        return nnx.merge(graphdef, p)(x, c, cond, cep=(key, 0.5, "gaussian"))

    args = (_x(config_id, size=8), jnp.linspace(-1.0, 1.0, B), _cond(config_id), jax.random.key(0))
    assert _float64_ops(jax.make_jaxpr(fn)(params, *args).jaxpr) == []
    if config_id == "mlp_label":  # the check itself sees float64 work when there is some
        x64 = args[0].astype(jnp.float64)
        assert _float64_ops(jax.make_jaxpr(fn)(params, x64, *args[1:]).jaxpr)


@pytest.mark.parametrize("config_id", ["mlp_label", "potential_label", "unet_cond", "dit_context"])
def test_bfloat16_params_and_inputs(config_id):
    net = _net(config_id)
    graphdef, params = nnx.split(net)
    params = _perturb(params, 3)
    x, cond = _x(config_id), _cond(config_id)
    c_noise = jnp.linspace(-1.0, 1.0, B, dtype=jnp.float32)
    fn = _jitted(graphdef)
    ref = fn(params, x, c_noise, cond)
    bf16 = jnp.bfloat16
    out = fn(_cast(params, bf16), x.astype(bf16), c_noise, _cast(cond, bf16))
    assert out.dtype == jnp.float32 and out.shape == x.shape
    assert np.all(np.isfinite(out))
    # bfloat16 keeps ~3 significant digits; a few percent of the output scale is the expectation.
    assert float(jnp.max(jnp.abs(out - ref))) < 0.1 * float(jnp.max(jnp.abs(ref))) + 0.05


def test_compute_dtype_option():
    net = _build("mlp", {**CONFIGS["mlp"][1], "dtype": "bfloat16"})
    assert nets.config_of(net)[1]["dtype"] == "bfloat16"
    graphdef, params = nnx.split(net)
    c = jnp.zeros(B, jnp.float32)
    out = _jitted(graphdef)(params, _x("mlp"), c, None)
    assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
    ref_graphdef, ref_params = nnx.split(_net("mlp"))
    ref = _jitted(ref_graphdef)(ref_params, _x("mlp"), c, None)
    np.testing.assert_allclose(out, ref, atol=0.05, rtol=0.05)


def test_null_cond_structure():
    assert nets.null_label(10) == 10
    with pytest.raises(ValueError):
        nets.null_label(0)
    assert _net("mlp").null_cond(B) is None
    labels = _net("mlp_label").null_cond(B)
    assert labels.dtype == jnp.int32 and labels.shape == (B,)
    np.testing.assert_array_equal(labels, nets.null_label(4))
    for config_id in ["unet_cond", "dit_context"]:
        null, real = _net(config_id).null_cond(B), _cond(config_id)
        assert jax.tree.structure(null) == jax.tree.structure(real)
        for a, b in zip(jax.tree.leaves(null), jax.tree.leaves(real)):
            assert a.shape == b.shape and a.dtype == b.dtype
        assert not np.any(null["mask"])


def test_cond_validation():
    x, c = _x("mlp_label"), jnp.zeros(B)
    with pytest.raises(TypeError, match="unconditional"):
        _net("mlp")(x, c, jnp.zeros(B, jnp.int32))
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        _net("mlp_label")(x, c, jnp.array([0, 1, 5]))
    with pytest.raises(ValueError, match="ints of shape"):
        _net("mlp_label")(x, c, jnp.zeros(B))
    net = _net("dit_context")
    bad = {"tokens": _cond("dit_context")["tokens"]}
    with pytest.raises(TypeError, match="tokens"):
        net(_x("dit_context"), c, bad)
    with pytest.raises(ValueError, match="c_noise"):
        _net("mlp")(x, jnp.zeros(B + 1))
    with pytest.raises(ValueError, match=r"expected \(B, 2\)"):
        _net("mlp")(jnp.zeros((B, 3)), c)


def test_unet_shape_validation():
    net = _net("unet")
    message = r"\(3, 7, 7, 1\); this UNet expects \(B, H, W, 1\) with H, W divisible by 2"
    with pytest.raises(ValueError, match=message):
        net(jnp.zeros((B, 7, 7, 1)), jnp.zeros(B))
    with pytest.raises(ValueError, match=r"\(B, H, W, 1\)"):
        net(jnp.zeros((B, 8, 8, 3)), jnp.zeros(B))
    with pytest.raises(ValueError, match="expected"):
        net(jnp.zeros((B, 8, 8)), jnp.zeros(B))
    with pytest.raises(ValueError, match="divisible by 2"):
        _net("dit")(jnp.zeros((B, 5, 6, 1)), jnp.zeros(B))
    with pytest.raises(ValueError, match="attn_resolutions"):
        nets.UNet(channels=1, image_size=8, channel_mult=[1, 2], attn_resolutions=[16],
                  rngs=_rngs())
    with pytest.raises(ValueError, match="image_size"):
        nets.UNet(channels=1, image_size=6, channel_mult=[1, 2, 2], attn_resolutions=[],
                  rngs=_rngs())


def test_state_is_params_only():
    for config_id in DENOISERS:
        _, params, rest = nnx.split(_net(config_id), nnx.Param, ...)
        assert not jax.tree.leaves(rest), config_id


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------


# Widths shared with the test U-Nets, so the initialisers are already compiled.
CLASSIFIER_CONFIG = {"channels": 1, "num_classes": 10, "base_channels": 8, "norm_groups": 4}


@functools.cache
def _classifier(name):
    return _build(name, CLASSIFIER_CONFIG)


@pytest.mark.parametrize("config_id", ["mlp_label", "potential_label", "unet_cond", "dit_context",
                                       "noise_classifier", "classifier"])
def test_create_config_of_round_trip(config_id):
    if config_id in CONFIGS:
        name, config, _ = CONFIGS[config_id]
        net = _net(config_id)
    else:
        name, config = config_id, CLASSIFIER_CONFIG
        net = _classifier(name)
    got_name, got = nets.config_of(net)
    assert got_name == name
    assert {k: got[k] for k in config} == config
    got = json.loads(json.dumps(got))  # what a checkpoint stores
    rebuilt = _build(got_name, got)
    state, state2 = nnx.state(net), nnx.state(rebuilt)
    assert jax.tree.structure(state) == jax.tree.structure(state2)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state2)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert nnx.graphdef(net) == nnx.graphdef(rebuilt)
    assert nets.config_of(rebuilt) == (got_name, got)


def test_create_seed_changes_values():
    a = jax.tree.leaves(nnx.state(_net("mlp")))
    b = jax.tree.leaves(nnx.state(_net("mlp", seed=1)))
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))


def test_create_errors():
    with pytest.raises(ValueError, match="unknown network name 'resnet'.*'mlp'"):
        nets.create("resnet", {}, rngs=_rngs())
    with pytest.raises(ValueError, match=r"unknown config keys \['width'\].*'hidden'"):
        nets.create("mlp", {"dim": 2, "width": 3}, rngs=_rngs())
    with pytest.raises(ValueError, match=r"missing required config keys \['dim'\]"):
        nets.create("mlp", {}, rngs=_rngs())
    with pytest.raises(ValueError, match="embedding"):
        nets.create("mlp", {"dim": 2, "embedding": "learned"}, rngs=_rngs())
    with pytest.raises(TypeError, match="registered"):
        nets.config_of(nnx.Linear(2, 2, rngs=_rngs()))
    assert set(nets.NETWORKS) == {"mlp", "potential_mlp", "unet", "dit", "noise_classifier",
                                  "classifier"}


# ------------------------------------------------------------------------------------------------
# PotentialMLP
# ------------------------------------------------------------------------------------------------


def test_potential_call_is_gradient_of_potential():
    graphdef, params = nnx.split(_net("potential_label"))
    x, cond = _x("potential_label"), _cond("potential_label")
    c = jnp.asarray([-0.5, 0.1, 0.9], jnp.float32)

    @_jit
    def run(p, x, c, cond):
        net = nnx.merge(graphdef, p)
        one = lambda xi, ci, yi: net.potential(xi[None], ci[None], yi[None])[0]
        return net(x, c, cond), net.potential(x, c, cond), jax.vmap(jax.grad(one))(x, c, cond)

    out, phi, grad = run(params, x, c, cond)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert phi.shape == (B,) and phi.dtype == jnp.float32
    np.testing.assert_allclose(out, grad, rtol=1e-5, atol=1e-6)

    # Float64 end to end: central differences agree to O(h^2) ~ 1e-10.
    h = 1e-5
    steps = h * jnp.eye(2, dtype=jnp.float64)
    out64, phi_plus, phi_minus = jax.vmap(run, in_axes=(None, 0, None, None))(
        _cast(params, jnp.float64), x.astype(jnp.float64)[None] + jnp.stack(
            [jnp.zeros((B, 2))] + [steps[i][None, :] * jnp.ones((B, 1)) for i in range(2)]
            + [-steps[i][None, :] * jnp.ones((B, 1)) for i in range(2)]
        ), c.astype(jnp.float64), cond
    )[:2] + (None,)
    del phi_minus
    assert out64.dtype == jnp.float64
    fd = (phi_plus[1:3] - phi_plus[3:5]) / (2 * h)  # (2, B): one row per coordinate
    np.testing.assert_allclose(out64[0], fd.T, rtol=1e-7, atol=1e-9)


def test_potential_has_second_derivatives():
    """Smooth activations: the Hessian of phi exists, is finite and symmetric (Laplacians)."""
    graphdef, params = nnx.split(_net("potential"))
    c = jnp.zeros((1,), jnp.float32)
    hess = _jit(jax.hessian(lambda y: nnx.merge(graphdef, params).potential(y[None], c)[0]))(
        jnp.asarray([0.3, -0.2], jnp.float32)
    )
    assert hess.shape == (2, 2) and np.all(np.isfinite(hess))
    np.testing.assert_allclose(hess, hess.T, atol=1e-5)
    assert float(jnp.max(jnp.abs(hess))) > 0


# ------------------------------------------------------------------------------------------------
# Functional adapters
# ------------------------------------------------------------------------------------------------


def _by_hand(graphdef, process):
    """The network called with c_noise = -log_snr(t) / 8 written out (inside one jit, since the
    Fourier features multiply c_noise by ~300: one ulp of c_noise moves the output ~1e-5)."""
    return _jit(lambda p, x, t, cond: nnx.merge(graphdef, p)(x, -process.log_snr(t) / 8, cond))


def test_noise_conditioning():
    t = jnp.asarray([0.01, 0.5, 0.99])
    process = jaxdiff.VPProcess()
    np.testing.assert_allclose(nets.noise_conditioning(process, t), -process.log_snr(t) / 8,
                               rtol=1e-14)
    x32 = jnp.zeros((3, 2), jnp.float32)
    c = nets.noise_conditioning(process, t, x32)  # float64 times, float32 network input
    assert c.dtype == jnp.float32 and c.shape == (3,)
    c = nets.noise_conditioning(process, jnp.float32(0.5), x32.astype(jnp.bfloat16))
    assert c.dtype == jnp.float32 and c.shape == (3,)
    edm = nets.noise_conditioning(jaxdiff.EDMProcess(), t)
    np.testing.assert_allclose(edm, np.log(np.asarray(t)) / 4, rtol=1e-12)


def test_make_denoiser_eps_by_hand():
    process = jaxdiff.VPProcess()
    graphdef, params = nnx.split(_net("mlp_label"))
    x, cond = _x("mlp_label"), _cond("mlp_label")
    t = jnp.asarray([0.05, 0.4, 0.9], jnp.float32)
    eps_hat = _by_hand(graphdef, process)(params, x, t, cond)
    alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
    expected = (x - sigma * eps_hat) / alpha
    # Two compilations of the network agree to a few float32 ulps; the conversion amplifies
    # that by sigma/alpha (~60 at t = 0.9), the conditioning of x0 = (x - sigma eps)/alpha.
    tol = 1e-5 * np.maximum(1.0, np.asarray(sigma / alpha))
    got = _jit(nets.make_denoiser(graphdef, params, process, "eps"))(x, t, cond)
    assert got.shape == x.shape and got.dtype == jnp.float32
    assert np.all(np.abs(got - expected) <= tol)
    got = _jit(nets.make_denoiser_fn(graphdef, process, "eps"))(params, x, t, cond)
    assert np.all(np.abs(got - expected) <= tol)
    # make_apply returns the raw eps prediction.
    apply = _jit(nets.make_apply(graphdef, process, "eps"))
    np.testing.assert_allclose(apply(params, x, t, cond), eps_hat, rtol=1e-6, atol=1e-6)


def test_make_denoiser_edm_by_hand():
    process = jaxdiff.EDMProcess()  # alpha = 1, sigma = t, sigma_data = 0.5
    graphdef, params = nnx.split(_net("mlp_label"))
    x, cond = 3.0 * _x("mlp_label"), _cond("mlp_label")
    t = jnp.asarray([0.01, 1.0, 40.0], jnp.float32)
    sd, s = 0.5, t[:, None]
    raw = _jitted(graphdef)(params, x / jnp.sqrt(s**2 + sd**2), jnp.log(t) / 4, cond)
    expected = sd**2 / (s**2 + sd**2) * x + s * sd / jnp.sqrt(s**2 + sd**2) * raw
    fn = _jit(nets.make_denoiser_fn(graphdef, process, "edm"))
    got = fn(params, x, t, cond)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    def via_library(p, x, t, cond):
        net = nnx.merge(graphdef, p)
        return jaxdiff.edm_precondition(lambda xi, ci, yi: net(xi, ci, yi), process)(x, t, cond)

    np.testing.assert_allclose(_jit(via_library)(params, x, t, cond), got, rtol=1e-6, atol=1e-6)
    apply = _jit(nets.make_apply(graphdef, process, "edm"))
    np.testing.assert_allclose(apply(params, x, t, cond), got, rtol=1e-6, atol=1e-6)
    # CEP reaches the network through the preconditioning.
    with_cep = _jit(lambda p, x, t, cond, key, gamma: nets.make_apply(graphdef, process, "edm")(
        p, x, t, cond, cep=(key, gamma, "uniform")))
    key = jax.random.key(3)
    np.testing.assert_allclose(with_cep(params, x, t, cond, key, 0.0), got, rtol=1e-6, atol=1e-6)
    assert not np.allclose(with_cep(params, x, t, cond, key, 3.0)[:2], got[:2])
    # sigma_data reaches the preconditioning.
    got2 = _jit(nets.make_denoiser_fn(graphdef, process, "edm", sigma_data=1.0))(params, x, t, cond)
    assert not np.allclose(got, got2)


@pytest.mark.parametrize("kind", ["x0", "v", "score", "velocity"])
def test_make_denoiser_other_kinds_use_convert(kind):
    process = jaxdiff.CosineVPProcess()
    graphdef, params = nnx.split(_net("mlp"))
    x, t = _x("mlp"), jnp.asarray([0.1, 0.5, 0.8], jnp.float32)
    pred = _jit(nets.make_apply(graphdef, process, kind))(params, x, t)
    np.testing.assert_allclose(pred, _by_hand(graphdef, process)(params, x, t, None), rtol=1e-6,
                               atol=1e-6)
    expected = jaxdiff.convert(pred, process, x, t, from_kind=kind, to_kind="x0")
    got = _jit(nets.make_denoiser_fn(graphdef, process, kind))(params, x, t)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_adapter_errors():
    graphdef, params = nnx.split(_net("mlp"))
    process = jaxdiff.VPProcess()
    with pytest.raises(ValueError, match="kind must be one of"):
        nets.make_denoiser(graphdef, params, process, "noise")
    with pytest.raises(ValueError, match="sigma_data"):
        nets.make_apply(graphdef, process, "eps", sigma_data=0.5)
    with pytest.raises(TypeError, match="nnx.split"):
        nets.make_denoiser_fn(_net("mlp"), process, "eps")


def test_one_compilation_per_input_shape():
    process = jaxdiff.VPProcess()
    graphdef, params = nnx.split(_net("mlp_label"))
    fn = nets.make_denoiser_fn(graphdef, process, "v")
    traces = []

    def counted(p, x, t, cond):
        traces.append(x.shape)
        return fn(p, x, t, cond)

    jitted = jax.jit(counted)
    t = jnp.full((B,), 0.5, jnp.float32)
    outs = []
    for i in range(3):
        p = _perturb(params, i)
        outs.append(jitted(p, _x("mlp_label", key=10 + i), t * (i + 1) / 3, _cond("mlp_label")))
    assert len(traces) == 1 and jitted._cache_size() == 1
    assert not np.allclose(outs[0], outs[1])
    jitted(params, jnp.zeros((B + 1, 2), jnp.float32), jnp.full((B + 1,), 0.5, jnp.float32),
           jnp.zeros((B + 1,), jnp.int32))
    assert len(traces) == 2 and jitted._cache_size() == 2
    # Differentiable with respect to the parameters.
    grads = _jit(jax.grad(lambda p: jnp.sum(fn(p, _x("mlp_label"), t, _cond("mlp_label")))))(
        params
    )
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # The closure form built from traced parameters has the same gradient.
    closure_grads = _jit(jax.grad(lambda p: jnp.sum(
        nets.make_denoiser(graphdef, p, process, "v")(_x("mlp_label"), t, _cond("mlp_label"))
    )))(params)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(closure_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_pure_dict_params():
    """Parameters restored as plain nested dicts (a checkpoint) work like the nnx.State."""
    graphdef, params = nnx.split(_net("mlp"))
    pure = nnx.to_pure_dict(params)
    x, t = _x("mlp"), jnp.full((B,), 0.3, jnp.float32)
    process = jaxdiff.VPProcess()
    np.testing.assert_array_equal(
        nets.make_denoiser(graphdef, pure, process, "eps")(x, t),
        nets.make_denoiser(graphdef, params, process, "eps")(x, t),
    )


# ------------------------------------------------------------------------------------------------
# DiT adaLN-Zero
# ------------------------------------------------------------------------------------------------


def test_dit_blocks_are_identity_at_init():
    graphdef, params = nnx.split(_net("dit_context"))
    x, cond = _x("dit_context"), _cond("dit_context")

    @_jit
    def run(p):
        net = nnx.merge(graphdef, p)
        tokens, c, context, mask = net.embed(x, jnp.linspace(-1, 1, B, dtype=jnp.float32), cond)
        outs = [block(tokens, c, context, mask) for block in net.blocks]
        return tokens, outs, net(x, jnp.zeros(B, jnp.float32), cond)

    tokens, outs, final = run(params)
    assert tokens.shape == (B, 16, 16) and len(outs) == 2
    for out in outs:
        np.testing.assert_array_equal(out, tokens)
    np.testing.assert_array_equal(final, jnp.zeros_like(x))
    # Not an identity once the gates are non-zero.
    tokens, outs, final = run(_perturb(params, 0))
    assert not np.allclose(outs[0], tokens)
    assert not np.allclose(final, 0)


def test_patchify_round_trip():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    p = patchify(x, 2)
    assert p.shape == (2, 6, 12)
    np.testing.assert_array_equal(p[0, 1], x[0, 0:2, 2:4].reshape(-1))
    np.testing.assert_array_equal(unpatchify(p, 2, 4, 6), x)


# ------------------------------------------------------------------------------------------------
# Condition Embedding Perturbation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config_id, kind",
    [("mlp_label", "uniform"), ("mlp_label", "gaussian"), ("unet_cond", "uniform"),
     ("dit_context", "gaussian")],
)
def test_cep_zero_gamma_is_identity_and_positive_gamma_perturbs(config_id, kind):
    graphdef, params = nnx.split(_net(config_id))
    params = _perturb(params, 4)
    x, cond = _x(config_id), _cond(config_id)
    c = jnp.linspace(-1, 1, B, dtype=jnp.float32)
    plain = _jitted(graphdef)(params, x, c, cond)
    fn = _jitted(graphdef, kind)
    key = jax.random.key(7)
    np.testing.assert_allclose(fn(params, x, c, cond, key, 0.0), plain, rtol=1e-6, atol=1e-6)
    perturbed = fn(params, x, c, cond, key, 2.0)
    # Real conditions (rows 0 and 1) move; the null condition (row 2) does not.
    assert not np.allclose(perturbed[0], plain[0], atol=1e-4)
    assert not np.allclose(perturbed[1], plain[1], atol=1e-4)
    np.testing.assert_allclose(perturbed[2], plain[2], rtol=1e-6, atol=1e-6)


def test_cep_ignored_by_unconditional_nets():
    net = _net("mlp")
    x, c = _x("mlp"), jnp.zeros(B)
    cep = (jax.random.key(0), 5.0, "gaussian")
    np.testing.assert_array_equal(net(x, c, cep=cep), net(x, c))
    with pytest.raises(ValueError, match="cep kind"):
        _net("mlp_label")(x, c, _cond("mlp_label"), cep=(jax.random.key(0), 1.0, "laplace"))


def test_cep_noise_statistics():
    n, d, gamma = 4000, 64, 0.8
    bound = gamma / math.sqrt(d)
    u = nets.cep_noise(jax.random.key(0), (n, d), gamma, "uniform")
    assert u.shape == (n, d) and u.dtype == jnp.float32
    u = np.asarray(u, np.float64)
    assert np.all(np.abs(u) <= bound)
    m = n * d
    # U(-b, b): max within a few b/m of b; mean 0 (sd b/sqrt(3m)); variance b^2/3 (sd b^2 *
    # sqrt(4/45/m)). Tolerances are 5 standard errors.
    assert u.max() > bound * (1 - 20 / m) and u.min() < -bound * (1 - 20 / m)
    assert abs(u.mean()) < 5 * bound / math.sqrt(3 * m)
    assert abs(u.var() - bound**2 / 3) < 5 * bound**2 * math.sqrt(4 / 45 / m)
    g = np.asarray(nets.cep_noise(jax.random.key(1), (n, d), gamma, "gaussian"), np.float64)
    # N(0, b^2): the sample std has standard error b / sqrt(2m).
    assert abs(g.std() - bound) < 5 * bound / math.sqrt(2 * m)
    assert abs(g.mean()) < 5 * bound / math.sqrt(m)
    assert np.all(nets.cep_noise(jax.random.key(2), (3, 5), 0.0, "gaussian") == 0)
    assert nets.cep_noise(jax.random.key(2), (3, 5), 1.0, "uniform", jnp.bfloat16).dtype == (
        jnp.bfloat16
    )
    with pytest.raises(ValueError, match="gamma"):
        nets.cep_noise(jax.random.key(0), (3, 5), -1.0, "uniform")
    with pytest.raises(ValueError, match="kind"):
        nets.cep_noise(jax.random.key(0), (3, 5), 1.0, "cauchy")


# ------------------------------------------------------------------------------------------------
# Classifiers
# ------------------------------------------------------------------------------------------------


def test_classifiers():
    process = jaxdiff.VPProcess()
    clf = _classifier("noise_classifier")
    x = _x("unet", size=8)
    t = jnp.asarray([0.1, 0.5, 0.9], jnp.float32)
    graphdef, params = nnx.split(clf)
    logits = _jit(nets.make_classifier_fn(graphdef, process))(params, x, t)
    assert logits.shape == (B, 10) and logits.dtype == jnp.float32
    by_hand = _jit(lambda p, x, t: nnx.merge(graphdef, p)(x, -process.log_snr(t) / 8))(
        params, x, t
    )
    np.testing.assert_allclose(logits, by_hand, rtol=1e-6, atol=1e-6)
    closure = nets.make_classifier(graphdef, params, process)
    np.testing.assert_allclose(_jit(closure)(x, t), logits, rtol=1e-6, atol=1e-6)
    clean_graphdef, clean_params = nnx.split(_classifier("classifier"))
    out = _jit(lambda p: nnx.merge(clean_graphdef, p)(x))(clean_params)
    assert out.shape == (B, 10) and out.dtype == jnp.float32 and np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="divisible by 2"):
        nnx.merge(clean_graphdef, clean_params)(jnp.zeros((B, 7, 7, 1)))
