"""The ``pdsn`` command line: parses options, calls the engine, renders the result. No work happens here."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich import box
from rich.table import Table

from pdsn_cli import __version__
from pdsn_cli.errors import EXIT_INTERRUPTED, EXIT_SKIPPED, PdsnError

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
console = Console(stderr=True)
out = Console()


def _version(value: bool):
    if value:
        out.print(f"pdsn {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")):
    pass


@contextlib.contextmanager
def handled(resume_hint: str | None = None):
    """One readable line and the documented exit code for every failure the user can act on."""
    try:
        yield
    except PdsnError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        msg = "interrupted."
        if resume_hint:
            msg += f" Partial work is kept; continue with: {resume_hint}"
        console.print(f"[yellow]{msg}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


class Bars:
    """Rich progress bars keyed by task name; ``bars.cb(name)`` gives an engine-side callback(done, total)."""

    def __init__(self, quiet: bool = False):
        self.p = Progress(
            TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
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


def write_json(path: Optional[Path], payload: dict) -> None:
    if path is None:
        return
    from pdsn_cli.atomic import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def kv_table(title: str, rows: dict) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows.items():
        t.add_row(k, str(v))
    return t


def skipped_table(skipped: list[dict], limit: int = 20) -> Table:
    t = Table(title=f"skipped files ({len(skipped)})", title_justify="left")
    t.add_column("file")
    t.add_column("reason")
    for s in skipped[:limit]:
        t.add_row(s["path"], s["reason"])
    if len(skipped) > limit:
        t.add_row(f"… {len(skipped) - limit} more (see --json)", "")
    return t


def resume_command() -> str:
    """This command line with ``--resume`` once (an interrupted run may itself have been a resumed one)."""
    argv = sys.argv[1:]
    return " ".join(["pdsn", *argv, *([] if "--resume" in argv else ["--resume"])])


def work_dir() -> Path:
    """Where commands put and find their outputs when no path is given (``$PDSN_WORK``, default ./pdsn-work)."""
    import os

    return Path(os.environ.get("PDSN_WORK", "pdsn-work"))


def default_path(given: Optional[Path], name: str) -> Path:
    if given is not None:
        return given
    p = work_dir() / name
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def data_spec(data_dir: Optional[Path], synthetic_identities: int, synthetic_images: int, synthetic_seed: int = 0):
    from pdsn_cli.data.chip_cache import DataSpec

    return DataSpec(data_dir, synthetic_identities, synthetic_images, synthetic_seed)


DATA_DIR = typer.Option(None, "--data-dir", help="Identity-folder dataset: ROOT/IDENTITY/IMAGE (LFW, CASIA-WebFace, ...). Default: built-in synthetic faces.")
SYN_IDS = typer.Option(60, "--synthetic-identities", help="Built-in synthetic set: number of identities.")
SYN_IMGS = typer.Option(10, "--synthetic-images", help="Built-in synthetic set: images per identity.")
def _json_writable(path: Optional[Path]) -> Optional[Path]:
    """``--json`` is checked with the other arguments: a bad path found only after the work would lose the run."""
    if path is not None:
        from pdsn_cli.atomic import check_writable

        with handled():
            check_writable(path)
    return path


JSON_OUT = typer.Option(None, "--json", help="Also write the result as JSON to this file.", callback=_json_writable)
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")


@app.command("make-pairs", epilog="""Examples:

    pdsn make-pairs --occluder sunglasses --limit 50 --out pairs.h5

    pdsn make-pairs --block all --data-dir ../shared/data/lfw --identities train_ids.txt --out blocks.h5

    pdsn make-pairs --occluder random --per-image 4 --preview sheet.png --out random.h5
