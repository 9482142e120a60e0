"""Training commands: ``train-block``, ``build-dict``, ``finetune``, ``train-trunk``, ``train-detector``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from pdsn_cli.accel import check_precision
from pdsn_cli.atomic import check_distinct_paths, check_writable
from pdsn_cli.cli.app import (GPU, JSON_OUT, PRECISION, QUIET, TRUNK, WEIGHTS, app, default_path, handled, shown_default,
                              resume_command, work_dir, write_json)
from pdsn_cli.errors import BadInputError
from pdsn_cli.cli.render import Bars, kv_table, out, warn
from pdsn_cli.pdsn.fdm import build, load
from pdsn_cli.report.plots import plot_dict
from pdsn_cli.train.blocks import TrainBlockConfig, train_blocks
from pdsn_cli.train.detector import TrainDetectorConfig, train_detector
from pdsn_cli.train.finetune import FinetuneConfig, finetune
from pdsn_cli.occlusion.occluders import DRAWN
from pdsn_cli.train.finetune_trunk import FinetuneTrunkConfig, finetune_trunk
from pdsn_cli.train.trunk import CHECKPOINT_NAME, TRUNK_NAME, TrainTrunkConfig, train_trunk


def run_training(train_fn, cfg, quiet: bool, json_path: Optional[Path], inputs: dict, outputs: dict) -> dict | None:
    """Run a trainer with progress bars, errors as exit codes and a resume hint on Ctrl-C; under torchrun only
    rank 0 draws, writes the JSON and gets the result to print (the other ranks get None). ``inputs`` and
    ``outputs`` (option → path) are checked first: no output may be an input or another output."""
    rank0 = os.environ.get("RANK", "0") == "0"
    with handled(resume_hint=resume_command()):
        check_distinct_paths(inputs, {**outputs, "--json": json_path})
        with Bars(quiet or not rank0) as bars:
            res = train_fn(cfg, progress=bars.multi())
        if rank0:
            write_json(json_path, res)
    return res if rank0 else None


def resumed_row(res: dict) -> dict:
    """The summary line of a run continued with ``--resume`` (from which step), none for a fresh run."""
    step = res.get("resumed_from")
    return {} if not step else {"resumed": f"yes, from step {step} (its checkpoint)"}


@app.command("train-block", epilog="""Examples:

    pdsn make-pairs --block all && pdsn train-block --block all

    pdsn make-pairs --block 7 --out block7.h5 && pdsn train-block --block 7 --gpu 0 --pairs block7.h5   # needs a GPU

    pdsn make-pairs --block all --out blocks.h5 && pdsn train-block --pairs blocks.h5 --mask-point level1 --epochs 20 --out blocks.pt

    torchrun --nproc_per_node=4 -m pdsn_cli train-block --block all --gpu 0 --pairs blocks.h5   # needs torchrun and 4 GPUs

    pdsn align --out faces.h5 && pdsn train-block --faces faces.h5 --out blocks.pt

    pdsn train-block --faces celeba.h5 --faces lfw-train.h5 --gpu 0 --out blocks.pt   # needs aligned face sets and a GPU
