"""Gaussian score approximation and analytical teleportation on the digits model (Wang & Vastola).

    python3 experiments/gaussian_score/main.py STAGE [--model outputs/digits]
        [--workdir outputs/gaussian_score] [--quick]

Stages (``all`` runs them in order; each writes ``WORKDIR/<stage>.json`` and a figure):

* ``ev``        explained variance of the trained digits UNet (unconditional branch, EMA
                weights) by the isotropic mean, the Gaussian, a 10-component GMM and the
                training set, in score and denoiser space, at 15 noise levels;
* ``dynamics``  the same at a few noise levels for every checkpoint of a short training run
                (``WORKDIR/dynamics_run``, checkpoints every 100 steps; resumable), plus the
                two checkpoints kept in ``--model``;
* ``teleport``  EDM Heun (18 steps) and DPM-Solver++(2M) (20 steps) with and without
                teleportation, against plain runs with the same number of network calls:
                Fréchet distance in the clean classifier's penultimate-layer features and
                sliced Wasserstein distance in pixel space, paired seeds, bootstrap CIs;
* ``analytic``  the same on exact analytic data (the Gaussian and the 10-component GMM fitted
                to the digits, with their exact denoisers), where the answers are known.

``--quick`` shrinks every stage (few samples, few levels) for a smoke run.
"""

import argparse
import functools
import json
import os
import pathlib
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff
from jaxdiff import analytic, metrics, timesteps
from jaxdiff.analysis import explained_variance_curve
from jaxdiff.samplers._teleport import sampler_nfe, teleport

NOISE_LEVELS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0)
DYNAMICS_LEVELS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
APPROX_ORDER = ("isotropic", "gaussian", "gmm10", "train_set")


# --- the model, its data and the analytic approximations -----------------------------------------


def load_unconditional(path, step=None):
    """``(denoiser, process, step)``: the EMA network's unconditional branch (its null label).

    The denoiser is a :class:`jax.tree_util.Partial` holding the parameters, so they are jit
    arguments rather than constants baked into every compiled sampler.
    """
    from jaxdiff import nets, training

    model = training.load_model(path, step=step)
    fn = nets.make_denoiser_fn(model.graphdef, model.process, model.prediction)
    null_label = int(np.asarray(model.null_cond(1))[0])

    def unconditional(params, x, t, cond=None):
        del cond
        return fn(params, x, t, jnp.full((x.shape[0],), null_label, jnp.int32))

    return jax.tree_util.Partial(unconditional, model.params), model.process, model.step


def digits_images(split):
    from jaxdiff import data

    return jnp.asarray(data.load_digits(split)[0])


def approximations(key, images, num_components=10):
    """The analytic models of the training set (flattened images), by name."""
    flat = images.reshape(images.shape[0], -1)
    return {
        "gaussian": analytic.Gaussian.fit(flat),
        f"gmm{num_components}": analytic.GaussianMixture.fit(key, flat, num_components),
        "train_set": analytic.Empirical.create(flat),
    }


# --- bootstrap confidence intervals ---------------------------------------------------------------


