"""publish / install against a team's registry: TLS from a private CA, htpasswd users, bearer tokens.

Debian's docker-registry (distribution 2.8) runs with TLS from a CA each test makes, and either
htpasswd (bcrypt) basic auth or the token auth of a token service the test runs
(tests/registry_secure.py), which grants push to `alice` and pull only to `reader`. "Uploaded
nothing" is read from the registry's storage directory, whatever its API would say.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from ollama_ft.core.errors import UserError
from ollama_ft.ollama import registry_auth as A
from ollama_ft.ollama.registry_client import RegistryAccess, Target, http_client
from ollama_ft.ollama.registry_pull import install_command
from ollama_ft.ollama.registry_push import publish_command, push
from ollama_ft.ollama.registry_source import resolve_source
from ollama_ft.ollama.store import MEDIA_MANIFEST, Store
from tests.registry_secure import TestCA, TokenServer, write_htpasswd
from tests.registry_server import BINARY, oci_registry_fixture, start_registry  # noqa: F401 - `oci_registry`
from tests.test_registry import Meter, make_run, make_store_model, sha

GOOD = "correct horse 7Q!battery"  # alice's password: grepped for in every output and file
WRONG = "not-alice-pw-3x"
READER_PW = "reader-only-9k"


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch, tmp_path):
    """No credentials leak in from the machine running the tests (its env or ~/.docker)."""
    for k in (A.ENV_USER, A.ENV_PASSWORD, "OLLAMA_FT_REGISTRY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))


@pytest.fixture
def team_ca(tmp_path_factory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("team-ca"))


def _registry_binary() -> None:
    if shutil.which(BINARY) is None:
        pytest.skip(f"`{BINARY}` not installed (Debian: apt-get install -y docker-registry)")


@pytest.fixture
def basic_registry(tmp_path_factory, team_ca):
    """TLS + htpasswd: alice / GOOD."""
    _registry_binary()
    d = tmp_path_factory.mktemp("basic-registry")
    server = start_registry(d, tls=team_ca, htpasswd=write_htpasswd(d / "htpasswd", {"alice": GOOD}))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def token_registry(tmp_path_factory, team_ca):
    """TLS + token auth: alice may push, reader may pull, anonymous may pull."""
    _registry_binary()
    tokens = TokenServer(team_ca, users={"alice": GOOD, "reader": READER_PW},
                         rights={"alice": ("pull", "push"), "reader": ("pull",)}, anonymous_pull=True).start()
    server = start_registry(tmp_path_factory.mktemp("token-registry"), tls=team_ca, token=tokens)
    server.tokens = tokens
    try:
        yield server
    finally:
        server.stop()
        tokens.stop()


def as_alice(**kw) -> RegistryAccess:
    return RegistryAccess(A.Credentials("alice", GOOD, "test"), **kw)


def cli(args: list[str], home: Path, *, stdin: str | None = None, env: dict | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`ollama-ft ARGS` as a user on a machine whose home is `home` (its own ~/.docker, cache, tmp)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_FT_REGISTRY", "DOCKER_CONFIG"))}
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    e.update(HOME=str(home), OLLAMA_FT_CACHE=str(home / "cache"), TMPDIR=str(home / "tmp"), **(env or {}))
    return subprocess.run([sys.executable, "-m", "ollama_ft", *args], input=stdin, capture_output=True,
                          text=True, timeout=180, env=e, cwd=cwd or home)


def docker_login(home: Path, host: str, user: str, password: str) -> Path:
    """What `docker login HOST` leaves in ~/.docker/config.json."""
    p = home / ".docker" / "config.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    p.write_text(json.dumps({"auths": {f"https://{host}": {"auth": auth}}}))
    return p


def assert_one_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in p.stderr, (n, p.stderr)


# -------------------------------------------------------------------------------------------
# Pieces (no registry)


def test_challenges_are_parsed_with_quoted_commas():
    r = httpx.Response(401, headers=[
        ("WWW-Authenticate", 'Bearer realm="https://auth.example/token",service="reg",'
                             'scope="repository:team/demo:pull,push",error="insufficient_scope"'),
        ("WWW-Authenticate", 'Basic realm="Registry Realm"')])
    bearer, basic = A.parse_challenges(r)
    assert bearer.scheme == "bearer" and bearer.params == {
        "realm": "https://auth.example/token", "service": "reg", "scope": "repository:team/demo:pull,push",
        "error": "insufficient_scope"}
    assert basic == A.Challenge("basic", {"realm": "Registry Realm"})
    assert A.parse_challenges(httpx.Response(401)) == []


def test_credentials_are_found_in_the_stated_order(tmp_path):
    host = "reg.example:5000"
    cfg = docker_login(tmp_path, host, "dora", "docker-pw")
    env = {A.ENV_USER: "erin", A.ENV_PASSWORD: "env-pw"}
    c = A.resolve_credentials(host, "uma", True, stdin=io.StringIO("stdin-pw\n"), environ=env, docker_config=cfg)
    assert (c.username, c.password, c.source) == ("uma", "stdin-pw", "--username")
    c = A.resolve_credentials(host, environ=env, docker_config=cfg)
    assert (c.username, c.password) == ("erin", "env-pw") and "env-pw" not in repr(c)
    c = A.resolve_credentials(host, environ={}, docker_config=cfg)
    assert (c.username, c.password) == ("dora", "docker-pw") and str(cfg) in c.source
    assert A.resolve_credentials("other.example", environ={}, docker_config=cfg) is None
    for key in ("reg.example:5000", "http://reg.example:5000", "https://reg.example:5000/v2/"):
        cfg.write_text(json.dumps({"auths": {key: {"auth": base64.b64encode(b"k:pw").decode()}}}))
        assert A.resolve_credentials(host, environ={}, docker_config=cfg).username == "k", key


def fake_credential_helper(bindir: Path, name: str, store: dict[str, tuple[str, str]], *,
                           exit_status: int | None = None, leak: bool = False) -> dict[str, str]:
    """A `docker-credential-NAME` program speaking the docker-credential-helpers protocol on `store`
    (host -> (user, secret)); returns an environment with it on PATH."""
    bindir.mkdir(parents=True, exist_ok=True)
    prog = bindir / f"docker-credential-{name}"
    prog.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, sys
        store = {json.dumps({h: {"Username": u, "Secret": p} for h, (u, p) in store.items()})!r}
        assert sys.argv[1:] == ["get"], sys.argv
        host = sys.stdin.read().strip()
        status = {exit_status!r}
        entry = json.loads(store).get(host)
        if {leak!r}:  # a wrapper that prints the answer, then fails: the secret is on stdout and stderr
            print(json.dumps({{"ServerURL": host, **entry}}))
            print("failed after " + json.dumps(entry), file=sys.stderr); sys.exit(1)
        if status is not None:
            print("keychain is locked", file=sys.stderr); sys.exit(status)
        if entry is None:
            print("credentials not found in native keychain"); sys.exit(1)
        print(json.dumps({{"ServerURL": host, **entry}}))
        """))
    prog.chmod(0o755)
    return {"PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_docker_credential_helpers_are_asked_as_docker_asks_them(tmp_path):
    host = "reg.example:5000"
    env = fake_credential_helper(tmp_path / "bin", "fake", {host: ("helga", "helper-pw")})
    fake_credential_helper(tmp_path / "bin", "other", {host: ("otto", "other-pw")})
    cfg = tmp_path / "config.json"
    file_auth = {"auths": {host: {"auth": base64.b64encode(b"dora:file-pw").decode()}}}
    cfg.write_text(json.dumps({**file_auth, "credsStore": "fake"}))  # the store wins over auths
    c = A.resolve_credentials(host, environ=env, docker_config=cfg)
    assert (c.username, c.password) == ("helga", "helper-pw") and "docker-credential-fake" in c.source
    assert "helper-pw" not in repr(c)
    cfg.write_text(json.dumps({**file_auth, "credsStore": "fake", "credHelpers": {f"https://{host}": "other"}}))
    assert A.resolve_credentials(host, environ=env, docker_config=cfg).username == "otto"  # per-host first
    assert A.resolve_credentials("elsewhere:5000", environ=env, docker_config=cfg) is None  # "not found"

    cfg.write_text(json.dumps({"credsStore": "missing"}))
    with pytest.raises(UserError, match="docker-credential-missing is not on PATH"):
        A.resolve_credentials(host, environ=env, docker_config=cfg)
    locked = fake_credential_helper(tmp_path / "bin2", "locked", {}, exit_status=3)
    cfg.write_text(json.dumps({"credsStore": "locked"}))
    with pytest.raises(A.HelperUnavailable, match=r"docker-credential-locked get failed .*exit status 3: keychain is locked"):
        A.resolve_credentials(host, environ=locked, docker_config=cfg)
    leaky = fake_credential_helper(tmp_path / "bin3", "leaky", {host: ("lea", "LEAKED-pw")}, leak=True)
    cfg.write_text(json.dumps({"credsStore": "leaky"}))
    with pytest.raises(A.HelperUnavailable) as e:
        A.resolve_credentials(host, environ=leaky, docker_config=cfg)
    assert "LEAKED-pw" not in e.value.message + e.value.hint and "exit status 1" in e.value.message
    noexec = tmp_path / "bin4"
    noexec.mkdir()
    (noexec / "docker-credential-noexec").write_text("#!/bin/sh\n")  # on PATH, not executable
    cfg.write_text(json.dumps({"credsStore": "noexec"}))
    with pytest.raises(A.HelperUnavailable, match="docker-credential-noexec cannot be run"):
        A.resolve_credentials(host, environ={"PATH": str(noexec)}, docker_config=cfg)


def test_credential_mistakes_are_clear_and_never_echo_the_password(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {"reg.example": {"auth": "bm9jb2xvbg==" + "%"}}}))  # not base64
    with pytest.raises(UserError, match="not base64 of `user:password`") as e:
        A.resolve_credentials("reg.example", environ={}, docker_config=cfg)
    assert "bm9jb2xvbg" not in str(e.value)
    with pytest.raises(UserError, match=f"\\${A.ENV_PASSWORD} is not set"):
        A.resolve_credentials("reg.example", environ={A.ENV_USER: "erin"})
    with pytest.raises(UserError, match="--password-stdin needs --username"):
        A.resolve_credentials("reg.example", None, True, environ={})
    with pytest.raises(UserError, match="held no password"):
        A.resolve_credentials("reg.example", "uma", True, stdin=io.StringIO(""), environ={})


def test_a_403_a_refused_token_and_a_bad_ca_file_have_their_own_messages(tmp_path):
    """A registry (or the proxy in front of it) that answers 403 to a write: no push rights."""
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(403, json={"errors": [{"code": "DENIED"}]})
        return httpx.Response(200 if request.url.path == "/v2/" else 404)

    make_store_model(tmp_path / "src")
    client = httpx.Client(transport=httpx.MockTransport(handler))
    with pytest.raises(UserError, match="denied user 'alice' .*push rights on team/demo") as e:
        push(resolve_source("demo", tmp_path / "src"), Target("reg.example", "team", "demo", "v1", "https"),
             client=client, access=as_alice())
    assert "namespace you may write" in e.value.hint
    # A token service that issues tokens the registry then refuses: not a password problem.
    def refuses_tokens(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            return httpx.Response(200, json={"token": "t"})
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="https://reg.example/token",'
                                                                'service="reg",error="invalid_token"'})

    with pytest.raises(UserError, match="refused a fresh token from https://reg.example/token") as e:
        push(resolve_source("demo", tmp_path / "src"), Target("reg.example", "team", "demo", "v1", "https"),
             client=httpx.Client(transport=httpx.MockTransport(refuses_tokens)), access=as_alice())
    assert "clock skew" in e.value.hint
    with pytest.raises(UserError, match="no such file"):
        publish_command("demo", "reg.example/team", store=tmp_path / "src", ca_cert=tmp_path / "none.pem")
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(UserError, match="not a PEM CA certificate"):
        install_command("reg.example/team/demo:v1", store=tmp_path / "m", ca_cert=tmp_path / "bad.pem")


