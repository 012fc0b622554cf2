"""Run the points of a sweep: one after another, several at once, or as a SLURM job array.

    plan = SweepPlan(sweep_dir, names, points, jobs, metrics=None)
    failed = run_local(plan, stop)                        # --backend=local
    failed = run_local_parallel(plan, slots, stop)        # --backend=local_parallel
    failed = run_slurm(plan, SlurmOptions(...), stop)     # --backend=slurm (submitit)

Every backend runs a point the same way (`run_point`): train in a subprocess `python -m
experiments.main ...` unless the latest checkpoint already reaches `training.num_train_steps`
(the trainer resumes a workdir by itself), then, with `--eval`, `--mode=eval` (which resumes
too). So rerunning or resubmitting a sweep skips finished points and resumes the others, on any
backend. After a point, the sweep's `results.csv` / `results.md` are rewritten and the point's
row is written as a TensorBoard HParams session (`sweeps.write_hparams`). Each backend returns
{point name: why it failed}; a failing point never stops the others.

`local_parallel` gives every running point its own devices (`device_slots`): a disjoint share
of the CPU cores this process may use (the child's affinity, and thread-count variables to
match) and, when GPUs are visible, a disjoint share of them through `CUDA_VISIBLE_DEVICES`.
`slurm` submits one job array through submitit, one array task per point; a point on several
nodes runs one task per node, and the trainer's SLURM detection (`parallel.py`) makes them one
`jax.distributed` job. submitit's local executor runs the same job code on this machine.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import IO, Any

from diffusion_jax.runner import sweeps
from diffusion_jax.runner import workdir as workdir_lib

Report = Callable[[str], None]
BACKENDS = ("local", "local_parallel", "slurm")
# A SLURM task is signalled this long before its time limit, and then waits up to
# _SAVE_TIMEOUT_S for its trainer's SIGTERM checkpoint before requeueing itself.
_SIGNAL_DELAY_S = 180
_SAVE_TIMEOUT_S = 150.0
_POLL_S = 2.0  # how often the slurm backend looks at its jobs while waiting
# Thread pools sized from these variables (numpy's BLAS, OpenMP); XLA sizes its own CPU pools
# from the process's CPU affinity.
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class BackendError(sweeps.SweepError):
    """A backend option that cannot work here; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class PointJob:
    """One point's commands: train to `target_steps` (resuming), then maybe evaluate.

    label: e.g. '[2/4] prediction=v', the prefix of the point's progress lines. cwd: where the
    commands run (relative config and workdir paths are relative to it).
    """

    name: str
    label: str
    workdir: str
    target_steps: int
    train_argv: tuple[str, ...]
    eval_argv: tuple[str, ...] | None
    cwd: str


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """The points of a sweep and how to tabulate them (picklable: sent to SLURM jobs)."""

    sweep_dir: str
    names: tuple[str, ...]
    points: tuple[sweeps.Point, ...]
    jobs: tuple[PointJob, ...]
    metrics: tuple[str, ...] | None = None

    def write_results(
        self, failed: Mapping[str, str], hparams_for: Sequence[str] = ()
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """Rewrite results.csv / results.md, and the HParams sessions of the points named in
        `hparams_for`; returns the table's (columns, rows)."""
        columns, rows = sweeps.collect_results(
            self.sweep_dir, self.names, self.points, metrics=self.metrics, failed=failed
        )
        sweeps.write_results(self.sweep_dir, columns, rows)
        for point, row in zip(self.points, rows, strict=True):
            if row[sweeps.POINT_COLUMN] in hparams_for:
                sweeps.write_hparams(self.sweep_dir, point, row)
        return columns, rows


class Stop:
    """SIGTERM: remember it and pass it on to the running points, which save and exit."""

    def __init__(self) -> None:
        self.requested = False
        self._children: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        with self._lock:
            children = list(self._children)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def terminate(self, timeout_s: float) -> None:
        """SIGTERM to the running children, then wait up to `timeout_s` for them to exit
        (without reaping them: safe inside a signal handler that interrupted `run`)."""
        self.handle(signal.SIGTERM, None)
        deadline = time.monotonic() + timeout_s
        with self._lock:
            children = list(self._children)
        for child in children:
            while time.monotonic() < deadline:
                try:
                    exited = os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:  # already reaped
                    break
                if exited is not None:
                    break
                time.sleep(0.5)

    def run(
        self,
        argv: Sequence[str],
        *,
        cwd: str,
        env: Mapping[str, str] | None = None,
        output: IO[bytes] | None = None,
        cpus: Sequence[int] | None = None,
    ) -> int:
        """Run `argv` to its end (output to `output`, else inherited); its exit status."""
        sys.stdout.flush()
        with subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=None if env is None else dict(env),
            stdout=output,
            stderr=None if output is None else subprocess.STDOUT,
        ) as child:
            with self._lock:
                self._children.add(child)
            if self.requested:  # SIGTERM came while the child started
                child.send_signal(signal.SIGTERM)
            if cpus is not None:
                # Pinned right after exec, long before the child starts JAX and sizes its
                # thread pools from its affinity (no preexec_fn: unsafe with threads).
                with contextlib.suppress(ProcessLookupError):  # it already exited
                    os.sched_setaffinity(child.pid, cpus)
            try:
                return child.wait()
            finally:
                with self._lock:
                    self._children.discard(child)


