"""A real OCI registry for tests: Debian's `docker-registry` (distribution 2.8) on 127.0.0.1.

`start_registry(dir)` runs `docker-registry serve CONFIG.yml` on a free loopback port with
filesystem storage under `dir`, waits until `GET /v2/` answers 200 and returns a handle whose
`stop()` ends exactly that process. The `oci_registry` fixture wraps it per test; it skips with
the reason when the binary is absent (CI installs it: `apt-get install -y docker-registry`).
`start_registry(..., tls=, htpasswd=, token=)` adds a team's setup: TLS from a test CA, htpasswd
users, or the token auth of a TokenServer (tests/registry_secure.py).
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

BINARY = "docker-registry"

_CONFIG = """\
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  # A fixed secret keeps upload URLs (their signed _state) valid across a registry restart.
  secret: ollama-ft-test-secret
"""

_TLS = """\
  tls:
    certificate: {cert}
    key: {key}
"""

_HTPASSWD = """\
auth:
  htpasswd:
    realm: ollama-ft-test
    path: {path}
"""

_TOKEN = """\
auth:
  token:
    realm: {realm}
    service: {service}
    issuer: {issuer}
    rootcertbundle: {bundle}
"""


@dataclass
class RegistryServer:
    """One running registry process."""

    host: str  # "127.0.0.1:PORT", the form `--registry` takes
    url: str  # "http://127.0.0.1:PORT" (https with tls)
    root: Path  # storage directory
    proc: subprocess.Popen
    log_path: Path
    ca_pem: Path | None = None  # the CA that signed its TLS certificate

    def stored_blobs(self) -> list[str]:
        """Digests of every blob in its storage (what was uploaded, whatever the auth says)."""
        d = self.root / "docker" / "registry" / "v2" / "blobs" / "sha256"
        return sorted(p.parent.name for p in d.glob("*/*/data")) if d.is_dir() else []

    def repositories(self) -> list[str]:
        d = self.root / "docker" / "registry" / "v2" / "repositories"
        return sorted(str(p.relative_to(d)) for p in d.glob("*/*")) if d.is_dir() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_registry(workdir: Path, timeout: float = 20.0, *, tls=None, htpasswd: Path | None = None,
                   token=None) -> RegistryServer:
    """Start a registry with storage under `workdir`; wait until GET /v2/ answers (200, or 401 with auth).

    tls: a TestCA (the registry gets a certificate it signs); htpasswd: a bcrypt htpasswd file;
    token: a started TokenServer (the registry trusts tokens signed under its CA).
    """
    binary = shutil.which(BINARY)
    if binary is None:
        raise FileNotFoundError(BINARY)
    workdir = Path(workdir)
    root = workdir / "storage"
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = workdir / "config.yml"
    text = _CONFIG.format(root=root, port=port)
    if tls is not None:
        issued = tls.issue("registry")
        text += _TLS.format(cert=issued.cert, key=issued.key)
    if htpasswd is not None:
        text += _HTPASSWD.format(path=htpasswd)
    if token is not None:
        text += _TOKEN.format(realm=token.url, service=token.service, issuer=token.issuer, bundle=token.ca.pem)
    cfg.write_text(text)
    log_path = workdir / "registry.log"
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen([binary, "serve", str(cfg)], stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    scheme = "https" if tls is not None else "http"
    server = RegistryServer(f"127.0.0.1:{port}", f"{scheme}://127.0.0.1:{port}", root, proc, log_path,
                            tls.pem if tls is not None else None)
    ready = (200, 401) if (htpasswd or token) else (200,)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{BINARY} exited with {proc.returncode}:\n{server.log()}")
        try:
            verify = ssl.create_default_context(cafile=str(server.ca_pem)) if server.ca_pem else True
            if httpx.get(f"{server.url}/v2/", timeout=1.0, verify=verify).status_code in ready:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{BINARY} did not answer GET /v2/ within {timeout}s:\n{server.log()}")
        time.sleep(0.1)


@pytest.fixture(name="oci_registry")
def oci_registry_fixture(tmp_path_factory):
    """A fresh registry per test, stopped at teardown."""
    if shutil.which(BINARY) is None:
        pytest.skip(f"`{BINARY}` not installed (Debian: apt-get install -y docker-registry)")
    server = start_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield server
    finally:
        server.stop()


class HoldingProxy:
    """A reverse proxy in front of a registry that counts forwarded PATCH bytes and can hold PATCHes.

    With `hold_after = N`, the (N+1)-th PATCH is neither read nor forwarded: `held` is set and
    the request waits until `release` is set, then the connection is dropped. A client killed
    meanwhile dies mid-upload, with the registry holding exactly the first N chunks.
    """

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.url = ""
        self.hold_after: int | None = None
        self.patches = 0
        self.patch_bytes = 0
        self.held = threading.Event()
        self.release = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> HoldingProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002 - quiet
                pass

            def _forward(self) -> None:
                method = self.command
                if method == "PATCH" and proxy.hold_after is not None and proxy.patches >= proxy.hold_after:
                    proxy.held.set()
                    proxy.release.wait(60)
                    self.close_connection = True
                    return
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection", "transfer-encoding")}
                r = httpx.request(method, proxy.upstream + self.path, content=body, headers=headers, timeout=30)
                if method == "PATCH" and r.status_code == 202:
                    proxy.patches += 1
                    proxy.patch_bytes += len(body)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        continue
                    self.send_header(k, v.replace(proxy.upstream, proxy.url))
                length = r.headers.get("Content-Length") if method == "HEAD" else str(len(r.content))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(r.content)

            do_GET = do_HEAD = do_POST = do_PATCH = do_PUT = do_DELETE = _forward  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://")

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
