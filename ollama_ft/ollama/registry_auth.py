"""Who we are to a registry: credentials, where they come from, and the auth flows of the distribution spec.

Credentials, first match wins (the order container tools use):

1. `--username USER` with the password from `--password-stdin` or a terminal prompt (never an argument:
   arguments show in `ps` and shell history);
2. `$OLLAMA_FT_REGISTRY_USER` + `$OLLAMA_FT_REGISTRY_PASSWORD`;
3. `$DOCKER_CONFIG/config.json` (default `~/.docker/config.json`) as docker reads it: the credential
   helper named for the host in `credHelpers`, else the `credsStore` helper (Docker Desktop, `pass`,
   `secretservice`: `docker-credential-NAME get`, the docker-credential-helpers protocol), else the
   host's `auths` entry as `docker login` writes it without a helper (`auth` = base64 of `user:password`).

`RegistryAuth` is an `httpx.Auth` flow. It sends nothing until the registry answers 401, then follows
the challenge: `Basic` (htpasswd) resends with the credentials; `Bearer realm=...,service=...,scope=...`
(the token spec) asks the realm for a token with the scope the operation needs (`pull` for install,
`pull,push` for publish) and resends with it. A request that gets 401 although it carried a token (the
token expired mid-upload) fetches a fresh token once and is sent again; request bodies are replayable
(registry_push's chunk stream) for that. What happened is kept so that a final 401/403 is explained
with the right message (`explain`): no credentials, wrong credentials, or no push rights.

The password lives only in `Credentials.password` (masked in repr) and in Authorization headers.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import json
import os
import subprocess
import sys
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.request import parse_http_list, parse_keqv_list

import httpx

from ..core.errors import UserError

ENV_USER = "OLLAMA_FT_REGISTRY_USER"
ENV_PASSWORD = "OLLAMA_FT_REGISTRY_PASSWORD"
LOGIN_HINT = (f"pass --username USER (the password is then read from --password-stdin or a prompt), "
              f"export {ENV_USER} and {ENV_PASSWORD}, or run `docker login HOST`")


@dataclass(frozen=True)
class Credentials:
    """A user name and password, and where they were found (for messages; never the password)."""

    username: str
    password: str = field(repr=False)
    source: str = ""

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=<hidden>, source={self.source!r})"

    @property
    def who(self) -> str:
        return f"user {self.username!r} (from {self.source})"


# -------------------------------------------------------------------------------------------
# Where credentials come from


def resolve_credentials(host: str, username: str | None = None, password_stdin: bool = False,
                        stdin=None, environ=None, docker_config: Path | None = None) -> Credentials | None:
    """The credentials for `host` (HOST[:PORT]) in the order of the module docstring, or None."""
    environ = os.environ if environ is None else environ
    if password_stdin and not username:
        raise UserError("--password-stdin needs --username", hint="e.g. `echo \"$PASS\" | ollama-ft publish NAME "
                        "--username alice --password-stdin`")
    if username:
        return Credentials(username, _read_password(username, host, password_stdin, stdin), "--username")
    user, password = environ.get(ENV_USER), environ.get(ENV_PASSWORD)
    if user or password:
        missing = ENV_PASSWORD if user else ENV_USER
        if not (user and password):
            raise UserError(f"${ENV_USER} and ${ENV_PASSWORD} go together: ${missing} is not set",
                            hint=f"export both, or unset both to use {docker_config_path(environ)}")
        return Credentials(user, password, f"${ENV_USER}")
    return docker_credentials(host, docker_config or docker_config_path(environ), environ)


def _read_password(username: str, host: str, from_stdin: bool, stdin) -> str:
    if from_stdin:
        line = (stdin or sys.stdin).readline()
        password = line.rstrip("\r\n")
        if not password:
            raise UserError("--password-stdin: standard input held no password",
                            hint="pipe the password in, e.g. `ollama-ft ... --password-stdin < secret.txt`")
        return password
    if not sys.stdin.isatty():
        raise UserError(f"--username {username}: no terminal to ask the password on",
                        hint="pipe it in with --password-stdin, or use "
                             f"{ENV_USER}/{ENV_PASSWORD} (a password is never taken as an argument)")
    password = getpass.getpass(f"password for {username} at {host}: ")
    if not password:
        raise UserError("no password entered")
    return password


def docker_config_path(environ=None) -> Path:
    environ = os.environ if environ is None else environ
    base = environ.get("DOCKER_CONFIG")
    return (Path(base).expanduser() if base else Path.home() / ".docker") / "config.json"


def docker_credentials(host: str, path: Path, environ=None) -> Credentials | None:
    """`host`'s credentials in a docker config.json: its credential helper, else the file's `auths` entry."""
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e})",
                        hint="fix or remove the file, or give credentials with --username / "
                             f"{ENV_USER}") from None
    if not isinstance(cfg, dict):
        return None
    helpers = cfg.get("credHelpers") if isinstance(cfg.get("credHelpers"), dict) else {}
    helper = next((v for k, v in helpers.items() if _auth_key_host(k) == host.lower()), None) \
        or cfg.get("credsStore")
    if isinstance(helper, str) and helper:
        return helper_credentials(helper, host, path, os.environ if environ is None else environ)
    auths = cfg.get("auths")
    if not isinstance(auths, dict):
        return None
    entry = next((v for k, v in auths.items() if _auth_key_host(k) == host.lower()), None)
    if not isinstance(entry, dict):
        return None
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(entry["auth"], validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            sep = ""
        if not sep or not user:
            # The message names the file and host only: the field holds the password.
            raise UserError(f"{path}: the `auth` entry for {host} is not base64 of `user:password`",
                            hint=f"log in again (`docker login {host}`) or use --username")
        return Credentials(user, password, f"{path} auths[{host}]")
    if entry.get("username") and entry.get("password"):
        return Credentials(entry["username"], entry["password"], f"{path} auths[{host}]")
    return None


HELPER_TIMEOUT_S = 60  # a helper may wait for a keychain unlock dialog


class HelperUnavailable(UserError):
    """The docker credential helper could not answer. Not fatal by itself: a registry that needs no login
    still works, and one that asks for a login is refused with this reason (registry_client)."""


def helper_credentials(helper: str, host: str, config: Path, environ) -> Credentials | None:
    """`docker-credential-HELPER get` with the registry on stdin -> {"Username", "Secret"}, or None when
    the helper holds nothing for it. Its output is never shown: it carries the secret."""
    program = f"docker-credential-{helper}"
    try:
        p = subprocess.run([program, "get"], input=host, capture_output=True, text=True,
                           timeout=HELPER_TIMEOUT_S, env=dict(environ))
    except FileNotFoundError:
        raise HelperUnavailable(f"{config} names the credential helper {helper!r}, but {program} is not on PATH",
                                hint=f"install {program}, log in again without it, or use --username / "
                                     f"{ENV_USER}") from None
    except OSError as e:  # on PATH but not runnable (not executable, wrong architecture)
        raise HelperUnavailable(f"{config} names the credential helper {helper!r}, but {program} cannot be "
                                f"run ({e.strerror})", hint=f"reinstall {program}, or use --username") from None
    except subprocess.TimeoutExpired:
        raise HelperUnavailable(f"{program} did not answer within {HELPER_TIMEOUT_S} s (a locked keychain?)",
                                hint=f"unlock it and retry, or use --username / {ENV_USER}") from None
    if p.returncode != 0:
        # Its stdout is the protocol's answer and may carry the secret: it is only matched, never shown.
        if "credentials not found" in p.stdout.lower():
            return None
        said = _safe_line(p.stderr)
        raise HelperUnavailable(f"{program} get failed for {host} (exit status {p.returncode}"
                                + (f": {said})" if said else ")"),
                                hint=f"check `{program} list`, log in again (`docker login {host}`), or use "
                                     "--username")
    try:
        answer = json.loads(p.stdout)
        user, secret = answer["Username"], answer["Secret"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise HelperUnavailable(f"{program} get answered {host} with something other than "
                                "{\"Username\": ..., \"Secret\": ...}", hint="update the credential helper") from None
    if user == "<token>":
        raise HelperUnavailable(f"{program} holds an identity token for {host}, which ollama-ft cannot use",
                                hint=f"log in with a user name and password (`docker login {host}`), or use "
                                     "--username")
    if not (isinstance(user, str) and user and isinstance(secret, str) and secret):
        return None
    return Credentials(user, secret, f"{program} ({config})")


def _safe_line(text: str) -> str:
    """The first line of a helper's stderr for a message, unless it looks like it holds a credential."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")[:200]
    return "" if any(w in line.lower() for w in ("secret", "password", "token", "{")) else line


