"""Guidance transforms at work: a figure panel and the numbers behind it.

    python3 experiments/guidance_demo.py [--quick] [--digits-workdir DIR] [--workdir DIR]

Panels (``WORKDIR/guidance_panel.png``; numbers in ``WORKDIR/guidance.json``):

* **CFG scales** on the class-conditional digits model (one row per scale, one column per digit);
* **classifier guidance** of the same network's unconditional denoiser (null label) by the
  noise-conditional digits classifier, and **EluCD-style** guidance by the clean classifier
  applied to :math:`\\hat x_0`, with the accuracy of each as judged by the clean classifier;
* **AND / NOT** (composable diffusion) on an exact 2-D mixture of four Gaussians with the concepts
  left/right and top/bottom: "left AND top" and "left AND NOT top", with the fraction of
  samples that land in the intended component;
* **inpainting** (bottom half unknown) and **4x super-resolution** (8x8 from 4x4 averages) of
  held-out digits by loss guidance through the denoiser, with the error on the unknown part
  against the unguided baseline;
* **SDEdit** of held-out digits at increasing noise levels.

The digits model and both classifiers are trained on first use and resumed afterwards
(``--digits-workdir``, default ``outputs/digits``: the digits experiment's own run). ``--quick``
uses the smoke configuration in ``outputs/guidance_quick`` (about a minute on a laptop CPU).
"""

import argparse
import json
import os
import pathlib
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff
from experiments.digits import main as digits
from experiments.digits.config import get_config
from jaxdiff import data, training
from jaxdiff.analytic import GaussianMixture
from jaxdiff.guidance import (
    calibrated_classifier_guidance,
    classifier_free,
    classifier_guidance,
    composable,
    inpainting,
    log_prob_from_logits,
    loss_guidance,
    measurement_loss,
    sdedit,
    stack_conds,
    super_resolution,
)

SHAPE = (8, 8, 1)


# --- the digits model and classifiers --------------------------------------------------------


def load_digits_setup(config, workdir, *, progress=False, log=print):
    """The trained digits model, clean classifier and noise-conditional classifier."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        log(f"training the digits model into {workdir} (first use)")
        digits.run(config, workdir, progress=progress, log=log)
    model = training.load_model(workdir)
    classify, clean_accuracy, clean_logits = digits.train_classifier(
        config, workdir, progress=progress)
    noisy_logits, noisy_accuracy = digits.train_noise_classifier(
        config, workdir, model.process, progress=progress)
    accuracy = {"clean_classifier_accuracy": clean_accuracy,
                "noise_classifier_accuracy": noisy_accuracy}
    return model, (classify, clean_logits), noisy_logits, accuracy


def _sample(model, denoiser, key, cond, batch, steps, method="edm_heun"):
    return jaxdiff.sample(key, denoiser, model.process, (batch, *SHAPE), method=method,
                          steps=steps, cond=cond)


def _accuracy(classify, x, labels):
    return float(np.mean(np.asarray(classify(jnp.clip(x, -1, 1))) == np.asarray(labels)))


def guided_digits(model, classifier, noisy_logits, *, steps, per_class, scales, key):
    """CFG, classifier guidance and EluCD-style guidance: sample grids and accuracies."""
    classify, clean_logits = classifier
    labels = jnp.repeat(jnp.arange(10), per_class)
    null = model.null_cond(labels.shape[0])
    unconditional = _Unconditional(model)
    transforms = {
        "cfg": lambda s: classifier_free(model.denoiser, model.process, s, null_cond=null),
        # The unconditional denoiser (null label) guided by log p(y | x_t).
        "classifier": lambda s: classifier_guidance(
            unconditional, model.process, log_prob_from_logits(noisy_logits), s),
        "elucd": lambda s: calibrated_classifier_guidance(
            unconditional, model.process, clean_logits, s),
    }
    grids, results = {}, {}
    for name, transform in transforms.items():
        # The scale is a traced argument: one compilation per transform, not per scale.
        sample = jax.jit(lambda key, s, transform=transform: _sample(
            model, transform(s), key, labels, labels.shape[0], steps))
        for s in scales:
            x = sample(key, jnp.float32(s))
            results[f"{name}_accuracy_at_scale_{s:g}"] = _accuracy(classify, x, labels)
            grids[(name, s)] = np.asarray(x)[::per_class]
    return grids, results


class _Unconditional:
    """The conditional network evaluated at its null label whatever ``cond`` says."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, t, cond=None):
        del cond
        return self.model.denoiser(x, t, self.model.null_cond(x.shape[0]))


# --- AND / NOT on an exact 2-D mixture -------------------------------------------------------

