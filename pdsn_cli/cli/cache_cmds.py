"""Cache commands: ``cache info``, ``cache verify``, ``cache clear`` over ``pdsn_cli.data.cache_admin``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table as RichTable

from pdsn_cli.cli.app import JSON_OUT, cache_app, handled, write_json
from pdsn_cli.cli.render import kv_table, literal, out
from pdsn_cli.data.cache_admin import KINDS, cache_info, clear_cache, verify_cache
from pdsn_cli.errors import EXIT_SKIPPED

CACHE_DIR = typer.Option(None, "--cache-dir", help="The cache folder (default: $PDSN_CACHE, else ~/.cache/pdsn).")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


@cache_app.command("info", epilog="""Example:

    pdsn cache info
""")
def cache_info_cmd(cache_dir: Optional[Path] = CACHE_DIR, json_path: Optional[Path] = JSON_OUT):
    """What the cache holds: aligned-chip folders (data, template, shards, images) and feature files."""
    with handled():
        res = cache_info(cache_dir)
        write_json(json_path, res)
    t = RichTable(title=literal(f"cache {res['cache_dir']}" + ("" if res["exists"] else " (empty: no such folder)")),
                  title_justify="left")
    for header in ("chips of", "template", "shards", "images", "size"):
        t.add_column(header, justify="right" if header in ("shards", "images", "size") else "left")
    for c in res["chips"]["folders"]:
        t.add_row(literal(c["data_root"] or Path(c["folder"]).parent.name), literal(c["template"]), str(c["shards"]),
                  str(c["images"]), _size(c["bytes"]))
    t.add_row("features", "", str(res["features"]["files"]), "", _size(res["features"]["bytes"]))
    out.print(t)
    out.print(f"total {_size(res['bytes'])}")


@cache_app.command("verify", epilog="""Examples:

    pdsn cache verify

    pdsn cache verify --fix
""")
def cache_verify_cmd(
    fix: bool = typer.Option(False, "--fix", help="Remove the damaged files (a later run computes them again)."),
    cache_dir: Optional[Path] = CACHE_DIR,
    json_path: Optional[Path] = JSON_OUT,
):
    """Re-check every entry: shards and feature files readable, each chip's photo unchanged since it was aligned.
    Exit 3 when damaged files were found and left in place (rerun with --fix)."""
    with handled():
        res = verify_cache(cache_dir, remove_damaged=fix)
        write_json(json_path, res)
    out.print(kv_table("cache verify", {
        "cache": res["cache_dir"], "shards / images": f"{res['shards']} / {res['images']}",
        "fresh / stale (photo changed: aligned again on use) / photo gone":
            f"{res['fresh']} / {res['stale']} / {res['source_missing']}",
        "feature files": res["feature_files"], "damaged files": len(res["damaged"]) or "none",
    }))
    if res["damaged"]:
        t = RichTable(title=f"damaged files ({'removed' if fix else 'kept: rerun with --fix to remove them'})",
                      title_justify="left")
        t.add_column("file")
        t.add_column("problem")
        for d in res["damaged"]:
            t.add_row(literal(d["path"]), literal(d["problem"]))
        out.print(t)
        if not fix:
            raise typer.Exit(EXIT_SKIPPED)


@cache_app.command("clear", epilog="""Examples:

    pdsn cache clear --dry-run

    pdsn cache clear --kind features
""")
def cache_clear_cmd(
    kind: Optional[list[str]] = typer.Option(None, "--kind", help="chips | features (repeatable; default: both)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be removed."),
    cache_dir: Optional[Path] = CACHE_DIR,
    json_path: Optional[Path] = JSON_OUT,
):
    """Remove cached chips and/or features. Only cache files are removed; temp files of runs still writing are kept."""
    with handled():
        res = clear_cache(cache_dir, kinds=tuple(kind or KINDS), dry_run=dry_run)
        write_json(json_path, res)
    verb = "would remove" if dry_run else "removed"
    out.print(kv_table("cache clear" + (" (dry run)" if dry_run else ""), {
        "cache": res["cache_dir"], "kinds": ", ".join(res["kinds"]),
        verb: f"{res['removed_files']} files, {_size(res['removed_bytes'])}",
        "kept (a run is writing them)": len(res["kept_in_progress"]) or "none",
    }))
