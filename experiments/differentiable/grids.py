"""Learned sampler grids vs hand-designed ones on exact 2-D Gaussian-mixture denoisers.

For each NFE, DPM-Solver++(2M) (one denoiser call per step) runs on a grid from ``t_max`` to
``t_min`` of the EDM process; its error is the per-sample distance to the fine-grid solution
(1000 log-SNR steps, float64) from the same prior draw. A
:class:`jaxdiff.timesteps.LearnableGrid` (softplus increments of log-SNR) initialised from the
best hand-designed grid is trained with Adam on the mean error over minibatches of mixture A's
training seeds, then evaluated on held-out seeds of mixture A and on mixture B (never seen in
training), with paired-bootstrap 95% intervals.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdiff
from jaxdiff import analytic, metrics, samplers, timesteps

HAND = ("uniform_t", "uniform_log_snr", "karras")


def mixture_a():
    """Training mixture: 8 narrow Gaussians on a ring of radius 2 (the classic toy)."""
    angles = 2 * np.pi * np.arange(8) / 8
    means = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return analytic.GaussianMixture.create(np.ones(8), means, stds=np.full(8, 0.1))


def mixture_b():
    """Held-out mixture: 5 unequal, anisotropic components at other places and scales."""
    rng = np.random.default_rng(7)
    means = rng.normal(size=(5, 2)) * 1.5
    covs = []
    for s in rng.uniform(0.03, 0.4, size=5):
        a = rng.normal(size=(2, 2))
        q, _ = np.linalg.qr(a)
        covs.append(q @ np.diag([s ** 2, (0.3 * s) ** 2]) @ q.T)
    return analytic.GaussianMixture.create(rng.uniform(0.5, 2.0, 5), means, np.stack(covs))


def _solve(denoiser, process, x_init, ts):
    return samplers.dpm_solver_pp(None, denoiser, process, x_init, ts, order=2)


def make_problem(dist, process, key, num):
    """Prior draws and their fine-grid solutions (the reference)."""
    x_init = process.sample_prior(key, (num, 2), jnp.float64)
    fine = timesteps.uniform_log_snr(process, 1000, dtype=jnp.float64)
    ref = jax.jit(lambda x: _solve(dist.denoiser(process), process, x, fine))(x_init)
    return x_init, ref


def errors(dist, process, x_init, ref, ts):
    """Per-sample Euclidean error ``(num,)`` of DPM-Solver++(2M) on ``ts``."""
    out = _solve(dist.denoiser(process), process, x_init, ts)
    return jnp.sqrt(jnp.sum(jnp.square(out - ref), axis=-1))


def paired_ci(rng, a, b, num_boot):
    """Means of ``a`` and ``b`` and of ``a - b`` with paired-bootstrap 95% intervals."""
    out = metrics.bootstrap(rng, lambda x, y: np.array([x.mean(), y.mean(), (x - y).mean()]),
                            [(np.asarray(a), np.asarray(b))], num_boot=num_boot)
    return out["value"], out["ci_percentile"]


def run(quick=False, seed=0, log=print):
    process = jaxdiff.EDMProcess()
    key = jax.random.key(seed)
    nfes = (4, 6) if quick else (4, 6, 8, 10)
    num_train, num_eval = (1024, 1024) if quick else (8192, 8192)
    iters, batch, lr = (150, 256, 0.05) if quick else (400, 512, 0.03)
    dists = {"A": mixture_a(), "B": mixture_b()}
    train = make_problem(dists["A"], process, jax.random.fold_in(key, 0), num_train)
    evals = {"A held-out seeds": (dists["A"], make_problem(dists["A"], process,
                                                           jax.random.fold_in(key, 1), num_eval)),
             "B (unseen mixture)": (dists["B"], make_problem(dists["B"], process,
                                                            jax.random.fold_in(key, 2), num_eval))}
    err_fn = jax.jit(errors, static_argnums=0)
    rng = np.random.default_rng(seed)
    results = []
    log("\n== learned grids: DPM-Solver++(2M), EDM process, mean error to the fine-grid "
        "solution ==")
    for nfe in nfes:
        hand = {name: samplers.GRIDS[name](process, nfe, dtype=jnp.float64) for name in HAND}
        train_err = {name: float(jnp.mean(err_fn(dists["A"], process, *train, ts)))
                     for name, ts in hand.items()}
        best = min(train_err, key=train_err.get)
        grid, params = timesteps.LearnableGrid.init(process, hand[best])

        def loss(ts, k):
            idx = jax.random.choice(k, num_train, (batch,), replace=False)
            out = _solve(dists["A"].denoiser(process), process, train[0][idx], ts)
            # The evaluation metric itself (mean distance; MSE would let the few samples that
            # switch modes dominate), with a floor inside the sqrt for a finite gradient at 0.
            return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(out - train[1][idx]), axis=-1) + 1e-12))

        start = time.perf_counter()
        fit = jax.jit(lambda p, g=grid, f=loss: timesteps.fit_grid(
            g, p, f, optax.adam(lr), num_iters=iters, key=jax.random.key(seed)))
        params, losses = fit(params)
        learned = grid.to_grid(params)
        seconds = time.perf_counter() - start
        row = dict(nfe=nfe, init=best, train_error_hand=train_err,
                   learned_grid=np.asarray(learned).tolist(), fit_seconds=seconds,
                   loss_first=float(losses[0]), loss_last=float(jnp.mean(losses[-20:])),
                   eval={})
        log(f"NFE {nfe}: init from {best} (train errors "
            + ", ".join(f"{k} {v:.4f}" for k, v in train_err.items())
            + f"); fit {seconds:.1f} s, loss {row['loss_first']:.4f} -> {row['loss_last']:.4f}")
        for label, (dist, (x_init, ref)) in evals.items():
            errs = {name: np.asarray(err_fn(dist, process, x_init, ref, ts))
                    for name, ts in hand.items()}
            best_eval = min(errs, key=lambda n: errs[n].mean())
            learned_err = np.asarray(err_fn(dist, process, x_init, ref, learned))
            value, ci = paired_ci(rng, errs[best_eval], learned_err, 200 if quick else 1000)
            rec = dict(hand={n: float(e.mean()) for n, e in errs.items()}, best_hand=best_eval,
                       best_hand_mean=float(value[0]), best_hand_ci=ci[:, 0].tolist(),
                       learned_mean=float(value[1]), learned_ci=ci[:, 1].tolist(),
                       improvement=float(value[2]), improvement_ci=ci[:, 2].tolist(),
                       # Non-overlapping intervals (stricter than a gain CI excluding 0).
                       beats_by_more_than_ci=bool(ci[1, 1] < ci[0, 0]))
            row["eval"][label] = rec
            log(f"  {label:20s} " + "  ".join(f"{n} {e.mean():.4f}" for n, e in errs.items())
                + f"  | learned {value[1]:.4f} [{ci[0, 1]:.4f}, {ci[1, 1]:.4f}] vs best "
                f"{best_eval} {value[0]:.4f} [{ci[0, 0]:.4f}, {ci[1, 0]:.4f}]; "
                f"gain {value[2]:.4f} [{ci[0, 2]:.4f}, {ci[1, 2]:.4f}]")
        results.append(row)
    return results