def paired_bootstrap(rng, metric, samples, reference=None, *, num_boot=200, baseline=None):
    """Point estimates of ``metric(x, reference)`` for sample sets, with paired bootstrap CIs.

    The sample sets come from the same seeds (row ``i`` of every set shares its initial noise),
    so one resample of row indices is applied to all of them (paired); the reference set is
    resampled independently (``reference=None``: ``metric(x)`` against an exact law). Reported:
    the bootstrap standard deviation of each value, and with ``baseline`` (a key of
    ``samples``) the difference ``metric(x) - metric(baseline)`` with its basic 95% interval.

    Resampling with replacement duplicates points, which biases a distance between sample sets
    upwards (FD by O(D/N)), so percentile intervals of the values themselves can miss the
    estimate; in the paired differences that shift cancels to first order, and the basic
    (reverse-percentile) interval ``[2d - q97.5, 2d - q2.5]`` corrects what is left.

    Returns:
        ``{name: {"value", "sd", "diff", "diff_ci": [lo, hi]}}``.
    """
    names = list(samples)
    call = (lambda x, ref: metric(x)) if reference is None else metric

    def statistic(*arrays):
        sets, ref = (arrays, None) if reference is None else (arrays[:-1], arrays[-1])
        return np.array([float(call(x, ref)) for x in sets])

    groups = [tuple(samples[name] for name in names)]
    if reference is not None:
        groups.append((reference,))
    boot = metrics.bootstrap(rng, statistic, groups, num_boot=num_boot)
    out = {}
    for k, name in enumerate(names):
        rec = {"value": float(boot["value"][k]), "sd": float(boot["se"][k])}
        if baseline is not None:
            j = names.index(baseline)
            d = rec["value"] - float(boot["value"][j])
            diffs = boot["replicates"][:, k] - boot["replicates"][:, j]
            lo, hi = np.percentile(diffs, [2.5, 97.5])
            rec["diff"], rec["diff_ci"] = d, [2 * d - hi, 2 * d - lo]
        out[name] = rec
    return out


# --- (a) explained variance -----------------------------------------------------------------------


def _ev_record(ev):
    return {
        "noise_levels": ev.noise_levels.tolist(),
        **{f"{space}{suffix}": {k: np.asarray(v).tolist() for k, v in getattr(ev, attr).items()}
           for space in ("score", "denoiser")
           for suffix, attr in (("", space), ("_se", f"{space}_se"))},
    }


