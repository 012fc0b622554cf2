"""Scale-out: 8 devices and 2 processes train, checkpoint and sample like 1 device.

The device count is fixed per process, so other counts run in `tests/distributed_worker.py`
subprocesses: XLA_FLAGS=--xla_force_host_platform_device_count=8 for 8 fake CPU devices, and
two processes joined by `jax.distributed` on localhost (2 CPU devices each) for multi-host.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from diffusion_jax import parallel
from diffusion_jax.runner import loading
from diffusion_jax.runner import sample as sample_mode
from diffusion_jax.runner import train as train_mode
from diffusion_jax.runner.setup import ModelSetup
from diffusion_jax.runner.workdir import read_metrics
from tests.conftest import COMPILATION_CACHE_ENV, TINY_OVERRIDES
from tests.distributed_worker import flat_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = [sys.executable, "-m", "tests.distributed_worker"]
# Data-parallel runs reduce gradients in a different order; Adam's normalisation turns those
# float32 rounding differences into ~1e-5 parameter differences after a few steps.
PARAM_ATOL = 1e-4
CLUSTER_ENV_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_PROCESS_ADDRESSES",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "JAX_COORDINATOR_ADDRESS",
)


def _worker_env(num_devices: int | None = None) -> dict[str, str]:
    env = {**os.environ, **COMPILATION_CACHE_ENV}
    env.pop("XLA_FLAGS", None)
    if num_devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    return env


def _losses(workdir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(str(workdir))]


def _samples(path: str | Path) -> np.ndarray:
    with np.load(path) as f:
        return f["images"]


def _assert_params_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
    """Assert allclose leaf by leaf; returns the max abs difference."""
    assert actual.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], atol=PARAM_ATOL, err_msg=key)
    return max(float(np.abs(actual[k] - expected[k]).max()) for k in expected)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def one_device_run(shared_tiny_run: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The session's tiny run, trained on this process's single device; its samples (batch 4),
    sampled in a copy of it."""
    workdir = tmp_path_factory.mktemp("one_device") / "run"
    shutil.copytree(shared_tiny_run.workdir, workdir)
    samples = _samples(sample_mode.sample(shared_tiny_run.fresh_config(), str(workdir)))
    return workdir, flat_params(shared_tiny_run.state.params), samples


