"""Tests of the first-order samplers, the EDM Heun sampler and the shared sampler core.

Ground truth is a 2-D Gaussian with a non-diagonal covariance, whose exact denoiser, marginals
and probability-flow map are known in closed form (:mod:`jaxdiff.analytic`). ``SAMPLERS`` is the
registry (name -> sampler + keyword arguments) that the per-sampler tests parametrize over.

Speed. XLA compilation dominates on CPU: a scan with per-example threefry noise costs ~0.5 s of
CPU to compile and a reverse-mode scan ~1 s; ``xla_backend_optimization_level=0`` halves that,
and one jit holding several scans costs 10-35% less than separate jits. So the runs are grouped:
one jitted *group* per purpose and process type computes every sampler's run at once (e.g. all
``B = 8`` runs on a 9-point Karras grid ending in 0), results are cached and shared by the
tests, and where the noise source is not the subject the noise is passed explicitly (scans
without threefry compile several times faster; the key -> noise streams are pinned separately).
Jitted functions are keyed by process *type*: with JAX 0.10.2, treedefs of
``register_dataclass`` nodes of different classes with the same arity compare equal (see
tests/test_processes.py), so one jit cache shared by two process types can dispatch the wrong
executable.
"""

import dataclasses
import functools
import math

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxdiff import analytic, metrics, processes, samplers, timesteps  # noqa: E402
from jaxdiff.samplers._core import draw_noise, example_keys  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Registry and shared fixtures
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    fn: object
    kwargs: dict
    stochastic: bool
    num_draws: int = 1  # standard-normal draws per step (explicit noise layout)


SAMPLERS = {
    "pf_euler": Spec(samplers.pf_euler, {}, False, 0),
    "euler_maruyama": Spec(samplers.euler_maruyama, {"eta": 1.0}, True),
    "predictor_corrector": Spec(samplers.predictor_corrector, {"norm": "batch"}, True, 2),
    "predictor_corrector_per_example": Spec(
        samplers.predictor_corrector, {"norm": "per_example"}, True, 2
    ),
    "ddim": Spec(samplers.ddim, {"eta": 0}, False, 0),
    "ddim_eta1": Spec(samplers.ddim, {"eta": 1.0}, True),
    "ddpm_fixed_small": Spec(samplers.ddpm, {"variance": "fixed_small"}, True),
    "ddpm_fixed_large": Spec(samplers.ddpm, {"variance": "fixed_large"}, True),
    "euler_ancestral": Spec(samplers.euler_ancestral, {"eta": 1.0}, True),
    "edm_heun": Spec(samplers.edm_heun, {}, False, 0),
    "edm_heun_churn": Spec(samplers.edm_heun, {"s_churn": 10.0}, True),
}
NAMES = list(SAMPLERS)
STOCHASTIC = [n for n in NAMES if SAMPLERS[n].stochastic]
# Batch-independent by contract: every stochastic sampler except norm="batch" PC.
BATCH_INDEPENDENT = [n for n in STOCHASTIC if n != "predictor_corrector"]

FAST = {"xla_backend_optimization_level": 0}  # compile time, not run time, dominates here


def fast_jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=FAST, **kwargs)


MU = np.array([0.5, -0.3])
COV = np.array([[1.0, 0.6], [0.6, 0.8]])
GAUSS = analytic.Gaussian.from_cov(jnp.asarray(MU), jnp.asarray(COV))
GAUSS32 = analytic.Gaussian.from_cov(jnp.asarray(MU, jnp.float32), jnp.asarray(COV, jnp.float32))

PROCESSES = {
    "vp": processes.VPProcess(),
    "edm": processes.EDMProcess(),
    "cosine": processes.CosineVPProcess(),
}
VP = PROCESSES["vp"]
SEED = 2024
KEY = jax.random.key(SEED)
B = 8  # small-run batch
NUM_SMALL = 8  # small-run steps (Karras grid ending in an exact 0)


@functools.cache
def small_grid(pid):
    return timesteps.karras(PROCESSES[pid], NUM_SMALL, final_zero=True)


@functools.cache
def small_init(pid):
    process = PROCESSES[pid]
    x, _ = GAUSS.sample_marginal(jax.random.key(11), process, float(process.t_max), B)
    return x


def denoiser(pid):
    return GAUSS.denoiser(PROCESSES[pid])


def assert_close(a, b, atol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol)


@dataclasses.dataclass(frozen=True)
class Run:
    """One sampler run inside a group: registry entry plus static keyword overrides."""

    label: str
    name: str
    static: tuple = ()  # extra static kwargs as (name, value) pairs


@functools.cache
def _group_jit(runs, ptype, fast=True):
    """One jit computing every run of ``runs`` (labels -> outputs), for one process type.

    Per-run array inputs come in ``dyn[label]``: any of key, x, ts, noise, eta, example_index
    (defaults: the shared key, x and ts).
    """
    del ptype  # part of the cache key only

    def group(key, den, process, x, ts, dyn):
        out = {}
        for run in runs:
            spec = SAMPLERS[run.name]
            d = dict(dyn.get(run.label, {}))
            kwargs = {**spec.kwargs, **dict(run.static), **d}
            run_key, run_x = kwargs.pop("key", key), kwargs.pop("x", x)
            run_ts = kwargs.pop("ts", ts)
            out[run.label] = spec.fn(run_key, den, process, run_x, run_ts, **kwargs)
        return out

    return fast_jit(group) if fast else jax.jit(group)


