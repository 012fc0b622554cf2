r"""eps vs v prediction x linear vs cosine schedule: 4 points, one workdir each.

The sweep names only the ablated keys; the length of the runs comes from the config or a
command-line override applied to every point. On 2 CPU cores configs/digits.py takes about
6 minutes per 1000 steps, so the 4 points train in about 25 minutes (plus eval time):

    # once, for --eval's Frechet distance (the digits classifier's features of the train split)
    python -m experiments.reference_stats --dataset=digits --split=train --network=digits
    python -m experiments.sweep --config=configs/digits.py \
        --sweep=configs/sweeps/prediction_x_schedule.py \
        --workdir=workdirs/sweeps/prediction_x_schedule \
        --config.training.num_train_steps=1000 --eval

Compare the points by the eval results (`--eval`: Frechet distance in the digits classifier's
features), not by the final training loss: eps and v predictions regress different targets, so
their losses are on different scales.

Points (in order, the schedule varying fastest) and their directories under --workdir:
prediction=eps,schedule=linear  prediction=eps,schedule=cosine
prediction=v,schedule=linear    prediction=v,schedule=cosine
"""

from __future__ import annotations

from diffusion_jax.runner.sweeps import Sweep, product, sweep


def get_sweep() -> Sweep:
    return product(
        sweep("diffusion.prediction", ["eps", "v"]),
        sweep("diffusion.schedule", ["linear", "cosine"]),
    )
