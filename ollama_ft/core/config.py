"""Run configuration: YAML files validated into typed settings per stage.

Why this is more than `yaml.safe_load` + pydantic:
- unknown keys are errors that name file:line and suggest the closest known key;
- every problem in a file is reported at once, not the first one;
- YAML 1.1 reads `1e-5` as a string; here it is a float;
- `--set section.key=value` overrides are applied on top, and every value remembers where it came
  from (default, file:line, or --set), which is saved beside the run as `config.resolved.json`.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .config_schema import (  # noqa: F401 - the schema is part of this module's public face
    _DATA_FORMATS,
    _LAYERS_RE,
    SECTIONS,
    BalanceSettings,
    CombinedWeights,
    DataSettings,
    EvalSettings,
    ExportSettings,
    LoraSettings,
    ModelSettings,
    NearDuplicateSettings,
    OllamaSettings,
    OptimizerSettings,
    PerplexityOutlierSettings,
    PublishSettings,
    QualitySettings,
    ReplaySettings,
    ReviewSettings,
    RunConfig,
    StageSpec,
    TrainingSettings,
    _Section,
)
from .errors import UserError

# --------------------------------------------------------------------------------------------
# YAML loading with line numbers.


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-5` and `3E+4` as floats (YAML 1.1 wants a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_with_lines(node: yaml.Node, path: tuple, lines: dict[tuple, int], loader: _Loader) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for k_node, v_node in node.value:
            key = loader.construct_object(k_node)
            key = str(key)
            lines[(*path, key)] = k_node.start_mark.line + 1
            out[key] = _construct_with_lines(v_node, (*path, key), lines, loader)
            lines[(*path, key)] = k_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct_with_lines(v, (*path, i), lines, loader) for i, v in enumerate(node.value)]
    try:
        return loader.construct_object(node, deep=True)
    except (ValueError, TypeError, OverflowError) as e:  # `!!int abc`, `!!float x`: point at the value
        raise yaml.constructor.ConstructorError(None, None, f"cannot read {node.value!r} as {node.tag}: {e}",
                                                node.start_mark) from None


def load_yaml_with_lines(text: str, source: str) -> tuple[dict[str, Any], dict[tuple, int]]:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise UserError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}",
                        hint="check indentation and quoting on that line") from None
    finally:
        loader.dispose()
    if node is None:
        return {}, {}
    lines: dict[tuple, int] = {}
    try:
        data = _construct_with_lines(node, (), lines, _Loader(""))
    except yaml.YAMLError as e:  # e.g. an unknown or unsafe tag (!!python/object), a bad !!int
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise UserError(f"{where}: cannot read this YAML value: {getattr(e, 'problem', None) or e}",
                        hint="remove the tag (!!...) or quote the value") from None
    except RecursionError:  # an alias that contains itself (&a [*a])
        raise UserError(f"{source}: a YAML alias refers to itself", hint="remove the recursive anchor/alias") from None
    if not isinstance(data, dict):
        raise UserError(f"{source}:1: a config must be a mapping of sections, got {type(data).__name__}",
                        hint="start from configs/demo.yaml: sections like `model:`, `data:`, `training:`")
    return data, lines


# --------------------------------------------------------------------------------------------
# Validation with all errors at once.


def _known_keys(model: type[BaseModel]) -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        keys[name] = field
        if field.alias:
            keys[field.alias] = field
    return keys


def _check_unknown(data: dict, model: type[BaseModel], path: tuple, problems: list[tuple[tuple, str]]) -> None:
    known = _known_keys(model)
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            # A key that belongs one level elsewhere is a common slip (e.g. `patience` at top level).
            elsewhere = [f"{s}.{key}" for s in SECTIONS if not path and key in _section_model(s).model_fields]
            msg = f"unknown key '{'.'.join(map(str, (*path, key)))}'"
            if close:
                msg += f" (did you mean '{'.'.join(map(str, (*path, close[0])))}'?)"
            elif elsewhere:
                msg += f" (did you mean '{elsewhere[0]}'?)"
            else:
                msg += f"; known keys here: {', '.join(sorted(k for k in known if not k.startswith('_')))}"
            problems.append(((*path, key), msg))
            continue
        ann = known[key].annotation
        sub = _dict_model(ann)
        if isinstance(value, dict) and sub is not None:
            _check_unknown(value, sub, (*path, key), problems)
        item = _list_item_model(ann)
        if isinstance(value, list) and item is not None:  # e.g. stages: [{name, data, ...}]
            for i, v in enumerate(value):
                if isinstance(v, dict):
                    _check_unknown(v, item, (*path, key, i), problems)


def _list_item_model(ann: Any) -> type[BaseModel] | None:
    """The model of a `list[SomeModel]` field, else None."""
    args = getattr(ann, "__args__", ())
    if getattr(ann, "__origin__", None) is list and args and isinstance(args[0], type) \
            and issubclass(args[0], BaseModel):
        return args[0]
    return None


def _dict_model(ann: Any) -> type[BaseModel] | None:
    """The model of a `SomeModel` or `SomeModel | None` field (e.g. data.replay), else None."""
    for t in (ann, *getattr(ann, "__args__", ())):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _section_model(name: str) -> type[BaseModel]:
    return RunConfig.model_fields[name].annotation  # type: ignore[return-value]


def _line_for(path: tuple, lines: dict[tuple, int]) -> int | None:
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return lines.get(())


# Short forms seen in existing fine-tuning guides, mapped onto this schema.
_SHORT_FORM_VALUES = {("model", "adapter"): {"qlora": "qlora", "lora": "lora"}}


def _normalise_short_form(data: dict) -> dict:
    model = data.get("model")
    if isinstance(model, dict):
        # `adapter: lora` + `quantization: bitsandbytes_4bit` is QLoRA in the guides' vocabulary.
        if model.get("adapter") == "lora" and model.get("quantization") == "bitsandbytes_4bit":
            model = {**model, "adapter": "qlora"}
            data = {**data, "model": model}
    return data


_ATTENTION_TYPES = {"flash_attn": "flash_attention_2", "flash_attention": "flash_attention_2",
                    "flash_attention_2": "flash_attention_2", "fa2": "flash_attention_2", "sdpa": "sdpa",
                    "eager": "eager", "auto": "auto"}


def _guide_blocks(data: dict, sources: dict[str, str], problems: list[tuple[tuple, str]]) -> dict:
    """Top-level blocks copied from fine-tuning guides: `attention: {type: flash_attn}` becomes
    model.attn_implementation; a `quantization:` block (quantization-aware training, e.g. AWQ) gets the
    route ollama-ft takes instead, rather than a did-you-mean to model.quantization."""
    att = data.get("attention")
    if isinstance(att, dict) and set(att) <= {"type"} and str(att.get("type", "")).lower() in _ATTENTION_TYPES:
        impl = _ATTENTION_TYPES[str(att["type"]).lower()]
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        data = {k: v for k, v in data.items() if k != "attention"}
        data["model"] = {**model, "attn_implementation": model.get("attn_implementation", impl)}
        sources.setdefault("model.attn_implementation", f"{sources.get('attention.type', '?')} (attention.type)")
    elif att is not None:
        problems.append((("attention",), f"'attention': expected `attention: {{type: flash_attn}}` (or sdpa, "
                         f"eager); it sets model.attn_implementation (got {att!r})"))
        data = {k: v for k, v in data.items() if k != "attention"}
    q = data.get("quantization")
    if q is not None:
        kind = q.get("type") if isinstance(q, dict) else q
        problems.append((("quantization",), (
            f"'quantization' (type: {kind}): quantization-aware training (AWQ/GPTQ-style weight_dtype/"
            "activate_dtype) is not the route ollama-ft takes. It trains QLoRA on an NF4 4-bit base "
            "(model.adapter: qlora, model.quantization: bitsandbytes_4bit), merges into the full-precision "
            "base, then quantizes to GGUF k-quants (export.quants: [Q4_K_M, Q5_K_M, Q6_K, Q8_0]); the eval "
            "report's per-quant drift table shows what each quant costs. Remove this block and choose the "
            "served quant with export.quants / ollama.quant")))
        data = {k: v for k, v in data.items() if k != "quantization"}
    return data


def _parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    if "=" not in item:
        raise UserError(f"--set '{item}': expected section.key=value", hint="e.g. --set training.epochs=2")
    key, raw = item.split("=", 1)
    path = tuple(p for p in key.strip().split(".") if p)
    if not path:
        raise UserError(f"--set '{item}': empty key", hint="e.g. --set training.epochs=2")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:
        raise UserError(f"--set '{item}': the value is not valid YAML ({getattr(e, 'problem', None) or e})",
                        hint="quote it (--set 'key=\"text\"') or write a list as [a, b]") from None
    return path, value


def _set_path(data: dict, path: tuple[str, ...], value: Any) -> None:
    cur = data
    for p in path[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[path[-1]] = value


def _flatten(d: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    if isinstance(d, dict) and d:
        out: dict[tuple, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, (*prefix, k)))
        return out
    return {prefix: d}


class LoadedConfig:
    """A validated RunConfig plus where each value came from."""

    def __init__(self, config: RunConfig, sources: dict[str, str], path: Path | None):
        self.config = config
        self.sources = sources
        self.path = path

    def resolved(self) -> dict[str, Any]:
        values = _flatten(self.config.model_dump(mode="json"))
        return {
            ".".join(map(str, k)): {"value": v, "source": self.sources.get(".".join(map(str, k)), "default")}
            for k, v in values.items()
        }

    def save(self, run_dir: Path) -> None:
        """Write run.yaml (the effective config) and config.resolved.json (values + sources)."""
        from .runs import atomic_write_text

        atomic_write_text(run_dir / "run.yaml", yaml.safe_dump(self.config.model_dump(mode="json"), sort_keys=False))
        atomic_write_text(run_dir / "config.resolved.json", json.dumps(self.resolved(), indent=2) + "\n")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> LoadedConfig:
    """Load, merge --set overrides, validate; raise one UserError listing every problem."""
    data: dict[str, Any] = {}
    lines: dict[tuple, int] = {}
    source = "<defaults>"
    p: Path | None = None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}", hint="see configs/ for examples, e.g. configs/demo.yaml")
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise UserError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})",
                            hint="re-save the file as UTF-8 (e.g. `iconv -f latin1 -t UTF-8`)") from None
        data, lines = load_yaml_with_lines(text, source)
    sources = {".".join(map(str, k)): f"{source}:{lines.get(k, '?')}" for k in _flatten(data) if k}
    for item in overrides or []:
        opath, value = _parse_override(item)
        _set_path(data, opath, value)
        for k in _flatten(value, opath):
            sources[".".join(map(str, k))] = f"--set {item}"
    data = _normalise_short_form(data)

    problems: list[tuple[tuple, str]] = []
    data = _guide_blocks(data, sources, problems)
    _check_unknown(data, RunConfig, (), problems)
    # Validate what is left so that type errors are reported together with unknown keys.
    cleaned = _drop_paths(data, [pp for pp, _ in problems])
    config: RunConfig | None = None
    try:
        config = RunConfig.model_validate(cleaned)
    except ValidationError as e:
        for err in e.errors():
            loc = tuple(err["loc"])
            val = err.get("input")
            shown = f" (got {val!r})" if not isinstance(val, dict) and val is not None else ""
            problems.append((loc, f"'{'.'.join(map(str, loc)) or '<top>'}': {err['msg']}{shown}"))
    if config is not None:
        problems.extend(_ollama_name_problems(config))
    if problems:
        details = []
        for ppath, msg in sorted(problems, key=lambda x: _line_for(x[0], lines) or 0):
            line = _line_for(ppath, lines)
            where = f"{source}:{line}" if line and p else source
            for n in range(len(ppath), 0, -1):  # a value given with --set is located by that --set
                given = sources.get(".".join(map(str, ppath[:n])), "")
                if given.startswith("--set "):
                    where = given
                    break
            details.append(f"{where}: {msg}")
        raise UserError(f"{source}: {len(problems)} problem(s) in the config", details=details,
                        hint="fix the keys above; `ollama-ft train --help` lists the sections")
    assert config is not None
    if config.name is None:
        config.name = p.stem if p else "run"
        sources["name"] = f"file name of {source}"
    return LoadedConfig(config, sources, p)


def _ollama_name_problems(config: RunConfig) -> list[tuple[tuple, str]]:
    """ollama.name / ollama.tag checked when the config is loaded, not hours later at `register`:
    Ollama refuses names like 'Bad Name!' or 'a:b:c'."""
    from .names import parse_name

    out = []
    for key, value in (("name", config.ollama.name), ("tag", config.ollama.tag)):
        if value is None:
            continue
        try:
            parse_name(value if key == "name" else f"model:{value}")
        except UserError as e:
            msg = e.message.replace("invalid model name 'model:", "invalid tag '")
            out.append((("ollama", key), f"'ollama.{key}': {msg} (got {value!r})"))
    return out


def _drop_paths(data: dict, paths: list[tuple]) -> dict:
    out = json.loads(json.dumps(data, default=str))
    for path in paths:
        cur = out
        for k in path[:-1]:
            if isinstance(cur, list):  # a list item, e.g. stages[0]
                cur = cur[k] if isinstance(k, int) and 0 <= k < len(cur) else {}
            else:
                cur = cur.get(k, {}) if isinstance(cur, dict) else {}
        if isinstance(cur, dict):
            cur.pop(path[-1], None)
    return out
