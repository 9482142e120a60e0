"""GPU throughput of the toolkit's own paths next to plain PyTorch, in one run, printed (and saved) as JSON.

    python benchmarks/gpu_throughput.py --out gpu.json [--sections embed,e2e,train_trunk,train_block]

Inputs are generated on the device (random smooth chips; random-init trunks except dlib-resnet, whose weights
ship with face-recognition-models): speed does not depend on what the faces look like.

- embed (data on GPU, batch 512): per trunk, plain eager fp32 (cuDNN autotuning off, no TF32), plain eager bf16
  channels_last, plain torch.compile bf16 (lresnet50e-ir), against the toolkit's FastForward eager and compiled;
  img/s, peak GPU memory, model GFLOPs per image and the achieved fraction of the card's dense bf16 peak.
- e2e: `pdsn embed` (the engine function) on a chips HDF5 file written here, LResNet50E-IR.
- train_trunk: a CosFace step (10,572 classes, batch 512) in plain eager bf16 against the toolkit's step
  settings, both with data on the GPU, and `train_trunk` itself end to end on the e2e chips file.
- train_block: `train-block --block all` on 25 × 10,000 pairs for 10 epochs, feature caching included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

#: dense bf16 tensor-core peak, TFLOP/s (NVIDIA datasheets, SXM parts)
BF16_PEAK = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

RESULTS: dict = {}


def save(out: Path) -> None:
    out.write_text(json.dumps(RESULTS, indent=2))


def chips(n: int, size, seed: int = 0, device=None) -> torch.Tensor:
    """n smooth random uint8 chips N×H×W×3 (bilinear upsampling of 8×8 noise), generated on ``device``."""
    g = torch.Generator(device=device or "cpu").manual_seed(seed)
    small = torch.randint(0, 256, (n, 3, 8, 8), generator=g, device=device, dtype=torch.uint8).float()
    big = F.interpolate(small, size=size, mode="bilinear", align_corners=False)
    return big.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def timed(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def flops_per_image(trunk, size) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, *size, device=next(trunk.parameters()).device)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        trunk(x)
    return float(fc.get_total_flops())


def peak_tflops() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def measure(name, fn, batch, iters, flops, extra=None):
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        fn()  # first call: compile / autotune
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        dt = timed(fn, iters)
    except Exception as e:  # one failed variant must not cost the others
        return {"variant": name, "error": f"{type(e).__name__}: {e}"[:300]}
    r = {"variant": name, "img_per_s": round(batch / dt), "ms_per_batch": round(dt * 1e3, 2),
         "first_call_s": round(first, 1), "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)}
    pk = peak_tflops()
    if pk:
        r["fraction_of_bf16_peak"] = round(flops * batch / dt / 1e12 / pk, 3)
    return {**r, **(extra or {})}


def bench_embed(names, batch: int, iters: int) -> None:
    from pdsn_cli.accel import FastForward
    from pdsn_cli.trunks import build_trunk

    dev = torch.device("cuda")
    for name in names:
        rows = []
        torch.manual_seed(0)
        trunk = build_trunk(name).to(dev)
        size = trunk.input_size
        flops = flops_per_image(trunk, size)
        x = chips(batch, size, device=dev)
        RESULTS.setdefault("embed", {})[name] = {"input": list(size), "batch": batch, "gflops_per_image": round(flops / 1e9, 2),
                                                 "variants": rows}
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

        @torch.no_grad()
        def plain_fp32():
            return trunk(x.permute(0, 3, 1, 2).float().contiguous())
        rows.append(measure("plain eager fp32", plain_fp32, batch, iters, flops))

        cl = build_trunk(name).to(dev).to(memory_format=torch.channels_last)

        @torch.no_grad()
        def plain_bf16():
            with torch.autocast("cuda", torch.bfloat16):
                return cl(x.permute(0, 3, 1, 2).float().contiguous(memory_format=torch.channels_last))
        rows.append(measure("plain eager bf16 channels_last", plain_bf16, batch, iters, flops))

        if name == "lresnet50e-ir":
            comp = torch.compile(cl)

            @torch.no_grad()
            def plain_compiled():
                with torch.autocast("cuda", torch.bfloat16):
                    return comp(x.permute(0, 3, 1, 2).float().contiguous(memory_format=torch.channels_last))
            rows.append(measure("plain torch.compile bf16 channels_last", plain_compiled, batch, iters, flops))
        torch._dynamo.reset()

        ours = build_trunk(name)
        ff = FastForward(ours, dev, "bf16", "off", batch_size=batch)
        rows.append(measure("pdsn FastForward eager (bf16, channels_last, cuDNN autotune)", lambda: ff(x), batch,
                            iters, flops))
        if name == "lresnet50e-ir":
            ffc = FastForward(ours, dev, "bf16", "on", batch_size=batch)
            rows.append(measure("pdsn FastForward compiled (+ frozen weights: conv-BN folded)", lambda: ffc(x),
                                batch, iters, flops))
            torch._dynamo.reset()
            ffg = FastForward(ours, dev, "bf16", "on", batch_size=batch, compile_mode="reduce-overhead")
            rows.append(measure("pdsn FastForward compiled + CUDA graphs", lambda: ffg(x), batch, iters, flops))
            torch._dynamo.reset()
        # bf16 vs fp32 agreement of the same weights on these inputs
        a = FastForward(ours, dev, "fp32", "off", batch_size=batch)(x)
        b = ff(x)
        RESULTS["embed"][name]["bf16_vs_fp32_cos_min"] = round(float(F.cosine_similarity(a, b).min()), 5)
        print(json.dumps(RESULTS["embed"][name]), flush=True)
        del trunk, cl, ours, ff, x
        torch.cuda.empty_cache()


def write_chips_file(path: Path, n: int, size, classes: int) -> None:
    import h5py

    from pdsn_cli.data.chips_h5 import ChipsWriter

    pool = chips(min(n, 8192), size, seed=1).numpy()
    with h5py.File(path, "w") as f:
        w = ChipsWriter(f, "arc112x96", size, "generated", True)
        for a in range(0, n, len(pool)):
            k = min(len(pool), n - a)
            w.add(list(pool[:k]), list(np.zeros((k, 5, 2), np.float32)), [f"id{(a + i) % classes}" for i in range(k)],
                  [f"g{a + i}" for i in range(k)], np.zeros(k, np.uint8))
        w.close()


def bench_e2e(tmp: Path, n: int, batch: int) -> None:
    from pdsn_cli.embed import EmbedConfig, embed

    path = tmp / "chips.h5"
    t = time.perf_counter()
    write_chips_file(path, n, (112, 96), 10572)
    made = time.perf_counter() - t
    rows = []
    for compile in ("off",):  # compiling costs more than it saves at this size (COMPILE_MIN_IMAGES)
        out = tmp / f"emb-{compile}.h5"
        t = time.perf_counter()
        try:
            res = embed(EmbedConfig(input=path, out=out, trunk="lresnet50e-ir", gpu=0, batch_size=batch,
                                    compile=compile))
        except Exception as e:
            rows.append({"compile": compile, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        dt = time.perf_counter() - t
        rows.append({"compile": compile, "images": res["images"], "seconds": round(dt, 2),
                     "img_per_s": round(res["images"] / dt)})
        out.unlink()
    RESULTS["embed_e2e_hdf5"] = {"trunk": "lresnet50e-ir", "batch": batch, "file_gb": round(path.stat().st_size / 1e9, 2),
                                 "file_written_s": round(made, 1), "runs": rows}
    print(json.dumps(RESULTS["embed_e2e_hdf5"]), flush=True)


def bench_train_trunk(tmp: Path, batch: int, iters: int, classes: int = 10572) -> None:
    from pdsn_cli.accel import prepare_module
    from pdsn_cli.train.heads import build_head
    from pdsn_cli.trunks import build_trunk
    from pdsn_cli.train.trunk import TrainTrunkConfig, _TrainNet, train_trunk

    dev = torch.device("cuda")
    x = chips(batch, (112, 96), device=dev)
    y = torch.randint(0, classes, (batch,), device=dev)
    rows = []

    def step_fn(net, opt, channels_last):
        def step():
            xi = x.permute(0, 3, 1, 2).float()
            xi = xi if channels_last else xi.contiguous()
            with torch.autocast("cuda", torch.bfloat16):
                logits = net(xi, y)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss
        return step

    torch.backends.cudnn.benchmark = False
    torch.manual_seed(0)
    net = _TrainNet(build_trunk("lresnet50e-ir").train(), build_head("cosface", 512, classes, 30.0, 0.35)).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    rows.append(measure("plain eager bf16 (autocast, NCHW, SGD)", step_fn(net, opt, False), batch, iters, 0))
    net = net.to(memory_format=torch.channels_last)
    rows.append(measure("plain eager bf16 channels_last (autocast, SGD)", step_fn(net, opt, True), batch, iters, 0))
    del net, opt
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    net = prepare_module(_TrainNet(build_trunk("lresnet50e-ir").train(), build_head("cosface", 512, classes, 30.0, 0.35)),
                         dev, "bf16")
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=True)
    rows.append(measure("pdsn train-trunk step (bf16, channels_last, cuDNN autotune, fused SGD)",
                        step_fn(net, opt, True), batch, iters, 0))
    del net, opt
    torch.cuda.empty_cache()
    RESULTS["train_trunk_step"] = {"trunk": "lresnet50e-ir", "classes": classes, "batch": batch, "variants": rows}
    print(json.dumps(RESULTS["train_trunk_step"]), flush=True)
    path = tmp / "chips.h5"
    if path.exists():
        t = time.perf_counter()
        try:
            res = train_trunk(TrainTrunkConfig(data=str(path), out=str(tmp / "trunk"), trunk="lresnet50e-ir", epochs=1,
                                               batch_size=batch, gpu=0, holdout=0.0, checkpoint_every=10**9))
            RESULTS["train_trunk_e2e"] = {"images": res["train_images"], "classes": res["train_identities"],
                                          "steps": res["steps"], "img_per_s": round(res["img_per_s"]),
                                          "wall_s": round(time.perf_counter() - t, 1)}
        except Exception as e:
            RESULTS["train_trunk_e2e"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps(RESULTS["train_trunk_e2e"]), flush=True)


def bench_train_block(tmp: Path, per_block: int, epochs: int, batch: int) -> None:
    import h5py

    from pdsn_cli.data import pairs_h5
    from pdsn_cli.train.blocks import TrainBlockConfig, train_blocks

    h, w = 112, 96
    path = tmp / "pairs.h5"
    t = time.perf_counter()
    clean = chips(per_block, (h, w), seed=2).numpy()
    with h5py.File(path, "w") as f:
        pairs_h5.create(f, grid=5, template="arc112x96", size=(h, w), occluder="block", seed=0, per_image=1,
                        synthetic=True, data_root="generated")
        for j in range(25):
            r, c = divmod(j, 5)
            ys, xs = slice(r * h // 5, (r + 1) * h // 5), slice(c * w // 5, (c + 1) * w // 5)
            occ = clean.copy()
            occ[:, ys, xs] = 0
            mask = np.zeros((per_block, h, w), bool)
            mask[:, ys, xs] = True
            blocks = np.zeros((per_block, 5, 5), np.float32)
            blocks[:, r, c] = 1
            pairs_h5.append(f, clean=clean, occluded=occ, mask=mask, blocks=blocks,
                            landmarks=np.zeros((per_block, 5, 2)), identities=[f"id{i % 500}" for i in range(per_block)],
                            sources=[f"g{i}" for i in range(per_block)], kinds=["block"] * per_block,
                            targets=np.full(per_block, j))
        f.attrs["complete"] = True
    made = time.perf_counter() - t
    t = time.perf_counter()
    res = train_blocks(TrainBlockConfig(pairs=path, out=tmp / "blocks.pt", trunk="lresnet50e-ir", block="all",
                                        epochs=epochs, batch_size=batch, gpu=0))
    RESULTS["train_block_all"] = {"trunk": "lresnet50e-ir", "pairs": res["pairs"], "epochs": epochs, "batch_per_block": batch,
                                  "pairs_file_gb": round(path.stat().st_size / 1e9, 1), "pairs_file_written_s": round(made, 1),
                                  "total_s": round(time.perf_counter() - t, 1), "feature_s": res["feature_seconds"],
                                  "train_s": res["train_seconds"], "final_loss": res["history"][-1]["loss"],
                                  "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1)}
    print(json.dumps(RESULTS["train_block_all"]), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("gpu_throughput.json"))
    ap.add_argument("--sections", default="embed,train_block,e2e,train_trunk")
    ap.add_argument("--trunks", default="lresnet50e-ir,iresnet50,dlib-resnet")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--e2e-images", type=int, default=100_000)
    ap.add_argument("--block-pairs", type=int, default=10_000)
    ap.add_argument("--block-epochs", type=int, default=10)
    ap.add_argument("--block-batch", type=int, default=128)
    a = ap.parse_args()
    RESULTS["device"] = torch.cuda.get_device_name()
    RESULTS["torch"] = torch.__version__
    RESULTS["bf16_peak_tflops"] = peak_tflops()
    secs = a.sections.split(",")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("PDSN_CACHE", str(tmp / "cache"))
        jobs = {"embed": lambda: bench_embed(a.trunks.split(","), a.batch, a.iters),
                "e2e": lambda: bench_e2e(tmp, a.e2e_images, a.batch),
                "train_trunk": lambda: bench_train_trunk(tmp, a.batch, max(5, a.iters // 2)),
                "train_block": lambda: bench_train_block(tmp, a.block_pairs, a.block_epochs, a.block_batch)}
        for s in secs:
            t = time.perf_counter()
            try:
                jobs[s]()
            except Exception:
                RESULTS.setdefault("errors", {})[s] = traceback.format_exc()[-1500:]
                print(RESULTS["errors"][s], file=sys.stderr, flush=True)
            RESULTS.setdefault("section_seconds", {})[s] = round(time.perf_counter() - t, 1)
            save(a.out)
    print(json.dumps(RESULTS, indent=2))


if __name__ == "__main__":
    main()