# -------------------------------------------------------------------------------------------
# htpasswd + TLS


def test_publish_with_good_credentials_then_install_on_a_second_machine(basic_registry, team_ca, tmp_path):
    laptop, other = tmp_path / "laptop", tmp_path / "other"
    src = make_store_model(laptop / "models")
    p = cli(["publish", "demo", "--registry", f"{basic_registry.host}/team", "--tag", "v1", "--store",
             str(laptop / "models"), "--username", "alice", "--password-stdin", "--ca-cert", str(team_ca.pem)],
            laptop, stdin=GOOD + "\n")
    assert p.returncode == 0, p.stderr
    assert f"ollama-ft install {basic_registry.host}/team/demo:v1 --ca-cert {team_ca.pem}" in p.stdout
    _, local = src.read_manifest("demo:latest")
    r = httpx.get(f"{basic_registry.url}/v2/team/demo/manifests/v1", headers={"Accept": MEDIA_MANIFEST},
                  auth=("alice", GOOD), verify=ssl.create_default_context(cafile=str(team_ca.pem)))
    assert r.status_code == 200 and r.content == local
    m = json.loads(local)
    pushed = {d["digest"][7:] for d in [*m["layers"], m["config"]]} | {sha(local)[7:]}  # manifests are blobs too
    assert set(basic_registry.stored_blobs()) == pushed

    # The other machine logged in with `docker login` (~/.docker/config.json) and has its own store.
    docker_login(other, basic_registry.host, "alice", GOOD)
    p = cli(["install", f"{basic_registry.host}/team/demo:v1", "--store", str(other / "models"),
             "--ca-cert", str(team_ca.pem)], other)
    assert p.returncode == 0, p.stderr
    assert (other / "models/manifests/registry.ollama.ai/library/demo/v1").read_bytes() == local
    assert Store(other / "models").list_models()[0].display == "demo:v1"


