"""Fokker--Planck-regularised training and the ODE--SDE gap on 2-D data (Deveney et al.).

    python3 experiments/fokker_planck/main.py [--config default|quick] [--workdir DIR]
                                              [key=value ...]

For every data set and residual weight w_R: train a potential network phi(x, t) ~ log p_t(x)
(score grad phi) on the OU process (f = -1, g = 1, T = 10) with denoising score matching plus
w_R * mean R^2 (the log-density Fokker--Planck residual on uniform collocation points); sample
it with the probability-flow ODE, the reverse SDE and the family between them from shared prior
draws; report exact-OT W2^2 between 64 x 64 histograms (ODE-SDE, ODE-data, SDE-data) with
bootstrap standard errors, sliced W2, and the held-out mean residual. A control row samples the
exact score of the Gaussian-grid set the same way (the sampler's own gap floor).

Writes to ``DIR`` (default ``outputs/fokker_planck``): ``results.json`` (updated after every
model, so an interrupted run keeps what it finished and a rerun skips it), ``table.md``,
``samples.png``, ``gap.png`` and ``samples_*.npz`` (plotted subsets).
"""

import hashlib
import json
import math
import os
import pathlib
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxdiff
from experiments import common
from experiments.fokker_planck.config import Config, get_config
from jaxdiff import analytic, fokker_planck, metrics, nets, predictions, timesteps, training
from jaxdiff.data import toy2d

PAPER_NAMES = {"25gaussians": "blob", "rings": "circles2", "checkerboard": "checker"}
EXACT = "exact score"


def make_process():
    """The paper's Ornstein--Uhlenbeck process, dx = -x dt + dW on [1e-3, 10]."""
    return jaxdiff.OUProcess(t_min=1e-3, t_max=10.0)


def data_sampler(name, scale):
    """``draw(key, n) -> (n, 2)`` float32 points of the scaled toy set."""

    @jax.jit
    def draw(key, n_like):
        x, _ = toy2d.sample(key, name, n_like.shape[0])
        return scale * x

    return lambda key, n: draw(key, jnp.zeros((n,), jnp.int8))


def beta12_times(process):
    """The paper's training times t = t_min + (T - t_min) Beta(1, 2) (Beta(1, 2) = 1 - sqrt(U))."""
    t_min, t_max = process.t_min, process.t_max

    def sample(key, shape):
        u = jax.random.uniform(key, shape)
        return t_min + (t_max - t_min) * (1.0 - jnp.sqrt(u))

    return sample


def with_gaussian_base(potential, process, data_variance):
    r"""phi + log N(x; 0, (alpha^2 v + sigma^2) I) up to its normaliser (the exact phi for a
    Gaussian of variance v), so an untrained network already has the right score at large t,
    where the reverse-time OU dynamics amplify score errors by up to e^T."""

    def fn(params, x, t, cond=None):
        var = jnp.square(process.alpha(t)) * data_variance + jnp.square(process.sigma(t))
        return potential(params, x, t, cond) - 0.5 * jnp.sum(jnp.square(x), axis=-1) / var

    return fn


def score_denoiser(potential, params, process):
    """The denoiser of the score grad_x phi (kind "score")."""

    def score(x, t, cond=None):
        return jax.grad(lambda y: jnp.sum(potential(params, y, t, cond)))(x)

    return predictions.to_denoiser(score, process, "score")


