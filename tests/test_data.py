"""jaxdiff.data: toy sets, digits, TFDS sources and deterministic checkpointable batching."""

import functools
import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxdiff.data import pipeline, toy2d
from jaxdiff.data._optional import import_optional

# ------------------------------------------------------------------------------------------------
# 2-D toys
# ------------------------------------------------------------------------------------------------

KEY = jax.random.key(0)
N = 40_000  # one sample size everywhere, so each set compiles once


@functools.cache
def _draw(name, seed=3):
    x, y = toy2d.sample(jax.random.key(seed), name, N)
    return np.asarray(x), np.asarray(y)


def _raw(name):
    """Points in raw coordinates through the documented map x_raw = s x + c (float64)."""
    x, y = _draw(name)
    center, scale = toy2d.standardization(name)
    return x.astype(np.float64) * scale + center[None, :], y


def _assert_mean_close(samples, expected, name):
    """Sample mean within 5 standard errors of an exact expectation (per component)."""
    samples = np.asarray(samples, np.float64)
    se = samples.std(axis=0, ddof=1) / math.sqrt(samples.shape[0])
    err = np.abs(samples.mean(axis=0) - expected)
    assert np.all(err < 5 * se + 1e-12), f"{name}: mean {samples.mean(0)} vs {expected} (se {se})"


@pytest.mark.parametrize("name", toy2d.NAMES)
def test_toy_shapes_dtypes_and_determinism(name):
    x, y = toy2d.sample(KEY, name, N)
    assert x.shape == (N, 2) and x.dtype == np.float32
    assert y.shape == (N,) and y.dtype == np.int32
    x2, y2 = _draw(name, seed=0)
    np.testing.assert_array_equal(np.asarray(x), x2)
    np.testing.assert_array_equal(np.asarray(y), y2)
    x3, _ = _draw(name, seed=1)
    assert not np.array_equal(x2, x3)
    k = toy2d.num_classes(name)
    assert set(np.unique(y2)) == set(range(k))
    assert np.all(np.isfinite(x2))


@pytest.mark.parametrize("name", toy2d.NAMES)
def test_toy_standardisation_is_exact(name):
    # Mean 0, E|x|^2 = 2 and equally likely labels hold exactly; check them to 5 standard errors.
    x, y = _draw(name)
    x = x.astype(np.float64)
    _assert_mean_close(x, np.zeros(2), name)
    _assert_mean_close((x**2).sum(axis=1, keepdims=True) / 2, np.ones(1), name)
    k = toy2d.num_classes(name)
    _assert_mean_close(np.eye(k)[y], np.full(k, 1.0 / k), name)


def test_eight_gaussians_components():
    raw, y = _raw("8gaussians")
    for k in range(8):
        pts = raw[y == k]
        centre = 2.0 * np.array([np.cos(2 * np.pi * k / 8), np.sin(2 * np.pi * k / 8)])
        _assert_mean_close(pts, centre, f"label {k}")
        # Per-coordinate variance 0.2^2: E[(x - mu)^2] is exact.
        _assert_mean_close((pts - centre) ** 2, np.full(2, 0.04), f"label {k} variance")
    # The exact mixture describes the same data in model coordinates.
    mix = toy2d.gaussian_mixture("8gaussians")
    center, scale = toy2d.standardization("8gaussians")
    expected = (
        2.0 * np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], axis=1)
        - center[None, :]
    ) / scale
    np.testing.assert_allclose(np.asarray(mix.components.mean), expected, atol=1e-6)


def test_twenty_five_gaussians_components():
    raw, y = _raw("25gaussians")
    for label in (0, 7, 12, 24):
        i, j = label % 5 - 2, label // 5 - 2
        _assert_mean_close(raw[y == label], np.array([i, j], np.float64), f"label {label}")


@pytest.mark.parametrize("name", ["8gaussians", "25gaussians"])
def test_gaussian_mixture_moments_are_standardised(name):
    mean, cov = toy2d.gaussian_mixture(name).moments()
    np.testing.assert_allclose(np.asarray(mean), np.zeros(2), atol=1e-6)
    np.testing.assert_allclose(np.trace(np.asarray(cov)), 2.0, rtol=1e-6)