def run_group(runs, pid, dyn, key=KEY, x=None, ts=None, fast=True):
    process = PROCESSES[pid]
    x = small_init(pid) if x is None else x
    ts = small_grid(pid) if ts is None else ts
    return _group_jit(tuple(runs), type(process), fast)(key, denoiser(pid), process, x, ts, dyn)


def _key_noise(key, batch, num_steps, num_draws, example_index=None):
    """The documented streams: example i, step n draws normal(fold_in(fold_in(key, i), n)).

    Built independently of jaxdiff.samplers._core, shape (num_steps, num_draws, batch, 2).
    """
    index = range(batch) if example_index is None else example_index
    out = np.empty((num_steps, num_draws, batch, 2))
    for b, i in enumerate(index):
        k = jax.random.fold_in(key, int(i))
        for n in range(num_steps):
            out[n, :, b] = np.asarray(jax.random.normal(jax.random.fold_in(k, n), (num_draws, 2)))
    return jnp.asarray(out)


@functools.cache
def key_noise(num_draws):
    """KEY's noise for the B = 8 small runs."""
    return _key_noise(KEY, B, NUM_SMALL, num_draws)


def _noise(seed, num_draws, batch=B, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), (NUM_SMALL, num_draws, batch, 2), dtype)


# ddpm_fixed_large and per-example PC differ from ddpm_fixed_small / batch PC only in a
# coefficient; the final-step logic they share is covered by those.
FINAL_NAMES = [n for n in NAMES if n not in ("ddpm_fixed_large", "predictor_corrector_per_example")]


