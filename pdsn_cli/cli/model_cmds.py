"""Commands around a PDSN model: ``verify`` (two photos, one answer), ``models`` (what ``--pdsn``/``--model`` can
select) and ``export-model`` (pack a dictionary, its head and a detector into a model folder)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pdsn_cli.atomic import check_distinct_paths, check_writable
from pdsn_cli.cli.app import GPU, JSON_OUT, QUIET, app, handled, work_dir, write_json
from pdsn_cli.cli.render import Bars, kv_table, out, rich_table, say
from pdsn_cli.errors import EXIT_SKIPPED, BadInputError
from pdsn_cli.pdsn.models import builtin_models, check_files, export_model, model_figures, training_summary, user_models
from pdsn_cli.report.sheets import verify_sheet
from pdsn_cli.report.tables import models_table, verify_table
from pdsn_cli.verify import VerifyConfig, pairs_from_args, read_pairs_file, verify


@app.command("verify", epilog="""Examples:

    pdsn verify alice1.jpg alice2.jpg   # needs two photos

    pdsn verify a.jpg b.jpg c.jpg d.jpg --explain why.png --json -   # needs photos

    pdsn verify --pairs pairs.tsv --face largest --json scores.json   # needs a pairs file (two paths a line)

Exit codes: 0 every pair scored · 2 bad input (not an image, a folder, a model of another trunk) · 3 some
pairs skipped (no face found: they are listed).
""")
def verify_cmd(
    images: Optional[list[Path]] = typer.Argument(None, help="Photos two by two: A B [C D ...]."),
    pairs_file: Optional[Path] = typer.Option(None, "--pairs", help="A file of pairs: two image paths a line (tab- or space-separated)."),
    model: str = typer.Option("builtin", "--model", help="The PDSN model: builtin (shipped), a built-in name, or a folder (pdsn export-model). See pdsn models."),
    face: str = typer.Option("centre", "--face", help="Photo with several faces: centre (nearest the centre) | largest."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Cosine above which a pair is the same person (default: the model's, calibrated on LFW View 2)."),
    explain: Optional[Path] = typer.Option(None, "--explain", help="PNG: both chips of every pair, the blocks judged occluded outlined."),
    gpu: Optional[int] = GPU,
    json_path: Optional[Path] = JSON_OUT,
    quiet: bool = QUIET,
):
    """Are these photos the same person? Align, detect occlusion, PDSN-masked embeddings, cosine score, decision."""
    with handled():
        if images and pairs_file is not None:
            raise BadInputError("give the photos as arguments or --pairs FILE, not both")
        check_distinct_paths({"--pairs": pairs_file, **{f"IMAGE {i + 1}": p for i, p in enumerate(images or [])}},
                             {"--explain": explain, "--json": json_path})
        if explain is not None:
            check_writable(explain)
        pairs = read_pairs_file(pairs_file) if pairs_file is not None else pairs_from_args(images or [])
        with Bars(quiet) as bars:
            res = verify(VerifyConfig(pairs, model=model, face=face, threshold=threshold, gpu=gpu),
                         progress=bars.multi())
        if explain is not None and res["pairs"]:
            res["explain"] = str(verify_sheet(res, res.figures["chips"], res.figures["grid"], explain))
        write_json(json_path, res)
    if res["pairs"]:
        out.print(rich_table(verify_table(res)))
    for p in res["several_faces"]:
        say(out, f"{p}: several faces; the {'largest' if face == 'largest' else 'one nearest the centre'} was used "
                 f"(--face {'centre' if face == 'largest' else 'largest'} picks the other way)", style="yellow")
    say(out, f"score: cosine of the PDSN embeddings; above {res['threshold']:.3f} = same person "
             f"({res['threshold_calibration']})")
    if res["skipped"]:
        for s in res["skipped"]:
            say(out, f"skipped {s['image1']} / {s['image2']}: {s['reason']} (--face largest, or a closer crop)",
                style="yellow")
        raise typer.Exit(EXIT_SKIPPED)


@app.command("models", epilog="""Examples:

    pdsn models

    pdsn models --check --json -
