"""Ollama Modelfiles: a model, a writer and a parser that follow Ollama's grammar (../shared/docs/ollama-contract.md §2),
and the `/api/create` request `ollama create -f` would send (section 3). The `modelfile` stage is
ollama/stage.py; the TEMPLATE fidelity proof is ollama/fidelity.py.

The parser is a port of the behaviour of Ollama's parser (a rune-by-rune state machine): instruction
words are case-insensitive ASCII letters, `#` starts a comment only at the start of a line, arguments
are trimmed and then unquoted (`\"\"\"...\"\"\"` or `"..."`, both may span lines, no escapes), runes that Go's
`strconv.IsPrint` rejects are dropped except spaces, tabs and newlines. The writer only produces text
that this parser reads back to the same value, and refuses values a Modelfile cannot hold.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.errors import UserError

COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
            "message", "requires")
_INVALID_COMMAND = ('command must be one of "from", "license", "template", "system", "adapter", "draft", '
                    '"renderer", "parser", "parameter", "message", or "requires"')
_INVALID_ROLE = 'message role must be one of "system", "user", or "assistant"'
MESSAGE_ROLES = ("system", "user", "assistant")

# api.Options + api.Runner JSON tags and their Go kinds (§2.4).
PARAMETER_TYPES: dict[str, str] = {
    "num_ctx": "int", "num_batch": "int", "num_gpu": "int", "main_gpu": "int", "use_mmap": "bool",
    "num_thread": "int", "draft_num_predict": "int", "num_keep": "int", "seed": "int", "num_predict": "int",
    "top_k": "int", "top_p": "float", "min_p": "float", "typical_p": "float", "repeat_last_n": "int",
    "temperature": "float", "repeat_penalty": "float", "presence_penalty": "float",
    "frequency_penalty": "float", "stop": "list",
}
# The Ollama CLI warns about these and drops them.
DEPRECATED_PARAMETERS = ("penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock",
                         "mirostat", "mirostat_tau", "mirostat_eta")

_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?i:inf|infinity|nan)")
_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
          "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}


class ModelfileError(UserError):
    """A Modelfile that Ollama would refuse, with Ollama's wording."""


def _go_list(vals: list[str]) -> str:
    return "[" + " ".join(vals) + "]"  # Go's %s of a []string


def _float32(s: str) -> float:
    import numpy as np

    v = np.float32(float(s))
    return float(str(v)) if np.isfinite(v) else float(v)  # shortest float32 text, as Go marshals it


def convert_parameter(name: str, values: list[str]) -> Any:
    """The JSON value `ollama create` sends for PARAMETER `name` (Go's api.FormatParams)."""
    kind = PARAMETER_TYPES.get(name)
    if kind is None:
        raise ModelfileError(f"unknown parameter '{name}'",
                             hint=f"valid names (case-sensitive): {', '.join(sorted(PARAMETER_TYPES))}")
    if kind == "list":
        return list(values)
    v = values[-1]
    if kind == "int":
        if not _INT_RE.fullmatch(v) or not -(2**63) <= int(v) < 2**63:
            raise ModelfileError(f"invalid int value {_go_list(values)}", hint=f"{name} takes a whole number")
        return int(v)
    if kind == "float":
        if not _FLOAT_RE.fullmatch(v):
            raise ModelfileError(f"invalid float value {_go_list(values)}", hint=f"{name} takes a number")
        return _float32(v)
    if v not in _BOOLS:
        raise ModelfileError(f"invalid bool value {_go_list(values)}", hint=f"{name} takes true or false")
    return _BOOLS[v]


