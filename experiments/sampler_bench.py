"""Sampler benchmark: accuracy vs NFE on exact distributions, and the cost of the scan.

Accuracy (float64, EDM process, exact denoisers):
  * endpoint error vs the closed-form probability flow of one 64-D Gaussian (deterministic
    methods, integrated to t_min);
  * sliced Wasserstein and Gaussian W2 between samples and exact data samples for a 2-D ring
    mixture and a 64-D mixture (grids ending in an exact 0), with the same distances between
    independent exact samples as the noise floor.
Speed (float32, 64-D Gaussian denoiser, N = 100 steps; the functions compared are timed in
alternation, 21 rounds, and ratios are medians of within-round ratios):
  * DDIM vs the same lax.scan calling only the denoiser (B = 16 and 4096);
  * DDIM vs a Python loop of jitted steps, and PF-Euler vs diffrax's Euler on the same grid;
  * compile time (lower + compile, 7 alternating rounds) for 10 and 1000 steps.

Run:  python3 experiments/sampler_bench.py [--quick] [--out outputs/sampler_bench]
Writes OUT.json and OUT.png and prints the tables.
"""

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff
from jaxdiff import analytic, metrics, samplers, timesteps

DETERMINISTIC = [
    ("pf_euler", {}),
    ("ddim", {}),
    ("edm_heun", {}),
    ("dpm_solver_pp", {"order": 2}),
    ("dpm_solver_pp", {"order": 3}),
    ("dpm_solver_pp", {"order": 3, "third_order": "corrected"}),
    ("dpm_solver_pp_singlestep", {"order": 2}),
    ("dpm_solver_pp_singlestep", {"order": 3}),
    ("unipc", {"order": 2, "variant": "bh2"}),
    ("unipc", {"order": 3, "variant": "bh1"}),
]
STOCHASTIC = [
    ("ddpm", {}),
    ("euler_ancestral", {}),
    ("dpm_solver_pp_sde", {"order": 2}),
    ("edm_heun", {"s_churn": 20.0}),
]


def label(method, kwargs):
    extra = ",".join(f"{k}={v}" for k, v in sorted(kwargs.items()))
    return f"{method}({extra})" if extra else method


def nfe(method, kwargs, steps, final_zero):
    if method == "edm_heun":
        return 2 * steps - 1 if final_zero else 2 * steps
    if method == "dpm_solver_pp_singlestep":
        order = kwargs.get("order", 2)
        return order * (steps - 1) + 1 if final_zero else order * steps
    return steps


def random_gaussian(key, dim, spectrum_decay=1.0):
    """A Gaussian with a power-law spectrum (like natural images) and a random basis."""
    k1, k2 = jax.random.split(key)
    q, _ = jnp.linalg.qr(jax.random.normal(k1, (dim, dim)))
    eigvals = 2.0 / (1.0 + jnp.arange(dim)) ** spectrum_decay
    mean = 0.3 * jax.random.normal(k2, (dim,))
    return analytic.Gaussian.from_cov(mean, (q * eigvals[None, :]) @ q.T)


def ring_mixture(num=8, radius=2.0, std=0.25):
    angles = 2 * np.pi * np.arange(num) / num
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return analytic.GaussianMixture.create(np.ones(num), means, stds=np.full(num, std))


def random_mixture(key, dim, num=6):
    k1, k2 = jax.random.split(key)
    means = 1.5 * jax.random.normal(k1, (num, dim)) / np.sqrt(dim) * 4
    stds = 0.3 + 0.4 * jax.random.uniform(k2, (num,))
    return analytic.GaussianMixture.create(np.ones(num), means, stds=stds)


def run_sampler(method, kwargs, key, denoiser, process, x_init, ts):
    fn = samplers.get_method(method)
    return fn(key, denoiser, process, x_init, ts, **kwargs)


