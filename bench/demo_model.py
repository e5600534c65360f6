"""How good is the demo model? Class accuracy of its samples under the mnist5k classifier, and a grid.

    python3 bench/demo_model.py --per-class 100 --grid docs/demo-grid.png

Samples `per-class` images of every digit once (sample i has label i % 10 and noise
from (seed, i)), denoises them with each requested multiplier, classifies them with
`tarflow.classifier`, and prints the accuracy per class and overall. The grid shows the
first 10 samples of each class, one class per column."""
from __future__ import annotations

import time

import click
import torch

from tarflow import Guidance, SamplingSpec, load_checkpoint, sample_ids
from tarflow.classifier import load_classifier
from tarflow.denoise import denoise
from workflows.report.grid import save_grid


@click.command()
@click.option("--checkpoint", default="demo", show_default=True, help="A checkpoint path, or the shipped demo.")
@click.option("--per-class", type=int, default=100, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--denoise", "denoise_lrs", type=float, multiple=True, default=[0.0, 1.0], show_default=True,
              help="Denoising multipliers to compare (0 = off); the grid uses the last.")
@click.option("--guidance", type=float, default=0.0, show_default=True)
@click.option("--batch-size", type=int, default=100, show_default=True)
@click.option("--grid", default=None, help="Write a 10x10 grid (10 samples per class) here.")
def main(checkpoint, per_class, seed, denoise_lrs, guidance, batch_size, grid):
    classifier = load_classifier("mnist5k")
    model, provenance = load_checkpoint(checkpoint, with_metadata=True)
    n = 10 * per_class
    spec = SamplingSpec(seed, tuple(range(10)), Guidance(guidance), batch_size=batch_size)
    t0 = time.perf_counter()
    sampled = torch.cat([sample_ids(model, spec, range(s, min(s + batch_size, n))).images
                         for s in range(0, n, batch_size)])
    click.echo(f"sampled {n} images in {time.perf_counter() - t0:.0f}s")
    labels = spec.labels_for(range(n), 10)
    for lr in denoise_lrs:
        images = denoise(model, sampled, labels, provenance["noise_std"], lr) if lr > 0 else sampled.clamp(-1, 1)
        with torch.no_grad():
            pred = torch.cat([classifier(x).argmax(1) for x in images.split(500)])
        correct = pred == labels
        per_digit = [correct[labels == d].float().mean().item() for d in range(10)]
        click.echo(f"denoise={lr:g} guidance={guidance:g}: accuracy {correct.float().mean().item():.3f} on {n} "
                   f"samples ({per_class}/class); per class "
                   + " ".join(f"{d}:{a:.2f}" for d, a in enumerate(per_digit)))
    if grid:
        # first 10 samples of each class, one class per column
        click.echo(f"wrote {save_grid(images[:100], grid, nrow=10)}")


if __name__ == "__main__":
    main()
