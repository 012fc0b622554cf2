"""Peer benchmark: diffusers' UNet2DModel as the DDPM CIFAR-10 U-Net, in PyTorch.

Run with a separate environment that has torch and diffusers (not this project's), from the
repository root:

    python3 -m venv /tmp/bench_torch
    /tmp/bench_torch/bin/pip install torch==2.13.0 diffusers==0.42.1 numpy
    /tmp/bench_torch/bin/python -m benchmarks.torch_peer [--batch-size 8] [--repeats 3]

`--config digits` builds configs/digits.py's U-Net instead (for benchmarks.quality_speed).
Emits JSON lines shaped like benchmarks.run's: `train_step` (forward + backward + Adam with
global-norm clipping, as our trainer), `denoise_step` (one U-Net forward under inference_mode)
and `sampler` (whole DDIM-50 with DDIMScheduler). `--serve` reads commands
`<benchmark> <repeats> [<warmup>]` from stdin and answers one JSON line each
(`benchmarks.workers`), so benchmarks.compare_torch can alternate it with the JAX side in one
run without paying set-up twice.

The architecture matches ours (ch 128, ch_mult (1, 2, 2, 2), 2 res blocks, single-head attention
at 16x16 and in the middle, dropout 0.1, conv resampling, GroupNorm(32, eps 1e-6), swish); the
parameter count is printed and checked against ours (35,746,307). Imports torch, diffusers and
the standard-library modules `benchmarks.timing` and `benchmarks.workers`: nothing that needs
jax.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

from benchmarks import common, timing, workers

try:
    import diffusers
    import torch
except ImportError as error:  # --help and the module's names work without torch
    diffusers = torch = None
    MISSING: str | None = error.name
else:
    MISSING = None

OUR_PARAMS = {"cifar10": 35_746_307, "digits": 1_001_729}
IMAGE_SHAPES = {"cifar10": (3, 32, 32), "digits": (1, 8, 8)}


def build_unet(config: str = "cifar10") -> Any:
    """The DDPM CIFAR-10 U-Net in diffusers' terms (the layout of google/ddpm-cifar10-32), or
    configs/digits.py's (ch 32, ch_mult (1, 2), attention at 4x4, no dropout)."""
    # What both configs share: our ResnetBlock, GroupNorm(32, eps 1e-6), swish, conv
    # downsampling without padding, sinusoidal embedding without the flip, one attention head
    # with all channels (attention_head_dim=None), as Ho et al.
    common = dict(
        layers_per_block=2,
        attention_head_dim=None,
        norm_num_groups=32,
        norm_eps=1e-6,
        act_fn="silu",
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
    )
    if config == "digits":
        return diffusers.UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            dropout=0.0,
            **common,
        )
    return diffusers.UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=0.1,
        **common,
    )


class Peer:
    """Model, optimizer and inputs set up once; `run(benchmark, repeats)` times one case."""

    def __init__(self, batch_size: int, ddim_steps: int = 50, config: str = "cifar10") -> None:
        torch.manual_seed(0)
        self.batch = batch_size
        self.ddim_steps = ddim_steps
        self.config = config
        self.shape = IMAGE_SHAPES[config]
        self.model = build_unet(config)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=2e-4)
        self.x0 = torch.rand(batch_size, *self.shape) * 2 - 1
        self.scheduler = diffusers.DDIMScheduler(
            num_train_timesteps=1000,
            beta_schedule="linear",
            beta_start=1e-4,
            beta_end=0.02,
            clip_sample=True,
            set_alpha_to_one=True,
        )
        self.alphas_cumprod = self.scheduler.alphas_cumprod

    def train_step(self) -> None:
        self.model.train()
        t = torch.randint(0, 1000, (self.batch,))
        noise = torch.randn_like(self.x0)
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * self.x0 + (1 - ab).sqrt() * noise
        loss = torch.mean((self.model(x_t, t).sample - noise) ** 2)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()

    def denoise_step(self) -> None:
        self.model.eval()
        with torch.inference_mode():
            self.model(self.x0, torch.full((self.batch,), 500))

    def ddim(self) -> None:
        self.model.eval()
        generator = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            x = torch.randn(self.batch, *self.shape, generator=generator)
            self.scheduler.set_timesteps(self.ddim_steps)
            for t in self.scheduler.timesteps:
                eps = self.model(x, t).sample
                x = self.scheduler.step(eps, t, x, eta=0.0).prev_sample

    def run(self, benchmark: str, repeats: int, warmup: int = 1) -> dict[str, Any]:
        fn: Callable[[], None] = {
            "train_step": self.train_step,
            "denoise_step": self.denoise_step,
            "sampler": self.ddim,
        }[benchmark]
        return workers.peer_record(
            benchmark,
            "torch",
            timing.timings(fn, warmup=warmup, repeats=repeats),
            config=self.config,
            dtype="float32",
            batch_size=self.batch,
            params=self.params,
            ddim_steps=self.ddim_steps,
        )


def environment() -> dict[str, Any]:
    return {
        "benchmark": "environment",
        "framework": "torch",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__file__, __doc__)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--config", choices=sorted(OUR_PARAMS), default="cifar10")
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--benchmarks", default="train_step,denoise_step,sampler")
    parser.add_argument("--serve", action="store_true", help="answer stdin commands")
    args = parser.parse_args(argv)
    if MISSING:
        sys.exit(
            f"benchmarks.torch_peer needs torch and diffusers; {MISSING!r} is not installed in "
            f"{sys.executable}'s environment (see the module docstring)."
        )

    peer = Peer(args.batch_size, args.ddim_steps, args.config)
    env = environment()
    env.update(config=args.config, params=peer.params)
    env["params_match_ours"] = peer.params == OUR_PARAMS[args.config]
    if args.serve:
        return workers.serve(env, peer.run)
    print(json.dumps(env), flush=True)
    for name in args.benchmarks.split(","):
        print(json.dumps(peer.run(name, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
