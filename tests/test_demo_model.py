"""What the README says of the shipped demo model: guided samples are recognisable digits of the asked
class (0.76 under the shipped classifier over 1,000 samples), unguided ones much less so (0.48)."""
import pytest
import torch

from tarflow import Guidance, SamplingSpec, load_checkpoint, sample_ids
from tarflow.classifier import load_classifier
from tarflow.denoise import denoise

PER_CLASS = 20  # the first 200 of bench/demo_model.py's 1,000 ids: the README's figures within +-0.05


def _accuracy(guidance: float, denoise_step: float) -> float:
    model, meta = load_checkpoint("demo", with_metadata=True)
    spec = SamplingSpec(0, tuple(range(10)), Guidance(guidance), batch_size=100)
    n = 10 * PER_CLASS
    images = torch.cat([sample_ids(model, spec, range(s, s + 100)).images for s in range(0, n, 100)])
    labels = spec.labels_for(range(n), 10)
    if denoise_step:
        images = denoise(model, images, labels, meta["noise_std"], denoise_step)
    with torch.no_grad():
        return (load_classifier("mnist5k")(images.clamp(-1, 1)).argmax(1) == labels).float().mean().item()


@pytest.mark.slow
def test_demo_accuracy_with_and_without_guidance_is_what_the_readme_says():
    guided, unguided = _accuracy(3.0, 1.0), _accuracy(0.0, 0.0)
    assert abs(guided - 0.76) <= 0.05 and abs(unguided - 0.48) <= 0.05, (guided, unguided)
    assert guided - unguided >= 0.2  # guidance is what makes them recognisable
