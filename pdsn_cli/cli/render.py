"""Everything the terminal shows: progress bars, key/value summaries, and the result tables of
``pdsn_cli.report.tables`` drawn with Rich."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table as RichTable
from rich.text import Text

from pdsn_cli.data.faces import printable
from pdsn_cli.report.tables import Table

console = Console(stderr=True)  # progress, logs and errors
out = Console()  # results


def literal(value, style: str = "") -> Text:
    """Any value shown as the text it is: never read as Rich markup or emoji codes (file names such as
    ``[bold]x.jpg`` or ``:x:.jpg``), its control characters (ESC sequences) shown escaped, line breaks kept."""
    return Text("\n".join(printable(line) for line in str(value).split("\n")), style=style)


def say(console_: Console, value, style: str = "") -> None:
    """Print one message literally (see ``literal``); a ``style`` colours the whole line."""
    console_.print(literal(value, style), highlight=False, soft_wrap=True)


def warn(warnings: list[str]) -> None:
    """The engine's warnings (``result["warnings"]``), one line each, on the log console."""
    for w in warnings:
        console.print(Text("warning: ", style="bold yellow") + literal(w), highlight=False, soft_wrap=True)


class Bars:
    """Rich progress bars keyed by task name; ``bars.cb(name)`` gives an engine-side callback(done, total)."""

    def __init__(self, quiet: bool = False):
        self.p = Progress(
            TextColumn("{task.description:<14}", markup=False), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=quiet, transient=False,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.p.__enter__()
        return self

    def __exit__(self, *a):
        return self.p.__exit__(*a)

    def cb(self, name: str):
        def update(done, total):
            if name not in self.tasks:
                self.tasks[name] = self.p.add_task(name, total=total)
            self.p.update(self.tasks[name], completed=done, total=total)

        return update

    def multi(self):
        """A callback(name, done, total) that opens one bar per stage name."""
        return lambda name, done, total: self.cb(name)(done, total)


def kv_table(title: str, rows: dict) -> RichTable:
    t = RichTable(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows.items():
        t.add_row(literal(k), literal(v))
    return t


def skipped_table(skipped: list[dict], limit: int = 20) -> RichTable:
    t = RichTable(title=f"skipped files ({len(skipped)})", title_justify="left")
    t.add_column("file")
    t.add_column("reason")
    for s in skipped[:limit]:
        t.add_row(literal(s["path"]), literal(s["reason"]))
    if len(skipped) > limit:
        t.add_row(f"… {len(skipped) - limit} more (see --json)", "")
    return t


def rich_table(table: Table) -> RichTable:
    """A report table for the terminal; wide ones (many gallery sizes) drop the box to fit."""
    wide = len(table.columns) > 6  # identification: one column per gallery size
    t = RichTable(title=literal(table.title), title_justify="left", show_header=table.show_header,
                  **(dict(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True) if wide else {}))
    for c in table.columns:
        # names and paths that do not fit are folded onto the next line, never cut
        t.add_column(literal(c.header), justify="right" if c.numeric else ("center" if not table.show_header else "left"),
                     no_wrap=wide, overflow="ellipsis" if c.numeric or wide else "fold")
    for row in table.rows:
        t.add_row(*(literal(cell) for cell in row))
    return t
