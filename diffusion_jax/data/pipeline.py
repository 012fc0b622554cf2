"""Grain input pipelines over TFDS ArrayRecord data sources (no TensorFlow at train time).

The data config (an ml_collections.ConfigDict, read by attribute) has the fields:

    name              TFDS name, e.g. 'digits', 'cifar10', 'celeb_a', 'imagenet_resized/32x32'
    data_dir          TFDS data dir; '' means $TFDS_DATA_DIR or ~/tensorflow_datasets
    train_split       e.g. 'train'       eval_split   e.g. 'test'
    image_size        output side length (square); 0 keeps the stored size
    random_flip       random horizontal flips of training images
    image_key         feature holding uint8 (H, W, C) or (H, W) images ('image')
    label_key         feature holding int labels ('label'); '' or a missing feature -> zeros
    num_read_threads  threads preparing batches ahead of the consumer; 0 = synchronous
    cache_in_memory   optional: True / False; absent or None = automatic (training splits
                      whose decoded images fit in AUTO_CACHE_BYTES are read once and kept)

'digits' is built on first use (from scikit-learn, offline). Every other dataset must be
prepared once with TensorFlow installed (`tfds build NAME --file_format=array_record`);
otherwise the functions here raise `DatasetNotPreparedError` naming that command.

Training stream: the training split is shuffled with a fresh permutation per epoch, epochs
are concatenated into one infinite sequence of examples, and that sequence is cut into
global batches of `global_batch_size`. Process p of P receives rows [p*b, (p+1)*b) of each
global batch (b = global_batch_size // P), so the global batch sequence depends only on the
seed and the batch size, never on the number of processes. Nothing is dropped: a global batch
may straddle two epochs. Permutations are drawn from (seed, epoch) and random flips from
(seed, global batch index) with numpy's Generator, so a stream is reproducible anywhere.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from diffusion_jax.data import digits as digits_lib
from diffusion_jax.errors import DatasetNotPreparedError

# Datasets this package knows how to build itself, without TensorFlow or network.
_BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {"digits": digits_lib.Digits}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a runner need to know about a dataset.

    image_shape: (H, W, C) of the images the pipelines yield (after resizing).
    num_classes: number of label classes, or None when the dataset has no class label.
    num_examples: examples per split, e.g. {'train': 1438, 'test': 359} for digits.
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int | None
    num_examples: Mapping[str, int]


def resolve_data_dir(data_dir: str | None) -> str:
    """The TFDS data dir: `data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    if not data_dir:
        data_dir = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return os.path.expanduser(data_dir)


def _prepare_command(name: str, data_dir: str) -> str:
    return (
        f"pip install tensorflow && tfds build {name} --data_dir={data_dir} "
        "--file_format=array_record"
    )


def _not_prepared(name: str, data_dir: str) -> DatasetNotPreparedError:
    return DatasetNotPreparedError(
        f"dataset {name!r} is not prepared in {data_dir}; prepare it once with: "
        f"{_prepare_command(name, data_dir)}"
    )


def _build_digits_like(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    builder_cls = _BUILDERS[name]
    builder = builder_cls(data_dir=data_dir)
    if builder.is_prepared():
        return builder
    try:
        # tfds writes into a temporary dir and renames it at the end, so a concurrent
        # reader never sees a half-written dataset.
        builder.download_and_prepare(
            download_config=digits_lib.offline_download_config(),
            file_format="array_record",
        )
    except OSError:
        # Another process won the race to rename its copy into place: use that one.
        builder = builder_cls(data_dir=data_dir)
        if not builder.is_prepared():
            raise
        return builder
    # A fresh builder reads the info back from disk (split sizes etc.).
    return builder_cls(data_dir=data_dir)


def ensure_prepared(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Returns the TFDS builder of a prepared dataset, building 'digits' on first use.

    Args:
      name: TFDS name, optionally with config / version ('imagenet_resized/32x32').
      data_dir: TFDS data dir; None or '' means $TFDS_DATA_DIR or ~/tensorflow_datasets.

    Raises:
      DatasetNotPreparedError: a dataset other than 'digits' has no prepared files in
        data_dir (fast: never downloads, never retries), or they are not in a
        random-access format.
      ValueError: `name` is neither a TFDS dataset nor present in data_dir.
    """
    data_dir = resolve_data_dir(data_dir)
    if name in _BUILDERS:
        return _build_digits_like(name, data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"unknown dataset {name!r}: not a TFDS dataset and not found in {data_dir} "
            f"({first_line}); see https://www.tensorflow.org/datasets/catalog/overview"
        ) from None
    if not builder.is_prepared():
        raise _not_prepared(name, data_dir)
    return builder


def _data_source(data_config: Any, split: str) -> Sequence[Mapping[str, Any]]:
    """Random-access source of one split: source[i] is a dict of numpy features."""
    name = data_config.name
    data_dir = resolve_data_dir(getattr(data_config, "data_dir", ""))
    builder = ensure_prepared(name, data_dir)
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except NotImplementedError:
        # Prepared, but as TFRecord (the `tfds build` default), which has no random access.
        stored = getattr(builder.info.file_format, "value", builder.info.file_format)
        fix = (
            f"delete {builder.data_dir} and it is rebuilt on first use"
            if name in _BUILDERS
            else f"rebuild it once with: {_prepare_command(name, data_dir)}"
        )
        raise DatasetNotPreparedError(
            f"dataset {name!r} in {data_dir} is stored as {stored}, which Grain cannot read "
            f"by random access; {fix}"
        ) from None


def _image_key(data_config: Any) -> str:
    return getattr(data_config, "image_key", "") or "image"


def _label_key(data_config: Any) -> str:
    return getattr(data_config, "label_key", "label") or ""


def _image_size(data_config: Any) -> int:
    return int(getattr(data_config, "image_size", 0) or 0)


def center_crop_and_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Crops the largest central square and resizes it (PIL bicubic, antialiased).

    Deterministic; returns `image` itself when it already has the requested size.

    Args:
      image: (H, W, C) uint8.
      size: output side length.

    Returns:
      (size, size, C) uint8.
    """
    h, w, c = image.shape
    if (h, w) == (size, size):
        return image
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(image)
    if c in (3, 4):  # PIL infers RGB / RGBA from the channel count.
        return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
    channels = [
        np.asarray(Image.fromarray(image[..., k]).resize((size, size), Image.Resampling.BICUBIC))
        for k in range(c)
    ]
    return np.stack(channels, axis=-1)


class _Preprocess:
    """Example dict -> ((H', W', C) uint8 image, int label)."""

    def __init__(self, image_key: str, label_key: str, image_size: int) -> None:
        self.image_key = image_key
        self.label_key = label_key
        self.image_size = image_size

    def __call__(self, example: Mapping[str, Any]) -> tuple[np.ndarray, int]:
        image = np.asarray(example[self.image_key])
        if image.ndim == 2:  # Grayscale stored without a channel axis.
            image = image[..., None]
        if image.ndim != 3 or image.dtype != np.uint8:
            raise TypeError(
                f"feature {self.image_key!r} must hold uint8 (H, W, C) or (H, W) images, got "
                f"{image.dtype} {image.shape}"
            )
        if self.image_size:
            image = center_crop_and_resize(image, self.image_size)
        label = int(example[self.label_key]) if self.label_key in example else 0
        return image, label


class _SplitReader:
    """Reads examples of one split by index, optionally from a copy held in memory.

    read(idx (n,) int) -> (images (n, H, W, C) uint8, labels (n,) int32).
    """

    def __init__(
        self, source: Sequence[Mapping[str, Any]], preprocess: _Preprocess, in_memory: bool
    ) -> None:
        self._source = source
        self._preprocess = preprocess
        self._cache: tuple[np.ndarray, np.ndarray] | None = None
        if in_memory:
            self._cache = self._read_source(np.arange(len(source)))

    def __len__(self) -> int:
        return len(self._source)

    def _read_source(self, idx: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        images: list[np.ndarray] = []
        labels: list[int] = []
        for start in range(0, len(idx), chunk):
            keys = [int(i) for i in idx[start : start + chunk]]
            # Batched reads are cheaper than one read per record.
            getitems = getattr(self._source, "__getitems__", None)
            examples = getitems(keys) if getitems else [self._source[i] for i in keys]
            for example in examples:
                image, label = self._preprocess(example)
                images.append(image)
                labels.append(label)
        if not images:
            raise ValueError("no examples to read")
        return np.stack(images), np.asarray(labels, np.int32)

    def read(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is not None:
            return self._cache[0][idx], self._cache[1][idx]
        return self._read_source(idx)


# Decoded training splits up to this size are held in memory (see data.cache_in_memory).
AUTO_CACHE_BYTES = 256 * 2**20
# Independent numpy streams drawn from one seed.
_SHUFFLE_STREAM = 0
_FLIP_STREAM = 1


def _seed_entropy(seed: int) -> int:
    # SeedSequence wants a non-negative integer; any Python int seed is accepted.
    return seed % 2**64


class _TrainBatches:
    """Local batch k of process p -> model-ready batch (the grain map function).

    Position i of the infinite example stream is example perm_e[i % n] with e = i // n and
    perm_e a permutation drawn from (seed, e). Global batch g holds positions
    [g*B, (g+1)*B); process p takes rows [p*b, (p+1)*b). Flips are drawn per global batch
    from (seed, g), so every row's augmentation is independent of the process count.
    """

    def __init__(
        self,
        reader: _SplitReader,
        *,
        seed: int,
        local_batch_size: int,
        process_index: int,
        process_count: int,
        random_flip: bool,
    ) -> None:
        self._reader = reader
        self._n = len(reader)
        self._seed = _seed_entropy(seed)
        self._b = local_batch_size
        self._p = process_index
        self._global_b = local_batch_size * process_count
        self._random_flip = random_flip
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # Prefetch threads call this concurrently.

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = np.random.default_rng((self._seed, _SHUFFLE_STREAM, epoch)).permutation(
                    self._n
                )
                if len(self._perms) >= 4:  # Prefetching touches at most two epochs at once.
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = perm
            return perm

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        start = k * self._global_b + self._p * self._b
        positions = np.arange(start, start + self._b, dtype=np.int64)
        epochs, within = np.divmod(positions, self._n)
        idx = np.empty(self._b, np.int64)
        for e in np.unique(epochs):
            rows = epochs == e
            idx[rows] = self._permutation(int(e))[within[rows]]
        images, labels = self._reader.read(idx)
        if self._random_flip:
            u = np.random.default_rng((self._seed, _FLIP_STREAM, k)).random(self._global_b)
            flip = u[self._p * self._b : (self._p + 1) * self._b] < 0.5
            images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
        return {"image": to_float(images), "label": labels.astype(np.int32)}


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, C) -> float32 in [-1, 1]."""
    return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def _read_options(data_config: Any) -> grain.ReadOptions:
    threads = int(getattr(data_config, "num_read_threads", 0) or 0)
    # The prefetched elements are whole batches, so a small buffer is enough.
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)


def _split_reader(data_config: Any, split: str, *, for_training: bool) -> _SplitReader:
    source = _data_source(data_config, split)
    if len(source) == 0:
        raise ValueError(f"split {split!r} of {data_config.name!r} is empty")
    preprocess = _Preprocess(
        _image_key(data_config), _label_key(data_config), _image_size(data_config)
    )
    in_memory = getattr(data_config, "cache_in_memory", None) if for_training else False
    if in_memory is None:
        # Small datasets (digits, mnist, cifar10, svhn) are decoded once and kept in memory:
        # batches are then a single gather instead of one decode per example.
        image_bytes = int(np.prod(dataset_info(data_config).image_shape))
        in_memory = len(source) * image_bytes <= AUTO_CACHE_BYTES
    return _SplitReader(source, preprocess, bool(in_memory))


def dataset_info(data_config: Any) -> DatasetInfo:
    """Shapes, classes and split sizes of the configured dataset (prepares 'digits')."""
    name = data_config.name
    builder = ensure_prepared(name, getattr(data_config, "data_dir", ""))
    features = builder.info.features
    image_key, label_key = _image_key(data_config), _label_key(data_config)
    if features is None or image_key not in features:
        raise ValueError(f"dataset {name!r} has no feature {image_key!r}")
    shape = tuple(features[image_key].shape)
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3 or shape[-1] is None:
        raise ValueError(f"feature {image_key!r} of {name!r} is not an image: shape {shape}")
    size = _image_size(data_config)
    if size:
        h, w = size, size
    elif shape[0] is None or shape[1] is None:
        raise ValueError(f"{name!r} images have variable size {shape}; set data.image_size")
    else:
        h, w = shape[0], shape[1]
    num_classes = None
    if label_key and label_key in features:
        num_classes = getattr(features[label_key], "num_classes", None)
    splits = {split: int(info.num_examples) for split, info in builder.info.splits.items()}
    return DatasetInfo(
        name=name, image_shape=(h, w, shape[-1]), num_classes=num_classes, num_examples=splits
    )


def train_dataset(
    data_config: Any,
    *,
    seed: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """This process's share of the infinite training stream (see the module docstring).

    Returns:
      An IterDataset of dicts {'image': float32 (b, H, W, C) in [-1, 1], 'label': int32 (b,)}
      with b = global_batch_size // process_count.

    Raises:
      ValueError: global_batch_size is not a positive multiple of process_count, or
        process_index is not in [0, process_count).
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index ({process_index}) < process_count ({process_count})"
        )
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size ({global_batch_size}) must be a positive multiple of "
            f"process_count ({process_count})"
        )
    reader = _split_reader(data_config, data_config.train_split, for_training=True)
    batches = _TrainBatches(
        reader,
        seed=seed,
        local_batch_size=global_batch_size // process_count,
        process_index=process_index,
        process_count=process_count,
        random_flip=bool(getattr(data_config, "random_flip", False)),
    )
    # An infinite index dataset mapped to batches: grain supplies threaded prefetch and a
    # checkpointable iterator state ({'next_index': k}).
    ds = grain.MapDataset.range(0, sys.maxsize).map(batches)
    return ds.to_iter_dataset(_read_options(data_config))


def train_iterator(
    data_config: Any,
    *,
    seed: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Iterator over `train_dataset(...)`: checkpoint it with get_state() / set_state() or
    grain.checkpoint.CheckpointSave / CheckpointRestore inside an orbax Composite."""
    return iter(
        train_dataset(
            data_config,
            seed=seed,
            global_batch_size=global_batch_size,
            process_index=process_index,
            process_count=process_count,
        )
    )


def eval_images(
    data_config: Any, split: str | None = None, *, max_examples: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """All images of a split, in the data source's (fixed) order, resized like training.

    Args:
      data_config: the data config.
      split: TFDS split (slicing like 'test[:50%]' works); None means data_config.eval_split.
      max_examples: keep only the first max_examples.

    Returns:
      images: (N, H, W, C) uint8; labels: (N,) int32 (zeros when unlabeled).
    """
    split = split or data_config.eval_split
    reader = _split_reader(data_config, split, for_training=False)
    n = len(reader) if max_examples is None else min(len(reader), max_examples)
    if n <= 0:
        shape = dataset_info(data_config).image_shape
        return np.zeros((0, *shape), np.uint8), np.zeros((0,), np.int32)
    return reader.read(np.arange(n))