def test_checkerboard_points_lie_in_their_dark_cell():
    raw, y = _raw("checkerboard")
    assert np.all(np.abs(raw) <= 2.0 + 1e-5)
    col = np.clip(np.floor(raw[:, 0] + 2.0), 0, 3).astype(int)
    row = np.clip(np.floor(raw[:, 1] + 2.0), 0, 3).astype(int)
    assert np.all((col + row) % 2 == 0)
    np.testing.assert_array_equal(y, 2 * row + col // 2)
    center, scale = toy2d.standardization("checkerboard")
    assert scale == pytest.approx(math.sqrt(4.0 / 3.0), rel=1e-15)
    np.testing.assert_array_equal(center, [0.0, 0.0])


def test_moons_rings_and_swiss_roll_labels():
    # E|p - centre_k|^2 = r_k^2 + 2 sigma^2 exactly for a point on a circle plus N(0, sigma^2 I).
    raw, y = _raw("moons")
    for label, centre in ((0, (0.0, 0.0)), (1, (1.0, 0.5))):
        d2 = ((raw[y == label] - np.array(centre)) ** 2).sum(axis=1, keepdims=True)
        _assert_mean_close(d2, np.array([1.0 + 2 * 0.01]), f"moon {label}")
    raw, y = _raw("rings")
    for k in range(3):
        d2 = (raw[y == k] ** 2).sum(axis=1, keepdims=True)
        _assert_mean_close(d2, np.array([(k + 1.0) ** 2 + 2 * 0.01]), f"ring {k}")
    # Swiss roll half-turn k: tau ~ U[a_k, b_k], E|p|^2 = E[tau^2] + 2 * 0.5^2.
    raw, y = _raw("swiss_roll")
    for k in range(3):
        a, b = 1.5 * np.pi + k * np.pi, 2.5 * np.pi + k * np.pi
        d2 = (raw[y == k] ** 2).sum(axis=1, keepdims=True)
        _assert_mean_close(d2, np.array([(a * a + a * b + b * b) / 3 + 0.5]), f"half-turn {k}")


def test_toy_raw_round_trip():
    x, _ = _draw("swiss_roll")
    raw = toy2d.to_raw(x, "swiss_roll")
    assert raw.dtype == np.float32
    np.testing.assert_allclose(np.asarray(raw), _raw("swiss_roll")[0], rtol=1e-6, atol=1e-5)
    back = toy2d.from_raw(raw, "swiss_roll")
    np.testing.assert_allclose(np.asarray(back), x, atol=1e-5)
    center, scale = toy2d.standardization("swiss_roll")
    np.testing.assert_allclose(center, [2.0, 2.0 / (3 * np.pi)], rtol=1e-12)
    np.testing.assert_allclose(
        np.asarray(toy2d.to_raw(np.zeros((1, 2), np.float32), "swiss_roll")),
        center[None, :],
        rtol=1e-6,
    )


def test_toy_bad_input():
    with pytest.raises(ValueError, match="checkerboard"):
        toy2d.sample(KEY, "spirals", 10)
    with pytest.raises(ValueError, match="name"):
        toy2d.num_classes("nope")
    with pytest.raises(TypeError, match="key"):
        toy2d.sample(np.zeros(2, np.uint32), "moons", 10)
    with pytest.raises(ValueError, match="n must"):
        toy2d.sample(KEY, "moons", -1)
    with pytest.raises(TypeError, match="n must"):
        toy2d.sample(KEY, "moons", 2.5)
    with pytest.raises(ValueError, match="8gaussians"):
        toy2d.gaussian_mixture("moons")
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        toy2d.to_raw(np.zeros((3, 3)), "moons")


# ------------------------------------------------------------------------------------------------
# Digits
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    from jaxdiff.data import digits

    return digits


def _rows(images, labels):
    """Examples as sorted bytes, for multiset comparisons."""
    return sorted(im.tobytes() + bytes([lab]) for im, lab in zip(images, labels))


def test_digits_shapes_and_exact_levels(digits):
    images, labels = digits.load_digits("all")
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
    assert labels.shape == (1797,) and labels.dtype == np.int32
    assert set(np.unique(labels)) == set(range(10))
    levels = np.float32(-1.0) + np.float32(2.0 / 16) * np.arange(17, dtype=np.float32)
    np.testing.assert_array_equal(np.unique(images), levels)  # all 17 levels, bitwise exact
    from sklearn.datasets import load_digits as sk_load

    raw, raw_labels = sk_load(return_X_y=True)
    np.testing.assert_array_equal(digits.to_levels(images), raw.reshape(-1, 8, 8, 1))
    np.testing.assert_array_equal(labels, raw_labels)


def test_digits_split_is_a_stratified_deterministic_partition(digits):
    all_images, all_labels = digits.load_digits("all")
    train = digits.load_digits("train")
    test = digits.load_digits("test")
    assert len(train[0]) + len(test[0]) == 1797
    assert len(test[0]) == math.ceil(0.2 * 1797)
    # Train and test together are exactly the whole set (so they are disjoint).
    assert _rows(np.concatenate([train[0], test[0]]), np.concatenate([train[1], test[1]])) == (
        _rows(all_images, all_labels)
    )
    counts, test_counts = np.bincount(all_labels), np.bincount(test[1], minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * counts) <= 1.0), (test_counts, 0.2 * counts)
    again = digits.load_digits("train")
    np.testing.assert_array_equal(again[0], train[0])
    np.testing.assert_array_equal(again[1], train[1])
    other = digits.load_digits("train", seed=1)
    assert not np.array_equal(other[0], train[0])
    small = digits.load_digits("test", test_fraction=0.5)
    assert len(small[0]) == math.ceil(0.5 * 1797)