def _small_runs(pid):
    """Every B = 8 run on the small grid of a process (one compile per process type).

    Labels: ``full/<name>`` (KEY, default example indices), ``trunc/<name>`` (on ts[:-1], with
    KEY's noise for the first N - 1 steps given explicitly), ``etavec/<name>`` (per-example eta),
    ``replay/ddim_eta1``, ``em_eta0``, ``noise/<name>`` (explicit noise, deterministic settings).
    EDM and cosine only get what the identity tests need.
    """
    ts = small_grid(pid)
    runs, dyn = [], {}
    eta = jnp.array([0.3, 1.0] * (B // 2))  # per-example eta: both values in one scan
    for name in ("ddim", "euler_ancestral"):  # eta-vector runs, driven by KEY's noise
        runs.append(Run(f"etavec/{name}", name))
        dyn[f"etavec/{name}"] = {"eta": eta, "noise": key_noise(1)}
    if pid != "vp":
        runs += [Run(f"full/{n}", n) for n in ("ddim_eta1", "ddpm_fixed_small")]
        return tuple(runs), dyn
    runs += [Run(f"full/{n}", n) for n in NAMES if n != "ddpm_fixed_large"]  # KEY's noise
    for name in FINAL_NAMES:  # ts[:-1]; the first N - 1 steps of KEY's noise
        runs.append(Run(f"trunc/{name}", name))
        dyn[f"trunc/{name}"] = {"ts": ts[:-1]}
        if SAMPLERS[name].stochastic:
            dyn[f"trunc/{name}"]["noise"] = key_noise(SAMPLERS[name].num_draws)[:-1]
    # KEY's noise given explicitly (built with the core helpers) with another key.
    runs.append(Run("replay/ddim_eta1", "ddim_eta1"))
    keys = example_keys(KEY, B)
    noise = jnp.stack([draw_noise(keys, n, 1, (2,), jnp.float64) for n in range(NUM_SMALL)])
    dyn["replay/ddim_eta1"] = {"key": jax.random.key(99), "noise": noise}
    runs.append(Run("em_eta0", "euler_maruyama", (("eta", 0.0),)))
    dyn["em_eta0"] = {"noise": _noise(4, 1), "key": None}
    for name in ("ddim", "edm_heun"):  # explicit noise with deterministic settings
        runs.append(Run(f"noise/{name}", name))
        dyn[f"noise/{name}"] = {"noise": _noise(8, 1)}
    return tuple(runs), dyn


@functools.cache
def small_group(pid, seed=SEED):
    runs, dyn = _small_runs(pid)
    out = run_group(runs, pid, dyn, key=jax.random.key(seed))
    return {k: np.asarray(v) for k, v in out.items()}


def full_run(name, pid):
    return small_group(pid)[f"full/{name}"]


# ------------------------------------------------------------------------------------------------
# 1. Convergence order of the deterministic samplers against the closed-form flow map
# ------------------------------------------------------------------------------------------------

CONV_NS = (16, 32, 64, 128)
CONV_CASES = {  # process -> (grid, {sampler: order})
    "edm": (timesteps.karras, {"pf_euler": 1, "ddim": 1, "edm_heun": 2}),
    "vp": (timesteps.uniform_log_snr, {"ddim": 1, "edm_heun": 2}),
}


@functools.cache
def convergence_table(pid):
    """Max abs error at t_min vs the exact PF map, for every sampler and N (one compile)."""
    process = PROCESSES[pid]
    grid, orders = CONV_CASES[pid]
    t_max, t_min = float(process.t_max), float(process.t_min)
    x_T, _ = GAUSS.sample_marginal(jax.random.key(3), process, t_max, 32)
    ref = GAUSS.flow(process, x_T, t_max, t_min)
    grids = tuple(grid(process, n) for n in CONV_NS)

    @fast_jit
    def errors(den, process, x_T, ref, grids):
        return {
            name: jnp.stack([
                jnp.max(jnp.abs(SAMPLERS[name].fn(None, den, process, x_T, ts,
                                                  **SAMPLERS[name].kwargs) - ref))
                for ts in grids
            ])
            for name in orders
        }

    table = {k: np.asarray(v) for k, v in errors(GAUSS.denoiser(process), process, x_T, ref,
                                                 grids).items()}
    lines = [f"{pid} ({grid.__name__}) max |x - flow|:  N = {CONV_NS}"]
    for name, errs in table.items():
        slope = -np.polyfit(np.log(CONV_NS), np.log(errs), 1)[0]
        lines.append(f"  {name:9s} " + "  ".join(f"{e:.3e}" for e in errs) + f"  slope {slope:.3f}")
    print("\n".join(lines))
    return table


@pytest.mark.parametrize(
    "pid, name", [(pid, name) for pid, (_, orders) in CONV_CASES.items() for name in orders]
)
def test_convergence_order(pid, name):
    table = convergence_table(pid)
    errs = table[name]
    order = CONV_CASES[pid][1][name]
    slope = -np.polyfit(np.log(CONV_NS), np.log(errs), 1)[0]
    print(f"{pid} {name}: errors {errs}, fitted order {slope:.3f} (expected {order})")
    assert np.all(np.isfinite(errs))
    assert np.all(np.diff(errs) < 0), errs
    assert slope >= order - 0.2, (slope, errs)
    assert slope <= order + 0.5, (slope, errs)  # a much larger slope means a broken reference
    assert errs[-1] < (0.1 if order == 1 else 0.01), errs


def test_ddim_eta0_equals_pf_euler_for_edm():
    # For EDMProcess (alpha = 1, sigma = t) DDIM(0) is Euler in sigma, i.e. pf_euler.
    edm = convergence_table("edm")
    np.testing.assert_allclose(edm["ddim"], edm["pf_euler"], rtol=1e-10)


# ------------------------------------------------------------------------------------------------
# 2. Noise streams and identities between samplers (float64)
# ------------------------------------------------------------------------------------------------


def test_core_noise_helpers_follow_documented_streams():
    # draw_noise / example_keys give normal(fold_in(fold_in(key, i), n)) for example i, step n.
    default = draw_noise(example_keys(KEY, B), 5, 2, (2,), jnp.float64)  # indices arange(B)
    assert default.shape == (2, B, 2)
    assert_close(default, key_noise(2)[5], 0)
    idx = jnp.arange(B)[::-1]
    assert_close(draw_noise(example_keys(KEY, B, idx), 5, 2, (2,), jnp.float64),
                 key_noise(2)[5][:, ::-1], 0)
    with pytest.raises(ValueError, match="example_index"):
        example_keys(KEY, 4, idx)


def test_explicit_noise_replays_key_noise():
    # DDIM(1) with explicit noise built by example_keys + draw_noise from KEY, but called with
    # another key, equals the KEY run: the explicit noise is used, and it is the key's noise.
    # (The final-step tests also replay KEY's noise for every stochastic sampler, 1 and 2 draws.)
    runs = small_group("vp")
    assert_close(runs["replay/ddim_eta1"], runs["full/ddim_eta1"], 1e-12)


over_identity_processes = pytest.mark.parametrize("pid", ["vp", "edm", "cosine"])


@over_identity_processes
def test_ddim_eta1_equals_ddpm_fixed_small(pid):
    assert float(small_grid(pid)[-1]) == 0.0  # ... including the final step to an exact 0
    ddim1 = full_run("ddim_eta1", pid)  # same key => same noise streams
    assert np.all(np.isfinite(ddim1))
    # One step function for both: equal bit for bit, not just to round-off.
    np.testing.assert_array_equal(ddim1, full_run("ddpm_fixed_small", pid))


def test_ddpm_fixed_large_differs():
    runs = stat_runs()[0]  # same explicit noise
    assert not np.allclose(runs["ddpm_fixed_large"], runs["ddpm_fixed_small"], atol=1e-3)


@over_identity_processes
def test_ddim_equals_euler_ancestral(pid):
    runs = small_group(pid)
    assert_close(runs["etavec/ddim"], runs["etavec/euler_ancestral"], 1e-10)  # eta 0.3 and 1
    # The eta = 1 rows are the key-driven DDIM(1) rows; the eta = 0.3 rows differ from them.
    ddim1 = full_run("ddim_eta1", pid)
    assert_close(runs["etavec/ddim"][1::2], ddim1[1::2], 1e-10)
    assert not np.allclose(runs["etavec/ddim"][0::2], ddim1[0::2], atol=1e-3)
    if pid == "vp":  # scalar eta = 1 with the key
        assert_close(full_run("euler_ancestral", pid), ddim1, 1e-10)


def test_ddpm_matches_ho_et_al_on_a_discrete_table():
    # Ho et al. (2020) / diffusers DDPMScheduler.step on a respaced table (stride 20, so the
    # "current beta" 1 - abar_t / abar_prev is used), from the beta table in float64 numpy:
    #   x_prev = sqrt(abar_prev) b / (1 - abar_t) x0 + sqrt(1 - b) (1 - abar_prev) / (1 - abar_t) x
    #            + sqrt(var) z,  var = (1 - abar_prev) / (1 - abar_t) b (small) or b (large).
    process = processes.DiscreteVPProcess.create(1000, "linear")
    ts = timesteps.ddpm(process, 50, spacing="trailing")[:7]  # 6 steps from t = 1
    idx = np.rint(np.asarray(ts) * 1000).astype(int) - 1
    abar = np.cumprod(1.0 - np.asarray(process.betas))
    x = np.asarray(small_init("vp"))
    noise = _noise(12, 1)[:6]
    den = GAUSS.denoiser(process)
    lam, u = np.linalg.eigh(COV)

    def posterior_mean(x, a):  # E[x0 | x_t = x] for alpha = a, sigma^2 = 1 - a^2
        return MU + ((x - a * MU) @ u * (a * lam / (a**2 * lam + 1 - a**2))) @ u.T

    @fast_jit
    def run(den, process, x, ts, noise):
        return [samplers.ddpm(None, den, process, x, ts, variance=v, noise=noise)
                for v in ("fixed_small", "fixed_large")]

    got = run(den, process, jnp.asarray(x), ts, noise)
    for variance, out in zip(("fixed_small", "fixed_large"), got):
        ref = x
        for n in range(6):
            a_t, a_p = abar[idx[n]], abar[idx[n + 1]]
            b = 1.0 - a_t / a_p
            x0 = posterior_mean(ref, np.sqrt(a_t))
            mean = (np.sqrt(a_p) * b / (1 - a_t) * x0
                    + np.sqrt(1 - b) * (1 - a_p) / (1 - a_t) * ref)
            var = (1 - a_p) / (1 - a_t) * b if variance == "fixed_small" else b
            ref = mean + np.sqrt(var) * np.asarray(noise[n, 0])
        assert_close(out, ref, 1e-10)


def test_euler_maruyama_eta0_equals_pf_euler():
    assert_close(small_group("vp")["em_eta0"], full_run("pf_euler", "vp"), 1e-10)


# ------------------------------------------------------------------------------------------------
# 3. A final exact 0 returns the denoiser output at the last positive time
# ------------------------------------------------------------------------------------------------


def _langevin_reference(process, den, x, t, z, snr, norm):
    """One Langevin corrector step of Song et al. (2021), alpha_i = 1, from its definition."""
    tb = jnp.full((x.shape[0],), t)
    score = (process.alpha(t) * den(x, tb) - x) / process.sigma(t) ** 2
    nz, ns = jnp.linalg.norm(z, axis=1), jnp.linalg.norm(score, axis=1)
    ratio = jnp.mean(nz) / jnp.mean(ns) if norm == "batch" else nz / ns
    eps = 2.0 * (snr * ratio) ** 2 * jnp.ones((x.shape[0],))
    return x + eps[:, None] * score + jnp.sqrt(2.0 * eps)[:, None] * z


def _expected_final(name, pid, x_prev, ts):
    """What the step from ts[-2] to an exact 0 should return, from the state at ts[-2]."""
    process, den = PROCESSES[pid], denoiser(pid)
    t, num_steps, last = ts[-2], ts.shape[0] - 1, ts.shape[0] - 2
    x_prev = jnp.asarray(x_prev)
    if name.startswith("predictor_corrector"):  # the corrector runs before the last step
        z = key_noise(2)[last, 1]
        x_prev = _langevin_reference(process, den, x_prev, t, z, 0.16,
                                     SAMPLERS[name].kwargs["norm"])
    elif name == "edm_heun_churn":  # churn (Karras Alg. 2 line 5) also applies at the last step
        gamma = min(SAMPLERS[name].kwargs["s_churn"] / num_steps, math.sqrt(2) - 1)
        z = key_noise(1)[last, 0]
        n_t = process.noise_level(t)
        n_hat = n_t * (1 + gamma)
        t_hat = process.t_from_noise_level(n_hat)
        x_hat = x_prev / process.alpha(t) + jnp.sqrt(n_hat**2 - n_t**2) * z
        return den(process.alpha(t_hat) * x_hat, jnp.full((B,), t_hat))
    return den(x_prev, jnp.full((B,), t))


@pytest.mark.parametrize("name", FINAL_NAMES)
def test_final_exact_zero_returns_denoiser_output(name):
    ts = small_grid("vp")
    assert float(ts[-1]) == 0.0
    if name == "edm_heun_churn":  # gamma is capped for both N and N - 1 steps: same churn
        assert SAMPLERS[name].kwargs["s_churn"] / (NUM_SMALL - 1) > math.sqrt(2) - 1
    runs = small_group("vp")
    full, trunc = runs[f"full/{name}"], runs[f"trunc/{name}"]  # same noise for N - 1 steps
    assert full.shape == trunc.shape == (B, 2) and full.dtype == np.float64
    expected = _expected_final(name, "vp", trunc, ts)
    assert_close(full, expected, 1e-12 if not SAMPLERS[name].stochastic else 1e-10)
    # Not vacuous: the final output is not the pre-final state.
    assert np.max(np.abs(full - trunc)) > 1e-4


# ------------------------------------------------------------------------------------------------
# 4. Batch independence, chunking, vmap over keys, explicit noise
# ------------------------------------------------------------------------------------------------

BATCH_NAMES = [n for n in STOCHASTIC if n != "ddpm_fixed_large"]  # includes both PC norms


@functools.cache
def small_batch_group(start):
    """Rows start:start+4 of the small init as their own batch with global example indices."""
    runs = tuple(Run(f"small/{n}", n) for n in BATCH_NAMES)
    idx = jnp.arange(start, start + 4)
    out = run_group(runs, "vp", {r.label: {"example_index": idx} for r in runs},
                    x=small_init("vp")[start:start + 4])
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("name", [n for n in BATCH_NAMES if n in BATCH_INDEPENDENT])
def test_batch_independence_and_chunking(name):
    full = full_run(name, "vp")  # batch 8, default indices arange(8)
    assert_close(small_batch_group(0)[f"small/{name}"], full[:4], 1e-10)  # batch 4 = rows 0:4
    assert_close(small_batch_group(4)[f"small/{name}"], full[4:], 1e-10)  # chunk 4:8


def test_predictor_corrector_batch_norm_is_batch_dependent():
    full = full_run("predictor_corrector", "vp")
    diff = np.max(np.abs(small_batch_group(0)["small/predictor_corrector"] - full[:4]))
    assert diff > 1e-6, "norm='batch' should couple the examples of a batch"
    # ... while norm="per_example" is not (also in test_batch_independence_and_chunking).
    assert_close(small_batch_group(0)["small/predictor_corrector_per_example"],
                 full_run("predictor_corrector_per_example", "vp")[:4], 1e-10)


def test_vmap_over_keys_equals_separate_calls():
    seeds = (SEED, 5, 6)
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    spec = SAMPLERS["ddpm_fixed_small"]
    vmapped = fast_jit(jax.vmap(functools.partial(spec.fn, **spec.kwargs),
                                in_axes=(0, None, None, None, None)))
    got = np.asarray(vmapped(keys, denoiser("vp"), VP, small_init("vp"), small_grid("vp")))
    assert got.shape == (3, B, 2)
    for i, seed in enumerate(seeds):  # separate (unbatched) calls of the compiled group
        assert_close(got[i], small_group("vp", seed)["full/ddpm_fixed_small"], 1e-12)
    assert not np.allclose(got[0], got[1], atol=1e-3)


def test_constant_and_traced_grids_give_the_same_bits():
    # Step coefficients are computed for the whole grid before the loop; XLA would constant-fold
    # them for a closed-over grid with its own exp/log, changing last bits. float32 state.
    process = PROCESSES["edm"]
    ts = timesteps.karras(process, 6, final_zero=True, dtype=jnp.float32)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2)) * 80.0, jnp.float32)
    den = GAUSS32.denoiser(process)
    fns = {n: functools.partial(SAMPLERS[n].fn, **SAMPLERS[n].kwargs)
           for n in ("pf_euler", "euler_maruyama", "ddim_eta1", "ddpm_fixed_large",
                     "euler_ancestral", "edm_heun", "edm_heun_churn")}
    fns.update({
        "dpm_3m": functools.partial(samplers.dpm_solver_pp, order=3),
        "dpm_2m_sde": functools.partial(samplers.dpm_solver_pp_sde, order=2),
        "unipc_3": functools.partial(samplers.unipc, order=3),
    })

    def run_all(x, ts):
        return {n: fn(KEY, den, process, x, ts) for n, fn in fns.items()}

    traced = jax.jit(run_all)(x, ts)
    constant = jax.jit(lambda x: run_all(x, ts))(x)
    for n in fns:
        assert traced[n].dtype == jnp.float32
        np.testing.assert_array_equal(constant[n], traced[n], err_msg=n)


