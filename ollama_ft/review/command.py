"""`ollama-ft review RUN`: serve the page, export CSV, or re-render the report from the ratings."""

from __future__ import annotations

import getpass
import json
import re
import secrets
import webbrowser
from pathlib import Path

from ..core import ui
from ..core.config import load_config
from ..core.errors import UserError
from ..core.runs import Run
from .items import load_comparison
from .store import REVIEWER_RE, ReviewStore, csv_unblinded, write_csv


def default_reviewer() -> str:
    try:
        name = re.sub(r"[^A-Za-z0-9_.-]", "", getpass.getuser())[:40]
    except (KeyError, OSError):
        name = ""
    return name if REVIEWER_RE.match(name) else "reviewer"


def _seed(run: Run) -> int:
    run_yaml = run.root / "run.yaml"
    return load_config(run_yaml).config.review.seed if run_yaml.is_file() else 0


def rerender_report(run: Run, against: Run | None = None) -> Path:
    """Write the eval report again from its metrics.json plus the ratings (no model is run)."""
    from ..eval import report as eval_report

    out = run.root / ("report" if against is None else f"report-vs-{against.root.name}")
    path = out / "metrics.json"
    if not path.is_file():
        how = f"ollama-ft eval {run.root}" + (f" --against {against.root}" if against is not None else "")
        raise UserError(f"run {run.root.name} has no eval yet ({path} is missing)", hint=f"evaluate it first: `{how}`")
    metrics = json.loads(path.read_text(encoding="utf-8"))
    eval_report.write_report(metrics, run, out)
    if "## Human review" not in (out / "report.md").read_text(encoding="utf-8"):
        ui.warn(f"no complete ratings under {run.root / 'review'} yet; the report has no human-review section")
    return out / "report.md"


def review_command(run_ref: str, against: str | None = None, reviewer: str | None = None, port: int = 0,
                   open_browser: bool = False, export_csv: Path | None = None, report: bool = False) -> None:
    run = Run.open(run_ref)
    other = Run.open(against) if against else None
    if report:
        md = rerender_report(run, other)
        ui.success(f"report re-rendered with the ratings: {md}")
        return
    comparison = load_comparison(run, other)
    if export_csv is not None:
        write_csv(export_csv, csv_unblinded(comparison))
        ui.success(f"all reviewers' ratings ({comparison.key}, sides named) -> {export_csv}")
        return
    store = ReviewStore(comparison, reviewer or default_reviewer(), seed=_seed(run))
    with store.exclusive():  # before the URL is printed: a second server for the same reviewer stops here
        _serve(store, port, open_browser)
    ui.success(f"review stopped; ratings in {store.path}. Report: `{store.report_command}`")


def _serve(store: ReviewStore, port: int, open_browser: bool) -> None:
    from .server import bind, create_app, serve

    comparison = store.comparison
    token = secrets.token_urlsafe(24)
    sock = bind(port)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/?token={token}"
    st = store.page_state()
    ui.info(f"reviewer {store.reviewer}: {st['done']} of {len(st['items'])} items rated so far "
            f"({comparison.labels['tuned']} vs {comparison.labels['base']}, shown blind as A/B)")
    if st["stale"]:
        ui.warn(f"{st['stale']} earlier rating(s) set aside: their answers changed since (eval re-run)")
    ui.info(f"ratings are saved after every key press to {store.path}")
    # The URL on stdout, alone on its line, so scripts (and the tests) can read it.
    print(f"review page: {url}", flush=True)
    ui.info("open it in a browser on this machine; Ctrl-C stops the server (ratings are already saved)")
    if open_browser:
        webbrowser.open(url)
    try:
        serve(create_app(store, token), sock)
    finally:
        sock.close()