def format_parameter(name: str, value: Any) -> list[str]:
    """Modelfile text value(s) for a config parameter, validated like Ollama (name and type)."""
    if name in DEPRECATED_PARAMETERS:
        raise ModelfileError(f"parameter '{name}' is deprecated and Ollama ignores it", hint="remove it")
    kind = PARAMETER_TYPES.get(name)
    if kind is None:
        convert_parameter(name, [""])  # raises the Ollama-style unknown-parameter error
    if kind == "list":
        vals = [value] if isinstance(value, str) else value
        if not isinstance(vals, list | tuple) or not all(isinstance(x, str) for x in vals):
            raise ModelfileError(f"parameter '{name}' must be a string or a list of strings, got {value!r}")
        return list(vals)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ModelfileError(f"invalid bool value [{value}]", hint=f"{name} takes true or false")
        text = "true" if value else "false"
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ModelfileError(f"invalid int value [{value}]", hint=f"{name} takes a whole number")
        text = str(value)
    else:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ModelfileError(f"invalid float value [{value}]", hint=f"{name} takes a number")
        text = repr(float(value)) if not isinstance(value, str) else value
    convert_parameter(name, [text])
    return [text]


# ------------------------------------------------------------------------------------------
# The model


@dataclass
class Modelfile:
    """The content of a Modelfile. Parameter values are kept as Modelfile text (stop may repeat)."""

    from_: str
    adapter: str | None = None
    template: str | None = None
    system: str | None = None
    parameters: dict[str, list[str]] = field(default_factory=dict)
    messages: list[tuple[str, str]] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    requires: str | None = None
    renderer: str | None = None
    parser: str | None = None
    draft: str | None = None
    more_from: list[str] = field(default_factory=list)  # further FROM lines (e.g. a projector GGUF)

    # -- writer ---------------------------------------------------------------------------
    def render(self, header: str | None = None) -> str:
        """Modelfile text; `parse(render())` gives back an equal Modelfile."""
        lines: list[str] = []
        if header:
            lines += ["# " + h if h else "#" for h in header.splitlines()]
        lines.append("FROM " + _quote_arg(self.from_, "FROM"))
        lines += ["FROM " + _quote_arg(p, "FROM") for p in self.more_from]
        if self.adapter is not None:
            lines.append("ADAPTER " + _quote_arg(self.adapter, "ADAPTER"))
        if self.draft is not None:
            lines.append("DRAFT " + _quote_arg(self.draft, "DRAFT"))
        if self.template is not None:
            lines.append("TEMPLATE " + _quote_arg(self.template, "TEMPLATE", force=True))
        if self.system is not None:
            lines.append("SYSTEM " + _quote_arg(self.system, "SYSTEM", force=True))
        for name, vals in self.parameters.items():
            if not re.fullmatch(r"[A-Za-z0-9_]+", name):
                raise ModelfileError(f"PARAMETER name {name!r} cannot be written in a Modelfile")
            if name != "stop" and len(vals) != 1:
                raise ModelfileError(f"PARAMETER {name} must have one value (only stop repeats), got {vals!r}")
            for v in vals:
                lines.append(f"PARAMETER {name} " + _quote_arg(v, f"PARAMETER {name}", force=name == "stop"))
        for role, text in self.messages:
            if role not in MESSAGE_ROLES:
                raise ModelfileError(_INVALID_ROLE)
            lines.append(f"MESSAGE {role} " + _quote_arg(text, f"MESSAGE {role}"))
        for lic in self.license:
            lines.append("LICENSE " + _quote_arg(lic, "LICENSE", force="\n" in lic))
        for word, value in (("REQUIRES", self.requires), ("RENDERER", self.renderer), ("PARSER", self.parser)):
            if value is not None:
                lines.append(f"{word} " + _quote_arg(value, word))
        return "\n".join(lines) + "\n"

    # -- API request --------------------------------------------------------------------------
    def typed_parameters(self) -> dict[str, Any]:
        """Parameters as the JSON types /api/create expects (numbers, bools, stop as a list)."""
        out: dict[str, Any] = {}
        for name, vals in self.parameters.items():
            if name in DEPRECATED_PARAMETERS:
                continue
            out[name] = convert_parameter(name, vals)
        return out

    def to_create_request(self, modelfile_dir: str | Path, known_digests: dict[str, str] | None = None) -> CreateRequest:
        """The structured /api/create request `ollama create -f` builds from this Modelfile (contract
        section 3): local FROM/ADAPTER/DRAFT paths resolved against `modelfile_dir` and hashed into
        `files`/`adapters`/`draft_files` (keyed by base name, or by path relative to the common parent
        for directories); a FROM path that does not exist is sent as `from` (a model name)."""
        base = Path(modelfile_dir)
        fields: dict[str, Any] = {}
        blobs: dict[str, Path] = {}

        def hashed(paths: dict[str, Path]) -> dict[str, str]:
            from ..core.files import digest_file

            out = {}
            for key, p in paths.items():
                digest = digest_file(p, known_digests)
                out[key] = digest
                blobs[digest] = p
            return out

        for arg in [self.from_, *self.more_from]:
            p = expand_path(arg, base)
            if not p.exists():
                fields["from"] = arg
                continue
            fields.setdefault("files", {}).update(hashed(files_for_model(p)))
        if self.adapter is not None:
            p = expand_path(self.adapter, base)
            if not p.exists():
                raise ModelfileError(f"ADAPTER path does not exist: {p}")
            fields["adapters"] = hashed(files_for_model(p))
        if self.draft is not None:
            p = expand_path(self.draft, base)
            if not p.exists():
                raise ModelfileError(f"DRAFT path does not exist: {p}")
            fields["draft_files"] = hashed(files_for_model(p))
        if self.template is not None:
            fields["template"] = self.template
        if self.system is not None:
            fields["system"] = self.system
        if self.license:
            fields["license"] = list(self.license)
        params = self.typed_parameters()
        if params:
            fields["parameters"] = params
        if self.messages:
            fields["messages"] = [{"role": r, "content": c} for r, c in self.messages]
        for key in ("renderer", "parser"):
            if getattr(self, key) is not None:
                fields[key] = getattr(self, key)
        if self.requires is not None:
            req = self.requires if self.requires.startswith("v") else "v" + self.requires
            if not re.fullmatch(r"v(0|[1-9]\d*)(\.(0|[1-9]\d*)){0,2}(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?", req):
                raise ModelfileError("requires must be a valid semver (e.g. 0.14.0)")
            fields["requires"] = req[1:]
        return CreateRequest(fields, blobs)