""")
def make_pairs_cmd(
    out_path: Optional[Path] = typer.Option(None, "--out", help="Output HDF5 file, written atomically (default: pdsn-work/pairs-<occluder>.h5)."),
    occluder: Optional[str] = typer.Option(None, "--occluder", help="sunglasses, eyeglasses, scarf, mask, hand, phone, cup, book or random."),
    block: Optional[str] = typer.Option(None, "--block", help="Occlude grid block J (0..K²-1, row-major) or 'all' (every block)."),
    grid: int = typer.Option(5, "--grid", help="K of the K×K grid."),
    template: str = typer.Option("dlib150", "--template", help="dlib150 | arc112x96 | arc112x112"),
    per_image: int = typer.Option(1, "--per-image", help="Pairs per source image (per block with --block all)."),
    data_dir: Optional[Path] = DATA_DIR,
    identities: Optional[Path] = typer.Option(None, "--identities", help="File with one identity per line: use only these."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use a seeded sample of N images."),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(1, "--workers", help="Processes for alignment and occlusion."),
    append: bool = typer.Option(False, "--append", help="Add rows to an existing pairs file with the same schema."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run (same options)."),
    preview: Optional[Path] = typer.Option(None, "--preview", help="Write a contact sheet PNG of the first pairs."),
    synthetic_identities: int = SYN_IDS,
    synthetic_images: int = SYN_IMGS,
    json_path: Optional[Path] = JSON_OUT,
    quiet: bool = QUIET,
):
    """Synthesize (clean, occluded) face pairs with pixel masks and block occupancy, to HDF5."""
    from pdsn_cli.data.make_pairs import MakePairsConfig, make_pairs

    tag = occluder or ("random" if block is None else "blocks" if block == "all" else f"block{block}")
    out_path = default_path(out_path, f"pairs-{tag}.h5")
    cfg = MakePairsConfig(
        out=out_path, data=data_spec(data_dir, synthetic_identities, synthetic_images), occluder=occluder,
        block=block, grid=grid, template=template, per_image=per_image, identities=identities, limit=limit,
        seed=seed, workers=workers, append=append, resume=resume, preview=preview,
    )
    argv = " ".join(sys.argv[1:])
    hint = f"pdsn {argv}" if ("--resume" in argv or append) else f"pdsn {argv} --resume"
    with handled(resume_hint=hint):
        if json_path is not None:
            from pdsn_cli.atomic import check_writable

            check_writable(json_path)
        with Bars(quiet) as bars:
            res = make_pairs(cfg, progress=bars.cb("pairs"), align_progress=bars.cb("align"))
        write_json(json_path, res)
    al = res["align"]
    rows = {
        "output": res["out"],
        "data": res["data"],
        "template / grid": f"{res['template']} / {res['grid']}×{res['grid']}",
        "occluder": res["occluder"] + ("  (" + ", ".join(f"{k}: {v}" for k, v in sorted(res["kinds"].items())) + ")" if res["kinds"] else ""),
        "images / identities": f"{res['images']} / {res['identities']}",
        "pairs written": res["pairs_written"] if not res["resumed_from"] else f"{res['pairs_written']} (resumed after {res['resumed_from']})",
        "pairs in file": res["pairs_in_file"],
        "mean occluded area": f"{res['mean_occluded_fraction']:.1%}",
        "aligned now / cached": f"{al['aligned_now']} / {al['from_cache']}",
        "fallback crops (no face found)": al["fallback_crops"],
        "skipped files": al["skipped"],
        "speed": f"{res['pairs_per_second']} pairs/s (alignment {res['align_seconds']} s)",
    }
    if res["synthetic"]:
        rows["note"] = "SYNTHETIC faces (built-in default); use --data-dir for real photos"
    if res["preview"]:
        rows["preview"] = res["preview"]
    out.print(kv_table("make-pairs", rows))
    if al["skipped_files"]:
        out.print(skipped_table(al["skipped_files"]))
        raise typer.Exit(EXIT_SKIPPED)


TRUNK = typer.Option("dlib-resnet", "--trunk", help="dlib-resnet | lresnet50e-ir | iresnet50 | iresnet100 | tiny")
WEIGHTS = typer.Option(None, "--weights", help="Trunk weights file (.pth/.pt/.safetensors; dlib-resnet: built in).")
GPU = typer.Option(None, "--gpu", help="CUDA device index; default CPU.")


PRECISION = typer.Option("bf16", "--precision", help="bf16 (autocast + channels_last, CUDA only; the CPU always runs fp32) | fp32")


@app.command("train-block", epilog="""Examples:

    pdsn train-block --block all

    pdsn train-block --block 7 --gpu 0 --pairs pdsn-work/pairs-blocks.h5

    pdsn train-block --block all --mask-point level1 --epochs 20 --out runs/blocks.pt

    torchrun --nproc_per_node=4 -m pdsn_cli train-block --block all --gpu 0 --pairs blocks.h5
""")
def train_block_cmd(
    block: str = typer.Option("all", "--block", help="Grid block J (0..K²-1) or 'all' (every block in one batched pass)."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="Pairs file from make-pairs --block (default: pdsn-work/pairs-blocks.h5)."),
    trunk: str = TRUNK,
    weights: Optional[str] = WEIGHTS,
    mask_point: Optional[str] = typer.Option(None, "--mask-point", help="Trunk stage whose features are masked (default: the trunk's)."),
    epochs: int = typer.Option(10, "--epochs"),
    batch_size: int = typer.Option(32, "--batch-size", help="Pairs per block per step."),
    lr: float = typer.Option(1e-3, "--lr"),
    optimizer: str = typer.Option("adam", "--optimizer", help="adam | sgd (momentum 0.9, the paper's)"),
    lam: float = typer.Option(10.0, "--lambda", help="Weight of the L1 pair-difference term."),
    s: float = typer.Option(30.0, "--scale", help="CosFace scale s."),
    m: float = typer.Option(0.35, "--margin", help="CosFace margin m."),
    seed: int = typer.Option(0, "--seed"),
    gpu: Optional[int] = GPU,
    precision: str = PRECISION,
    resume: bool = typer.Option(False, "--resume", help="Continue from the last epoch checkpoint."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Output (default: pdsn-work/blocks/<block>.pt)."),
    json_path: Optional[Path] = JSON_OUT,
    quiet: bool = QUIET,
):
    """Train the PDSN mask generator(s) of one grid block or of all blocks at once."""
    from pdsn_cli.train.blocks import TrainBlockConfig, train_blocks

    pairs = pairs or work_dir() / "pairs-blocks.h5"
    tag = "all" if block == "all" else f"block{int(block):02d}" if block.isdigit() else block
    out_path = default_path(out_path, f"blocks/{tag}.pt")
    cfg = TrainBlockConfig(pairs=pairs, out=out_path, trunk=trunk, weights=weights, block=block,
                           mask_point=mask_point, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, lam=lam, s=s, m=m,
                           seed=seed, gpu=gpu, resume=resume, precision=precision)
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 draws, writes JSON and prints
    with handled(resume_hint=resume_command()):
        with Bars(quiet or not rank0) as bars:
            res = train_blocks(cfg, progress=bars.multi())
        if rank0:
            write_json(json_path, res)
    if not rank0:
        return
    h = res["history"][-1] if res["history"] else {}
    out.print(kv_table("train-block", {
        "output": res["out"], "trunk / mask point": f"{res['trunk']} / {res['mask_point']} {tuple(res['feature_shape'])}",
        "blocks": "all" if len(res["blocks"]) > 1 else res["blocks"][0], "pairs / identities": f"{res['pairs']} / {res['classes']}",
        "processes": res["world_size"],
        "epochs / steps": f"{res['epochs']} / {res['steps']}",
        "final loss (CE, L1)": f"{h.get('loss', float('nan')):.4f} ({h.get('ce', float('nan')):.4f}, {h.get('l1', float('nan')):.5f})",
        "time (features, training)": f"{res['feature_seconds']} s, {res['train_seconds']} s",
    }))


@app.command("build-dict", epilog="""Examples:

    pdsn build-dict

    pdsn build-dict --blocks runs/blocks.pt --tau 0.3 --plot dict.png --out dict.h5