@pytest.mark.parametrize("name", STOCHASTIC)
@pytest.mark.parametrize("which", ["steps", "draws", "batch", "rank"])
def test_explicit_noise_of_wrong_shape(name, which):
    spec = SAMPLERS[name]
    shape = {"steps": (NUM_SMALL - 1, spec.num_draws, B, 2),
             "draws": (NUM_SMALL, spec.num_draws + 1, B, 2),
             "batch": (NUM_SMALL, spec.num_draws, B + 1, 2),
             "rank": (NUM_SMALL, B, 2)}[which]
    with pytest.raises(ValueError, match="noise"):
        spec.fn(KEY, denoiser("vp"), VP, small_init("vp"), small_grid("vp"),
                noise=jnp.zeros(shape), **spec.kwargs)


def test_noise_with_deterministic_settings():
    # pf_euler takes no noise at all.
    with pytest.raises(TypeError, match="noise"):
        samplers.pf_euler(KEY, denoiser("vp"), VP, small_init("vp"), small_grid("vp"),
                          noise=_noise(8, 1))
    runs = small_group("vp")
    # DDIM(eta=0) and churn-free Heun accept explicit noise; it enters with zero weight.
    assert_close(runs["noise/ddim"], runs["full/ddim"], 1e-12)
    assert_close(runs["noise/edm_heun"], runs["full/edm_heun"], 1e-12)
    # (With eta > 0 the given noise is used, not the key's: test_explicit_noise_replays_key_noise.)