@dataclass
class CreateRequest:
    """`fields`: the /api/create JSON body without `model`; `blobs`: digest -> local file to upload."""

    fields: dict[str, Any]
    blobs: dict[str, Path]


def _is_print(ch: str) -> bool:
    """Go's strconv.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    return ch == " " or unicodedata.category(ch)[0] in "LMNPS"


def _closes_early(quoted_prefix: str) -> bool:
    # At a line break the parser ends the argument when the text so far unquotes.
    return _unquote(_go_trim(quoted_prefix))[1]


def _quote_arg(value: str, what: str, force: bool = False) -> str:
    """The shortest Modelfile argument text that parses back to exactly `value`."""
    bad = [c for c in value if not _is_print(c) and c not in " \t\r\n"]
    if bad:
        raise ModelfileError(
            f"{what} contains a character a Modelfile cannot hold: U+{ord(bad[0]):04X} "
            "(Ollama's parser drops non-printable characters)", hint="remove it or replace it with a space")
    simple = (value and value == value.strip(" \t") and not value.startswith('"')
              and "\n" not in value and "\r" not in value and value == _go_trim(value))
    if simple and not force:
        return value
    for q in ('"""', '"'):
        text = q + value + q
        if _unquote(text) != (value, True):
            continue
        # A line break inside the value must not end the argument early.
        if any(ch in "\r\n" and _closes_early(text[:len(q) + i]) for i, ch in enumerate(value)):
            continue
        return text
    raise ModelfileError(f"{what} cannot be written in a Modelfile: it has a line ending in quotes",
                         hint="change that line")


