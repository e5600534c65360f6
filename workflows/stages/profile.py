"""The profile stage: `tarflow.profile` on the stage's Ray resources, one task per block.

One task computes the calibration rows and every block's true pairs (sequential sampling of the
calibration noise when there is no data: heavy on a real model, so never in the driver); one
task per block then profiles it on the pairs, which travel as separate Ray objects the driver
never fetches. Each task samples on the device its resources give (`runtime.worker_device`)."""
from __future__ import annotations

import time

import torch

from tarflow import Model, ModelRef, SamplingSpec
from tarflow.profile import DEFAULT_CAPS, DEFAULT_TOLS, DEFAULT_WINDOWS, Profile, assemble, calibrate, \
    check_segment_lens, device_name, profile_block

from .. import runtime
from ..config import Resources


def _calibrate(model_ref: ModelRef, spec: SamplingSpec, data, num_images: int):
    model = model_ref.load()
    source, labels, pairs = calibrate(model, spec, data, num_images, runtime.worker_device())
    return (source, labels, runtime.placement(), *pairs)


def _profile_block(model_ref: ModelRef, index: int, pair, labels, spec: SamplingSpec, segment_lens, windows, tols,
                   caps, repeats: int):
    device = runtime.worker_device()
    block = model_ref.load().blocks[index].to(device)
    z, x = pair
    profile = profile_block(block, index, z.to(device), x.to(device), None if labels is None else labels.to(device),
                            spec, segment_lens, windows, tols, caps, repeats)
    return profile, runtime.placement(device), device_name(device, torch.get_num_threads())


def profile(model: Model, model_ref: ModelRef, spec: SamplingSpec, data: str | None, num_images: int,
            resources: Resources, segment_lens=None, windows=DEFAULT_WINDOWS, tols=DEFAULT_TOLS, caps=DEFAULT_CAPS,
            repeats: int = 3) -> tuple[Profile, list[dict]]:
    """(profile, each task's placement) of the model `model_ref` loads in the tasks (`model`, loaded by
    the caller, gives its hash and shape only). `spec` is concrete for the model (`for_model`)."""
    runtime.connect()
    start = time.perf_counter()
    n = len(model.blocks)
    segment_lens = check_segment_lens(model.num_tokens, segment_lens)
    source, labels, placement, *pairs = runtime.remote(_calibrate, resources, num_returns=3 + n).remote(
        model_ref, spec, data, num_images)
    block_task = runtime.remote(_profile_block, resources)
    results = runtime.get([block_task.remote(model_ref, i, pairs[i], labels, spec, segment_lens, list(windows),
                                             list(tols), list(caps), repeats) for i in range(n)])
    threads = runtime.worker_threads(resources)
    prof = assemble(model, spec, runtime.get(source), [r[0] for r in results], results[0][2], threads, tols, caps,
                    time.perf_counter() - start, model_ref)
    return prof, [runtime.get(placement), *(r[1] for r in results)]