def test_install_with_credentials_from_a_docker_credential_helper(basic_registry, team_ca, tmp_path):
    """A colleague whose `docker login` went to a credential store (Docker Desktop, pass): install finds
    the password through the helper, and neither its answer nor the password is printed."""
    laptop, other = tmp_path / "laptop", tmp_path / "other"
    make_store_model(laptop / "models")
    p = cli(["publish", "demo", "--registry", f"{basic_registry.host}/team", "--tag", "v1", "--store",
             str(laptop / "models"), "--username", "alice", "--password-stdin", "--ca-cert", str(team_ca.pem)],
            laptop, stdin=GOOD + "\n")
    assert p.returncode == 0, p.stderr
    env = fake_credential_helper(other / "bin", "desktop", {basic_registry.host: ("alice", GOOD)})
    (other / ".docker").mkdir(parents=True)
    (other / ".docker" / "config.json").write_text(json.dumps({"auths": {basic_registry.host: {}},
                                                                "credsStore": "desktop"}))
    p = cli(["install", f"{basic_registry.host}/team/demo:v1", "--store", str(other / "models"),
             "--ca-cert", str(team_ca.pem)], other, env=env)
    assert p.returncode == 0, p.stderr
    assert Store(other / "models").list_models()[0].display == "demo:v1"
    assert GOOD not in p.stdout + p.stderr


