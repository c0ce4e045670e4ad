"""The real Ollama server for end-to-end tests (a helper module, not a test file).

`scripts/build_ollama.sh` (`make ollama`) builds Ollama v0.24.0 from its Go module into
`${OLLAMA_FT_CACHE:-~/.cache/ollama-ft}/ollama/<version>/bin/ollama`; `find_ollama_binary()` finds
it (env `OLLAMA_FT_OLLAMA_BIN` overrides) or returns None, so a test can skip with a reason.

`running_ollama(binary, workdir)` starts `ollama serve` on a free loopback port, isolated from the
user's Ollama: its own OLLAMA_MODELS and HOME (the server writes its ed25519 key pair to
$HOME/.ollama at start), OLLAMA_NO_CLOUD=1 (no background calls to ollama.com), OLLAMA_NOPRUNE=1
(blobs a test placed in the store survive the start-up prune), every OLLAMA_* variable of the caller
dropped. It waits until GET /api/version answers, logs to `workdir/ollama.log`, yields a
`RealOllama` (`.host` "http://127.0.0.1:PORT", `.binary`, `.models_dir`, `.log_path`, `.version`,
`.env()` / `.cli(...)` for the CLI against this server) and stops it at exit: SIGTERM, then SIGKILL
to its process group (the server's model runners are child processes in that group).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_VERSION = "v0.24.0"
BIN_ENV = "OLLAMA_FT_OLLAMA_BIN"


def cache_root() -> Path:
    """Same rule as scripts/build_ollama.sh: ${OLLAMA_FT_CACHE:-$HOME/.cache/ollama-ft}."""
    env = os.environ.get("OLLAMA_FT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ollama-ft"


def cached_binary_path(version: str | None = None) -> Path:
    version = version or os.environ.get("OLLAMA_VERSION") or DEFAULT_VERSION
    if not version.startswith("v"):
        version = "v" + version
    return cache_root() / "ollama" / version / "bin" / "ollama"


def find_ollama_binary(version: str | None = None) -> Path | None:
    """The real `ollama` binary to test against, or None.

    `OLLAMA_FT_OLLAMA_BIN` (a path) wins when set; otherwise the binary cached by
    scripts/build_ollama.sh for `version` (default $OLLAMA_VERSION or v0.24.0).
    """
    override = os.environ.get(BIN_ENV)
    path = Path(override).expanduser() if override else cached_binary_path(version)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout: float) -> dict:
    # No proxies: a caller's HTTP(S)_PROXY must not capture loopback requests.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as resp:
        return json.loads(resp.read())


@dataclass
class RealOllama:
    """One running `ollama serve`."""

    host: str  # "http://127.0.0.1:PORT"
    port: int
    binary: Path
    models_dir: Path
    home: Path  # its $HOME (holds .ollama/id_ed25519)
    log_path: Path
    version: str  # from GET /api/version, e.g. "0.24.0"
    proc: subprocess.Popen
    base_env: dict[str, str]

    @property
    def host_port(self) -> str:
        """The OLLAMA_HOST form, "127.0.0.1:PORT"."""
        return f"127.0.0.1:{self.port}"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for running the CLI (or anything) against this server."""
        env = dict(self.base_env)
        env.update(extra or {})
        return env

    def cli(self, *args: str, timeout: float = 300, check: bool = True,
            input: str | None = None, **kwargs) -> subprocess.CompletedProcess:
        """Run `ollama ARGS...` against this server; text output captured."""
        return subprocess.run([str(self.binary), *args], env=self.env(kwargs.pop("env", None)),
                              capture_output=True, text=True, timeout=timeout, check=check,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL,
                              **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the server; SIGKILL its process group if it does not exit in `timeout` s."""
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # The group is the one this helper created (start_new_session); it also holds the runners.
        # Only signal it while it has members, so a reused process-group id is never hit.
        if proc.poll() is None or _group_has_members(proc.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _group_has_members(pgid: int) -> bool:
    """Whether any process is in process group `pgid` (Linux /proc; True elsewhere)."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return True
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if len(fields) > 2 and fields[2] == str(pgid):
            return True
    return False


def server_env(port: int, models_dir: Path, home: Path,
               extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}
    env.update({
        "OLLAMA_HOST": f"127.0.0.1:{port}",
        "OLLAMA_MODELS": str(models_dir),
        "HOME": str(home),
        "OLLAMA_NO_CLOUD": "1",
        "OLLAMA_NOPRUNE": "1",
        "OLLAMA_NUM_PARALLEL": "1",  # one KV cache per model: less memory on CPU
        "OLLAMA_MAX_LOADED_MODELS": "1",
        "OLLAMA_NOHISTORY": "1",  # `ollama run` keeps no readline history in HOME
    })
    for key in ("NO_PROXY", "no_proxy"):  # never send loopback traffic through a proxy
        env[key] = ",".join(filter(None, [env.get(key), "127.0.0.1", "localhost"]))
    env.update(extra_env or {})
    return env


def start_ollama(binary: Path | str, workdir: Path | str, *, models_dir: Path | str | None = None,
                 extra_env: Mapping[str, str] | None = None, timeout: float = 60.0,
                 attempts: int = 3) -> RealOllama:
    """Start `ollama serve` with state under `workdir`; wait until GET /api/version answers.

    `models_dir` defaults to workdir/models (pass an existing store to serve it). `extra_env`
    overrides the isolated environment (e.g. {"OLLAMA_DEBUG": "1", "OLLAMA_KEEP_ALIVE": "0"}).
    Raises RuntimeError with the server log when it exits or does not answer in `timeout` s.
    """
    binary = Path(binary)
    workdir = Path(workdir)
    models = Path(models_dir) if models_dir is not None else workdir / "models"
    home = workdir / "home"
    models.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "ollama.log"
    last_error = ""
    for _ in range(attempts):  # a free port can be taken between probe and bind: retry
        port = free_port()
        env = server_env(port, models, home, extra_env)
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen([str(binary), "serve"], env=env, stdout=logf,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=str(workdir), start_new_session=True)
        server = RealOllama(f"http://127.0.0.1:{port}", port, binary, models, home, log_path, "",
                            proc, env)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                last_error = f"ollama serve exited with {proc.returncode}"
                break
            try:
                server.version = str(_get_json(f"{server.host}/api/version", 2.0)["version"])
                return server
            except (urllib.error.URLError, ConnectionError, OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"ollama serve did not answer GET /api/version within {timeout}s"
                                   f"\n--- {log_path}:\n{server.log()[-4000:]}")
            time.sleep(0.1)
        if "address already in use" not in server.log():
            break
    raise RuntimeError(f"{last_error}\n--- {log_path}:\n{Path(log_path).read_text(errors='replace')[-4000:]}")


@contextlib.contextmanager
def running_ollama(binary: Path | str | None = None, workdir: Path | str | None = None,
                   **kwargs) -> Iterator[RealOllama]:
    """`start_ollama` as a context manager; stops the server at exit.

    `binary` defaults to `find_ollama_binary()`; `workdir` to a temporary directory removed at exit
    (pass a pytest tmp_path to keep the log for failures).
    """
    if binary is None:
        binary = find_ollama_binary()
        if binary is None:
            raise FileNotFoundError(f"no ollama binary: run `make ollama` or set {BIN_ENV}")
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="real-ollama-"))
        server = start_ollama(binary, workdir, **kwargs)
        stack.callback(server.stop)
        yield server