""")
def build_dict_cmd(
    blocks: Optional[list[Path]] = typer.Option(None, "--blocks", help="train-block outputs or folders of them (default: pdsn-work/blocks/)."),
    tau: float = typer.Option(0.25, "--tau", help="Fraction of each block's mask set to 0 (discarded)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Dictionary HDF5 (default: pdsn-work/dict.h5)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG showing each block's discarded elements."),
    json_path: Optional[Path] = JSON_OUT,
):
    """Average each block's masks over its training pairs and binarise them: the FDM dictionary."""
    from pdsn_cli.pdsn.fdm import build

    out_path = default_path(out_path, "dict.h5")
    with handled():
        res = build(blocks or [work_dir() / "blocks"], out_path, tau=tau, plot=plot)
        write_json(json_path, res)
    d = res["discarded_per_block"]
    out.print(kv_table("build-dict", {
        "output": res["out"], "trunk / mask point": f"{res['trunk']} / {res['mask_point']} {tuple(res['feature_shape'])}",
        "grid / τ": f"{res['grid']}×{res['grid']} / {res['tau']}", "blocks trained": res["blocks_trained"],
        "missing blocks (keep all)": res["missing_blocks"] or "none",
        "discarded elements per block": f"{min(d)}–{max(d)}",
        "mean overlap of discarded sets (IoU)": "n/a" if res["mean_pairwise_discard_iou"] is None else f"{res['mean_pairwise_discard_iou']:.3f}",
        **({"plot": res["plot"]} if res["plot"] else {}),
    }))


