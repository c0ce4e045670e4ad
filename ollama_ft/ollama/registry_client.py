"""The OCI distribution API as publish/install use it: registry names, TLS, and one HTTP client.

The wire format is Ollama's (../shared/docs/ollama-contract.md §4.2, §5): a schema2 manifest
(`application/vnd.docker.distribution.manifest.v2+json`), Ollama's config blob and layers typed
`application/vnd.ollama.image.*`, pushed to `/v2/<namespace>/<model>/...` of any plain
distribution registry. The calls: HEAD blob, POST uploads/, PATCH chunks, GET upload status,
PUT ?digest=, PUT/GET manifest, GET blob.

Why httpx and not PyPI `oras`: oras-py builds and validates OCI image manifests
(`application/vnd.oci.image.manifest.v1+json`, checked against the OCI JSON schema) while Ollama
pulls with `Accept: ...manifest.v2+json` only, and its chunked upload cannot resume from the
registry's offset.

TLS: the system trust store (truststore: the OS's own verifier and CA list, so a team CA installed
with `update-ca-certificates` works), plus `--ca-cert FILE` when given. Plain HTTP only for
loopback registries unless `--insecure`. Authentication is registry_auth's httpx.Auth flow; a
401/403 it cannot get past becomes one error that says which of no credentials / wrong
credentials / no rights it was.
"""

from __future__ import annotations

import contextlib
import re
import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from ..core.errors import UserError
from ..core.names import parse_name
from .registry_auth import Credentials, RegistryAuth
from .store import MEDIA_MANIFEST, digest_bytes

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OLLAMA_MEDIA_PREFIX = "application/vnd.ollama.image."
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
DEFAULT_CHUNK_SIZE = 64 << 20  # resume granularity; one chunk is held by the socket, not in memory
STATE_FILE = ".publish-state.json"
READ_SIZE = 1 << 20

# Distribution's reference grammar: lower-case path components joined by '.', '_', '__' or '-'s.
_OCI_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_OCI_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


# -------------------------------------------------------------------------------------------
# Targets: where a model lives in a registry


