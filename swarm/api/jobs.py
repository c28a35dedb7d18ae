"""Fine-tuning jobs of the HTTP API: each a `python -m client.finetune` process through the swarm.

A job's record lives in `<jobs dir>/<id>.json` (its log next to it), so jobs survive an API
restart: a job still running then is found again by its process id (the process runs in its own
session and outlives the API); one whose process is gone is judged by what it left in its output
folder. Progress and loss come from the trainer's `trainer_state.json`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil

from swarm.api.schema import FineTuneRequest, Job
from swarm.errors import ConfigError

logger = logging.getLogger(__name__)

STOP_GRACE_S = 10.0


class JobManager:
    def __init__(self, jobs_dir: Path, data_root: Path, *, model: str, initial_peers: list[str], extra_args: list[str] = ()):
        self.jobs_dir, self.data_root = jobs_dir, data_root.resolve()
        self.model, self.initial_peers, self.extra_args = model, list(initial_peers), list(extra_args)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._processes: dict[str, subprocess.Popen] = {}  # the jobs this API process started
        self._lock = threading.Lock()

    # ---- paths ------------------------------------------------------------------------------------
    def _inside_root(self, text: str, what: str) -> Path:
        path = Path(text).expanduser()
        path = (path if path.is_absolute() else self.data_root / path).resolve()
        if path != self.data_root and self.data_root not in path.parents:
            raise ConfigError(f"{what} {text!r} is outside the API's data root {self.data_root}")
        return path

    def _record_path(self, job_id: str) -> Path:
        return self.jobs_dir / f"{job_id}.json"

    # ---- jobs -------------------------------------------------------------------------------------
    def start(self, request: FineTuneRequest) -> Job:
        data = self._inside_root(request.dataset_path, "dataset_path")
        output = self._inside_root(request.output_path, "output_path")
        if not data.is_file():
            raise ConfigError(f"dataset_path {request.dataset_path!r}: no such file")
        if output.exists() and not output.is_dir():
            raise ConfigError(f"output_path {request.output_path!r} exists and is not a folder")
        rows = sum(1 for line in data.read_text(errors="replace").splitlines() if line.strip())
        if rows == 0:
            raise ConfigError(f"dataset_path {request.dataset_path!r} is empty")
        settings = request.hyperparameters
        job_id = f"ftjob-{uuid.uuid4().hex[:16]}"
        command = [
            sys.executable, "-m", "client.finetune", "--data", str(data), "--output", str(output), "--mode", settings.mode,
            "--run-name", job_id, "--model", self.model, "--initial-peers", *self.initial_peers,
            "--lora-r", str(settings.lora_r), "--lora-alpha", str(settings.lora_alpha), "--lora-dropout", str(settings.lora_dropout),
            "--learning-rate", str(settings.learning_rate), "--epochs", str(settings.num_epochs),
            "--batch-size", str(settings.batch_size), "--max-seq-length", str(settings.max_seq_length), *self.extra_args,
        ]
        with open(self.jobs_dir / f"{job_id}.log", "w") as log:  # the trainer writes to its own copy of the descriptor
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        job = Job(
            id=job_id, status="running", created_at=time.time(), dataset_path=str(data), output_path=str(output),
            hyperparameters=settings, pid=process.pid, total_steps=math.ceil(rows / settings.batch_size) * settings.num_epochs,
        )
        with self._lock:
            self._processes[job_id] = process
            self._save(job)
        logger.info("job %s started: %s", job_id, " ".join(command))
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            try:
                job = Job.model_validate_json(self._record_path(job_id).read_text())
            except (OSError, ValueError):
                return None
            return self._refresh(job)

    def all(self) -> list[Job]:
        ids = sorted(path.stem for path in self.jobs_dir.glob("ftjob-*.json"))
        jobs = [job for job in (self.get(job_id) for job_id in ids) if job is not None]
        return sorted(jobs, key=lambda job: job.created_at)

    def cancel(self, job_id: str) -> Job | None:
        job = self.get(job_id)
        if job is None or job.status != "running":
            return job
        self._stop(job)
        with self._lock:
            job = job.model_copy(update={"status": "cancelled", "finished_at": time.time()})
            self._save(job)
        return job

    # ---- internals --------------------------------------------------------------------------------
    def _stop(self, job: Job) -> None:
        process = self._processes.get(job.id)
        try:
            os.killpg(job.pid, signal.SIGTERM)  # the trainer and its DHT process and p2pd
        except (ProcessLookupError, PermissionError, TypeError):
            return
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and group_alive(job.pid):
            if process is not None:
                process.poll()  # reap the trainer, or its pid stays a zombie of its group
            time.sleep(0.1)
        if group_alive(job.pid):
            try:
                os.killpg(job.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if process is not None:
            process.wait()

    def _alive(self, job: Job) -> bool:  # the trainer itself
        process = self._processes.get(job.id)
        if process is not None:
            return process.poll() is None
        try:  # a job from before a restart: the same pid, still our trainer
            found = psutil.Process(job.pid)
            return found.status() != psutil.STATUS_ZOMBIE and "client.finetune" in " ".join(found.cmdline())
        except (psutil.Error, TypeError):
            return False

    def _refresh(self, job: Job) -> Job:
        update: dict = {}
        progress = self._read(job, "progress.json")
        if progress is not None:
            steps = int(progress.get("steps", 0))
            update.update(steps_done=steps, progress=min(1.0, steps / max(1, job.total_steps)), loss=progress.get("loss"))
        state = self._read(job, "trainer_state.json")
        if job.status == "running" and not self._alive(job):
            process = self._processes.get(job.id)
            finished = state is not None and state.get("epoch", 0) >= job.hyperparameters.num_epochs
            if process is not None:
                finished = finished and process.returncode == 0
            update.update(status="succeeded" if finished else "failed", finished_at=time.time())
            if not finished:
                update["error"] = self._log_tail(job.id)
            if finished:
                losses = state.get("losses") or [None]
                update.update(progress=1.0, steps_done=len(state.get("losses", [])), loss=losses[-1])
        if update:
            job = job.model_copy(update=update)
            self._save(job)
        return job

    def _read(self, job: Job, name: str) -> dict | None:
        try:
            return json.loads((Path(job.output_path) / name).read_text())
        except (OSError, ValueError):
            return None

    def _log_tail(self, job_id: str, chars: int = 1500) -> str:
        try:
            return (self.jobs_dir / f"{job_id}.log").read_text(errors="replace")[-chars:]
        except OSError:
            return "the trainer exited (no log)"

    def _save(self, job: Job) -> None:
        partial = self._record_path(job.id).with_suffix(".partial")
        partial.write_text(job.model_dump_json(indent=1))
        partial.replace(self._record_path(job.id))

    def close(self) -> None:
        """Jobs keep running after the API stops (they are found again at the next start)."""
        self._processes.clear()


def group_alive(pgid: int) -> bool:
    """Whether any process of the group (the trainer, its DHT process, p2pd) is left, zombies aside."""
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error, PermissionError):
            continue
    return False