def markdown_ev(record, space, names=APPROX_ORDER):
    names = [n for n in names if n in record[space]]
    lines = ["| noise level | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, level in enumerate(record["noise_levels"]):
        cells = []
        for n in names:
            v = record[space][n][i]
            cells.append(f"{v:.4f}" if abs(v) < 100 else f"{v:.4g}")
        lines.append(f"| {level:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_ev(args, log=print):
    denoiser, process, step = load_unconditional(args.model)
    images = digits_images("train")
    approx = approximations(jax.random.key(0), images)
    levels = NOISE_LEVELS[::3] if args.quick else NOISE_LEVELS
    ev = explained_variance_curve(
        jax.random.key(1), denoiser, process, images, approx, levels,
        num_samples=256 if args.quick else 1024, batch_size=256,
    )
    record = {"model": args.model, "step": step, **_ev_record(ev)}
    for space in ("score", "denoiser"):
        log(f"\n{space}-space EV ({'St_EV' if space == 'score' else 'Dt_EV'}), step {step}\n")
        log(markdown_ev(record, space))
    plot_ev(os.path.join(args.workdir, "ev.png"), record)
    return record


def plot_ev(path, record):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    levels = np.asarray(record["noise_levels"])
    for ax, space in zip(axes, ("score", "denoiser")):
        for name in APPROX_ORDER:
            if name in record[space]:
                unexplained = np.maximum(1.0 - np.asarray(record[space][name]), 1e-6)
                ax.loglog(levels, unexplained, "o-", ms=3, label=name)
        ax.set_xlabel("noise level sigma")
        ax.set_ylabel("1 - EV (unexplained variance)")
        ax.set_title(f"{space} space")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


# --- (b) learning dynamics ------------------------------------------------------------------------


def train_dynamics_run(workdir, steps, log=print):
    """A short digits run that keeps a checkpoint every ``steps // 20`` steps (resumable)."""
    from experiments.digits.config import get_config
    from experiments.digits.main import train
    from jaxdiff import training

    every = max(1, steps // 20)
    overrides = [f"train.steps={steps}", f"train.checkpoint_every={every}", "train.keep=100",
                 f"train.warmup_steps={max(1, steps // 10)}", f"train.log_every={every * 5}"]
    config = training.config.override(get_config("default"), overrides)
    train(config, workdir, progress=False, log=log)


def train_dynamics_start(workdir, steps, num_steps, every, log=print):
    """The first ``num_steps`` steps of the ``steps``-step run, checkpointed every ``every``.

    Same seed, data order and learning-rate schedule as :func:`train_dynamics_run` (the
    schedule is built for ``steps``), so these are that run's early states, densely sampled.
    """
    from experiments.digits.config import get_config
    from experiments.digits.main import build
    from jaxdiff import training

    overrides = [f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}"]
    config = training.config.override(get_config("default"), overrides)
    batches, net, process, setup, _ = build(config)
    meta = training.describe(process, config.train.prediction, net,
                             config=training.config.to_dict(config))
    training.fit(setup.state, setup.train_step, batches, num_steps=num_steps, workdir=workdir,
                 metadata=meta, checkpoint_every=every, keep=100, log_every=num_steps,
                 progress=False)


def stage_dynamics(args, log=print):
    run_dir = os.path.join(args.workdir, "dynamics_run")
    early_dir = os.path.join(args.workdir, "dynamics_early")
    steps = 200 if args.quick else 2000
    train_dynamics_run(run_dir, steps, log=log)
    train_dynamics_start(early_dir, steps, steps // 10, max(1, steps // 100), log=log)
    images = digits_images("train")
    approx = approximations(jax.random.key(0), images)
    levels = DYNAMICS_LEVELS[1::2] if args.quick else DYNAMICS_LEVELS
    rows = []
    early = [s for s in _steps(early_dir) if s < min(_steps(run_dir))]
    ckpts = ([(early_dir, s) for s in early] + [(run_dir, s) for s in _steps(run_dir)]
             + [(args.model, s) for s in _steps(args.model)])
    for path, step in ckpts:
        denoiser, process, _ = load_unconditional(path, step)
        ev = explained_variance_curve(
            jax.random.key(1), denoiser, process, images, approx, levels,
            num_samples=256 if args.quick else 1024, batch_size=256,
        )
        rows.append({"run": "full" if path == args.model else "short", "step": step,
                     **_ev_record(ev)})
        log(f"{path} step {step}: score EV at {levels}: "
            + ", ".join(f"{n} {np.round(ev.score[n], 3).tolist()}" for n in APPROX_ORDER))
    record = {"levels": list(levels), "rows": rows, "short_run_steps": steps}
    for space in ("score", "denoiser"):
        for li, level in enumerate(levels):
            log(f"\n{space}-space EV at noise level {level:g} vs training step\n")
            log(markdown_dynamics(record, space, li))
    plot_dynamics(os.path.join(args.workdir, "dynamics.png"), record)
    return record


def _steps(path):
    directory = os.path.join(path, "checkpoints")
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def markdown_dynamics(record, space, level_index, names=APPROX_ORDER):
    lines = ["| run | step | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for row in record["rows"]:
        cells = [f"{row[space][n][level_index]:.4f}" for n in names]
        lines.append(f"| {row['run']} | {row['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_dynamics(path, record):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = record["levels"]
    fig, axes = plt.subplots(2, len(levels), figsize=(3.0 * len(levels), 5.6), squeeze=False)
    short = [r for r in record["rows"] if r["run"] == "short"]
    steps = [r["step"] for r in short]
    for row, space in enumerate(("score", "denoiser")):
        for li, level in enumerate(levels):
            ax = axes[row, li]
            for name in APPROX_ORDER:
                ax.plot(steps, [r[space][name][li] for r in short], "o-", ms=2, label=name)
            ax.set_title(f"{space}, sigma = {level:g}", fontsize=9)
            ax.set_xscale("log")
            ax.set_xlabel("training step")
            lo = min(min(r[space][n][li] for n in APPROX_ORDER[1:]) for r in short)
            ax.set_ylim(max(lo - 0.05, -1.0), 1.01)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


# --- (c) teleportation on the digits model --------------------------------------------------------


def load_classifier_features(path):
    """``features(x (B, 8, 8, 1)) -> (B, F)``: the clean classifier's penultimate layer.

    The pooled activations right before the final linear layer (global average pool of the last
    residual level), restored read-only from ``path`` (``<digits run>/classifier``).
    """
    import orbax.checkpoint as ocp
    from flax import nnx

    from jaxdiff import nets

    directory = os.path.join(os.path.abspath(path), "checkpoints")
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
    )
    step = max(manager.all_steps())
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                          manager.item_metadata(step)["state"])
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                        meta=ocp.args.JsonRestore()))
    manager.close()
    meta = out["meta"]["net"]
    net = nets.create(meta["name"], meta["config"], rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(net)
    nnx.replace_by_pure_dict(state, out["state"]["params"])
    clf = nnx.merge(graphdef, state)

    @jax.jit
    def features(x):
        enc = clf.encoder
        h = enc.conv_in(x.astype(jnp.float32))
        for layer in enc.layers:
            h = layer(h, None) if isinstance(layer, nets.unet.ResBlock) else layer(h)
        h = jax.nn.silu(enc.norm_out(h))
        return jnp.mean(h, axis=(1, 2))

    @jax.jit
    def logits(x):
        return clf(x.astype(jnp.float32))

    return features, logits


@functools.partial(jax.jit, static_argnames=("method", "steps", "skip", "warm"))
def _sample(denoiser, gaussian, process, x_init, *, method, steps, skip, warm):
    ts = timesteps.karras(process, steps, final_zero=True)
    return teleport(None, denoiser, process, x_init, ts, gaussian=gaussian, skip=skip,
                    method=method, warm_start=warm)


def run_configs(denoiser, gaussian, process, x_init, configs, *, chunk, log=print):
    """Samples for each config ``(name, method, steps, skip, warm)`` from the same ``x_init``."""
    out = {}
    for name, method, steps, skip, warm in configs:
        start = time.perf_counter()
        parts = [np.asarray(_sample(denoiser, gaussian, process, x_init[i:i + chunk],
                                    method=method, steps=steps, skip=skip, warm=warm))
                 for i in range(0, x_init.shape[0], chunk)]
        out[name] = np.concatenate(parts)
        log(f"  {name}: {time.perf_counter() - start:.0f} s")
    return out


def teleport_configs(method, steps, skips, *, warm=False):
    """(teleport with skip k) and (plain, steps - k) pairs -- equal network calls for Heun/DPM."""
    configs = []
    for k in skips:
        configs.append((f"{method}/N{steps}/skip{k}", method, steps, k, False))
        if k:
            configs.append((f"{method}/N{steps - k}/plain", method, steps - k, 0, False))
            if warm:
                configs.append((f"{method}/N{steps}/skip{k}/warm", method, steps, k, True))
    return configs


def evaluate_sets(sets, ref_images, features, key, *, num_boot, baseline, reference=None):
    """FD (classifier features) and sliced W (pixels) with bootstrap CIs, and the L2 distance
    of each sample to the same seed's ``reference`` sample."""
    clip = {n: np.clip(x, -1.0, 1.0) for n, x in sets.items()}
    feats = {n: np.asarray(features(jnp.asarray(x))) for n, x in clip.items()}
    ref_feats = np.asarray(features(jnp.asarray(ref_images)))
    flat = {n: x.reshape(x.shape[0], -1) for n, x in clip.items()}
    ref_flat = np.asarray(ref_images).reshape(ref_images.shape[0], -1)
    fd = jax.jit(metrics.frechet_distance)
    sw = jax.jit(functools.partial(metrics.sliced_wasserstein, key, num_projections=256))
    fd_rec = paired_bootstrap(np.random.default_rng(0), fd, feats, ref_feats,
                              num_boot=num_boot, baseline=baseline)
    sw_rec = paired_bootstrap(np.random.default_rng(1), sw, flat, ref_flat,
                              num_boot=num_boot // 2, baseline=baseline)
    out = {}
    for n in sets:
        out[n] = {"fd": fd_rec[n], "sw": sw_rec[n]}
        if reference is not None:
            # Unclipped samples against the reference run of the first len(reference) seeds.
            ref_rows = reference.reshape(reference.shape[0], -1)
            d = np.sqrt(np.sum((sets[n].reshape(sets[n].shape[0], -1)[:ref_rows.shape[0]]
                                - ref_rows) ** 2, axis=1))
            out[n]["l2_to_reference"] = [float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size))]
    return out


def stage_teleport(args, log=print):
    denoiser, process, step = load_unconditional(args.model)
    images = digits_images("train")
    gaussian = analytic.Gaussian.fit(images.reshape(images.shape[0], -1))
    features, logits = load_classifier_features(os.path.join(args.model, "classifier"))
    ref_images = digits_images("all")
    num = 256 if args.quick else 2000
    x_init = 80.0 * jax.random.normal(jax.random.key(2), (num, 8, 8, 1), jnp.float32)
    heun_skips = (0, 2, 4) if args.quick else (0, 2, 4, 5, 6, 8, 10)
    dpm_skips = (0, 4) if args.quick else (0, 2, 4, 5, 6, 8)
    configs = (teleport_configs("edm_heun", 18, heun_skips)
               + teleport_configs("dpm_solver_pp", 20, dpm_skips, warm=True))
    log(f"teleport: {len(configs)} configurations x {num} samples")
    cache = os.path.join(args.workdir, "teleport_samples.npz")
    sets = dict(np.load(cache)) if os.path.exists(cache) and not args.quick else {}
    missing = [c for c in configs if c[0] not in sets]
    sets.update(run_configs(denoiser, gaussian, process, x_init, missing, chunk=min(num, 500),
                            log=log))
    # A fine reference solution (Heun, 64 steps) for the per-seed ODE error.
    fine_n = min(num, 500)
    fine_name = "edm_heun/N64/skip0"
    if fine_name not in sets:
        sets.update(run_configs(denoiser, gaussian, process, x_init[:fine_n],
                                [(fine_name, "edm_heun", 64, 0, False)], chunk=fine_n, log=log))
    if not args.quick:
        np.savez(cache, **sets)
    fine = sets.pop(fine_name)
    results = {}
    for method, steps in (("edm_heun", 18), ("dpm_solver_pp", 20)):
        group = {n: x for n, x in sets.items() if n.startswith(method + "/")}
        base = f"{method}/N{steps}/skip0"
        ev = evaluate_sets(group, ref_images, features, jax.random.key(3),
                           num_boot=40 if args.quick else 200, baseline=base, reference=fine)
        for n, rec in ev.items():
            m, cfg = next((c[1], c) for c in configs if c[0] == n)
            ts = timesteps.karras(process, cfg[2], final_zero=True)
            rec["nfe"] = sampler_nfe(m, ts[cfg[3]:])
            rec["nfe_full"] = sampler_nfe(m, ts)
            rec["skip"], rec["steps"], rec["warm"] = cfg[3], cfg[2], cfg[4]
            rec["target_noise_level"] = float(ts[cfg[3]])
        results[method] = ev
    # Label agreement: does the teleported sample keep the digit of the plain sample?
    for method, steps in (("edm_heun", 18), ("dpm_solver_pp", 20)):
        base = np.asarray(jnp.argmax(logits(jnp.asarray(np.clip(
            sets[f"{method}/N{steps}/skip0"], -1, 1))), -1))
        for n, rec in results[method].items():
            lab = np.asarray(jnp.argmax(logits(jnp.asarray(np.clip(sets[n], -1, 1))), -1))
            rec["same_label_as_skip0"] = float(np.mean(lab == base))
    record = {"model": args.model, "step": step, "num_samples": num,
              "features": "clean classifier, penultimate layer (64 pooled channels)",
              "reference": f"all {ref_images.shape[0]} real digits", "results": results}
    for method in results:
        log(f"\n{method}\n")
        log(markdown_teleport(results[method]))
    plot_teleport(os.path.join(args.workdir, "teleport.png"), results)
    return record


def markdown_teleport(res):
    lines = ["| config | NFE | target sigma | FD (+- boot. SD) | FD - FD(no teleport) [95% CI] | "
             "sliced W | SW - SW(no teleport) [95% CI] | L2 to Heun-64 | same label |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, r in sorted(res.items(), key=lambda kv: (-kv[1]["nfe"], kv[0])):
        fd, sw = r["fd"], r["sw"]
        l2 = r.get("l2_to_reference", [np.nan, np.nan])
        lines.append(
            f"| {n} | {r['nfe']} | {r['target_noise_level']:.3g} | {fd['value']:.3f} +- "
            f"{fd['sd']:.3f} | {fd['diff']:+.3f} [{fd['diff_ci'][0]:+.3f}, "
            f"{fd['diff_ci'][1]:+.3f}] | {sw['value']:.4f} | {sw['diff']:+.4f} "
            f"[{sw['diff_ci'][0]:+.4f}, {sw['diff_ci'][1]:+.4f}] | {l2[0]:.3f} | "
            f"{r.get('same_label_as_skip0', np.nan):.3f} |"
        )
    return "\n".join(lines)


def plot_teleport(path, results):
    """Per method: FD change vs the full grid (95% CI), and the L2 distance to Heun-64, vs NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = (("teleport", "o-"), ("plain", "s--"), ("warm", "^:"))

    def kind_of(name):
        return "plain" if name.endswith("plain") else "warm" if name.endswith("warm") else (
            "teleport")

    fig, axes = plt.subplots(2, len(results), figsize=(5.2 * len(results), 6.6), squeeze=False)
    for col, (method, res) in enumerate(results.items()):
        for kind, style in kinds:
            rows = sorted(((r["nfe"], r) for n, r in res.items()
                           if kind_of(n) == kind or n.endswith("skip0")),
                          key=lambda nr: nr[0])
            if len(rows) < 2:
                continue
            nfe = np.array([n for n, _ in rows])
            diff = np.array([r["fd"]["diff"] for _, r in rows])
            lo, hi = (np.array([r["fd"]["diff_ci"][i] for _, r in rows]) for i in (0, 1))
            axes[0, col].errorbar(nfe, diff, yerr=[np.abs(diff - lo), np.abs(hi - diff)],
                                  fmt=style, ms=4, capsize=2, label=kind)
            axes[1, col].plot(nfe, [r["l2_to_reference"][0] for _, r in rows], style, ms=4,
                              label=kind)
        axes[0, col].axhline(0.0, color="k", lw=0.5)
        axes[0, col].set(title=method, ylabel="FD - FD(full grid), 95% CI")
        axes[1, col].set(xlabel="network calls (NFE)", ylabel="mean L2 to Heun-64 (same seed)")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


# --- (d) the same on exact analytic data ----------------------------------------------------------


def stage_analytic(args, log=print):
    """Teleportation and EV where the data law is known: the digits' Gaussian and GMM."""
    process = jaxdiff.EDMProcess(sigma_data=0.5)
    images = digits_images("train")
    flat = images.reshape(images.shape[0], -1).astype(jnp.float64)
    models = {"gaussian": analytic.Gaussian.fit(flat),
              "gmm10": analytic.GaussianMixture.fit(jax.random.key(0), flat, 10)}
    num = 256 if args.quick else 2000
    x_init = 80.0 * jax.random.normal(jax.random.key(2), (num, 64), jnp.float64)
    skips = (0, 2, 4) if args.quick else (0, 2, 3, 4, 5, 6, 8, 10)
    record = {}
    for data_name, law in models.items():
        denoiser = law.denoiser(process)
        mean, cov = law.moments()
        gaussian = analytic.Gaussian.from_cov(mean, cov + 1e-9 * jnp.eye(64))
        exact_samples = np.asarray(law.sample(jax.random.key(4), 4 * num))
        if data_name == "gaussian":
            # The exact ODE endpoint of x_T is the closed-form flow.
            reference = np.asarray(law.flow(process, x_init, process.t_max, 0.0))
        else:
            reference = np.asarray(_sample(denoiser, gaussian, process, x_init,
                                           method="edm_heun", steps=256, skip=0, warm=False))
        configs = (teleport_configs("edm_heun", 18, skips)
                   + teleport_configs("dpm_solver_pp", 20, skips[:-1], warm=True))
        sets = run_configs(denoiser, gaussian, process, x_init, configs, chunk=num, log=log)
        fd = jax.jit(lambda x, m=mean, c=cov: metrics.gaussian_w2(*metrics.moments(x), m, c) ** 2)
        rows = {}
        for method, steps in (("edm_heun", 18), ("dpm_solver_pp", 20)):
            group = {n: x for n, x in sets.items() if n.startswith(method + "/")}
            fd_rec = paired_bootstrap(np.random.default_rng(0), fd, group, num_boot=100,
                                      baseline=f"{method}/N{steps}/skip0")
            for n, x in group.items():
                cfg = next(c for c in configs if c[0] == n)
                ts = timesteps.karras(process, cfg[2], final_zero=True)
                err = np.sqrt(np.sum((x - reference) ** 2, axis=1))
                rows[n] = {
                    "nfe": sampler_nfe(cfg[1], ts[cfg[3]:]), "skip": cfg[3], "warm": cfg[4],
                    "target_noise_level": float(ts[cfg[3]]),
                    "l2_to_exact_ode": [float(err.mean()), float(err.std(ddof=1) / np.sqrt(num))],
                    "fd_to_exact_law": fd_rec[n],
                    "sw_to_exact_samples": float(metrics.sliced_wasserstein(
                        jax.random.key(5), jnp.asarray(x), jnp.asarray(exact_samples),
                        num_projections=256)),
                }
        ev = explained_variance_curve(
            jax.random.key(1), denoiser, process, jnp.asarray(exact_samples),
            {"gaussian": gaussian}, NOISE_LEVELS[::2], num_samples=512, batch_size=256,
        )
        record[data_name] = {"teleport": rows, "ev": _ev_record(ev)}
        log(f"\nexact data = {data_name} (64-D, fitted to the digits)\n")
        log(markdown_analytic(rows))
        log("\nscore-space EV of the exact denoiser by the moment-matched Gaussian\n")
        log(markdown_ev(record[data_name]["ev"], "score", ("isotropic", "gaussian")))
    return record


def markdown_analytic(rows):
    lines = ["| config | NFE | target sigma | L2 to exact ODE endpoint (+- SE) | "
             "FD to exact law | FD - FD(no teleport) [95% CI] | sliced W to exact samples |",
             "|---|---|---|---|---|---|---|"]
    for n, r in sorted(rows.items(), key=lambda kv: (kv[0].split("/")[0], -kv[1]["nfe"], kv[0])):
        fd = r["fd_to_exact_law"]
        lines.append(
            f"| {n} | {r['nfe']} | {r['target_noise_level']:.3g} | "
            f"{r['l2_to_exact_ode'][0]:.4f} +- {r['l2_to_exact_ode'][1]:.4f} | "
            f"{fd['value']:.4f} | {fd['diff']:+.4f} [{fd['diff_ci'][0]:+.4f}, "
            f"{fd['diff_ci'][1]:+.4f}] | {r['sw_to_exact_samples']:.4f} |")
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------


STAGES = {"ev": stage_ev, "dynamics": stage_dynamics, "teleport": stage_teleport,
          "analytic": stage_analytic}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=[*STAGES, "all"])
    parser.add_argument("--model", default="outputs/digits")
    parser.add_argument("--workdir", default="outputs/gaussian_score")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    for name in (STAGES if args.stage == "all" else [args.stage]):
        start = time.perf_counter()
        if name == "analytic":
            jax.config.update("jax_enable_x64", True)
        record = STAGES[name](args)
        record["seconds"] = time.perf_counter() - start
        with open(os.path.join(args.workdir, f"{name}.json"), "w") as f:
            json.dump(record, f, indent=1)
        print(f"\n{name}: {record['seconds']:.0f} s -> {args.workdir}/{name}.json")


if __name__ == "__main__":
    main()