@dataclass(frozen=True)
class Target:
    """`host[:port]/namespace/model:tag` in a registry, with the scheme to reach it."""

    host: str
    namespace: str
    model: str
    tag: str
    scheme: str

    @property
    def repository(self) -> str:
        return f"{self.namespace}/{self.model}"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def display(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"


def hostname_of(host: str) -> str:
    """`127.0.0.1:5000` -> `127.0.0.1`; `[::1]:5000` -> `::1`."""
    return urlsplit(f"//{host}").hostname or host


def is_loopback(host: str) -> bool:
    return hostname_of(host).lower() in LOOPBACK_HOSTS


def scheme_for(host: str, insecure: bool, tls: bool = False) -> str:
    """https, except plain HTTP for loopback registries or anywhere with --insecure; `tls` (a --ca-cert
    was given: the registry speaks TLS) keeps https for loopback too."""
    if tls:
        return "https"
    return "http" if insecure or is_loopback(host) else "https"


def _split_scheme(s: str, insecure: bool) -> tuple[str, str | None]:
    """`https://rest` / `http://rest` / `rest` -> (rest, the scheme written or None)."""
    s = s.strip()
    for scheme in ("https", "http"):
        if s.lower().startswith(f"{scheme}://"):
            rest = s[len(scheme) + 3:]
            if scheme == "http" and not insecure and not is_loopback(rest.split("/", 1)[0]):
                raise UserError(f"refusing plain HTTP to {rest.split('/', 1)[0]!r} (from {s!r})",
                                hint="only loopback registries use http by default; add --insecure to allow it")
            return rest, scheme
    return s, None


def parse_registry(registry: str, insecure: bool = False, tls: bool = False) -> tuple[str, str | None, str]:
    """`[https://]HOST[:PORT][/namespace]` -> (host, namespace or None, scheme)."""
    rest, scheme = _split_scheme(registry, insecure)
    rest = rest.strip("/")
    host, _, ns = rest.partition("/")
    if not host:
        raise UserError(f"invalid --registry {registry!r}: no host",
                        hint="write HOST:PORT[/namespace], e.g. 127.0.0.1:5000/team")
    if "/" in ns:
        raise UserError(f"invalid --registry {registry!r}: one namespace level only ({ns!r})",
                        hint="write HOST:PORT/namespace; the model name comes from the NAME argument")
    return host, (ns or None), scheme or scheme_for(host, insecure, tls)


def parse_ref(ref: str, insecure: bool = False, tls: bool = False) -> Target:
    """`[https://]HOST[:PORT]/namespace/model[:tag]` (as `install` takes it) -> Target, validated."""
    rest, scheme = _split_scheme(ref, insecure)
    parts = rest.split("/")
    if len(parts) != 3 or not all(parts):
        raise UserError(f"invalid reference {ref!r}: expected HOST:PORT/namespace/NAME[:TAG]",
                        hint="e.g. 127.0.0.1:5000/team/my-model:v1 (Ollama needs the namespace level too)")
    host, ns, model = parts
    tag = "latest"
    if ":" in model:
        model, _, tag = model.rpartition(":")
    t = Target(host, ns, model, tag, scheme or scheme_for(host, insecure, tls))
    validate_target(t)
    return t


def validate_target(t: Target) -> None:
    """Refuse, before any upload, a name the registry or Ollama would reject (all problems at once)."""
    problems = []
    model = t.model or "NAME"  # an empty model: check host, namespace and tag only (early, cheap)
    try:
        parse_name(f"{t.host}/{t.namespace}/{model}:{t.tag}")
    except UserError as e:
        problems.append(f"Ollama would reject it: {e.message}")
    for part, value in (("namespace", t.namespace), ("model", t.model or "name")):
        if not _OCI_COMPONENT.match(value):
            why = "upper case is not allowed" if value.lower() != value else \
                "only lower-case letters, digits and single '.', '_', '-' between them are allowed"
            problems.append(f"the registry would reject {part} {value!r}: {why}")
    if not _OCI_TAG.match(t.tag):
        problems.append(f"the registry would reject tag {t.tag!r}: 1-128 of letters, digits, '_', '.', '-', "
                        "not starting with '.' or '-'")
    if len(t.repository) > 255:
        problems.append(f"repository {t.repository!r} is longer than 255 characters")
    if problems:
        suggestion = f"{t.host}/{t.namespace.lower()}/{(t.model or 'NAME').lower()}:{t.tag}"
        shown = t.display if t.model else f"{t.host}/{t.namespace} (tag {t.tag})"
        raise UserError(f"invalid registry name {shown!r}", details=problems,
                        hint=f"use lower-case names, e.g. {suggestion!r}")


# -------------------------------------------------------------------------------------------
# How to reach a registry: credentials and TLS


@dataclass(frozen=True)
class RegistryAccess:
    """Everything about a connection that is not the target: credentials, trusted CA, plain HTTP allowed."""

    credentials: Credentials | None = None
    ca_cert: Path | None = None
    insecure: bool = False
    credentials_problem: UserError | None = None  # a credential helper that failed (told only if asked)


def tls_context(ca_cert: Path | None) -> ssl.SSLContext:
    """The system trust store, plus `ca_cert` (a PEM file of one or more CA certificates) when given."""
    import truststore

    ctx = truststore.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_cert is not None:
        path = Path(ca_cert).expanduser()
        if not path.is_file():
            raise UserError(f"CA certificate {ca_cert} (--ca-cert or publish.ca_cert): no such file",
                            hint="give the PEM file of the CA that signed the registry's certificate")
        try:
            ctx.load_verify_locations(cafile=str(path))
        except (ssl.SSLError, ValueError) as e:
            raise UserError(f"CA certificate {path}: not a PEM CA certificate ({e})",
                            hint="it should start with -----BEGIN CERTIFICATE-----; convert a DER file with "
                                 "`openssl x509 -inform der -in CA.der -out ca.pem`") from None
    return ctx


def http_client(access: RegistryAccess | None = None, timeout: float = 60.0, **kw: Any) -> httpx.Client:
    """The httpx client publish/install use (tests add event hooks through `kw`)."""
    access = access or RegistryAccess()
    return httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0), verify=tls_context(access.ca_cert), **kw)


# -------------------------------------------------------------------------------------------
# The distribution API


