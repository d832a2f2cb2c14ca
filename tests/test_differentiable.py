"""Differentiable sampling: gradients through samplers, rematerialisation, learnable grids.

Ground truth: central finite differences in float64 on an exact 2-D Gaussian-mixture denoiser
(:mod:`jaxdiff.analytic`), the closed-form Gaussian probability-flow map, and the compiled
executables' own memory accounting. Every jitted function is keyed by a single process type
(VPProcess), see tests/test_samplers.py for why.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxdiff import analytic, processes, samplers, timesteps  # noqa: E402
from jaxdiff.samplers._core import check_remat, integrate, segment_length  # noqa: E402
from jaxdiff.timesteps import LearnableGrid, fit_grid  # noqa: E402

PROCESS = processes.VPProcess()
MIXTURE = analytic.GaussianMixture.create(
    jnp.array([0.3, 0.7]), jnp.array([[-1.0, 0.5], [1.0, -0.5]]), stds=jnp.array([0.3, 0.5])
)
B = 4


def _denoiser(process):
    return MIXTURE.denoiser(process)


# Several samplers per jitted function (compilation dominates on CPU; XLA's backend
# optimisation level 0 compiles these small programs ~30% faster). FD_NAMES: DDIM and
# DPM-Solver++ 2M on a log-SNR grid, EDM Heun on a Karras grid ending in an exact 0 (its last
# step is Euler to 0), PF-Euler uniform in t. REMAT_NAMES: Euler-Maruyama (generated noise
# streams), DPM-Solver++ 2M (ring-buffer carry), EDM Heun (lax.cond in the step). N = 7 steps:
# segments of 3 leave a remainder of 1.
N = 7
FAST = dict(compiler_options={"xla_backend_optimization_level": 0})
GRIDS = {
    "pf_euler": timesteps.uniform_t(PROCESS, N, dtype=jnp.float64),
    "edm_heun": timesteps.karras(PROCESS, N, final_zero=True, dtype=jnp.float64),
    "dpm_solver_pp_2m": timesteps.uniform_log_snr(PROCESS, N, dtype=jnp.float64),
    "ddim": timesteps.uniform_log_snr(PROCESS, N, dtype=jnp.float64),
    "euler_maruyama": timesteps.uniform_t(PROCESS, N, dtype=jnp.float64),
}
CALLS = {
    "pf_euler": lambda *a, **k: samplers.pf_euler(None, *a, **k),
    "edm_heun": lambda *a, **k: samplers.edm_heun(None, *a, **k),
    "dpm_solver_pp_2m": lambda *a, **k: samplers.dpm_solver_pp(None, *a, order=2, **k),
    "ddim": lambda *a, **k: samplers.ddim(None, *a, eta=0, **k),
    "euler_maruyama": lambda *a, **k: samplers.euler_maruyama(jax.random.key(5), *a, **k),
}
FD_NAMES = ("ddim", "dpm_solver_pp_2m", "edm_heun", "pf_euler")
REMAT_NAMES = ("dpm_solver_pp_2m", "edm_heun", "euler_maruyama")
WEIGHTS = jnp.asarray(np.random.default_rng(0).normal(size=(B, 2)))
X_INIT = PROCESS.sample_prior(jax.random.key(0), (B, 2), jnp.float64)


def _cheap_denoiser(process):
    """A smooth stand-in (remat checks do not depend on the denoiser; it compiles fast)."""
    del process
    return lambda x, t, cond=None: jnp.tanh(x) * (0.5 + t[:, None])


def _losses(x_init, beta_max, grids, names, remat, make_denoiser=_denoiser):
    """Per sampler ``i``: a smooth scalar of its samples from its own ``x_init[i]`` and
    ``beta_max[i]`` (so one gradient of the sum holds every sampler's gradient), and the samples.
    """
    out, values = {}, []
    for i, name in enumerate(names):
        process = processes.VPProcess(beta_max=beta_max[i])
        out[name] = CALLS[name](make_denoiser(process), process, x_init[i], grids[name],
                                remat=remat)
        values.append(jnp.sum(jnp.sin(out[name]) * WEIGHTS))
    return jnp.stack(values), out


def _inputs(names):
    return jnp.stack([X_INIT] * len(names)), jnp.full((len(names),), 20.0), GRIDS


def _grad(names, remat, make_denoiser=_denoiser):
    def total(x, b, g):
        return jnp.sum(_losses(x, b, g, names, remat, make_denoiser)[0])

    return jax.grad(total, argnums=(0, 1, 2))


_fd_values = jax.jit(lambda x, b, g: _losses(x, b, g, FD_NAMES, None)[0], **FAST)


def test_gradients_match_central_differences():
    """x_init (a random direction), the process's beta_max, and an interior grid point."""
    x_all, beta_all, grids = _inputs(FD_NAMES)
    g_x, g_beta, g_ts = jax.jit(_grad(FD_NAMES, None), **FAST)(x_all, beta_all, grids)
    h = 1e-5
    # Losses are O(1): truncation error O(h^2) ~ 1e-10 and round-off ~ 1e-16 / h ~ 1e-11.
    tol = dict(rtol=1e-7, atol=1e-9)
    v = jnp.asarray(np.random.default_rng(1).normal(size=x_all.shape))
    fd_x = (_fd_values(x_all + h * v, beta_all, grids)
            - _fd_values(x_all - h * v, beta_all, grids)) / (2 * h)
    np.testing.assert_allclose(jnp.sum(g_x * v, axis=(1, 2)), fd_x, **tol)

    fd_beta = (_fd_values(x_all, beta_all + h, grids)
               - _fd_values(x_all, beta_all - h, grids)) / (2 * h)
    np.testing.assert_allclose(g_beta, fd_beta, **tol)
    assert np.all(np.abs(np.asarray(g_beta)) > 1e-4)

    k = 3  # an interior grid point (it moves both neighbouring steps), relative step h

    def moved(sign):
        return {n: g.at[k].multiply(1 + sign * h) for n, g in grids.items()}

    d = jnp.stack([grids[n][k] * h for n in FD_NAMES])
    fd_t = (_fd_values(x_all, beta_all, moved(1))
            - _fd_values(x_all, beta_all, moved(-1))) / (2 * d)
    np.testing.assert_allclose(jnp.stack([g_ts[n][k] for n in FD_NAMES]), fd_t, **tol)
    for n in FD_NAMES:
        assert np.all(np.isfinite(np.asarray(g_ts[n]))), n


# -- rematerialisation ----------------------------------------------------------------------------


def test_segment_length_and_validation():
    assert [segment_length("nested", n) for n in (1, 2, 4, 5, 10, 100, 1000)] == [
        1, 2, 2, 3, 4, 10, 32]
    assert segment_length(7, 5) == 5 and segment_length(3, 10) == 3
    assert segment_length(None, 10) is None and segment_length("full", 10) is None
    for bad in ("nest", 0, -2, True, 2.0):
        with pytest.raises(ValueError, match="remat"):
            check_remat(bad)
    ts = timesteps.uniform_t(PROCESS, 4)
    with pytest.raises(ValueError, match="remat"):
        samplers.pf_euler(None, _denoiser(PROCESS), PROCESS, jnp.zeros((2, 2)), ts, remat="yes")


def test_remat_steps_see_identical_indices_times_and_noise():
    """Whatever the segmentation (remainders of 1 and 2 included), step n gets the same input."""
    ts = timesteps.uniform_t(PROCESS, 10, dtype=jnp.float64)

    def step(carry, inp):
        x, log = carry
        return x + inp.noise[0] * (inp.t - inp.s), log + (inp.index + 1) * inp.t + inp.s

    def run(remat):
        return integrate(step, (jnp.zeros((3, 2)), jnp.zeros(())), ts, key=jax.random.key(3),
                         num_draws=1, state_shape=(3, 2), dtype=jnp.float64,
                         record=lambda c: c, remat=remat)

    remats = [None, "full", 3, "nested", 10, 1]  # nested: L = 4
    outs = jax.jit(lambda: [run(r) for r in remats], **FAST)()
    for out in outs[1:]:
        jax.tree.map(np.testing.assert_array_equal, out, outs[0])
    (x, log), (xs, logs) = outs[0]
    assert xs.shape == (10, 3, 2) and logs.shape == (10,)
    np.testing.assert_allclose(log, np.sum(np.arange(1, 11) * ts[:-1] + ts[1:]), rtol=1e-14)


REMATS = (None, "full", 3)  # 3: nested segments of checkpointed steps, plus a remainder


def test_remat_gives_identical_samples_and_gradients():
    x_all, beta_all, grids = _inputs(REMAT_NAMES)
    samples = jax.jit(lambda x, b, g: [_losses(x, b, g, REMAT_NAMES, r)[1] for r in REMATS],
                      **FAST)(x_all, beta_all, grids)  # exact mixture denoiser
    for out in samples[1:]:  # samples: bit for bit
        for name in REMAT_NAMES:
            np.testing.assert_array_equal(out[name], samples[0][name], err_msg=name)
    names = ("dpm_solver_pp_2m", "euler_maruyama")  # (compile time) heun: values and FD only
    grads = jax.jit(
        lambda x, b, g: [_grad(names, r, _cheap_denoiser)(x[:2], b[:2], g) for r in (None, 3)],
        **FAST)(x_all, beta_all, grids)
    # Gradients: the same arithmetic, but XLA compiles a recomputed forward pass in other
    # fusions (vectorised vs scalar exp/log), so the last bits may differ (measured <= 6e-15
    # relative); a shifted noise stream or step index would change them at O(1).
    for grad in grads[1:]:
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(grads[0])):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-13 * float(jnp.max(jnp.abs(b))))


