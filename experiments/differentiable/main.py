"""Differentiable sampling: remat memory, learned grids, reward fine-tuning through the sampler.

    python3 experiments/differentiable/main.py [--quick] [--parts remat,grids,draft]
        [--out outputs/differentiable] [--model DIR]

Parts (see each module's docstring):
  remat   time and compiled peak memory of jax.grad through 10/100/1000-step samplers, without
          remat, with per-step ("full") and nested sqrt(N) remat, and diffrax's adjoints;
  grids   learned grids (NFE 4, 6, 8, 10) vs uniform-t / log-SNR / Karras on exact mixtures,
          held-out seeds and an unseen mixture, paired-bootstrap 95% intervals;
  draft   DRaFT-1 reward fine-tuning of the toy2d model (``--model``: a toy2d run directory;
          default outputs/demo, else a smoke model is trained into OUT/toy2d_smoke).
Writes OUT/results.json (and results_quick.json with --quick) and OUT/*.png; prints tables.
"""

import argparse
import json
import os
import pathlib
import sys

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # grids: float64 references (remat bench is float32)

import numpy as np  # noqa: E402

from experiments.differentiable import draft, grids, remat_bench  # noqa: E402

PARTS = ("remat", "grids", "draft")


def load_toy2d(model_dir, out, log=print):
    """The trained toy2d model in ``model_dir`` (or a smoke model trained into ``out``)."""
    from jaxdiff import training

    if model_dir is None:
        model_dir = "outputs/demo" if os.path.isdir("outputs/demo/checkpoints") else None
    if model_dir is None:
        from experiments.toy2d.config import get_config
        from experiments.toy2d.main import run as train_toy2d

        model_dir = os.path.join(out, "toy2d_smoke")
        if not os.path.isdir(os.path.join(model_dir, "checkpoints")):
            log(f"training a toy2d smoke model into {model_dir}")
            train_toy2d(get_config("smoke"), model_dir, progress=False, log=None)
    return training.load_model(model_dir), model_dir


def plot_remat(path, rec):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    configs = sorted({(r["method"], r["remat"]) for r in rec["rows"]})
    for method, remat in configs:
        rows = [r for r in rec["rows"] if r["method"] == method and r["remat"] == remat]
        n = [r["steps"] for r in rows]
        axes[0].loglog(n, [r["bytes"] / 2**20 for r in rows], "o-", label=f"{method} {remat}")
        axes[1].loglog(n, [r["seconds"] for r in rows], "o-", label=f"{method} {remat}")
    axes[0].set(xlabel="steps N", ylabel="compiled peak memory (MiB)", title="grad memory")
    axes[1].set(xlabel="steps N", ylabel="seconds (median)", title="grad time")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grids(path, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows[0]["eval"])
    fig, axes = plt.subplots(1, len(labels) + 1, figsize=(5 * (len(labels) + 1), 3.8))
    nfes = [r["nfe"] for r in rows]
    for ax, label in zip(axes, labels):
        for name in grids.HAND:
            ax.semilogy(nfes, [r["eval"][label]["hand"][name] for r in rows], "o--", label=name)
        mean = np.array([r["eval"][label]["learned_mean"] for r in rows])
        ci = np.array([r["eval"][label]["learned_ci"] for r in rows]).T
        ax.errorbar(nfes, mean, yerr=[mean - ci[0], ci[1] - mean], fmt="s-", color="k",
                    label="learned (95% CI)")
        ax.set(xlabel="NFE", ylabel="mean error to fine-grid solution", title=label)
        ax.legend(fontsize=7)
    ax = axes[-1]
    for r in rows:
        ts = np.asarray(r["learned_grid"])
        ax.plot(np.arange(len(ts)) / (len(ts) - 1), np.log(ts), "o-", label=f"NFE {r['nfe']}")
    ax.set(xlabel="step fraction", ylabel="log t (EDM sigma)", title="learned grids")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_draft(path, before, after, rec):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
    for ax, x, name in zip(axes, (before, after), ("before", "after")):
        ax.scatter(x[:3000, 0], x[:3000, 1], s=1, alpha=0.4)
        ax.axvline(0.0, color="r", lw=0.8)
        s = rec[name]
        ax.set(title=f"{name}: reward {s['reward']:.3f}, right {s['right_fraction']:.2f}",
               aspect="equal")
    fig.suptitle(f"DRaFT-{rec['last_k']}: reward log sigmoid(4 x1), {rec['iters']} Adam steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--out", default="outputs/differentiable")
    parser.add_argument("--model", default=None)
    parser.add_argument("--no-diffrax", action="store_true")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    for part in parts:
        if part not in PARTS:
            parser.error(f"--parts: unknown part {part!r}; choose from {PARTS}")
    os.makedirs(args.out, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    path = os.path.join(args.out, f"results{suffix}.json")
    results = {}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    results["platform"] = jax.devices()[0].platform
    if "remat" in parts:
        rec = remat_bench.run(quick=args.quick, diffrax=not args.no_diffrax)
        results["remat"] = rec
        plot_remat(os.path.join(args.out, f"remat{suffix}.png"), rec)
        wide = remat_bench.run(quick=args.quick, diffrax=False, batch=64,
                               dims=remat_bench.wide_dims(512 if args.quick else 2048))
        results["remat_wide"] = wide
        plot_remat(os.path.join(args.out, f"remat_wide{suffix}.png"), wide)
    if "grids" in parts:
        rows = grids.run(quick=args.quick)
        results["grids"] = rows
        plot_grids(os.path.join(args.out, f"grids{suffix}.png"), rows)
    if "draft" in parts:
        model, model_dir = load_toy2d(args.model, args.out)
        rec, before, after = draft.run(model, quick=args.quick)
        rec["model"] = model_dir
        results["draft"] = rec
        plot_draft(os.path.join(args.out, f"draft{suffix}.png"), before, after, rec)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