def accuracy(args, key):
    process = jaxdiff.EDMProcess()
    rows = []
    gaussian = random_gaussian(jax.random.fold_in(key, 1), 64)
    g_den = gaussian.denoiser(process)
    x_T, _ = gaussian.sample_marginal(jax.random.fold_in(key, 2), process, process.t_max, 256)
    grids = ["karras", "uniform_log_snr"] if args.quick else ["karras", "uniform_log_snr",
                                                                "uniform_t"]
    step_list = [10, 20, 50] if args.quick else [5, 10, 20, 50, 100, 200]

    @jax.jit
    def flow_err(x_T, ts, out):
        return jnp.max(jnp.abs(out - gaussian.flow(process, x_T, ts[0], ts[-1])))

    print("\n== endpoint error vs closed-form flow (64-D Gaussian, EDM, to t_min) ==")
    print(f"{'method':44s} {'grid':16s} " + " ".join(f"N={n:<9d}" for n in step_list))
    for method, kw in DETERMINISTIC:
        for grid in grids:
            errs = []
            for n in step_list:
                ts = samplers.GRIDS[grid](process, n)
                fn = jax.jit(lambda k, x, ts, m=method, kw=kw: run_sampler(m, kw, k, g_den,
                                                                            process, x, ts))
                out = fn(key, x_T, ts)
                err = float(flow_err(x_T, ts, out))
                errs.append(err)
                rows.append(dict(kind="flow_error", method=label(method, kw), grid=grid,
                                 steps=n, nfe=nfe(method, kw, n, False), error=err))
            print(f"{label(method, kw):44s} {grid:16s} " + " ".join(f"{e:<11.3e}" for e in errs))

    num = 2048 if args.quick else 8192
    for name, dist in [("ring2d", ring_mixture()), ("mix64d", random_mixture(key, 64))]:
        den = dist.denoiser(process)
        data = dist.sample(jax.random.fold_in(key, 3), num)
        x_T, _ = dist.sample_marginal(jax.random.fold_in(key, 4), process, process.t_max, num)
        print(f"\n== sample quality, {name} ({num} samples; SW2 / Gaussian W2 to exact data) ==")
        # The noise floor: the same distances for independent exact samples (mean +- SD over
        # 5 draws; one draw alone scatters as much as the samplers' converged values).
        floor = []
        m2, c2 = metrics.moments(data)
        for i in range(5):
            exact = dist.sample(jax.random.fold_in(jax.random.fold_in(key, 6), i), num)
            m1, c1 = metrics.moments(exact)
            floor.append((float(metrics.sliced_wasserstein(jax.random.key(7), exact, data)),
                          float(metrics.gaussian_w2(m1, c1, m2, c2))))
        (sw, w2), (sw_sd, w2_sd) = np.mean(floor, axis=0), np.std(floor, axis=0, ddof=1)
        rows.append(dict(kind="sample_quality_floor", dataset=name, sliced_w2=sw,
                         sliced_w2_sd=sw_sd, gaussian_w2=w2, gaussian_w2_sd=w2_sd))
        print(f"{'exact samples (noise floor, 5 draws)':44s} {sw:.3f}+-{sw_sd:.3f} / "
              f"{w2:.3f}+-{w2_sd:.3f}")
        for method, kw in DETERMINISTIC + STOCHASTIC:
            cells = []
            for n in step_list:
                ts = samplers.GRIDS["karras"](process, n, final_zero=True)
                fn = jax.jit(lambda k, x, ts, m=method, kw=kw, den=den: run_sampler(
                    m, kw, k, den, process, x, ts))
                out = fn(jax.random.fold_in(key, 5), x_T, ts)
                sw = float(metrics.sliced_wasserstein(jax.random.key(7), out, data))
                m1, c1 = metrics.moments(out)
                m2, c2 = metrics.moments(data)
                w2 = float(metrics.gaussian_w2(m1, c1, m2, c2))
                cells.append(f"{sw:.3f}/{w2:.3f}")
                rows.append(dict(kind="sample_quality", dataset=name, method=label(method, kw),
                                 grid="karras", steps=n, nfe=nfe(method, kw, n, True),
                                 sliced_w2=sw, gaussian_w2=w2))
            print(f"{label(method, kw):44s} " + " ".join(f"{c:<14s}" for c in cells))
    return rows


def interleaved_times(runs, repeats=21):
    """Median wall time of each ``name -> (fn, args)`` in ``runs``, timed in alternation.

    Every round times each function once, in a rotated order, so that drift of a shared machine
    (other jobs, frequency scaling) hits all of them alike; per-round times are returned too, so
    that ratios can be taken within a round.
    """
    for fn, args in runs.values():
        jax.block_until_ready(fn(*args))  # compile and warm up
    names = list(runs)
    rounds = []
    for r in range(repeats):
        times = {}
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn, args = runs[name]
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name] = time.perf_counter() - start
        rounds.append(times)
    medians = {n: statistics.median(t[n] for t in rounds) for n in names}
    return medians, rounds


