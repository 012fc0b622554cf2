"""Ho et al. 2020 (DDPM) on CIFAR-10: the paper's model (35.7M parameters) and hyperparameters.

Prepare the data once (needs TensorFlow, only for this step):
    pip install tensorflow && tfds build cifar10 --file_format=array_record
"""

from __future__ import annotations

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.random_flip = True
    config.data.num_read_threads = 8

    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1

    config.diffusion.schedule = "linear"
    config.diffusion.num_timesteps = 1000
    config.diffusion.prediction = "eps"
    config.diffusion.loss_weighting = "simple"

    config.training.num_train_steps = 800_000
    config.training.batch_size = 128
    config.training.learning_rate = 2e-4
    config.training.warmup_steps = 5000
    config.training.grad_clip = 1.0
    config.training.ema_decay = 0.9999
    config.training.log_every = 100
    config.training.checkpoint_every = 10_000
    config.training.sample_every = 50_000

    config.sampling.sampler = "ddpm"
    config.sampling.num_steps = 1000
    config.sampling.variance = "fixed_large"
    config.sampling.num_samples = 50_000
    config.sampling.batch_size = 256

    # FID against the train split (Ho et al. report FID 3.17 with 50k samples).
    config.eval.feature_network = "inception"
    config.eval.inception_weights = "inception_fid.npz"  # see docs/evaluation.md
    config.eval.metrics = ("fd", "is", "precision_recall")
    config.eval.num_samples = 50_000
    config.eval.batch_size = 256
    config.eval.shard_size = 5_000
    config.eval.pr_num_samples = 10_000
    config.eval.bpd_num_images = 0
    return config
