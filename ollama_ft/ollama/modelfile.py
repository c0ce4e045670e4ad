"""Ollama Modelfiles: a model, a writer and a parser that follow Ollama's grammar (../shared/docs/ollama-contract.md §2),
the `/api/create` request `ollama create -f` would send (section 3), and the `modelfile` stage.

The parser is a port of the behaviour of Ollama's parser (a rune-by-rune state machine): instruction
words are case-insensitive ASCII letters, `#` starts a comment only at the start of a line, arguments
are trimmed and then unquoted (`\"\"\"...\"\"\"` or `"..."`, both may span lines, no escapes), runes that Go's
`strconv.IsPrint` rejects are dropped except spaces, tabs and newlines. The writer only produces text
that this parser reads back to the same value, and refuses values a Modelfile cannot hold.
"""

from __future__ import annotations

import json
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
    "role: text". Raises ModelfileError with Ollama's messages."""
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


parse_modelfile_file = parse_file


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


# ------------------------------------------------------------------------------------------
# The `modelfile` stage


def _pick_gguf(gguf_dir: Path, name: str, quant: str) -> Path:
    want = gguf_dir / f"{name}-{quant}.gguf"
    if want.is_file():
        return want
    # The export may have run under another model name (e.g. `modelfile --name` later): same quant.
    same_quant = sorted(p for p in gguf_dir.glob(f"*-{quant}.gguf") if not p.name.endswith(f"-lora-{quant}.gguf"))
    if len(same_quant) == 1:
        return same_quant[0]
    have = ", ".join(sorted(p.name for p in gguf_dir.glob("*.gguf"))) or "none"
    raise UserError(f"{want} does not exist (GGUF files in {gguf_dir}: {have})",
                    hint=f"export that quantization (`ollama-ft export RUN --quant {quant}`) or set ollama.quant")


def training_template(run) -> tuple[str, Path]:
    """(jinja text, path) of the chat template the training data was rendered with."""
    candidates = [run.root / "data" / "chat_template.jinja", run.root / "merged" / "chat_template.jinja"]
    for p in candidates:
        if p.is_file():
            return p.read_text(encoding="utf-8"), p
    raise UserError(f"no training chat template in {run.root} (looked for "
                    + ", ".join(str(p.relative_to(run.root)) for p in candidates) + ")",
                    hint=f"run the data stage first: `ollama-ft train {run.root / 'run.yaml'} --until data`")


