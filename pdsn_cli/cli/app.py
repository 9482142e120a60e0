"""The ``pdsn`` Typer app: its options shared by several commands, where outputs go by default, and one
readable line with the documented exit code for every failure. The commands are in ``data_cmds``,
``train_cmds`` and ``eval_cmds``; they parse options, call the engine and render the result. No work happens here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from pdsn_cli import __version__
from pdsn_cli.align.aligner import FACE_DETECTOR_ENV, resolve_face_detector
from pdsn_cli.atomic import atomic_output, check_writable
from pdsn_cli.cli.render import console, literal, out, say
from pdsn_cli.data.chip_cache import DataSpec
from pdsn_cli.errors import EXIT_INTERRUPTED, BadInputError, PdsnError

app = typer.Typer(
    name="pdsn",
    help="Occlusion-robust face recognition with Pairwise Differential Siamese Networks (PDSN, ICCV 2019).\n\n"
    "Pipeline: make-pairs → train-block → build-dict → benchmark. Without --data-dir every command uses the "
    "built-in SYNTHETIC faces, so everything runs on a fresh machine.\n\n"
    "Exit codes: 0 ok · 2 bad arguments/input (nothing written) · 3 done but some inputs skipped · "
    "4 job failed · 130 interrupted (rerun with --resume).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)
datasets_app = typer.Typer(help="Get datasets and protocol files.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
cache_app = typer.Typer(help="Look into, check and empty the cache of aligned faces and features (PDSN_CACHE).",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _version(value: bool):
    if value:
        out.print(f"pdsn {__version__}")
        raise typer.Exit()


def _face_detector(value: Optional[str]) -> Optional[str]:
    if value is not None:
        with handled():
            resolve_face_detector(value)
        os.environ[FACE_DETECTOR_ENV] = value  # worker processes align as this one does
    return value


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
          face_detector: Optional[str] = typer.Option(
              None, "--face-detector", envvar=FACE_DETECTOR_ENV, callback=_face_detector,
              help="Finds faces in real photos, for every command: dlib-hog (dlib's HOG, then the CNN for misses; "
                   "needs dlib-bin) | cnn (the ported CNN detector; no dlib) | auto (default: dlib-hog when dlib "
                   "is installed, else cnn). Chips of each are cached apart.")):
    out.stderr = False  # results go to stdout unless this command's --json takes it (see _json_writable)


@contextlib.contextmanager
def handled(resume_hint: str | None = None):
    """One readable line and the documented exit code for every failure the user can act on."""
    try:
        yield
    except PdsnError as e:
        # the message names user paths and values: printed literally, never as markup
        console.print(Text("error:", style="bold red") + " " + literal(e), highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        msg = "interrupted."
        if resume_hint:
            msg += f" Partial work is kept; continue with: {resume_hint}"
        say(console, msg, style="yellow")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def write_json(path: Optional[Path], payload: dict) -> None:
    """The result as JSON: to the file ``path`` (atomically), or to stdout when ``path`` is ``-``."""
    if path is None:
        return
    text = json.dumps(payload, indent=2, default=str) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def resume_command() -> str:
    """This command line with ``--resume`` once (an interrupted run may itself have been a resumed one)."""
    argv = sys.argv[1:]
    return " ".join(["pdsn", *argv, *([] if "--resume" in argv else ["--resume"])])


def work_dir() -> Path:
    """Where commands put and find their outputs when no path is given (``$PDSN_WORK``, default ./pdsn-work)."""
    return Path(os.environ.get("PDSN_WORK", "pdsn-work"))


def shown_default(name: str) -> str:
    """A default output as ``--help`` shows it: its real path under the work folder (``$PDSN_WORK`` honoured),
    escaped for the help's markdown (a ``my_work`` folder would lose its underscores to italics)."""
    return re.sub(r"([\\`*_\[\]<>#])", r"\\\1", str(work_dir() / name))


def in_work_dir(path: Path) -> Path:
    """``path``; its folder is created when it lies under the work folder (``--out pdsn-work/x.h5`` in a fresh
    folder), as for a default output. Other folders must exist: a typo there is refused, not created."""
    work = work_dir().resolve()
    folder = path.parent.resolve()
    if folder == work or work in folder.parents:
        folder.mkdir(parents=True, exist_ok=True)
    return path


def default_path(given: Optional[Path], name: str) -> Path:
    """The output ``given`` by the user, or ``name`` under the work folder (created when needed)."""
    return in_work_dir(given if given is not None else work_dir() / name)


def data_spec(data_dir: Optional[Path], synthetic_identities: int, synthetic_images: int,
              synthetic_seed: int = 0) -> DataSpec:
    return DataSpec(data_dir, synthetic_identities, synthetic_images, synthetic_seed)


def _json_writable(path: Optional[Path]) -> Optional[Path]:
    """``--json`` is checked with the other arguments: a bad path found only after the work would lose the run.
    ``--json -`` takes stdout for the JSON alone: the tables go to stderr."""
    if path is not None and str(path) == "-":
        out.stderr = True
    elif path is not None:
        with handled():
            check_writable(path)
    return path


DATA_DIR = typer.Option(None, "--data-dir", help="Identity-folder dataset: ROOT/IDENTITY/IMAGE (LFW, CASIA-WebFace, ...). Default: built-in synthetic faces.")
SYN_IDS = typer.Option(60, "--synthetic-identities", help="Built-in synthetic set: number of identities.")
SYN_IMGS = typer.Option(10, "--synthetic-images", help="Built-in synthetic set: images per identity.")
JSON_OUT = typer.Option(None, "--json", help="Also write the result as JSON to this file; '-' writes it to stdout (the tables then go to stderr).", callback=_json_writable)
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")
TRUNK = typer.Option("dlib-resnet", "--trunk", help="dlib-resnet | lresnet50e-ir | iresnet50 | iresnet100 | tiny")
WEIGHTS = typer.Option(None, "--weights", help="Trunk weights file (.pth/.pt/.safetensors; dlib-resnet: built in).")
GPU = typer.Option(None, "--gpu", help="CUDA device index; default CPU.")
PDSN_FLAG = typer.Option(False, "--pdsn", help="PDSN with the built-in model (dictionary, fine-tuned head, detector; see pdsn models).")
MODEL = typer.Option(None, "--model", help="PDSN with this model: a built-in name or a folder from pdsn export-model (replaces --dict/--detector).")
PRECISION = typer.Option("bf16", "--precision", help="bf16 (autocast + channels_last, CUDA only; the CPU always runs fp32) | fp32")


def model_option(pdsn: bool, model: Optional[str]) -> Optional[str]:
    """``--pdsn`` is ``--model builtin``."""
    if pdsn and model is not None:
        raise BadInputError("--pdsn is the built-in model; --model names another: give one of them")
    return "builtin" if pdsn else model


def main():
    app()
