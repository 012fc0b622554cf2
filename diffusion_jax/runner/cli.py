"""What the command-line programs (`experiments/main.py`, `experiments/sweep.py`) share: the
`--config.*` key pre-check and the log filter."""

from __future__ import annotations

import logging
import runpy
import sys
from collections.abc import Sequence
from typing import Any

from diffusion_jax.runner import sweeps


def config_argument(argv: Sequence[str]) -> str | None:
    """The `--config` value as given (path plus any ':arg'), or None."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def unknown_override_key(argv: Sequence[str]) -> str | None:
    """An error line for the first `--config.a.b=` override naming no key of the config file,
    with the closest keys (ml_collections would fail with a traceback deep in flag parsing);
    None when every key exists or the config file cannot be loaded (config_flags reports that).
    """
    config_arg = config_argument(argv)
    if config_arg is None:
        return None
    path, _, arg = config_arg.partition(":")
    try:
        get_config = runpy.run_path(path)["get_config"]
        config = get_config(arg) if arg else get_config()
    except Exception:  # a broken config file: config_flags reports it with its traceback
        return None
    for flag in argv:
        if flag.startswith("--config."):
            key = flag[len("--config.") :].split("=", 1)[0]
            try:
                sweeps.check_key(config, key, where="--config overrides")
            except sweeps.SweepError as error:
                return f"error: {error}"
    return None


class QuietLibraries(logging.Filter):
    """Keep our progress lines; drop the checkpoint and data libraries' INFO chatter, and the
    tracebacks orbax (and asyncio, for orbax's unfinished writes) log when a background save
    fails: a full disk gives hundreds of lines, while the trainer reports the failure itself as
    one `error:` line naming the step (`CheckpointSaveError`). `--verbosity=1` shows them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and any(part in record.pathname for part in ("/orbax/", "/asyncio/")):
            return logging.getLogger("absl").isEnabledFor(logging.DEBUG)
        noisy = any(
            part in record.pathname for part in ("/orbax/", "/grain/", "/tensorflow_datasets/")
        )
        return record.levelno >= logging.WARNING or not noisy


def drop_closed_event_loop_reports() -> None:
    """When one write of an orbax save fails (a full disk), orbax closes its event loop while
    tensorstore completes the other writes; each completion reports `RuntimeError: Event loop
    is closed` as an unraisable exception, a traceback each (hundreds). Drop just those; the
    save's failure is reported once, as an `error:` line."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook
