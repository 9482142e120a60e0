"""One rule for every output path: it must not be an input nor another output of the same run, whatever the
spelling (relative or absolute, through a symlink, a hard link of the same file). ``-`` (stdout) and options not
given are no files."""

from __future__ import annotations

import os

import pytest

from pdsn_cli.atomic import check_distinct_paths
from pdsn_cli.errors import EXIT_USAGE, BadInputError


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.h5").write_bytes(b"input")
    (tmp_path / "sub").mkdir()
    return tmp_path


@pytest.mark.parametrize("spelling", ["a.h5", "./a.h5", "sub/../a.h5", "{abs}/a.h5", "link.h5", "linkdir/a.h5",
                                      "hard.h5"])
def test_an_output_naming_an_input_is_refused(files, spelling):
    os.symlink(files / "a.h5", files / "link.h5")
    os.symlink(files, files / "linkdir")
    os.link(files / "a.h5", files / "hard.h5")
    out = spelling.format(abs=files)
    with pytest.raises(BadInputError) as e:
        check_distinct_paths({"--input": "a.h5"}, {"--out": out})
    msg = str(e.value)
    assert e.value.exit_code == EXIT_USAGE and "\n" not in msg
    assert msg.startswith(f"--out {out} is the same file as --input a.h5") and "input" in msg.split(";")[1]
    assert (files / "a.h5").read_bytes() == b"input"


def test_two_outputs_naming_one_file_are_refused_even_before_it_exists(files):
    with pytest.raises(BadInputError, match=r"--json m\.h5 is the same file as --out ./m\.h5; .*another output"):
        check_distinct_paths({"--data-dir": files}, {"--out": "./m.h5", "--json": "m.h5"})
    with pytest.raises(BadInputError, match="--plot"):
        check_distinct_paths({"--dict": None}, {"--out": "x.h5", "--plot": f"{files}/sub/../x.h5"})


def test_lists_none_and_stdout(files):
    with pytest.raises(BadInputError, match="--out a.h5 is the same file as --input a.h5"):
        check_distinct_paths({"--input": ["b.h5", "a.h5"]}, {"--out": "a.h5"})
    check_distinct_paths({"--input": "a.h5", "--weights": None}, {"--out": "b.h5", "--json": "-", "--plot": None,
                                                                  "--report": "-"})


def test_distinct_files_pass_even_with_equal_names_elsewhere(files):
    (files / "sub" / "a.h5").write_bytes(b"input")  # same name and content, another file
    check_distinct_paths({"--input": "a.h5"}, {"--out": "sub/a.h5", "--json": "sub/a.json"})
    check_distinct_paths({"--data-dir": files}, {"--out": files / "out.h5"})  # inside an input folder is fine


def test_an_output_folder_may_not_hold_an_input_nor_be_one(files):
    (files / "report").mkdir()
    (files / "report" / "d.h5").write_bytes(b"input")
    with pytest.raises(BadInputError, match=r"--dict report/d\.h5 is inside --report \./report, which this run"):
        check_distinct_paths({"--dict": "report/d.h5"}, {"--json": "r.json"}, output_folders={"--report": "./report"})
    with pytest.raises(BadInputError, match="--work a.h5 is the same file as --weights a.h5"):
        check_distinct_paths({"--weights": "a.h5"}, {}, output_folders={"--work": "a.h5"})
    with pytest.raises(BadInputError, match="--report r is the same file as --json r"):
        check_distinct_paths({}, {"--json": "r"}, output_folders={"--report": "r"})
    # an output folder inside an input folder, outputs inside an output folder, and names sharing a prefix pass
    check_distinct_paths({"--data-dir": files, "--dict": "reportx.h5"}, {"--plot": "report/roc.png"},
                         output_folders={"--report": "report", "--export-devkit": None})