def _mlp_grad_memory(num_steps, remat):
    """Bytes (temp + arguments + outputs) of the compiled gradient through DPM-Solver++."""
    dims = (3, 64, 64, 2)
    params = [(jnp.ones((a, b), jnp.float32) / a, jnp.zeros((1, b), jnp.float32))
              for a, b in zip(dims[:-1], dims[1:])]

    def den(params, x, t):
        h = jnp.concatenate([x, t[:, None].astype(x.dtype)], axis=-1)
        for w, b in params[:-1]:
            h = jnp.tanh(h @ w + b)
        w, b = params[-1]
        return h @ w + b

    ts = timesteps.uniform_t(PROCESS, num_steps, dtype=jnp.float32)

    def loss(params, x):
        out = samplers.dpm_solver_pp(None, lambda x, t, c: den(params, x, t), PROCESS, x, ts,
                                     remat=remat)
        return jnp.mean(out ** 2)

    x = jnp.zeros((64, 2), jnp.float32)
    mem = jax.jit(jax.grad(loss)).lower(params, x).compile().memory_analysis()
    return mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes


def test_nested_remat_memory_grows_sublinearly():
    plain_small = _mlp_grad_memory(8, None)
    nested = [_mlp_grad_memory(n, "nested") for n in (8, 512)]
    # Nested: ~2 sqrt(N) carries of (64, 2) floats plus one step's activations, so 64x the steps
    # cost at most 3x the memory (without remat each step keeps its activations: ~64x), and
    # less than 8 steps without remat.
    assert nested[1] <= 3 * nested[0]
    assert nested[1] < plain_small


