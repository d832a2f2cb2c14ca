"""Likelihoods of trained models: toy2d NLL, digits bits/dim, digits diffusion classifier.

    python3 experiments/likelihood/main.py STAGE [--toy2d-model outputs/toy2d]
        [--digits-model outputs/digits] [--workdir outputs/likelihood] [--quick]

Stages (``all`` runs them in order; each writes ``WORKDIR/<stage>.json`` and prints a table):

* ``toy2d``       negative log-likelihood (nats) of held-out 8-Gaussians points under the toy2d
                  model's unconditional branch: probability-flow ODE (exact divergence,
                  Tsit5) and the continuous ELBO, next to the exact data NLL and the PF-ODE
                  NLL of the exact denoiser. A missing model is trained first (the toy2d
                  ``default`` config, about 1.5 min).
* ``bpd``         bits per dimension of the digits test split (17 grey levels, uniform
                  dequantisation, bin width 2/16): PF-ODE (Hutchinson, fixed Heun grid, checked
                  against Tsit5 on a subset) and ELBO, unconditional and class-conditional;
                  baselines: the uniform distribution over levels and a full-covariance
                  Gaussian fitted to the training split.
* ``classifier``  zero-shot diffusion-classifier accuracy on the digits test split vs the
                  number of noise samples, for the ELBO weighting and the paper's uniform
                  one, plus successive elimination.

``--quick`` shrinks every stage to a smoke run (few points and samples).
"""

import argparse
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

from jaxdiff import analytic
from jaxdiff import likelihood as L

STAGES = ("toy2d", "bpd", "classifier")


def load_model(path):
    """``(denoiser, process, null_label)`` of a checkpoint; parameters are jit arguments.

    ``denoiser(x, t, cond)`` is a :class:`jax.tree_util.Partial` over the EMA parameters;
    ``cond`` is an int label array (the null label gives the unconditional branch).
    """
    from jaxdiff import nets, training

    model = training.load_model(path)
    fn = nets.make_denoiser_fn(model.graphdef, model.process, model.prediction)
    null_label = int(np.asarray(model.null_cond(1))[0])
    return jax.tree_util.Partial(fn, model.params), model.process, null_label


def _labels(value, n):
    return jnp.full((n,), value, jnp.int32)


def _mean_se(values):
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))


def _batched(fn, arrays, batch):
    """Apply a compiled ``fn`` to slices of ``batch`` rows (padding the last), concatenated."""
    n = arrays[0].shape[0]
    outs = []
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        chunk = [a[start:stop] for a in arrays]
        pad = batch - (stop - start)
        if pad:
            chunk = [jnp.concatenate([c, jnp.repeat(c[-1:], pad, 0)]) for c in chunk]
        idx = jnp.arange(start, start + batch)
        out = fn(*chunk, idx)
        keep = stop - start
        outs.append(jax.tree.map(lambda o, k=keep: np.asarray(o)[:k], out))
    return jax.tree.map(lambda *o: np.concatenate(o), *outs)


def _write(workdir, stage, record, log):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, f"{stage}.json"), "w") as f:
        json.dump(record, f, indent=2)
    log(f"wrote {os.path.join(workdir, stage + '.json')}")


def _table(rows, log):
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        log(f"  {name:<{width}}  {value}")


# --- toy2d: NLL in nats -------------------------------------------------------------------------


