"""Parity of the Flax FID Inception port with pytorch-fid's torch network (random weights).

Not part of the test suite: it needs torch, torchvision and pytorch-fid, which the project does
not depend on. From the repository root, in two environments:

    # 1. torch side, in a venv outside the repo:
    #    python3 -m venv /tmp/torch_fid
    #    /tmp/torch_fid/bin/pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid numpy
    /tmp/torch_fid/bin/python -m benchmarks.inception_parity reference
    # 2. JAX side, in the project's venv:
    .venv/bin/python -m benchmarks.inception_parity compare

Both take --workdir (default /tmp/inception_parity) and write their files there.

Step 1 builds pytorch-fid's FID InceptionV3 (torchvision Inception3 with pytorch-fid's FID
blocks, 1008 classes, no aux head) with seeded random weights and BatchNorm statistics, saves
its state_dict as WORKDIR/reference.pth, converts it with experiments.convert_inception_weights
and writes fixed random uint8 images and the torch outputs (pool3 features, logits; float32,
and float64 as the float32 noise floor) to WORKDIR. Step 2 runs InceptionFeatures on the same
images and prints one JSON line per image set with the max abs and relative (max abs / max
|reference|) differences; it also writes WORKDIR/parity.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np

from benchmarks import common

# (name, batch, height, width, channels): upsampling (CIFAR-like), grayscale (digits-like),
# non-square downsampling, and the native size (no resize).
IMAGE_SETS = [
    ("up_32x32x3", 4, 32, 32, 3),
    ("gray_8x8x1", 3, 8, 8, 1),
    ("down_333x512x3", 2, 333, 512, 3),
    ("native_299x299x3", 2, 299, 299, 3),
]


def _images(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: rng.integers(0, 256, size=(b, h, w, c), dtype=np.uint8)
        for name, b, h, w, c in IMAGE_SETS
    }


def _torch_fid_inception(seed: int) -> Any:
    """pytorch-fid's FID Inception structure (as its fid_inception_v3, minus the download)."""
    import torch
    from pytorch_fid import inception as pfi

    torch.manual_seed(seed)
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    assert not net.transform_input
    # Random weights whose activations keep their scale through 94 conv+BN layers: He-normal
    # convs, BN affine and running statistics near (but not at) the identity.
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("conv.weight"):
                fan_in = tensor[0].numel()
                tensor.normal_(0.0, (2.0 / fan_in) ** 0.5)
            elif name.endswith("bn.weight"):
                tensor.uniform_(0.8, 1.2)
            elif name.endswith(("bn.bias", "running_mean")):
                tensor.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif name == "fc.weight":
                tensor.normal_(0.0, 2048**-0.5)
            elif name == "fc.bias":
                tensor.normal_(0.0, 0.1)
    return net.eval()


def _torch_forward(net: Any, images: np.ndarray, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-fid's preprocessing (x/255, bilinear to 299, 2x-1) -> (pool3, logits)."""
    import torch
    import torch.nn.functional as F

    pooled: list[Any] = []
    hook = net.avgpool.register_forward_hook(lambda m, i, o: pooled.append(o.flatten(1)))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype) / 255.0
    if x.shape[1] == 1:  # pytorch-fid reads images with PIL's convert('RGB')
        x = x.repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        logits = net.to(dtype)(2 * x - 1)
    hook.remove()
    return pooled[0].double().numpy(), logits.double().numpy()


def reference(workdir: str, seed: int) -> None:
    missing = [
        m for m in ("torch", "torchvision", "pytorch_fid") if not importlib.util.find_spec(m)
    ]
    if missing:
        sys.exit(
            f"benchmarks.inception_parity reference needs torch, torchvision and pytorch-fid; "
            f"{', '.join(missing)} not installed in {sys.executable}'s environment (see --help)."
        )
    import torch

    os.makedirs(workdir, exist_ok=True)
    net = _torch_fid_inception(seed)
    pth = os.path.join(workdir, "reference.pth")
    torch.save(net.state_dict(), pth)
    images = _images(seed)
    np.savez(os.path.join(workdir, "images.npz"), **images)
    expected: dict[str, np.ndarray] = {}
    for name, x in images.items():
        for tag, dtype in (("f32", torch.float32), ("f64", torch.float64)):
            pool3, logits = _torch_forward(net, x, dtype)
            expected[f"{name}/{tag}/pool3"] = pool3
            expected[f"{name}/{tag}/logits"] = logits
        net.float()
    np.savez(os.path.join(workdir, "expected.npz"), **expected)
    npz = os.path.join(workdir, "weights.npz")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.convert_inception_weights",
            f"--input={pth}",
            f"--output={npz}",
        ],
        cwd=common.REPO,
        check=True,
    )
    print(f"torch {torch.__version__}: wrote {pth}, {npz}, images.npz, expected.npz")


def _diff(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    abs_diff = float(np.max(np.abs(ours.astype(np.float64) - ref)))
    return {"max_abs": abs_diff, "rel": abs_diff / float(np.max(np.abs(ref)))}


def compare(workdir: str, batch_size: int) -> None:
    if not os.path.isfile(os.path.join(workdir, "expected.npz")):
        sys.exit(f"no {workdir}/expected.npz: run the reference step first (see --help).")
    import jax

    from diffusion_jax.evaluation.inception import InceptionFeatures

    net = InceptionFeatures(os.path.join(workdir, "weights.npz"), batch_size=batch_size)
    expected = np.load(os.path.join(workdir, "expected.npz"))
    results = []
    with np.load(os.path.join(workdir, "images.npz")) as images:
        for name in images.files:
            pool3, logits = net(images[name])
            row: dict[str, Any] = {"images": name, "backend": jax.default_backend()}
            for out, ours in (("pool3", pool3), ("logits", logits)):
                ref32, ref64 = expected[f"{name}/f32/{out}"], expected[f"{name}/f64/{out}"]
                row[f"{out}_vs_torch32"] = _diff(ours, ref32)
                row[f"{out}_vs_torch64"] = _diff(ours, ref64)
                row[f"{out}_torch32_vs_torch64"] = _diff(ref32, ref64)
            row["pool3_scale"] = float(np.max(np.abs(expected[f"{name}/f64/pool3"])))
            print(json.dumps(row))
            results.append(row)
    with open(os.path.join(workdir, "parity.json"), "w") as f:
        json.dump(results, f, indent=1)


def main(argv: list[str] | None = None) -> None:
    parser = common.argument_parser(__file__, __doc__)
    parser.add_argument("step", choices=["reference", "compare"])
    parser.add_argument("--workdir", default="/tmp/inception_parity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=2, help="InceptionFeatures batch")
    args = parser.parse_args(argv)
    if args.step == "reference":
        reference(args.workdir, args.seed)
    else:
        compare(args.workdir, args.batch_size)


if __name__ == "__main__":
    main()