class RegistryClient:
    """The OCI distribution calls publish/install need, with errors the user can act on.

    `actions` is the token scope the operation needs: ("pull",) for install, ("pull", "push") for
    publish. A passed-in `client` keeps its own TLS settings (tests meter it with event hooks).
    """

    def __init__(self, base_url: str, repository: str, client: httpx.Client | None = None, *,
                 access: RegistryAccess | None = None, actions: tuple[str, ...] = ("pull",),
                 timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.repository = repository
        access = access or RegistryAccess()
        self._own = client is None
        self.http = client or http_client(access, timeout)
        u = httpx.URL(self.base_url)
        self.auth = RegistryAuth(access.credentials, repository, actions, (u.scheme, u.host, u.port),
                                 allow_http_realm=access.insecure, credentials_problem=access.credentials_problem)
        self.ca_cert = access.ca_cert

    def close(self) -> None:
        if self._own:
            self.http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, path: str) -> str:
        return f"{self.base_url}/v2/{self.repository}/{path}"

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        url = urljoin(self.base_url + "/", url)
        with self._errors(method, url):
            r = self.http.request(method, url, auth=self.auth, **kw)
        self._check_auth(r)
        return r

    @contextlib.contextmanager
    def _errors(self, method: str, url: str) -> Iterator[None]:
        """httpx transport errors -> one UserError naming the registry and what to do."""
        try:
            yield
        except httpx.ConnectError as e:
            raise self._connect_error(method, url, e) from None
        except httpx.TimeoutException as e:
            raise UserError(f"the registry at {self.base_url} timed out ({method} {url}): {e}",
                            hint="retry; an interrupted publish resumes where it stopped") from None
        except httpx.TransportError as e:
            raise UserError(f"connection to the registry at {self.base_url} failed ({method} {url}): {e}",
                            hint="retry; an interrupted publish resumes where it stopped") from None

    def _connect_error(self, method: str, url: str, e: httpx.ConnectError) -> UserError:
        text = str(e)
        host = httpx.URL(url).netloc.decode()
        if "CERTIFICATE_VERIFY_FAILED" in text:
            mismatch = "mismatch" in text.lower()
            what = ("is not valid for that name" if mismatch else
                    "is not trusted (signed by a CA this machine does not know)")
            hint = ("connect with the name the certificate was issued for" if mismatch else
                    "pass --ca-cert FILE (your team's CA certificate, PEM; publish.ca_cert in a run config), "
                    "or add the CA to the system store")
            if self.ca_cert is not None and not mismatch:
                hint = f"{self.ca_cert} did not sign it: get the CA certificate that did and pass it with --ca-cert"
            return UserError(f"the TLS certificate of {host} {what}: {text}", hint=hint)
        tls = "ssl" in text.lower() or "tls" in text.lower()
        return UserError(
            f"cannot reach the registry at {self.base_url} ({method} {url}): {e}",
            hint=(f"the registry may speak plain HTTP: write http://{host}/... (with --insecure unless it is "
                  "loopback) and drop --ca-cert" if tls else
                  "is it running? start one with `docker-registry serve CONFIG.yml` or "
                  "`docker run -p 5000:5000 registry:2`, and check --registry HOST:PORT"))

    def _check_auth(self, r: httpx.Response) -> None:
        if r.status_code in (401, 403):
            r.read()
            raise self.auth.explain(r, f"the registry at {self.base_url}")

    def fail(self, what: str, r: httpx.Response) -> UserError:
        body = r.text.strip().replace("\n", " ")[:300]
        return UserError(f"registry {self.base_url}: {what} failed: HTTP {r.status_code} {body}".rstrip(),
                         hint=f"request was {r.request.method} {r.request.url}")

    def ping(self) -> None:
        """GET /v2/: is this an OCI registry at all?"""
        r = self.request("GET", f"{self.base_url}/v2/")
        if r.status_code == 400 and "HTTPS server" in r.text:  # Go's answer to plain HTTP on a TLS port
            host = httpx.URL(self.base_url).netloc.decode()
            raise UserError(f"the registry at {host} speaks HTTPS, not plain HTTP",
                            hint=f"write https://{host}/... or pass --ca-cert FILE (loopback registries "
                                 "default to plain HTTP)")
        if r.status_code != 200:
            raise self.fail("GET /v2/ (API version check)", r)

    # -- blobs ------------------------------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        r = self.request("HEAD", self.url(f"blobs/{digest}"))
        if r.status_code == 200:
            return True
        if r.status_code == 404:
            return False
        raise self.fail(f"HEAD blob {digest}", r)

    def start_upload(self) -> str:
        r = self.request("POST", self.url("blobs/uploads/"))
        if r.status_code != 202:
            raise self.fail("opening an upload", r)
        return self._location(r)

    def upload_offset(self, location: str) -> tuple[int, str] | None:
        """Bytes the registry holds for a known upload, or None when it no longer knows it."""
        r = self.request("GET", location)
        if r.status_code in (404, 400, 410):
            return None
        if r.status_code not in (200, 204):
            raise self.fail("upload status", r)
        return _range_end(r.headers.get("Range")), self._location(r, default=location)

    def patch(self, location: str, start: int, body: Iterable[bytes], length: int) -> tuple[int, str]:
        """Send one chunk. `body` must be iterable again (not a generator): an expired token is
        refreshed by the auth flow and the same chunk is sent a second time."""
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(length),
            "Content-Range": f"{start}-{start + length - 1}",  # no "bytes " prefix (distribution's form)
        }
        r = self.request("PATCH", location, content=body, headers=headers)
        if r.status_code != 202:
            raise self.fail(f"uploading bytes {start}-{start + length - 1}", r)
        return _range_end(r.headers.get("Range"), start + length), self._location(r, default=location)

    def commit(self, location: str, digest: str) -> None:
        sep = "&" if "?" in location else "?"
        r = self.request("PUT", f"{location}{sep}digest={digest}", headers={"Content-Length": "0"})
        if r.status_code != 201:
            raise self.fail(f"committing blob {digest}", r)

    @contextlib.contextmanager
    def get_blob(self, digest: str) -> Iterator[httpx.Response]:
        url = urljoin(self.base_url + "/", self.url(f"blobs/{digest}"))
        try:
            with self.http.stream("GET", url, follow_redirects=True, auth=self.auth) as r:
                self._check_auth(r)
                if r.status_code != 200:
                    r.read()
                    raise self.fail(f"downloading blob {digest}", r)
                yield r
        except httpx.TransportError as e:
            raise UserError(f"download of {digest} from {self.base_url} failed: {e}",
                            hint="retry `ollama-ft install`; nothing was registered") from None

    # -- manifests --------------------------------------------------------------------------
    def put_manifest(self, tag: str, data: bytes, media_type: str = MEDIA_MANIFEST) -> str:
        r = self.request("PUT", self.url(f"manifests/{tag}"), content=data, headers={"Content-Type": media_type})
        if r.status_code not in (200, 201):
            raise self.fail(f"writing manifest {self.repository}:{tag}", r)
        return r.headers.get("Docker-Content-Digest") or digest_bytes(data)

    def get_manifest(self, tag: str) -> tuple[bytes, str]:
        r = self.request("GET", self.url(f"manifests/{tag}"),
                         headers={"Accept": f"{MEDIA_MANIFEST}, {MEDIA_OCI_MANIFEST};q=0.5"})
        if r.status_code == 404:
            raise UserError(f"{self.base_url}/{self.repository}:{tag} not found in the registry",
                            hint=f"list the tags with GET {self.url('tags/list')}; check the name and tag")
        if r.status_code != 200:
            raise self.fail(f"reading manifest {self.repository}:{tag}", r)
        return r.content, r.headers.get("Content-Type", "")

    def _location(self, r: httpx.Response, default: str | None = None) -> str:
        loc = r.headers.get("Docker-Upload-Location") or r.headers.get("Location") or default
        if not loc:
            raise self.fail("upload (no Location header)", r)
        return urljoin(str(r.request.url), loc)  # registries may answer with relative URLs


