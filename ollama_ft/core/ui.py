"""The only module that builds Rich output. Results go to stdout, progress and logs to stderr."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

out = Console()  # results
err = Console(stderr=True)  # progress, warnings, errors


def info(msg: str) -> None:
    err.print(msg, highlight=False)


def warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/] {msg}", highlight=False)


def success(msg: str) -> None:
    err.print(f"[green]✓[/] {msg}", highlight=False)


def print_error(message: str, hint: str | None = None, details: list[str] | None = None) -> None:
    from rich.markup import escape

    # Messages and hints quote user values (paths, --set values, names): never read them as markup.
    # (emoji=False: a name like 'a:b:c' must not print as 'a🅱c')
    err.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False, markup=True, soft_wrap=True,
              emoji=False)
    for line in details or []:
        err.print(f"  {line}", highlight=False, markup=False, soft_wrap=True, emoji=False)
    if hint:
        err.print(f"[dim]hint:[/] {escape(str(hint))}", highlight=False, soft_wrap=True, emoji=False)


def table(title: str | None, columns: list[str], rows: list[list[object]], console: Console | None = None) -> Table:
    t = Table(title=title, show_lines=False)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[str(x) for x in r])
    (console or out).print(t)
    return t


def progress_bytes() -> Progress:
    """Progress for byte transfers (downloads, uploads, copies)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
        disable=not err.is_terminal and not _force_progress(),
    )


def progress_steps() -> Progress:
    """Progress for countable work (examples, steps, files)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
        disable=not err.is_terminal and not _force_progress(),
    )


@contextlib.contextmanager
def status(msg: str) -> Iterator[None]:
    """A spinner for work without a measurable total."""
    if err.is_terminal:
        with err.status(msg):
            yield
    else:
        info(msg)
        yield


def _force_progress() -> bool:
    import os

    return os.environ.get("OLLAMA_FT_PROGRESS", "") == "1"


def is_interactive() -> bool:
    return sys.stderr.isatty()