def stage_toy2d(args, log):
    from jaxdiff.data import toy2d

    if not os.path.isdir(os.path.join(args.toy2d_model, "checkpoints")):
        from experiments.toy2d.config import get_config
        from experiments.toy2d.main import train

        log(f"training the toy2d model into {args.toy2d_model}")
        train(get_config("smoke" if args.quick else "default"), args.toy2d_model,
              progress=False, log=log)
    denoiser, process, null = load_model(args.toy2d_model)
    n = 64 if args.quick else 2000
    x, _ = toy2d.sample(jax.random.key(123), "8gaussians", n)
    x = x.astype(jnp.float64) if jax.config.jax_enable_x64 else x
    mix = toy2d.gaussian_mixture("8gaussians")
    exact = mix.denoiser(process)
    uncond = _labels(null, n)
    rtol = 1e-5

    @jax.jit
    def run(x, cond):
        pf = L.log_likelihood(denoiser, process, x, cond=cond, rtol=rtol, atol=rtol)
        pf_exact = L.log_likelihood(exact, process, x, rtol=rtol, atol=rtol)
        bound = L.elbo(jax.random.key(7), denoiser, process, x, cond=cond,
                       num_samples=16 if args.quick else 256)
        return pf, pf_exact, bound

    t0 = time.perf_counter()
    pf, pf_exact, bound = run(x, uncond)
    seconds = time.perf_counter() - t0
    data_nll = -np.asarray(mix.data_log_prob(x))
    record = {
        "points": n,
        "exact_data_nll": _mean_se(data_nll),
        "pf_ode_exact_denoiser_nll": _mean_se(-np.asarray(pf_exact.log_prob)),
        "pf_ode_model_nll": _mean_se(-np.asarray(pf.log_prob)),
        "elbo_model_nll_bound": _mean_se(-np.asarray(bound.elbo)),
        "elbo_mc_se_mean": float(np.mean(bound.std_error)),
        "pf_ode_mean_steps": float(np.mean(pf.num_steps)),
        "seconds": seconds,
        "note": "nats per point (D = 2); mean and SE over the points; PF-ODE at t_min = "
                f"{float(process.t_min)} with rtol = atol = {rtol}",
    }
    log(f"toy2d NLL (nats, {n} held-out 8-Gaussians points, mean +- SE):")
    _table([(k, f"{v[0]:.4f} +- {v[1]:.4f}") for k, v in record.items()
            if isinstance(v, tuple)], log)
    _write(args.workdir, "toy2d", record, log)
    return record


# --- digits: bits per dimension -----------------------------------------------------------------


def stage_bpd(args, log):
    from jaxdiff import data

    denoiser, process, null = load_model(args.digits_model)
    images, labels = data.load_digits("test")
    train_images, _ = data.load_digits("train")
    n = 16 if args.quick else images.shape[0]
    x = jnp.asarray(images[:n])
    y = jnp.asarray(labels[:n])
    levels = data.digits.NUM_LEVELS
    dim = int(np.prod(x.shape[1:]))
    batch = 16 if args.quick else 120
    steps = 8 if args.quick else 64
    probes = 2 if args.quick else 4
    elbo_samples = 8 if args.quick else 256
    key = jax.random.key(0)
    y_deq = L.dequantize(jax.random.fold_in(key, 1), x, num_levels=levels)

    def bpd(log_prob):
        return np.asarray(L.bits_per_dim(log_prob, dim, num_levels=levels))

    @jax.jit
    def pf_fixed(xb, cb, idx):
        out = L.log_likelihood(denoiser, process, xb, cond=cb, key=jax.random.fold_in(key, 2),
                               divergence_method="hutchinson", num_probes=probes,
                               solver="heun", steps=steps, example_index=idx)
        return out.log_prob, out.std_error

    @jax.jit
    def pf_adaptive(xb, cb, idx):
        out = L.log_likelihood(denoiser, process, xb, cond=cb, key=jax.random.fold_in(key, 2),
                               divergence_method="hutchinson", num_probes=probes,
                               solver="tsit5", rtol=1e-4, atol=1e-4, example_index=idx)
        return out.log_prob, out.std_error, out.num_steps

    def bound_from(t_min):
        @jax.jit
        def bound(xb, cb, idx):
            out = L.elbo(jax.random.fold_in(key, 3), denoiser, process, xb, cond=cb,
                         num_samples=elbo_samples, example_index=idx, chunk=32, t_min=t_min)
            return out.elbo, out.std_error

        return bound

    # The EDM-trained network is barely trained below noise level ~0.03 (lognormal noise
    # levels), where the ELBO weights errors by 1/noise^2; the bound holds for any t_0, so it is
    # also reported with the Gaussian decoder at noise level 0.03 (a quarter of a grey level).
    t0_values = {"t0_min": None, "t0_0.03": float(process.t_from_noise_level(0.03))}

    record = {"images": n, "levels": levels, "uniform_baseline_bpd": math.log2(levels)}
    # Fitted to dequantised training images, so no direction has a vanishing variance.
    train_deq = L.dequantize(jax.random.fold_in(key, 4), jnp.asarray(train_images),
                             num_levels=levels)
    gauss = analytic.Gaussian.fit(train_deq.reshape(train_deq.shape[0], -1))
    record["gaussian_fit_bpd"] = _mean_se(bpd(gauss.data_log_prob(y_deq.reshape(n, -1))))
    t0 = time.perf_counter()
    for name, cond in (("unconditional", _labels(null, n)), ("conditional", y)):
        lp, se = _batched(pf_fixed, [y_deq, cond], batch)
        record[f"pf_ode_heun{steps}_{name}_bpd"] = _mean_se(bpd(lp))
        for label, t_min in t0_values.items():
            lp_e, se_e = _batched(bound_from(t_min), [y_deq, cond], batch)
            record[f"elbo_{label}_{name}_bpd"] = _mean_se(bpd(lp_e))
            record[f"elbo_{label}_{name}_mc_se_bpd"] = float(np.mean(se_e) / (dim * math.log(2)))
    # The fixed grid against the adaptive solver on a subset (same probes, unconditional).
    m = min(n, 16 if args.quick else 48)
    cond = _labels(null, m)
    lp_a, _, steps_a = _batched(pf_adaptive, [y_deq[:m], cond], min(batch, m))
    lp_f, _ = _batched(pf_fixed, [y_deq[:m], cond], min(batch, m))
    record["subset"] = m
    record["pf_ode_tsit5_subset_bpd"] = _mean_se(bpd(lp_a))
    record[f"pf_ode_heun{steps}_subset_bpd"] = _mean_se(bpd(lp_f))
    record["heun_minus_tsit5_bpd_max_abs"] = float(np.max(np.abs(bpd(lp_f) - bpd(lp_a))))
    record["tsit5_mean_steps"] = float(np.mean(steps_a))
    record["seconds"] = time.perf_counter() - t0
    log(f"digits bits/dim ({n} test images, {levels} levels, mean +- SE over images):")
    _table([(k, f"{v[0]:.4f} +- {v[1]:.4f}" if isinstance(v, tuple) else f"{v:.4g}")
            for k, v in record.items()], log)
    _write(args.workdir, "bpd", record, log)
    return record