# -- learnable grids ------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", ["log_snr", "t"])
@pytest.mark.parametrize("make", ["karras_zero", "uniform_t", "log_snr"])
def test_learnable_grid_reproduces_its_initial_grid(make, axis):
    ts = {
        "karras_zero": lambda: timesteps.karras(PROCESS, 6, final_zero=True, dtype=jnp.float64),
        "uniform_t": lambda: timesteps.uniform_t(PROCESS, 5, dtype=jnp.float64),
        "log_snr": lambda: timesteps.uniform_log_snr(PROCESS, 3, dtype=jnp.float64),
    }[make]()
    grid, params = LearnableGrid.init(PROCESS, ts, axis=axis)
    assert params.shape == (grid.num_params,)
    out = grid.to_grid(params)
    np.testing.assert_allclose(out, ts, rtol=1e-13, atol=0)
    assert out[0] == ts[0] and out[-1] == ts[-1]  # ends exact (0 included)
    # Any parameters give a strictly decreasing grid in range with the same ends.
    rand = grid.to_grid(jnp.asarray(np.random.default_rng(2).normal(size=params.shape) * 3))
    timesteps.check_grid(PROCESS, rand)
    assert rand[0] == ts[0] and rand[-1] == ts[-1]
    with pytest.raises(ValueError, match="params"):
        grid.to_grid(jnp.zeros(params.shape[0] + 1))