# ------------------------------------------------------------------------------------------------
# 5. Statistical correctness of the stochastic samplers (VP, 2-D Gaussian)
# ------------------------------------------------------------------------------------------------

STAT_N = 4096
STAT_STEPS = 500
STAT_NAMES = ["euler_maruyama", "ddpm_fixed_small", "ddpm_fixed_large", "ddim_eta1",
              "euler_ancestral", "edm_heun_churn", "predictor_corrector"]
# The noise is explicit (standard normals from a fixed key): the key -> noise mapping is pinned
# by the stream tests above, and scans without threefry compile several times faster.
#
# Discretisation allowance on covariance entries (and means), from the exact law of each
# sampler's output: for Gaussian data every step is affine in (x, z), so propagating the mean and
# covariance through the 500-step uniform grid (Jacobians wrt x_T and the explicit noise) gives
# the bias exactly. |bias of a covariance entry| on this grid, for the target's entries ~1:
#   ddpm fixed_small = ddim(1) = euler_ancestral: 0.017 (first order in the step: 0.035 at 200,
#   0.076 at 100 steps -- the posterior variance omits Var[x0 | x_t]); euler_maruyama 0.0027;
#   ddpm fixed_large 0.002; edm_heun churn < 0.001. Mean bias <= 6e-4 (euler_maruyama).
# predictor_corrector (batch norm, not affine): an 8192-sample run at 500 steps is within
# 0.013 (1 SE) of the target. 4 SE of a covariance entry at n = 4096 is 0.05-0.09.
COV_ALLOWANCE = 0.02
MEAN_ALLOWANCE = 1e-3
LANGEVIN_T = 0.3


