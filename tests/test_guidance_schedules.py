"""Noise-level experts, condition stages and condition blends: exact selection and endpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.guidance.schedules import condition_blend, condition_schedule, noise_range_experts

B, D = 6, 2


def _expert(gain, x, t, cond=None):
    """A cheap denoiser that depends on x, t and its own gain (so experts are distinguishable)."""
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
    return gain * x + jnp.sin(t)[:, None]


def _labelled(x, t, cond=None):
    """A cheap conditional denoiser: the label enters per coordinate."""
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
    shift = cond.astype(x.dtype)[:, None] * jnp.arange(1.0, x.shape[1] + 1)[None]
    return 0.5 * x + jnp.cos(shift + t[:, None])


def _embedded(x, t, cond=None):
    """A cheap denoiser of a float embedding (B, E), nonlinear in it."""
    return jnp.tanh(cond[:, :D]) * x + cond[:, D:].sum(axis=1, keepdims=True) * t[:, None]


@pytest.fixture(scope="module")
def setup():
    process = jaxdiff.EDMProcess()  # t is the noise level, up to round-off
    t_b = jnp.array([0.5, 2.0])
    boundaries = [float(v) for v in process.noise_level(t_b)]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, D)))
    # Points inside each of the three stages and exactly on both boundaries, with the stage
    # each belongs to: a boundary belongs to the stage below it.
    points = [(0.1, 0), (t_b[0], 0), (1.0, 1), (t_b[1], 1), (10.0, 2)]
    return process, boundaries, x, points


def test_only_the_expert_of_the_stage_runs_and_is_exact(setup):
    process, boundaries, x, points = setup
    experts = [jax.tree_util.Partial(_expert, g) for g in (1.0, 2.0, 3.0)]
    combined = noise_range_experts(experts, process, boundaries)

    @jax.jit
    def run(t):
        return combined(x, t), jnp.stack([e(x, t) for e in experts])

    for t0, stage in points:
        out, refs = run(jnp.full((B,), t0, jnp.float64))
        np.testing.assert_array_equal(out, refs[stage])
    t_mixed = jnp.array([p for p, _ in points] + [3.0], jnp.float64)
    stages = np.array([s for _, s in points] + [2])
    out, refs = run(t_mixed)
    np.testing.assert_array_equal(out, np.asarray(refs)[stages, np.arange(B)])

    # Eager with shared times: the host picks the expert; only it is called.
    calls = []

    def counted(i):
        def expert(x, t, cond=None):
            calls.append(i)
            return experts[i](x, t, cond)

        return expert

    eager = noise_range_experts([counted(i) for i in range(3)], process, boundaries)
    eager(x, jnp.full((B,), 1.0))
    assert calls == [1]
    # Traced: one lax.switch with one expert per branch (and the per-example fallback).
    calls.clear()
    jaxpr = jax.make_jaxpr(lambda t: eager(x, t))(jnp.full((B,), 1.0)).jaxpr
    switches = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
    assert len(switches) == 1  # shared-vs-mixed; the switch sits in its shared branch
    inner = [e for b in switches[0].params["branches"] for e in b.jaxpr.eqns
             if e.primitive.name == "cond"]
    assert len(inner) == 1 and len(inner[0].params["branches"]) == 3


def test_a_single_expert_is_the_denoiser(setup):
    process, _, x, _ = setup
    expert = jax.tree_util.Partial(_expert, 2.0)
    t = jnp.full((B,), 1.0)
    np.testing.assert_array_equal(noise_range_experts([expert], process, [])(x, t), expert(x, t))


def test_condition_schedule_selects_the_stage_condition_in_one_call(setup):
    process, boundaries, x, points = setup
    per_stage = jnp.array([4, 1, 7])  # one label per stage, shared by the batch
    per_example = jnp.array([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 2, 2, 9, 9, 9]])
    calls = []

    def counting(x, t, cond=None):
        calls.append(1)
        return _labelled(x, t, cond["y"] if isinstance(cond, dict) else cond)

    @jax.jit
    def run(t):
        a = condition_schedule(counting, process, per_stage, boundaries)(x, t)
        b = condition_schedule(counting, process, {"y": per_example}, boundaries)(x, t)
        return a, b

    for t0, stage in points:
        t = jnp.full((B,), t0, jnp.float64)
        a, b = run(t)
        np.testing.assert_array_equal(a, _labelled(x, t, jnp.full((B,), per_stage[stage])))
        np.testing.assert_array_equal(b, _labelled(x, t, per_example[stage]))
    assert len(calls) == 2  # traced once; one network call per scheduled denoiser
    t_mixed = jnp.array([p for p, _ in points] + [3.0], jnp.float64)
    stages = np.array([s for _, s in points] + [2])
    a, b = run(t_mixed)
    np.testing.assert_array_equal(a, _labelled(x, t_mixed, per_stage[stages]))
    np.testing.assert_array_equal(b, _labelled(x, t_mixed, per_example[stages, np.arange(B)]))


def test_condition_blend_endpoints_and_both_modes(setup):
    process, _, x, _ = setup
    t = jnp.linspace(0.1, 5.0, B)
    rng = np.random.default_rng(1)
    emb_a, emb_b = (jnp.asarray(rng.standard_normal((B, 2 * D))) for _ in range(2))
    lab_a, lab_b = jnp.array([0, 1, 2, 0, 1, 2]), jnp.array([2, 0, 1, 1, 2, 0])
    weights = jnp.array([0.0, 1.0, 0.25, 0.5, 0.0, 1.0])

    def per_example_weight(w, nl):
        return w  # a lookup of the weight per example, to test several weights at once

    weight_fn = jax.tree_util.Partial(per_example_weight, weights)

    @jax.jit
    def run():
        embedded = condition_blend(_embedded, process, emb_a, emb_b, weight_fn)(x, t)
        labelled = condition_blend(_labelled, process, lab_a, lab_b, weight_fn)(x, t)
        as_predictions = condition_blend(_embedded, process, emb_a, emb_b, weight_fn,
                                         mode="prediction")(x, t)
        refs = [_embedded(x, t, emb_a), _embedded(x, t, emb_b), _labelled(x, t, lab_a),
                _labelled(x, t, lab_b)]
        w = weights[:, None]
        mixed = _embedded(x, t, (1 - w) * emb_a + w * emb_b)
        return embedded, labelled, as_predictions, refs, mixed

    embedded, labelled, as_predictions, (ea, eb, la, lb), mixed = run()
    w = np.asarray(weights)[:, None]
    ends = np.isin(np.asarray(weights), [0.0, 1.0])
    np.testing.assert_array_equal(np.asarray(embedded)[ends], np.where(w == 0, ea, eb)[ends])
    np.testing.assert_array_equal(np.asarray(labelled)[ends], np.where(w == 0, la, lb)[ends])
    np.testing.assert_array_equal(np.asarray(as_predictions)[ends],
                                  np.where(w == 0, ea, eb)[ends])
    # In between: the condition mode interpolates the embedding, the prediction mode the outputs.
    np.testing.assert_allclose(embedded, mixed, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(labelled, (1 - w) * la + w * lb, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(as_predictions, (1 - w) * ea + w * eb, rtol=1e-14, atol=1e-14)
    assert float(np.max(np.abs(np.asarray(embedded) - as_predictions)[~ends])) > 1e-3

    # The weight is a function of the noise level sigma / alpha (here: EDM's t).
    ramp = condition_blend(_labelled, process, lab_a, lab_b,
                           lambda nl: jnp.clip(nl - 1.0, 0.0, 1.0))
    t_ramp = jnp.array([0.5, 1.0, 1.25, 1.5, 2.0, 3.0])
    np.testing.assert_allclose(
        ramp(x, t_ramp),
        _labelled(x, t_ramp, lab_a) * np.array([1, 1, 0.75, 0.5, 0, 0])[:, None]
        + _labelled(x, t_ramp, lab_b) * np.array([0, 0, 0.25, 0.5, 1, 1])[:, None],
        rtol=1e-12, atol=1e-12)


def test_bad_input_is_refused(setup):
    process, boundaries, x, _ = setup
    t = jnp.full((B,), 1.0)
    expert = jax.tree_util.Partial(_expert, 1.0)
    span = (float(process.noise_level(process.t_min)), float(process.noise_level(process.t_max)))
    for bad in ([2.0, 1.0], [1.0, 1.0], [1.0, np.nan], [0.5 * span[0], 1.0],
                [1.0, 2.0 * span[1]]):
        with pytest.raises(ValueError, match="boundaries"):
            noise_range_experts([expert] * 3, process, bad)
    with pytest.raises(ValueError, match="boundaries"):
        noise_range_experts([expert] * 3, process, [1.0])
    with pytest.raises(ValueError, match="boundaries"):
        noise_range_experts([expert] * 2, process, [[1.0]])
    with pytest.raises(ValueError, match="at least one"):
        noise_range_experts([], process, [])
    with pytest.raises(TypeError, match=r"denoisers\[1\]"):
        noise_range_experts([expert, 3.0], process, [1.0])
    with pytest.raises(ValueError, match="stage axis"):
        condition_schedule(_labelled, process, jnp.zeros((2, B), int), boundaries)
    with pytest.raises(ValueError, match="boundaries"):
        condition_schedule(_labelled, process, jnp.zeros(2, int), [3.0, 1.0])
    with pytest.raises(ValueError, match="cond=None"):
        condition_schedule(_labelled, process, jnp.zeros(3, int), boundaries)(x, t, t)
    with pytest.raises(ValueError, match=r"\(k, B, ...\)"):
        condition_schedule(_labelled, process, jnp.zeros((3, B + 1), int), boundaries)(x, t)
    emb = jnp.ones((B, 2 * D))
    with pytest.raises(ValueError, match="tree structure"):
        condition_blend(_embedded, process, emb, {"e": emb}, lambda nl: nl)
    with pytest.raises(ValueError, match="broadcast"):
        condition_blend(_embedded, process, emb, jnp.ones((B, 3)), lambda nl: nl)
    with pytest.raises(ValueError, match="mode"):
        condition_blend(_embedded, process, emb, emb, lambda nl: nl, mode="average")
    with pytest.raises(ValueError, match="prediction"):
        condition_blend(_labelled, process, jnp.zeros(B, int), jnp.ones(B, int), lambda nl: nl,
                        mode="condition")
    with pytest.raises(TypeError, match="weight_fn"):
        condition_blend(_embedded, process, emb, emb, 0.5)
    with pytest.raises(ValueError, match="weight_fn"):
        condition_blend(_embedded, process, emb, emb, lambda nl: jnp.ones((B, 2)))(x, t)
    with pytest.raises(ValueError, match="cond=None"):
        condition_blend(_embedded, process, emb, emb, lambda nl: nl)(x, t, emb)
