"""Every example in every command's ``--help`` runs as written in a fresh empty folder (exit 0).

The examples are read from the commands' epilogs. An example that needs what a test machine lacks (LFW or another
real dataset, a GPU, torchrun, the network) says so in the help itself (``# needs …``) and is skipped here; their
number is asserted, so a new example is never skipped silently. To keep the suite fast the documented size flags
(``--synthetic-identities``, ``--synthetic-images``, ``--limit``, ``--epochs``, ``--batch-size``, ...) are set
small; the command text is otherwise the help's. Chains (``a && b``) run in order in the same folder.
"""

from __future__ import annotations

import re
import shlex

import pytest
import typer
from typer.testing import CliRunner

from pdsn_cli.cli.app import app

runner = CliRunner()
NEEDS = re.compile(r"#\s*needs\b")

#: the documented size flags set small, per command (replacing the example's value, or added)
SMALL = {
    "make-pairs": {"--synthetic-identities": "2", "--synthetic-images": "1", "--limit": "2", "--per-image": "1"},
    "align": {"--synthetic-identities": "3", "--synthetic-images": "2"},
    "train-block": {"--epochs": "1", "--batch-size": "2"},
    "finetune": {"--epochs": "1"},
    "train-trunk": {"--epochs": "1", "--batch-size": "4"},
    "train-detector": {"--epochs": "1", "--batch-size": "8"},
    "pipeline": {"--train-limit": "4", "--epochs": "1", "--batch-size": "4", "--finetune-epochs": "1", "--per-image": "1", "--occluder": "scarf"},
}
EXPECTED_NEEDS = 37  # examples marked "# needs …" in the help texts (LFW, MegaFace, AR, CASIA, GPU, torchrun, network)
EXPECTED_RUNNABLE = 27


def _examples(command: typer.core.TyperGroup | typer.core.TyperCommand, path: tuple[str, ...] = ()):
    if isinstance(command, typer.core.TyperGroup):
        for name, sub in command.commands.items():
            yield from _examples(sub, (*path, name))
        return
    for line in (command.epilog or "").splitlines():
        line = line.strip()
        if line.startswith(("pdsn ", "torchrun ")):
            yield " ".join(path), line


EXAMPLES = list(_examples(typer.main.get_command(app)))
RUNNABLE = [(cmd, line) for cmd, line in EXAMPLES if not NEEDS.search(line)]


def test_every_command_has_examples_and_unrunnable_ones_say_why():
    assert len(EXAMPLES) - len(RUNNABLE) == EXPECTED_NEEDS, [line for _, line in EXAMPLES if NEEDS.search(line)]
    assert len(RUNNABLE) == EXPECTED_RUNNABLE, RUNNABLE
    assert all(not line.startswith("torchrun") for _, line in RUNNABLE)  # torchrun is always marked


def small(args: list[str]) -> list[str]:
    sizes = SMALL.get(args[0], {})
    args = list(args)
    for flag, value in sizes.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


def _steps(line: str) -> list[list[str]]:
    words = shlex.split(line, comments=True)
    steps, step = [], []
    for w in [*words, "&&"]:
        if w == "&&":
            steps.append(step)
            step = []
        else:
            step.append(w)
    return steps


@pytest.mark.parametrize("command,line", RUNNABLE, ids=[f"{c}:{i}" for i, (c, _) in enumerate(RUNNABLE)])
def test_help_example_runs_in_a_fresh_folder(command, line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PDSN_WORK", raising=False)  # the default ./pdsn-work, which does not exist yet
    for step in _steps(line):
        assert step[0] == "pdsn", line
        r = runner.invoke(app, small(step[1:]))
        assert r.exit_code == 0, f"{' '.join(step)} → {r.exit_code}\n{r.output}"


# ---- what the help says matches what the commands do ------------------------------------------------------------
def _help(*command: str) -> str:
    r = runner.invoke(app, [*command, "--help"], terminal_width=400)
    assert r.exit_code == 0, r.output
    return " ".join(r.output.split())


def test_defaults_are_shown_as_real_paths_under_the_work_folder():
    from pdsn_cli.cli.app import shown_default

    assert "pairs-OCCLUDER.h5" in _help("make-pairs") and "pairs-.h5" not in _help("make-pairs")
    assert "blocks/all.pt" in _help("train-block") and "blocks/.pt" not in _help("train-block")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PDSN_WORK", "/data/my-work")
        assert shown_default("dict.h5") == "/data/my-work/dict.h5"


def test_help_is_rendered_with_pdsn_work(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PDSN_WORK": str(tmp_path / "elsewhere"), "COLUMNS": "400"}
    r = subprocess.run([sys.executable, "-m", "pdsn_cli", "build-dict", "--help"], env=env, capture_output=True,
                       text=True, timeout=120)
    flat = "".join(r.stdout.split())
    assert r.returncode == 0 and "".join(str(tmp_path / "elsewhere" / "dict.h5").split()) in flat, r.stdout
    assert "pdsn-work" not in flat


def test_occluder_help_lists_every_kind():
    from pdsn_cli.occlusion.occluders import OCCLUDERS

    text = _help("make-pairs")
    assert all(kind in text for kind in OCCLUDERS) and "square" in text and "block" in text


def test_unknown_dataset_lists_every_dataset():
    r = runner.invoke(app, ["benchmark", "--dataset", "imagenet"])
    assert r.exit_code == 2, r.output
    for name in ("lfw", "synthetic", "megaface", "megaface-lfw", "ar"):
        assert name in r.stderr


@pytest.fixture
def mini_lfw(tmp_path):
    root = tmp_path / "lfw"
    for name, k in (("Ann", 1), ("Ann", 2), ("Bob", 1), ("Cid", 1)):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / f"{name}_{k:04d}.jpg").write_bytes(b"x")
    (root / "pairs.txt").write_text("1\t1\nAnn\t1\t2\nAnn\t1\tBob\t1\n")
    return root


def test_limit_pairs_message_names_the_option(mini_lfw):
    from pdsn_cli.data.lfw import limit_pairs, read_pairs
    from pdsn_cli.errors import BadInputError

    with pytest.raises(BadInputError, match="--limit-pairs must be at least 2"):
        limit_pairs(read_pairs(mini_lfw / "pairs.txt", mini_lfw), 1)


def test_datasets_commands_take_json_and_create_the_work_folder(mini_lfw, tmp_path, monkeypatch):
    import json

    assert "--json" in _help("datasets", "fetch") and "--json" in _help("datasets", "lfw-train-ids")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PDSN_WORK", raising=False)
    r = runner.invoke(app, ["datasets", "lfw-train-ids", "--data-dir", str(mini_lfw), "--out", "pdsn-work/ids.txt",
                            "--json", "ids.json"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "pdsn-work" / "ids.txt").read_text() == "Cid\n"
    assert json.loads((tmp_path / "ids.json").read_text()) == {"out": "pdsn-work/ids.txt", "identities": 1,
                                                                "images": 1}
