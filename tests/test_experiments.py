"""The experiments end to end at smoke size: files, reloading, determinism, bad input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import training


def test_toy2d_smoke_writes_everything(toy2d_run):
    workdir, results = toy2d_run
    for name in ("eval.json", "samples.png", "metrics.jsonl"):
        assert (workdir / name).exists(), name
    records = training.read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in records] == [100, 200, 300]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    assert set(results["samplers"]) == {"dpm_solver_pp", "edm_heun"}
    assert results["sw_data_vs_data"] > 0
    with open(workdir / "eval.json") as f:
        assert json.load(f)["samplers"] == results["samplers"]


def test_toy2d_checkpoint_rebuilds_the_denoiser(toy2d_run):
    from experiments.toy2d.config import get_config
    from experiments.toy2d.main import build
    from jaxdiff import nets

    workdir, _ = toy2d_run
    model = training.load_model(workdir)
    assert model.step == 300 and model.prediction == "edm"
    assert type(model.process).__name__ == "EDMProcess"
    # The same parameters through the in-memory route: identical outputs.
    _, _, process, setup, averages = build(get_config("smoke"))
    ckpt = training.Checkpointer(workdir / "checkpoints")
    state, data_state = ckpt.restore(setup.state)
    ckpt.close()
    assert data_state["step"] == 300
    denoiser = nets.make_denoiser(setup.graphdef, state.averages[averages[0].name], process,
                                  "edm")
    x = jax.random.normal(jax.random.key(0), (16, 2), jnp.float32)
    t = jnp.linspace(0.01, 50.0, 16)
    labels = jnp.arange(16, dtype=jnp.int32) % 8
    np.testing.assert_array_equal(model.denoiser(x, t, labels), denoiser(x, t, labels))
    with pytest.raises(ValueError):
        model.denoiser(jnp.zeros((4, 3), jnp.float32), jnp.ones(4), None)


def test_toy2d_same_seed_gives_identical_figures(toy2d_run, tmp_path):
    """A rerun with the same seed reproduces the numbers and the figure byte for byte.

    Training itself is bitwise reproducible (two fresh runs agree in
    test_training.test_fit_resume_is_bitwise_identical); here the rerun resumes the fixture's
    final checkpoint and redoes sampling, guidance and plotting.
    """
    from experiments.toy2d.config import get_config
    from experiments.toy2d.main import run

    workdir, results = toy2d_run
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    again = run(get_config("smoke"), str(tmp_path), progress=False, log=None)
    assert again["samplers"] == results["samplers"]
    assert again["sw_data_vs_data"] == results["sw_data_vs_data"]
    assert (tmp_path / "samples.png").read_bytes() == (workdir / "samples.png").read_bytes()


def test_unknown_config_keys_are_refused():
    from experiments.digits.main import main as digits_main
    from experiments.toy2d.main import parse

    with pytest.raises(ValueError, match="train.steps"):
        parse(["train.stepz=3"])
    with pytest.raises(ValueError, match="unknown config"):
        parse(["--config", "nope"])
    with pytest.raises(ValueError, match="integer"):
        parse(["train.steps=many"])
    with pytest.raises(ValueError, match="net.base_channels"):
        digits_main(["--workdir", "unused", "net.base_channel=8"])


def test_corrupted_latest_checkpoint_loads_the_previous_one(toy2d_run, tmp_path):
    workdir, _ = toy2d_run
    copy = tmp_path / "run"
    shutil.copytree(workdir / "checkpoints", copy / "checkpoints")
    steps = sorted(int(p.name) for p in (copy / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) >= 2
    latest = copy / "checkpoints" / str(steps[-1]) / "state"
    for root, _, files in os.walk(latest):
        for name in files:
            if name.startswith("manifest") or root.endswith("/d"):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"corrupt")
    with pytest.warns(RuntimeWarning, match=f"step {steps[-1]}"):
        model = training.load_model(copy)
    assert model.step == steps[-2]


def test_digits_smoke(digits_run):
    workdir, results = digits_run
    # Even the smoke classifier (150 steps) separates held-out digits well.
    assert results["classifier_test_accuracy"] >= 0.9
    assert 0.0 <= results["cfg_accuracy"] <= 1.0
    assert results["num_samples"] == 100
    for name in ("eval.json", "samples.png", "metrics.jsonl"):
        assert (workdir / name).exists(), name
    model = training.load_model(workdir)
    denoiser = jax.jit(model.denoiser)  # shapes are checked while tracing
    x = jnp.zeros((2, 8, 8, 1), jnp.float32)
    out = denoiser(x, jnp.ones(2, jnp.float32), jnp.array([3, 10], jnp.int32))
    assert out.shape == (2, 8, 8, 1) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match=r"\(2, 7, 7, 1\).*divisible"):
        denoiser(jnp.zeros((2, 7, 7, 1), jnp.float32), jnp.ones(2), None)
    with pytest.raises(ValueError):
        denoiser(jnp.zeros((2, 8, 8, 3), jnp.float32), jnp.ones(2), None)


@pytest.mark.slow  # about a minute on 2 cores (a noise classifier and nine guided samplers)
def test_guidance_demo_quick_writes_the_panel_and_numbers(digits_run, tmp_path):
    from experiments.guidance_demo import run

    workdir, _ = digits_run
    digits_copy = tmp_path / "digits"
    shutil.copytree(workdir, digits_copy)
    results = run(quick=True, digits_workdir=str(digits_copy), workdir=str(tmp_path / "out"),
                  log=None)
    assert os.path.isfile(tmp_path / "out" / "guidance_panel.png")
    with open(tmp_path / "out" / "guidance.json") as f:
        assert json.load(f).keys() == results.keys()
    # Scale 0 of every transform is the unconditional model; exact 2-D AND reaches its corner.
    assert results["fraction_in_target_left_AND_top"] > 0.95
    # Loss guidance fits the measurement better than unguided samples.
    for task in ("inpainting", "super_resolution"):
        assert (results[f"{task}_measurement_error"]
                < results[f"{task}_measurement_error_unguided"])


@pytest.mark.slow  # about two minutes on 2 cores (the --quick benchmark)
def test_sampler_bench_quick_writes_its_tables(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench"
    subprocess.run([sys.executable, os.path.join("experiments", "sampler_bench.py"), "--quick",
                    "--out", str(out)], cwd=root, check=True, capture_output=True)
    assert os.path.isfile(f"{out}.png")
    with open(f"{out}.json") as f:
        record = json.load(f)
    rows = record["accuracy"]
    assert {r["kind"] for r in rows} == {"flow_error", "sample_quality", "sample_quality_floor"}
    heun = sorted((r["steps"], r["error"]) for r in rows if r["kind"] == "flow_error"
                  and r["method"] == "edm_heun" and r["grid"] == "karras")
    errors = [e for _, e in heun]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.05, heun
    speed = record["speed"]
    for key in ("ratio_sampler_over_denoiser_scan_B16", "ratio_sampler_over_denoiser_scan_B4096",
                "speedup_vs_python_loop_B16", "compile_ratio_1000_over_10"):
        assert np.isfinite(speed[key]) and speed[key] > 0, key
    assert set(speed["per_nfe_overhead"]) >= {"ddim", "edm_heun", "unipc(order=2,variant=bh2)"}