def run_point(
    job: PointJob,
    stop: Stop,
    report: Report = print,
    *,
    env: Mapping[str, str] | None = None,
    output: IO[bytes] | None = None,
    cpus: Sequence[int] | None = None,
) -> str | None:
    """Train `job` unless finished, then evaluate if asked; why it failed, or None."""
    step = workdir_lib.latest_step(job.workdir)
    if step >= job.target_steps:
        report(f"{job.label}: skipped, finished (checkpoint at step {step})")
    else:
        start = f"resuming from step {step}" if step else "new run"
        report(f"{job.label}: training to step {job.target_steps} ({start})")
        code = stop.run(job.train_argv, cwd=job.cwd, env=env, output=output, cpus=cpus)
        step = workdir_lib.latest_step(job.workdir)
        if code != 0:
            return f"training exited with status {code}"
        if step < job.target_steps:
            return f"training stopped at step {step} of {job.target_steps}"
    if job.eval_argv is not None and not stop.requested:
        report(f"{job.label}: evaluating")
        code = stop.run(job.eval_argv, cwd=job.cwd, env=env, output=output, cpus=cpus)
        if code != 0:
            return f"eval exited with status {code}"
    return None


# ---------------------------------------------------------------------------------------------
# local: one point after another.


def run_local(plan: SweepPlan, stop: Stop, report: Report = print) -> dict[str, str]:
    """Every point in turn, its output passed through; stops after SIGTERM."""
    failed: dict[str, str] = {}
    for job in plan.jobs:
        if stop.requested:
            break
        why = run_point(job, stop, report)
        if why is not None:
            failed[job.name] = why
            report(f"{job.label}: FAILED: {why}")
        plan.write_results(failed, hparams_for=[job.name])  # a long sweep shows its progress
    return failed


# ---------------------------------------------------------------------------------------------
# local_parallel: several points at once, each on its own devices.


@dataclasses.dataclass(frozen=True)
class DeviceSlot:
    """The devices of one running point: CPU cores, and GPUs (indices) when there are any."""

    cpus: tuple[int, ...]
    gpus: tuple[str, ...] = ()

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        env = dict(base)
        env.update({variable: str(len(self.cpus)) for variable in _THREAD_VARIABLES})
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        return env

    def describe(self) -> str:
        text = f"cpus {_ranges(self.cpus)}"
        return text + (f", CUDA_VISIBLE_DEVICES={','.join(self.gpus)}" if self.gpus else "")