def _auth_key_host(key: str) -> str:
    """`https://host:5000/v2/`, `http://host:5000`, `host:5000` -> `host:5000` (docker accepts all three)."""
    k = key.strip().lower()
    for prefix in ("https://", "http://"):
        k = k.removeprefix(prefix)
    return k.split("/", 1)[0]


# -------------------------------------------------------------------------------------------
# Challenges


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "basic" / "bearer"
    params: dict[str, str]


def parse_challenges(response: httpx.Response) -> list[Challenge]:
    """`WWW-Authenticate` headers -> challenges; one challenge per header, as registries send them.

    The comma-separated `key="value"` list is split with the stdlib's RFC 2068 list parser
    (`urllib.request.parse_http_list`/`parse_keqv_list`, what httpx's DigestAuth uses), so commas
    inside quoted values (`scope="repository:a/b:pull,push"`) stay in their value.
    """
    out = []
    for value in response.headers.get_list("www-authenticate"):
        scheme, _, rest = value.strip().partition(" ")
        items = [i.strip() for i in parse_http_list(rest) if "=" in i]
        params = {k.lower(): v for k, v in parse_keqv_list(items).items()} if items else {}
        if scheme:
            out.append(Challenge(scheme.lower(), params))
    return out


# -------------------------------------------------------------------------------------------
# The httpx auth flow