def test_learnable_grid_validation_and_pytree():
    with pytest.raises(ValueError, match="axis"):
        LearnableGrid.init(PROCESS, timesteps.uniform_t(PROCESS, 4), axis="sigma")
    with pytest.raises(ValueError, match="decreasing"):
        LearnableGrid.init(PROCESS, jnp.array([0.1, 0.5]))
    grid, params = LearnableGrid.init(PROCESS, timesteps.uniform_t(PROCESS, 4, dtype=jnp.float64))
    leaves, treedef = jax.tree.flatten(grid)
    assert len(leaves) == len(jax.tree.leaves(PROCESS)) + 2  # the process's and the two ends
    ts = jax.jit(lambda g, p: g.to_grid(p))(grid, params)
    np.testing.assert_allclose(ts, grid.to_grid(params), rtol=1e-15)
    with pytest.raises(TypeError, match="optimizer"):
        fit_grid(grid, params, lambda ts, k: jnp.sum(ts), object(), num_iters=2)


class _SGD:
    """A duck-typed optimizer (optax's init/update protocol) with momentum."""

    def __init__(self, lr, momentum=0.9):
        self.lr, self.momentum = lr, momentum

    def init(self, params):
        return jnp.zeros_like(params)

    def update(self, grads, state, params=None):
        state = self.momentum * state + grads
        return -self.lr * state, state


def test_fit_grid_recovers_a_target_grid():
    """Quadratic loss with a known minimiser: another valid grid with the same ends."""
    grid, params = LearnableGrid.init(
        PROCESS, timesteps.uniform_t(PROCESS, 5, final_zero=True, dtype=jnp.float64))
    target = timesteps.karras(PROCESS, 5, final_zero=True, dtype=jnp.float64)

    def loss(ts, key):
        assert key is None
        return jnp.sum(jnp.square(jnp.log(ts[:-1]) - jnp.log(target[:-1])))

    fitted, losses = jax.jit(
        lambda p: fit_grid(grid, p, loss, _SGD(0.5), num_iters=400))(params)
    assert losses.shape == (400,) and losses[0] > 0.1 and losses[-1] < 1e-10
    np.testing.assert_allclose(grid.to_grid(fitted), target, rtol=1e-6)


def test_fit_grid_improves_ddim_on_a_gaussian():
    """3-step DDIM on a Gaussian: the exact PF map is the reference; held-out starts."""
    gauss = analytic.Gaussian.from_cov(jnp.array([0.5, -1.0]),
                                       jnp.array([[1.0, 0.6], [0.6, 0.5]]) * 0.05)
    den = gauss.denoiser(PROCESS)
    ts0 = timesteps.uniform_log_snr(PROCESS, 3, dtype=jnp.float64)
    grid, params = LearnableGrid.init(PROCESS, ts0)

    def error(ts, x_init, mean=True):
        x = samplers.ddim(None, den, PROCESS, x_init, ts, eta=0)
        ref = gauss.flow(PROCESS, x_init, ts0[0], ts0[-1])
        err = jnp.sum(jnp.square(x - ref), axis=-1)
        return jnp.mean(err) if mean else err

    def loss(ts, key):
        return error(ts, PROCESS.sample_prior(key, (64, 2), jnp.float64))

    import optax

    fitted, losses = jax.jit(lambda p: fit_grid(
        grid, p, loss, optax.adam(5e-2), num_iters=150, key=jax.random.key(0)))(params)
    held_out = PROCESS.sample_prior(jax.random.key(99), (2000, 2), jnp.float64)
    before, after = error(ts0, held_out, mean=False), error(grid.to_grid(fitted), held_out,
                                                            mean=False)
    diff = before - after
    se = np.std(diff) / np.sqrt(diff.shape[0])
    assert np.mean(diff) > 5 * se and np.mean(after) < 0.7 * np.mean(before)


# -- long reproductions (run with -m slow) --------------------------------------------------------


@pytest.mark.slow
def test_experiment_learned_grids_beat_hand_designed_quick():
    from experiments.differentiable import grids

    rows = grids.run(quick=True, log=lambda *a: None)
    for row in rows:
        for label, rec in row["eval"].items():
            assert rec["improvement_ci"][0] > 0, (row["nfe"], label, rec)


@pytest.mark.slow
def test_experiment_draft_raises_the_reward(toy2d_run):
    from experiments.differentiable import draft
    from jaxdiff import training

    workdir, _ = toy2d_run
    rec, before, after = draft.run(training.load_model(workdir), quick=True, log=lambda *a: None)
    assert rec["after"]["reward"] > rec["before"]["reward"] + 0.5
    assert rec["after"]["right_fraction"] > rec["before"]["right_fraction"] + 0.2
    assert before.shape == after.shape == (2000, 2)