""")
def train_block_cmd(
    block: str = typer.Option("all", "--block", help="Grid block J (0..K²-1) or 'all' (every block in one batched pass)."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help=f"Pairs file from make-pairs --block (default without --faces: {shown_default('pairs-blocks.h5')})."),
    faces: Optional[list[Path]] = typer.Option(None, "--faces", help="Instead of --pairs: chips files of pdsn align (repeatable; identities kept apart per set). The pairs make-pairs --block would write for them (same --seed) are drawn as they are read, never written."),
    grid: int = typer.Option(5, "--grid", help="--faces: the K×K grid."),
    per_image: int = typer.Option(1, "--per-image", help="--faces: occluded copies of each face per block."),
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
    seed: int = typer.Option(0, "--seed", help="Training seed; with --faces also the occluders' (make-pairs --seed)."),
    gpu: Optional[int] = GPU,
    precision: str = PRECISION,
    resume: bool = typer.Option(False, "--resume", help="Continue from the last epoch checkpoint."),
    out_path: Optional[Path] = typer.Option(None, "--out", help=f"Output (default: {shown_default('blocks/all.pt')}, or blocks/blockJJ.pt for --block J)."),
    json_path: Optional[Path] = JSON_OUT,
    quiet: bool = QUIET,
):
    """Train the PDSN mask generator(s) of one grid block or of all blocks at once."""
    if not faces:
        pairs = pairs or work_dir() / "pairs-blocks.h5"
    tag = "all" if block == "all" else f"block{int(block):02d}" if block.isdigit() else block
    out_path = default_path(out_path, f"blocks/{tag}.pt")
    cfg = TrainBlockConfig(pairs=pairs, out=out_path, trunk=trunk, weights=weights, block=block,
                           mask_point=mask_point, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, lam=lam, s=s, m=m,
                           seed=seed, gpu=gpu, resume=resume, precision=precision, faces=faces, grid=grid,
                           per_image=per_image)
    res = run_training(train_blocks, cfg, quiet, json_path, {"--pairs": pairs, "--faces": faces, "--weights": weights},
                       {"--out": out_path})
    if res is None:  # a torchrun rank other than 0
        return
    h = res["history"][-1] if res["history"] else {}
    out.print(kv_table("train-block", {
        "output": res["out"], "trunk / mask point": f"{res['trunk']} / {res['mask_point']} {tuple(res['feature_shape'])}",
        "blocks": "all" if len(res["blocks"]) > 1 else res["blocks"][0], "pairs / identities": f"{res['pairs']} / {res['classes']}",
        "processes": res["world_size"],
        "epochs / steps": f"{res['epochs']} / {res['steps']}",
        "final loss (CE, L1)": f"{h.get('loss', float('nan')):.4f} ({h.get('ce', float('nan')):.4f}, {h.get('l1', float('nan')):.5f})",
        "time (features, training)": f"{res['feature_seconds']} s, {res['train_seconds']} s",
        **resumed_row(res),
    }))
    warn(res["warnings"])


@app.command("build-dict", epilog="""Examples:

    pdsn make-pairs --block all && pdsn train-block && pdsn build-dict

    pdsn make-pairs --block all --out blocks.h5 && pdsn train-block --pairs blocks.h5 --out blocks.pt && pdsn build-dict --blocks blocks.pt --tau 0.3 --plot dict.png --out dict.h5
""")
def build_dict_cmd(
    blocks: Optional[list[Path]] = typer.Option(None, "--blocks", help=f"train-block outputs or folders of them (default: {shown_default('blocks')}/; with several files training one block, the last by name wins)."),
    tau: float = typer.Option(0.25, "--tau", help="Fraction of each block's mask set to 0 (discarded)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help=f"Dictionary HDF5 (default: {shown_default('dict.h5')})."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG showing each block's discarded elements."),
    json_path: Optional[Path] = JSON_OUT,
):
    """Average each block's masks over its training pairs and binarise them: the FDM dictionary."""
    out_path = default_path(out_path, "dict.h5")
    blocks = blocks or [work_dir() / "blocks"]
    with handled():
        # a folder's block files count as inputs too: --out blocks/all.pt would replace one
        block_inputs = [*blocks, *(f for b in blocks if b.is_dir() for f in b.glob("*.pt"))]
        check_distinct_paths({"--blocks": block_inputs}, {"--out": out_path, "--plot": plot, "--json": json_path})
        if plot is not None:
            check_writable(plot)
        res = build(blocks, out_path, tau=tau)
        if plot is not None:
            plot_dict(load(res["out"]), plot)
        res["plot"] = str(plot) if plot else None
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
    warn(res["warnings"])


