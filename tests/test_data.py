"""Tests of the digits TFDS builder and the Grain training / evaluation pipelines."""

from __future__ import annotations

import collections
import importlib.util
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import data
from diffusion_jax.data import digits

NUM_TRAIN, NUM_TEST = 1438, 359


@pytest.fixture
def data_dir(digits_data_dir: str) -> str:
    """A TFDS data dir holding digits, built by conftest's session fixture (ensure_prepared)."""
    return digits_data_dir


def make_config(data_dir: str, **overrides: Any) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        {
            "name": "digits",
            "data_dir": data_dir,
            "train_split": "train",
            "eval_split": "test",
            "image_size": 8,
            "random_flip": False,
            "image_key": "image",
            "label_key": "label",
            "num_read_threads": 0,
        }
    )
    cfg.update(overrides)
    return cfg


def take(it: Any, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def assert_same_batches(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def example_keys(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
    """Content identity of examples: uint8 image bytes + label (digits has no duplicates)."""
    if images.dtype != np.uint8:
        images = np.rint((images + 1.0) * 127.5).astype(np.uint8)
    return [
        im.tobytes() + int(lb).to_bytes(1, "little") for im, lb in zip(images, labels, strict=True)
    ]


def test_digits_builds_and_reads_back_without_tensorflow(data_dir: str) -> None:
    assert importlib.util.find_spec("tensorflow") is None or "tensorflow" not in sys.modules
    builder = data.ensure_prepared("digits", data_dir)
    assert builder.info.file_format.value == "array_record"
    assert str(builder.info.version) == "1.0.0"
    assert builder.info.supervised_keys == ("image", "label")
    assert builder.info.features["label"].num_classes == 10
    src = tfds.data_source("digits", split="train", data_dir=data_dir, download=False)
    ex = src[0]
    assert ex["image"].shape == (8, 8, 1) and ex["image"].dtype == np.uint8
    assert 0 <= int(ex["label"]) < 10
    images, _ = data.eval_images(make_config(data_dir), "train")
    assert images.min() == 0 and images.max() == 255
    assert "tensorflow" not in sys.modules


def test_digits_splits_are_stratified_disjoint_and_match_sklearn(data_dir: str) -> None:
    info = data.dataset_info(make_config(data_dir))
    assert info.num_examples == {"train": NUM_TRAIN, "test": NUM_TEST}
    assert info.image_shape == (8, 8, 1) and info.num_classes == 10

    all_images, all_labels = digits.load_images_and_labels()
    idx = digits.split_indices(all_labels)
    assert not set(idx["train"]) & set(idx["test"])
    assert len(idx["train"]) + len(idx["test"]) == digits.NUM_EXAMPLES
    np.testing.assert_array_equal(idx["test"], digits.split_indices(all_labels)["test"])
    # Stratified: each class contributes round(20%) of its examples to 'test'.
    expected = np.round(np.bincount(all_labels) * digits.TEST_FRACTION)
    np.testing.assert_array_equal(np.bincount(all_labels[idx["test"]]), expected)

    cfg = make_config(data_dir)
    stored = {s: example_keys(*data.eval_images(cfg, s)) for s in ("train", "test")}
    assert not set(stored["train"]) & set(stored["test"])
    for split in ("train", "test"):
        assert collections.Counter(stored[split]) == collections.Counter(
            example_keys(all_images[idx[split]], all_labels[idx[split]])
        )


def test_train_batches_are_float_images_in_unit_range_with_int_labels(data_dir: str) -> None:
    it = data.train_iterator(make_config(data_dir), seed=0, global_batch_size=32)
    for batch in take(it, 3):
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (32, 8, 8, 1) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
        assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
        assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
        assert ((batch["label"] >= 0) & (batch["label"] < 10)).all()


@pytest.mark.parametrize("cache_in_memory", [True, False])
def test_same_seed_gives_same_stream_and_other_seed_differs(
    data_dir: str, cache_in_memory: bool
) -> None:
    cfg = make_config(data_dir, cache_in_memory=cache_in_memory)
    a = take(data.train_iterator(cfg, seed=3, global_batch_size=16), 4)
    b = take(data.train_iterator(cfg, seed=3, global_batch_size=16), 4)
    c = take(data.train_iterator(cfg, seed=4, global_batch_size=16), 4)
    assert_same_batches(a, b)
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_in_memory_and_streamed_reading_give_the_same_stream(data_dir: str) -> None:
    cached = make_config(data_dir, cache_in_memory=True, random_flip=True)
    streamed = make_config(data_dir, cache_in_memory=False, random_flip=True)
    assert_same_batches(
        take(data.train_iterator(cached, seed=1, global_batch_size=24), 3),
        take(data.train_iterator(streamed, seed=1, global_batch_size=24), 3),
    )


def test_each_epoch_visits_every_train_example_once_in_a_new_order(data_dir: str) -> None:
    cfg = make_config(data_dir)
    batch_size = 100  # Does not divide 1438: batches straddle the epoch boundary.
    num_batches = -(-2 * NUM_TRAIN // batch_size)
    batches = take(data.train_iterator(cfg, seed=0, global_batch_size=batch_size), num_batches)
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    keys = example_keys(images, labels)
    epoch0, epoch1 = keys[:NUM_TRAIN], keys[NUM_TRAIN : 2 * NUM_TRAIN]
    everything = collections.Counter(example_keys(*data.eval_images(cfg, "train")))
    assert collections.Counter(epoch0) == everything
    assert collections.Counter(epoch1) == everything
    assert epoch0 != epoch1


@pytest.mark.parametrize("num_read_threads", [0, 2])
def test_restored_iterator_state_continues_the_stream(data_dir: str, num_read_threads: int) -> None:
    cfg = make_config(data_dir, num_read_threads=num_read_threads, random_flip=True)
    reference = take(data.train_iterator(cfg, seed=0, global_batch_size=64), 40)

    it = data.train_iterator(cfg, seed=0, global_batch_size=64)
    take(it, 25)  # 25 * 64 > 1438: the saved position is in the second epoch.
    state = it.get_state()
    resumed = data.train_iterator(cfg, seed=0, global_batch_size=64)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 15), reference[25:])


def test_iterator_state_round_trips_through_orbax_checkpoint_manager(
    data_dir: str, tmp_path: Path
) -> None:
    cfg = make_config(data_dir, num_read_threads=2)
    reference = take(data.train_iterator(cfg, seed=7, global_batch_size=32), 12)

    it = data.train_iterator(cfg, seed=7, global_batch_size=32)
    take(it, 5)
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
        mngr.save(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
        assert mngr.latest_step() == 5
        fresh = data.train_iterator(cfg, seed=7, global_batch_size=32)
        restored = mngr.restore(
            5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh))
        )
    assert_same_batches(take(restored["data_iter"], 7), reference[5:])


@pytest.mark.parametrize("random_flip", [False, True])
def test_process_shards_concatenate_to_the_single_process_global_batches(
    data_dir: str, random_flip: bool
) -> None:
    cfg = make_config(data_dir, random_flip=random_flip)
    single = take(data.train_iterator(cfg, seed=5, global_batch_size=48), 35)
    shards = [
        take(
            data.train_iterator(
                cfg, seed=5, global_batch_size=48, process_index=p, process_count=3
            ),
            35,
        )
        for p in range(3)
    ]
    for k, batch in enumerate(single):
        assert all(shard[k]["image"].shape == (16, 8, 8, 1) for shard in shards)
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                np.concatenate([shard[k][key] for shard in shards]), batch[key]
            )


