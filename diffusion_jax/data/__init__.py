"""Datasets (TFDS builders) and Grain input pipelines; no TensorFlow needed at train time."""

from diffusion_jax.data.pipeline import (
    DatasetInfo,
    DatasetNotPreparedError,
    center_crop_and_resize,
    dataset_info,
    ensure_prepared,
    eval_images,
    resolve_data_dir,
    train_dataset,
    train_iterator,
)

__all__ = [
    "DatasetInfo",
    "DatasetNotPreparedError",
    "center_crop_and_resize",
    "dataset_info",
    "ensure_prepared",
    "eval_images",
    "resolve_data_dir",
    "train_dataset",
    "train_iterator",
]