def load_run_tokenizer(run):
    """The run's tokenizer (merged/, else base/), as training used it."""
    from transformers import AutoTokenizer

    for d in (run.root / "merged", run.root / "base"):
        if (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file():
            try:
                return AutoTokenizer.from_pretrained(str(d))
            except Exception as e:  # a broken tokenizer directory is a broken earlier stage
                raise UserError(f"cannot load the tokenizer in {d}: {e}",
                                hint="re-run the stage that wrote it (`--force merge` or `--force pull`)") from None
    raise UserError(f"no tokenizer in {run.root / 'merged'} or {run.root / 'base'}",
                    hint="run the pull and merge stages first")


def gguf_metadata(gguf_path: Path, keys: set[str]) -> dict[str, Any]:
    """The wanted GGUF metadata keys that the file has (core/gguf_meta reads them)."""
    from ..core.gguf_meta import GGUFDamaged, read_gguf_meta

    try:
        meta = read_gguf_meta(gguf_path)
    except (GGUFDamaged, OSError) as e:
        raise UserError(f"{gguf_path} is not a readable GGUF file: {e}", hint="re-run the export stage") from None
    return {k: meta.fields[k] for k in keys if k in meta.fields}


def gguf_add_bos(gguf_path: Path) -> bool | None:
    """tokenizer.ggml.add_bos_token of a GGUF (what llama.cpp, hence Ollama, does), None when unset."""
    v = gguf_metadata(Path(gguf_path), {"tokenizer.ggml.add_bos_token"}).get("tokenizer.ggml.add_bos_token")
    return None if v is None else bool(v)


def _data_conversations(run, system: str | None, limit: int = 3):
    """A few conversations from the run's own data, cut after their last user message."""
    from .templates import Conversation

    out = []
    for split in ("validation", "test", "train"):
        p = run.root / "data" / f"{split}.jsonl"
        if not p.is_file():
            continue
        with open(p, encoding="utf-8") as f:
            for line in f:
                if len(out) >= limit:
                    return out
                try:
                    msgs = json.loads(line)["messages"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
                last_user = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=-1)
                if last_user < 0:
                    continue
                pairs = tuple((str(m["role"]), str(m.get("content") or "")) for m in msgs[: last_user + 1])
                out.append(Conversation(f"data/{split}.jsonl line {len(out) + 1}", pairs, system))
    return out


def training_date_string(run, tokenizer) -> str:
    """The "Today Date" a day-dependent template (Llama 3.2) wrote into the training data, read back
    from the tokens in data/*.parquet."""
    import pyarrow.parquet as pq

    for split in ("train", "validation", "test"):
        p = run.root / "data" / f"{split}.parquet"
        if not p.is_file():
            continue
        rows = pq.read_table(p, columns=["input_ids"]).slice(0, 5).column("input_ids").to_pylist()
        for ids in rows:
            m = re.search(r"Today Date: ([0-9A-Za-z ,.:-]{1,40})\n", tokenizer.decode(ids, skip_special_tokens=False))
            if m:
                return m.group(1)
    raise UserError("the training chat template writes the day it rendered ('Today Date: ...'), and that day "
                    f"could not be read back from {run.root / 'data'}/*.parquet",
                    hint="re-run the data stage (`--force data`) so its token files exist")


@dataclass
class _Plan:
    family: Any
    jinja: str
    jinja_path: Path
    tokenizer: Any
    add_bos: bool
    emit_bos: bool
    template: str
    jinja_kwargs: dict[str, Any] = field(default_factory=dict)


def _plan(run, gguf: Path) -> _Plan:
    from .templates import detect_family, explain_detection, get_family, render_hf, tokenizer_adds_bos

    jinja, jpath = training_template(run)
    fam_name = detect_family(jinja)
    if fam_name is None:
        raise UserError(f"the training chat template {jpath} matches no chat family ollama-ft can write a "
                        "Go TEMPLATE for", details=explain_detection(jinja),
                        hint="train with a supported family (set model.chat_template), or add the family to "
                             "ollama_ft/ollama/templates.py")
    fam = get_family(fam_name)
    tok = load_run_tokenizer(run)
    add_bos = gguf_add_bos(gguf)
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tok)
    bos = tok.bos_token
    probe = render_hf(jinja, [{"role": "user", "content": "Hi"}], bos_token=bos, eos_token=tok.eos_token)
    # Training starts with BOS when the template wrote it or the tokenizer added it (data.py).
    trained_bos = bool(bos) and (probe.startswith(bos) or tokenizer_adds_bos(tok))
    emit_bos = trained_bos and not add_bos
    kwargs: dict[str, Any] = {}
    if fam.dated:
        kwargs["date_string"] = training_date_string(run, tok)
    template = fam.build(emit_bos=emit_bos, bos_token=bos, eos_token=tok.eos_token, **kwargs)
    return _Plan(fam, jinja, jpath, tok, bool(add_bos), emit_bos, template, kwargs)


def _fidelity(plan: _Plan, system: str | None, run, *, require_go: bool):
    import shutil as _sh

    from .templates import CONVERSATIONS, check_fidelity

    convs = list(CONVERSATIONS) + _data_conversations(run, system)
    if _sh.which("go") is None and not require_go:
        # Without Go, compare against the family's jinja twin (CI proves it renders like the Go template).
        ui.warn("Go is not installed: checking against the family's reference template instead of Go's "
                "text/template (install golang-go for the full proof, then `ollama-ft modelfile RUN --check`)")
        return _fidelity_without_go(plan, convs)
    return check_fidelity(plan.jinja, plan.template, convs, plan.tokenizer, add_bos=plan.add_bos,
                          jinja_kwargs=plan.jinja_kwargs)


