"""Scalar metrics to `<workdir>/metrics.jsonl` (one JSON object per logged step) and TensorBoard."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from tensorboardX import SummaryWriter


class MetricWriter:
    """Appends `{"step": s, name: value, ...}` lines; enabled on process 0 only (multi-host)."""

    def __init__(self, workdir: str, *, enabled: bool = True) -> None:
        self._enabled = enabled
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self._tensorboard = SummaryWriter(logdir=workdir)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self._enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            self._tensorboard.add_scalar(name, float(value), global_step=int(step))
        self._tensorboard.flush()

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """All records of `<workdir>/metrics.jsonl`, in file order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