def build(config: Config, weight: float):
    """``(graphdef, state, train_step, potential)`` of one model."""
    process = make_process()
    net = nets.PotentialMLP(dim=2, hidden=config.net.hidden, depth=config.net.depth,
                            emb_dim=config.net.emb_dim, activation=config.net.activation,
                            rngs=nnx.Rngs(config.train.seed))
    graphdef, params = nnx.split(net)
    params = nnx.to_pure_dict(params)
    potential = training.make_potential_fn(graphdef, process)
    if config.net.gaussian_base:
        potential = with_gaussian_base(potential, process, config.data.scale ** 2)
    box = float(config.train.box)
    loss_fn = training.fokker_planck_loss_fn(
        potential, process, residual_weight=float(weight),
        num_collocation=config.train.num_collocation, box=(-box, box),
        collocation=config.train.collocation,
        time_sampling=beta12_times(process),
    )
    steps = config.train.steps
    boundaries = {int(f * steps): 0.1 for f in config.train.decay_at}
    schedule = optax.piecewise_constant_schedule(config.train.lr, boundaries)
    optimizer = optax.chain(optax.clip_by_global_norm(config.train.clip_norm),
                            optax.adam(schedule))
    # Same initialisation and data stream for every weight (common random numbers).
    state = training.create_train_state(jax.random.key(config.train.seed), params, optimizer)
    step = training.make_train_step(loss_fn, optimizer)
    return graphdef, state, step, potential


def train_model(config: Config, name: str, weight: float, log=print):
    """Train one model; returns ``(graphdef, params, potential, seconds, final_loss)``."""
    graphdef, state, step, potential = build(config, weight)
    draw = data_sampler(name, config.data.scale)
    data_key = jax.random.fold_in(jax.random.key(config.train.seed), 1)
    start = time.perf_counter()
    loss = float("nan")
    for i in range(config.train.steps):
        batch = {"x": draw(jax.random.fold_in(data_key, i), config.train.batch_size)}
        state, m = step(state, batch)
        if log and ((i + 1) % config.train.log_every == 0 or i == 0):
            loss = float(m["loss"])
            log(f"  [{name} w_R={weight:g}] step {i + 1:>6}  loss {loss:.4f}  "
                f"({time.perf_counter() - start:.0f} s)")
    loss = float(m["loss"])
    return graphdef, state.params, potential, time.perf_counter() - start, loss


def residual_monitor(config: Config, log_density, process):
    """Held-out mean R^2 on uniform collocation points: all t, and t < 1 (the sharp end)."""
    key = jax.random.key(config.train.seed + 7)
    n = config.eval.residual_points
    k_t, k_x = jax.random.split(key)
    t = jax.random.uniform(k_t, (n,), minval=process.t_min, maxval=process.t_max)
    box = float(config.train.box)
    x = jax.random.uniform(k_x, (n, 2), minval=-box, maxval=box)
    res = jax.jit(lambda x, t: fokker_planck.log_density_residual(
        log_density, process, x, t).residual)(x, t)
    r2 = np.asarray(res, np.float64) ** 2
    small = np.asarray(t) < 1.0
    return {"mean_r2": float(r2.mean()), "mean_r2_t_lt_1": float(r2[small].mean()),
            "mean_r2_t_ge_1": float(r2[~small].mean())}


def sample_family(config: Config, denoiser, process):
    """``{eta: samples (n, 2)}`` from shared prior draws and Brownian increments."""
    key = jax.random.key(config.train.seed + 11)
    k_prior, k_noise = jax.random.split(key)
    x_init = process.sample_prior(k_prior, (config.eval.num_samples, 2))
    ts = timesteps.uniform_log_snr(process, config.eval.steps)
    etas = [float(e) for e in config.eval.etas]
    run = jax.jit(lambda z: fokker_planck.lambda_family(k_noise, denoiser, process, z, ts, etas))
    out = run(x_init)
    return {eta: np.asarray(x, np.float64) for eta, x in zip(etas, out)}