def _fidelity_without_go(plan: _Plan, convs):
    from .templates import ConversationCheck, FidelityReport, ollama_view, render_hf

    tok = plan.tokenizer
    bos, eos = tok.bos_token, tok.eos_token
    results = []
    for conv in convs:
        msgs = ollama_view(conv)
        try:
            a = render_hf(plan.jinja, msgs, bos_token=bos, eos_token=eos, prefill=conv.prefill, **plan.jinja_kwargs)
        except Exception as e:
            results.append(ConversationCheck(conv.name, "skipped", f"the training template refuses it: {e}"))
            continue
        try:
            b = render_hf(plan.family.jinja, msgs, bos_token=bos, eos_token=eos, prefill=conv.prefill,
                          **plan.jinja_kwargs)
        except Exception as e:
            results.append(ConversationCheck(conv.name, "mismatch", f"the family template refuses it: {e}"))
            continue
        ids_a = tok(a, add_special_tokens=False)["input_ids"]
        ids_b = tok(b, add_special_tokens=False)["input_ids"]
        ok = a == b and list(ids_a) == list(ids_b)
        results.append(ConversationCheck(conv.name, "match" if ok else "mismatch",
                                         "" if ok else "renders differently from the family template",
                                         len(ids_a) if ok else None))
    return FidelityReport(plan.family.name, results, plan.add_bos, False, True)


def _fidelity_error(rep, where: str) -> UserError:
    bad = rep.mismatched
    return UserError(
        f"the Go TEMPLATE does not reproduce the training chat template ({where}): "
        f"{len(bad)} of {len(rep.results)} conversations differ",
        details=[f"{r.name}: {r.detail}" for r in bad[:8]],
        hint="this family's Go template needs a fix in ollama_ft/ollama/templates.py; do not register this model "
             "with a hand-written TEMPLATE")


VERSION_DEPENDENT_DEFAULTS = {"repeat_penalty": 1.0}


def think_filter_applies(model_name: str, architecture_family: str | None = None) -> bool:
    """Whether Ollama rewrites earlier assistant turns for this model (server/routes.go filterThinkTags):
    it does for a model whose name (without host, namespace and tag) is exactly `deepseek-r1`, and for
    the qwen3 architecture."""
    bare = model_name.rsplit("/", 1)[-1].split(":", 1)[0].lower()
    return bare == "deepseek-r1" or (architecture_family or "") == "qwen3"


def warn_think_filter(model_name: str, family: str) -> None:
    if think_filter_applies(model_name):
        ui.warn(f"Ollama treats a model named {model_name!r} as deepseek-r1: it cuts earlier assistant turns to "
                "the text after </think> and strips their leading whitespace, which training did not do, so "
                f"multi-turn prompts would differ from training; name it e.g. {model_name.split(':')[0]}-tuned")