def test_batch_size_not_divisible_by_process_count_raises(data_dir: str) -> None:
    with pytest.raises(ValueError, match="multiple of process_count"):
        data.train_iterator(make_config(data_dir), seed=0, global_batch_size=10, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        data.train_iterator(
            make_config(data_dir), seed=0, global_batch_size=8, process_index=2, process_count=2
        )


def test_images_resize_to_configured_size_everywhere(data_dir: str) -> None:
    cfg = make_config(data_dir, image_size=16)
    assert data.dataset_info(cfg).image_shape == (16, 16, 1)
    batch = next(data.train_iterator(cfg, seed=0, global_batch_size=8))
    assert batch["image"].shape == (8, 16, 16, 1)
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    images, labels = data.eval_images(cfg, "test")
    assert images.shape == (NUM_TEST, 16, 16, 1) and images.dtype == np.uint8
    assert labels.shape == (NUM_TEST,)
    # Deterministic, and a no-op when the size already matches.
    np.testing.assert_array_equal(images, data.eval_images(cfg, "test")[0])
    small = data.eval_images(make_config(data_dir), "test")[0]
    np.testing.assert_array_equal(data.center_crop_and_resize(small[0], 8), small[0])


def test_center_crop_and_resize_handles_non_square_rgb() -> None:
    image = np.zeros((10, 6, 3), np.uint8)
    image[2:8] = 200  # The central 6x6 square.
    out = data.center_crop_and_resize(image, 3)
    assert out.shape == (3, 3, 3) and out.dtype == np.uint8
    assert (out == 200).all()


def test_random_flip_mirrors_some_images_deterministically(data_dir: str) -> None:
    plain = take(data.train_iterator(make_config(data_dir), seed=2, global_batch_size=64), 2)
    flip_cfg = make_config(data_dir, random_flip=True)
    flipped = take(data.train_iterator(flip_cfg, seed=2, global_batch_size=64), 2)
    again = take(data.train_iterator(flip_cfg, seed=2, global_batch_size=64), 2)
    assert_same_batches(flipped, again)
    x, y = (
        np.concatenate([b["image"] for b in plain]),
        np.concatenate([b["image"] for b in flipped]),
    )
    same = (x == y).all(axis=(1, 2, 3))
    mirrored = (x[:, :, ::-1] == y).all(axis=(1, 2, 3))
    assert (same | mirrored).all()  # Flipping changes nothing but the orientation...
    assert 20 < (mirrored & ~same).sum() < 108  # ...of about half of the 128 images.
    np.testing.assert_array_equal(plain[0]["label"], flipped[0]["label"])


def test_eval_images_returns_the_whole_split_in_a_fixed_order(data_dir: str) -> None:
    cfg = make_config(data_dir)
    images, labels = data.eval_images(cfg)  # eval_split: 'test'
    assert images.shape == (NUM_TEST, 8, 8, 1) and images.dtype == np.uint8
    assert labels.shape == (NUM_TEST,) and labels.dtype == np.int32
    first, first_labels = data.eval_images(cfg, "test", max_examples=10)
    np.testing.assert_array_equal(first, images[:10])
    np.testing.assert_array_equal(first_labels, labels[:10])


def test_missing_label_key_gives_zero_labels_and_no_classes(data_dir: str) -> None:
    cfg = make_config(data_dir, label_key="")
    assert data.dataset_info(cfg).num_classes is None
    batch = next(data.train_iterator(cfg, seed=0, global_batch_size=8))
    np.testing.assert_array_equal(batch["label"], np.zeros(8, np.int32))


def test_unprepared_dataset_fails_fast_with_the_command_that_prepares_it(
    tmp_path: Path,
) -> None:
    empty = str(tmp_path / "empty")
    start = time.monotonic()
    with pytest.raises(data.DatasetNotPreparedError) as excinfo:
        data.train_iterator(make_config(empty, name="mnist"), seed=0, global_batch_size=8)
    assert time.monotonic() - start < 5.0
    message = str(excinfo.value)
    assert "\n" not in message
    assert f"tfds build mnist --data_dir={empty} --file_format=array_record" in message
    assert isinstance(excinfo.value, ValueError)


def test_unknown_dataset_name_raises_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset_xyz'") as excinfo:
        data.ensure_prepared("no_such_dataset_xyz", str(tmp_path))
    assert not isinstance(excinfo.value, data.DatasetNotPreparedError)
    assert "\n" not in str(excinfo.value)


def test_default_data_dir_follows_tfds_data_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFDS_DATA_DIR", "/somewhere/tfds")
    assert data.resolve_data_dir("") == "/somewhere/tfds"
    assert data.resolve_data_dir("/explicit") == "/explicit"
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert data.resolve_data_dir(None).endswith("tensorflow_datasets")


def test_dataset_stored_as_tfrecord_names_the_fix(data_dir: str, tmp_path: Path) -> None:
    # Fake a TFRecord copy of digits: the file format lives in dataset_info.json.
    src = Path(data_dir) / "digits" / "1.0.0"
    dst = tmp_path / "digits" / "1.0.0"
    shutil.copytree(src, dst)
    info = dst / "dataset_info.json"
    info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
    for f in dst.glob("*array_record*"):
        f.rename(f.with_name(f.name.replace("array_record", "tfrecord")))
    with pytest.raises(data.DatasetNotPreparedError, match=r"stored as tfrecord.*delete"):
        data.eval_images(make_config(str(tmp_path)))