@functools.cache
def stat_runs():
    """All statistical runs in one compile: the 7 samplers from x_T, and the Langevin run."""
    ts = timesteps.uniform_t(VP, STAT_STEPS)
    x_T, _ = GAUSS.sample_marginal(jax.random.key(21), VP, float(VP.t_max), STAT_N)
    noise = jax.random.normal(jax.random.key(22), (STAT_STEPS, 2, STAT_N, 2), jnp.float64)
    # Langevin only: a grid of total length 1e-7 at LANGEVIN_T, from an exact marginal sample.
    ts_langevin = jnp.linspace(LANGEVIN_T, LANGEVIN_T - 1e-7, STAT_STEPS + 1)
    x_langevin, _ = GAUSS.sample_marginal(jax.random.key(23), VP, LANGEVIN_T, STAT_N)
    runs = [Run(name, name) for name in STAT_NAMES] + [Run("langevin", "predictor_corrector")]
    dyn = {name: {"noise": noise[:, :SAMPLERS[name].num_draws]} for name in STAT_NAMES}
    dyn["langevin"] = {"noise": jnp.flip(noise, axis=2), "x": x_langevin, "ts": ts_langevin}
    # Default optimisation: here run time (8 x 500 steps x 4096 examples) matters too.
    out = run_group(runs, "vp", dyn, key=None, x=x_T, ts=ts, fast=False)
    out = {k: np.asarray(v) for k, v in out.items()}
    return out, np.asarray(x_langevin), np.asarray(noise[0, 1])


def _se_mean_cov(cov, n):
    var = np.diag(cov)
    se_mean = np.sqrt(var / n)
    se_cov = np.sqrt((np.outer(var, var) + cov**2) / n)  # Var of a Gaussian sample covariance
    return se_mean, se_cov


def _check_moments(x, target, allowance_mean, allowance_cov, label):
    mean, cov = x.mean(axis=0), np.cov(x.T)
    se_mean, se_cov = _se_mean_cov(target[1], x.shape[0])
    z_mean = (mean - target[0]) / se_mean
    z_cov = (cov - target[1]) / se_cov
    print(f"{label}: mean z {np.round(z_mean, 2)}, cov z {np.round(z_cov.ravel(), 2)}, "
          f"cov err {np.round((cov - target[1]).ravel(), 4)}")
    assert np.all(np.abs(mean - target[0]) <= 4 * se_mean + allowance_mean), (mean, target[0])
    assert np.all(np.abs(cov - target[1]) <= 4 * se_cov + allowance_cov), (cov, target[1])


@pytest.mark.parametrize("name", STAT_NAMES)
def test_stochastic_sampler_matches_marginal(name):
    out = stat_runs()[0][name]
    assert out.shape == (STAT_N, 2) and np.all(np.isfinite(out))
    a, s = float(VP.alpha(VP.t_min)), float(VP.sigma(VP.t_min))
    target = (a * MU, a**2 * COV + s**2 * np.eye(2))  # exact marginal at ts[-1] = t_min
    _check_moments(out, target, MEAN_ALLOWANCE, COV_ALLOWANCE, name)


