"""Data commands: ``make-pairs``, ``align``, ``datasets fetch``, ``datasets lfw-train-ids``, ``occluders``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from pdsn_cli.atomic import check_distinct_paths, check_writable
from pdsn_cli.cli.app import (DATA_DIR, JSON_OUT, QUIET, SYN_IDS, SYN_IMGS, app, data_spec, datasets_app, default_path,
                              handled, in_work_dir, resume_command, shown_default, write_json)
from pdsn_cli.cli.render import Bars, kv_table, out, say, skipped_table, warn
from pdsn_cli.data.chip_cache import export_chips
from pdsn_cli.device import resolve_device
from pdsn_cli.data.faces import read_identity_list
from pdsn_cli.data.fetch import fetch_lfw
from pdsn_cli.data.lfw import write_training_identities
from pdsn_cli.data.make_pairs import MakePairsConfig, make_pairs
from pdsn_cli.errors import EXIT_SKIPPED, BadInputError
from pdsn_cli.occlusion.occluders import OCCLUDERS
from pdsn_cli.occlusion.photo import occlude_photo_file
from pdsn_cli.report.sheets import contact_sheet, occluder_preview, write_assets, write_image

PREVIEW_PAIRS = 16  # (clean, occluded) pairs on the --preview sheet: two rows of eight chips


@app.command("make-pairs", epilog="""Examples:

    pdsn make-pairs --occluder sunglasses --limit 50 --out pairs.h5

    pdsn make-pairs --block all --data-dir ../shared/data/lfw --identities train_ids.txt --out blocks.h5   # needs LFW

    pdsn make-pairs --occluder random --per-image 4 --preview sheet.png --out random.h5

    pdsn make-pairs --occluder random --data-dir ../shared/data/lfw --data-dir ../shared/data/celeba-faces --identities lfw/train_ids.txt --out random.h5   # needs LFW and celeba-faces
""")
def make_pairs_cmd(
    out_path: Optional[Path] = typer.Option(None, "--out", help=f"Output HDF5 file, written atomically (default: {shown_default('pairs-OCCLUDER.h5')}, or pairs-blocks.h5 / pairs-blockJ.h5 with --block)."),
    occluder: Optional[str] = typer.Option(None, "--occluder", help=f"{', '.join(OCCLUDERS)} (block needs --block; random: one of the others, square excepted)."),
    block: Optional[str] = typer.Option(None, "--block", help="Occlude grid block J (0..K²-1, row-major) or 'all' (every block)."),
    grid: int = typer.Option(5, "--grid", help="K of the K×K grid."),
    template: str = typer.Option("dlib150", "--template", help="dlib150 | arc112x96 | arc112x112"),
    per_image: int = typer.Option(1, "--per-image", help="Pairs per source image (per block with --block all)."),
    data_dir: Optional[list[Path]] = typer.Option(None, "--data-dir", help="Identity-folder dataset: ROOT/IDENTITY/IMAGE (LFW, CASIA-WebFace, ...); repeatable: several face sets, their people kept apart as SET/IDENTITY (SET: the folder's name). Default: built-in synthetic faces."),
    identities: Optional[Path] = typer.Option(None, "--identities", help="File with one identity per line: use only these (with several --data-dir: SET/IDENTITY lines; a set no line names is used whole)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use a seeded sample of N images (per face set)."),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(1, "--workers", help="Processes for alignment and occlusion."),
    append: bool = typer.Option(False, "--append", help="Add rows to an existing pairs file with the same schema."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run (same options)."),
    preview: Optional[Path] = typer.Option(None, "--preview", help="Write a contact sheet PNG of the first pairs."),
    store_occluded: bool = typer.Option(False, "--store-occluded", help="Also store every occluded chip and its pixel mask (~70 KB a row at 150×150); by default readers redraw them, bit-identical, from each row's seed."),
    synthetic_identities: int = SYN_IDS,
    synthetic_images: int = SYN_IMGS,
    json_path: Optional[Path] = JSON_OUT,
    quiet: bool = QUIET,
):
    """Synthesize (clean, occluded) face pairs with pixel masks and block occupancy, to HDF5."""
    tag = occluder or ("random" if block is None else "blocks" if block == "all" else f"block{block}")
    out_path = default_path(out_path, f"pairs-{tag}.h5")
    cfg = MakePairsConfig(
        out=out_path, data=[data_spec(d, synthetic_identities, synthetic_images) for d in data_dir] if data_dir
        else data_spec(None, synthetic_identities, synthetic_images), occluder=occluder,
        block=block, grid=grid, template=template, per_image=per_image, identities=identities, limit=limit,
        seed=seed, workers=workers, append=append, resume=resume, store_occluded=store_occluded,
    )
    # an interrupted --append keeps nothing half-appended: running the same command again is its resume
    hint = " ".join(["pdsn", *sys.argv[1:]]) if append else resume_command()
    with handled(resume_hint=hint):
        check_distinct_paths({"--data-dir": data_dir, "--identities": identities},
                             {"--out": out_path, "--preview": preview, "--json": json_path})
        if preview is not None:
            check_writable(preview)
        with Bars(quiet) as bars:
            res = make_pairs(cfg, progress=bars.cb("pairs"), align_progress=bars.cb("align"))
        shown = res.figures.get("pairs", [])[:PREVIEW_PAIRS]
        if preview is not None and shown:
            contact_sheet([chip for clean, occ, _ in shown for chip in (clean, occ)], preview, cols=8,
                          labels=[label for _, _, kind in shown for label in ("clean", kind)])
        res["preview"] = str(preview) if preview else None
        write_json(json_path, res)
    al = res["align"]
    rows = {
        "output": res["out"],
        "data": res["data"],
        "template / grid": f"{res['template']} / {res['grid']}×{res['grid']}",
        "occluder": res["occluder"] + ("  (" + ", ".join(f"{k}: {v}" for k, v in sorted(res["kinds"].items())) + ")" if res["kinds"] else ""),
        "images / identities": f"{res['images']} / {res['identities']}",
        "pairs written": res["pairs_written"] if not res["resumed_from"] else f"{res['pairs_written']} (resumed after {res['resumed_from']})",
        "pairs in file": f"{res['pairs_in_file']} ({res['file_bytes'] / 2**20:.1f} MB" + (", occluded chips stored)" if res["store_occluded"] else ", occluded chips redrawn when read)"),
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
    warn(res["warnings"])
    if al["skipped_files"]:
        out.print(skipped_table(al["skipped_files"]))
        raise typer.Exit(EXIT_SKIPPED)


@datasets_app.command("fetch", epilog="""Example:

    pdsn datasets fetch lfw --dest data/   # needs network