def test_digits_to_levels_rounds_and_clips(digits):
    images, _ = digits.load_digits("test")
    levels = digits.to_levels(images)
    assert levels.dtype == np.uint8
    np.testing.assert_array_equal(digits.to_levels(images + np.float32(0.06)), levels)
    np.testing.assert_array_equal(digits.to_levels(images - np.float32(0.06)), levels)
    np.testing.assert_array_equal(levels.astype(np.float32) / 8 - 1, images)
    np.testing.assert_array_equal(digits.to_levels(np.array([-3.0, 1.5])), [0, 16])
    with pytest.raises(ValueError, match="finite"):
        digits.to_levels(np.array([np.nan]))


def test_digits_bad_input(digits):
    with pytest.raises(ValueError, match="split"):
        digits.load_digits("val")
    with pytest.raises(ValueError, match="test_fraction"):
        digits.load_digits("train", test_fraction=1.0)
    with pytest.raises(ValueError, match="seed"):
        digits.load_digits("train", seed=-1)


# ------------------------------------------------------------------------------------------------
# TFDS
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tfds():
    return pytest.importorskip("tensorflow_datasets")


def _tiny_image(i):
    return ((np.arange(16) * 17 + 5 * i) % 256).astype(np.uint8).reshape(4, 4, 1)


