"""Run vs run: `ollama-ft eval RUN --against OTHER_RUN` compares two tuned models like base vs tuned.

OTHER_RUN's tuned model takes the base's place ("base" side = the reference, "tuned" side = RUN);
both must have been evaluated on the same test split, checked by the content hash of their
data/test.jsonl. Each side keeps its own tokens and chat template (the runs may have different
bases). The report goes to runs/RUN/report-vs-OTHER/ and names the lineage of both sides.
"""

from __future__ import annotations

from pathlib import Path

from ..core import ui
from ..core.config import load_config
from ..core.errors import UserError
from ..core.runs import Run
from . import stage
from .inputs import chat_template, load_examples, tuned_gguf
from .lineage import lineage, lineage_text, split_digest


def eval_against(run_ref: str, other_ref: str, overrides: list[str] | None = None) -> Path:
    """Evaluate RUN's tuned model against OTHER's; returns the report directory."""
    run, other = Run.open(run_ref), Run.open(other_ref)
    if run.root.resolve() == other.root.resolve():
        raise UserError(f"--against {other.root} is the run itself",
                        hint="compare with another run, or leave --against out for base vs tuned")
    mine, theirs = split_digest(run), split_digest(other)
    if mine != theirs:
        raise UserError(f"{run.root.name} and {other.root.name} have different test splits "
                        f"(data/test.jsonl sha256 {mine[:12]} vs {theirs[:12]}): a comparison on different "
                        "questions would mean nothing",
                        hint="tune both runs on the same data file with the same data.split and seed, "
                             "then re-run their data stages")
    cfg = load_config(run.root / "run.yaml", overrides or []).config
    ocfg = load_config(other.root / "run.yaml").config
    limit = cfg.eval.max_examples
    sides = []
    for r, c, label in ((other, ocfg, f"tuned ({other.root.name})"), (run, cfg, f"tuned ({run.root.name})")):
        template = chat_template(r)
        if template is None:
            raise UserError(f"no chat template in {r.root / 'data'}", hint=f"re-run `ollama-ft data {r.root}`")
        gguf = tuned_gguf(c, r)
        # both sides at the registered quant of RUN where the other run exported it, else its own
        same_quant = (r.root / "gguf" / f"{c.ollama_name}-{cfg.ollama.quant}.gguf")
        if r is other and same_quant.is_file():
            gguf = same_quant
        sides.append(stage.Side(label, gguf, f"{gguf.name} ({r.root.name})", load_examples(r.root / "data", "test", limit),
                                template, None, lineage(r, c)))
    out = run.root / f"report-vs-{other.root.name}"
    ui.info(f"run vs run: {lineage_text(sides[1].lineage)} against {lineage_text(sides[0].lineage)}")
    stage.evaluate(cfg, run, sides[0], sides[1], out, comparison="run vs run", drift=False)
    ui.success(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return out