def test_a_broken_credential_helper_stops_only_a_login(basic_registry, oci_registry, team_ca, tmp_path):
    """A Docker Desktop config on a machine without the helper: an open registry still works (a warning),
    a registry that asks for a login is refused with the helper's problem as the reason."""
    home = tmp_path / "server"
    make_store_model(home / "models")
    (home / ".docker").mkdir(parents=True)
    (home / ".docker" / "config.json").write_text(json.dumps({"credsStore": "desktop"}))
    env = {"PATH": os.environ["PATH"]}  # no docker-credential-desktop on it
    p = cli(["publish", "demo", "--registry", f"{oci_registry.host}/team", "--store", str(home / "models")],
            home, env=env)
    assert p.returncode == 0, p.stderr
    assert "docker-credential-desktop is not on PATH; going on without credentials" in " ".join(p.stderr.split())
    before = basic_registry.stored_blobs()
    p = cli(["publish", "demo", "--registry", f"{basic_registry.host}/team", "--store", str(home / "models"),
             "--ca-cert", str(team_ca.pem)], home, env=env)
    assert_one_error(p, "requires a login", "the credentials could not be read", "docker-credential-desktop")
    assert basic_registry.stored_blobs() == before  # nothing uploaded


def test_password_prompt_on_a_terminal_is_not_echoed(basic_registry, team_ca, tmp_path):
    """--username without --password-stdin asks on the controlling terminal (getpass), echo off."""
    import fcntl
    import pty
    import select
    import termios

    make_store_model(tmp_path / "models")
    master, slave = pty.openpty()
    e = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_FT_REGISTRY", "DOCKER_CONFIG"))}
    e.update(DOCKER_CONFIG=str(tmp_path / "none"), OLLAMA_FT_CACHE=str(tmp_path / "cache"), COLUMNS="200")

    def controlling_tty() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "ollama_ft", "publish", "demo", "--registry", f"{basic_registry.host}/team",
         "--store", str(tmp_path / "models"), "--username", "alice", "--ca-cert", str(team_ca.pem)],
        stdin=slave, stdout=slave, stderr=slave, env=e, start_new_session=True, preexec_fn=controlling_tty)
    os.close(slave)
    seen, answered = b"", False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        if not answered and b"password for alice at" in seen:
            os.write(master, (GOOD + "\n").encode())
            answered = True
        if proc.poll() is not None and not ready:
            break
    proc.wait(timeout=30)
    os.close(master)
    text = seen.decode(errors="replace")
    assert proc.returncode == 0, text
    assert f"password for alice at {basic_registry.host}: " in text and "published" in text
    assert GOOD not in text  # no echo


def test_wrong_password_no_credentials_and_untrusted_certificate_fail_apart(basic_registry, team_ca, tmp_path):
    home = tmp_path / "home"
    make_store_model(home / "models")
    base = ["publish", "demo", "--registry", f"{basic_registry.host}/team", "--store", str(home / "models")]
    ca = ["--ca-cert", str(team_ca.pem)]
    wrong = cli([*base, *ca, "--username", "alice", "--password-stdin"], home, stdin=WRONG + "\n")
    assert_one_error(wrong, "refused the credentials of user 'alice' (from --username)",
                     "wrong user name or password")
    nobody = cli([*base, *ca], home)
    assert_one_error(nobody, "requires a login to push to team/demo, and no credentials were found",
                     A.ENV_USER, "docker login")
    https = ["publish", "demo", "--registry", f"https://{basic_registry.host}/team", "--store", str(home / "models")]
    untrusted = cli([*https, "--username", "alice", "--password-stdin"], home, stdin=GOOD + "\n")
    assert_one_error(untrusted, f"the TLS certificate of {basic_registry.host} is not trusted", "--ca-cert FILE")
    plain = cli(base, home)  # loopback defaults to plain HTTP: the registry's TLS port says so
    assert_one_error(plain, f"the registry at {basic_registry.host} speaks HTTPS", f"https://{basic_registry.host}")
    other_ca = TestCA(tmp_path / "other-ca", "someone else's CA")
    wrong_ca = cli([*base, "--ca-cert", str(other_ca.pem)], home, env={A.ENV_USER: "alice", A.ENV_PASSWORD: GOOD})
    assert_one_error(wrong_ca, f"{other_ca.pem} did not sign it")
    install = cli(["install", f"{basic_registry.host}/team/demo:v1", "--store", str(home / "dest"), *ca], home)
    assert_one_error(install, "requires a login to pull team/demo")
    assert basic_registry.stored_blobs() == [] and basic_registry.repositories() == []
    assert not (home / "dest" / "manifests").exists()


