"""A team registry for tests: a private CA, htpasswd users, and a token service issuing scoped JWTs.

- `TestCA`: a CA made with `cryptography`; `issue()` writes a server certificate for 127.0.0.1 and
  localhost signed by it (the registry's TLS), or a signing certificate (the token service's key).
- `write_htpasswd`: bcrypt entries (Python `bcrypt`), the only hash distribution's htpasswd accepts.
- `TokenServer`: the distribution token spec's endpoint (GET realm?service=&scope=&account=, Basic
  credentials) over TLS. It signs ES256 JWTs with an `x5c` chain, which distribution 2.8 verifies
  against the `rootcertbundle` of its `auth: token:` config (the CA). Each user gets the actions
  `rights` lists (a read-only user: pull only, so the registry refuses its pushes with
  insufficient_scope, as docker_auth/Harbor/GitLab behave); `anonymous_pull` grants pull to requests
  without credentials. `lifetime` is how long a token is accepted: distribution adds a 60 s leeway to
  `exp`, so `exp` is set `lifetime - 60` s after issue.

These are test fixtures: the code under test only ever sees them over HTTPS, like a real team setup.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

DISTRIBUTION_LEEWAY_S = 60  # registry/auth/token/token.go: Leeway added to exp and nbf checks


@dataclass
class Issued:
    cert: Path
    key: Path
    der: bytes


class TestCA:
    """A self-signed CA in `root`, and certificates it signs."""

    __test__ = False  # not a pytest test class

    def __init__(self, root: Path, name: str = "ollama-ft test CA"):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(self._name).issuer_name(self._name)
                     .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self._key, hashes.SHA256()))
        self.pem = self.root / "ca.pem"
        self.pem.write_bytes(self._pem(self.cert))

    @staticmethod
    def _pem(cert) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, name: str, server: bool = True) -> Issued:
        """A certificate for `name` signed by this CA; a server one is valid for 127.0.0.1 and localhost."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
             .issuer_name(self._name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1)))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = b.sign(self._key, hashes.SHA256())
        cert_path, key_path = self.root / f"{name}.pem", self.root / f"{name}.key"
        cert_path.write_bytes(self._pem(cert))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return Issued(cert_path, key_path, cert.public_bytes(serialization.Encoding.DER))


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    import bcrypt

    lines = [f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=5)).decode()}" for u, p in users.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class TokenRequest:
    account: str | None  # the authenticated user (None: anonymous)
    scopes: list[str]
    granted: list[str]
    status: int


@dataclass
class TokenServer:
    ca: TestCA
    users: dict[str, str]  # user -> password
    rights: dict[str, tuple[str, ...]]  # user -> actions granted on every repository
    anonymous_pull: bool = False
    lifetime: float = 300.0
    service: str = "ollama-ft-test-registry"
    issuer: str = "ollama-ft-test-tokens"
    requests: list[TokenRequest] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    url: str = ""
    _server: ThreadingHTTPServer | None = None

    def start(self) -> TokenServer:
        """Serve on a free loopback port over TLS (the handler class closes over this server's state)."""
        import jwt

        signer = self.ca.issue("token-signer", server=False)
        tls = self.ca.issue("token-service")
        key = signer.key.read_bytes()
        x5c = [base64.b64encode(signer.der).decode()]
        ts = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):  # noqa: A002 - quiet
                pass

            def do_GET(self):  # noqa: N802 - http.server's name
                q = parse_qs(urlsplit(self.path).query)
                scopes = q.get("scope", [])
                account = ts._authenticate(self.headers.get("Authorization"))
                if account is False:
                    ts.requests.append(TokenRequest(None, scopes, [], 401))
                    self._send(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                               {"WWW-Authenticate": 'Basic realm="tokens"'})
                    return
                access = [a for a in (ts._grant(account, s) for s in scopes) if a]
                now = int(time.time())
                claims = {"iss": ts.issuer, "sub": account or "", "aud": q.get("service", [""])[0],
                          "iat": now, "nbf": now, "jti": uuid.uuid4().hex,
                          "exp": now + int(ts.lifetime) - DISTRIBUTION_LEEWAY_S, "access": access}
                token = jwt.encode(claims, key, algorithm="ES256", headers={"x5c": x5c})
                ts.tokens.append(token)
                ts.requests.append(TokenRequest(account, scopes, [f"{a['name']}:{','.join(a['actions'])}"
                                                                  for a in access], 200))
                self._send(200, {"token": token, "expires_in": int(ts.lifetime), "issued_at":
                                 dt.datetime.now(dt.timezone.utc).isoformat()})

            def _send(self, status, body, headers=None):
                data = json.dumps(body).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}/token"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def _authenticate(self, header: str | None) -> str | None | bool:
        """The user name, None for anonymous, False for wrong credentials."""
        if not header:
            return None
        try:
            user, _, password = base64.b64decode(header.split(" ", 1)[1]).decode().partition(":")
        except (ValueError, IndexError):
            return False
        return user if self.users.get(user) == password else False

    def _grant(self, account: str | None, scope: str) -> dict | None:
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        allowed = self.rights.get(account, ()) if account else (("pull",) if self.anonymous_pull else ())
        granted = [a for a in actions.split(",") if a in allowed]
        return {"type": kind, "name": name, "actions": granted} if kind == "repository" and granted else None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
