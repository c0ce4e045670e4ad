"""Does the Go TEMPLATE render like the training chat template? The run's templates (`RunTemplates`: the
training jinja, the family's Go TEMPLATE built for this tokenizer, BOS handling) and their comparison
on the fidelity conversations plus a few from the run's own data: with Go's text/template
(templates.check_fidelity), or, without Go, against the family's reference jinja."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import ui
from ..core.errors import UserError


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
class RunTemplates:
    """The chat templates of a run: what training rendered (jinja) and the Go TEMPLATE written for Ollama."""

    family: Any
    jinja: str
    jinja_path: Path
    tokenizer: Any
    add_bos: bool
    emit_bos: bool
    template: str
    jinja_kwargs: dict[str, Any] = field(default_factory=dict)


def run_templates(run, gguf: Path) -> RunTemplates:
    """Detect the family of the training template and build its Go TEMPLATE for this run's tokenizer and GGUF."""
    from ..core.gguf_meta import gguf_add_bos
    from .templates import detect_family, explain_detection, get_family, render_hf, tokenizer_adds_bos

    jinja, jpath = training_template(run)
    fam_name = detect_family(jinja)
    if fam_name is None:
        raise UserError(f"the training chat template {jpath} matches no chat family ollama-ft can write a "
                        "Go TEMPLATE for", details=explain_detection(jinja),
                        hint="train with a supported family (set model.chat_template), or add the family to "
                             "ollama_ft/ollama/families.py")
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
    return RunTemplates(fam, jinja, jpath, tok, bool(add_bos), emit_bos, template, kwargs)


def check_templates(tpl: RunTemplates, system: str | None, run, *, require_go: bool):
    """The fidelity report of tpl.template against the training jinja (Go's text/template, or without Go
    and unless require_go, the family's reference jinja)."""
    from .templates import CONVERSATIONS, check_fidelity

    convs = list(CONVERSATIONS) + _data_conversations(run, system)
    if shutil.which("go") is None and not require_go:
        # Without Go, compare against the family's jinja twin (CI proves it renders like the Go template).
        ui.warn("Go is not installed: checking against the family's reference template instead of Go's "
                "text/template (install golang-go for the full proof, then `ollama-ft modelfile RUN --check`)")
        return _against_family_reference(tpl, convs)
    return check_fidelity(tpl.jinja, tpl.template, convs, tpl.tokenizer, add_bos=tpl.add_bos,
                          jinja_kwargs=tpl.jinja_kwargs)


def _against_family_reference(tpl: RunTemplates, convs):
    from .templates import ConversationCheck, FidelityReport, ollama_view, render_hf

    tok = tpl.tokenizer
    bos, eos = tok.bos_token, tok.eos_token
    results = []
    for conv in convs:
        msgs = ollama_view(conv)
        try:
            a = render_hf(tpl.jinja, msgs, bos_token=bos, eos_token=eos, prefill=conv.prefill, **tpl.jinja_kwargs)
        except Exception as e:
            results.append(ConversationCheck(conv.name, "skipped", f"the training template refuses it: {e}"))
            continue
        try:
            b = render_hf(tpl.family.jinja, msgs, bos_token=bos, eos_token=eos, prefill=conv.prefill,
                          **tpl.jinja_kwargs)
        except Exception as e:
            results.append(ConversationCheck(conv.name, "mismatch", f"the family template refuses it: {e}"))
            continue
        ids_a = tok(a, add_special_tokens=False)["input_ids"]
        ids_b = tok(b, add_special_tokens=False)["input_ids"]
        ok = a == b and list(ids_a) == list(ids_b)
        results.append(ConversationCheck(conv.name, "match" if ok else "mismatch",
                                         "" if ok else "renders differently from the family template",
                                         len(ids_a) if ok else None))
    return FidelityReport(tpl.family.name, results, tpl.add_bos, False, True)


def fidelity_error(rep, where: str) -> UserError:
    bad = rep.mismatched
    return UserError(
        f"the Go TEMPLATE does not reproduce the training chat template ({where}): "
        f"{len(bad)} of {len(rep.results)} conversations differ",
        details=[f"{r.name}: {r.detail}" for r in bad[:8]],
        hint="this family's Go template needs a fix in ollama_ft/ollama/families.py; do not register this model "
             "with a hand-written TEMPLATE")
