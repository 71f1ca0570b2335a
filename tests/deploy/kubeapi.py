"""The part of a Kubernetes API server that Helm's ``lookup`` reads, for chart tests.

No cluster runs here, and ``lookup`` finds nothing under a plain ``helm template``; rendered with
``--dry-run=server`` against this server, a chart's ``lookup`` of a ConfigMap or Secret gets the
objects the test put here, as ``helm upgrade`` gets the live ones. Helm asks for the core group's
resource list, then GETs each object by name; everything else is 404.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

#: The core resources a chart here looks up: plural name -> kind.
RESOURCES = {"configmaps": "ConfigMap", "secrets": "Secret"}


def _resource_list() -> dict[str, Any]:
    return {
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            {"name": plural, "singularName": kind.lower(), "namespaced": True, "kind": kind}
            | {"verbs": ["get", "list"]}
            for plural, kind in RESOURCES.items()
        ],
    }


@contextmanager
def kube_api(objects: list[dict[str, Any]], tmp_path: Path) -> Iterator[Path]:
    """Serves ``objects`` (manifests with kind, metadata.name and metadata.namespace) on
    localhost while the block runs; yields a kubeconfig file pointing at it."""
    plural = {kind: name for name, kind in RESOURCES.items()}
    by_path = {
        f"/api/v1/namespaces/{o['metadata']['namespace']}/{plural[o['kind']]}/"
        f"{o['metadata']['name']}": o
        for o in objects
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            body = _resource_list() if path == "/api/v1" else by_path.get(path)
            status = 200 if body is not None else 404
            if body is None:
                body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}
                body["reason"] = "NotFound"
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # Every close's shutdown() waits for the loop's next look: 0.5 s apart by default.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        config = tmp_path / "kubeconfig"
        server_url = f"http://127.0.0.1:{server.server_address[1]}"
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "test", "cluster": {"server": server_url}}],
                    "users": [{"name": "test", "user": {}}],
                    "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
                    "current-context": "test",
                }
            )
        )
        yield config
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
