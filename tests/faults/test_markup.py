"""User-supplied text is printed as the text it is: file names, identity names, paths and option values that look
like Rich markup (``[bold red]``, ``[/bold]``, an unbalanced ``a[`` … ``b]``) or emoji codes (``:x:``) appear
literally, and raw control characters (an ESC sequence in a name) never reach the terminal: they are shown as
``\\x1b``. No ``MarkupError`` traceback, the documented exit codes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import hog_detectable_faces, write_jpeg
from pdsn_cli.cli.app import app
from pdsn_cli.cli.render import literal
from pdsn_cli.data.faces import printable
from pdsn_cli.errors import EXIT_SKIPPED

runner = CliRunner()

ESC_NAME = "red\x1b[31mname"
BAD_FILES = [  # (identity folder, file name): not images, so each is skipped and listed by name
    ("alice", ":x: smile.jpg"),
    ("alice", "[bold red]evil.jpg"),
    ("a[", "b].jpg"),
    (ESC_NAME, "x.jpg"),
]


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("markup") / "people"
    face = next(iter(hog_detectable_faces(1, 1).values()))[0]
    write_jpeg(root / "alice" / "alice_0001.jpg", face.image)
    for ident, name in BAD_FILES:
        (root / ident).mkdir(parents=True, exist_ok=True)
        (root / ident / name).write_bytes(b"not an image at all, just text")
    return root


def _no_crash(r):
    assert "Traceback" not in r.output and "MarkupError" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "\x1b" not in r.output  # no raw ESC reaches the terminal


def test_printable_escapes_control_characters_and_keeps_the_rest():
    assert printable(ESC_NAME) == "red\\x1b[31mname"
    assert printable("line\nbreak\x07") == "line\\x0abreak\\x07"
    assert printable(":x: [bold]é.jpg") == ":x: [bold]é.jpg"
    assert literal("[bold red]evil:x:").plain == "[bold red]evil:x:"


def test_skipped_file_names_are_shown_literally(hostile_folder, tmp_path):
    r = runner.invoke(app, ["align", "--data-dir", str(hostile_folder), "--template", "arc112x96",
                            "--out", str(tmp_path / "chips.h5"), "--quiet"])
    _no_crash(r)
    assert r.exit_code == EXIT_SKIPPED, r.output
    flat = " ".join(r.stdout.split())  # the table may wrap a long name
    for ident, name in BAD_FILES:
        assert f"{printable(ident)}/{name}" in r.stdout or name in flat, (name, r.stdout)
    assert "[bold red]evil.jpg" in r.stdout and ":x: smile.jpg" in r.stdout and "❌" not in r.stdout
    assert "red\\x1b[31mname" in r.stdout
    assert (tmp_path / "chips.h5").exists()


@pytest.mark.parametrize("value", ["[/bold]", "[bold red]x", "a[", ":x:", "\x1b[31mred"])
def test_option_value_in_an_error_is_shown_literally(value, tmp_path):
    r = runner.invoke(app, ["embed", "--input", value, "--out", str(tmp_path / "e.h5"), "--trunk", "tiny"])
    _no_crash(r)
    assert r.exit_code == 2, r.output
    assert printable(value) in r.stderr and "error:" in r.stderr


def test_identity_name_in_an_identities_file_is_shown_literally(tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("[bold]nobody\nsynthetic_0000\n")
    r = runner.invoke(app, ["align", "--identities", str(ids), "--synthetic-identities", "2", "--synthetic-images",
                            "1", "--template", "arc112x96", "--out", str(tmp_path / "c.h5"), "--quiet"])
    _no_crash(r)
    assert r.exit_code == 0, r.output
    assert "[bold]nobody" in r.stderr  # the warning about an identity absent from the data