@app.command("finetune", epilog="""Examples:

    pdsn make-pairs --block all --out blocks.h5 && pdsn train-block --pairs blocks.h5 && pdsn build-dict --out dict.h5 && pdsn finetune --dict dict.h5 --pairs blocks.h5 --max-pairs 6000 --epochs 3 --out dict-ft.h5

    pdsn make-pairs --block all --out blocks.h5 && pdsn train-block --pairs blocks.h5 && pdsn build-dict --out dict.h5 && pdsn align --out faces.h5 && pdsn finetune --dict dict.h5 --faces faces.h5 --epochs 2 --out dict-ft.h5

    pdsn finetune --dict lfw-dict.h5 --pairs lfw-random.h5 --pairs lfw-square.h5 --identity-weight 0.1 --out lfw-dict-ft.h5   # needs LFW pairs and dictionary

    pdsn finetune --dict lfw-dict.h5 --faces celeba.h5 --faces lfw-train.h5 --from-stage level3 --gpu 0 --out lfw-dict-ft.h5   # needs aligned face sets and a GPU
""")
def finetune_cmd(
    dict_path: Optional[Path] = typer.Option(None, "--dict", help=f"FDM dictionary to fine-tune for (default: {shown_default('dict.h5')})."),
    pairs: Optional[list[Path]] = typer.Option(None, "--pairs", help="Tune the head after the mask point on these make-pairs files of training identities (repeatable): their occlusions choose each pair's FDM."),
    faces: Optional[list[Path]] = typer.Option(None, "--faces", help="Tune the trunk itself (from --from-stage on) on these face sets, chips files of pdsn align (repeatable; identities kept apart per set), occluders drawn fresh every step."),
    from_stage: str = typer.Option("stem", "--from-stage", help="With --faces: the first stage tuned (stem: the whole trunk)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help=f"Output dictionary with the fine-tuned head/trunk (default: {shown_default('dict-ft.h5')})."),
    weights: Optional[str] = WEIGHTS,
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Default: 8 with --pairs, 4 with --faces."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate (default: 1e-4 with --pairs, 3e-5 with --faces)."),
    batch_size: int = typer.Option(64, "--batch-size"),
    block_threshold: float = typer.Option(0.25, "--block-threshold", help="Block occupancy from which a block counts as occluded."),
    max_pairs: Optional[int] = typer.Option(None, "--max-pairs", help="--pairs: a seeded sample of at most N pairs per file."),
    max_faces: Optional[int] = typer.Option(None, "--max-faces", help="--faces: a seeded sample of at most N faces per set."),
    identity_weight: float = typer.Option(0.0, "--identity-weight", help="Weight of a CosFace term classifying the masked embeddings among the training identities (0: distillation only)."),
    relation_weight: float = typer.Option(0.0, "--relation-weight", help="--faces: weight of a term keeping the cosines between different faces as the frozen trunk has them (impostors apart)."),
    degrade: float = typer.Option(0.3, "--degrade", help="--faces: probability of a greyscale and of a low-resolution face."),
    clean_share: float = typer.Option(0.15, "--clean-share", help="--faces: share of faces left unoccluded."),
    occluder: Optional[list[str]] = typer.Option(None, "--occluder", help="--faces: occluder kinds drawn (repeatable; default: every kind)."),
    seed: int = typer.Option(0, "--seed"),
    gpu: Optional[int] = GPU,
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint (<out>.ckpt)."),
    json_path: Optional[Path] = JSON_OUT,
    quiet: bool = QUIET,
):
    """Fine-tune on FDM-masked features: the head after the mask point (--pairs, the paper's last stage) or the
    trunk itself on occluders drawn fresh (--faces); writes a dictionary carrying the tuned parameters."""
    with handled():
        if bool(pairs) == bool(faces):
            raise BadInputError("give --pairs (tune the head) or --faces (tune the trunk), one of the two")
        if faces and max_pairs is not None or pairs and max_faces is not None:
            raise BadInputError("--max-pairs goes with --pairs, --max-faces with --faces")
        if pairs and relation_weight:
            raise BadInputError("--relation-weight goes with --faces")
    dict_path, out_file = dict_path or work_dir() / "dict.h5", default_path(out_path, "dict-ft.h5")
    fmt = lambda d: " / ".join(f"{x:.4f}" for x in d) if d else "n/a"  # noqa: E731
    if faces:
        cfg = FinetuneTrunkConfig(
            dict_path=dict_path, faces=list(faces), out=out_file, weights=weights, from_stage=from_stage,
            epochs=4 if epochs is None else epochs, lr=3e-5 if lr is None else lr, batch_size=batch_size,
            block_threshold=block_threshold, identity_weight=identity_weight, relation_weight=relation_weight,
            clean_share=clean_share, degrade=degrade, occluders=list(occluder or DRAWN), max_faces=max_faces,
            seed=seed, gpu=gpu, resume=resume)
        res = run_training(finetune_trunk, cfg, quiet, json_path,
                           {"--dict": dict_path, "--faces": cfg.faces, "--weights": weights}, {"--out": out_file})
        if res is None:
            return
        rows = {"faces (held out)": f"{res['faces']} of {res['identities']} people in {', '.join(res['face_sets'])} "
                                    f"({res['held_out_faces']} of {res['held_out_identities']})",
                "tuned": f"from {res['from_stage']}: {res['tuned_parameter_count']:,} parameters in "
                         f"{res['tuned_parameters']} tensors"}
    else:
        cfg = FinetuneConfig(dict_path=dict_path, pairs=list(pairs), out=out_file, weights=weights,
                             epochs=8 if epochs is None else epochs, lr=1e-4 if lr is None else lr,
                             batch_size=batch_size, block_threshold=block_threshold, max_pairs=max_pairs, seed=seed,
                             gpu=gpu, identity_weight=identity_weight, resume=resume)
        res = run_training(finetune, cfg, quiet, json_path,
                           {"--dict": dict_path, "--pairs": cfg.pairs, "--weights": weights}, {"--out": out_file})
        if res is None:  # a torchrun rank other than 0
            return
        rows = {"pairs (held out)": f"{res['pairs']} ({res['held_out_pairs']})",
                "head parameters": f"{res['head_parameter_count']:,} in {len(res['head_parameters'])} tensors"}
    out.print(kv_table("finetune", {
        "output": res["out"], "trunk / mask point": f"{res['trunk']} / {res['mask_point']}", **rows,
        "held-out 1−cos to clean: masked occluded / masked clean / unmasked, before": fmt(res["held_out_before"]),
        f"after (kept: epoch {res['kept_epoch']} of {res['epochs']})": fmt(res["history"][res["kept_epoch"] - 1]["held_out"]),
        "time": f"{res['seconds']} s", **resumed_row(res),
    }))


