"""What the training experiments share: the command line and the resumable training run."""

import argparse

from jaxdiff import training


def parse(argv, get_config, *, default_workdir, description):
    """``--config NAME --workdir DIR [--no-progress] key=value ...`` -> ``(config, args)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="default")
    parser.add_argument("--workdir", default=default_workdir)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    return training.config.override(get_config(args.config), args.overrides), args


def train(config, workdir, build, *, progress=True, log=print):
    """Train (or resume) ``build(config)``'s setup with ``fit``.

    ``build`` returns ``(batches, net, process, setup, averages)``; returns
    ``(net, process, setup, final_state, averages)``.
    """
    batches, net, process, setup, averages = build(config)
    meta = training.describe(process, config.train.prediction, net,
                             config=training.config.to_dict(config))
    result = training.fit(
        setup.state, setup.train_step, batches, num_steps=config.train.steps, workdir=workdir,
        metadata=meta, checkpoint_every=config.train.checkpoint_every, keep=config.train.keep,
        log_every=config.train.log_every, progress=progress,
        log_fn=(lambda r: log(f"step {r['step']:>6}  loss {r['loss']:.4f}  "
                              f"{r['steps_per_s']:.1f} steps/s")) if log else None,
    )
    return net, process, setup, result.state, averages