def distances(config: Config, samples, data_a, data_b):
    """W2^2 (histogram OT) with bootstrap SEs, sliced W2 and the lambda-family distances."""
    ev = config.eval
    grid = dict(bins=ev.bins, limits=(-ev.limit, ev.limit))
    ode, sde = samples[0.0], samples[1.0]

    def stat(o, s, ref):
        return np.array([fokker_planck.histogram_w2(o, s, **grid),
                         fokker_planck.histogram_w2(o, ref, **grid),
                         fokker_planck.histogram_w2(s, ref, **grid)])

    boot = metrics.bootstrap(np.random.default_rng(config.train.seed), stat,
                             [(ode, sde), (data_a,)], num_boot=ev.num_boot)
    out = {}
    for i, k in enumerate(("ode_sde", "ode_data", "sde_data")):
        out[k] = {"value": float(boot["value"][i]), "se": float(boot["se"][i]),
                  "replicates": boot["replicates"][:, i].tolist()}
    sw_key = jax.random.key(config.train.seed + 13)
    sw = jax.jit(lambda a, b: metrics.sliced_wasserstein(
        sw_key, a, b, num_projections=ev.sliced_projections))
    out["sliced"] = {"ode_sde": float(sw(ode, sde)), "ode_data": float(sw(ode, data_a)),
                     "sde_data": float(sw(sde, data_a))}
    out["family"] = {
        str(eta): {"to_ode": fokker_planck.histogram_w2(x, ode, **grid),
                   "to_data": fokker_planck.histogram_w2(x, data_a, **grid)}
        for eta, x in samples.items() if eta not in (0.0, 1.0)
    }
    del data_b
    return out


def data_floor(config: Config, name):
    """W2^2 between two independent data sets of the evaluation size (the metric's floor)."""
    draw = data_sampler(name, config.data.scale)
    key = jax.random.key(config.train.seed + 17)
    n = config.eval.num_samples
    a = np.asarray(draw(jax.random.fold_in(key, 0), n), np.float64)
    b = np.asarray(draw(jax.random.fold_in(key, 1), n), np.float64)
    grid = dict(bins=config.eval.bins, limits=(-config.eval.limit, config.eval.limit))
    return a, b, fokker_planck.histogram_w2(a, b, **grid)


def exact_mixture(name, scale):
    """The exact law of a Gaussian toy set, scaled (None for the other sets)."""
    if name not in ("8gaussians", "25gaussians"):
        return None
    mix = toy2d.gaussian_mixture(name)
    comps = mix.components
    return analytic.GaussianMixture.create(
        jax.nn.softmax(mix.logits), scale * comps.mean,
        stds=scale * jnp.sqrt(comps.eigvals[:, 0]),
    )


def config_hash(config: Config):
    d = training.config.to_dict(config)
    d["train"].pop("log_every", None)
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _entry_key(name, weight):
    return f"{name}|{weight:g}" if weight != EXACT else f"{name}|{EXACT}"