def _go_trim(s: str) -> str:
    # strings.TrimSpace: Unicode White_Space
    return s.strip(" \t\r\n\v\f\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
                   "\u200a\u2028\u2029\u202f\u205f\u3000")


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        if len(s) >= 6 and s.endswith('"""'):
            return s[3:-3], True
        return "", False
    if s.startswith('"'):
        if len(s) >= 2 and s.endswith('"'):
            return s[1:-1], True
        return "", False
    return s, True


# ------------------------------------------------------------------------------------------
# The parser


def _decode(data: bytes) -> str:
    if data.startswith(b"\xff\xfe") or data.startswith(b"\xfe\xff"):
        return data.decode("utf-16")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.decode("utf-8", errors="replace")


def parse_commands(text: str) -> list[tuple[str, str]]:
    """(name, args) commands as Ollama's parser produces them; FROM is named "model", MESSAGE args are
    "role: text". Raises ModelfileError with Ollama's messages.

    90 lines on purpose: one state machine, laid out like Ollama's parser.go so the two can be compared
    state by state; split into functions it would need its state threaded through all of them."""
    NIL, NAME, VALUE, PARAM, MESSAGE, COMMENT = range(6)
    cmds: list[tuple[str, str]] = []
    name = ""
    role = ""
    buf: list[str] = []
    curr = NIL
    line = 1

    def is_space(c: str) -> bool:
        return c in " \t"

    def is_newline(c: str) -> bool:
        return c in "\r\n"

    def is_alpha(c: str) -> bool:
        return ("a" <= c <= "z") or ("A" <= c <= "Z")

    for ch in text:
        if is_newline(ch):
            line += 1
        # the state machine of parseRuneForState
        if curr == NIL:
            nxt = COMMENT if ch == "#" else NIL if (is_space(ch) or is_newline(ch)) else NAME
            keep = nxt == NAME
        elif curr == NAME:
            if is_alpha(ch):
                nxt, keep = NAME, True
            elif is_space(ch):
                nxt, keep = VALUE, False
            else:
                raise ModelfileError(f"(line {line}): {_INVALID_COMMAND}")
        elif curr == VALUE:
            nxt, keep = (NIL if (is_newline(ch) or is_space(ch)) else VALUE), True
        elif curr in (PARAM, MESSAGE):
            ok = is_alpha(ch) or (curr == PARAM and (ch.isascii() and (ch.isdigit() or ch == "_")))
            if ok:
                nxt, keep = curr, True
            elif is_space(ch):
                nxt, keep = VALUE, False
            else:
                raise ModelfileError("unexpected EOF: " + "".join(buf))
        else:  # COMMENT
            nxt, keep = (NIL if is_newline(ch) else COMMENT), False
        if nxt != curr:
            word = "".join(buf)
            if curr == NAME:
                if word.lower() not in COMMANDS:
                    raise ModelfileError(f"(line {line}): {_INVALID_COMMAND}")
                low = word.lower()
                if low == "from":
                    name = "model"
                elif low == "parameter":
                    nxt = PARAM
                else:
                    name = low
                    if low == "message":
                        nxt = MESSAGE
            elif curr == PARAM:
                name = word
            elif curr == MESSAGE:
                if word not in MESSAGE_ROLES:
                    raise ModelfileError(f"(line {line}): {_INVALID_ROLE}")
                role = word
            elif curr == VALUE:
                value, ok = _unquote(_go_trim(word))
                if not ok or is_space(ch):
                    buf.append(ch)
                    continue
                if role:
                    value, role = role + ": " + value, ""
                cmds.append((name, value))
            buf = []
            curr = nxt
        if keep and _is_print(ch):
            buf.append(ch)
    if curr == VALUE:
        value, ok = _unquote(_go_trim("".join(buf)))
        if not ok:
            raise ModelfileError("unexpected EOF")
        if role:
            value = role + ": " + value
        cmds.append((name, value))
    elif curr not in (NIL, COMMENT):
        raise ModelfileError("unexpected EOF")
    if not any(n == "model" for n, _ in cmds):
        raise ModelfileError("no FROM line")
    return cmds


