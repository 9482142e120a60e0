"""``pdsn pipeline``: the whole method in one command — pairs → all blocks → dictionary → fine-tuned head →
benchmark.

Built-in default (no ``--data-dir``): synthetic identities for training (seed 0) and a disjoint synthetic
verification set (seed 1000), the pretrained ``dlib-resnet`` trunk. With ``--data-dir`` pointing at LFW: PDSN is
trained on the identities that appear in no View-2 pair and evaluated on the 6,000 pairs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from pdsn_cli.eval.benchmark import BenchmarkConfig, run_benchmark
from pdsn_cli.data.chip_cache import DataSpec, export_chips, set_names
from pdsn_cli.data.lfw import write_training_identities
from pdsn_cli.errors import BadInputError, check_training_options
from pdsn_cli.pdsn.fdm import build
from pdsn_cli.train.finetune import FinetuneConfig, finetune
from pdsn_cli.train.finetune_trunk import FinetuneTrunkConfig, finetune_trunk
from pdsn_cli.data.make_pairs import MakePairsConfig, make_pairs
from pdsn_cli.device import resolve_device
from pdsn_cli.occlusion.driver import parse_occlusions
from pdsn_cli.eval.scores import write_scores
from pdsn_cli.pdsn.models import calibrate_model, export_model, model_figures, training_summary
from pdsn_cli.train.detector import TrainDetectorConfig, train_detector
from pdsn_cli.trunks import PACKAGED_WEIGHTS, build_trunk
from pdsn_cli.train.blocks import TrainBlockConfig, train_blocks


@dataclass
class PipelineConfig:
    work: Path
    data_dir: Path | None = None
    trunk: str = "dlib-resnet"
    weights: str | None = None
    mask_point: str | None = None
    per_image: int = 1
    train_limit: int | None = None
    synthetic_identities: int = 30
    synthetic_images: int = 4
    epochs: int = 10
    batch_size: int = 32  # train-block: pairs per block and step
    lr: float = 1e-3
    optimizer: str = "adam"
    tau: float = 0.25
    #: what ``finetune`` tunes on FDM-masked features: ``head`` (after the mask point, on the block and
    #: random-occluder pairs) or ``trunk`` (the whole trunk, on occluders drawn fresh over the training faces and
    #: every ``train_dirs`` set)
    tune: str = "head"
    #: epochs of that stage (None: 3 for the head, 4 for the trunk); 0 skips it
    finetune_epochs: int | None = None
    #: more training face sets (identity folders) for every stage, next to the training identities
    train_dirs: list[Path] = field(default_factory=list)
    occlusions: list[str] = field(default_factory=lambda: ["none", "sunglasses", "scarf", "block:12"])
    limit_pairs: int | None = None
    seed: int = 0
    workers: int = 1
    gpu: int | None = None
    #: also train the occlusion detector (on the block and random-occluder pairs), benchmark with it, calibrate
    #: the verification threshold on that benchmark's scores and pack a model folder here (pdsn export-model)
    export_model: Path | None = None
    #: the command line that ran this pipeline, recorded in the exported model
    command: str | None = None


def run_pipeline(cfg: PipelineConfig, progress=None, log=None) -> dict:
    t0 = time.perf_counter()
    # every stage's arguments are checked now: a typo found by the last stage would cost the whole run
    resolve_device(cfg.gpu)
    if not 0.0 < cfg.tau < 1.0:
        raise BadInputError(f"--tau must be in (0, 1), got {cfg.tau}")
    check_training_options(epochs=cfg.epochs, per_image=cfg.per_image, batch_size=cfg.batch_size)
    if cfg.tune not in ("head", "trunk"):
        raise BadInputError(f"--tune must be head or trunk, got {cfg.tune!r}")
    if cfg.finetune_epochs is None:  # on a copy: the caller's config can run again with the other --tune
        cfg = replace(cfg, finetune_epochs=3 if cfg.tune == "head" else 4)
    if cfg.finetune_epochs < 0:
        raise BadInputError(f"--finetune-epochs must be ≥ 0, got {cfg.finetune_epochs}")
    if cfg.export_model is not None and not cfg.finetune_epochs:
        raise BadInputError("--export-model ships the fine-tuned head/trunk: --finetune-epochs must be ≥ 1")
    for d in cfg.train_dirs:
        if not Path(d).is_dir():
            raise BadInputError(f"--train-dir {d} is not a folder")
    if cfg.export_model is not None and cfg.trunk not in PACKAGED_WEIGHTS and cfg.weights is None:
        raise BadInputError(f"--export-model: trunk {cfg.trunk} has no weights in the install; give --weights "
                            "(they are copied into the model)")
    parse_occlusions(cfg.occlusions, 5)
    trunk = build_trunk(cfg.trunk, cfg.weights)
    trunk.check_point(cfg.mask_point)
    try:
        cfg.work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"cannot create --work {cfg.work}: {e.strerror}") from None
    say = log or (lambda msg: None)
    identities = None
    if cfg.data_dir is not None:
        pairs_txt = Path(cfg.data_dir) / "pairs.txt"
        if not pairs_txt.is_file():
            raise BadInputError(f"--data-dir {cfg.data_dir} has no pairs.txt: the pipeline evaluates on LFW View 2")
        identities = cfg.work / "train-identities.txt"
        write_training_identities(cfg.data_dir, identities)
        train_ids = set(identities.read_text().split())
    else:
        train_ids = None
    stage = (lambda name: (lambda d, n: progress(name, d, n))) if progress else (lambda name: None)
    data = DataSpec(cfg.data_dir, cfg.synthetic_identities, cfg.synthetic_images, synthetic_seed=0)
    more = [DataSpec(Path(d)) for d in cfg.train_dirs]
    if more:
        # several face sets: identities are SET/IDENTITY, so the training list names the first set's people so
        if identities is not None:
            tag = set_names([data, *more])[0]
            names = identities.read_text().split()
            identities.write_text("".join(f"{tag}/{n}\n" for n in names))
        data = [data, *more]
    n = (5 if cfg.finetune_epochs else 4) + (2 if cfg.export_model is not None else 0)
    say(f"1/{n} make-pairs --block all on {' + '.join(d.describe() for d in (data if more else [data]))}")
    pairs = make_pairs(MakePairsConfig(
        out=cfg.work / "pairs-blocks.h5", data=data, block="all", template=trunk.template,
        per_image=cfg.per_image, identities=identities, limit=cfg.train_limit, seed=cfg.seed, workers=cfg.workers,
    ), progress=stage("pairs"), align_progress=stage("align"))
    say(f"2/{n} train-block --block all ({pairs['pairs_in_file']} pairs, {cfg.epochs} epochs)")
    (cfg.work / "blocks").mkdir(exist_ok=True)
    blocks = train_blocks(TrainBlockConfig(
        pairs=cfg.work / "pairs-blocks.h5", out=cfg.work / "blocks" / "all.pt", trunk=cfg.trunk,
        weights=cfg.weights, block="all", mask_point=cfg.mask_point, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
        optimizer=cfg.optimizer, seed=cfg.seed, gpu=cfg.gpu,
    ), progress=progress)
    say(f"3/{n} build-dict τ={cfg.tau}")
    dictionary = build([cfg.work / "blocks" / "all.pt"], cfg.work / "dict.h5", tau=cfg.tau)
    dict_path, tuned = cfg.work / "dict.h5", None
    if cfg.finetune_epochs and cfg.tune == "head" or cfg.export_model is not None:
        # random objects (sunglasses, scarves, hands, ...): what the head is tuned on and the detector learns
        # (the trunk's fine-tune draws its own)
        make_pairs(MakePairsConfig(
            out=cfg.work / "pairs-random.h5", data=data, occluder="random", template=trunk.template,
            per_image=2 * cfg.per_image, identities=identities, limit=cfg.train_limit, seed=cfg.seed + 1,
            workers=cfg.workers,
        ), progress=stage("pairs"), align_progress=stage("align"))
    if cfg.finetune_epochs and cfg.tune == "head":
        say(f"4/{n} finetune the head ({cfg.finetune_epochs} epochs) on block and random-occluder pairs")
        tuned = finetune(FinetuneConfig(
            dict_path=dict_path, pairs=[cfg.work / "pairs-blocks.h5", cfg.work / "pairs-random.h5"],
            out=cfg.work / "dict-ft.h5", weights=cfg.weights, epochs=cfg.finetune_epochs, seed=cfg.seed, gpu=cfg.gpu,
        ), progress=progress)
        dict_path = cfg.work / "dict-ft.h5"
    elif cfg.finetune_epochs:
        specs = data if more else [data]
        say(f"4/{n} finetune the trunk ({cfg.finetune_epochs} epochs) on occluders drawn over {len(specs)} face set(s)")
        faces = []
        for k, (tag, spec) in enumerate(zip(set_names(specs), specs)):
            # the first set is the training identities; from the chip cache: faces aligned for the pairs are not
            # aligned again
            faces.append(cfg.work / f"faces-{tag}.h5")
            export_chips(spec, trunk.template, faces[-1], identities=train_ids if k == 0 else None,
                         limit=cfg.train_limit, seed=cfg.seed, workers=cfg.workers, progress=stage("align"))
        tuned = finetune_trunk(FinetuneTrunkConfig(
            dict_path=dict_path, faces=faces, out=cfg.work / "dict-ft.h5", weights=cfg.weights,
            epochs=cfg.finetune_epochs, seed=cfg.seed, gpu=cfg.gpu), progress=progress)
        dict_path = cfg.work / "dict-ft.h5"
    detector = model = None
    if cfg.export_model is not None:
        say(f"5/{n} train-detector on the block and random-occluder pairs")
        detector = train_detector(TrainDetectorConfig(
            pairs=[cfg.work / "pairs-blocks.h5", cfg.work / "pairs-random.h5"], out=cfg.work / "detector.pt",
            seed=cfg.seed, gpu=cfg.gpu), progress=progress)
        # the files are packed first, so that the benchmark measures (and calibrates) exactly what ships
        packed_weights = cfg.weights if cfg.trunk not in PACKAGED_WEIGHTS else None
        export_model(dict_path, cfg.work / "detector.pt", cfg.export_model, name=cfg.export_model.name,
                     weights=packed_weights, training=training_summary({"pairs": pairs, "train_block": blocks,
                                                                        "finetune": tuned}),
                     commands=[cfg.command] if cfg.command else [])
        model = str(cfg.export_model)
    say(f"{n - 1 if model else n}/{n} benchmark: baseline vs PDSN ({'the exported model, detector' if model else 'oracle'} occlusion)")
    bench = run_benchmark(BenchmarkConfig(
        dataset="lfw" if cfg.data_dir is not None else "synthetic", data_dir=cfg.data_dir, trunk=cfg.trunk,
        weights=None if model else cfg.weights, dict_path=None if model else dict_path, model=model,
        occlusions=cfg.occlusions, keep_scores=model is not None,
        limit_pairs=cfg.limit_pairs, seed=cfg.seed, gpu=cfg.gpu, workers=cfg.workers,
    ), progress=progress)
    result = {"work": str(cfg.work), "pairs": pairs, "train_block": blocks, "dictionary": dictionary,
              "finetune": tuned, "detector": detector, "benchmark": bench}
    if model is not None:
        say(f"{n}/{n} calibrate the model's threshold on the benchmark's scores → {cfg.export_model}")
        result["model"] = calibrate_model(cfg.export_model, write_scores(cfg.work / "scores.csv", bench.scores),
                                          model_figures(bench), dataset=bench["dataset"])
    return result | {"seconds": round(time.perf_counter() - t0, 1)}
