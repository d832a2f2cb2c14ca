"""Train a (class-conditional) MLP denoiser on a 2-D toy set, then sample and plot.

    python3 experiments/toy2d/main.py [--config default|smoke] [--workdir DIR] [key=value ...]

Writes to ``DIR`` (default ``outputs/toy2d``): ``checkpoints/`` (resumable: rerun the same
command after an interruption), ``metrics.jsonl``, ``eval.json`` (sliced Wasserstein of 10k
samples per sampler against fresh data, next to the data-vs-data baseline) and ``samples.png``
(data, two samplers, and a classifier-free-guidance panel).
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
from flax import nnx

import jaxdiff
from experiments import common
from experiments.toy2d.config import Config, get_config
from jaxdiff import data, metrics, nets, training
from jaxdiff.guidance import classifier_free

PROCESSES = {
    "vp": lambda: jaxdiff.VPProcess(),
    "cosine": lambda: jaxdiff.CosineVPProcess(),
    "edm": lambda: jaxdiff.EDMProcess(sigma_data=1.0),  # the toy sets have unit variance
    "rf": lambda: jaxdiff.RectifiedFlowProcess(),
}


def build(config: Config):
    """Data iterator, network, process and train setup for ``config``."""
    if config.train.process not in PROCESSES:
        raise ValueError(f"train.process must be one of {sorted(PROCESSES)}; got "
                         f"{config.train.process!r}.")
    key = jax.random.key(config.train.seed)
    x, labels = data.toy2d.sample(jax.random.fold_in(key, 0), config.data.name,
                                  config.data.num_train)
    arrays = {"x": np.asarray(x)}
    num_classes = 0
    if config.data.conditional:
        arrays["label"] = np.asarray(labels)
        num_classes = data.toy2d.num_classes(config.data.name)
    batches = data.batches(arrays, config.train.batch_size, seed=config.train.seed)
    net = nets.create(
        "mlp",
        {"dim": 2, "hidden": config.net.hidden, "depth": config.net.depth,
         "emb_dim": config.net.emb_dim, "num_classes": num_classes},
        rngs=nnx.Rngs(config.train.seed),
    )
    process = PROCESSES[config.train.process]()
    optimizer, _ = training.make_optimizer(
        config.train.lr, warmup_steps=config.train.warmup_steps, schedule=config.train.schedule,
        decay_steps=config.train.steps, end_factor=0.05, clip_norm=config.train.clip_norm,
    )
    averages = [training.EMA(config.train.ema_decay, warmup=True)]
    loss_kwargs = dict(weighting=config.train.weighting, time_sampling=config.train.time_sampling)
    if num_classes:
        loss_kwargs["cond_dropout"] = config.train.cond_dropout
    setup = training.setup_diffusion(
        jax.random.fold_in(key, 1), net, process, optimizer, prediction=config.train.prediction,
        averages=averages, compute_dtype=jnp.bfloat16 if config.train.bf16 else None,
        microbatches=config.train.microbatches, **loss_kwargs,
    )
    return batches, net, process, setup, averages


def train(config: Config, workdir, *, progress=True, log=print):
    """Train (or resume); returns ``(net, process, setup, state, averages)``."""
    return common.train(config, workdir, build, progress=progress, log=log)


def evaluate(config: Config, net, process, setup, state, averages):
    """Samples of every configured sampler, CFG panels, and sliced Wasserstein distances."""
    params = state.averages[averages[0].name]
    denoiser = nets.make_denoiser(setup.graphdef, params, process, config.train.prediction)
    n = config.eval.num_samples
    key = jax.random.key(config.train.seed + 1)
    ref_a, _ = data.toy2d.sample(jax.random.fold_in(key, 0), config.data.name, n)
    ref_b, _ = data.toy2d.sample(jax.random.fold_in(key, 1), config.data.name, n)
    sw_key = jax.random.fold_in(key, 2)

    def sw(a, b):
        return float(metrics.sliced_wasserstein(sw_key, a, b, num_projections=256))

    baseline = sw(ref_a, ref_b)
    cond = setup.null_cond(n) if setup.null_cond is not None and config.data.conditional \
        else None
    results = {"sw_data_vs_data": baseline, "samplers": {}}
    samples = {}
    for i, method in enumerate(config.eval.samplers):
        fn = jax.jit(lambda k, method=method: jaxdiff.sample(
            k, denoiser, process, (n, 2), method=method, steps=config.eval.steps, cond=cond))
        x = fn(jax.random.fold_in(key, 10 + i))
        samples[method] = np.asarray(x)
        value = sw(x, ref_a)
        results["samplers"][method] = {"sw": value, "ratio_to_baseline": value / baseline}
    cfg_panel = {}
    if config.data.conditional and config.eval.cfg_classes > 0:
        m = 500

        @jax.jit
        def guided_sample(k, labels, scale):  # one compilation for every class and scale
            guided = classifier_free(denoiser, process, scale, null_cond=setup.null_cond)
            return jaxdiff.sample(k, guided, process, (m, 2), method=config.eval.samplers[0],
                                  steps=config.eval.steps, cond=labels)

        classes = min(config.eval.cfg_classes, data.toy2d.num_classes(config.data.name))
        for s in config.eval.cfg_scales:
            cfg_panel[float(s)] = [
                np.asarray(guided_sample(jax.random.fold_in(key, 100 + c),
                                         jnp.full((m,), c, jnp.int32), jnp.float32(s)))
                for c in range(classes)
            ]
    return results, samples, np.asarray(ref_a), cfg_panel


def plot(path, config, results, samples, ref, cfg_panel):
    """Data, each sampler's samples, and the CFG panel, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + len(samples) + len(cfg_panel)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.7))
    lim = 3.0
    shown = 2000
    axes[0].scatter(ref[:shown, 0], ref[:shown, 1], s=1, c="k")
    axes[0].set_title(f"data ({config.data.name})", fontsize=9)
    for ax, (method, x) in zip(axes[1:], samples.items()):
        r = results["samplers"][method]
        ax.scatter(x[:shown, 0], x[:shown, 1], s=1, c="C0")
        ax.set_title(f"{method}, {config.eval.steps} steps\nSW {r['sw']:.4f} "
                     f"({r['ratio_to_baseline']:.2f}x data-data)", fontsize=9)
    for ax, (scale, rows) in zip(axes[1 + len(samples):], cfg_panel.items()):
        for c, x in enumerate(rows):
            ax.scatter(x[:, 0], x[:, 1], s=1, c=f"C{c}")
        ax.set_title(f"CFG scale {scale:g} (classes 0-{len(rows) - 1})", fontsize=9)
    for ax in axes:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def run(config: Config, workdir, *, progress=True, log=print):
    """Train, evaluate and plot; returns the evaluation record (also written to eval.json)."""
    start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    net, process, setup, state, averages = train(config, workdir, progress=progress, log=log)
    trained = time.perf_counter()
    results, samples, ref, cfg_panel = evaluate(config, net, process, setup, state, averages)
    plot(os.path.join(workdir, "samples.png"), config, results, samples, ref, cfg_panel)
    results["train_seconds"] = trained - start
    results["total_seconds"] = time.perf_counter() - start
    results["config"] = training.config.to_dict(config)
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(results, f, indent=2)
    if log:
        log(f"sliced W2, {config.eval.num_samples} samples vs {config.eval.num_samples} data "
            f"(data vs data: {results['sw_data_vs_data']:.4f}):")
        for method, r in results["samplers"].items():
            log(f"  {method:<16} {r['sw']:.4f}  ({r['ratio_to_baseline']:.2f}x)")
        log(f"train {results['train_seconds']:.0f} s, total {results['total_seconds']:.0f} s; "
            f"figure: {os.path.join(workdir, 'samples.png')}")
    return results


def parse(argv, default_workdir="outputs/toy2d"):
    return common.parse(argv, get_config, default_workdir=default_workdir,
                        description=__doc__.splitlines()[0])


def main(argv=None):
    config, args = parse(argv)
    run(config, args.workdir, progress=not args.no_progress)


if __name__ == "__main__":
    main()
