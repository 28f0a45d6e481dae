"""A local stand-in for the Hub endpoints `HfApi.create_repo` and `HfApi.upload_folder` call. It records every
request, answers "regular" upload mode for each file (so contents travel base64-encoded in the commit
payload, no LFS) and keeps the committed files."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml


class HubStub:
    def __init__(self):
        self.requests: list[tuple[str, str, bytes]] = []
        self.created: list[dict] = []
        self.commits: list[dict] = []
        self.card_metadata: dict | None = None
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, payload: dict, status: int = 200):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                stub.requests.append(("GET", self.path, b""))
                self._reply({"error": "not found"}, 404)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                stub.requests.append(("POST", self.path, body))
                if self.path == "/api/repos/create":
                    request = json.loads(body)
                    stub.created.append({**request, "authorization": self.headers.get("authorization")})
                    repo = f"{request.get('organization') or 'user'}/{request['name']}"
                    return self._reply({"url": f"{stub.endpoint}/{repo}", "name": repo})
                if self.path == "/api/validate-yaml":
                    content = json.loads(body)["content"]
                    try:
                        stub.card_metadata = yaml.safe_load(content.split("---")[1])
                    except (IndexError, yaml.YAMLError) as exc:
                        return self._reply({"error": f"invalid YAML: {exc}"}, 400)
                    return self._reply({"warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self._reply(
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                    )
                if "/commit/" in self.path:
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    files = {}
                    for line in lines:
                        if line["key"] == "file":
                            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                    header = next(line["value"] for line in lines if line["key"] == "header")
                    stub.commits.append({"path": self.path, "header": header, "files": files})
                    repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                    return self._reply(
                        {
                            "commitUrl": f"{stub.endpoint}/{repo}/commit/0123abcd",
                            "commitOid": "0123abcd",
                            "pullRequestUrl": None,
                        }
                    )
                self._reply({"error": f"unexpected {self.path}"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
