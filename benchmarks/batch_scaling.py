"""How a library model's training step scales with the batch: the floor for row-mode savings.

Usage: python benchmarks/batch_scaling.py MODEL [--image N] [--batch B] [--fraction F]
[--threads T] [--reps R], e.g. ``timm:convnext_tiny --image 64 --batch 16 --fraction 0.75``.

Times a step (forward + backward, no drop path) of the whole model on ``B`` images and on
``round(F * B)`` images, interleaved, and prints the median of the paired ratios. Row-mode drop
path keeps a fraction ``F`` of the samples in each branch, so this ratio is what a step would cost
if every part of the model (stem, downsampling and head included) ran on the kept samples only:
a floor that ``accelerate`` cannot beat on this machine. Needs the library (the ``real`` extra).
"""

import argparse
import statistics
import time

import torch

from droppath.apps.bench import BenchConfig, build_library_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--fraction", type=float, default=0.75)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = BenchConfig(model=args.model, image=args.image, batch=args.batch, p=0.0)
    model, x = build_library_model(cfg)
    model.train()
    small = x[: round(args.fraction * args.batch)].clone()
    times: dict[int, list[float]] = {len(x): [], len(small): []}
    for rep in range(args.reps + 3):
        for batch in (x, small) if rep % 2 else (small, x):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            model(batch).float().square().mean().backward()
            if rep >= 3:
                times[len(batch)].append(time.perf_counter() - t0)
    ratio = statistics.median(a / b for a, b in zip(times[len(small)], times[len(x)], strict=True))
    print(
        f"{args.model} image {args.image}, {args.threads} thread(s): step on {len(small)} images "
        f"/ step on {len(x)} images = {ratio:.3f} (median of {args.reps} paired ratios)"
    )


if __name__ == "__main__":
    main()