# -------------------------------------------------------------------------------------------
# Token service


def test_read_only_user_cannot_push_and_uploads_nothing_but_can_install(token_registry, team_ca, tmp_path,
                                                                          monkeypatch):
    make_store_model(tmp_path / "src")
    source = resolve_source("demo", tmp_path / "src")
    target = Target(token_registry.host, "team", "demo", "v1", "https")
    reader = RegistryAccess(A.Credentials("reader", READER_PW, "test"), ca_cert=team_ca.pem)
    meter = Meter()
    with pytest.raises(UserError, match="denied user 'reader' \\(from test\\) push rights on team/demo") as e:
        push(source, target, access=reader, client=http_client(reader, event_hooks={"request": [meter.hook]}))
    assert "ask the registry's admin for push access" in e.value.hint
    assert token_registry.stored_blobs() == [] and "PATCH" not in meter.methods
    asked = token_registry.tokens.requests[-1]
    assert asked.account == "reader" and asked.scopes == ["repository:team/demo:pull,push"]
    assert asked.granted == ["team/demo:pull"]

    wrong = RegistryAccess(A.Credentials("alice", WRONG, "test"), ca_cert=team_ca.pem)
    with pytest.raises(UserError, match=f"the token service {token_registry.tokens.url} refused the credentials "
                                        "of user 'alice'"):
        push(source, target, access=wrong)
    assert token_registry.stored_blobs() == []
    push(source, target, access=as_alice(ca_cert=team_ca.pem))  # alice may
    assert set(token_registry.stored_blobs()) == {b.digest[7:] for b in source.blobs} | {sha(source.manifest)[7:]}
    monkeypatch.setattr(sys, "stdin", io.StringIO(READER_PW + "\n"))
    info = install_command(f"{token_registry.host}/team/demo:v1", store=tmp_path / "m", username="reader",
                           password_stdin=True, ca_cert=team_ca.pem)
    assert info["model"] == "demo:v1"
    assert token_registry.tokens.requests[-1].scopes == ["repository:team/demo:pull"]  # install asks for pull only


def test_registry_that_asks_for_a_login_only_to_push(token_registry, team_ca, tmp_path):
    """Anonymous pull is allowed (the token service grants it); push needs a user."""
    make_store_model(tmp_path / "src")
    push(resolve_source("demo", tmp_path / "src"), Target(token_registry.host, "team", "demo", "v1", "https"),
         access=as_alice(ca_cert=team_ca.pem))
    blobs = token_registry.stored_blobs()
    info = install_command(f"{token_registry.host}/team/demo:v1", store=tmp_path / "m", ca_cert=team_ca.pem)
    assert info["model"] == "demo:v1" and token_registry.tokens.requests[-1].account is None
    make_store_model(tmp_path / "src2", sizes=(1000, 2000))
    with pytest.raises(UserError, match="requires a login to push to team/other, and no credentials"):
        push(resolve_source("demo", tmp_path / "src2"), Target(token_registry.host, "team", "other", "v1", "https"),
             access=RegistryAccess(ca_cert=team_ca.pem))
    assert token_registry.stored_blobs() == blobs  # nothing new