def median_ratio(rounds, num, den):
    """Median over rounds of ``time[num] / time[den]`` (each ratio from one round)."""
    return statistics.median(t[num] / t[den] for t in rounds)


def compile_times(make_fn, arg_sets, repeats=7):
    """Lower + compile time of ``jax.jit(make_fn())`` for each ``name -> args``, in alternation.

    ``make_fn`` must return a new function object on every call: JAX caches traces and
    executables per function object, so re-jitting the same one would time a cache hit.
    Returns the median time per name and the per-round times (for within-round ratios).
    """
    rounds = []
    for _ in range(repeats):
        times = {}
        for name, args in arg_sets.items():
            start = time.perf_counter()
            jax.jit(make_fn()).lower(*args).compile()
            times[name] = time.perf_counter() - start
        rounds.append(times)
    return {n: statistics.median(t[n] for t in rounds) for n in arg_sets}, rounds


def speed(args, key):
    del args
    process = jaxdiff.EDMProcess()
    gaussian = random_gaussian(jax.random.fold_in(key, 1), 64)
    gaussian = jax.tree.map(lambda a: a.astype(jnp.float32), gaussian)
    den = gaussian.denoiser(process)
    n = 100
    ts = timesteps.karras(process, n, dtype=jnp.float32)
    results = {}

    @jax.jit
    def ddim_run(x, ts):
        return samplers.ddim(None, den, process, x, ts)

    @jax.jit
    def pf_euler_run(x, ts):
        return samplers.pf_euler(None, den, process, x, ts)

    @jax.jit
    def denoiser_only(x, ts):
        def body(x, t):
            return den(x, jnp.full((x.shape[0],), t, x.dtype)), None
        return jax.lax.scan(body, x, ts[:-1])[0]

    # Python loop of jitted single steps (the same DDIM update, one dispatch per step).
    @jax.jit
    def one_step(x, t, s):
        return samplers.ddim(None, den, process, x, jnp.stack([t, s]))

    def python_loop(x, ts):
        for i in range(ts.shape[0] - 1):
            x = one_step(x, ts[i], ts[i + 1])
        return x

    try:
        import diffrax
    except ImportError:
        diffrax = None

    def diffrax_run(x, ts):
        def vf(t, y, args):
            return process.pf_velocity(y, t, den(y, jnp.full((y.shape[0],), t, y.dtype)))
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vf), diffrax.Euler(), t0=ts[0], t1=ts[-1], dt0=None, y0=x,
            stepsize_controller=diffrax.StepTo(ts), saveat=diffrax.SaveAt(t1=True),
            max_steps=ts.shape[0] - 1,
        )
        return sol.ys[0]

    for batch in (16, 4096):
        x = jax.random.normal(key, (batch, 64), jnp.float32) * 80.0
        runs = {"ddim": (ddim_run, (x, ts)), "denoiser_scan": (denoiser_only, (x, ts))}
        if batch == 16:
            runs["pf_euler"] = (pf_euler_run, (x, ts))
            runs["python_loop"] = (python_loop, (x, ts))
            if diffrax is not None:
                runs["diffrax_euler"] = (jax.jit(diffrax_run), (x, ts))
        medians, rounds = interleaved_times(runs)
        for name, t in medians.items():
            results[f"{name}_B{batch}_s"] = t
        results[f"ratio_sampler_over_denoiser_scan_B{batch}"] = median_ratio(
            rounds, "ddim", "denoiser_scan")
        if batch == 16:
            results["speedup_vs_python_loop_B16"] = median_ratio(rounds, "python_loop", "ddim")
            if diffrax is not None:
                fn = runs["diffrax_euler"][0]
                results.update(
                    speedup_vs_diffrax_B16=median_ratio(rounds, "diffrax_euler", "pf_euler"),
                    # diffrax's own per-step overhead, relative to the bare denoiser-only scan,
                    # bounds any speedup a sampler can have over it.
                    diffrax_over_denoiser_scan_B16=median_ratio(rounds, "diffrax_euler",
                                                                "denoiser_scan"),
                    pf_euler_vs_diffrax_max_diff=float(jnp.max(jnp.abs(
                        pf_euler_run(x, ts) - fn(x, ts)))),
                )

    results["per_nfe_overhead"] = per_nfe_overhead(key, den, process, ts, denoiser_only)

    x = jax.random.normal(key, (16, 64), jnp.float32)
    medians, rounds = compile_times(
        lambda: lambda x, ts: samplers.ddim(None, den, process, x, ts),
        {steps: (x, timesteps.karras(process, steps, dtype=jnp.float32)) for steps in (10, 1000)})
    for steps, t in medians.items():
        results[f"compile_{steps}_steps_s"] = t
    results["compile_ratio_1000_over_10"] = median_ratio(rounds, 1000, 10)
    print("\n== speed (float32, 64-D Gaussian denoiser, N = 100; medians of 21 interleaved rounds,"
          " ratios within rounds; compile: 7 rounds) ==")
    for k, v in results.items():
        if k != "per_nfe_overhead":
            print(f"{k:44s} {v:.4g}")
    print("\n== time per network call, relative to the denoiser-only scan (N = 100) ==")
    print(f"{'method':44s} {'NFE':>4s} {'B=16':>7s} {'B=4096':>7s}")
    for name, row in results["per_nfe_overhead"].items():
        print(f"{name:44s} {row['nfe']:4d} {row['B16']:7.3f} {row['B4096']:7.3f}")
    return results


