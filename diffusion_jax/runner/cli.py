"""What the command-line programs (`experiments/main.py`, `experiments/sweep.py`) share: the
`--config` file and `--config.*` key pre-checks, repeated tuple overrides, the log filter."""

from __future__ import annotations

import logging
import os
import runpy
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import logging as absl_logging

from diffusion_jax.runner import sweeps


def config_argument(argv: Sequence[str]) -> str | None:
    """The `--config` value as given (path plus any ':arg'), or None."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config_file(config_arg: str) -> tuple[ml_collections.ConfigDict | None, str | None]:
    """(config, None) from a `--config` value (path plus any ':arg'), or (None, an error line
    naming the fix) when the file is missing, does not run (a syntax error, an exception),
    defines no `get_config`, or its `get_config` returns something other than a ConfigDict."""
    path, _, arg = config_arg.partition(":")
    if not os.path.isfile(path):
        return (
            None,
            f"error: --config={path} is not a file; pass a config file such as configs/digits.py",
        )
    try:
        namespace = runpy.run_path(path)
        get_config = namespace.get("get_config")
        if not callable(get_config):
            return None, (
                f"error: --config={path} defines no get_config(); add one that returns an "
                "ml_collections.ConfigDict (see configs/digits.py)"
            )
        config = get_config(arg) if arg else get_config()
    except SyntaxError as error:
        return None, (
            f"error: --config={path} has a syntax error at line {error.lineno}: {error.msg}; "
            "fix the file"
        )
    except Exception as error:  # the user's config code failed: say where, in one line
        lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == path]
        where = f" at line {lines[-1]}" if lines else ""
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return None, (
            f"error: loading --config={path} raised {type(error).__name__}{where}"
            f"{': ' + first if first else ''}; fix the file"
        )
    if not isinstance(config, ml_collections.ConfigDict):
        return None, (
            f"error: get_config() in {path} returned {type(config).__name__}, not an "
            "ml_collections.ConfigDict; return one (see configs/digits.py)"
        )
    return config, None


def unknown_override_key(argv: Sequence[str]) -> str | None:
    """An error line for the first `--config.a.b=` override naming no key of the config file,
    with the closest keys (ml_collections would fail with a traceback deep in flag parsing);
    None when every key exists or the config file cannot be loaded (`command_line_error` reports
    that).
    """
    config_arg = config_argument(argv)
    if config_arg is None:
        return None
    config, _ = load_config_file(config_arg)
    if config is None:
        return None
    for flag in argv:
        if flag.startswith("--config."):
            key = flag[len("--config.") :].split("=", 1)[0]
            try:
                sweeps.check_key(config, key, where="--config overrides")
            except sweeps.SweepError as error:
                return f"error: {error}"
    return None


def command_line_error(argv: Sequence[str]) -> str | None:
    """One error line for a `--config` file that cannot give a config or an override naming an
    unknown key, before absl parses the flags (which would print a traceback); else None."""
    config_arg = config_argument(argv)
    if config_arg is None:
        return None  # --config is a required flag: absl says so
    _, error = load_config_file(config_arg)
    return error or unknown_override_key(argv)


def last_override_wins(argv: Sequence[str]) -> list[str]:
    """`argv` with only the last of repeated `--config.KEY` overrides when one of them is a whole
    tuple, e.g. `(1, 2, 2)`: ml_collections would concatenate the tuples. Repeating a tuple key
    with single elements (`--config.eval.metrics=fd --config.eval.metrics=is`, ml_collections'
    way of building a tuple) is kept, and so is everything else."""
    overrides: list[tuple[str, list[int], str]] = []  # (key, argv indices, value)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config.") and "=" in arg:
            key, value = arg[len("--config.") :].split("=", 1)
            overrides.append((key, [i], value))
        elif arg.startswith("--config.") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            overrides.append((arg[len("--config.") :], [i, i + 1], argv[i + 1]))
            i += 1
        i += 1
    dropped: set[int] = set()
    for key in {k for k, _, _ in overrides}:
        same = [(indices, value) for k, indices, value in overrides if k == key]
        if len(same) > 1 and any(v.strip()[:1] in ("(", "[") for _, v in same):
            for indices, _ in same[:-1]:
                dropped.update(indices)
    return [arg for i, arg in enumerate(argv) if i not in dropped]


def log_level(process_index: int) -> int:
    """The absl verbosity of a process of a run: INFO on process 0; ERROR on the others, which
    would repeat every warning of process 0 (they share config, workdir and data)."""
    return absl_logging.INFO if process_index == 0 else absl_logging.ERROR


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
    save's failure is reported once, as an `error:` line. A write that never started is
    reported at exit as a never-awaited coroutine warning (timing-dependent); drop that too."""
    warnings.filterwarnings(
        "ignore",
        message=r"coroutine 'async_serialize_from_host\.<locals>\.write_fragment'",
        category=RuntimeWarning,
    )
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook
