"""Ollama model names (`[host/][namespace/]model[:tag]`, the rules Ollama's server applies; ../shared/docs/ollama-contract.md §4.3-4.4).

In core because the config checks ollama.name/ollama.tag when it is loaded, and the ollama package
(store, API, registry) builds on the same names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

# part -> (max length, extra characters allowed after the first one). The first character is
# always [A-Za-z0-9_]; every later one is alnum, `_`, `-` plus the extras.
_PART_RULES = {
    "host": (350, "_-.:"),
    "namespace": (80, "_-"),
    "model": (80, "_-."),
    "tag": (80, "_-."),
}
_MISSING = object()  # a part promised by a separator but empty ("m:", "/m")


def _rule_text(part: str) -> str:
    longest, extra = _PART_RULES[part]
    others = ", ".join(f"'{c}'" for c in extra)
    return (f"the {part} must be 1-{longest} characters, start with a letter, digit or '_', "
            f"and contain only letters, digits, {others}")


def _part_ok(part: str, s: str) -> bool:
    longest, extra = _PART_RULES[part]
    if not 1 <= len(s) <= longest:
        return False
    if not (s[0].isascii() and (s[0].isalnum() or s[0] == "_")):
        return False
    return all(c.isascii() and (c.isalnum() or c in extra) for c in s[1:])


@dataclass(frozen=True)
class ModelName:
    """A fully qualified Ollama model name. Case is kept as given; compare with `same_as`."""

    host: str = DEFAULT_HOST
    namespace: str = DEFAULT_NAMESPACE
    model: str = ""
    tag: str = DEFAULT_TAG
    scheme: str = field(default="", compare=False)  # "http"/"https" when the name carried one

    @property
    def display(self) -> str:
        """Shortest display form, as Ollama lists it: `m:latest`, `ns/m:tag`, `host/ns/m:tag`."""
        if self.host.lower() != DEFAULT_HOST:
            prefix = f"{self.host}/{self.namespace}/"
        elif self.namespace.lower() != DEFAULT_NAMESPACE:
            prefix = f"{self.namespace}/"
        else:
            prefix = ""
        return f"{prefix}{self.model}:{self.tag}"

    @property
    def full(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def manifest_relpath(self) -> Path:
        return Path("manifests", self.host, self.namespace, self.model, self.tag)

    @property
    def repository(self) -> str:
        """`namespace/model`: the repository path in a registry (§5)."""
        return f"{self.namespace}/{self.model}"

    def same_as(self, other: ModelName) -> bool:
        """Ollama's lookups ignore case."""
        return self.full.lower() == other.full.lower()

    def __str__(self) -> str:
        return self.display


def _cut_last(s: str, sep: str) -> tuple[str, object, bool]:
    """Cut at the last `sep`; an empty side of a present separator is a missing part."""
    i = s.rfind(sep)
    if i < 0:
        return s, "", False
    before, after = s[:i], s[i + len(sep):]
    return before, (after or _MISSING), True


def parse_name(s: str) -> ModelName:
    """Parse `[scheme://][host/][namespace/]model[:tag]` like Ollama, fill the defaults, validate.

    Raises UserError quoting the name and the rule it breaks.
    """
    raw = s
    if not isinstance(s, str) or not s:
        raise UserError("invalid model name: the name is empty",
                        hint="use a name like `my-model` or `my-model:v1`")
    parts: dict[str, object] = {"host": "", "namespace": "", "model": "", "tag": ""}
    # The tag is cut only if the last ':' comes after the last '/' (a host may carry a port).
    if s.rfind(":") > s.rfind("/"):
        s, parts["tag"], _ = _cut_last(s, ":")
    s, model, promised = _cut_last(s, "/")
    scheme = ""
    if not promised:
        parts["model"] = s
    else:
        parts["model"] = model
        s, ns, promised = _cut_last(s, "/")
        if not promised:
            parts["namespace"] = s or _MISSING
        else:
            parts["namespace"] = ns
            if "://" in s:
                scheme, _, s = s.partition("://")
            parts["host"] = s or _MISSING
    filled = {
        "host": parts["host"] or DEFAULT_HOST,
        "namespace": parts["namespace"] or DEFAULT_NAMESPACE,
        "model": parts["model"],
        "tag": parts["tag"] or DEFAULT_TAG,
    }
    for part in ("host", "namespace", "model", "tag"):
        value = filled[part]
        if value is _MISSING:
            raise UserError(f"invalid model name {raw!r}: the {part} is empty",
                            hint="write `[host/namespace/]model[:tag]`, e.g. `my-model:v1`")
        if not _part_ok(part, str(value)):
            hint = "write `[host/namespace/]model[:tag]`, e.g. `my-model:v1`"
            if part == "namespace" and (":" in str(value) or "." in str(value)):
                hint = ("a registry host needs a namespace too: write `host:port/namespace/model:tag` "
                        "(e.g. `localhost:5000/team/my-model:v1`)")
            raise UserError(f"invalid model name {raw!r}: {part} {str(value)!r} is not valid; {_rule_text(part)}",
                            hint=hint)
    if scheme and scheme.lower() not in ("http", "https"):
        raise UserError(f"invalid model name {raw!r}: scheme {scheme!r} must be http or https",
                        hint="write `[host/namespace/]model[:tag]`, e.g. `my-model:v1`")
    return ModelName(host=str(filled["host"]), namespace=str(filled["namespace"]), model=str(filled["model"]),
                     tag=str(filled["tag"]), scheme=scheme)


def is_valid_name(s: str) -> bool:
    try:
        parse_name(s)
    except UserError:
        return False
    return True
