"""A recording stand-in for Ray's Jobs API (:class:`services.dispatcher.RayJobsLike`), for trials where Ray is
not what is under test: it counts every submission per submission id and refuses a second one, as Ray does."""

from __future__ import annotations

import threading
from collections import Counter


class RecordingRay:
    def __init__(self, stop_ends_job: bool = True):
        self.status: dict[str, str] = {}
        self.submitted: Counter[str] = Counter()
        """Submission id -> times submitted (refused ones included): more than 1 is a double submission."""
        self.stopped: Counter[str] = Counter()
        self.stop_ends_job = stop_ends_job
        self._lock = threading.Lock()

    def submit_job(self, *, entrypoint, submission_id, runtime_env, entrypoint_num_cpus=0):
        with self._lock:
            self.submitted[submission_id] += 1
            if submission_id in self.status:
                raise RuntimeError(f"Job with submission_id {submission_id} already exists.")
            self.status[submission_id] = "PENDING"
            return submission_id

    def get_job_status(self, submission_id):
        with self._lock:
            return self.status.get(submission_id)

    def set_status(self, submission_id, status):
        with self._lock:
            self.status[submission_id] = status

    def stop_job(self, submission_id):
        with self._lock:
            self.stopped[submission_id] += 1
            if self.stop_ends_job and self.status.get(submission_id) in ("PENDING", "RUNNING"):
                self.status[submission_id] = "STOPPED"
            return submission_id in self.status

    def get_job_info(self, submission_id):
        status = self.get_job_status(submission_id)
        return None if status is None else {"status": status, "message": "", "error_type": None,
                                            "start_time": None, "end_time": None}

    def get_job_logs(self, submission_id):
        return ""
