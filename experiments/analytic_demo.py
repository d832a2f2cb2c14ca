"""Analytic demo: an exact 2-D mixture, its diffused marginals, the Gaussian flow, and samplers.

Top row: exact samples of an eight-component Gaussian mixture on a ring, and samples and
log-densities of its marginals under the VP process at several times. Bottom row: closed-form
probability-flow trajectories of the moment-matched Gaussian (analytical teleportation), then
five samplers driven by the mixture's exact denoiser, each compared with exact data samples.

Run:  python3 experiments/analytic_demo.py [--out outputs/analytic_demo.png]
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff
from jaxdiff import analytic, metrics


def ring_mixture(num_components=8, radius=2.0, std=0.25):
    """Eight isotropic Gaussians evenly spaced on a circle."""
    angles = 2 * np.pi * np.arange(num_components) / num_components
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return analytic.GaussianMixture.create(
        np.ones(num_components), means, stds=np.full(num_components, std)
    )


def main(out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = time.perf_counter()
    key = jax.random.key(0)
    mixture = ring_mixture()
    vp = jaxdiff.VPProcess()
    times = [0.05, 0.2, 0.35, 0.5, 1.0]

    fig, axes = plt.subplots(2, len(times) + 1, figsize=(3.2 * (len(times) + 1), 6.6))
    lim = 3.5
    grid = np.linspace(-lim, lim, 161)
    xx, yy = np.meshgrid(grid, grid)
    points = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], axis=1))

    data = mixture.sample(jax.random.fold_in(key, 0), 2000)
    axes[0, 0].scatter(data[:, 0], data[:, 1], s=1, alpha=0.5)
    axes[0, 0].set_title("data (exact samples)")
    print(f"{'t':>6} {'sample var':>11} {'exact var':>10} {'mean log p':>11}")
    for i, t in enumerate(times):
        x_t, _ = mixture.sample_marginal(jax.random.fold_in(key, i + 1), vp, t, 2000)
        log_p = mixture.log_prob(vp, points, jnp.full((points.shape[0],), t))
        ax = axes[0, i + 1]
        ax.contourf(xx, yy, np.exp(np.asarray(log_p)).reshape(xx.shape), levels=20, cmap="Blues")
        ax.scatter(x_t[:, 0], x_t[:, 1], s=1, c="k", alpha=0.3)
        ax.set_title(f"VP marginal, t = {t}")
        _, cov = mixture.moments()
        alpha, sigma = float(vp.alpha(t)), float(vp.sigma(t))
        exact_var = alpha**2 * np.trace(cov) / 2 + sigma**2
        mean_log_p = float(jnp.mean(mixture.log_prob(vp, x_t, jnp.full((2000,), t))))
        print(f"{t:6.2f} {float(jnp.var(x_t, axis=0).mean()):11.4f} {exact_var:10.4f} "
              f"{mean_log_p:11.4f}")

    # Closed-form probability-flow trajectories of the moment-matched Gaussian (VP).
    mean, cov = mixture.moments()
    gaussian = analytic.Gaussian.from_cov(mean, cov)
    t_max = float(vp.t_max)
    x_T = vp.sample_prior(jax.random.fold_in(key, 100), (16, 2), jnp.float64)
    ss = np.concatenate([np.geomspace(t_max, float(vp.t_min), 60), [0.0]])
    traj = np.stack([np.asarray(gaussian.flow(vp, x_T, t_max, s)) for s in ss])
    ax = axes[1, 0]
    for k in range(traj.shape[1]):
        ax.plot(traj[:, k, 0], traj[:, k, 1], lw=0.8)
        ax.scatter(traj[-1, k, 0], traj[-1, k, 1], s=8, c="k")
    ax.set_title("closed-form Gaussian PF flow")

    # Samplers on the exact mixture denoiser, compared with exact data samples.
    edm = jaxdiff.EDMProcess()
    runs = [
        ("DDPM, 100 steps", vp, "ddpm", dict(steps=100, grid="uniform_t")),
        ("PF-Euler, 100 steps", vp, "pf_euler", dict(steps=100, grid="uniform_log_snr")),
        ("EDM Heun, 18 steps (35 NFE)", edm, "edm_heun", dict(steps=18)),
        ("DPM-Solver++ 2M, 20 steps", vp, "dpm_solver_pp", dict(steps=20, order=2)),
        ("UniPC bh2 p3, 10 steps", edm, "unipc", dict(steps=10, order=3, variant="bh2")),
    ]
    print(f"\n{'sampler':30s} {'NFE-steps':>9s} {'sliced W2':>10s} {'Gaussian W2':>12s}")
    ref = mixture.sample(jax.random.fold_in(key, 200), 4000)
    ref_mean, ref_cov = metrics.moments(ref)
    for j, (title, process, method, kw) in enumerate(runs):
        fn = jax.jit(lambda k, m=method, p=process, kw=kw: jaxdiff.sample(
            k, mixture.denoiser(p), p, (4000, 2), method=m, dtype=jnp.float64, **kw))
        x = fn(jax.random.fold_in(key, 300 + j))
        sw = float(metrics.sliced_wasserstein(jax.random.key(1), x, ref))
        m, c = metrics.moments(x)
        w2 = float(metrics.gaussian_w2(m, c, ref_mean, ref_cov))
        print(f"{title:30s} {kw['steps']:9d} {sw:10.4f} {w2:12.4f}")
        ax = axes[1, j + 1]
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5)
        ax.set_title(f"{title}\nsliced W2 to data = {sw:.3f}", fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    for ax in axes[0]:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("outputs", "analytic_demo.png"))
    main(parser.parse_args().out)
