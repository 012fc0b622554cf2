"""An ADM-style class-conditional ImageNet 64x64 U-Net (Dhariwal & Nichol 2021's layout: channel
multipliers (1, 2, 3, 4), 3 residual blocks per resolution, attention at 32, 16 and 8, learned
variances) at the 256 base channels ADM uses for its larger models: 471,875,078 parameters.

Not trained in this repository: it is the pod-scale model of the FSDP memory simulation
(`python -m benchmarks.fsdp_memory`, docs/fsdp.md). Its state (parameters, two Adam moments,
EMA: 16 bytes per parameter) is 7.0 GiB before gradients and activations; split 8 ways
(`parallel.fsdp=8`, set below) a 16 GiB chip takes about 14 images instead of 7 (XLA's memory
analysis). On fewer than 8 devices pass `--config.parallel.fsdp=1` (or a divisor of the device
count). Prepare the data once (needs TensorFlow):
    pip install tensorflow && tfds build imagenet_resized/64x64 --file_format=array_record
(ImageNet's archives must be downloaded by hand first; see the TFDS catalog.)
"""

from __future__ import annotations

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.name = "imagenet_resized/64x64"
    config.data.image_size = 64
    config.data.random_flip = True
    config.data.num_read_threads = 16

    config.model.ch = 256
    config.model.ch_mult = (1, 2, 3, 4)
    config.model.num_res_blocks = 3
    config.model.attn_resolutions = (32, 16, 8)
    config.model.dropout = 0.1
    config.model.class_conditional = True
    config.model.learn_sigma = True
    config.model.dtype = "bfloat16"

    config.diffusion.schedule = "cosine"
    config.diffusion.num_timesteps = 1000
    config.diffusion.prediction = "eps"
    config.diffusion.label_dropout = 0.1

    config.training.num_train_steps = 540_000
    config.training.batch_size = 2048
    config.training.learning_rate = 3e-4
    config.training.warmup_steps = 5000
    config.training.ema_decay = 0.9999
    config.training.log_every = 100
    config.training.checkpoint_every = 5_000
    config.training.sample_every = 50_000

    # 64 chips: 8 groups of 8 that each hold one copy of the state, split eight ways.
    config.parallel.fsdp = 8

    config.sampling.sampler = "dpm_solver++"
    config.sampling.num_steps = 25
    config.sampling.num_samples = 50_000
    config.sampling.batch_size = 512
    config.sampling.guidance_scale = 1.0

    config.eval.feature_network = "inception"
    config.eval.inception_weights = "inception_fid.npz"  # see docs/evaluation.md
    config.eval.metrics = ("fd", "is", "precision_recall")
    config.eval.num_samples = 50_000
    config.eval.batch_size = 512
    config.eval.shard_size = 5_000
    config.eval.pr_num_samples = 10_000
    return config