# --- digits: diffusion classifier ---------------------------------------------------------------


def stage_classifier(args, log):
    from jaxdiff import data

    denoiser, process, _ = load_model(args.digits_model)
    images, labels = data.load_digits("test")
    n = 20 if args.quick else images.shape[0]
    x = jnp.asarray(images[:n])
    y = np.asarray(labels[:n])
    classes = jnp.arange(data.digits.NUM_CLASSES)
    budgets = (2, 4) if args.quick else (5, 10, 25, 50)
    elimination = ((2, 4), (3, 1)) if args.quick else ((20, 100), (3, 1))
    batch = 10 if args.quick else 40
    key = jax.random.key(1)

    def accuracy(num_samples, keep, weighting):
        @jax.jit
        def fn(xb, idx):
            out = L.diffusion_classifier(key, denoiser, process, xb, classes,
                                         num_samples=num_samples, keep=keep,
                                         weighting=weighting, example_index=idx, chunk=4)
            return out.label

        t0 = time.perf_counter()
        pred = _batched(fn, [x], batch)
        acc = float(np.mean(pred == y))
        return acc, math.sqrt(acc * (1 - acc) / n), time.perf_counter() - t0

    rows, record = [], {"images": n, "results": []}
    for weighting in ("elbo", "uniform"):
        for budget in budgets:
            acc, se, sec = accuracy(budget, None, weighting)
            nfe = budget * classes.shape[0]
            record["results"].append(dict(weighting=weighting, num_samples=[budget], keep=[1],
                                          nfe_per_image=nfe, accuracy=acc, se=se, seconds=sec))
            rows.append((f"{weighting:8s} n={budget:<4d} NFE={nfe:<5d}", f"{acc:.3f} +- {se:.3f}"))
        (n1, n2), (k1, k2) = elimination
        acc, se, sec = accuracy((n1, n2), (k1, k2), weighting)
        nfe = n1 * classes.shape[0] + (n2 - n1) * k1
        record["results"].append(dict(weighting=weighting, num_samples=[n1, n2], keep=[k1, k2],
                                      nfe_per_image=nfe, accuracy=acc, se=se, seconds=sec))
        rows.append((f"{weighting:8s} n={n1}->{n2} keep {k1} NFE={nfe}", f"{acc:.3f} +- {se:.3f}"))
    log(f"digits diffusion classifier ({n} test images; accuracy +- binomial SE):")
    _table(rows, log)
    _write(args.workdir, "classifier", record, log)
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=[*STAGES, "all"])
    parser.add_argument("--toy2d-model", default="outputs/toy2d")
    parser.add_argument("--digits-model", default="outputs/digits")
    parser.add_argument("--workdir", default="outputs/likelihood")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    stages = STAGES if args.stage == "all" else (args.stage,)
    runners = {"toy2d": stage_toy2d, "bpd": stage_bpd, "classifier": stage_classifier}
    return {s: runners[s](args, print) for s in stages}


if __name__ == "__main__":
    main()
