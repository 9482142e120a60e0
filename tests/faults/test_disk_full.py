"""Disk full while writing: every command fails with exit code 4 and one "disk full" line, the previous file under
the output's final name is left byte for byte as it was, and no ``.partial`` is left behind.

Two real ways to run out of space, neither a mock: a small tmpfs filled up (needs mount permission, as root in a
container that allows it; skipped elsewhere), and the output's temp file (``<final>.partial``) made a symlink to
``/dev/full``, whose every write fails with ENOSPC (any Linux, no privileges).
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pdsn_cli.cli.app import app

PREVIOUS = b"the output of an earlier run, which a failed run must not touch\n"

#: command → (arguments, the final output, the temp files it writes first: relative to the output folder)
COMMANDS = {
    "make-pairs": (["make-pairs", "--occluder", "scarf", "--template", "arc112x96", "--synthetic-identities", "2",
                    "--synthetic-images", "2", "--out", "{dir}/pairs.h5"], "pairs.h5", ["pairs.h5.partial"]),
    "align": (["align", "--template", "arc112x96", "--synthetic-identities", "2", "--synthetic-images", "3",
               "--out", "{dir}/chips.h5"], "chips.h5", ["chips.h5.partial"]),
    "embed": (["embed", "--input", "{pairs}", "--trunk", "tiny", "--weights", "{weights}", "--features",
               "--out", "{dir}/emb.h5"], "emb.h5", ["emb.h5.partial"]),
    "build-dict": (["build-dict", "--blocks", "{blocks}", "--out", "{dir}/dict.h5"], "dict.h5", ["dict.h5.partial"]),
    "train-block": (["train-block", "--pairs", "{pairs}", "--trunk", "tiny", "--weights", "{weights}", "--block",
                     "7", "--epochs", "1", "--out", "{dir}/b7.pt"], "b7.pt", ["b7.pt.ckpt.partial"]),
    "train-trunk": (["train-trunk", "--data", "{chips}", "--trunk", "tiny", "--epochs", "1", "--batch-size", "4",
                     "--precision", "fp32", "--checkpoint-every", "1", "--out", "{dir}/run"], "run/trunk.pt",
                    ["run/checkpoint.pt.partial"]),
    "train-detector": (["train-detector", "--pairs", "{pairs}", "--epochs", "1", "--val-fraction", "0",
                        "--out", "{dir}/det.pt"], "det.pt", ["det.pt.partial"]),
    "benchmark": (["benchmark", "--dataset", "synthetic", "--trunk", "tiny", "--weights", "{weights}",
                   "--json", "{dir}/bench.json"], "bench.json", ["bench.json.partial"]),
}
#: bytes left free on the full tmpfs: enough to start writing, never enough to finish (benchmark's JSON is ~2 KB)
SLACK = {"benchmark": 0}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, block_pairs, tiny_weights, trained_blocks) -> dict:
    from pdsn_cli.data.chip_cache import DataSpec, export_chips

    chips = tmp_path_factory.mktemp("disk-full") / "chips.h5"
    export_chips(DataSpec(None, 4, 3), "arc112x96", chips)
    return {"pairs": str(block_pairs), "weights": tiny_weights, "blocks": str(trained_blocks[0]), "chips": str(chips)}


def mount_small_tmpfs(where: Path, size: str = "4m") -> None:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); the /dev/full cases run")


def fill_up(folder: Path, leave: int) -> None:
    """Write zeros until the filesystem is full, then give back ``leave`` bytes."""
    filler = folder / "filler"
    block = b"\0" * (1 << 16)
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(block)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))


def run_out_of_space(command: str, folder: Path, inputs: dict) -> None:
    args, final, _ = COMMANDS[command]
    args = [a.format(dir=folder, **inputs) for a in args]
    r = CliRunner().invoke(app, [*args, "--quiet"] if command != "build-dict" else args)
    assert r.exit_code == 4, (r.exit_code, r.output, r.exception)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: disk full while writing "), r.stderr
    assert (folder / final).read_bytes() == PREVIOUS, "the previous output was changed"
    assert not [p for p in folder.rglob("*.partial") if os.path.lexists(p)], "a .partial file was left"


@pytest.mark.parametrize("command", COMMANDS)
def test_full_tmpfs(command, inputs, tmp_path):
    disk = tmp_path / "disk"
    mount_small_tmpfs(disk)
    try:
        final = disk / COMMANDS[command][1]
        final.parent.mkdir(exist_ok=True)
        final.write_bytes(PREVIOUS)
        fill_up(disk, SLACK.get(command, 64 * 1024))
        run_out_of_space(command, disk, inputs)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
@pytest.mark.parametrize("command", COMMANDS)
def test_temp_file_on_dev_full(command, inputs, tmp_path):
    _, final, temps = COMMANDS[command]
    (tmp_path / final).parent.mkdir(exist_ok=True)
    (tmp_path / final).write_bytes(PREVIOUS)
    for t in temps:
        os.symlink("/dev/full", tmp_path / t)
    run_out_of_space(command, tmp_path, inputs)
    assert os.path.exists("/dev/full")  # the symlink was removed, not what it points to