def test_langevin_corrector_keeps_marginal():
    # The grid has 500 steps of total length 1e-7: the predictor does nothing and 500 Langevin
    # steps (norm="batch") mix an exact marginal sample to the corrector's stationary law. For a
    # Gaussian N(m, C) the unadjusted Langevin step x + e s + sqrt(2e) z with fixed e leaves
    # N(m, U diag(l / (1 - e / (2 l))) U^T) invariant (l: eigenvalues of C): compare to that
    # within 4 SE. e = 2 (snr E|z| / E|score|)^2 ~ 0.05 is estimated from the start sample.
    runs, x0, z = stat_runs()
    a, s = float(VP.alpha(LANGEVIN_T)), float(VP.sigma(LANGEVIN_T))
    m, c = a * MU, a**2 * COV + s**2 * np.eye(2)
    score = -np.linalg.solve(c, (x0 - m).T).T
    eps = 2 * (0.16 * np.linalg.norm(z, axis=1).mean() / np.linalg.norm(score, axis=1).mean())**2
    lam, u = np.linalg.eigh(c)
    c_ula = (u * (lam / (1 - eps / (2 * lam)))) @ u.T
    out = runs["langevin"]
    _check_moments(out, (m, c_ula), 0.0, 0.0, f"langevin (eps {eps:.4f})")
    # Not vacuous: the corrector moved the samples by O(1) (500 steps of size ~sqrt(2 eps)).
    assert np.mean(np.abs(out - x0)) > 0.3


# ------------------------------------------------------------------------------------------------
# 6. bfloat16 and float32 states
# ------------------------------------------------------------------------------------------------

BF16_N = 4096


@fast_jit
def _w2_to_target(x):
    mean, cov = metrics.moments(x)
    return metrics.gaussian_w2(mean, cov, jnp.asarray(MU, jnp.float32),
                               jnp.asarray(COV, jnp.float32))


@functools.cache
def bf16_runs(pid):
    """ddim(0) and Heun in float32 and bfloat16 on a 50-step Karras grid, one compile."""
    process = PROCESSES[pid]
    ts = timesteps.karras(process, 50, final_zero=True, dtype=jnp.float32)
    x, _ = GAUSS32.sample_marginal(jax.random.key(31), process, float(process.t_max), BF16_N)

    @fast_jit
    def run(den, process, x, ts):
        return {(name, dtype.__name__): SAMPLERS[name].fn(None, den, process, x.astype(dtype), ts)
                for name in ("ddim", "edm_heun") for dtype in (jnp.float32, jnp.bfloat16)}

    out = run(GAUSS32.denoiser(process), process, x, ts)
    w2 = {k: float(_w2_to_target(v.astype(jnp.float32))) for k, v in out.items()}
    return out, w2


@pytest.mark.parametrize("pid", ["vp", "edm"])
@pytest.mark.parametrize("name", ["ddim", "edm_heun"])
def test_bfloat16_state(pid, name):
    out, w2 = bf16_runs(pid)
    lo, hi = out[name, "bfloat16"], out[name, "float32"]
    assert lo.dtype == jnp.bfloat16 and hi.dtype == jnp.float32
    assert lo.shape == hi.shape == (BF16_N, 2)
    assert bool(jnp.all(jnp.isfinite(lo)))
    w2_lo, w2_hi = w2[name, "bfloat16"], w2[name, "float32"]
    print(f"{pid} {name}: W2 to N(mu, Sigma): bfloat16 {w2_lo:.4f}, float32 {w2_hi:.4f}")
    floor = 0.01  # below Monte-Carlo resolution at n = 4096 (sqrt(tr C / n) ~ 0.02)
    assert w2_lo <= 2 * w2_hi or max(w2_lo, w2_hi) < floor
    assert w2_hi < 0.1  # the float32 run itself is close to N(mu, Sigma)


def test_bfloat16_pf_euler_1000_steps_finite():
    ts = timesteps.karras(VP, 1000, final_zero=True, dtype=jnp.float32)
    x, _ = GAUSS32.sample_marginal(jax.random.key(32), VP, float(VP.t_max), 64)
    out = fast_jit(samplers.pf_euler)(None, GAUSS32.denoiser(VP), VP, x.astype(jnp.bfloat16), ts)
    assert out.dtype == jnp.bfloat16 and out.shape == (64, 2)
    assert bool(jnp.all(jnp.isfinite(out)))


# ------------------------------------------------------------------------------------------------
# 7. Differentiability
# ------------------------------------------------------------------------------------------------

GRAD_NAMES = ["pf_euler", "euler_maruyama", "predictor_corrector", "ddim", "ddpm_fixed_small",
              "euler_ancestral", "edm_heun"]  # one entry per sampler function


@functools.cache
def grads_float32():
    """Per sampler, grads of one scalar loss wrt x_init, a traced grid (ending in 0) and the
    parameter of a toy denoiser ``params["a"] * x``, float32, all in one compile."""
    ts = timesteps.karras(VP, NUM_SMALL, final_zero=True, dtype=jnp.float32)
    x = small_init("vp")[:4].astype(jnp.float32)
    w = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2)), jnp.float32)
    noise = {d: _noise(9, d, batch=4, dtype=jnp.float32) for d in (1, 2)}

    def loss(x, ts, params, name):
        spec = SAMPLERS[name]
        kwargs = dict(spec.kwargs)
        if spec.stochastic:  # explicit noise: no threefry in the compiled gradient
            kwargs["noise"] = noise[spec.num_draws]

        def den(x, t, cond=None):
            return params["a"] * x

        return jnp.sum(w * spec.fn(None, den, VP, x, ts, **kwargs))

    @fast_jit
    def all_grads(x, ts, params):
        return {n: jax.grad(loss, argnums=(0, 1, 2))(x, ts, params, n) for n in GRAD_NAMES}

    return all_grads(x, ts, {"a": jnp.asarray(0.7, jnp.float32)})