OVERHEAD_METHODS = [
    ("pf_euler", {}),
    ("ddim", {}),
    ("ddpm", {}),
    ("euler_ancestral", {}),
    ("edm_heun", {}),
    ("dpm_solver_pp", {"order": 2}),
    ("dpm_solver_pp", {"order": 3, "third_order": "corrected"}),
    ("dpm_solver_pp_singlestep", {"order": 3}),
    ("unipc", {"order": 2, "variant": "bh2"}),
]


def per_nfe_overhead(key, den, process, ts, denoiser_only, repeats=11):
    """Each sampler's time per network call over the denoiser-only scan's (1 = no overhead).

    ``t_sampler / (t_scan * NFE / N)``, the ratio taken within interleaved rounds.
    """
    n = ts.shape[0] - 1
    table = {}
    for batch in (16, 4096):
        x = jax.random.normal(key, (batch, 64), jnp.float32) * 80.0
        runs = {"denoiser_scan": (denoiser_only, (x, ts))}
        for method, kw in OVERHEAD_METHODS:
            fn = jax.jit(lambda k, x, ts, m=method, kw=kw: run_sampler(m, kw, k, den, process,
                                                                        x, ts))
            runs[label(method, kw)] = (fn, (key, x, ts))
        _, rounds = interleaved_times(runs, repeats=repeats)
        for method, kw in OVERHEAD_METHODS:
            name, calls = label(method, kw), nfe(method, kw, n, False)
            row = table.setdefault(name, {"nfe": calls})
            row[f"B{batch}"] = median_ratio(rounds, name, "denoiser_scan") * n / calls
    return table


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    flow = [r for r in rows if r["kind"] == "flow_error" and r["grid"] == "karras"]
    for m in sorted({r["method"] for r in flow}):
        pts = sorted((r["nfe"], r["error"]) for r in flow if r["method"] == m)
        axes[0].loglog(*zip(*pts), marker="o", label=m)
    axes[0].set(title="64-D Gaussian: error vs closed-form flow (Karras)", xlabel="NFE",
                ylabel="max |error|")
    for ax, ds in zip(axes[1:], ["ring2d", "mix64d"]):
        q = [r for r in rows if r["kind"] == "sample_quality" and r["dataset"] == ds]
        for m in sorted({r["method"] for r in q}):
            pts = sorted((r["nfe"], r["sliced_w2"]) for r in q if r["method"] == m)
            ax.loglog(*zip(*pts), marker="o", label=m)
        ax.set(title=f"{ds}: sliced W2 to exact samples", xlabel="NFE")
    axes[0].legend(fontsize=6)
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer step counts (< 2 min)")
    parser.add_argument("--out", default=os.path.join("outputs", "sampler_bench"))
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    key = jax.random.key(0)
    start = time.perf_counter()
    rows, speed_results = [], {}
    if not args.skip_accuracy:
        rows = accuracy(args, key)
    if not args.skip_speed:
        speed_results = speed(args, key)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(accuracy=rows, speed=speed_results, device=str(jax.devices()[0]),
                       jax_version=jax.__version__), f, indent=1)
    if rows:
        plot(rows, args.out + ".png")
    print(f"\nwrote {args.out}.json" + (f" and {args.out}.png" if rows else "")
          + f" in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    # Accuracy runs in float64 (exact references); the speed section uses explicit float32.
    jax.config.update("jax_enable_x64", True)
    main()