def visible_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs this process may use: `CUDA_VISIBLE_DEVICES` when set, else those `nvidia-smi`
    lists (none without it). Asks no JAX backend, which would take the GPUs' memory."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [g.strip() for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return []
    try:
        listing = subprocess.run(
            [nvidia_smi, "--list-gpus"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"^GPU (\d+):", listing, flags=re.MULTILINE)


def device_slots(
    max_parallel: int, cpus: Sequence[int] | None = None, gpus: Sequence[str] | None = None
) -> list[DeviceSlot]:
    """`max_parallel` disjoint device shares: the CPU cores (default: this process's
    affinity) split into contiguous blocks, and the GPUs (default: `visible_gpus()`) likewise;
    a remainder goes to the first slots (CPUs) or stays unused (GPUs, so every point sees the
    same number). Raises `BackendError` when there are fewer cores or GPUs than slots."""
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else list(cpus)
    gpus = visible_gpus() if gpus is None else list(gpus)
    if max_parallel < 1:
        raise BackendError(f"--max_parallel={max_parallel}; run at least 1 point at a time")
    if max_parallel > len(cpus):
        raise BackendError(
            f"--max_parallel={max_parallel} but this process may use {len(cpus)} CPU cores; "
            f"use --max_parallel={len(cpus)} or fewer"
        )
    if gpus and max_parallel > len(gpus):
        raise BackendError(
            f"--max_parallel={max_parallel} but {len(gpus)} GPUs are visible "
            f"({','.join(gpus)}); use --max_parallel={len(gpus)} or fewer"
        )
    per_gpu = len(gpus) // max_parallel
    slots, start = [], 0
    for i in range(max_parallel):
        size = len(cpus) // max_parallel + (i < len(cpus) % max_parallel)
        slot_gpus = tuple(gpus[i * per_gpu : (i + 1) * per_gpu])
        slots.append(DeviceSlot(tuple(cpus[start : start + size]), slot_gpus))
        start += size
    return slots


def run_local_parallel(
    plan: SweepPlan, slots: Sequence[DeviceSlot], stop: Stop, report: Report = print
) -> dict[str, str]:
    """Up to len(slots) points at once, each on one slot's devices, its output in
    `<sweep_dir>/logs/<point>.log`; failures carry their log path. After SIGTERM no new point
    starts; the running ones save and exit."""
    log_dir = os.path.join(plan.sweep_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    free: queue.SimpleQueue[DeviceSlot] = queue.SimpleQueue()
    for slot in slots:
        free.put(slot)
    failed: dict[str, str] = {}
    lock = threading.Lock()

    def report_locked(line: str) -> None:
        with lock:
            report(line)

    def work(job: PointJob) -> None:
        slot = free.get()
        try:
            if stop.requested:
                return
            log = os.path.join(log_dir, f"{job.name}.log")
            report_locked(f"{job.label}: on {slot.describe()}; log {log}")
            with open(log, "ab") as output:
                why = run_point(
                    job,
                    stop,
                    report_locked,
                    env=slot.env(os.environ),
                    output=output,
                    cpus=slot.cpus,
                )
            with lock:
                if why is not None:
                    failed[job.name] = f"{why} (log: {log})"
                    report(f"{job.label}: FAILED: {failed[job.name]}")
                plan.write_results(failed, hparams_for=[job.name])
        finally:
            free.put(slot)

    with concurrent.futures.ThreadPoolExecutor(len(slots)) as pool:
        for future in [pool.submit(work, job) for job in plan.jobs]:
            future.result()  # re-raises an error of the sweep itself (not of a point)
    return {name: failed[name] for name in plan.names if name in failed}  # in sweep order


def _ranges(values: Sequence[int]) -> str:
    """'0-3,8' for [0, 1, 2, 3, 8]."""
    parts: list[str] = []
    for value in values:
        if parts and "-" not in parts[-1].split(",")[-1] and int(parts[-1]) == value - 1:
            parts[-1] = f"{parts[-1]}-{value}"
        elif parts and "-" in parts[-1] and int(parts[-1].split("-")[1]) == value - 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{value}"
        else:
            parts.append(str(value))
    return ",".join(parts)


# ---------------------------------------------------------------------------------------------
# slurm: a job array through submitit.


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """The job array's resources (per point) and how to submit it.

    time_min: the time limit of one point's job; nodes: nodes per point (several: one
    jax.distributed job across them); gpus_per_node, cpus_per_task, mem_gb: 0 leaves SLURM's
    default; array_parallelism: at most this many points at once; additional: more #SBATCH
    options ({"account": "abc", "qos": "high", "constraint": "a100"}); executor: 'slurm', or
    'local' for submitit's LocalExecutor (the same job code on this machine, for tests);
    wait: wait for the jobs and report, else return after submitting.
    """

    partition: str | None = None
    time_min: int = 240
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 0
    mem_gb: float = 0.0
    array_parallelism: int = 256
    job_name: str = "sweep"
    additional: Mapping[str, str] = dataclasses.field(default_factory=dict)
    executor: str = "slurm"
    wait: bool = True


def parse_slurm_time(text: str) -> int:
    """Minutes of a SLURM time limit: 'MINUTES', 'H:MM:SS', 'D-HH[:MM[:SS]]' or 'MM:SS'."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if match is None:
        raise BackendError(
            f"--slurm_time={text!r} is not a SLURM time; write minutes (240), H:MM:SS or D-HH:MM"
        )
    days, first, second, third = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(first) * 3600 + int(second or 0) * 60 + int(third or 0)
    elif third is not None:  # H:MM:SS
        seconds = int(first) * 3600 + int(second) * 60 + int(third)
    elif second is not None:  # MM:SS
        seconds = int(first) * 60 + int(second)
    else:
        seconds = int(first) * 60
    return max(1, -(-seconds // 60))


class PointTask:
    """One array task: run one point (`run_point`) on every node of its allocation; the first
    task then records the results. Near the time limit, or on preemption, submitit calls
    `checkpoint` in the first task: it passes SIGTERM to the trainer (whose processes agree on
    a step, save a checkpoint there and exit) and requeues the task, which then resumes."""

    def __init__(self, plan: SweepPlan) -> None:
        self.plan = plan
        self._stop: Stop | None = None

    def __getstate__(self) -> dict[str, Any]:  # pickled for the job: no processes or locks
        return {"plan": self.plan, "_stop": None}

    def __call__(self, job: PointJob) -> None:
        import submitit

        self._stop = Stop()
        why = run_point(job, self._stop, lambda line: print(line, flush=True))
        if submitit.JobEnvironment().global_rank == 0:
            self.plan.write_results({job.name: why} if why else {}, hparams_for=[job.name])
        if why is not None:
            raise RuntimeError(f"{job.name}: {why}")

    def checkpoint(self, job: PointJob) -> Any:
        import submitit

        if self._stop is not None:
            self._stop.terminate(timeout_s=_SAVE_TIMEOUT_S)  # the trainer saves and exits
            self._stop = None
        return submitit.helpers.DelayedSubmission(PointTask(self.plan), job)


def run_slurm(
    plan: SweepPlan, options: SlurmOptions, stop: Stop, report: Report = print
) -> dict[str, str]:
    """Submit the unfinished points (every point with --eval) as one job array, then (with
    options.wait) wait for it; {point: why} of the failed tasks, with their log paths.

    Job files and logs go to `<sweep_dir>/slurm/`. SIGTERM or Ctrl-C while waiting leaves the
    jobs running; rerunning the same command later submits what is still unfinished (a point
    whose job is still running refuses a second trainer: the workdir is locked)."""
    import submitit

    pending = [
        job
        for job in plan.jobs
        if job.eval_argv is not None or workdir_lib.latest_step(job.workdir) < job.target_steps
    ]
    for job in plan.jobs:
        if job not in pending:
            report(f"{job.label}: skipped, finished")
    if not pending:
        return {}
    folder = os.path.join(plan.sweep_dir, "slurm", "%j")
    cluster = {"slurm": "slurm", "local": "local"}[options.executor]
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    parameters: dict[str, Any] = {
        "name": options.job_name,
        "timeout_min": options.time_min,
        "nodes": options.nodes,
        "tasks_per_node": 1,  # one process per node; JAX drives all of the node's devices
        "slurm_array_parallelism": options.array_parallelism,
        "slurm_signal_delay_s": _SIGNAL_DELAY_S,
    }
    if options.partition:
        parameters["slurm_partition"] = options.partition
    if options.gpus_per_node:
        parameters["gpus_per_node"] = options.gpus_per_node
    if options.cpus_per_task:
        parameters["cpus_per_task"] = options.cpus_per_task
    if options.mem_gb:
        parameters["mem_gb"] = options.mem_gb
    if options.additional:
        parameters["slurm_additional_parameters"] = dict(options.additional)
    executor.update_parameters(**parameters)
    submitted = executor.map_array(PointTask(plan), pending)
    for point_job, array_task in zip(pending, submitted, strict=True):
        report(
            f"{point_job.label}: submitted as job {array_task.job_id}; "
            f"log {array_task.paths.stdout}"
        )
    if not options.wait:
        report("Not waiting (--slurm_wait=false): each job updates results.csv when it ends")
        return {}
    failed: dict[str, str] = {}
    waiting = list(zip(pending, submitted, strict=True))
    while waiting and not stop.requested:
        for point_job, array_task in [w for w in waiting if w[1].done()]:
            waiting.remove((point_job, array_task))
            task_id = array_task.job_id
            if array_task.exception() is None:
                report(f"{point_job.label}: done (job {task_id})")
            else:
                failed[point_job.name] = f"job {task_id} failed (log: {array_task.paths.stderr})"
                report(f"{point_job.label}: FAILED: {failed[point_job.name]}")
        if waiting:
            time.sleep(_POLL_S)
    failed = {name: failed[name] for name in plan.names if name in failed}  # in sweep order
    if waiting:
        still = ", ".join(array_task.job_id for _, array_task in waiting)
        report(f"Stopped waiting; these jobs still run: {still}")
    return failed