LEFT, RIGHT, TOP, BOTTOM, NULL = 0, 1, 2, 3, 4
CORNERS = np.array([[-2.0, 2.0], [2.0, 2.0], [-2.0, -2.0], [2.0, -2.0]])  # TL, TR, BL, BR


def concept_mixture():
    """Four equal Gaussians at the corners, labelled by column (left/right) and by row."""
    weights, stds = jnp.full(4, 0.25), jnp.full(4, 0.5)
    by_column = GaussianMixture.create(weights, jnp.asarray(CORNERS), stds=stds,
                                       labels=jnp.array([0, 1, 0, 1]))
    by_row = GaussianMixture.create(weights, jnp.asarray(CORNERS), stds=stds,
                                    labels=jnp.array([0, 0, 1, 1]))
    return by_column, by_row


def concept_denoiser(by_column, by_row, process, x, t, cond):
    """Exact :math:`D(x, t \\mid c)` for c in {left, right, top, bottom}; ``NULL`` = none."""
    col = by_column.denoise(process, x, t, y=jnp.clip(cond, 0, 1))
    row = by_row.denoise(process, x, t, y=jnp.clip(cond - 2, 0, 1))
    uncond = by_column.denoise(process, x, t)
    c = cond[:, None]
    return jnp.where(c == NULL, uncond, jnp.where(c < 2, col, row))


def and_not(key, *, num=2000, steps=40):
    """Samples for "left AND top" and "left AND NOT top" and the fraction in the target corner."""
    process = jaxdiff.EDMProcess(sigma_data=2.0)
    by_column, by_row = concept_mixture()
    denoiser = jax.tree_util.Partial(concept_denoiser, by_column, by_row, process)
    null = jnp.full((num,), NULL)
    conds = stack_conds(jnp.full((num,), LEFT), jnp.full((num,), TOP))
    out = {"unconditional": jaxdiff.sample(key, denoiser, process, (num, 2), steps=steps,
                                           cond=null)}
    targets = {"left AND top": (jnp.array([1.0, 1.0]), 0), "left AND NOT top": (
        jnp.array([1.0, -1.0]), 2)}
    fractions = {}
    for name, (weights, corner) in targets.items():
        guided = composable(denoiser, process, weights, null_cond=null)
        x = jaxdiff.sample(key, guided, process, (num, 2), steps=steps, cond=conds)
        out[name] = x
        nearest = np.argmin(((np.asarray(x)[:, None] - CORNERS) ** 2).sum(-1), axis=1)
        fractions[f"fraction_in_target_{name.replace(' ', '_')}"] = float(
            np.mean(nearest == corner))
    return {k: np.asarray(v) for k, v in out.items()}, fractions


# --- inverse problems and SDEdit on digits -----------------------------------------------------


def inverse_problems(model, key, *, steps, num, scale):
    """Inpainting and 4x super-resolution by loss guidance of the unconditional denoiser."""
    test_x, _ = data.load_digits("test")
    truth = jnp.asarray(test_x[:num])
    mask = jnp.concatenate([jnp.ones((4, 8, 1)), jnp.zeros((4, 8, 1))])  # top half seen
    tasks = {"inpainting": inpainting(mask), "super_resolution": super_resolution(2)}
    base = _Unconditional(model)

    def sample(denoiser):
        return np.asarray(jax.jit(lambda k: _sample(model, denoiser, k, None, num, steps,
                                                    method="ddim"))(key))

    unguided = sample(base)
    out, results = {"truth": np.asarray(truth)}, {}
    for name, operator in tasks.items():
        y = operator(truth)
        guided = loss_guidance(base, model.process, measurement_loss(operator, y), scale)
        x = sample(guided)
        out[name] = x
        out[f"{name}_observed"] = np.asarray(y)
        results[f"{name}_measurement_error"] = float(np.mean((operator(x) - y) ** 2))
        results[f"{name}_measurement_error_unguided"] = float(
            np.mean((operator(unguided) - y) ** 2))
        results[f"{name}_mse_to_truth"] = float(np.mean((x - truth) ** 2))
        results[f"{name}_mse_to_truth_unguided"] = float(np.mean((unguided - truth) ** 2))
    return out, results


def sdedit_levels(model, key, *, steps, num, levels):
    """SDEdit of held-out digits (conditioned on their own label) at several noise levels."""
    test_x, test_y = data.load_digits("test")
    x_ref, labels = jnp.asarray(test_x[:num]), jnp.asarray(test_y[:num])
    out = {"reference": np.asarray(x_ref)}
    results = {}
    for level in levels:
        x = sdedit(key, model.denoiser, model.process, x_ref, noise_level=level, steps=steps,
                   cond=labels)
        out[level] = np.asarray(x)
        results[f"sdedit_rms_change_at_{level:g}"] = float(np.sqrt(np.mean((x - x_ref) ** 2)))
    return out, results