@pytest.fixture(scope="module")
def eight_device_run(digits_data_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny config trained and sampled (batch 8) in a subprocess with 8 CPU devices."""
    root = tmp_path_factory.mktemp("eight_devices")
    workdir, out = root / "run", root / "out"
    result = subprocess.run(
        [*WORKER, f"--workdir={workdir}", f"--data_dir={digits_data_dir}", f"--out={out}"]
        + ["--train", "--sample", "--set", "sampling.batch_size=8"],
        cwd=REPO,
        env=_worker_env(8),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"device_count": 8' in (out / "info_0.json").read_text()
    return workdir, dict(np.load(out / "params_0.npz")), _samples(out / "samples_0.npz")


@pytest.mark.slow  # an 8-device subprocess
def test_eight_devices_give_the_losses_and_params_of_one_device(one_device_run, eight_device_run):
    np.testing.assert_allclose(_losses(eight_device_run[0]), _losses(one_device_run[0]), rtol=1e-5)
    _assert_params_close(eight_device_run[1], one_device_run[1])


@pytest.mark.slow  # an 8-device subprocess
def test_samples_of_a_fixed_seed_are_identical_on_eight_devices_and_one(
    eight_device_run, tiny_config, tmp_path
):
    # The 8-device run's checkpoint, restored and sampled here on 1 device with batch 4.
    workdir = tmp_path / "run"
    shutil.copytree(eight_device_run[0], workdir)
    one_device = _samples(sample_mode.sample(tiny_config, str(workdir)))
    assert one_device.shape == (6, 8, 8, 1) and one_device.dtype == np.uint8
    np.testing.assert_array_equal(one_device, eight_device_run[2])


@pytest.mark.slow  # an 8-device subprocess
def test_checkpoint_saved_on_eight_devices_resumes_on_one_like_the_one_device_run(
    one_device_run, eight_device_run, tiny_config, tmp_path
):
    tiny_config.training.num_train_steps = 8
    resumed = {}
    for name, run in (("one", one_device_run), ("eight", eight_device_run)):
        shutil.copytree(run[0], tmp_path / name)
        state = train_mode.train(tiny_config, str(tmp_path / name))
        assert int(state.step) == 8
        resumed[name] = flat_params(state.params)
    _assert_params_close(resumed["eight"], resumed["one"])


@pytest.fixture(scope="module")
def fsdp_runs(digits_data_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny config trained and sampled (batch 8) in one subprocess with 8 CPU devices, with
    parallel.fsdp=8 (mesh data=1 x fsdp=8) and parallel.fsdp=4 (data=2 x fsdp=4); arrays of
    1024 elements or more are split along 'fsdp' (biases and norm scales stay replicated).
    {fsdp: (workdir, info, params, samples)}."""
    root = tmp_path_factory.mktemp("fsdp")
    workdir, out = root / "runs", root / "out"
    result = subprocess.run(
        [*WORKER, f"--workdir={workdir}", f"--data_dir={digits_data_dir}", f"--out={out}"]
        + ["--sample", "--set", "sampling.batch_size=8", "parallel.fsdp_min_size=1024"]
        + ["--fsdp", "8", "4"],
        cwd=REPO,
        env=_worker_env(8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        fsdp: (
            workdir / f"fsdp{fsdp}",
            json.loads((out / f"info_fsdp{fsdp}.json").read_text()),
            dict(np.load(out / f"params_fsdp{fsdp}.npz")),
            _samples(out / f"samples_fsdp{fsdp}.npz"),
        )
        for fsdp in (8, 4)
    }


@pytest.mark.slow  # an 8-device subprocess
def test_fsdp_trains_samples_and_checkpoints_like_one_device(
    one_device_run, fsdp_runs, tiny_config, tmp_path
):
    # Every parameter of 1024+ elements has a dimension divisible by 8 (channels).
    large = sum(value.size >= 1024 for value in one_device_run[1].values())
    assert 0 < large < len(one_device_run[1])
    for fsdp, (workdir, info, params, samples) in fsdp_runs.items():
        # The state really is split: each large parameter, its two Adam moments and its EMA
        # live 1/fsdp per device; small arrays and scalars stay replicated.
        assert info["mesh"] == {"data": 8 // fsdp, "fsdp": fsdp}
        assert (info["num_sharded"], info["sharded_ema"], info["sharded_opt"]) == (
            4 * large,
            large,
            2 * large,
        ), info
        # Same losses and parameters after 6 steps as on 1 device, to float32 rounding.
        np.testing.assert_allclose(_losses(workdir), _losses(one_device_run[0]), rtol=1e-5)
        _assert_params_close(params, one_device_run[1])
        # Fixed-seed samples identical to the 1-device run's.
        np.testing.assert_array_equal(samples, one_device_run[2])

    # A checkpoint written under data=2 x fsdp=4 restores on 1 device, bit for bit.
    workdir = tmp_path / "run"
    shutil.copytree(fsdp_runs[4][0], workdir)
    state = ModelSetup(tiny_config).restore(str(workdir))
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
    restored = flat_params(state.params)
    assert restored.keys() == fsdp_runs[4][2].keys()
    for key, value in restored.items():
        np.testing.assert_array_equal(value, fsdp_runs[4][2][key], err_msg=key)
    shutil.rmtree(workdir / "samples")
    np.testing.assert_array_equal(
        _samples(sample_mode.sample(tiny_config, str(workdir))), one_device_run[2]
    )
    # The notebook API reads it with its saved config (parallel.fsdp=4) on this 1 device.
    run = loading.load_run(str(workdir))
    assert run.config.parallel.fsdp == 1 and run.step == 6


def _run_two_processes(
    command: Callable[[int], list[str]], env: dict[str, str]
) -> tuple[list[subprocess.Popen], list[str]]:
    """Run command(process_id) for process ids 0 and 1 at once; (processes, their stderr). A
    hung peer is killed rather than left to outlive the test."""
    procs = [
        subprocess.Popen(
            command(i),
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        errors = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return procs, errors


@pytest.mark.slow  # two jax.distributed processes
def test_two_processes_train_sample_and_checkpoint_like_one_process(
    one_device_run, digits_data_dir, tmp_path
):
    """Two jax.distributed processes on localhost (2 CPU devices each) share one workdir."""
    workdir, out, port = tmp_path / "run", tmp_path / "out", _free_port()
    procs, errors = _run_two_processes(
        lambda i: (
            [*WORKER, f"--workdir={workdir}", f"--data_dir={digits_data_dir}"]
            + [f"--out={out}", "--train", "--sample", f"--coordinator=127.0.0.1:{port}"]
            + ["--num_processes=2", f"--process_id={i}", "--num_cpu_devices=2"]
        ),
        _worker_env(),
    )
    for p, err in zip(procs, errors, strict=True):
        assert p.returncode == 0, err[-3000:]

    for rank in range(2):
        info = (out / f"info_{rank}.json").read_text()
        assert '"process_count": 2' in info and '"device_count": 4' in info
        # A flag raised on process 1 only is seen by both; none raised is seen by none.
        assert '"any_process_rank1": true' in info and '"any_process_false": false' in info
        _assert_params_close(dict(np.load(out / f"params_{rank}.npz")), one_device_run[1])
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    np.testing.assert_allclose(_losses(workdir), _losses(one_device_run[0]), rtol=1e-5)
    np.testing.assert_array_equal(_samples(out / "samples_0.npz"), one_device_run[2])


def test_global_batch_places_local_rows_on_the_batch_sharding():
    mesh = parallel.create_mesh()
    local = {"image": np.arange(8 * 2, dtype=np.float32).reshape(8, 2)}
    batch = parallel.global_batch(local, mesh)
    assert batch["image"].sharding == parallel.batch_sharding(mesh)
    np.testing.assert_array_equal(parallel.to_host(batch["image"]), local["image"])


def test_any_process_on_one_process_returns_the_flag():
    assert parallel.any_process(True) is True
    assert parallel.any_process(False) is False


def test_mesh_refuses_an_fsdp_size_that_does_not_divide_the_devices():
    assert parallel.create_mesh().axis_names == (parallel.DATA_AXIS,)
    with pytest.raises(ValueError, match="fsdp_size 3"):
        parallel.create_mesh(jax.devices() * 2, fsdp_size=3)


@pytest.mark.parametrize(
    "shape, fsdp, spec",
    [
        ((3, 3, 128, 256), 4, P(None, None, None, "fsdp")),  # the largest divisible dimension
        ((3, 3, 256, 96), 64, P(None, None, "fsdp")),  # 96 is not divisible by 64
        ((512, 512), 8, P(None, "fsdp")),  # equal sizes: the last (output features)
        ((1000, 256), 16, P(None, "fsdp")),  # only 256 divides by 16
        ((4096, 1000), 8, P("fsdp")),  # both divide: the larger
        ((1000, 255), 16, P()),  # no dimension divides by 16: replicated
        ((256,), 4, P()),  # below the size threshold: replicated
        ((3, 3, 128, 256), 1, P()),  # fsdp=1: replicated
    ],
)
def test_fsdp_splits_the_largest_divisible_dimension_of_large_arrays(shape, fsdp, spec):
    assert parallel.fsdp_partition_spec(shape, fsdp, min_size=2**14) == spec


def test_the_train_state_is_replicated_without_an_fsdp_axis():
    mesh = parallel.create_mesh()
    tree = {"kernel": jax.ShapeDtypeStruct((3, 3, 256, 256), np.float32), "count": np.int32(0)}
    shardings = parallel.state_shardings(tree, mesh, min_size=1)
    assert all(s == parallel.replicated_sharding(mesh) for s in jax.tree.leaves(shardings))
    assert parallel.fsdp_size(mesh) == 1
    assert parallel.gather_params_fn(mesh) is None  # the train step is the one of before


def test_initialize_distributed_does_nothing_without_arguments_or_a_cluster(monkeypatch):
    for name in CLUSTER_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert not parallel.environment_requests_distributed()
    assert parallel.initialize_distributed() is False
    assert jax.process_count() == 1


@pytest.mark.parametrize(
    "env, expected",
    [
        (dict(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="n1", SLURM_NTASKS="4", SLURM_PROCID="0",
              SLURM_LOCALID="0"), True),
        (dict(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="n1", SLURM_NTASKS="1", SLURM_PROCID="0",
              SLURM_LOCALID="0"), False),
        (dict(OMPI_MCA_orte_hnp_uri="1;tcp://10.0.0.1:1", OMPI_COMM_WORLD_SIZE="2"), True),
        (dict(TPU_WORKER_HOSTNAMES="host0,host1"), True),
        (dict(TPU_WORKER_HOSTNAMES="host0"), False),
    ],
)  # fmt: skip
def test_environment_requests_distributed_only_for_multi_process_launchers(
    monkeypatch, env, expected
):
    for name in CLUSTER_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert parallel.environment_requests_distributed() is expected


@pytest.mark.parametrize(
    "args, env, bind",
    [
        (("127.0.0.1:1234", 2, 0, None), {}, "127.0.0.1:1234"),  # the given host only
        (("10.0.0.1:1234", 2, 0, "0.0.0.0:1234"), {}, "0.0.0.0:1234"),  # the flag
        (("10.0.0.1:1234", 2, 0, None), {"JAX_COORDINATOR_BIND_ADDRESS": "[::]:1234"}, "[::]:1234"),
        ((None, 2, None, None), {}, None),  # auto-detected: JAX's choice
    ],
)
def test_the_coordinator_binds_the_given_address_unless_told_otherwise(
    monkeypatch, args, env, bind
):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("JAX_COORDINATOR_BIND_ADDRESS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert parallel.initialize_distributed(*args) is True
    assert calls == [
        dict(
            coordinator_address=args[0],
            num_processes=args[1],
            process_id=args[2],
            coordinator_bind_address=bind,
        )
    ]


def _listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                address, hex_port = fields[1].rsplit(":", 1)
                if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                    found.append(address)
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's socket tables")
def test_the_coordinator_listens_on_the_given_host_only(tmp_path):
    port = _free_port()
    code = (
        "from diffusion_jax import parallel\n"
        f"parallel.initialize_distributed('127.0.0.1:{port}', 2, 0)\n"  # waits for process 1
    )
    env = {k: v for k, v in _worker_env().items() if k != "JAX_COORDINATOR_BIND_ADDRESS"}
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (addresses := _listening_addresses(port)):
            assert process.poll() is None, "the coordinator exited"
            assert time.monotonic() < deadline, "the coordinator never listened"
            time.sleep(0.05)
    finally:
        process.kill()
        process.wait()
    # 127.0.0.1 as /proc writes it (IPv4, or IPv4-mapped IPv6); never 0.0.0.0 or [::].
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}
    assert set(addresses) <= loopback, addresses


@pytest.mark.slow  # two jax.distributed processes
def test_a_warning_of_a_two_process_run_is_logged_once(shared_tiny_run, digits_data_dir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(shared_tiny_run.workdir, workdir)
    # A run saved before checkpoints held their config: the damaged config.json is then warned
    # about, on every process.
    for meta in workdir.glob("checkpoints/*/meta"):
        shutil.rmtree(meta)
    (workdir / "config.json").write_text("damaged")
    shutil.rmtree(workdir / "samples")
    (workdir / "samples").write_text("a file where the samples go")  # then a one-line error
    port = _free_port()
    procs, errors = _run_two_processes(
        lambda i: (
            [sys.executable, "-m", "experiments.main", "--config=configs/digits.py"]
            + [f"--workdir={workdir}", "--mode=sample", f"--config.data.data_dir={digits_data_dir}"]
            + [*TINY_OVERRIDES, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
            + [f"--process_id={i}"]
        ),
        {**_worker_env(), "JAX_NUM_CPU_DEVICES": "2"},
    )
    combined = "".join(errors)
    assert combined.count("Cannot read") == 1, combined[-3000:]
    for p, err in zip(procs, errors, strict=True):  # errors still come from every process
        assert p.returncode == 1 and "(samples/ in it) is not writable" in err, err[-3000:]


@pytest.mark.slow  # an 8-device subprocess
def test_the_readme_eight_device_example_batch_sizes_are_rounded_not_refused(
    one_device_run, digits_data_dir, tmp_path
):
    # sampling.batch_size=500 and eval.batch_size=500 do not divide over 8 devices; samples do
    # not depend on the batch size, so the runs go on with a multiple of 8.
    workdir = tmp_path / "run"
    shutil.copytree(one_device_run[0], workdir)
    shutil.rmtree(workdir / "samples")
    common = [sys.executable, "-m", "experiments.main", "--config=configs/digits.py"]
    common += [f"--workdir={workdir}", f"--config.data.data_dir={digits_data_dir}"]
    common += [*TINY_OVERRIDES, "--config.sampling.batch_size=500", "--config.eval.batch_size=500"]
    evaluation = ["--config.eval.num_samples=12", "--config.eval.metrics=('is',)"]
    for mode in (["--mode=sample"], ["--mode=eval", *evaluation, "--config.eval.bpd_num_images=0"]):
        result = subprocess.run(
            common + mode, cwd=REPO, env=_worker_env(8), capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "does not divide" not in result.stderr
    sampled = sorted(p for p in os.listdir(workdir / "samples") if p.endswith(".npz"))
    assert len(sampled) == 1
    np.testing.assert_array_equal(_samples(workdir / "samples" / sampled[0]), one_device_run[2])