@pytest.fixture(scope="module")
def tiny_prepared(tfds, tmp_path_factory):
    """A real ArrayRecord dataset prepared on disk without TensorFlow (PIL encodes the PNGs)."""
    pil = pytest.importorskip("PIL.Image")

    class TinyImageSet(tfds.core.GeneratorBasedBuilder):
        """Seven 4x4 grey images with three classes."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(4, 4, 1)),
                        "label": tfds.features.ClassLabel(num_classes=3),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(7)}

        def _generate_examples(self, n):
            for i in range(n):
                image = pil.fromarray(_tiny_image(i)[:, :, 0], mode="L")
                yield i, {"image": image, "label": i % 3}

    data_dir = tmp_path_factory.mktemp("tfds")
    TinyImageSet(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return "tiny_image_set", data_dir


@pytest.mark.parametrize(
    "name, shape, policy",
    [
        ("mnist", (28, 28, 1), "AUTO"),
        ("mnist", (28, 28, 1), "USE_CODE"),
        ("fashion_mnist", (28, 28, 1), "AUTO"),
        ("cifar10", (32, 32, 3), "AUTO"),
    ],
)
def test_tfds_source_with_mock_data(tfds, name, shape, policy):
    from jaxdiff.data import tfds_source

    with tfds.testing.mock_data(num_examples=12, policy=getattr(tfds.testing.MockPolicy, policy)):
        source = tfds_source(name, "train")
        raw = tfds.data_source(name, split="train")
        assert len(source) == 12 and source.num_classes == 10
        assert source.image_shape == shape
        for i in (0, 5, 11):
            ex = source[i]
            assert ex["image"].shape == shape and ex["image"].dtype == np.float32
            assert ex["label"].dtype == np.int32 and 0 <= int(ex["label"]) < 10
            expected = raw[i]["image"].astype(np.float32) / np.float32(127.5) - np.float32(1)
            np.testing.assert_array_equal(ex["image"], expected)
            assert int(ex["label"]) == int(raw[i]["label"])
            assert ex["image"].min() >= -1.0 and ex["image"].max() <= 1.0
        it = pipeline.batches(source, 4, seed=0)
        for step in range(4):  # more than one epoch of 3 steps
            batch = next(it)
            assert batch["image"].shape == (4, *shape) and batch["image"].dtype == np.float32
            assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
            expected = pipeline.batch_at(source, step, 4, seed=0)
            np.testing.assert_array_equal(batch["image"], expected["image"])


def test_tfds_source_reads_real_array_record_files(tfds, tiny_prepared):
    from jaxdiff.data import tfds_source, to_uint8

    name, data_dir = tiny_prepared
    source = tfds_source(name, "train", data_dir=data_dir)
    assert len(source) == 7 and source.num_classes == 3 and source.image_shape == (4, 4, 1)
    # The shuffled ArrayRecord order is tfds's business; match the examples by content.
    expected = {_tiny_image(i).tobytes(): i % 3 for i in range(7)}
    arrays = pipeline.as_arrays(source)
    assert arrays["image"].shape == (7, 4, 4, 1) and arrays["image"].dtype == np.float32
    got = {}
    for image, label in zip(arrays["image"], arrays["label"]):
        np.testing.assert_array_equal(image, to_uint8(image).astype(np.float32) / 127.5 - 1)
        got[to_uint8(image).tobytes()] = int(label)
    assert got == expected
    assert arrays["image"].min() == -1.0 and arrays["image"].max() == 1.0  # levels 0 and 255


def test_tfds_missing_dataset_is_a_clear_error(tfds, tmp_path):
    from jaxdiff.data import tfds_source

    with pytest.raises(FileNotFoundError) as info:
        tfds_source("mnist", "train", data_dir=tmp_path)
    message = str(info.value)
    assert "'mnist'" in message and str(tmp_path) in message
    assert "array_record" in message and "download=True" in message
    with pytest.raises(ValueError, match="not a registered TFDS dataset"):
        tfds_source("no_such_dataset_anywhere", "train", data_dir=tmp_path)


def test_tfds_source_needs_image_and_label_features(tfds):
    from jaxdiff.data import tfds_source

    with tfds.testing.mock_data(num_examples=2):
        with pytest.raises(ValueError, match="'image' and 'label'"):
            tfds_source("imdb_reviews", "train")


def test_to_uint8_inverts_the_scaling():
    from jaxdiff.data import to_uint8

    levels = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(
        to_uint8(levels.astype(np.float32) / np.float32(127.5) - 1), levels
    )
    np.testing.assert_array_equal(to_uint8(np.array([-2.0, 2.0])), [0, 255])


# ------------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------------


def _dataset(n):
    return {"idx": np.arange(n), "x": np.arange(2 * n, dtype=np.float32).reshape(n, 2)}


class ListSource:
    """A generic random-access source (not an ArraySource): a list of dicts."""

    def __init__(self, n):
        self._items = [
            {"idx": np.int64(i), "x": np.array([2 * i, 2 * i + 1], np.float32)} for i in range(n)
        ]

    def __len__(self):
        return len(self._items)

    def __getitem__(self, i):
        return self._items[i]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("kind", ["arrays", "list"])
@pytest.mark.parametrize("drop_remainder", [True, False])
def test_restored_iterator_continues_bitwise(kind, drop_remainder):
    n, b = 50, 8
    source = _dataset(n) if kind == "arrays" else ListSource(n)
    it = pipeline.batches(source, b, seed=3, drop_remainder=drop_remainder)
    total = int(2.5 * it.steps_per_epoch)
    reference = [next(it) for _ in range(total)]
    for k in (0, 4, it.steps_per_epoch, total - 1):
        first = pipeline.batches(source, b, seed=3, drop_remainder=drop_remainder)
        head = [next(first) for _ in range(k)]
        saved = json.dumps(first.get_state())
        fresh = pipeline.batches(source, b, seed=3, drop_remainder=drop_remainder)
        fresh.set_state(json.loads(saved))
        assert fresh.step == k
        _assert_batches_equal(head + [next(fresh) for _ in range(total - k)], reference)
    for step in (0, 7, total - 1):
        batch = pipeline.batch_at(source, step, b, seed=3, drop_remainder=drop_remainder)
        _assert_batches_equal([batch], [reference[step]])
    # Values follow their index (the fetch is a gather, not a reshuffle of the rows).
    for batch in reference:
        np.testing.assert_array_equal(batch["x"][:, 0], 2 * batch["idx"])


def test_every_example_once_per_epoch():
    it = pipeline.batches(_dataset(48), 8, seed=0)
    orders = []
    for _ in range(3):
        epoch = np.concatenate([next(it)["idx"] for _ in range(it.steps_per_epoch)])
        np.testing.assert_array_equal(np.sort(epoch), np.arange(48))
        orders.append(epoch)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    # 50 examples, batches of 8: 6 full batches, 2 examples dropped, no repeats in an epoch.
    it = pipeline.batches(_dataset(50), 8, seed=0)
    epoch = np.concatenate([next(it)["idx"] for _ in range(it.steps_per_epoch)])
    assert it.steps_per_epoch == 6 and len(np.unique(epoch)) == 48
    # Without drop_remainder the last batch is short and the epoch covers everything.
    it = pipeline.batches(_dataset(50), 8, seed=0, drop_remainder=False)
    sizes, epoch = [], []
    for _ in range(it.steps_per_epoch):
        batch = next(it)
        sizes.append(len(batch["idx"]))
        epoch.append(batch["idx"])
    assert sizes == [8] * 6 + [2]
    np.testing.assert_array_equal(np.sort(np.concatenate(epoch)), np.arange(50))
    assert it.epoch == 1


def test_epoch_permutation_is_pinned_and_seeded():
    # Pinned values: checkpoints stay valid only if the order of a (seed, epoch) never changes.
    np.testing.assert_array_equal(
        pipeline.epoch_permutation(10, 0, 0), [0, 9, 1, 6, 3, 5, 4, 2, 8, 7]
    )
    np.testing.assert_array_equal(
        pipeline.epoch_permutation(10, 0, 1), [8, 3, 0, 1, 5, 2, 7, 4, 9, 6]
    )
    perms = {(s, e): pipeline.epoch_permutation(1000, s, e) for s in range(3) for e in range(3)}
    for perm in perms.values():
        np.testing.assert_array_equal(np.sort(perm), np.arange(1000))
    keys = list(perms)
    for i, a in enumerate(keys):
        for bkey in keys[i + 1 :]:
            assert not np.array_equal(perms[a], perms[bkey]), (a, bkey)
    # Seed s + 1's first epoch is not seed s's second epoch.
    assert not np.array_equal(perms[(1, 0)], perms[(0, 1)])
    a = next(pipeline.batches(_dataset(100), 10, seed=0))["idx"]
    b = next(pipeline.batches(_dataset(100), 10, seed=1))["idx"]
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_shards_split_the_global_batch(drop_remainder):
    n, b, shards = 50, 3, 4
    iters = [
        pipeline.batches(
            _dataset(n), b, seed=5, shard_index=h, num_shards=shards, drop_remainder=drop_remainder
        )
        for h in range(shards)
    ]
    whole = pipeline.batches(_dataset(n), b * shards, seed=5, drop_remainder=drop_remainder)
    assert iters[0].steps_per_epoch == whole.steps_per_epoch
    for _ in range(2 * whole.steps_per_epoch + 1):
        parts = [next(it)["idx"] for it in iters]
        glob = next(whole)["idx"]
        np.testing.assert_array_equal(np.concatenate(parts), glob)
        if drop_remainder:
            assert all(len(p) == b for p in parts)
        np.testing.assert_array_equal(np.unique(np.concatenate(parts)).size, len(glob))
    # A state restores into another shard layout with the same global batch.
    state = json.loads(json.dumps(iters[1].get_state()))
    regrouped = pipeline.batches(
        _dataset(n), 2 * b, seed=5, shard_index=0, num_shards=2, drop_remainder=drop_remainder
    )
    regrouped.set_state(state)
    np.testing.assert_array_equal(next(regrouped)["idx"], next(whole)["idx"][: 2 * b])


def test_as_arrays_and_sources():
    data = _dataset(10)
    arrays = pipeline.as_arrays(data)
    assert arrays["x"] is data["x"]
    listed = pipeline.as_arrays(ListSource(10))
    np.testing.assert_array_equal(listed["idx"], np.arange(10))
    np.testing.assert_array_equal(listed["x"], data["x"])
    bare = pipeline.batch_at(np.arange(20.0), 0, 5, seed=0)
    assert list(bare) == ["x"] and bare["x"].shape == (5,)
    x, y = toy2d.sample(KEY, "moons", N)
    batch = pipeline.batch_at({"x": x, "label": y}, 0, 16, seed=0)
    assert batch["x"].dtype == np.float32 and batch["label"].dtype == np.int32


def test_batching_bad_input():
    data = _dataset(10)
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.batches(data, 0, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.batches(data, 11, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.batches(data, 3, seed=0, num_shards=4)
    pipeline.batches(data, 11, seed=0, drop_remainder=False)  # one short batch is fine
    with pytest.raises(ValueError, match="shard_index"):
        pipeline.batches(data, 2, seed=0, shard_index=2, num_shards=2)
    with pytest.raises(ValueError, match="shard_index"):
        pipeline.batches(data, 2, seed=0, shard_index=-1, num_shards=2)
    with pytest.raises(ValueError, match="seed"):
        pipeline.batches(data, 2, seed=-1)
    with pytest.raises(TypeError, match="batch_size"):
        pipeline.batches(data, 2.0, seed=0)
    with pytest.raises(TypeError, match="tuple"):
        pipeline.batches((data["x"], data["idx"]), 2, seed=0)
    with pytest.raises(ValueError, match="same leading length"):
        pipeline.batches({"a": np.zeros(3), "b": np.zeros(4)}, 2, seed=0)
    with pytest.raises(ValueError, match="step"):
        pipeline.batch_at(data, -1, 2, seed=0)
    it = pipeline.batches(data, 2, seed=0)
    with pytest.raises(ValueError, match="seed"):
        it.set_state({**it.get_state(), "seed": 1})
    with pytest.raises(ValueError, match="global_batch_size"):
        it.set_state({**it.get_state(), "global_batch_size": 4})
    with pytest.raises(ValueError, match="missing"):
        it.set_state({"step": 3})


def test_sources_work_as_grain_sources():
    grain = pytest.importorskip("grain")
    data = _dataset(10)
    ds = grain.MapDataset.source(pipeline.as_source(data)).batch(4)
    np.testing.assert_array_equal(ds[1]["idx"], [4, 5, 6, 7])
    np.testing.assert_array_equal(ds[1]["x"], data["x"][4:8])


# ------------------------------------------------------------------------------------------------
# Optional dependencies
# ------------------------------------------------------------------------------------------------


def test_import_needs_only_jax_and_numpy():
    code = (
        "import sys, jaxdiff.data\n"
        "print(','.join(m for m in ('grain', 'tensorflow_datasets', 'sklearn', 'tensorflow') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import jaxdiff.data imported: {out.stdout.strip()}"


def test_missing_optional_dependency_names_the_extra(monkeypatch):
    with pytest.raises(ImportError, match=r"jaxdiff\[data\]"):
        import_optional("jaxdiff_no_such_module", "no-such-package", "this feature")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    from jaxdiff.data import tfds_source

    with pytest.raises(ImportError, match=r"tensorflow-datasets.*jaxdiff\[data\]"):
        tfds_source("mnist", "train")
