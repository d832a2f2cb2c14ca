"""Mesh-sharded training and sampling agree with one device (8 fake CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdiff
from jaxdiff import analytic, nets, parallel, samplers, training
from jaxdiff.guidance import classifier_free

STEPS = 20
BATCH = 32


def _setup():
    net = nets.create("mlp", {"dim": 2, "hidden": 64, "depth": 2, "emb_dim": 16,
                              "num_classes": 4}, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(net)
    params = nnx.to_pure_dict(params)
    process = jaxdiff.EDMProcess(sigma_data=1.0)
    apply = nets.make_apply(graphdef, process, "edm")
    loss_fn = training.diffusion_loss_fn(apply, process, prediction="edm", weighting="edm",
                                         time_sampling="lognormal", cond_dropout=0.2,
                                         null_cond=net.null_cond)
    opt, _ = training.make_optimizer(1e-2, warmup_steps=5)
    averages = [training.EMA(0.9)]
    state = training.create_train_state(jax.random.key(0), params, opt, averages=averages)
    step = training.make_train_step(loss_fn, opt, averages=averages, jit=False)
    return state, step


def _batches():
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        yield {"x": rng.normal(size=(BATCH, 2)).astype(np.float32),
               "label": rng.integers(0, 4, size=BATCH).astype(np.int32)}


def _mesh(data, fsdp):
    return parallel.make_mesh(data=data, fsdp=fsdp, devices=jax.devices()[: data * fsdp])


def _train(mesh):
    state, step = _setup()
    step = parallel.jit_train_step(step, mesh, state)
    state = parallel.shard_state(state, mesh)
    losses = []
    for batch in _batches():
        state, metrics = step(state, parallel.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return state, np.asarray(losses)


@pytest.fixture(scope="module")
def trained():
    """``trained(data, fsdp) -> (state, losses)`` after STEPS steps on that mesh (cached)."""
    cache = {}

    def get(data, fsdp):
        if (data, fsdp) not in cache:
            cache[data, fsdp] = _train(_mesh(data, fsdp))
        return cache[data, fsdp]

    return get


@pytest.mark.parametrize("data,fsdp", [(8, 1), (4, 2)])
def test_sharded_training_matches_one_device(trained, data, fsdp):
    ref_state, ref_losses = trained(1, 1)
    state, losses = trained(data, fsdp)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.linalg.norm(a - b) <= 1e-5 * max(np.linalg.norm(b), 1e-12)
    if fsdp > 1:
        kernels = [x for x in jax.tree.leaves(state.params) if x.ndim == 2 and x.size >= 1024]
        assert kernels and all("fsdp" in str(x.sharding.spec) for x in kernels)


def test_mesh_and_batch_validation():
    with pytest.raises(ValueError, match="fsdp"):
        parallel.make_mesh(fsdp=3)
    with pytest.raises(ValueError, match="devices"):
        parallel.make_mesh(data=16)
    mesh = parallel.make_mesh(data=4, fsdp=2)
    assert mesh.shape == {"data": 4, "fsdp": 2}
    with pytest.raises(ValueError, match="divisible"):
        parallel.shard_batch({"x": np.zeros((6, 2))}, mesh)
    assert parallel.param_spec((64, 64), mesh) == jax.sharding.PartitionSpec(None, "fsdp") or \
        parallel.param_spec((64, 64), mesh) == jax.sharding.PartitionSpec("fsdp", None)
    assert parallel.param_spec((3,), mesh) == jax.sharding.PartitionSpec()


def _mixture():
    means = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    return analytic.GaussianMixture.create(np.ones(3), means, stds=np.full(3, 0.3),
                                           labels=np.arange(3))


@pytest.mark.parametrize("method", ["edm_heun", "euler_maruyama", "dpm_solver_pp"])
def test_sharded_sampling_equals_single_device(method):
    process = jaxdiff.EDMProcess()
    mixture = _mixture()
    denoiser = mixture.denoiser(process)
    ts = jaxdiff.timesteps.karras(process, 12, final_zero=True)
    x_init = 80.0 * jax.random.normal(jax.random.key(1), (64, 2))
    fn = samplers.get_method(method)

    def run(key, x, cond=None):
        return fn(key, denoiser, process, x, ts, cond=cond)

    key = jax.random.key(2)
    ref = np.asarray(jax.jit(run)(key, x_init))
    out = parallel.sample_sharded(run, parallel.make_mesh(), key, x_init)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_guided_sharded_sampling_has_no_collectives():
    process = jaxdiff.EDMProcess()
    mixture = _mixture()
    null = jnp.full((64,), -1, jnp.int32)

    def cond_denoiser(x, t, cond=None):
        uncond = mixture.denoise(process, x, t)
        cond_d = mixture.denoise(process, x, t, jnp.maximum(cond, 0))
        return jnp.where((cond >= 0)[:, None], cond_d, uncond)

    guided = classifier_free(cond_denoiser, process, 2.0, null_cond=lambda b: null[:b])
    ts = jaxdiff.timesteps.karras(process, 8, final_zero=True)
    mesh = parallel.make_mesh()
    x_init = parallel.shard_batch(80.0 * jax.random.normal(jax.random.key(1), (64, 2)), mesh)
    labels = parallel.shard_batch(jnp.arange(64, dtype=jnp.int32) % 3, mesh)

    def run(key, x, cond):
        return samplers.edm_heun(key, guided, process, x, ts, cond=cond)

    compiled = jax.jit(run, out_shardings=parallel.batch_sharding(mesh)).lower(
        jax.random.key(0), x_init, labels).compile()
    hlo = compiled.as_text()
    for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute"):
        assert op not in hlo, op
    out = compiled(jax.random.key(0), x_init, labels)
    ref = jax.jit(run)(jax.random.key(0), jax.device_get(x_init), jax.device_get(labels))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("src,dst", [((8, 1), (1, 1)), ((1, 1), (4, 1)), ((4, 2), (8, 1)),
                                     ((8, 1), (2, 4))])
def test_checkpoint_restores_onto_another_mesh(trained, tmp_path, src, dst):
    """A state trained on one mesh restores exactly, in the target's layout, onto another."""
    state, _ = trained(*src)
    ckpt = training.Checkpointer(tmp_path / "ck", async_save=False)
    ckpt.save(state)
    ckpt.close()
    fresh, _ = _setup()
    target = parallel.shard_state(fresh, _mesh(*dst))
    restored, _ = training.Checkpointer(tmp_path / "ck").restore(target)
    assert int(restored.step) == STEPS
    for a, b, t in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(target)):
        assert a.sharding.is_equivalent_to(t.sharding, a.ndim)  # the target's layout
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~25-40 s on 2 cores: run with `pytest -m slow tests/test_parallel.py`
def test_two_processes_train_checkpoint_and_restore_in_one(tmp_path):
    """Two local processes with 4 CPU devices each; then one process restores the checkpoint."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "multihost.py")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    multi, single = tmp_path / "multi", tmp_path / "single"
    commands = [[script, "--coordinator", f"localhost:{port}", "--num-processes", "2",
                 "--process-id", str(i), "--local-devices", "4", "--workdir", str(multi)]
                for i in range(2)]
    # The one-process reference run is independent: it runs alongside the two processes.
    commands.append([script, "--local-devices", "8", "--workdir", str(single)])
    procs = [subprocess.Popen([sys.executable, *c], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in commands]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]

    saved = np.load(multi / "final_params.npz")
    model = training.load_model(multi, average=None)
    assert model.step == 10
    # orbax stores list indices as strings: compare paths without quotes.
    restored = {jax.tree_util.keystr(p).replace("'", ""): np.asarray(v)
                for p, v in jax.tree_util.tree_leaves_with_path(model.params)}
    assert set(restored) == {k.replace("'", "") for k in saved.files}
    for k in saved.files:
        np.testing.assert_array_equal(restored[k.replace("'", "")], saved[k])
    # The same global batches on one 8-device process give the same parameters, and its
    # checkpoint (written from a host snapshot in a background thread) holds them exactly.
    one = np.load(single / "final_params.npz")
    written = {k.replace("'", ""): np.asarray(v) for k, v in one.items()}
    model = training.load_model(single, average=None)
    for p, v in jax.tree_util.tree_leaves_with_path(model.params):
        np.testing.assert_array_equal(np.asarray(v),
                                      written[jax.tree_util.keystr(p).replace("'", "")])
    for k in saved.files:
        np.testing.assert_allclose(one[k], saved[k], rtol=1e-5, atol=1e-6)
