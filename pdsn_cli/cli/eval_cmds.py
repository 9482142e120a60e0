"""Test-time commands: ``benchmark``, ``embed``, and ``pipeline`` (the whole method in one command)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from pdsn_cli.atomic import check_distinct_paths, check_writable
from pdsn_cli.cli.app import (GPU, JSON_OUT, MODEL, PDSN_FLAG, PRECISION, QUIET, TRUNK, WEIGHTS, app, handled, model_option,
                              resume_command, shown_default, work_dir, write_json)
from pdsn_cli.cli.render import Bars, console, kv_table, out, rich_table, say, skipped_table
from pdsn_cli.embed import EmbedConfig, embed
from pdsn_cli.errors import EXIT_SKIPPED, BadInputError
from pdsn_cli.eval.scores import write_scores
from pdsn_cli.eval.benchmark import BenchmarkConfig, check_verification_options, run_benchmark
from pdsn_cli.eval.identification import ArConfig, IdentificationConfig, run_ar, run_identification
from pdsn_cli.pipeline import PipelineConfig, run_pipeline
from pdsn_cli.report.markdown import check_report_dir, write_report
from pdsn_cli.report.plots import plot_roc
from pdsn_cli.report.tables import block_grid_table, results_table


@app.command("benchmark", epilog="""Examples:

    pdsn benchmark --dataset lfw --data-dir ../shared/data/lfw --json r.json   # needs LFW

    pdsn benchmark --dataset lfw --data-dir ../shared/data/lfw --jitter 40 --metric euclidean   # needs LFW

    pdsn benchmark --dataset lfw --data-dir ../shared/data/lfw --landmarks 5+68 --flip --metric euclidean   # needs LFW

    pdsn benchmark --dataset lfw --data-dir ../shared/data/lfw --pdsn --occluder sunglasses --occlusion detector   # needs LFW: the built-in model

    pdsn benchmark --dataset lfw --data-dir ../shared/data/lfw --dict dict.h5 --occluder sunglasses --occluder scarf --report report/   # needs LFW

    pdsn benchmark --dataset lfw --data-dir ../shared/data/lfw --occluder block --limit-pairs 600   # needs LFW

    pdsn align --template arc112x96 --out chips.h5 && pdsn train-trunk --data chips.h5 --out trunk/ && pdsn benchmark --dataset synthetic --trunk tiny --weights trunk/trunk.pt --occluder random

    pdsn benchmark --dataset megaface-lfw --data-dir ../shared/data/lfw --synthetic-distractors 1000000 --dict dict.h5 --occluder sunglasses   # needs LFW

    pdsn benchmark --dataset megaface --data-dir /data/megaface --dict dict.h5 --occluder sunglasses --export-devkit feats/   # needs MegaFace

    pdsn benchmark --dataset ar --data-dir /data/AR --protocol 1 --dict dict.h5 --occlusion detector --detector det.pt   # needs the AR database