@pytest.mark.parametrize("name", GRAD_NAMES)
def test_grad_wrt_x_init_grid_and_denoiser_params(name):
    gx, gts, gp = grads_float32()[name]
    assert gx.dtype == jnp.float32 and gx.shape == (4, 2)
    assert bool(jnp.all(jnp.isfinite(gx))), gx
    assert float(jnp.max(jnp.abs(gx))) > 0
    assert gts.shape == (NUM_SMALL + 1,)
    assert bool(jnp.all(jnp.isfinite(gts))), gts  # a traced grid, including its final 0
    assert float(jnp.max(jnp.abs(gts[:-1]))) > 0
    assert np.isfinite(float(gp["a"])) and abs(float(gp["a"])) > 0


def test_grad_wrt_process_parameter_matches_central_differences():
    ts = timesteps.uniform_log_snr(VP, 20)
    x = small_init("vp")
    w = jnp.asarray(np.random.default_rng(1).normal(size=x.shape))

    def loss(beta_max):
        process = processes.VPProcess(beta_max=beta_max)
        return jnp.sum(w * samplers.ddim(None, GAUSS.denoiser(process), process, x, ts, eta=0))

    value_and_grad = fast_jit(jax.value_and_grad(loss))
    _, grad = value_and_grad(20.0)
    h = 1e-3
    plus, _ = value_and_grad(20.0 + h)
    minus, _ = value_and_grad(20.0 - h)
    fd = (float(plus) - float(minus)) / (2 * h)
    print(f"dL/dbeta_max: autodiff {float(grad):.10f}, central difference {fd:.10f}")
    assert np.isfinite(float(grad)) and abs(float(grad)) > 1e-4
    np.testing.assert_allclose(float(grad), fd, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# 8. jit: no recompilation when only values change
# ------------------------------------------------------------------------------------------------


def test_no_retrace_when_grid_values_or_process_fields_change():
    traces = []

    @fast_jit
    def run(process, x, ts):
        traces.append(1)  # runs only while tracing
        return samplers.pf_euler(None, GAUSS.denoiser(process), process, x, ts)

    x = small_init("vp")[:4]
    ts1 = timesteps.uniform_t(VP, 6)
    ts2 = timesteps.karras(VP, 6)
    a = run(VP, x, ts1)
    b = run(VP, x, ts2)
    c = run(processes.VPProcess(beta_min=0.2, beta_max=15.0), x, ts1)
    assert len(traces) == 1
    for other in (b, c):
        assert not np.allclose(np.asarray(a), np.asarray(other), atol=1e-3)


# ------------------------------------------------------------------------------------------------
# 9. Bad input
# ------------------------------------------------------------------------------------------------


def _call_eager(name, x=None, ts=None, **kwargs):
    spec = SAMPLERS[name]
    x = small_init("vp") if x is None else x
    ts = small_grid("vp") if ts is None else ts
    return spec.fn(KEY, denoiser("vp"), VP, x, ts, **{**spec.kwargs, **kwargs})


BAD_GRIDS = {
    "increasing": ([1e-3, 0.5, 1.0], "strictly decreasing"),
    "nan": ([1.0, np.nan, 1e-3], "finite"),
    "inf": ([np.inf, 0.5, 1e-3], "finite"),
    "above_t_max": ([1.5, 0.5, 1e-3], "t_min, t_max"),
    "below_t_min": ([1.0, 0.5, 1e-5], "t_min, t_max"),
    "one_point": ([1.0], "at least 2 points"),
    "two_d": ([[1.0, 0.5], [0.2, 0.1]], "1-D"),
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", list(BAD_GRIDS))
def test_bad_grid(name, case):
    ts, match = BAD_GRIDS[case]
    with pytest.raises(ValueError, match=match) as info:
        _call_eager(name, ts=jnp.asarray(ts))
    assert str(info.value).startswith("ts ")


@pytest.mark.parametrize("name", NAMES)
def test_bad_x_init(name):
    with pytest.raises(ValueError, match="x_init"):
        _call_eager(name, x=jnp.asarray(0.5))  # no batch axis
    with pytest.raises(TypeError, match="x_init"):
        _call_eager(name, x=jnp.ones((B, 2), jnp.int32))
    with pytest.raises(ValueError, match="x_init"):
        _call_eager(name, x=small_init("vp").at[0, 0].set(jnp.nan))


def test_bad_options():
    with pytest.raises(ValueError, match="variance"):
        _call_eager("ddpm_fixed_small", variance="learned_range")
    with pytest.raises(ValueError, match="norm"):
        _call_eager("predictor_corrector", norm="global")
    with pytest.raises(ValueError, match="num_corrector_steps"):
        _call_eager("predictor_corrector", num_corrector_steps=-1)


def test_bad_denoiser_output_shape():
    def den(x, t, cond=None):
        return x[:, :1]

    with pytest.raises(ValueError, match="denoiser"):
        samplers.ddim(KEY, den, VP, small_init("vp"), small_grid("vp"))


def test_stochastic_sampler_needs_key_or_noise():
    with pytest.raises((ValueError, TypeError), match="key"):
        samplers.ddpm(None, denoiser("vp"), VP, small_init("vp"), small_grid("vp"))
