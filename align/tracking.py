"""Where a stage's metrics go besides ``metrics.jsonl``: the tools a job's ``report_to`` names.

``tensorboard``: event files under the stage's ``work_dir/tb`` while it trains (point TensorBoard at the
work root to watch), copied into the artifact's ``tb/`` when it publishes. Tags follow Hugging Face's
TensorBoard callback: ``train/<key>`` for training values, ``eval/<key>`` for ``eval_<key>``.
``mlflow``: one run per stage in the experiment named after the job, on the tracking URI the launch
carries (``ALIGN_MLFLOW_TRACKING_URI``): the job's and the stage's settings as params, every record's
values as metrics at its step, the artifact id as the tag ``align.artifact_id``; the run id goes in the
manifest. A retried attempt that resumes from a checkpoint continues the same run and TensorBoard
discards the events after that checkpoint; one that starts afresh starts both afresh.

One :class:`StageTracker` per attempt, on the main rank only: :func:`align.stages.context.start` opens it,
:class:`align.engine.metrics.MetricsLog` hands it each record, :func:`align.stages.artifact.publish` ends it.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from align.spec import JobSpec

MLFLOW_TRACKING_URI_ENV = "ALIGN_MLFLOW_TRACKING_URI"
"""Where ``align train`` (and ``align validate``) read the MLflow tracking URI; the service's own setting has
the same name."""
TB_DIR = "tb"
MLFLOW_RUN_FILE = "mlflow_run.json"
"""In the stage's work folder: the MLflow run a resumed attempt continues."""
MAX_PARAM_LENGTH = 6000
"""MLflow's limit on a param's value."""
INSTALL_HINT = "install align's tracking extra on the workers: pip install 'align[tracking]'"


class TrackingError(RuntimeError):
    """``report_to`` names a tool this process cannot report to: its package is missing or it has no address."""


def tracking_problems(job: JobSpec, mlflow_tracking_uri: str | None) -> list[tuple[str, str]]:
    """``(field, message)`` when the job's ``report_to`` cannot be honoured with this tracking URI."""
    if "mlflow" in job.report_to and not mlflow_tracking_uri:
        return [("report_to", f"names mlflow, but no MLflow tracking URI is configured: set {MLFLOW_TRACKING_URI_ENV} "
                              "(the service's setting for submitted jobs, the environment for align train) or drop "
                              "mlflow from report_to")]
    return []


def redacted(uri: str) -> str:
    """``uri`` without a password or token in its user part."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def flat_params(prefix: str, value: Any) -> dict[str, str]:
    """Nested settings as ``{"adapter.r": "16", ...}``; lists as JSON."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flat_params(f"{prefix}.{key}" if prefix else key, item))
        return out
    text = json.dumps(value) if isinstance(value, list) else str(value)
    return {prefix: text[:MAX_PARAM_LENGTH]}