""")
def benchmark_cmd(
    dataset: str = typer.Option("lfw", "--dataset", help="lfw (View-2 10-fold) | synthetic (built-in) | megaface (Challenge 1) | megaface-lfw (the same protocol on LFW) | ar (AR face database)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Dataset root. lfw: NAME/NAME_NNNN.jpg and pairs.txt; megaface: holds FlickrFinal2/, facescrub_images/, devkit/templatelists/; ar: the AR images."),
    pairs_file: Optional[Path] = typer.Option(None, "--pairs-file", help="lfw: default DATA_DIR/pairs.txt"),
    trunk: str = TRUNK,
    weights: Optional[str] = WEIGHTS,
    dict_path: Optional[Path] = typer.Option(None, "--dict", help="FDM dictionary (build-dict): adds PDSN rows next to the baseline."),
    occluder: Optional[list[str]] = typer.Option(None, "--occluder", help="Synthetic occlusion of the 2nd image (verification) or of the probes (megaface): none, sunglasses, scarf, mask, random, square, ..., block (all K² blocks) or block:J. Repeatable."),
    occlusion: Optional[str] = typer.Option(None, "--occlusion", help="How PDSN learns the occluded blocks: oracle | detector (default: detector when one is given, else oracle)"),
    detector: Optional[Path] = typer.Option(None, "--detector", help="Detector checkpoint (train-detector) for --occlusion detector."),
    pdsn: bool = PDSN_FLAG,
    model: Optional[str] = MODEL,
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
    scores: Optional[Path] = typer.Option(None, "--scores", help="lfw/synthetic: every pair's score as CSV (occlusion, method, pair, fold, same, images, score)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Folder for the plots (ROC or CMC, per-block heatmap, dictionary, occluded probes) and an index.md; needs pdsn-cli[plots]."),
    json_path: Optional[Path] = JSON_OUT,
    quiet: bool = QUIET,
):
    """Verification (10-fold) or identification (MegaFace protocol, AR), baseline vs PDSN, clean and occluded."""
    verification = dataset not in ("megaface", "megaface-lfw", "ar")
    with handled():
        check_verification_options(dataset, landmarks, fdm_on)
        model = model_option(pdsn, model)
        if scores is not None and not verification:
            raise BadInputError("--scores applies to verification (--dataset lfw or synthetic)")
        default_pairs = data_dir / "pairs.txt" if dataset == "lfw" and data_dir is not None else None
        check_distinct_paths(
            {"--data-dir": data_dir, "--pairs-file": pairs_file or default_pairs, "--weights": weights,
             "--dict": dict_path, "--detector": detector, "--megaface-images": megaface_images,
             "--facescrub-images": facescrub_images, "--devkit": devkit},
            {"--plot": plot, "--json": json_path, "--scores": scores},
            output_folders={"--report": report, "--export-devkit": export_devkit})
        for path in (plot, scores):  # refused before any work, as --json is
            if path is not None:
                check_writable(path)
        if report is not None:
            check_report_dir(report)
        if dataset in ("megaface", "megaface-lfw"):
            cfg = IdentificationConfig(
                dataset=dataset, data_dir=data_dir, megaface_images=megaface_images, facescrub_images=facescrub_images,
                devkit=devkit, trunk=trunk, weights=weights, dict_path=dict_path, occlusions=occluder or ["none"],
                occlusion_source=occlusion, detector=detector, block_threshold=block_threshold,
                synthetic_distractors=synthetic_distractors, synthetic_model=synthetic_model,
                max_distractors=max_distractors, limit_identities=limit_identities, ranks=ranks, flip=flip, seed=seed,
                gpu=gpu, batch_size=batch_size, workers=workers, export_devkit=export_devkit, model=model)
            run = run_identification
        elif dataset == "ar":
            cfg = ArConfig(data_dir=data_dir, protocol=protocol, trunk=trunk, weights=weights, dict_path=dict_path,
                           occlusion_source=occlusion, detector=detector, block_threshold=block_threshold,
                           ranks=ranks, flip=flip, seed=seed, gpu=gpu, batch_size=batch_size, workers=workers,
                           model=model)
            run = run_ar
        else:
            cfg = BenchmarkConfig(dataset=dataset, data_dir=data_dir, pairs_file=pairs_file, trunk=trunk,
                                  weights=weights, dict_path=dict_path, occlusions=occluder or ["none"],
                                  occlusion_source=occlusion, detector=detector, block_threshold=block_threshold,
                                  limit_pairs=limit_pairs, flip=flip, jitter=jitter, metric=metric, seed=seed,
                                  landmarks=landmarks, fdm_on=fdm_on, gpu=gpu, batch_size=batch_size,
                                  workers=workers, model=model, keep_scores=scores is not None)
            run = run_benchmark
        with Bars(quiet) as bars:
            res = run(cfg, progress=bars.multi())
        if scores is not None:
            write_scores(scores, res.scores)
        if plot is not None and res.figures.get("roc"):
            plot_roc(res.figures["roc"], plot, title=res.figures["title"])
        if report is not None:
            res["report"] = [str(p) for p in write_report(report, res, **res.figures)]
        write_json(json_path, res)
    out.print(rich_table(results_table(res)))
    grid = block_grid_table(res) if verification else None
    if grid is not None:
        out.print(rich_table(grid))
    if res.get("report"):
        say(out, f"report: {len(res['report'])} files in {report}")
    if verification:
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

    pdsn embed --input ../shared/data/lfw --out lfw_emb.h5 --flip   # needs LFW

    pdsn make-pairs --block all && pdsn train-block && pdsn build-dict --out dict.h5 && pdsn make-pairs --occluder sunglasses --out sunglasses.h5 && pdsn embed --input sunglasses.h5 --which occluded --dict dict.h5 --occlusion oracle --out occ.h5

    pdsn embed --input faces/ --pdsn --out emb.h5   # needs photos: the built-in PDSN model

    pdsn embed --input faces/ --dict dict.h5 --detector detector.pt --features --gpu 0 --out emb.h5   # needs a GPU, photos, dictionary and detector

    torchrun --nproc_per_node=8 -m pdsn_cli embed --input faces/ --pdsn --gpu 0 --out emb.h5   # needs torchrun and 8 GPUs: each process embeds a shard, rank 0 merges
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
    pdsn: bool = PDSN_FLAG,
    model: Optional[str] = MODEL,
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
    with handled():
        model = model_option(pdsn, model)
    cfg = EmbedConfig(model=model, input=input, out=out_path, trunk=trunk, weights=weights, which=which, data_dir=data_dir,
                      dict_path=dict_path, occlusion_source=occlusion, detector=detector,
                      block_threshold=block_threshold, flip=flip, features=features, batch_size=batch_size, gpu=gpu,
                      workers=workers, resume=resume, precision=precision, compile=compile)
    with handled(resume_hint=resume_command()):
        check_distinct_paths({"--input": input, "--data-dir": data_dir, "--dict": dict_path, "--detector": detector,
                              "--weights": weights}, {"--out": out_path, "--json": json_path})
        with Bars(quiet or os.environ.get("RANK", "0") != "0") as bars:
            res = embed(cfg, progress=bars.multi())
        if res is None:  # a torchrun rank other than 0: rank 0 merged and reports
            return
        write_json(json_path, res)
    al = res["align"]
    resumed = {}
    if res["resumed_from"]:
        resumed = {"resumed": f"yes, after {res['resumed_from']} rows of {res['out']}.partial" if res["world_size"] == 1
                   else f"yes, {res['resumed_from']} of {res['world_size']} shards kept"}
    out.print(kv_table("embed", {
        "output": res["out"], "trunk / mask point": f"{res['trunk']} / {res['mask_point']}",
        "images / identities": f"{res['images']} / {res['identities']}", "dim": res["embedding_dim"],
        "flip / features": f"{res['flip']} / {res['features']}", "PDSN dictionary": res["dictionary"] or "none",
        "processes": res["world_size"], "skipped files": al["skipped"], "time": f"{res['seconds']} s", **resumed,
    }))
    if al["skipped_files"]:
        out.print(skipped_table(al["skipped_files"]))
        raise typer.Exit(EXIT_SKIPPED)


@app.command("pipeline", epilog="""Examples:

    pdsn pipeline                                   # built-in synthetic faces, a few minutes on a laptop CPU

    pdsn pipeline --data-dir ../shared/data/lfw --workers 2 --json lfw-pipeline.json   # needs LFW

    pdsn pipeline --export-model my-model --epochs 2 --finetune-epochs 1   # a model folder for --model / pdsn verify (synthetic faces: a demo)

    pdsn pipeline --tune trunk --epochs 2 --finetune-epochs 1   # the trunk tuned on occluders drawn fresh (synthetic faces: a demo)

    pdsn pipeline --data-dir ../shared/data/lfw --tune trunk --train-dir ../shared/data/celeba-faces --workers 2   # needs LFW and celeba-faces
