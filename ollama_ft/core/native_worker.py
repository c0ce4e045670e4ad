"""Run a llama.cpp object in a child process, so a native crash becomes a clear error.

Why: llama.cpp is C++; a SIGSEGV or SIGILL inside it (the AMX `ldtilecfg` fault on VMs, a CPU
without an instruction the build assumed, a corrupt GGUF) kills the whole Python process with no
message. Export already ran its llama.cpp work in a subprocess; eval and `run --local` now use this
module too. The child's native log goes to a log file (the run's `logs/llama.log`), not into
answers or tables; `--verbose` (OLLAMA_FT_VERBOSE=1) leaves it on the terminal.

    eng = Contained("ollama_ft.eval.engines:LlamaCppEngine", gguf, template, log_path=run / "logs/llama.log")
    eng.call("generate", messages, 64)
    for piece in eng.stream("stream_completion", text, 128): ...
    eng.close()
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import signal
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

PORTABLE_HINT = ("rebuild llama-cpp-python portably: CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON "
                 "-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON\" .venv/bin/pip install --force-reinstall "
                 "--no-cache-dir llama-cpp-python==0.3.36 (README, Troubleshooting)")


def _redirect_native_output(log_path: str | None) -> None:
    if not log_path or os.environ.get("OLLAMA_FT_VERBOSE") == "1":
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)  # C code writes to fd 2 directly; Python's sys.stderr follows the fd
    os.close(fd)


def _serve(conn, target: str, args: tuple, kwargs: dict, log_path: str | None) -> None:
    """Child: build the object, then answer (method, args, kwargs) requests until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C means
    _redirect_native_output(log_path)
    try:
        mod, _, name = target.partition(":")
        obj = getattr(importlib.import_module(mod), name)(*args, **kwargs)
        conn.send(("ok", None))
    except BaseException as e:  # noqa: BLE001 - every failure is reported to the parent
        conn.send(_failure(e))
        return
    while True:
        try:
            req = conn.recv()
        except EOFError:
            return
        if req is None:
            break
        kind, method, a, kw = req
        try:
            if kind == "set":
                setattr(obj, method, a[0])
                conn.send(("ok", None))
            elif kind == "stream":
                for item in getattr(obj, method)(*a, **kw):
                    conn.send(("item", item))
                conn.send(("ok", None))
            else:
                conn.send(("ok", getattr(obj, method)(*a, **kw)))
        except BaseException as e:  # noqa: BLE001
            conn.send(_failure(e))
    close = getattr(obj, "close", None)
    if close:
        close()


def _failure(e: BaseException) -> tuple:
    if isinstance(e, UserError):
        return ("user_error", e.message, e.hint, e.details)
    return ("error", f"{type(e).__name__}: {e}", traceback.format_exc())


class Contained:
    """A proxy for an object living in a spawned child process (see the module docstring)."""

    def __init__(self, target: str, *args: Any, what: str = "llama.cpp", log_path: Path | None = None,
                 **kwargs: Any):
        ctx = mp.get_context("spawn")  # a fork would copy torch's threads and locks
        self.what = what
        self.log_path = Path(log_path) if log_path else None
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, target, args, kwargs,
                                                      str(log_path) if log_path else None), daemon=True)
        self._proc.start()
        child.close()
        self._receive("loading")

    def _died(self, doing: str) -> UserError:
        self._proc.join(timeout=5)
        code = self._proc.exitcode
        if code is not None and code < 0:
            sig = signal.Signals(-code).name
            why = {"SIGSEGV": "a segmentation fault", "SIGILL": "an illegal instruction (a CPU feature the build "
                   "assumed)", "SIGBUS": "a bus error (a truncated or changing file)"}.get(sig, sig)
            hint = PORTABLE_HINT if sig in ("SIGSEGV", "SIGILL") else "check the file and re-run"
            if sig == "SIGKILL":
                why, hint = "SIGKILL (out of memory?)", "free memory or use a smaller quant / context"
            log = f"; its log is {self.log_path}" if self.log_path else ""
            return UserError(f"{self.what} crashed with {why} while {doing}{log}", hint=hint)
        return UserError(f"{self.what} worker exited (status {code}) while {doing}",
                         hint=f"see {self.log_path}" if self.log_path else "re-run with --verbose")

    def _receive(self, doing: str) -> Any:
        try:
            msg = self._conn.recv()
        except (EOFError, ConnectionResetError, OSError):
            raise self._died(doing) from None
        if msg[0] == "user_error":
            raise UserError(msg[1], hint=msg[2], details=msg[3])
        if msg[0] == "error":
            raise RuntimeError(f"{self.what} worker failed while {doing}: {msg[1]}\n{msg[2]}")
        return msg

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            self._conn.send(("call", method, args, kwargs))
        except (BrokenPipeError, OSError):
            raise self._died(f"running {method}()") from None
        return self._receive(f"running {method}()")[1]

    def set(self, attr: str, value: Any) -> None:
        self._conn.send(("set", attr, (value,), {}))
        self._receive(f"setting {attr}")

    def stream(self, method: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
        self._conn.send(("stream", method, args, kwargs))
        while True:
            msg = self._receive(f"running {method}()")
            if msg[0] == "item":
                yield msg[1]
            else:
                return

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()

    def __enter__(self) -> Contained:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
