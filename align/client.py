"""A small Python client for the align service (the CLI's ``submit``, ``jobs`` and ``artifacts`` use it).

    from align.client import Client
    client = Client()                      # ALIGN_URL; the key from ALIGN_API_KEY or a key file (find_api_key)
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
from typing import TYPE_CHECKING, Any

import yaml

from align import paths

if TYPE_CHECKING:
    import httpx

DEFAULT_URL = "http://127.0.0.1:8321"


class ServiceError(RuntimeError):
    """The service refused a request; ``errors`` lists (field, message) pairs for a 422, and ``hint`` says
    what on this side would fix it (for a 401: where the client looked for a key)."""

    def __init__(self, status: int, detail: Any, hint: str | None = None):
        self.status = status
        self.hint = hint
        self.errors: list[tuple[str, str]] = []
        if isinstance(detail, list):
            self.errors = [(item.get("field", "?"), item.get("message", "")) for item in detail]
            text = "\n".join(f"  {field}: {message}" for field, message in self.errors)
        else:
            text = str(detail)
        text = f"HTTP {status}: {text}" if "\n" not in text else f"HTTP {status}:\n{text}"
        super().__init__(text + (f"\n{hint}" if hint else ""))


def find_api_key() -> tuple[str | None, str]:
    """The API key and where it came from: ``$ALIGN_API_KEY``, else the first key file of
    :func:`align.paths.api_key_files` (``$ALIGN_HOME/api_key`` or ``./.align/api_key``, then
    ``~/.config/align/api_key``), the order the gh and huggingface CLIs use (variable, then file)."""
    key = os.environ.get("ALIGN_API_KEY", "").strip()
    if key:
        return key, "ALIGN_API_KEY"
    for key_file in paths.api_key_files():
        if key_file.is_file():
            key = key_file.read_text().strip()
            if key:
                return key, str(key_file)
    return None, ""


def key_hint(source: str) -> str:
    """What to do about a 401, naming where this client looked for a key."""
    places = ", ".join(["ALIGN_API_KEY"] + [str(path) for path in paths.api_key_files()])
    if source:
        return (f"the key sent came from {source}, and the service does not accept it; set ALIGN_API_KEY or "
                f"write a valid key to one of the key files (looked at, in order: {places})")
    return (f"no API key found (looked at, in order: {places}); set ALIGN_API_KEY=<key> or write the key to "
            "one of those files (`align serve` writes the key it creates to the first and last of them)")


def read_spec(path: str | Path) -> dict:
    """A spec file as a dict, with relative local data and model paths made absolute against the file.

    The service resolves nothing against the caller's working folder, so a spec that says
    ``data: {path: data/sft.jsonl}`` means the file beside the spec.
    """
    path = Path(path)
    data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise TypeError(f"{path}: expected a mapping of fields at the top level")
    base = path.resolve().parent

    def absolute(location: Any) -> Any:
        return paths.beside(location, base) if isinstance(location, str) else location

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
        key, self.key_source = (api_key, "the api_key argument") if api_key else find_api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        import httpx  # the api and dev extras; `align train` reads specs with read_spec without it

        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            self._raise(response)
        return response.json()

    def _raise(self, response: httpx.Response) -> None:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        hint = key_hint(self.key_source) if response.status_code == 401 else None
        raise ServiceError(response.status_code, detail, hint)

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
        from httpx_sse import connect_sse

        headers = {"Last-Event-ID": str(after)}
        with connect_sse(self.http, "GET", f"/jobs/{job_id}/events", headers=headers, timeout=None) as source:
            if source.response.status_code >= 400:
                source.response.read()
                self._raise(source.response)
            for event in source.iter_sse():
                if event.event == "end":
                    return
                if event.data:  # httpx-sse also yields the keep-alive comments after an event with an id
                    yield event.json()

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
        names = [*manifest.get("files", {}), "manifest.json"]
        for name in names:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with self.http.stream("GET", f"/artifacts/{artifact_id}/files/{name}") as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise(response)
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
        import httpx

        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False