def test_token_expiring_mid_upload_is_refreshed_once_and_the_chunk_resent(token_registry, team_ca, tmp_path):
    lifetime = 3.0
    token_registry.tokens.lifetime = lifetime
    chunk = 32 << 10
    make_store_model(tmp_path / "src", sizes=(300_000, 100_000))
    source = resolve_source("demo", tmp_path / "src")
    patches: list[int] = []

    def slow(request: httpx.Request) -> None:
        if request.method == "PATCH":
            patches.append(int(request.headers["Content-Length"]))
            if len(patches) == 3:
                time.sleep(lifetime + 1.5)  # the token expires while this chunk waits

    access = as_alice(ca_cert=team_ca.pem)
    digest, stats = push(source, Target(token_registry.host, "team", "demo", "v1", "https"), access=access,
                         client=http_client(access, event_hooks={"request": [slow]}), chunk_size=chunk)
    chunks = sum(-(-b.size // chunk) for b in source.blobs)
    assert stats.token_refreshes == 1
    assert len(patches) == chunks + 1  # the third chunk went twice: refused with the old token, then accepted
    assert stats.bytes_sent == source.total_bytes  # ... and is counted once
    assert digest == sha(source.manifest)
    assert set(token_registry.stored_blobs()) == {b.digest[7:] for b in source.blobs} | {digest[7:]}
    alice = [r for r in token_registry.tokens.requests if r.account == "alice"]
    assert len(alice) == 2 and all(r.granted == ["team/demo:pull,push"] for r in alice)
    print(f"\ntoken refresh: {chunks} chunks of {chunk} B, token lifetime {lifetime:.0f} s, "
          f"{len(patches)} PATCHes (1 resent after 1 refresh), {stats.bytes_sent} B counted")


def test_real_ollama_installs_from_the_team_registry(real_ollama, basic_registry, team_ca, tiny_gguf, tmp_path):
    """A run published with credentials over TLS; the real Ollama on another machine gets it via install."""
    make_run(tmp_path / "runs", tiny_gguf)
    creds = {A.ENV_USER: "alice", A.ENV_PASSWORD: GOOD}
    p = cli(["publish", "demo", "--registry", f"{basic_registry.host}/team", "--tag", "v1", "--ca-cert",
             str(team_ca.pem)], tmp_path / "laptop", env=creds, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    p = cli(["install", f"{basic_registry.host}/team/demo:v1", "--host", real_ollama.host, "--ca-cert",
             str(team_ca.pem), "--name", "team-demo:v1"], tmp_path / "desktop", env=creds)
    assert p.returncode == 0, p.stderr
    show = httpx.post(f"{real_ollama.host}/api/show", json={"model": "team-demo:v1"}, timeout=60).json()
    assert show["system"] == "You answer briefly." and "temperature" in show["parameters"]
    assert show["template"].startswith("{{- range .Messages }}")


# -------------------------------------------------------------------------------------------
# Secrets


def _secret_forms(*passwords: str, users=("alice", "reader")) -> list[str]:
    """A password as it could leak: plain, base64 alone, and inside a Basic header."""
    out = []
    for pw in passwords:
        out += [pw, base64.b64encode(pw.encode()).decode()]
        out += [base64.b64encode(f"{u}:{pw}".encode()).decode() for u in users]
    return out


def test_no_command_leaks_a_password_or_token(basic_registry, token_registry, team_ca, fake_ollama, tiny_gguf,
                                              tmp_path, monkeypatch, capfd):
    """Every command, with the password from stdin, the environment and docker's config, succeeding and
    failing (and one internal crash): no password or token in any output or in any file ollama-ft wrote
    (run manifest, run.yaml, config.resolved.json, upload state, stores, crash logs under the cache).

    One long test on purpose: the grep at the end must see every command's output and files together.
    """
    from ollama_ft.core.config import load_config

    laptop, desk = tmp_path / "laptop", tmp_path / "desk"
    make_store_model(laptop / "models")
    run = make_run(laptop / "runs", tiny_gguf)
    load_config(None, [f"publish.registry={basic_registry.host}/team", f"publish.ca_cert={team_ca.pem}"]).save(run.root)
    ca = ["--ca-cert", str(team_ca.pem)]
    env_alice = {A.ENV_USER: "alice", A.ENV_PASSWORD: GOOD}
    login = docker_login(desk, basic_registry.host, "alice", GOOD)
    tok = token_registry.host
    runs = [
        (["publish", "demo", "--registry", f"{basic_registry.host}/team", "--store", str(laptop / "models"),
          "--username", "alice", "--password-stdin", *ca], laptop, GOOD + "\n", None, 0),
        (["publish", "demo", "--tag", "v2"], laptop, None, env_alice, 0),  # a run: publish.* from its config
        (["install", f"{basic_registry.host}/team/demo:v2", "--store", str(desk / "models"), *ca], desk, None, None, 0),
        (["install", f"{basic_registry.host}/team/demo:v2", "--host", fake_ollama.url, *ca], desk, None, None, 0),
        (["-v", "publish", "demo", "--tag", "v3"], laptop, WRONG + "\n", {A.ENV_USER: "alice", A.ENV_PASSWORD: WRONG}, 1),
        (["publish", "demo", "--registry", f"{tok}/team", "--store", str(laptop / "models"), *ca], laptop, None,
         env_alice, 0),
        (["publish", "demo", "--registry", f"{tok}/team", "--tag", "r", "--store", str(laptop / "models"),
          "--username", "reader", "--password-stdin", *ca], laptop, READER_PW + "\n", None, 1),
        (["install", f"{tok}/team/demo:latest", "--store", str(desk / "m2"), "--username", "reader",
          "--password-stdin", *ca], desk, READER_PW + "\n", None, 0),
    ]
    outputs = []
    for args, home, stdin, env, rc in runs:
        p = cli(args, home, stdin=stdin, env=env, cwd=laptop if home == laptop else desk)
        assert p.returncode == rc, (args, p.stdout, p.stderr)
        outputs += [p.stdout, p.stderr]
    assert run.entry("publish")["info"]["user"] == "alice"

    # An internal error while the credentials are in memory: the crash log under the cache dir.
    from ollama_ft import cli as cli_mod
    from ollama_ft.ollama import registry_push

    def boom(*a, **k):
        raise RuntimeError("simulated bug during upload")

    monkeypatch.setattr(registry_push, "_push_blob", boom)
    monkeypatch.setenv("OLLAMA_FT_CACHE", str(laptop / "cache"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(GOOD + "\n"))
    monkeypatch.setattr(sys, "argv", ["ollama-ft", "publish", "demo", "--registry", f"{basic_registry.host}/team",
                                      "--tag", "crash", "--store", str(laptop / "models"), "--username", "alice",
                                      "--password-stdin", *ca])
    with pytest.raises(SystemExit) as e:
        cli_mod.main()
    assert e.value.code == 2
    captured = capfd.readouterr()
    outputs += [captured.out, captured.err]
    crash_logs = list((laptop / "cache" / "logs").glob("crash-*.log"))
    assert crash_logs and "simulated bug during upload" in crash_logs[0].read_text()

    secrets = _secret_forms(GOOD, WRONG, READER_PW) + token_registry.tokens.tokens
    assert len(token_registry.tokens.tokens) >= 3
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != login]
    assert any(p.name == "config.resolved.json" for p in written) and any(p.name == "manifest.json" for p in written)
    for s in secrets:
        for i, text in enumerate(outputs):
            assert s not in text, (s, runs[i // 2][0] if i // 2 < len(runs) else "crash", text)
        for p in written:
            assert s.encode() not in p.read_bytes(), (s, p)
    print(f"\nsecrets: {len(runs) + 1} commands, {len(secrets)} secret forms, {len(outputs)} outputs and "
          f"{len(written)} files checked")