@app.command("finetune", epilog="""Examples:

    pdsn finetune --pairs pdsn-work/pairs-blocks.h5 --pairs pdsn-work/pairs-sunglasses.h5

    pdsn finetune --dict dict.h5 --pairs random.h5 --pairs square.h5 --max-pairs 6000 --epochs 3 --out dict-ft.h5
""")
def finetune_cmd(
    dict_path: Optional[Path] = typer.Option(None, "--dict", help="FDM dictionary to fine-tune for (default: pdsn-work/dict.h5)."),
    pairs: list[Path] = typer.Option(..., "--pairs", help="make-pairs files of training identities (repeatable): their occlusions choose each pair's FDM."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Output dictionary with the fine-tuned head (default: pdsn-work/dict-ft.h5)."),
    weights: Optional[str] = WEIGHTS,
    epochs: int = typer.Option(8, "--epochs"),
    lr: float = typer.Option(1e-4, "--lr", help="Adam learning rate."),
    batch_size: int = typer.Option(64, "--batch-size"),
    block_threshold: float = typer.Option(0.25, "--block-threshold", help="Block occupancy from which a block counts as occluded."),
    max_pairs: Optional[int] = typer.Option(None, "--max-pairs", help="Seeded sample of at most N pairs per file."),
    identity_weight: float = typer.Option(0.0, "--identity-weight", help="Weight of a CosFace term classifying the masked embeddings among the training identities (0: distillation only)."),
    seed: int = typer.Option(0, "--seed"),
    gpu: Optional[int] = GPU,
    json_path: Optional[Path] = JSON_OUT,
    quiet: bool = QUIET,
):
    """Fine-tune the trunk head on FDM-masked features (the paper's last stage); writes a dictionary carrying it."""
    from pdsn_cli.train.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(dict_path=dict_path or work_dir() / "dict.h5", pairs=list(pairs),
                         out=default_path(out_path, "dict-ft.h5"), weights=weights, epochs=epochs, lr=lr,
                         batch_size=batch_size, block_threshold=block_threshold, max_pairs=max_pairs, seed=seed, gpu=gpu,
                         identity_weight=identity_weight)
    with handled():
        with Bars(quiet) as bars:
            res = finetune(cfg, progress=bars.multi())
        write_json(json_path, res)
    fmt = lambda d: " / ".join(f"{x:.4f}" for x in d) if d else "n/a"  # noqa: E731
    out.print(kv_table("finetune", {
        "output": res["out"], "trunk / mask point": f"{res['trunk']} / {res['mask_point']}",
        "pairs (held out)": f"{res['pairs']} ({res['held_out_pairs']})",
        "head parameters": f"{res['head_parameter_count']:,} in {len(res['head_parameters'])} tensors",
        "held-out 1−cos to clean: masked occluded / masked clean / unmasked, before": fmt(res["held_out_before"]),
        f"after (head kept: epoch {res['kept_epoch']} of {res['epochs']})": fmt(res["history"][res["kept_epoch"] - 1]["held_out"]),
        "time": f"{res['seconds']} s",
    }))


def results_table(res: dict) -> Table:
    t = Table(title=f"{res['dataset']} — {res['trunk']} @ {res['mask_point']}, {res['pairs']} pairs"
              + (f", PDSN occlusion: {res['occlusion_source']}" if res.get("occlusion_source") else ""),
              title_justify="left")
    for c in ("occlusion", "method", "accuracy", "± std", "TAR@FAR=1e-3", "AUC", "recovery"):
        t.add_column(c, justify="left" if c in ("occlusion", "method") else "right")
    for r in res["results"]:
        rec = r.get("recovery")
        t.add_row(r["occlusion"], r["method"], f"{100 * r['accuracy']:.2f}%", f"{100 * r['std']:.2f}",
                  f"{100 * r['tar_at_far_1e-3']:.2f}%", f"{r['auc']:.4f}", "" if rec is None else f"{rec:.2f}")
    return t


def block_grid_table(res: dict) -> Optional[Table]:
    rows = {(r["method"], r["occlusion"]): r["accuracy"] for r in res["results"]}
    blocks = sorted({int(o.split(":")[1]) for _, o in rows if o.startswith("block:") and o != "block:mean"})
    if len(blocks) < 2:
        return None
    k = int(round(len(blocks) ** 0.5))
    has_pdsn = any(m == "pdsn" for m, _ in rows)
    t = Table(title="single-block occlusion, accuracy per grid block: baseline" + (" → PDSN" if has_pdsn else ""),
              title_justify="left", show_header=False)
    for _ in range(k):
        t.add_column(justify="center")
    for r in range(k):
        cells = []
        for c in range(k):
            j = r * k + c
            b = rows.get(("baseline", f"block:{j}"))
            p = rows.get(("pdsn", f"block:{j}"))
            cells.append(f"{j}: {100 * b:.1f}" + (f" → {100 * p:.1f}" if p is not None else ""))
        t.add_row(*cells)
    return t


def _count(n: int) -> str:
    """10, 100, 1k, 10k, 100k, 1M: gallery sizes short enough for a column header."""
    for div, unit in ((10**6, "M"), (10**3, "k")):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return f"{n:,}"


def identification_table(res: dict) -> Table:
    t = Table(title=f"{res['dataset']} — {res['trunk']} @ {res['mask_point']}: {res['probes']} probes of "
              f"{res['probe_identities']} identities, {res['real_distractors']:,} real + "
              f"{res['synthetic_distractors']:,} synthetic distractors; rank-1 % at N distractors"
              + (f", PDSN occlusion: {res['occlusion_source']}" if res.get("occlusion_source") else ""),
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    t.add_column("occlusion", no_wrap=True)
    t.add_column("method", no_wrap=True)
    for n in res["sizes"]:
        t.add_column(_count(n), justify="right", no_wrap=True)
    t.add_column("TAR@1e-6", justify="right", no_wrap=True)
    t.add_column("recovery", justify="right", no_wrap=True)
    for r in res["results"]:
        rec = r.get("recovery")
        t.add_row(r["occlusion"], r["method"], *[f"{100 * r['rank1'][str(n)]:.1f}" for n in res["sizes"]],
                  f"{100 * r['tar_at_far_1e-6']:.1f}", "" if rec is None else f"{rec:.2f}")
    return t


def ar_table(res: dict) -> Table:
    p = res["protocol"]
    t = Table(title=f"{res['dataset']} — {res['trunk']} @ {res['mask_point']}: {p['subjects']} subjects, "
              f"{p['gallery_images']} gallery images" + (f", PDSN occlusion: {res['occlusion_source']}"
                                                          if res.get("occlusion_source") else ""),
              title_justify="left")
    for c in ("probes", "method", "n", "rank-1", "rank-5"):
        t.add_column(c, justify="left" if c in ("probes", "method") else "right")
    for r in res["results"]:
        cmc = r["cmc"]
        t.add_row(r["occlusion"], r["method"], str(r["probes"]), f"{100 * r['rank1']:.2f}%",
                  f"{100 * cmc[min(4, len(cmc) - 1)]:.2f}%")
    return t


@app.command("benchmark", epilog="""Examples:

    pdsn benchmark --dataset lfw --data-dir ../shared/data/lfw --json r.json

    pdsn benchmark --dataset lfw --data-dir ../shared/data/lfw --jitter 40 --metric euclidean

    pdsn benchmark --dataset lfw --data-dir ../shared/data/lfw --landmarks 5+68 --flip --metric euclidean

    pdsn benchmark --dataset lfw --data-dir ../shared/data/lfw --dict pdsn-work/dict.h5 --occluder sunglasses --occluder scarf --report report/

    pdsn benchmark --dataset lfw --data-dir ../shared/data/lfw --occluder block --limit-pairs 600

    pdsn benchmark --dataset synthetic --trunk tiny --weights trunk.pt --dict dict.h5 --occluder random

    pdsn benchmark --dataset megaface-lfw --data-dir ../shared/data/lfw --synthetic-distractors 1000000 --dict pdsn-work/dict.h5 --occluder sunglasses

    pdsn benchmark --dataset megaface --data-dir /data/megaface --dict dict.h5 --occluder sunglasses --export-devkit feats/

    pdsn benchmark --dataset ar --data-dir /data/AR --protocol 1 --dict dict.h5 --occlusion detector --detector det.pt
""")
def benchmark_cmd(
    dataset: str = typer.Option("lfw", "--dataset", help="lfw (View-2 10-fold) | synthetic (built-in) | megaface (Challenge 1) | megaface-lfw (the same protocol on LFW) | ar (AR face database)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Dataset root. lfw: NAME/NAME_NNNN.jpg and pairs.txt; megaface: holds FlickrFinal2/, facescrub_images/, devkit/templatelists/; ar: the AR images."),
    pairs_file: Optional[Path] = typer.Option(None, "--pairs-file", help="lfw: default DATA_DIR/pairs.txt"),
    trunk: str = TRUNK,
    weights: Optional[str] = WEIGHTS,
    dict_path: Optional[Path] = typer.Option(None, "--dict", help="FDM dictionary (build-dict): adds PDSN rows next to the baseline."),
    occluder: Optional[list[str]] = typer.Option(None, "--occluder", help="Synthetic occlusion of the 2nd image (verification) or of the probes (megaface): none, sunglasses, scarf, mask, random, square, ..., block (all K² blocks) or block:J. Repeatable."),
    occlusion: str = typer.Option("oracle", "--occlusion", help="How PDSN learns the occluded blocks: oracle | detector"),
    detector: Optional[Path] = typer.Option(None, "--detector", help="Detector checkpoint (train-detector) for --occlusion detector."),
    block_threshold: float = typer.Option(0.25, "--block-threshold", help="Occupancy above which a block counts as occluded."),
    limit_pairs: Optional[int] = typer.Option(None, "--limit-pairs", help="lfw quick run: N pairs, whole folds kept balanced."),
    megaface_images: Optional[Path] = typer.Option(None, "--megaface-images", help="megaface: distractor images (default DATA_DIR/FlickrFinal2)."),
    facescrub_images: Optional[Path] = typer.Option(None, "--facescrub-images", help="megaface: probe images (default DATA_DIR/facescrub_images)."),
    devkit: Optional[Path] = typer.Option(None, "--devkit", help="megaface: the devkit (its templatelists/ folder) (default DATA_DIR/devkit)."),
    synthetic_distractors: int = typer.Option(0, "--synthetic-distractors", help="megaface-lfw: add N synthetic distractor embeddings to reach scale (e.g. 1000000)."),
    synthetic_model: str = typer.Option("gaussian", "--synthetic-model", help="gaussian (fitted to the real distractors' embeddings) | uniform (random unit vectors)."),
    max_distractors: Optional[int] = typer.Option(None, "--max-distractors", help="megaface*: largest gallery size to score."),
    limit_identities: Optional[int] = typer.Option(None, "--limit-identities", help="megaface*: quick run on a seeded sample of N probe identities."),
    ranks: int = typer.Option(10, "--ranks", help="megaface*/ar: CMC ranks reported."),
    export_devkit: Optional[Path] = typer.Option(None, "--export-devkit", help="megaface*: also write baseline features as devkit .bin files + template lists into this folder."),
    protocol: int = typer.Option(1, "--protocol", help="ar: protocol 1 or 2 (see README)."),
    flip: bool = typer.Option(False, "--flip", help="Test-time flip: sum the embeddings of the chip and its mirror."),
    jitter: int = typer.Option(0, "--jitter", help="lfw/synthetic baseline: dlib's num_jitters — mean embedding over N jittered views (N× slower)."),
    metric: str = typer.Option("cosine", "--metric", help="lfw/synthetic: cosine | euclidean (dlib's: distance of the raw embeddings)."),
    landmarks: str = typer.Option("5", "--landmarks", help="lfw, dlib150 chips: fitted on dlib's 5 | 68 landmark model, or 5+68 (both chips' embeddings summed)."),
    fdm_on: str = typer.Option("both", "--fdm-on", help="lfw/synthetic: both (the paper's protocol: the occluded image's FDM masks both images) | occluded (only the occluded image, through a fine-tuned head, against the other's plain embedding)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the occlusions and jitter (the same images for every method)."),
    gpu: Optional[int] = GPU,
    batch_size: int = typer.Option(64, "--batch-size"),
    workers: int = typer.Option(1, "--workers", help="Processes for face alignment (cached after the first run)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="lfw/synthetic: ROC curves PNG."),
    report: Optional[Path] = typer.Option(None, "--report", help="Folder for the plots (ROC or CMC, per-block heatmap, dictionary, occluded probes) and an index.md; needs pdsn-cli[plots]."),
    json_path: Optional[Path] = JSON_OUT,
    quiet: bool = QUIET,
):
    """Verification (10-fold) or identification (MegaFace protocol, AR), baseline vs PDSN, clean and occluded."""
    with handled():
        if json_path is not None:
            from pdsn_cli.atomic import check_writable

            check_writable(json_path)
        if landmarks != "5" and dataset not in ("lfw", "synthetic"):
            from pdsn_cli.errors import BadInputError

            raise BadInputError(f"--landmarks {landmarks} is only implemented for --dataset lfw")
        if fdm_on != "both" and dataset not in ("lfw", "synthetic"):
            from pdsn_cli.errors import BadInputError

            raise BadInputError("--fdm-on applies to verification (--dataset lfw or synthetic); identification "
                                "masks the gallery with the probe's FDM")
        if dataset in ("megaface", "megaface-lfw"):
            from pdsn_cli.eval.identification import IdentificationConfig, run_identification

            cfg = IdentificationConfig(
                dataset=dataset, data_dir=data_dir, megaface_images=megaface_images, facescrub_images=facescrub_images,
                devkit=devkit, trunk=trunk, weights=weights, dict_path=dict_path, occlusions=occluder or ["none"],
                occlusion_source=occlusion, detector=detector, block_threshold=block_threshold,
                synthetic_distractors=synthetic_distractors, synthetic_model=synthetic_model,
                max_distractors=max_distractors, limit_identities=limit_identities, ranks=ranks, flip=flip, seed=seed,
                gpu=gpu, batch_size=batch_size, workers=workers, export_devkit=export_devkit, report=report)
            run, table = run_identification, identification_table
        elif dataset == "ar":
            from pdsn_cli.eval.identification import ArConfig, run_ar

            cfg = ArConfig(data_dir=data_dir, protocol=protocol, trunk=trunk, weights=weights, dict_path=dict_path,
                           occlusion_source=occlusion, detector=detector, block_threshold=block_threshold,
                           ranks=ranks, flip=flip, seed=seed, gpu=gpu, batch_size=batch_size, workers=workers,
                           report=report)
            run, table = run_ar, ar_table
        else:
            from pdsn_cli.eval.benchmark import BenchmarkConfig, run_benchmark

            cfg = BenchmarkConfig(dataset=dataset, data_dir=data_dir, pairs_file=pairs_file, trunk=trunk,
                                  weights=weights, dict_path=dict_path, occlusions=occluder or ["none"],
                                  occlusion_source=occlusion, detector=detector, block_threshold=block_threshold,
                                  limit_pairs=limit_pairs, flip=flip, jitter=jitter, metric=metric, seed=seed,
                                  landmarks=landmarks, fdm_on=fdm_on,
                                  gpu=gpu, batch_size=batch_size,
                                  workers=workers, plot=plot, report=report)
            run, table = run_benchmark, results_table
        with Bars(quiet) as bars:
            res = run(cfg, progress=bars.multi())
        write_json(json_path, res)
    out.print(table(res))
    g = block_grid_table(res) if table is results_table else None
    if g is not None:
        out.print(g)
    if res.get("report"):
        out.print(f"report: {len(res['report'])} files in {report}")
    if table is results_table:
        out.print(f"{res['images']} images ({res['align']['fallback_crops']} without a detected face: centred crop), "
                  f"{res['dropped_pairs']} pairs dropped, {res['seconds']} s")
        skipped = res["align"]["skipped_files"]
    else:
        out.print(f"{res['seconds']} s")
        skipped = res.get("skipped_files", [])
    if skipped:  # their trials were dropped: not the whole protocol
        out.print(skipped_table(skipped))
        raise typer.Exit(EXIT_SKIPPED)


@app.command("embed", epilog="""Examples:

    pdsn embed --input ../shared/data/lfw --out lfw_emb.h5 --flip

    pdsn embed --input pdsn-work/pairs-sunglasses.h5 --which occluded --dict pdsn-work/dict.h5 --occlusion oracle --out occ.h5

    pdsn embed --input faces/ --dict dict.h5 --detector detector.pt --features --gpu 0 --out emb.h5
""")
def embed_cmd(
    input: Path = typer.Option(..., "--input", help="Identity folder, text list of image paths, or chips/pairs HDF5."),
    out_path: Path = typer.Option(..., "--out", help="Output embeddings HDF5 (written atomically)."),
    trunk: str = TRUNK,
    weights: Optional[str] = WEIGHTS,
    which: str = typer.Option("clean", "--which", help="Pairs-file input: embed the clean or the occluded chips."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Root for the relative paths of a list file (default: the list's folder)."),
    dict_path: Optional[Path] = typer.Option(None, "--dict", help="FDM dictionary: PDSN-masked embeddings."),
    occlusion: str = typer.Option("detector", "--occlusion", help="oracle (pairs input only) | detector"),
    detector: Optional[Path] = typer.Option(None, "--detector", help="Detector checkpoint (train-detector)."),
    block_threshold: float = typer.Option(0.25, "--block-threshold"),
    flip: bool = typer.Option(False, "--flip", help="Sum with the mirrored image's embedding."),
    features: bool = typer.Option(False, "--features", help="Also store the mask-point conv features."),
    batch_size: int = typer.Option(64, "--batch-size"),
    gpu: Optional[int] = GPU,
    precision: str = PRECISION,
    compile: str = typer.Option("auto", "--compile", help="auto (only for ≥ 2M images: compiling costs tens of seconds) | on | off; CUDA only"),
    workers: int = typer.Option(1, "--workers"),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run."),
    json_path: Optional[Path] = JSON_OUT,
    quiet: bool = QUIET,
):
    """Embed faces with a trunk (optionally PDSN-masked) into HDF5."""
    from pdsn_cli.embed import EmbedConfig, embed

    cfg = EmbedConfig(input=input, out=out_path, trunk=trunk, weights=weights, which=which, data_dir=data_dir,
                      dict_path=dict_path, occlusion_source=occlusion, detector=detector,
                      block_threshold=block_threshold, flip=flip, features=features, batch_size=batch_size, gpu=gpu,
                      workers=workers, resume=resume, precision=precision, compile=compile)
    with handled(resume_hint=resume_command()):
        with Bars(quiet) as bars:
            res = embed(cfg, progress=bars.multi())
        write_json(json_path, res)
    al = res["align"]
    out.print(kv_table("embed", {
        "output": res["out"], "trunk / mask point": f"{res['trunk']} / {res['mask_point']}",
        "images / identities": f"{res['images']} / {res['identities']}", "dim": res["embedding_dim"],
        "flip / features": f"{res['flip']} / {res['features']}", "PDSN dictionary": res["dictionary"] or "none",
        "skipped files": al["skipped"], "time": f"{res['seconds']} s",
    }))
    if al["skipped_files"]:
        out.print(skipped_table(al["skipped_files"]))
        raise typer.Exit(EXIT_SKIPPED)


datasets_app = typer.Typer(help="Get datasets and protocol files.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")


@datasets_app.command("fetch", epilog="""Example:

    pdsn datasets fetch lfw --dest data/
""")
def datasets_fetch_cmd(
    name: str = typer.Argument(..., help="lfw"),
    dest: Path = typer.Option(Path("data"), "--dest", help="Folder that will hold lfw/."),
    quiet: bool = QUIET,
):
    """Download a dataset from its official site (checksummed, resumable)."""
    from pdsn_cli.data.fetch import fetch_lfw

    if name != "lfw":
        with handled():
            from pdsn_cli.errors import BadInputError

            raise BadInputError(f"unknown dataset {name!r}; fetch knows: lfw")
    with handled(resume_hint=f"pdsn datasets fetch {name} --dest {dest}"):
        with Bars(quiet) as bars:
            path = fetch_lfw(dest, progress=lambda d, n: bars.cb("download")(d, n or d))
    out.print(f"LFW ready at {path}")


@datasets_app.command("lfw-train-ids", epilog="""Example:

    pdsn datasets lfw-train-ids --data-dir ../shared/data/lfw --out pdsn-work/lfw-train-ids.txt
""")
def lfw_train_ids_cmd(
    data_dir: Path = typer.Option(..., "--data-dir", help="LFW root with pairs.txt."),
    out_path: Path = typer.Option(..., "--out", help="Text file, one identity per line."),
):
    """The LFW identities that appear in no View-2 pair (PDSN's training identities)."""
    from pdsn_cli.data.lfw import identities_outside_pairs, read_pairs

    with handled():
        from pdsn_cli.atomic import atomic_output, check_writable

        check_writable(out_path)
        ids = identities_outside_pairs(data_dir, read_pairs(Path(data_dir) / "pairs.txt", data_dir))
        with atomic_output(out_path) as tmp:
            tmp.write_text("".join(f"{n}\n" for n in sorted(ids)), encoding="utf-8")
    out.print(f"{len(ids)} identities ({sum(len(v) for v in ids.values())} images) outside pairs.txt → {out_path}")


@app.command("align", epilog="""Examples:

    pdsn align --out chips.h5                      # built-in synthetic faces, dlib150

    pdsn align --data-dir ../shared/data/lfw --template arc112x96 --workers 2 --out lfw112x96.h5
""")
def align_cmd(
    out_path: Path = typer.Option(..., "--out", help="Chips HDF5 (aligned faces + landmarks + labels)."),
    data_dir: Optional[Path] = DATA_DIR,
    template: str = typer.Option("dlib150", "--template", help="dlib150 | arc112x96 | arc112x112"),
    identities: Optional[Path] = typer.Option(None, "--identities", help="Only these identities (one per line)."),
    limit: Optional[int] = typer.Option(None, "--limit"),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(1, "--workers"),
    synthetic_identities: int = SYN_IDS,
    synthetic_images: int = SYN_IMGS,
    json_path: Optional[Path] = JSON_OUT,
    quiet: bool = QUIET,
):
    """Detect, landmark and align faces to a trunk template, into a chips HDF5 (for train-trunk and embed)."""
    from pdsn_cli.data.chip_cache import export_chips

    with handled():
        from pdsn_cli.data.faces import read_identity_list

        idents = read_identity_list(identities) if identities else None
        with Bars(quiet) as bars:
            res = export_chips(data_spec(data_dir, synthetic_identities, synthetic_images), template, out_path,
                               identities=idents, limit=limit, seed=seed, workers=workers, progress=bars.cb("align"))
        write_json(json_path, res)
    al = res["align"]
    out.print(kv_table("align", {"output": res["out"], "data": res["data"], "template": template,
                                 "images / identities": f"{res['images']} / {res['identities']}",
                                 "fallback crops (no face found)": al["fallback_crops"], "skipped files": al["skipped"]}))
    if al["skipped_files"]:
        out.print(skipped_table(al["skipped_files"]))
        raise typer.Exit(EXIT_SKIPPED)


@app.command("train-trunk", epilog="""Examples:

    pdsn align --out pdsn-work/synthetic112x96.h5 --template arc112x96 && pdsn train-trunk --data pdsn-work/synthetic112x96.h5

    pdsn train-trunk --data casia112x96.h5 --trunk lresnet50e-ir --head cosface --epochs 30 --batch-size 512 --gpu 0

    torchrun --nproc_per_node=4 -m pdsn_cli train-trunk --data casia112x96.h5 --trunk lresnet50e-ir --gpu 0
""")
def train_trunk_cmd(
    data: Path = typer.Option(..., "--data", help="Chips HDF5 (pdsn align) or pairs HDF5 (its clean images)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder: checkpoint.pt (resume) and trunk.pt (default: pdsn-work/trunk-TRUNK/)."),
    trunk: str = typer.Option("tiny", "--trunk", help="tiny | lresnet50e-ir | iresnet50 | iresnet100"),
    head: str = typer.Option("cosface", "--head", help="cosface | arcface"),
    s: Optional[float] = typer.Option(None, "--scale", help="Margin head scale (default: CosFace 30, ArcFace 64)."),
    m: Optional[float] = typer.Option(None, "--margin", help="Margin (default: CosFace 0.35, ArcFace 0.5)."),
    epochs: int = typer.Option(20, "--epochs"),
    batch_size: int = typer.Option(64, "--batch-size", help="Global batch (split across torchrun processes)."),
    lr: float = typer.Option(0.1, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="Steps between checkpoints."),
    resume: bool = typer.Option(False, "--resume"),
    gpu: Optional[int] = GPU,
    precision: str = PRECISION,
    init_weights: Optional[str] = typer.Option(None, "--init-weights", help="Start from these trunk weights (fine-tune)."),
    json_path: Optional[Path] = JSON_OUT,
    quiet: bool = QUIET,
):
    """Train a face trunk with a CosFace/ArcFace margin head (single process or torchrun DDP)."""
    from pdsn_cli.train.trunk import TrainTrunkConfig, train_trunk

    if precision not in ("bf16", "fp32"):
        with handled():
            from pdsn_cli.errors import BadInputError

            raise BadInputError(f"--precision must be bf16 or fp32, got {precision!r}")
    out_dir = out_dir or work_dir() / f"trunk-{trunk}"
    cfg = TrainTrunkConfig(data=str(data), out=str(out_dir), trunk=trunk, head=head, s=s, m=m, epochs=epochs,
                           batch_size=batch_size, lr=lr, seed=seed, checkpoint_every=checkpoint_every, resume=resume,
                           gpu=gpu, amp=precision == "bf16", init_weights=init_weights)
    with handled(resume_hint=resume_command()):
        with Bars(quiet) as bars:
            cb = bars.cb("train")
            res = train_trunk(cfg, progress=lambda i: cb(i["step"], i["total"]))
        write_json(json_path, res)
    acc = res.get("heldout_accuracy")
    out.print(kv_table("train-trunk", {
        "trunk weights": res["trunk_weights"], "trunk / head": f"{res['trunk']} / {res['head']}",
        "images / identities": f"{res['train_images']} / {res['train_identities']}",
        "steps": res["steps"], "final loss": f"{res['final_loss']:.4f}" if res["final_loss"] is not None else "n/a",
        "held-out verification": "n/a" if acc is None else f"{100 * acc:.2f}% on {res['heldout_pairs']} pairs of {res['heldout_identities']} unseen identities",
        "speed": f"{res['img_per_s']:.0f} img/s on {res['device']} × {res['world_size']}" if res["img_per_s"] else "n/a",
    }))


@app.command("train-detector", epilog="""Examples:

    pdsn make-pairs --occluder random --per-image 2 --out pdsn-work/pairs-random.h5 && pdsn train-detector --pairs pdsn-work/pairs-random.h5

    pdsn train-detector --pairs lfw-random.h5 --pairs lfw-blocks.h5 --epochs 12 --out detector.pt

Train on pairs made from the same kind of faces the detector will screen: a detector trained on synthetic
faces alone flags many clean blocks of real photos; real (or mixed real + synthetic) pairs work on both.
""")
def train_detector_cmd(
    pairs: list[Path] = typer.Option(..., "--pairs", help="Pairs files from make-pairs (repeatable)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Detector checkpoint (default: pdsn-work/detector.pt)."),
    epochs: int = typer.Option(12, "--epochs"),
    batch_size: int = typer.Option(64, "--batch-size"),
    lr: float = typer.Option(3e-3, "--lr"),
    threshold: float = typer.Option(0.5, "--threshold", help="Occupancy above which a block counts as occluded (for the report)."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Held-out share of source images for precision/recall."),
    seed: int = typer.Option(0, "--seed"),
    gpu: Optional[int] = GPU,
    json_path: Optional[Path] = JSON_OUT,
    quiet: bool = QUIET,
):
    """Train the occlusion detector: K×K block occupancy of one aligned chip, for PDSN at test time."""
    from pdsn_cli.pdsn.detector import TrainDetectorConfig, train_detector

    out_path = default_path(out_path, "detector.pt")
    cfg = TrainDetectorConfig(pairs=list(pairs), out=out_path, epochs=epochs, batch_size=batch_size, lr=lr,
                              seed=seed, val_fraction=val_fraction, threshold=threshold, gpu=gpu)
    with handled():
        with Bars(quiet) as bars:
            res = train_detector(cfg, progress=bars.cb("train"), read_progress=bars.cb("read"))
        write_json(json_path, res)

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    out.print(kv_table("train-detector", {
        "output": str(out_path), "held-out precision / recall / F1":
        f"{pct(res['precision'])} / {pct(res['recall'])} / {pct(res['f1'])}",
        "clean blocks flagged": pct(res["clean_fpr"]), "time": f"{res['seconds']:.1f} s",
    }))


@app.command("pipeline", epilog="""Examples:

    pdsn pipeline                                   # built-in synthetic faces, a few minutes on a laptop CPU

    pdsn pipeline --data-dir ../shared/data/lfw --workers 2 --json lfw-pipeline.json
""")
def pipeline_cmd(
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="LFW root (train on identities outside pairs.txt, test on View 2). Default: built-in synthetic faces."),
    work: Optional[Path] = typer.Option(None, "--work", help="Folder for every intermediate file (default: pdsn-work/pipeline)."),
    trunk: str = TRUNK,
    weights: Optional[str] = WEIGHTS,
    mask_point: Optional[str] = typer.Option(None, "--mask-point"),
    per_image: int = typer.Option(1, "--per-image", help="Training pairs per image and block."),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", help="Use at most N training images."),
    epochs: int = typer.Option(10, "--epochs"),
    tau: float = typer.Option(0.25, "--tau"),
    finetune_epochs: int = typer.Option(3, "--finetune-epochs", help="Epochs of the head fine-tuned on masked features (pdsn finetune); 0 skips that stage."),
    occluder: Optional[list[str]] = typer.Option(None, "--occluder", help="Benchmark occlusions (default: none, sunglasses, scarf, block:12)."),
    limit_pairs: Optional[int] = typer.Option(None, "--limit-pairs"),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(1, "--workers"),
    gpu: Optional[int] = GPU,
    json_path: Optional[Path] = JSON_OUT,
    quiet: bool = QUIET,
):
    """The whole method in one command: make-pairs → train-block (all) → build-dict → finetune → benchmark."""
    from pdsn_cli.pipeline import PipelineConfig, run_pipeline

    cfg = PipelineConfig(work=work or work_dir() / "pipeline", data_dir=data_dir, trunk=trunk, weights=weights,
                         mask_point=mask_point, per_image=per_image, train_limit=train_limit, epochs=epochs, tau=tau,
                         finetune_epochs=finetune_epochs, limit_pairs=limit_pairs, seed=seed, workers=workers, gpu=gpu)
    if occluder:
        cfg.occlusions = list(occluder)
    with handled():
        with Bars(quiet) as bars:
            res = run_pipeline(cfg, progress=bars.multi(), log=lambda m: console.print(f"[bold]{m}[/]"))
        write_json(json_path, res)
    out.print(results_table(res["benchmark"]))
    out.print(f"pipeline done in {res['seconds']} s; files in {res['work']}")


def main():
    app()


if __name__ == "__main__":
    main()
