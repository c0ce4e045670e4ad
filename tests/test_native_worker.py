"""native_worker: a crash in native code becomes a clear UserError; native logs go to the log file."""

from __future__ import annotations

import pytest

from ollama_ft.core.errors import UserError
from ollama_ft.core.native_worker import Contained


def test_calls_streams_and_log_file(tmp_path):
    log = tmp_path / "logs" / "llama.log"
    with Contained("tests.native_crashers:Crasher", what="llama.cpp (test)", log_path=log) as w:
        assert w.call("echo", {"a": [1, 2]}) == {"a": [1, 2]}
        assert list(w.stream("count", 4)) == [0, 1, 2, 3]
        w.set("how", "changed")
    assert "native log line from the child" in log.read_text()


@pytest.mark.parametrize("how, words, fix", [
    ("segv", "segmentation fault", "GGML_NATIVE=OFF"),
    ("ill", "illegal instruction", "GGML_NATIVE=OFF"),
    ("kill", "out of memory", "free memory"),
])
def test_native_crash_is_a_clear_error(tmp_path, how, words, fix):
    w = Contained("tests.native_crashers:Crasher", what="llama.cpp (test.gguf)", log_path=tmp_path / "l.log")
    with pytest.raises(UserError) as e:
        w.call("crash", how)
    assert "llama.cpp (test.gguf) crashed with" in e.value.message and words in e.value.message
    assert "while running crash()" in e.value.message
    assert str(tmp_path / "l.log") in e.value.message
    assert fix in e.value.hint
    w.close()  # closing a dead worker is fine


def test_python_errors_in_the_child_keep_their_kind(tmp_path):
    with Contained("tests.native_crashers:Crasher", log_path=tmp_path / "l.log") as w:
        with pytest.raises(RuntimeError, match="AttributeError"):
            w.call("no_such_method")
        assert w.call("echo", 5) == 5  # the worker survives a Python error
