r"""Train the digits feature network (DigitsCNN) and write the weights that ship with the package.

    python -m experiments.train_digits_classifier [--data_dir=] [--output=]

Trains on the digits TRAIN split only (the test split stays held out for the accuracy report
and for the FD floor), deterministically: fixed seed, fixed data order and augmentation drawn
from numpy Generators, AdamW (about 30 s of one CPU core). Writes flax msgpack weights
to diffusion_jax/evaluation/assets/digits_net.msgpack unless --output says otherwise, and prints
the test accuracy and the weights' fingerprint. Changing the weights changes every digits FD, and
reference statistics made with the old weights are then refused: recreate them with
`python -m experiments.reference_stats`.
"""

from __future__ import annotations

import os
from typing import Any, cast

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from flax import serialization

from diffusion_jax.data import pipeline
from diffusion_jax.evaluation import digits_net

_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data_dir of the digits dataset.")
_OUTPUT = flags.DEFINE_string(
    "output", "", "Where to write the weights; default: the package's assets/digits_net.msgpack."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initialisation, data order and shifts.")
_EPOCHS = flags.DEFINE_integer("num_epochs", 100, "Passes over the train split.")


def digits_data_config(data_dir: str = "") -> ml_collections.ConfigDict:
    """The data config of the stored 8x8 digits (no resizing, no flips)."""
    return ml_collections.ConfigDict(
        {
            "name": "digits",
            "data_dir": data_dir,
            "train_split": "train",
            "eval_split": "test",
            "image_size": 0,
            "random_flip": False,
            "image_key": "image",
            "label_key": "label",
            "num_read_threads": 0,
        }
    )


def random_shifts(images: np.ndarray, rng: np.random.Generator, max_shift: int = 1) -> np.ndarray:
    """Translates each uint8 (N, H, W, C) image by up to max_shift pixels, filling with black."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)))
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
    out = np.empty_like(images)
    for i in range(n):
        out[i] = padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
    return out


def outlier_images(rng: np.random.Generator, n: int) -> np.ndarray:
    """n uint8 (n, 8, 8, 1) images that are no digit: uniform or Gaussian noise, constants."""
    kind = rng.integers(0, 3, size=n)
    uniform = rng.integers(0, 256, size=(n, 8, 8, 1))
    gaussian = rng.normal(
        rng.uniform(0, 255, (n, 1, 1, 1)), rng.uniform(10, 120, (n, 1, 1, 1)), size=(n, 8, 8, 1)
    )
    constant = np.broadcast_to(rng.integers(0, 256, size=(n, 1, 1, 1)), (n, 8, 8, 1))
    k = kind[:, None, None, None]
    images = np.where(k == 0, uniform, np.where(k == 1, gaussian, constant))
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def train(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int = 0,
    num_epochs: int = 100,
    batch_size: int = 64,
    num_outliers: int = 8,
    outlier_weight: float = 0.2,
    learning_rate: float = 3e-3,
    weight_decay: float = 1e-2,
) -> tuple[Any, list[float]]:
    """Trains DigitsCNN with AdamW (cosine decay), 1-pixel random shifts and outlier exposure.

    Outlier exposure (Hendrycks et al. 2019): each step also pushes the predictions on
    `num_outliers` noise / constant images towards the uniform distribution, so that the
    class check reports noise as unconfident instead of as some digit.

    Args:
      images: uint8 (N, 8, 8, 1) training images.
      labels: int (N,) classes 0..9.

    Returns:
      (variables {'params': ...}, mean training loss of each epoch).
    """
    digits_net.check_images(images)
    n = len(images)
    steps_per_epoch = -(-n // batch_size)
    schedule = optax.cosine_decay_schedule(learning_rate, num_epochs * steps_per_epoch)
    tx = optax.adamw(schedule, weight_decay=weight_decay)
    model = digits_net.DigitsCNN()
    variables = digits_net.init_params(seed)
    opt_state = tx.init(variables)

    def loss_fn(v: Any, x: jax.Array, y: jax.Array, w: jax.Array, o: jax.Array) -> jax.Array:
        _, logits = cast(tuple[jax.Array, jax.Array], model.apply(v, jnp.concatenate([x, o])))
        digit_logits, outlier_logits = logits[: len(x)], logits[len(x) :]
        per_example = optax.softmax_cross_entropy_with_integer_labels(digit_logits, y)
        uniform_ce = -jnp.mean(jax.nn.log_softmax(outlier_logits))
        return jnp.sum(per_example * w) / jnp.sum(w) + outlier_weight * uniform_ce

    @jax.jit
    def step(
        v: Any, s: Any, x: jax.Array, y: jax.Array, w: jax.Array, o: jax.Array
    ) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(v, x, y, w, o)
        updates, s = tx.update(grads, s, v)
        return optax.apply_updates(v, updates), s, loss

    rng = np.random.default_rng(seed)
    epoch_losses = []
    for _ in range(num_epochs):
        order = rng.permutation(n)
        shifted = random_shifts(images[order], rng)
        ordered_labels = labels[order].astype(np.int32)
        losses = []
        for start in range(0, n, batch_size):
            x = digits_net.to_model_input(shifted[start : start + batch_size])
            y = ordered_labels[start : start + batch_size]
            w = np.ones(len(x), np.float32)
            if len(x) < batch_size:  # Zero-weight padding keeps one compiled shape.
                pad = batch_size - len(x)
                x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])
                y = np.concatenate([y, np.zeros(pad, np.int32)])
                w = np.concatenate([w, np.zeros(pad, np.float32)])
            o = digits_net.to_model_input(outlier_images(rng, num_outliers))
            variables, opt_state, loss = step(variables, opt_state, x, y, w, o)
            losses.append(float(loss))
        epoch_losses.append(float(np.mean(losses)))
    return variables, epoch_losses


def default_output() -> str:
    return os.path.join(os.path.dirname(digits_net.__file__), digits_net.DEFAULT_WEIGHTS)


def main(argv: list[str]) -> None:
    del argv
    config = digits_data_config(_DATA_DIR.value)
    pipeline.ensure_prepared("digits", _DATA_DIR.value or None)
    train_images, train_labels = pipeline.eval_images(config, "train")
    test_images, test_labels = pipeline.eval_images(config, "test")
    variables, losses = train(
        train_images, train_labels, seed=_SEED.value, num_epochs=_EPOCHS.value
    )
    output = _OUTPUT.value or default_output()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), variables)
    with open(output, "wb") as f:
        f.write(serialization.msgpack_serialize(params))
    net = digits_net.DigitsFeatures(output)  # Reload: the numbers below are the file's.
    test_acc = float(np.mean(net(test_images)[1].argmax(-1) == test_labels))
    train_acc = float(np.mean(net(train_images)[1].argmax(-1) == train_labels))
    print(f"final epoch loss {losses[-1]:.4f}")
    print(f"accuracy: train {train_acc:.4f} ({len(train_labels)} images), ", end="")
    print(f"test {test_acc:.4f} ({len(test_labels)} images)")
    print(f"wrote {output} ({os.path.getsize(output)} bytes, fingerprint {net.fingerprint})")


if __name__ == "__main__":
    app.run(main)
