"""Service settings, read from ``ALIGN_*`` environment variables (``ALIGN_DATABASE_URL``, ...)."""

from __future__ import annotations

import os
import secrets
import time
from functools import lru_cache
from pathlib import Path
from typing import Literal

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from align.paths import home_dir
from services.roots import overlap_problems


def _under_cwd(*parts: str) -> str:
    return str(Path.cwd().joinpath(*parts))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALIGN_", extra="ignore", use_attribute_docstrings=True)

    database_url: str = Field(default_factory=lambda: "sqlite:///" + _under_cwd(".align", "align.db"))
    """SQLAlchemy URL: `sqlite:///path` (embedded) or `postgresql://user@host/db`."""
    ray_address: str | None = None
    """Ray Jobs API address (`http://head:8265`); unset starts a local Ray."""
    artifact_root: str = Field(default_factory=lambda: _under_cwd(".align", "artifacts"))
    """Artifact store root: a local path or an fsspec URL (`s3://bucket/prefix`)."""
    work_root: str = Field(default_factory=lambda: _under_cwd(".align", "work"))
    """Checkpoints and logs per stage run, `<work_root>/<job_id>/<stage_run_id>`; shared on clusters."""
    data_roots: list[str] = Field(default_factory=lambda: [_under_cwd("data", "{tenant}")])
    """Local folders a job's data may be read from; `{tenant}` in one stands for the tenant's name (`{tenant_id}`:
    its id), so each tenant reads its own folder. None may overlap `artifact_root` or `work_root`."""
    model_roots: list[str] = Field(default_factory=lambda: [_under_cwd("models", "{tenant}")])
    """Local folders a job's base model may be read from; `{tenant}` and `{tenant_id}` as in `data_roots`."""
    allowed_schemes: list[str] = Field(default_factory=lambda: ["file"])
    """URL schemes allowed for data and model locations."""
    bootstrap_api_key: str | None = None
    """An API key created for tenant `default` at start-up, if set."""
    report_secret: str | None = None
    """Secret that signs worker report tokens. Unset: made once, when a token is first signed or checked, and
    kept in `<state folder>/report_secret` (`$ALIGN_HOME`, else `./.align`; mode 0600), so that a restarted
    service takes the reports of attempts still running. Set it when API processes do not share that folder."""
    report_token_seconds: float = Field(7 * 24 * 3600.0, gt=0)
    """A report token is refused (401) this long after the dispatcher issued it; a stage attempt that
    runs longer needs a larger value."""
    host: str = "127.0.0.1"
    """Address the API listens on."""
    port: int = 8321
    """Port the API listens on."""
    public_url: str | None = None
    """URL workers use to reach the API (default `http://{host}:{port}`)."""
    plan_gpu: Literal["h200", "h100", "a100"] | None = None
    """The GPU the cluster's workers have. `POST /jobs` then plans every stage that asks for GPUs against its
    memory (as `align plan --gpu` does) and refuses one that cannot fit with a 422 that names the stage, the
    shortfall and the changes that would fit. Unset: GPU stages are not planned at submission."""
    plan_cpu_memory_gib: float | None = Field(None, gt=0)
    """RAM of a CPU worker node, GiB, for the same check on stages that ask for no GPU. Unset: this machine's
    RAM when the service starts its own Ray (`ray_address` unset), else no check."""
    max_attempts: int = Field(3, ge=1)
    """Attempts per stage run before a retryable failure becomes final."""
    lease_seconds: float = Field(300.0, gt=0)
    """A running stage run with no report for this long is rescued (Ray job stopped, stage requeued). Workers
    send heartbeats every `min(5, lease_seconds / 3)` seconds for the whole attempt (starting, waiting for
    resources, training, evaluating, publishing); the dispatcher renews the lease while Ray prepares the job."""
    schedule_timeout_seconds: float = Field(1800.0, gt=0)
    """A stage attempt whose workers wait this long for the CPUs/GPUs it asks for (`resources`) fails for good
    with `unschedulable`, naming what it asked for and what the cluster has."""
    dispatcher_poll_seconds: float = Field(1.0, gt=0)
    """Pause between dispatcher passes."""
    dispatcher_max_backoff_seconds: float = Field(30.0, gt=0)
    """Longest pause between dispatcher passes while the database cannot be reached: the pause doubles from
    `dispatcher_poll_seconds` up to this, and is back to `dispatcher_poll_seconds` after the first pass that works."""
    worker_python: str | None = None
    """Python interpreter the Ray job runs the worker with (default: `python` on a cluster's PATH, this
    interpreter for a local Ray)."""
    run_dispatcher: bool = True
    """Run the dispatcher in the API process."""
    sse_poll_seconds: float = Field(0.5, gt=0)
    """How often a live event stream re-reads the database when it cannot wait for Postgres NOTIFY
    (SQLite, or while the LISTEN connection is down)."""
    ready_probe_seconds: float = Field(30.0, ge=0)
    """`/readyz` submits a no-op Ray job to check that jobs can start; a success stands for this long."""
    max_request_bytes: int = Field(1 << 20, ge=1024)
    """Largest request body the API reads; a larger one gets 413."""
    metrics_port: int | None = Field(None, ge=1, le=65535)
    """`align dispatcher` serves its Prometheus metrics on this port (`/metrics`); unset: not served. The API
    serves its own, the dispatcher's included when it runs one, at `GET /metrics` on `port`."""
    metrics_host: str = "127.0.0.1"
    """Address `align dispatcher` serves its metrics on (`0.0.0.0` in a container that Prometheus scrapes)."""
    mlflow_tracking_uri: str | None = None
    """MLflow tracking URI for jobs whose spec has `report_to: [mlflow]` (`http://mlflow:5000`, `databricks`,
    `sqlite:///...`, `file:///...`); handed to the workers in each attempt's ticket."""

    @model_validator(mode="after")
    def _roots_apart(self) -> Settings:
        problems = overlap_problems(self.artifact_root, self.work_root, self.data_roots, self.model_roots)
        if problems:
            raise ValueError("the service refuses to start: " + "; ".join(problems) + " (by default jobs read "
                             "./data/{tenant} and ./models/{tenant}, and artifacts go to ./.align/artifacts)")
        return self

    @model_validator(mode="after")
    def _default_public_url(self) -> Settings:
        if self.public_url is None:
            self.public_url = f"http://{self.host}:{self.port}"
        return self

    def _report_signer(self) -> TimestampSigner:
        if self.report_secret is None:  # read or made here, not at start-up: `align db upgrade` signs nothing
            self.report_secret = stored_report_secret(home_dir())
        return TimestampSigner(self.report_secret, salt="align.report-token")

    def report_token(self, stage_run_id: str, attempt: int) -> str:
        """Bearer token for one stage attempt's reports: ``<stage_run_id>:<attempt>`` signed with the
        time it was issued (itsdangerous, HMAC-SHA1 of the secret; valid ``report_token_seconds``)."""
        return self._report_signer().sign(f"{stage_run_id}:{attempt}").decode()

    def check_report_token(self, stage_run_id: str, attempt: int, token: str) -> str | None:
        """None when ``token`` is this attempt's and not expired, else why it is refused."""
        try:
            value = self._report_signer().unsign(token, max_age=self.report_token_seconds)
        except SignatureExpired as expired:
            issued = expired.date_signed.isoformat(timespec="seconds") if expired.date_signed else "long ago"
            return (f"report token expired: issued {issued}, valid {self.report_token_seconds:g} s "
                    "(ALIGN_REPORT_TOKEN_SECONDS); the worker stops this attempt and the dispatcher retries the "
                    "stage with a new token while attempts remain (ALIGN_MAX_ATTEMPTS)")
        except BadSignature:
            return "bad report token for this stage run and attempt"
        if value.decode() != f"{stage_run_id}:{attempt}":
            return "bad report token for this stage run and attempt"
        return None


REPORT_SECRET_FILE = "report_secret"


def stored_report_secret(state_dir: Path) -> str:
    """The report secret kept in ``state_dir/report_secret``, made (random, mode 0600) by the first caller.

    The file is created with ``O_EXCL``, so two processes starting together agree on one secret."""
    path = state_dir / REPORT_SECRET_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another process may be between creating the file and writing it
            secret = path.read_text().strip()
            if secret:
                return secret
            time.sleep(0.01)
        raise RuntimeError(f"{path} is empty: delete it to make a new report secret, or set "
                           "ALIGN_REPORT_SECRET") from None
    secret = secrets.token_hex(32)
    with os.fdopen(descriptor, "w") as writer:
        writer.write(secret + "\n")
        writer.flush()
        os.fsync(writer.fileno())
    return secret


@lru_cache
def get_settings() -> Settings:
    return Settings()