""")
def models_cmd(
    check: bool = typer.Option(False, "--check", help="Also check every model's files against the sha256 in its model.json."),
    json_path: Optional[Path] = JSON_OUT,
):
    """The PDSN models --pdsn / --model can select: the built-in ones and those exported under the work folder."""
    with handled():
        found = builtin_models() + user_models(work_dir())
        rows = [m.summary() | ({"damaged_files": check_files(m)} if check else {}) for m in found]
        write_json(json_path, {"models": rows})
    out.print(rich_table(models_table(rows)))
    bad = [r for r in rows if r.get("damaged_files")]
    for r in bad:
        say(out, f"{r['name']}: {'; '.join(r['damaged_files'])}", style="red")
    if bad:
        raise typer.Exit(4)


@app.command("export-model", epilog="""Examples:

    pdsn export-model --dict dict-ft.h5 --detector detector.pt --out my-model && pdsn benchmark --dataset lfw --data-dir ../shared/data/lfw --model my-model --occluder none --occluder sunglasses --scores s.csv --json b.json && pdsn export-model --dict dict-ft.h5 --detector detector.pt --scores s.csv --benchmark b.json --out my-model   # needs LFW and a fine-tuned dictionary and detector
""")
def export_model_cmd(
    dict_path: Path = typer.Option(..., "--dict", help="Dictionary with a fine-tuned head (pdsn finetune)."),
    detector: Path = typer.Option(..., "--detector", help="Occlusion detector (pdsn train-detector)."),
    scores: Optional[Path] = typer.Option(None, "--scores", help="pdsn benchmark --scores file of this model (--model DIR): the verification threshold is calibrated on its PDSN rows. Without it pdsn verify needs --threshold; export, benchmark, export again with it."),
    benchmark: Optional[Path] = typer.Option(None, "--benchmark", help="pdsn benchmark --json of the same run: its figures go into model.json."),
    training: Optional[Path] = typer.Option(None, "--training", help="pdsn pipeline --json that trained it: its data counts go into model.json."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Trunk weights, for a trunk other than dlib-resnet (copied into the model)."),
    out_dir: Path = typer.Option(..., "--out", help="Model folder (created)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name (default: the folder's name)."),
    command: Optional[list[str]] = typer.Option(None, "--command", help="A command that made the model, recorded in model.json (repeatable)."),
    fp32: bool = typer.Option(False, "--fp32", help="Keep the head in float32 (default: float16 when the embeddings stay within cosine 0.999)."),
    json_path: Optional[Path] = JSON_OUT,
):
    """Pack a fine-tuned dictionary and a detector into a model folder that --model (and pdsn verify) can use."""
    with handled():
        check_distinct_paths({"--dict": dict_path, "--detector": detector, "--scores": scores, "--weights": weights,
                              "--benchmark": benchmark, "--training": training}, {"--json": json_path},
                             output_folders={"--out": out_dir})
        bench = _read_json(benchmark) if benchmark else None
        res = export_model(dict_path, detector, out_dir, name=name or out_dir.name, scores=scores, weights=weights,
                           figures=model_figures(bench) if bench else None,
                           dataset=bench.get("dataset") if bench else None,
                           training=training_summary(_read_json(training)) if training else None, fp16=not fp32,
                           commands=list(command or []))
        write_json(json_path, res)
    out.print(kv_table(f"model {res['name']}", {
        "folder": res["path"], "trunk / mask point": f"{res['trunk']} / {res['mask_point']}",
        "threshold": f"{res['threshold']:.4f}" if res["threshold"] is not None else "not calibrated (--scores)", "size": f"{res['bytes'] / 2**20:.2f} MB",
        "head": f"{res['head_dtype']} (min cosine to float32 {res['fp16_min_cosine_to_fp32']})"}))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"cannot read {path} as JSON: {getattr(e, 'strerror', None) or e}") from None