class RegistryAuth(httpx.Auth):
    """Basic and bearer-token auth for one repository, with the scope one operation needs."""

    def __init__(self, credentials: Credentials | None, repository: str, actions: tuple[str, ...],
                 origin: tuple[str, str, int | None], *, allow_http_realm: bool = False,
                 credentials_problem: UserError | None = None):
        self.credentials = credentials
        self.credentials_problem = credentials_problem  # why none were found (a failed credential helper)
        self.repository = repository
        self.actions = actions
        self.origin = origin  # (scheme, host, port) of the registry: the only place headers go unasked
        self.allow_http_realm = allow_http_realm
        self._header: str | None = None  # the Authorization value that worked last
        self.tokens_fetched = 0
        self.refreshes = 0  # tokens fetched again because the registry refused one it had accepted
        self.last: Challenge | None = None  # the challenge of the last 401 returned to the caller
        self.sent_credentials = False  # the credentials reached the registry or its token service

    @property
    def scope(self) -> str:
        return f"repository:{self.repository}:{','.join(self.actions)}"

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        same_origin = (request.url.scheme, request.url.host, request.url.port) == self.origin
        if self._header and same_origin:
            request.headers["Authorization"] = self._header
        response = yield request
        if response.status_code != 401 or not same_origin:
            return
        challenge = self._pick(parse_challenges(response))
        self.last = challenge
        if challenge is None:
            return
        had = request.headers.get("Authorization")
        if challenge.scheme == "basic":
            if self.credentials is None or had == self._basic():
                return  # nothing to offer, or the registry refused these credentials: explain() says so
            self._header = self._basic()
            self.sent_credentials = True
        else:
            if had and challenge.params.get("error") == "insufficient_scope" and self._covers(challenge):
                return  # the token had all the service grants: asking again would not change it
            response.read()
            token_response = yield self._token_request(challenge)
            token_response.read()
            self._header = f"Bearer {self._token_from(token_response, challenge)}"
            self.tokens_fetched += 1
            self.refreshes += bool(had)
        request.headers["Authorization"] = self._header
        retried = yield request
        self.last = self._pick(parse_challenges(retried)) if retried.status_code == 401 else None

    def _pick(self, challenges: list[Challenge]) -> Challenge | None:
        for scheme in ("bearer", "basic"):
            for c in challenges:
                if c.scheme == scheme:
                    return c
        return None

    def _basic(self) -> str:
        assert self.credentials is not None
        raw = f"{self.credentials.username}:{self.credentials.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def _covers(self, challenge: Challenge) -> bool:
        """Did we already ask for everything this challenge's scope names?"""
        wanted = challenge.params.get("scope", "")
        if not wanted.startswith(f"repository:{self.repository}:"):
            return False
        return set(wanted.rsplit(":", 1)[1].split(",")) <= set(self.actions)

    def _token_request(self, challenge: Challenge) -> httpx.Request:
        realm = challenge.params.get("realm")
        if not realm:
            raise UserError(f"the registry at {self.origin[1]} asks for a bearer token but names no realm",
                            hint="the registry's auth.token.realm setting is missing; ask its admin")
        url = httpx.URL(realm)
        loopback = url.host in ("127.0.0.1", "localhost", "::1")
        if url.scheme != "https" and not (loopback or self.allow_http_realm):
            raise UserError(f"refusing to send credentials to the token service {realm}: it is plain HTTP",
                            hint="the registry's auth.token.realm should be https; --insecure allows it anyway")
        params: dict[str, str | list[str]] = {}
        if challenge.params.get("service"):
            params["service"] = challenge.params["service"]
        scopes = [self.scope]
        if challenge.params.get("scope") and not self._covers(challenge):
            scopes.append(challenge.params["scope"])
        params["scope"] = scopes
        headers = {}
        if self.credentials is not None:
            params["account"] = self.credentials.username
            headers["Authorization"] = self._basic()
            self.sent_credentials = True
        return httpx.Request("GET", url, params=params, headers=headers)

    def _token_from(self, r: httpx.Response, challenge: Challenge) -> str:
        realm = challenge.params.get("realm")
        if r.status_code in (401, 403):
            raise self._refused(r.status_code, f"the token service {realm}")
        if r.status_code != 200:
            raise UserError(f"the token service {realm} answered HTTP {r.status_code} for scope {self.scope}",
                            hint="retry; if it persists the registry's token service is failing (ask its admin)")
        try:
            body = r.json()
            token = body.get("token") or body.get("access_token")
        except (json.JSONDecodeError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise UserError(f"the token service {realm} answered without a token",
                            hint="it does not follow the distribution token spec (`token` in a JSON body)")
        return token

    # -- what a refusal means -----------------------------------------------------------------
    def _refused(self, status: int, by: str) -> UserError:
        if self.credentials is None:
            if self.credentials_problem is not None:
                return UserError(f"{by} requires a login to {self._doing()}, and the credentials could not be "
                                 f"read: {self.credentials_problem.message}", hint=self.credentials_problem.hint)
            return UserError(f"{by} requires a login to {self._doing()}, and no credentials were found",
                             hint=LOGIN_HINT)
        if status == 401:
            return UserError(f"{by} refused the credentials of {self.credentials.who}: wrong user name or password",
                             hint="check them; " + LOGIN_HINT)
        return self._denied(by)

    def _denied(self, by: str) -> UserError:
        who = self.credentials.who if self.credentials else "anonymous access"
        needs = "push" if "push" in self.actions else "pull"
        return UserError(f"{by} denied {who} {needs} rights on {self.repository}",
                         hint=(f"ask the registry's admin for {needs} access to {self.repository}, or "
                               + ("publish to a namespace you may write (--registry HOST/NAMESPACE)" if needs == "push"
                                  else "log in as a user who may read it")))

    def _doing(self) -> str:
        return f"push to {self.repository}" if "push" in self.actions else f"pull {self.repository}"

    def explain(self, response: httpx.Response, by: str) -> UserError:
        """The UserError for a 401/403 the flow could not get past."""
        if response.status_code == 403:
            return self._denied(by)
        c = self.last
        if c is not None and c.params.get("error") == "insufficient_scope":
            if self.credentials is None:
                return UserError(f"{by} requires a login to {self._doing()}, and no credentials were found",
                                 hint=LOGIN_HINT)
            return self._denied(by)
        if c is not None and c.scheme == "bearer" and self.tokens_fetched:
            # The token service issued a token (so the login was fine) and the registry refused it.
            return UserError(f"{by} refused a fresh token from {c.params.get('realm')} "
                             f"({c.params.get('error') or 'no reason given'})",
                             hint="the registry and its token service disagree (clock skew, or the registry's "
                                  "auth.token issuer/service/rootcertbundle); ask the registry's admin")
        if c is None and self.credentials is None:
            return UserError(f"{by} asks for authentication in a way ollama-ft does not speak "
                             f"({response.headers.get('www-authenticate') or 'no WWW-Authenticate header'})",
                             hint="registries following the distribution spec use Basic or Bearer challenges")
        return self._refused(401, by)
