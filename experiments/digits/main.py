"""Class-conditional diffusion on scikit-learn's 8x8 digits, with classifier-free guidance.

    python3 experiments/digits/main.py [--config default|smoke] [--workdir DIR] [key=value ...]

Three stages, each resumable (rerun the same command after an interruption):

1. a clean digits classifier (``DIR/classifier``), reported on the held-out split;
2. the class-conditional UNet (``DIR/checkpoints``, ``DIR/metrics.jsonl``), trained with
   condition dropout so one network gives both the conditional and unconditional denoiser;
3. evaluation (``DIR/eval.json``, ``DIR/samples.png``): ``eval.num_samples`` CFG samples, an
   equal number per class, labelled by the classifier; the fraction labelled as the requested
   class is the CFG accuracy. The figure shows one row per class for each scale in
   ``eval.grid_scales``.
"""

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
import optax
from flax import nnx

import jaxdiff
from experiments import common
from experiments.digits.config import Config, get_config
from jaxdiff import data, nets, training
from jaxdiff.guidance import classifier_free

NUM_CLASSES = 10


def make_process(config: Config):
    if config.train.process == "edm":
        return jaxdiff.EDMProcess(sigma_data=config.train.sigma_data)
    if config.train.process == "vp":
        return jaxdiff.VPProcess()
    raise ValueError(f"train.process must be 'edm' or 'vp'; got {config.train.process!r}.")


# --- 1. the clean classifier -----------------------------------------------------------------


def _classifier_loss(graphdef):
    def loss_fn(params, batch, key, index):
        del key, index
        logits = nnx.merge(graphdef, params)(batch["x"])
        per = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["label"])
        return jnp.mean(per), {}

    return loss_fn


