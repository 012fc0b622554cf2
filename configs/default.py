"""Shared defaults. Every config starts from `get_config()` here and overrides what differs.

All keys of the command-line contract exist here, so `--config.x.y=...` works for every config.
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = data = ml_collections.ConfigDict()
    data.name = "digits"
    data.data_dir = ""  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
    data.train_split = "train"
    data.eval_split = "test"
    data.image_size = 8
    data.random_flip = False
    data.image_key = "image"
    data.label_key = "label"
    data.num_read_threads = 0  # 0 = read synchronously in the training thread

    config.model = model = ml_collections.ConfigDict()
    model.ch = 64
    model.ch_mult = (1, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (4,)
    model.dropout = 0.1
    model.class_conditional = False  # embed labels (num_classes comes from the dataset)
    model.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16'; params stay float32
    # Improved DDPM: also output the per-pixel variance interpolation (2x output channels).
    model.learn_sigma = False
    # Rematerialise residual blocks in the backward pass: less memory, ~1/3 more compute.
    model.remat = False

    config.diffusion = diffusion = ml_collections.ConfigDict()
    # 'ddpm' (discrete timesteps on `schedule`) | 'edm' (Karras et al. 2022: continuous sigma,
    # preconditioned denoiser; docs/edm.md) | 'flow' (flow matching: x_t = (1 - t) x0 + t n,
    # velocity target; docs/flow.md). Every sampler samples every formulation.
    diffusion.formulation = "ddpm"
    diffusion.sigma_data = 0.5  # edm: the data's standard deviation
    diffusion.p_mean = -1.2  # edm: training ln(sigma) ~ N(p_mean, p_std^2)
    diffusion.p_std = 1.2
    # flow: training t ~ 'logit_normal' (sigmoid of N(mean, std^2); SD3: 0, 1) | 'uniform',
    # then the shift t' = s t / (1 + (s - 1) t) (1 = none; SD3 at 1024 px: 3).
    diffusion.flow_time_sampling = "logit_normal"
    diffusion.flow_logit_mean = 0.0
    diffusion.flow_logit_std = 1.0
    diffusion.flow_shift = 1.0
    diffusion.schedule = "linear"
    diffusion.num_timesteps = 1000
    diffusion.prediction = "eps"  # 'eps' | 'x0' | 'v'
    # Lin et al. 2024: rescale the schedule so the last timestep is pure noise (needs v or x0).
    diffusion.zero_terminal_snr = False
    diffusion.loss_weighting = "simple"  # 'simple' | 'snr' | 'min_snr'
    diffusion.min_snr_gamma = 5.0
    diffusion.label_dropout = 0.1  # classifier-free guidance training (class-conditional models)
    diffusion.vlb_weight = 0.001  # lambda of the hybrid loss L_simple + lambda L_vlb (learn_sigma)

    config.training = training = ml_collections.ConfigDict()
    training.num_train_steps = 10_000
    training.batch_size = 128  # global batch over all devices and hosts
    training.learning_rate = 2e-4
    training.warmup_steps = 1000
    training.grad_clip = 1.0
    training.weight_decay = 0.0
    training.adam_b1 = 0.9
    training.adam_b2 = 0.999
    training.ema_decay = 0.9999
    # How the EMA starts: 'debias' | 'ramp' | 'none' (train_state.EMA_WARMUPS; docs/commands.md).
    training.ema_warmup = "ramp"
    training.log_every = 100
    training.checkpoint_every = 1000
    training.max_checkpoints_to_keep = 3
    training.sample_every = 0  # 0 = only at the end of training
    training.num_grid_samples = 64
    # Steps with a non-finite loss or gradient are skipped; this many in a row stop the run.
    training.max_consecutive_nonfinite = 10
    # Post-hoc EMA (Karras et al. 2024; docs/posthoc_ema.md): every this many steps, write
    # snapshots of power-function EMAs of these relative lengths (0 = off: none tracked).
    training.posthoc_ema_every = 0
    training.posthoc_ema_sigma_rels = (0.05, 0.10)
    # Test hooks (leave at their defaults): steps (1-based, as logged) whose batch images are
    # replaced by NaN, and seconds to pause right after each checkpoint save starts.
    training.debug_nan_steps = ()
    training.debug_sleep_after_save = 0.0

    # How devices split the work (docs/fsdp.md). Devices along the 'fsdp' axis hold 1/fsdp of
    # the parameters, Adam moments and EMA each (fully sharded data parallelism); the rest form
    # the 'data' axis. 1 = everything replicated (plain data parallelism). The global batch is
    # split over all devices either way. Free to change on resume: checkpoints restore onto
    # any mesh.
    config.parallel = par = ml_collections.ConfigDict()
    par.fsdp = 1  # must divide the device count
    par.fsdp_min_size = 2**14  # arrays with fewer elements stay replicated

    # Which ops XLA:CPU hands to the YNNPACK library in the runner's jits: a comma-separated
    # subset of 'dot', 'convolution', 'reduce'; '' for none (XLA's own Eigen kernels and loops);
    # 'jax' for jax's default (all three). Chosen per config by measurement
    # (`benchmarks.ynnpack_ops`, docs/performance.md); rounding-level only; ignored off CPU.
    config.xla = xla = ml_collections.ConfigDict()
    xla.cpu_ynnpack_ops = "dot,reduce"

    config.sampling = sampling = ml_collections.ConfigDict()
    # 'ddim' (alias 'euler') | 'ddpm' | 'heun' | 'dpm_solver++' | 'dpm_solver++3m' |
    # 'dpm_solver++2m_sde' | 'unipc', on every formulation (docs/samplers.md)
    sampling.sampler = "ddim"
    sampling.num_steps = 50
    # 'linspace' | 'leading' | 'trailing' | 'quadratic' | 'karras' | 'logsnr' (docs/samplers.md);
    # '' = the sampler's own default on the run's formulation (heun: 'karras'; edm: 'karras').
    sampling.timestep_spacing = ""
    sampling.sigma_max = 80.0  # 'karras' and 'logsnr': the largest sigma visited
    sampling.rho = 7.0  # 'karras': Karras et al.'s rho
    sampling.sigma_min = 0.002  # continuous formulations' 'karras' / 'logsnr': the smallest
    # Each sampler's own options (ignored by the others):
    sampling.eta = 0.0  # ddim: 0 = deterministic (Euler), 1 = ancestral
    # ddpm: 'fixed_small' | 'fixed_large' | 'learned_range' (a model.learn_sigma model's own)
    sampling.variance = "fixed_small"
    # heun (EDM Alg. 2): churn, the sigma range it applies in, and the noise scale.
    sampling.s_churn = 0.0
    sampling.s_min = 0.0
    sampling.s_max = float("inf")
    sampling.s_noise = 1.0
    # dpm_solver++*, unipc: the update onto the last level at first order.
    sampling.lower_order_final = True
    sampling.order = 2  # unipc: the predictor's order (1-3; its corrector adds one)
    # > 0: jump from the start noise to this ddpm timestep (gaussian_start_t) or level sigma
    # (gaussian_start_sigma, any formulation) with the data's Gaussian model (exact
    # probability-flow map, stats of the train split stored in the workdir) and sample from
    # there. 0 = off.
    sampling.gaussian_start_t = 0
    sampling.gaussian_start_sigma = 0.0
    sampling.clip_x0 = True
    sampling.temperature = 1.0
    sampling.num_samples = 1000
    sampling.batch_size = 250  # per call; samples do not depend on it
    sampling.seed = 0
    # Guidance (docs/guidance.md): D_guide + scale (D - D_guide); 1.0 = unguided. The guide is
    # the unconditional model (classifier-free guidance, class-conditional models) or, with
    # sampling.guide, a weaker model (autoguidance): 'step:<N>' (this run at step N),
    # 'posthoc_ema:<sigma_rel>' or 'workdir:<path>[@<N>]' (another run of the same data).
    sampling.guidance_scale = 1.0
    sampling.guide = ""
    # (sigma_lo, sigma_hi): guide only at levels sigma_lo < sigma <= sigma_hi; () = every level.
    sampling.guidance_interval = ()
    sampling.label = -1  # class to sample with guidance; -1 = cycle through all classes
    sampling.name = ""  # '' = derived from sampler, steps and seed
    # The parameters sampled: 'ema' (the run's EMA) or 'posthoc_ema:<sigma_rel>' (written by
    # --mode=posthoc_ema; docs/posthoc_ema.md).
    sampling.params = "ema"

    # --mode=eval: sample eval.num_samples images with config.sampling.* and score them.
    config.eval = ev = ml_collections.ConfigDict()
    ev.num_samples = 1000
    ev.batch_size = 500  # per sampling call; samples do not depend on it
    ev.shard_size = 1000  # images per shard file; a pre-empted eval resumes at the next shard
    ev.feature_network = "digits"  # 'digits' (shipped classifier) | 'inception' (FID Inception-v3)
    ev.inception_weights = ""  # .npz from experiments/convert_inception_weights.py
    ev.reference_stats = ""  # '' = <data_dir>/reference_stats/<dataset>_<split>_<network>.npz
    ev.reference_split = "train"
    ev.metrics = ("fd",)  # of 'fd', 'is', 'precision_recall'
    ev.pr_num_samples = 1000  # images per side for precision/recall (k-NN is quadratic)
    ev.pr_k = 3
    ev.bpd_num_images = 0  # > 0: bits/dim of that many eval_split images (0 = skip)
    ev.bpd_batch_size = 100
    ev.name = ""  # '' = derived from sampler, steps, guidance and seed

    # --mode=posthoc_ema: reconstruct the EMA of this relative length from the snapshots.
    config.posthoc_ema = posthoc = ml_collections.ConfigDict()
    posthoc.sigma_rel = 0.1

    # Image editing (--mode=sdedit | inpaint) and process pictures (--mode=visualize).
    config.edit = edit = ml_collections.ConfigDict()
    edit.split = "test"  # source images: the first edit.num_images of this split
    edit.num_images = 8
    # sdedit: fractions of the chain to noise, one output row each (0 = the input returned).
    edit.strength = (0.3, 0.5, 0.7)
    edit.mask = "left_half"  # inpaint: the region regenerated ('right_half', 'center', ...)
    edit.resample_steps = 10  # inpaint: RePaint resamplings U per step (1 = none)
    edit.jump_length = 1  # inpaint: RePaint jump length j (steps re-noised per resampling)
    edit.seed = 0
    return config