def numeric_values(record: dict) -> dict[str, float]:
    """A record's finite numbers, without its ``step`` and ``time``."""
    return {key: float(value) for key, value in record.items()
            if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


class StageTracker:
    """Sends one stage attempt's metrics records to the tools its job's ``report_to`` names."""

    def __init__(self, *, job: JobSpec, stage_index: int, stage_name: str, work_dir: Path, job_id: str | None,
                 mlflow_tracking_uri: str | None, warn: Callable[[str], None]):
        self.job, self.stage_index, self.stage_name = job, stage_index, stage_name
        self.work_dir, self.job_id = Path(work_dir), job_id
        self.targets = list(job.report_to)
        self.mlflow_tracking_uri = mlflow_tracking_uri
        self.warn = warn
        self.resumed_step: int | None = None
        self._writer = None
        self._mlflow = None
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._started = False
        problems = tracking_problems(job, mlflow_tracking_uri)
        if problems:
            raise TrackingError(f"report_to: {problems[0][1]}")
        for target, module in (("tensorboard", "tensorboardX"), ("mlflow", "mlflow")):
            if target in self.targets and not _importable(module):
                raise TrackingError(f"report_to names {target}, but {module} is not installed here; {INSTALL_HINT}")

    @property
    def tb_dir(self) -> Path:
        return self.work_dir / TB_DIR

    def resumed_after(self, step: int) -> None:
        """The attempt resumed from the checkpoint after ``step``: what was reported past it is reported again."""
        self.resumed_step = step

    def log(self, record: dict) -> None:
        """One metrics record (``step`` and its values), as ``metrics.jsonl`` has it."""
        self._start()
        values, step = numeric_values(record), int(record.get("step", 0))
        if self._writer is not None:
            for key, value in values.items():
                tag = "eval/" + key.removeprefix("eval_") if key.startswith("eval_") else "train/" + key
                self._writer.add_scalar(tag, value, step, walltime=record.get("time"))
        if self._mlflow is not None and values:
            from mlflow.entities import Metric

            timestamp = int(float(record.get("time", 0)) * 1000)
            self._mlflow_call("log metrics", self._mlflow.log_batch, self._run_id,
                              metrics=[Metric(key, value, timestamp, step) for key, value in values.items()])

    def close_files(self, out_dir: Path) -> dict[str, Any]:
        """Flush the event files into ``out_dir/tb``; returns what the manifest records under ``tracking``."""
        self._start()
        tracking: dict[str, Any] = {}
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            shutil.copytree(self.tb_dir, Path(out_dir) / TB_DIR, dirs_exist_ok=True)
            tracking["tensorboard"] = TB_DIR
        if self._run_id is not None:
            tracking["mlflow"] = {"tracking_uri": redacted(self.mlflow_tracking_uri or ""),
                                  "experiment_id": self._experiment_id, "run_id": self._run_id}
        return tracking

    def end(self, artifact_id: str | None = None, failed: bool = False) -> None:
        """End the MLflow run: FINISHED with the artifact's id as a tag, or FAILED (a retry may resume it)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._mlflow is not None and artifact_id is not None:
            self._mlflow_call("tag the run", self._mlflow.set_tag, self._run_id, "align.artifact_id", artifact_id)
        if self._mlflow is not None:
            self._mlflow_call("end the run", self._mlflow.set_terminated, self._run_id,
                              "FAILED" if failed else "FINISHED")
        self._mlflow = None

    def _start(self) -> None:
        """Open the tools at the first record: by then the attempt knows whether it resumed."""
        if self._started:
            return
        self._started = True
        if "tensorboard" in self.targets:
            self._open_tensorboard()
        if "mlflow" in self.targets:
            self._open_mlflow()

    def _open_tensorboard(self) -> None:
        from tensorboardX import SummaryWriter

        if self.resumed_step is None and self.tb_dir.exists():
            shutil.rmtree(self.tb_dir)  # an earlier attempt's events: this one starts from step 0
        purge = None if self.resumed_step is None else self.resumed_step + 1
        # Numbered: the file name's time has whole seconds, and a quick retry must not overwrite its predecessor's.
        earlier = len(list(self.tb_dir.glob("events.out.tfevents.*"))) if self.tb_dir.exists() else 0
        self._writer = SummaryWriter(logdir=str(self.tb_dir), purge_step=purge, flush_secs=30,
                                     filename_suffix=f".{earlier + 1}")

    def _open_mlflow(self) -> None:
        """Start (or continue) the stage's run; a tracking server that fails here is handled as one that fails
        mid-stage: a warning, and training goes on without MLflow."""
        try:
            self._open_mlflow_run()
        except Exception as error:  # the server's own errors, connection errors, a file: store it cannot write
            self.warn(f"mlflow: could not start the run on {redacted(self.mlflow_tracking_uri or '')} "
                      f"({type(error).__name__}: {error}); MLflow reporting stops for this attempt, metrics.jsonl "
                      "has every value")
            self._mlflow = self._run_id = self._experiment_id = None

    def _open_mlflow_run(self) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.mlflow_tracking_uri)
        run_file = self.work_dir / MLFLOW_RUN_FILE
        if self.resumed_step is not None and run_file.exists():
            earlier = json.loads(run_file.read_text())
            client.update_run(earlier["run_id"], status="RUNNING")
            self._mlflow, self._run_id, self._experiment_id = client, earlier["run_id"], earlier["experiment_id"]
            return
        experiment = client.get_experiment_by_name(self.job.name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.job.name)
        tags = {"align.job": self.job.name, "align.stage": self.stage_name,
                "align.stage_type": self.job.stages[self.stage_index].type, "align.spec_hash": self.job.hash()}
        if self.job_id:
            tags["align.job_id"] = self.job_id
        run = client.create_run(experiment_id, tags=tags, run_name=self.stage_name)
        self._mlflow, self._run_id, self._experiment_id = client, run.info.run_id, experiment_id
        run_file.write_text(json.dumps({"run_id": self._run_id, "experiment_id": experiment_id}))
        job = self.job.model_dump(mode="json", exclude={"stages", "report_to"})
        stage = self.job.stages[self.stage_index].model_dump(mode="json")
        params = {**flat_params("", job), **flat_params("stage", stage)}
        items = [Param(key, value) for key, value in sorted(params.items())]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(self._run_id, params=items[start:start + 100])

    def _mlflow_call(self, what: str, call: Callable, *args, **kwargs) -> None:
        """A call to the tracking server once the run exists: a failure warns once and stops MLflow reporting,
        and training goes on (every value is in ``metrics.jsonl``)."""
        try:
            call(*args, **kwargs)
        except Exception as error:  # the server's own errors, connection errors: none should stop training
            self.warn(f"mlflow: could not {what} ({type(error).__name__}: {error}); MLflow reporting stops for this "
                      f"attempt, metrics.jsonl has every value")
            self._mlflow = None


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