def _fit_classifier(cc, name, workdir, make_loss, *, seed, progress):
    """Train (or resume) the network ``name`` on the digits labels in ``DIR/name``.

    ``make_loss(graphdef)`` gives the loss; returns ``(graphdef, trained params)``.
    """
    net = nets.create(name, {"channels": 1, "num_classes": NUM_CLASSES,
                             "base_channels": cc.base_channels}, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(net)
    params = nnx.to_pure_dict(params)
    images, labels = data.load_digits("train")
    batches = data.batches({"x": images, "label": labels}, cc.batch_size, seed=seed)
    optimizer, _ = training.make_optimizer(cc.lr, warmup_steps=min(100, cc.steps // 10),
                                           schedule="cosine", decay_steps=cc.steps)
    state = training.create_train_state(jax.random.key(seed), params, optimizer)
    step = training.make_train_step(make_loss(graphdef), optimizer)
    net_name, net_config = nets.config_of(net)
    result = training.fit(state, step, batches, num_steps=cc.steps,
                          workdir=os.path.join(workdir, name),
                          metadata={"net": {"name": net_name, "config": net_config}},
                          checkpoint_every=cc.steps, keep=1, log_every=max(1, cc.steps // 5),
                          progress=progress)
    return graphdef, result.state.params


def train_classifier(config: Config, workdir, *, progress=True):
    """Train (or resume) the clean classifier.

    Returns:
        ``(classify_fn, test_accuracy, logits_fn)``: ``classify_fn(x) -> (B,)`` labels and
        ``logits_fn(x) -> (B, 10)`` for images ``(B, 8, 8, 1)`` in [-1, 1].
    """
    graphdef, params = _fit_classifier(config.classifier, "classifier", workdir,
                                       _classifier_loss, seed=config.train.seed + 7,
                                       progress=progress)

    def logits_fn(x):
        return nnx.merge(graphdef, params)(x)

    @jax.jit
    def classify(x):
        return jnp.argmax(logits_fn(x), axis=-1)

    test_x, test_y = data.load_digits("test")
    accuracy = float(np.mean(np.asarray(classify(test_x)) == test_y))
    return classify, accuracy, logits_fn


def _noise_classifier_loss(graphdef, process):
    """Cross-entropy of the noise-conditional classifier on ``x_t``, log-SNR uniform in range."""
    classify = nets.make_classifier_fn(graphdef, process)
    lo, hi = process.log_snr(process.t_max), process.log_snr(process.t_min)

    def loss_fn(params, batch, key, index):
        del index
        x0 = batch["x"]
        k_t, k_x = jax.random.split(key)
        log_snr = jax.random.uniform(k_t, (x0.shape[0],), minval=lo, maxval=hi)
        t = process.t_from_log_snr(log_snr)
        x_t, _ = process.sample_marginal(k_x, x0, t)
        logits = classify(params, x_t, t)
        per = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["label"])
        return jnp.mean(per), {}

    return loss_fn


def train_noise_classifier(config: Config, workdir, process, *, progress=True):
    """Train (or resume) the noise-conditional classifier of ``log p(y | x_t)``.

    Trained on ``x_t`` from the diffusion model's process with log-SNR uniform over the
    process's range, so it guides at every noise level (``DIR/noise_classifier``).

    Returns:
        ``(logits_fn, accuracy)``: ``logits_fn(x_t, t) -> (B, 10)`` and the held-out accuracy
        at noise levels ``sigma/alpha`` in ``(0.05, 0.5, 2)`` (a dict).
    """
    graphdef, params = _fit_classifier(
        config.noise_classifier, "noise_classifier", workdir,
        lambda g: _noise_classifier_loss(g, process), seed=config.train.seed + 11,
        progress=progress)
    logits_fn = nets.make_classifier(graphdef, params, process)

    test_x, test_y = data.load_digits("test")
    accuracy = {}
    for i, level in enumerate((0.05, 0.5, 2.0)):
        t = jnp.full((test_x.shape[0],), process.t_from_noise_level(level))
        x_t, _ = process.sample_marginal(jax.random.key(1000 + i), test_x, t)
        predicted = np.asarray(jnp.argmax(jax.jit(logits_fn)(x_t, t), axis=-1))
        accuracy[f"{level:g}"] = float(np.mean(predicted == test_y))
    return logits_fn, accuracy


# --- 2. the diffusion model --------------------------------------------------------------------


def build(config: Config):
    """Batches, network, process and train setup."""
    tc = config.train
    images, labels = data.load_digits("train")
    batches = data.batches({"x": images, "label": labels}, tc.batch_size, seed=tc.seed)
    nc = config.net
    net = nets.create(
        "unet",
        {"channels": 1, "image_size": 8, "base_channels": nc.base_channels,
         "channel_mult": list(nc.channel_mult), "num_res_blocks": nc.num_res_blocks,
         "attn_resolutions": list(nc.attn_resolutions), "num_heads": nc.num_heads,
         "num_classes": NUM_CLASSES},
        rngs=nnx.Rngs(tc.seed),
    )
    process = make_process(config)
    optimizer, _ = training.make_optimizer(tc.lr, warmup_steps=tc.warmup_steps,
                                           schedule=tc.schedule, decay_steps=tc.steps,
                                           end_factor=0.05, clip_norm=tc.clip_norm)
    averages = [training.EMA(tc.ema_decay, warmup=True)]
    setup = training.setup_diffusion(
        jax.random.key(tc.seed), net, process, optimizer, prediction=tc.prediction,
        averages=averages, compute_dtype=jnp.bfloat16 if tc.bf16 else None,
        weighting=tc.weighting, time_sampling=tc.time_sampling, cond_dropout=tc.cond_dropout,
        cep_gamma=tc.cep_gamma,
    )
    return batches, net, process, setup, averages


def train(config: Config, workdir, *, progress=True, log=print):
    """Train (or resume); returns ``(net, process, setup, state, averages)``."""
    return common.train(config, workdir, build, progress=progress, log=log)


# --- 3. evaluation -----------------------------------------------------------------------------


def make_guided_sampler(config: Config, denoiser, process, null_cond):
    """``sample(key, labels (N,), scale) -> (N, 8, 8, 1)`` CFG samples (one compilation per N)."""

    @jax.jit
    def sample(key, labels, scale):
        guided = classifier_free(denoiser, process, scale, null_cond=null_cond)
        return jaxdiff.sample(key, guided, process, (labels.shape[0], 8, 8, 1),
                              method=config.eval.method, steps=config.eval.steps, cond=labels)

    return lambda key, labels, scale: np.asarray(
        sample(key, jnp.asarray(labels, jnp.int32), jnp.float32(scale)))


def evaluate(config: Config, process, setup, state, averages, classify):
    params = state.averages[averages[0].name]
    denoiser = nets.make_denoiser(setup.graphdef, params, process, config.train.prediction)
    sampler = make_guided_sampler(config, denoiser, process, setup.null_cond)
    per_class = max(1, config.eval.num_samples // NUM_CLASSES)
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    key = jax.random.key(config.train.seed + 100)
    x = sampler(key, labels, config.eval.cfg_scale)
    predicted = np.asarray(classify(jnp.asarray(np.clip(x, -1, 1))))
    hits = predicted == labels
    results = {
        "cfg_scale": config.eval.cfg_scale,
        "num_samples": int(labels.size),
        "cfg_accuracy": float(hits.mean()),
        "cfg_accuracy_per_class": [float(hits[labels == c].mean()) for c in range(NUM_CLASSES)],
    }
    grid_labels = np.repeat(np.arange(NUM_CLASSES), 10)
    grids = {}
    for s in config.eval.grid_scales:
        g = sampler(jax.random.fold_in(key, 1), grid_labels, s)
        grids[float(s)] = g
        results[f"accuracy_at_scale_{s:g}"] = float(np.mean(
            np.asarray(classify(jnp.asarray(np.clip(g, -1, 1)))) == grid_labels))
    return results, grids


def plot(path, grids, real):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("real (held out)", real)] + [(f"CFG scale {s:g}", g) for s, g in grids.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8))
    for ax, (title, images) in zip(np.atleast_1d(axes), panels):
        images = np.clip((np.asarray(images)[:100, ..., 0] + 1) / 2, 0, 1)
        rows = images.reshape(10, 10, 8, 8).transpose(0, 2, 1, 3).reshape(80, 80)
        ax.imshow(rows, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def run(config: Config, workdir, *, progress=True, log=print):
    """All three stages; returns the evaluation record (also written to ``eval.json``)."""
    start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    classify, clf_accuracy, _ = train_classifier(config, workdir, progress=progress)
    if log:
        log(f"clean classifier: held-out accuracy {clf_accuracy:.4f}")
    net, process, setup, state, averages = train(config, workdir, progress=progress, log=log)
    trained = time.perf_counter()
    results, grids = evaluate(config, process, setup, state, averages, classify)
    test_x, test_y = data.load_digits("test")
    real = np.concatenate([test_x[test_y == c][:10] for c in range(NUM_CLASSES)])
    plot(os.path.join(workdir, "samples.png"), grids, real)
    results["classifier_test_accuracy"] = clf_accuracy
    results["train_seconds"] = trained - start
    results["total_seconds"] = time.perf_counter() - start
    results["config"] = training.config.to_dict(config)
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(results, f, indent=2)
    if log:
        log(f"CFG scale {config.eval.cfg_scale:g}: {results['cfg_accuracy']:.3f} of "
            f"{results['num_samples']} samples classified as the requested digit")
        log(f"total {results['total_seconds']:.0f} s; figure "
            f"{os.path.join(workdir, 'samples.png')}")
    return results


def main(argv=None):
    config, args = common.parse(argv, get_config, default_workdir="outputs/digits",
                                description=__doc__.splitlines()[0])
    run(config, args.workdir, progress=not args.no_progress)


if __name__ == "__main__":
    main()