def run(config: Config, workdir, *, log=print):
    """Every (data set, weight) model, the table and the figures; returns the results dict."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "results.json")
    chash = config_hash(config)
    results = {"config_hash": chash, "config": training.config.to_dict(config), "entries": {},
               "floors": {}}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("config_hash") == chash:
            results = old
    process = make_process()
    start = time.perf_counter()

    def save():
        with open(path, "w") as f:
            json.dump(results, f, indent=1)

    for name in config.data.names:
        data_a, data_b, floor = data_floor(config, name)
        results["floors"][name] = floor
        jobs = [(w, None) for w in config.train.weights]
        mix = exact_mixture(name, config.data.scale)
        if mix is not None and config.eval.exact_control:
            jobs.append((EXACT, mix))
        for weight, mix in jobs:
            key = _entry_key(name, weight)
            if key in results["entries"]:
                continue
            t0 = time.perf_counter()
            if mix is None:
                graphdef, params, potential, train_s, loss = train_model(config, name, weight,
                                                                         log=log)
                denoiser = score_denoiser(potential, params, process)
                log_density = lambda x, t, p=params, pot=potential: pot(p, x, t)
            else:
                train_s, loss = 0.0, float("nan")
                denoiser = mix.denoiser(process)
                log_density = lambda x, t, m=mix: m.log_prob(process, x, t)
            monitor = residual_monitor(config, log_density, process)
            t1 = time.perf_counter()
            samples = sample_family(config, denoiser, process)
            t2 = time.perf_counter()
            dist = distances(config, samples, data_a, data_b)
            t3 = time.perf_counter()
            entry = {"data": name, "weight": weight, "train_seconds": train_s,
                     "sample_seconds": t2 - t1, "distance_seconds": t3 - t2,
                     "final_loss": loss, **monitor, **dist}
            results["entries"][key] = entry
            shown = min(5_000, config.eval.num_samples)
            np.savez_compressed(
                os.path.join(workdir, f"samples_{name}_{weight if mix is None else 'exact'}.npz"),
                data=data_a[:shown], **{f"eta{eta:g}": x[:shown] for eta, x in samples.items()})
            save()
            if log:
                log(f"{name:>12} w_R={weight!s:>11}: W2^2 ODE-SDE {dist['ode_sde']['value']:.4f}"
                    f" ODE-data {dist['ode_data']['value']:.4f} SDE-data "
                    f"{dist['sde_data']['value']:.4f} | mean R^2 {monitor['mean_r2']:.3g} | "
                    f"{time.perf_counter() - t0:.0f} s (train {train_s:.0f}, sample "
                    f"{t2 - t1:.0f}, OT {t3 - t2:.0f}); "
                    f"elapsed {time.perf_counter() - start:.0f} s")
        save()
    results["summary"] = summarize(config, results)
    save()
    table = markdown_table(config, results)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(table)
    plot(config, results, workdir)
    if log:
        log(table)
    return results


def _se_diff(a, b):
    return math.sqrt(a["se"] ** 2 + b["se"] ** 2)


def summarize(config: Config, results):
    """Gap ratios w_R = 0 over w_R > 0 and whether the drop exceeds its 95% interval."""
    out = {}
    for name in config.data.names:
        base = results["entries"].get(_entry_key(name, 0.0))
        if base is None:
            continue
        rows = {}
        for w in config.train.weights:
            e = results["entries"].get(_entry_key(name, w))
            if e is None or w == 0.0:
                continue
            g0, gw = base["ode_sde"], e["ode_sde"]
            diff = g0["value"] - gw["value"]
            se = _se_diff(g0, gw)
            reps0, repsw = np.asarray(g0["replicates"]), np.asarray(gw["replicates"])
            ratio_reps = reps0 / np.maximum(repsw, 1e-12)
            rows[f"{w:g}"] = {
                "gap_ratio": g0["value"] / max(gw["value"], 1e-12),
                "gap_ratio_boot_range": [float(ratio_reps.min()), float(ratio_reps.max())],
                "gap_drop": diff, "gap_drop_ci95": [diff - 1.96 * se, diff + 1.96 * se],
                "gap_drop_significant": bool(diff - 1.96 * se > 0),
                "sde_data_ratio": e["sde_data"]["value"] / max(base["sde_data"]["value"], 1e-12),
                "ode_data_ratio": e["ode_data"]["value"] / max(base["ode_data"]["value"], 1e-12),
            }
        out[name] = rows
    return out


def markdown_table(config: Config, results):
    """The results table (W2^2 +- bootstrap SE; sliced W2; mean R^2)."""
    n = config.eval.num_samples
    lines = [
        f"W2^2 between {config.eval.bins}x{config.eval.bins} histograms on "
        f"[-{config.eval.limit:g}, {config.eval.limit:g}]^2 (exact OT), {n} samples per set, "
        f"+- bootstrap SE ({config.eval.num_boot} paired replicates); SW = sliced W2.",
        "",
        "| data (paper) | w_R | ODE-SDE | ODE-data | SDE-data | SW ODE-SDE | SW ODE-data | "
        "SW SDE-data | mean R^2 (t<1) | mean R^2 (t>=1) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(d):
        return f"{d['value']:.4f} +- {d['se']:.4f}"

    for name in config.data.names:
        keys = [_entry_key(name, w) for w in config.train.weights] + [_entry_key(name, EXACT)]
        for key in keys:
            e = results["entries"].get(key)
            if e is None:
                continue
            sw = e["sliced"]
            lines.append(
                f"| {name} ({PAPER_NAMES.get(name, '-')}) | {e['weight']} | {cell(e['ode_sde'])} "
                f"| {cell(e['ode_data'])} | {cell(e['sde_data'])} | {sw['ode_sde']:.4f} | "
                f"{sw['ode_data']:.4f} | {sw['sde_data']:.4f} | {e['mean_r2_t_lt_1']:.3g} | "
                f"{e['mean_r2_t_ge_1']:.3g} |"
            )
        if name in results["floors"]:
            lines.append(f"| {name} | data vs data | | {results['floors'][name]:.4f} | | | | | | |")
    summary = results.get("summary", {})
    if summary:
        lines += ["", "| data | w_R | gap ratio (w_R=0 / w_R) | gap drop (95% CI) | "
                  "SDE-data ratio (w_R / w_R=0) | ODE-data ratio |", "|---|---|---|---|---|---|"]
        for name, rows in summary.items():
            for w, r in rows.items():
                lo, hi = r["gap_drop_ci95"]
                lines.append(
                    f"| {name} | {w} | {r['gap_ratio']:.2f} | {r['gap_drop']:.4f} "
                    f"[{lo:.4f}, {hi:.4f}]{' *' if r['gap_drop_significant'] else ''} | "
                    f"{r['sde_data_ratio']:.2f} | {r['ode_data_ratio']:.2f} |"
                )
    return "\n".join(lines) + "\n"


def plot(config: Config, results, workdir):
    """``samples.png`` (data, ODE and SDE samples per weight) and ``gap.png`` (distances vs w_R)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in config.data.names if _entry_key(n, config.train.weights[0])
             in results["entries"]]
    if not names:
        return
    weights = list(config.train.weights)
    cols = 1 + 2 * len(weights)
    fig, axes = plt.subplots(len(names), cols, figsize=(1.9 * cols, 2.0 * len(names)),
                             squeeze=False)
    lim = config.eval.limit
    for r, name in enumerate(names):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
        for j, w in enumerate(weights):
            f = os.path.join(workdir, f"samples_{name}_{w}.npz")
            if not os.path.exists(f):
                continue
            z = np.load(f)
            if j == 0:
                axes[r, 0].scatter(z["data"][:, 0], z["data"][:, 1], s=0.2, c="k")
                axes[r, 0].set_title(f"data ({name})", fontsize=7)
            for k, (eta, label) in enumerate(((0.0, "ODE"), (1.0, "SDE"))):
                x = z[f"eta{eta:g}"]
                ax = axes[r, 1 + 2 * j + k]
                ax.scatter(x[:, 0], x[:, 1], s=0.2, c="C0" if k == 0 else "C3")
                ax.set_title(f"{label}, w_R={w:g}", fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "samples.png"), dpi=110, metadata={"Software": None})
    plt.close(fig)

    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.0), squeeze=False)
    pos = np.arange(len(weights))
    for ax, name in zip(axes[0], names):
        for k, label in (("ode_sde", "ODE-SDE"), ("ode_data", "ODE-data"),
                         ("sde_data", "SDE-data")):
            vals, ses, xs = [], [], []
            for i, w in enumerate(weights):
                e = results["entries"].get(_entry_key(name, w))
                if e is not None:
                    vals.append(e[k]["value"])
                    ses.append(e[k]["se"])
                    xs.append(pos[i])
            ax.errorbar(xs, vals, yerr=1.96 * np.asarray(ses), marker="o", capsize=3, label=label)
        if name in results["floors"]:
            ax.axhline(results["floors"][name], color="gray", ls=":", label="data vs data")
        ax.set_xticks(pos, [f"{w:g}" for w in weights])
        ax.set_xlabel("w_R")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
    axes[0, 0].set_ylabel("W2^2 (histogram OT)")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "gap.png"), dpi=110, metadata={"Software": None})
    plt.close(fig)


def parse(argv, default_workdir="outputs/fokker_planck"):
    return common.parse(argv, get_config, default_workdir=default_workdir,
                        description=__doc__.splitlines()[0])


def main(argv=None):
    config, args = parse(argv)
    run(config, args.workdir)


if __name__ == "__main__":
    main()

