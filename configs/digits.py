"""The embedded default: sklearn's 8x8 digits, trained on 2 CPU cores in about 5 minutes.

python -m experiments.main --config=configs/digits.py --workdir=workdirs/digits
"""

from __future__ import annotations

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.name = "digits"
    config.data.image_size = 8

    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0

    config.diffusion.schedule = "cosine"
    config.diffusion.prediction = "eps"

    config.training.num_train_steps = 2000
    config.training.batch_size = 128
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 100
    config.training.ema_decay = 0.998
    config.training.log_every = 100
    config.training.checkpoint_every = 500
    config.training.num_grid_samples = 100

    # YNNPACK for the matmuls only: its reductions, cheap on the CIFAR-10 U-Net's large
    # activations, each cost a library call on these small ones (docs/performance.md).
    config.xla.cpu_ynnpack_ops = "dot"

    # Chosen by measurement (docs/samplers.md#digits-results-per-formulation): the best digits FD
    # at 20 model evaluations (1.71 / 2.67 on sample seeds 0 / 1) and at 10 (2.00 / 2.03).
    config.sampling.sampler = "dpm_solver++2m_sde"
    config.sampling.num_steps = 20
    config.sampling.num_samples = 1000
    config.sampling.batch_size = 500

    # Digits FD/IS/precision-recall in the shipped digits classifier's feature space, against
    # the train split (1438 images); bits/dim on the first 200 test images.
    config.eval.feature_network = "digits"
    config.eval.metrics = ("fd", "is", "precision_recall")
    config.eval.num_samples = 1000
    config.eval.batch_size = 500
    config.eval.pr_num_samples = 1000
    config.eval.bpd_num_images = 200
    return config