""")
def pipeline_cmd(
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="LFW root (train on identities outside pairs.txt, test on View 2). Default: built-in synthetic faces."),
    work: Optional[Path] = typer.Option(None, "--work", help=f"Folder for every intermediate file (default: {shown_default('pipeline')})."),
    trunk: str = TRUNK,
    weights: Optional[str] = WEIGHTS,
    mask_point: Optional[str] = typer.Option(None, "--mask-point"),
    per_image: int = typer.Option(1, "--per-image", help="Training pairs per image and block."),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", help="Use at most N training images."),
    epochs: int = typer.Option(10, "--epochs"),
    batch_size: int = typer.Option(32, "--batch-size", help="train-block: pairs per block and step."),
    tau: float = typer.Option(0.25, "--tau"),
    tune: str = typer.Option("head", "--tune", help="What pdsn finetune tunes on masked features: head (after the mask point, on the block and random-occluder pairs) or trunk (the whole trunk, occluders drawn fresh over the training faces and every --train-dir)."),
    finetune_epochs: Optional[int] = typer.Option(None, "--finetune-epochs", help="Epochs of pdsn finetune (default: 3 for the head, 4 for the trunk); 0 skips that stage."),
    train_dir: Optional[list[Path]] = typer.Option(None, "--train-dir", help="Another training face set (identity folders) for every stage — pairs, dictionary, fine-tune, detector — its people kept apart from the others (repeatable)."),
    occluder: Optional[list[str]] = typer.Option(None, "--occluder", help="Benchmark occlusions (default: none, sunglasses, scarf, block:12)."),
    limit_pairs: Optional[int] = typer.Option(None, "--limit-pairs"),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(1, "--workers"),
    export_model: Optional[Path] = typer.Option(None, "--export-model", help="Also train the occlusion detector, benchmark with it, calibrate the verify threshold and write a model folder here (see pdsn models)."),
    gpu: Optional[int] = GPU,
    json_path: Optional[Path] = JSON_OUT,
    quiet: bool = QUIET,
):
    """The whole method in one command: make-pairs → train-block (all) → build-dict → finetune → benchmark."""
    cfg = PipelineConfig(export_model=export_model, command=" ".join(["pdsn", *sys.argv[1:]]), work=work or work_dir() / "pipeline", data_dir=data_dir, trunk=trunk, weights=weights,
                         mask_point=mask_point, per_image=per_image, train_limit=train_limit, epochs=epochs, batch_size=batch_size, tau=tau,
                         tune=tune, finetune_epochs=finetune_epochs, train_dirs=list(train_dir or []), limit_pairs=limit_pairs, seed=seed, workers=workers, gpu=gpu)
    if occluder:
        cfg.occlusions = list(occluder)
    with handled():
        check_distinct_paths({"--data-dir": data_dir, "--weights": weights}, {"--json": json_path},
                             output_folders={"--work": cfg.work, "--export-model": export_model})
        with Bars(quiet) as bars:
            res = run_pipeline(cfg, progress=bars.multi(), log=lambda m: say(console, m, style="bold"))
        write_json(json_path, res)
    out.print(rich_table(results_table(res["benchmark"])))
    if res.get("model"):
        say(out, f"model {res['model']['name']} written to {res['model']['path']} (threshold "
                 f"{res['model']['threshold']:.4f}): pdsn verify A.jpg B.jpg --model {res['model']['path']}")
    say(out, f"pipeline done in {res['seconds']} s; files in {res['work']}")
