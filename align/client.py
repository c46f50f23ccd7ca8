"""A small Python client for the align service (the CLI's ``submit``, ``jobs`` and ``artifacts`` use it).

    from align.client import Client
    client = Client()                      # ALIGN_URL / ALIGN_API_KEY, or the local service's key file
    job = client.submit("examples/tiny-sft-dpo.yaml")
    for event in client.stream_events(job["id"]):
        ...

Every method returns the service's JSON. A 4xx/5xx answer raises :class:`ServiceError` carrying the
status and the service's per-field messages.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from align import paths

DEFAULT_URL = "http://127.0.0.1:8321"


class ServiceError(RuntimeError):
    """The service refused a request; ``errors`` lists (field, message) pairs for a 422."""

    def __init__(self, status: int, detail: Any):
        self.status = status
        self.errors: list[tuple[str, str]] = []
        if isinstance(detail, list):
            self.errors = [(item.get("field", "?"), item.get("message", "")) for item in detail]
            text = "\n".join(f"  {field}: {message}" for field, message in self.errors)
        else:
            text = str(detail)
        super().__init__(f"HTTP {status}: {text}" if "\n" not in text else f"HTTP {status}:\n{text}")


def default_api_key() -> str | None:
    """``ALIGN_API_KEY``, else the key the local service wrote under ``.align/`` on first start."""
    key = os.environ.get("ALIGN_API_KEY")
    if key:
        return key
    key_file = paths.home_dir() / "api_key"
    return key_file.read_text().strip() if key_file.is_file() else None


def read_spec(path: str | Path) -> dict:
    """A spec file as a dict, with relative local data and model paths made absolute against the file.

    The service resolves nothing against the caller's working folder, so a spec that says
    ``data: {path: data/sft.jsonl}`` means the file beside the spec.
    """
    path = Path(path)
    data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of fields at the top level")
    base = path.resolve().parent

    def absolute(location: Any) -> Any:
        if not isinstance(location, str) or ":" in location.split("/", 1)[0] or Path(location).is_absolute():
            return location
        return str((base / location).resolve())

    if "base_model" in data:
        data["base_model"] = absolute(data["base_model"])
    for stage in data.get("stages") or []:
        if isinstance(stage, dict) and isinstance(stage.get("data"), dict):
            for key in ("path", "eval_path"):
                if key in stage["data"]:
                    stage["data"][key] = absolute(stage["data"][key])
    return data


class Client:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0):
        self.url = (url or os.environ.get("ALIGN_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or default_api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ServiceError(response.status_code, detail)
        return response.json()

    # --- jobs ----------------------------------------------------------------------------------------

    def submit(self, spec: dict | str | Path, idempotency_key: str | None = None) -> dict:
        """POST a job (a spec dict or a spec file); the same idempotency key never makes a second job."""
        body = spec if isinstance(spec, dict) else read_spec(spec)
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        return self._call("POST", "/jobs", json=body, headers=headers)

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/jobs/{job_id}")

    def jobs(self, state: str | None = None, limit: int = 20, cursor: str | None = None) -> dict:
        params = {k: v for k, v in {"state": state, "limit": limit, "cursor": cursor}.items() if v is not None}
        return self._call("GET", "/jobs", params=params)

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/jobs/{job_id}/cancel")

    def events(self, job_id: str, after: int = 0, limit: int = 100, type: str | None = None) -> dict:
        params = {k: v for k, v in {"after": after, "limit": limit, "type": type}.items() if v is not None}
        return self._call("GET", f"/jobs/{job_id}/events", params=params)

    def stream_events(self, job_id: str, after: int = 0) -> Iterator[dict]:
        """Events as they are recorded (server-sent events), until the job ends."""
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(after)}
        with self.http.stream("GET", f"/jobs/{job_id}/events", headers=headers, timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                raise ServiceError(response.status_code, response.json().get("detail"))
            kind, data = None, []
            for line in response.iter_lines():
                if line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    data.append(line.split(":", 1)[1].strip())
                elif not line and data:
                    if kind == "end":
                        return
                    yield json.loads("\n".join(data))
                    kind, data = None, []

    def metrics(self, job_id: str) -> list[dict]:
        return self._call("GET", f"/jobs/{job_id}/metrics")

    # --- artifacts -----------------------------------------------------------------------------------

    def artifact(self, artifact_id: str) -> dict:
        return self._call("GET", f"/artifacts/{artifact_id}")

    def download_artifact(self, artifact_id: str, dest: str | Path) -> Path:
        """Copy every file of an artifact into ``dest``; each file's sha256 is checked against the manifest."""
        import hashlib

        dest = Path(dest)
        artifact = self.artifact(artifact_id)
        manifest = artifact.get("manifest") or {}
        names = list(manifest.get("files", {})) + ["manifest.json"]
        for name in names:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with self.http.stream("GET", f"/artifacts/{artifact_id}/files/{name}") as response:
                if response.status_code >= 400:
                    response.read()
                    raise ServiceError(response.status_code, response.text)
                with open(target, "wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                        digest.update(chunk)
            expected = manifest.get("files", {}).get(name, {}).get("sha256")
            if expected and expected.removeprefix("sha256:") != digest.hexdigest():
                raise ServiceError(502, f"{name}: downloaded bytes do not match the manifest's sha256")
        return dest

    # --- service -------------------------------------------------------------------------------------

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False
