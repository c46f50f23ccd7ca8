"""The API's own documentation: /docs and /redoc work offline, and the OpenAPI document says how to call it."""

from __future__ import annotations

import re
from pathlib import Path

import fastapi_offline
import pytest
from fastapi.testclient import TestClient

from services.app import create_app
from services.settings import Settings

STATIC = Path(fastapi_offline.__file__).parent / "static"
PROTECTED_PREFIXES = ("/jobs", "/artifacts")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = Settings(database_url=f"sqlite:///{tmp_path_factory.mktemp('docs') / 'unused.db'}",
                        run_dispatcher=False)
    return TestClient(create_app(settings))  # no lifespan: these routes need no database


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_every_asset_from_this_server(client, page):
    html = client.get(page)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href|spec-url)=["']([^"']+)["']|url:\s*['"]([^'"]+)['"]""", html.text)
    urls = [a or b for a, b in urls]
    assert urls and all(url.startswith("/") and not url.startswith("//") for url in urls), urls
    assert "http://" not in html.text and "https://" not in html.text
    assets = [url for url in urls if url.endswith((".js", ".css", ".png"))]
    assert len(assets) >= (3 if page == "/docs" else 2), assets
    for url in assets:
        response = client.get(url)
        assert response.status_code == 200, url
        assert response.content == (STATIC / url.rsplit("/", 1)[1]).read_bytes(), f"{url} is the packaged file"
    assert "/openapi.json" in urls
    if page == "/docs":
        bundle = client.get(next(url for url in assets if url.endswith("swagger-ui-bundle.js")))
        assert "javascript" in bundle.headers["content-type"] and b"SwaggerUIBundle" in bundle.content
        assert re.search(rb'"5\.\d+\.\d+"', bundle.content), "Swagger UI 5 renders OpenAPI 3.1"
        css = client.get(next(url for url in assets if url.endswith(".css")))
        assert css.headers["content-type"].startswith("text/css") and b".swagger-ui" in css.content


def test_openapi_declares_the_api_key_scheme_and_the_error_answers(client):
    document = client.get("/openapi.json").json()
    assert document["components"]["securitySchemes"] == {
        "ApiKey": {"type": "http", "scheme": "bearer",
                   "description": "An API key of your tenant: `Authorization: Bearer <key>`."},
    }
    assert "/internal/reports" not in document["paths"]
    assert set(document["paths"]) >= {"/jobs", "/jobs/{job_id}", "/artifacts/{artifact_id}", "/healthz", "/readyz"}
    error_message = {"$ref": "#/components/schemas/ErrorMessage"}
    error_body = {"$ref": "#/components/schemas/ErrorBody"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            headers = [p["name"].lower() for p in operation.get("parameters", []) if p["in"] == "header"]
            assert "authorization" not in headers, where
            responses = operation["responses"]
            if not path.startswith(PROTECTED_PREFIXES):
                assert "security" not in operation and "401" not in responses and "422" not in responses, where
                continue
            assert operation["security"] == [{"ApiKey": []}], where
            assert responses["401"]["content"]["application/json"]["schema"] == error_message, where
            assert responses["422"]["content"]["application/json"]["schema"] == error_body, where
            if "{" in path:
                assert responses["404"]["content"]["application/json"]["schema"] == error_message, where
    assert document["paths"]["/readyz"]["get"]["responses"]["503"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Health"}


def test_the_documented_answers_are_the_real_ones(client, tmp_path):
    """The 401 a route documents is what it answers (the body is one `detail` string)."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'align.db'}", run_dispatcher=False)
    from services.db.session import upgrade

    upgrade(settings.database_url)
    with TestClient(create_app(settings)) as live:
        response = live.get("/jobs/job_x", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401 and set(response.json()) == {"detail"}
    assert response.headers["www-authenticate"] == "Bearer"