""")
def datasets_fetch_cmd(
    name: str = typer.Argument(..., help="lfw"),
    dest: Path = typer.Option(Path("data"), "--dest", help="Folder that will hold lfw/."),
    json_path: Optional[Path] = JSON_OUT,
    quiet: bool = QUIET,
):
    """Download a dataset from its official site (checksummed, resumable)."""
    if name != "lfw":
        with handled():
            raise BadInputError(f"unknown dataset {name!r}; fetch knows: lfw")
    with handled(resume_hint=f"pdsn datasets fetch {name} --dest {dest}"):
        with Bars(quiet) as bars:
            path = fetch_lfw(dest, progress=lambda d, n: bars.cb("download")(d, n or d))
        write_json(json_path, {"dataset": name, "path": str(path)})
    say(out, f"LFW ready at {path}")


@datasets_app.command("lfw-train-ids", epilog="""Example:

    pdsn datasets lfw-train-ids --data-dir ../shared/data/lfw --out train_ids.txt   # needs LFW
""")
def lfw_train_ids_cmd(
    data_dir: Path = typer.Option(..., "--data-dir", help="LFW root with pairs.txt."),
    out_path: Path = typer.Option(..., "--out", help="Text file, one identity per line."),
    json_path: Optional[Path] = JSON_OUT,
):
    """The LFW identities that appear in no View-2 pair (PDSN's training identities)."""
    out_path = in_work_dir(out_path)
    with handled():
        check_distinct_paths({"--data-dir": [data_dir, data_dir / "pairs.txt"]}, {"--out": out_path})
        ids = write_training_identities(data_dir, out_path)
        write_json(json_path, {"out": str(out_path), "identities": len(ids),
                               "images": sum(len(v) for v in ids.values())})
    say(out, f"{len(ids)} identities ({sum(len(v) for v in ids.values())} images) outside pairs.txt → {out_path}")


@app.command("align", epilog="""Examples:

    pdsn align --out chips.h5                      # built-in synthetic faces, dlib150

    pdsn align --data-dir ../shared/data/lfw --template arc112x96 --workers 2 --out lfw112x96.h5   # needs LFW

    pdsn --face-detector cnn align --data-dir ../shared/data/lfw --out lfw.h5   # needs LFW; the ported CNN detector, no dlib

    pdsn --face-detector cnn align --data-dir photos/ --gpu 0 --out chips.h5   # needs a GPU: batched alignment on it

Faces are found by --face-detector (an option of `pdsn` itself). A dataset's own landmarks replace detection:
`<image>.json` beside an image ({"points": [[x, y], ...]} with 5 or 68 points, and/or {"box": [l, t, r, b]};
MegaFace's {"bounding_box": ...}), or `landmarks.csv` at the data root (header path,x1,y1,...,x5,y5 and/or
left,top,right,bottom). See the README's "Faces and alignment".
""")
def align_cmd(
    out_path: Path = typer.Option(..., "--out", help="Chips HDF5 (aligned faces + landmarks + labels)."),
    data_dir: Optional[Path] = DATA_DIR,
    template: str = typer.Option("dlib150", "--template", help="dlib150 | arc112x96 | arc112x112"),
    identities: Optional[Path] = typer.Option(None, "--identities", help="Only these identities (one per line)."),
    limit: Optional[int] = typer.Option(None, "--limit"),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(1, "--workers"),
    gpu: Optional[int] = typer.Option(None, "--gpu", help="Align on this CUDA device, in batches (with --face-detector cnn; dlib's HOG runs on the CPU)."),
    synthetic_identities: int = SYN_IDS,
    synthetic_images: int = SYN_IMGS,
    json_path: Optional[Path] = JSON_OUT,
    quiet: bool = QUIET,
):
    """Detect, landmark and align faces to a trunk template, into a chips HDF5 (for train-trunk and embed)."""
    out_path = in_work_dir(out_path)
    with handled():
        check_distinct_paths({"--data-dir": data_dir, "--identities": identities},
                             {"--out": out_path, "--json": json_path})
        idents = read_identity_list(identities) if identities else None
        with Bars(quiet) as bars:
            res = export_chips(data_spec(data_dir, synthetic_identities, synthetic_images), template, out_path,
                               identities=idents, limit=limit, seed=seed, workers=workers, progress=bars.cb("align"),
                               align_device=resolve_device(gpu) if gpu is not None else None)
        write_json(json_path, res)
    al = res["align"]
    out.print(kv_table("align", {"output": res["out"], "data": res["data"], "template": template,
                                 "images / identities": f"{res['images']} / {res['identities']}",
                                 "fallback crops (no face found)": al["fallback_crops"],
                                 "from the dataset's landmark files": al["from_landmark_files"],
                                 "skipped files": al["skipped"]}))
    warn(res["warnings"])
    if al["skipped_files"]:
        out.print(skipped_table(al["skipped_files"]))
        raise typer.Exit(EXIT_SKIPPED)


@app.command("occluders", epilog="""Examples:

    pdsn occluders --write-assets assets/occluders

    pdsn occluders --preview sheet.png --seed 3
""")
def occluders_cmd(
    assets: Optional[Path] = typer.Option(None, "--write-assets", help="Write each occluder sprite's canonical look as an RGBA PNG into this folder."),
    preview: Optional[Path] = typer.Option(None, "--preview", help="Write a contact sheet of every occluder kind on synthetic faces."),
    seed: int = typer.Option(0, "--seed", help="Seed of the preview's occluders."),
):
    """Render the procedural occluders: the sprite PNGs of assets/occluders, or a contact sheet of every kind."""
    with handled():
        if assets is None and preview is None:
            raise BadInputError("give --write-assets DIR and/or --preview FILE")
        check_distinct_paths({}, {"--preview": preview}, output_folders={"--write-assets": assets})
        if preview is not None:
            check_writable(preview)
        for path in write_assets(assets) if assets is not None else []:
            say(out, f"{path}  {path.stat().st_size / 1024:.1f} KB")
        if preview is not None:
            say(out, occluder_preview(preview, seed))


@app.command("occlude", epilog="""Examples:

    pdsn occlude me.jpg --occluder sunglasses --out me-sunglasses.jpg   # needs a photo

    pdsn occlude ../shared/data/lfw/Aaron_Peirsol/Aaron_Peirsol_0001.jpg --occluder mask --out masked.jpg && pdsn verify masked.jpg ../shared/data/lfw/Aaron_Peirsol/Aaron_Peirsol_0002.jpg   # needs LFW
""")
def occlude_cmd(
    photo: Path = typer.Argument(..., help="The photo (any common format)."),
    occluder: str = typer.Option(..., "--occluder", help="sunglasses, eyeglasses, scarf, mask, hand, phone, cup, book, square, block:J, random."),
    out_path: Path = typer.Option(..., "--out", help="Output photo (.jpg or .png)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the occluder's shape, colour and placement."),
    face: str = typer.Option("centre", "--face", help="Photo with several faces: centre | largest."),
):
    """Draw one of the toolkit's occluders on a photo's face (as the benchmarks draw it on the aligned chip)."""
    with handled():
        check_distinct_paths({"PHOTO": photo}, {"--out": out_path})
        check_writable(out_path)
        res = occlude_photo_file(photo, occluder, seed=seed, face=face)
        write_image(out_path, res.image)
    say(out, f"{out_path}: {res.kind} drawn over {res.pixels:,} pixels" + (f" ({res.faces} faces seen; --face picks)" if res.faces > 1 else ""))
