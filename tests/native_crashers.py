"""Objects for tests/test_native_worker.py that fail the way native code does (imported in a child)."""

from __future__ import annotations

import ctypes
import os
import signal


class Crasher:
    def __init__(self, how: str = "none"):
        self.how = how
        os.write(2, b"native log line from the child\n")  # what llama.cpp does on fd 2

    def echo(self, x):
        return x

    def count(self, n: int):
        yield from range(n)

    def crash(self, how: str):
        if how == "segv":
            ctypes.string_at(0)  # a real NULL dereference: SIGSEGV
        os.kill(os.getpid(), {"ill": signal.SIGILL, "kill": signal.SIGKILL}[how])