@app.command("train-trunk", epilog="""Examples:

    pdsn align --out chips112x96.h5 --template arc112x96 && pdsn train-trunk --data chips112x96.h5

    pdsn train-trunk --data casia112x96.h5 --trunk lresnet50e-ir --head cosface --epochs 30 --batch-size 512 --gpu 0   # needs CASIA-WebFace and a GPU

    torchrun --nproc_per_node=4 -m pdsn_cli train-trunk --data casia112x96.h5 --trunk lresnet50e-ir --gpu 0   # needs torchrun, CASIA-WebFace and 4 GPUs
""")
def train_trunk_cmd(
    data: Path = typer.Option(..., "--data", help="Chips HDF5 (pdsn align) or pairs HDF5 (its clean images)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help=f"Output folder: checkpoint.pt (resume) and trunk.pt (default: {shown_default('trunk-TRUNK')}/)."),
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
    with handled():
        check_precision(precision)
    out_dir = out_dir or work_dir() / f"trunk-{trunk}"
    cfg = TrainTrunkConfig(data=str(data), out=str(out_dir), trunk=trunk, head=head, s=s, m=m, epochs=epochs,
                           batch_size=batch_size, lr=lr, seed=seed, checkpoint_every=checkpoint_every, resume=resume,
                           gpu=gpu, amp=precision == "bf16", init_weights=init_weights)
    res = run_training(train_trunk, cfg, quiet, json_path, {"--data": data, "--init-weights": init_weights},
                       {"--out": [out_dir, out_dir / CHECKPOINT_NAME, out_dir / TRUNK_NAME]})
    if res is None:  # a torchrun rank other than 0
        return
    acc = res.get("heldout_accuracy")
    out.print(kv_table("train-trunk", {
        "trunk weights": res["trunk_weights"], "trunk / head": f"{res['trunk']} / {res['head']}",
        "images / identities": f"{res['train_images']} / {res['train_identities']}",
        "steps": res["steps"], "final loss": f"{res['final_loss']:.4f}" if res["final_loss"] is not None else "n/a",
        "held-out verification": "n/a" if acc is None else f"{100 * acc:.2f}% on {res['heldout_pairs']} pairs of {res['heldout_identities']} unseen identities",
        "speed": f"{res['img_per_s']:.0f} img/s on {res['device']} × {res['world_size']}" if res["img_per_s"] else "n/a",
        **resumed_row(res),
    }))


@app.command("train-detector", epilog="""Examples:

    pdsn make-pairs --occluder random --per-image 2 --out random.h5 && pdsn train-detector --pairs random.h5

    pdsn train-detector --pairs lfw-random.h5 --pairs lfw-blocks.h5 --epochs 12 --out detector.pt   # needs LFW pairs

    pdsn align --out faces.h5 && pdsn train-detector --faces faces.h5 --per-face 2 --epochs 2

    pdsn train-detector --pairs lfw-blocks.h5 --faces celeba.h5 --faces lfw-train.h5 --out detector.pt   # needs LFW pairs and aligned face sets

Train on pairs made from the same kind of faces the detector will screen: a detector trained on synthetic
faces alone flags many clean blocks of real photos; real (or mixed real + synthetic) pairs work on both.
""")
def train_detector_cmd(
    pairs: Optional[list[Path]] = typer.Option(None, "--pairs", help="Pairs files from make-pairs (repeatable)."),
    faces: Optional[list[Path]] = typer.Option(None, "--faces", help="Face sets, chips files of pdsn align (repeatable): occluders of every kind drawn here on each face, no pairs file needed."),
    per_face: int = typer.Option(4, "--per-face", help="--faces: occluded copies drawn per face (each face also serves once clean)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help=f"Detector checkpoint (default: {shown_default('detector.pt')})."),
    epochs: int = typer.Option(12, "--epochs"),
    batch_size: int = typer.Option(64, "--batch-size"),
    lr: float = typer.Option(3e-3, "--lr"),
    threshold: float = typer.Option(0.5, "--threshold", help="Occupancy above which a block counts as occluded (for the report)."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Held-out share of source images for precision/recall."),
    degrade: float = typer.Option(0.3, "--degrade", help="Probability of a greyscale and of a low-resolution training chip (photos unlike the training ones); 0: off."),
    seed: int = typer.Option(0, "--seed"),
    gpu: Optional[int] = GPU,
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint (<out>.ckpt)."),
    json_path: Optional[Path] = JSON_OUT,
    quiet: bool = QUIET,
):
    """Train the occlusion detector: K×K block occupancy of one aligned chip, for PDSN at test time."""
    out_path = default_path(out_path, "detector.pt")
    cfg = TrainDetectorConfig(pairs=list(pairs or []), faces=list(faces or []), per_face=per_face, out=out_path,
                              epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, val_fraction=val_fraction,
                              threshold=threshold, gpu=gpu, resume=resume, degrade=degrade)
    res = run_training(train_detector, cfg, quiet, json_path, {"--pairs": cfg.pairs, "--faces": cfg.faces},
                       {"--out": out_path})
    if res is None:  # a torchrun rank other than 0
        return

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    out.print(kv_table("train-detector", {
        "output": str(out_path), "held-out precision / recall / F1":
        f"{pct(res['precision'])} / {pct(res['recall'])} / {pct(res['f1'])}",
        "clean blocks flagged": pct(res["clean_fpr"]), "time": f"{res['seconds']:.1f} s", **resumed_row(res),
    }))