def parse(text: str | bytes) -> Modelfile:
    """Parse Modelfile text (Ollama's grammar) and validate PARAMETER names and values like
    `ollama create` does. Deprecated parameters are dropped with a warning, as the Ollama CLI does."""
    if isinstance(text, bytes):
        text = _decode(text)
    froms: list[str] = []
    fields: dict[str, Any] = {"parameters": {}, "messages": [], "license": []}
    for name, args in parse_commands(text):
        if name == "model":
            froms.append(args)
        elif name in ("adapter", "template", "system", "requires", "renderer", "parser", "draft"):
            fields[name] = args
        elif name == "license":
            fields["license"].append(args)
        elif name == "message":
            role, _, content = args.partition(": ")
            fields["messages"].append((role, content))
        else:  # a parameter
            if name in DEPRECATED_PARAMETERS:
                ui.warn(f"parameter {name} is deprecated")
                continue
            convert_parameter(name, [args])
            fields["parameters"].setdefault(name, []).append(args)
    # Only stop accumulates; for any other parameter the last value wins, as in `ollama create`.
    fields["parameters"] = {k: (v if k == "stop" else v[-1:]) for k, v in fields["parameters"].items()}
    return Modelfile(from_=froms[0], more_from=froms[1:], **fields)


def parse_file(path: str | Path) -> Modelfile:
    """Parse a Modelfile on disk; errors name the file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read Modelfile {p}: {e.strerror}", hint="check the path and its permissions") from None
    try:
        return parse(data)
    except ModelfileError as e:
        raise ModelfileError(f"{p}: {e.message}", hint=e.hint or "see https://docs.ollama.com/modelfile") from None




# ------------------------------------------------------------------------------------------
# Paths, as `ollama create` resolves them (§2.3)


def expand_path(arg: str, relative_dir: str | Path) -> Path:
    """A FROM/ADAPTER/DRAFT argument as an absolute path (Go's expandPathImpl)."""
    if os.path.isabs(arg) or arg.startswith(("/", "\\")):
        return Path(os.path.abspath(arg))
    if arg.startswith("~"):
        if arg == "~" or arg.startswith("~/"):
            return Path(os.path.abspath(os.path.expanduser("~") + arg[1:]))
        user, _, rest = arg[1:].partition("/")
        import pwd

        try:
            home = pwd.getpwnam(user).pw_dir
        except KeyError:
            raise ModelfileError(f"unknown user in path {arg!r}") from None
        return Path(os.path.abspath(os.path.join(home, rest)))
    return Path(os.path.abspath(os.path.join(str(relative_dir), arg)))


def files_for_model(p: Path) -> dict[str, Path]:
    """The files `ollama create` uploads for a path: the file itself (keyed by base name), or for a
    directory the weights it finds first plus its JSON, chat template and tokenizer.model files."""
    if p.is_file():
        return {p.name: p}
    patterns = [("model*.safetensors", "*/model*.safetensors"), ("consolidated*.safetensors",),
                ("pytorch_model*.bin",), ("consolidated*.pth",), ("*.gguf",), ("*.bin",)]
    found: list[Path] = []
    for group in patterns:
        found = sorted(x for g in group for x in p.glob(g) if x.is_file())
        if found:
            break
    if not found:
        raise ModelfileError("no Modelfile or safetensors files found")
    for g in ("*.json", "*/*.json", "chat_template.jinja", "tokenizer.model"):
        found += sorted(x for x in p.glob(g) if x.is_file() and x not in found)
    return {x.relative_to(p).as_posix(): x for x in found}