def build_modelfile(cfg, run, out: Path) -> dict[str, Any]:
    """Stage `modelfile`: write out/Modelfile (FROM ../gguf/<file>) and modelfiles/<name>.Modelfile
    (relative to the current directory), after proving the TEMPLATE matches the training template."""
    from ..core.runs import atomic_write_text

    out = Path(out)
    name = cfg.ollama_name
    gguf_dir = run.require("export")
    gguf = _pick_gguf(gguf_dir, name, cfg.ollama.quant)
    with ui.status("modelfile: detecting the chat family and loading the tokenizer"):
        plan = _plan(run, gguf)
    system = cfg.ollama.system if cfg.ollama.system is not None else cfg.data.system_prompt
    params: dict[str, list[str]] = {}
    user_params = {k: [] for k in ("stop",)} | dict(cfg.ollama.parameters or {})
    for k, v in user_params.items():
        try:
            params[k] = format_parameter(k, v)
        except ModelfileError as e:
            raise UserError(f"ollama.parameters.{k}: {e.message}", hint=e.hint) from None
    # The family's turn markers always stop generation; user stops come on top.
    params["stop"] = list(dict.fromkeys([*plan.family.stop, *params["stop"]]))
    # Defaults that differ between Ollama versions are written out, so every version decodes alike and as
    # `eval` scored it (llama.cpp, no repeat penalty): v0.24.0 defaults repeat_penalty to 1.1, later ones 1.0.
    for k, v in VERSION_DEPENDENT_DEFAULTS.items():
        params.setdefault(k, format_parameter(k, v))
    warn_think_filter(name, plan.family.name)
    from ..core.files import read_base_meta

    lic = read_base_meta(run.root / "base").get("license")
    licenses = [lic] if isinstance(lic, str) and lic.strip() else []
    with ui.status(f"modelfile: checking the {plan.family.name} TEMPLATE against {plan.jinja_path.name}"):
        rep = _fidelity(plan, system, run, require_go=False)
    if not rep.ok:
        raise _fidelity_error(rep, str(plan.jinja_path))

    def make(from_path: str) -> Modelfile:
        return Modelfile(from_=from_path, template=plan.template, system=system, parameters=params,
                         license=licenses)

    header = (f"Written by ollama-ft for run {run.root.name}: chat family {plan.family.name}.\n"
              f"Register: ollama create {name} -f <this file>")
    run_mf = make(f"../{gguf_dir.name}/{gguf.name}")
    text = run_mf.render(header)
    if parse(text) != run_mf:  # the writer's promise, checked on the real content
        raise UserError("internal error: the Modelfile does not parse back to what was written")
    atomic_write_text(out / "Modelfile", text)
    atomic_write_text(out / "fidelity.json", json.dumps({
        "family": plan.family.name, "training_template": str(plan.jinja_path), "add_bos": plan.add_bos,
        "template_writes_bos": plan.emit_bos, **rep.counts(),
        "results": [{"conversation": r.name, "status": r.status, "detail": r.detail, "tokens": r.tokens}
                    for r in rep.results]}, indent=2, ensure_ascii=False) + "\n")
    shared_dir = Path.cwd() / "modelfiles"
    shared = shared_dir / f"{name}.Modelfile"
    final_gguf = run.root / gguf_dir.name / gguf.name
    rel = os.path.relpath(final_gguf.resolve(), shared_dir.resolve())
    atomic_write_text(shared, make(Path(rel).as_posix()).render(header))
    how = "Go text/template" if rep.go_checked else "family reference (no Go)"
    summary = (f"{plan.family.name} TEMPLATE matches training on {rep.matched} conversations ({how}, strings and "
               f"token ids; {rep.skipped} the template refuses); wrote {shared}")
    return {"modelfile": str(shared), "family": plan.family.name, "gguf": gguf.name,
            "fidelity": rep.counts(), "summary": summary}


def check_run_command(run_ref: str) -> None:
    """`ollama-ft modelfile RUN --check`: render the run's Modelfile TEMPLATE with Go's text/template and
    the training template with transformers, print a table, and fail on any difference."""
    from ..core.runs import Run

    run = Run.open(run_ref)
    mf_path = run.root / "modelfile" / "Modelfile"
    if not mf_path.is_file():
        raise UserError(f"{mf_path} does not exist", hint=f"write it first: `ollama-ft modelfile {run_ref}`")
    mf = parse_file(mf_path)
    if mf.template is None:
        raise UserError(f"{mf_path} has no TEMPLATE", hint=f"rewrite it: `ollama-ft modelfile {run_ref} --force`")
    gguf = expand_path(mf.from_, mf_path.parent)
    if not gguf.is_file():
        raise UserError(f"the Modelfile's FROM {mf.from_} does not exist ({gguf})",
                        hint=f"run `ollama-ft export {run_ref}`")
    plan = _plan(run, gguf)
    plan.template = mf.template  # check what the user will register, not a fresh build
    with ui.status("checking the TEMPLATE with Go's text/template"):
        rep = _fidelity(plan, mf.system, run, require_go=True)
    rows = [[r.name, r.status, r.tokens if r.tokens is not None else "", r.detail[:90]] for r in rep.results]
    ui.table(f"TEMPLATE fidelity: {mf_path.relative_to(run.root)} vs {plan.jinja_path.relative_to(run.root)} "
             f"in {run.root.name} ({plan.family.name}, GGUF adds BOS: {'yes' if plan.add_bos else 'no'})",
             ["conversation", "result", "tokens", "detail"], rows)
    if not rep.ok:
        raise _fidelity_error(rep, str(plan.jinja_path))
    ui.success(f"{rep.matched} conversations render to identical strings and token ids "
               f"({rep.skipped} refused by the training template)")