def _range_end(header: str | None, fallback: int | None = None) -> int:
    """`Range: 0-999` -> 1000 bytes held (`0-0` is what distribution says for an empty upload)."""
    if header:
        m = re.match(r"^(?:bytes=)?(\d+)-(\d+)$", header.strip())
        if m:
            end = int(m.group(2))
            # distribution answers `0-0` both for an empty upload and for one byte held
            return (1 if fallback == 1 else 0) if end == 0 else end + 1
    if fallback is None:
        raise UserError(f"registry answered an upload status without a usable Range header ({header!r})")
    return fallback





def registry_access(target: Target, username: str | None = None, password_stdin: bool = False,
                    ca_cert: Path | None = None, insecure: bool = False) -> RegistryAccess:
    """Credentials for the target's host (registry_auth's order) and the TLS settings, checked up front."""
    from ..core import ui
    from .registry_auth import HelperUnavailable, resolve_credentials

    if ca_cert is not None:
        tls_context(ca_cert)  # a missing or broken file fails here, before the model is read
    problem = None
    try:
        creds = resolve_credentials(target.host, username, password_stdin)
    except HelperUnavailable as e:
        # docker's config names a helper that cannot answer (a Docker Desktop config on a server, a locked
        # keychain): a registry that needs no login must still work, so this stops only a login.
        creds, problem = None, e
        ui.warn(f"{e.message}; going on without credentials")
    if creds is not None and target.scheme == "http" and not is_loopback(target.host):
        ui.warn(f"--insecure: the password of {creds.who} would cross the network to {target.host} unencrypted")
    return RegistryAccess(creds, ca_cert, insecure, problem)