# --- the figure --------------------------------------------------------------------------------


def _tile(images, cols):
    images = np.clip((np.asarray(images)[..., 0] + 1) / 2, 0, 1)
    rows = -(-images.shape[0] // cols)
    pad = rows * cols - images.shape[0]
    images = np.concatenate([images, np.zeros((pad, 8, 8))]) if pad else images
    return images.reshape(rows, cols, 8, 8).transpose(0, 2, 1, 3).reshape(rows * 8, cols * 8)


def plot(path, grids, scales, concepts, inverse, edits, levels):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(18, 5.5))
    for ax, name, title in zip(axes[0, :3], ("cfg", "classifier", "elucd"),
                               ("CFG", "noise-classifier guidance", "EluCD (clean classifier)")):
        ax.imshow(np.concatenate([_tile(grids[(name, s)], 10) for s in scales]), cmap="gray_r",
                  vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{title}; rows: scale {', '.join(f'{s:g}' for s in scales)}", fontsize=9)
        ax.axis("off")
    ax = axes[0, 3]
    ax.scatter(*concepts["unconditional"].T, s=2, c="0.7", label="unconditional")
    ax.scatter(*concepts["left AND top"].T, s=2, c="tab:blue", label="left AND top")
    ax.scatter(*concepts["left AND NOT top"].T, s=2, c="tab:red", label="left AND NOT top")
    ax.set_aspect("equal")
    ax.legend(fontsize=8, markerscale=4, loc="upper right")
    ax.set_title("composable diffusion on an exact 2-D mixture", fontsize=9)
    n = min(10, inverse["truth"].shape[0])
    for ax, name, title in zip(axes[1, :2], ("inpainting", "super_resolution"),
                               ("inpainting (top half seen)", "4x super-resolution")):
        observed = inverse[f"{name}_observed"][:n]
        if observed.shape[1:] != SHAPE:  # low-resolution measurement: show it upsampled
            observed = np.repeat(np.repeat(observed, 2, axis=1), 2, axis=2)
        rows = [inverse["truth"][:n], observed, inverse[name][:n]]
        ax.imshow(np.concatenate([_tile(r, n) for r in rows]), cmap="gray_r", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title(f"{title}; rows: truth, observed, guided sample", fontsize=9)
        ax.axis("off")
    ax = axes[1, 2]
    rows = [edits["reference"][:n]] + [edits[level][:n] for level in levels]
    ax.imshow(np.concatenate([_tile(r, n) for r in rows]), cmap="gray_r", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_title(f"SDEdit; rows: reference, noise level {', '.join(f'{v:g}' for v in levels)}",
                 fontsize=9)
    ax.axis("off")
    axes[1, 3].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def run(*, quick=False, digits_workdir=None, workdir=None, progress=False, log=print):
    """Train what is missing, draw every panel, write the figure and ``guidance.json``."""
    start = time.perf_counter()
    config = get_config("smoke" if quick else "default")
    digits_workdir = digits_workdir or ("outputs/guidance_quick/digits" if quick
                                        else "outputs/digits")
    workdir = workdir or ("outputs/guidance_quick" if quick else "outputs/guidance")
    os.makedirs(workdir, exist_ok=True)
    model, classifier, noisy_logits, results = load_digits_setup(
        config, digits_workdir, progress=progress, log=log)
    key = jax.random.key(0)
    steps = 8 if quick else 32
    scales = (0.0, 1.0, 3.0)
    grids, numbers = guided_digits(model, classifier, noisy_logits, steps=steps,
                                   per_class=2 if quick else 20, scales=scales, key=key)
    results.update(numbers)
    concepts, numbers = and_not(jax.random.fold_in(key, 1), num=400 if quick else 2000)
    results.update(numbers)
    inverse, numbers = inverse_problems(model, jax.random.fold_in(key, 2),
                                        steps=steps if quick else 100,
                                        num=10 if quick else 100, scale=1.0)
    results.update(numbers)
    levels = (0.3, 1.0, 3.0)
    edits, numbers = sdedit_levels(model, jax.random.fold_in(key, 3), steps=steps,
                                   num=10, levels=levels)
    results.update(numbers)
    path = os.path.join(workdir, "guidance_panel.png")
    plot(path, grids, scales, concepts, inverse, edits, levels)
    results["seconds"] = time.perf_counter() - start
    with open(os.path.join(workdir, "guidance.json"), "w") as f:
        json.dump(results, f, indent=2)
    if log:
        for k, v in results.items():
            log(f"{k}: {v}")
        log(f"figure {path}")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--digits-workdir", default=None)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    run(quick=args.quick, digits_workdir=args.digits_workdir, workdir=args.workdir,
        progress=True)


if __name__ == "__main__":
    main()
