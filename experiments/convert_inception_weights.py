"""Convert pytorch-fid's FID Inception weights (.pth) to the .npz that diffusion_jax loads.

    wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
    python experiments/convert_inception_weights.py \
        --input=pt_inception-2015-12-05-6726825d.pth --output=inception.npz

then set `--config.eval.inception_weights=inception.npz`. Needs torch and numpy only (no JAX), so
it runs in any environment that has torch; the project itself does not need torch. The .npz
keeps the state_dict's names and torch layouts; BatchNorm `num_batches_tracked` counters are
dropped. diffusion_jax.evaluation.inception.load_inception_variables validates and transposes.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def convert(input_path: str, output_path: str) -> int:
    """Writes the float32 arrays of the state_dict at `input_path` to `output_path` (.npz).

    Returns the number of arrays written.
    """
    try:
        import torch
    except ImportError:
        sys.exit(
            "convert_inception_weights needs torch: `pip install torch` in any environment "
            "(only for converting; diffusion_jax does not use it)."
        )
    if not os.path.isfile(input_path):
        sys.exit(f"No such file: {input_path}; download the .pth first (see --help).")
    state_dict = torch.load(input_path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        sys.exit(f"{input_path} is not a state_dict of tensors; pass pytorch-fid's .pth file.")
    arrays = {
        name: value.detach().cpu().to(torch.float32).numpy()
        for name, value in state_dict.items()
        if not name.endswith("num_batches_tracked")
    }
    # np.savez appends .npz to names without it; write exactly where the user asked.
    with open(output_path, "wb") as f:
        np.savez(f, **arrays)
    return len(arrays)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--output", required=True, help="the .npz to write")
    args = parser.parse_args(argv)
    count = convert(args.input, args.output)
    print(f"wrote {count} arrays to {args.output}")


if __name__ == "__main__":
    main()
