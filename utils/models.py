"""Encoders, the DINO-style head with its L2-bottleneck grammar, and teacher/student construction.

Everything here follows docs/method.md. Initialisation is always driven by an explicit `torch.Generator`, so a
network is a pure function of (architecture config, seed) and a teacher can be rebuilt from its seed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from utils.choices import BOTTLENECK_PRESETS, DEFAULT_NORM, ENCODERS, NORMS, parse_bottleneck  # noqa: F401

VGG11_CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")  # torchvision config "A"
PAPER_URL = "https://arxiv.org/abs/2302.12091"


# ----------------------------------------------------------------------------------------------- encoders
def norm_factory(kind: str):
    """Module constructor `f(num_channels)` for `--norm` (docs/method.md, Networks: the Fig. 12 ablation)."""
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "group":
        return lambda c: nn.GroupNorm(max(c // 8, 1), c)  # groups of 8 channels
    if kind == "layer":
        return lambda c: nn.GroupNorm(1, c)
    if kind == "instance":
        return lambda c: nn.GroupNorm(c, c)
    if kind == "none":
        return lambda c: nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose from {', '.join(NORMS)}")


def scaled(channels: int, width: float) -> int:
    """A layer's channel count at `--width` (1 = the paper's network)."""
    return max(1, round(channels * width))


def resnet18_encoder(norm: str, image_size: int, width: float = 1.0) -> nn.Module:
    net = torchvision.models.resnet18(weights=None, norm_layer=norm_factory(norm))
    c = scaled(64, width)
    if width != 1.0:  # same modules and names, every stage's channels scaled: torchvision's own block builder
        net.conv1, net.bn1, net.inplanes = nn.Conv2d(3, c, 7, 2, 3, bias=False), net._norm_layer(c), c
        net.layer1 = net._make_layer(torchvision.models.resnet.BasicBlock, c, 2)
        for i, stage in enumerate(("layer2", "layer3", "layer4"), start=1):
            setattr(net, stage, net._make_layer(torchvision.models.resnet.BasicBlock, scaled(64 << i, width), 2,
                                                stride=2))
    if image_size <= 64:  # CIFAR stem: 3x3 stride-1 conv and no max-pool
        net.conv1 = nn.Conv2d(3, c, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def vgg11_encoder(norm: str, width: float = 1.0) -> nn.Module:
    layers, channels = [], 3
    for v in VGG11_CONFIG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        v = scaled(v, width)
        layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), norm_factory(norm)(v), nn.ReLU(inplace=True)]
        channels = v
    # A global average pool makes any input size give 512-d; at 32x32 the map is already 1x1 (identity).
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def build_encoder(name: str, norm: str | None = None, image_size: int = 32, width: float = 1.0) -> nn.Module:
    """`width` scales every conv's channels (and so the embedding size): a CPU-scale proxy of the paper's nets."""
    if name not in ENCODERS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(ENCODERS)}")
    norm = norm or DEFAULT_NORM[name]
    if name == "resnet18":
        return resnet18_encoder(norm, image_size, width)
    if name == "vgg11":
        return vgg11_encoder(norm, width)
    return nn.Flatten()


def reset_encoder(encoder: nn.Module, generator: torch.Generator) -> None:
    """Kaiming-normal (fan_out, relu) convs with zero bias; norm weight 1 and bias 0; buffers untouched."""
    for m in encoder.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------- bottleneck
class L2Normalize(nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=-1)


class BottleneckLinear(nn.Linear):
    """A linear layer whose weight rows can be L2-normalised (weight norm with g fixed to 1, not learnable)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_norm: bool):
        super().__init__(in_features, out_features, bias=bias)
        self.weight_norm = weight_norm

    def effective_weight(self) -> torch.Tensor:
        return F.normalize(self.weight, dim=1) if self.weight_norm else self.weight

    def forward(self, x):
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", weight_norm={self.weight_norm}"


def bottleneck_stage(wn: str, lin: str, fn: str, d_in: int, d_out: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    if lin != "-":
        layers.append(BottleneckLinear(d_in, d_out, bias=lin == "lb", weight_norm=wn == "wn"))
    if fn == "fn":
        layers.append(L2Normalize())
    return layers


class DINOHead(nn.Module):
    """MLP (Linear+GELU per hidden layer) -> first bottleneck stage (`trunk`) -> second stage (`last`).

    The split matters for speed: a frozen teacher's `trunk` output is a per-image constant that can be cached,
    leaving only `last` (the 256 -> out_dim layer) to run per step.
    """

    def __init__(self, in_dim: int, hidden_dims=(2048, 2048), bottleneck_dim: int = 256, out_dim: int = 65536,
                 bottleneck: str = "default"):
        super().__init__()
        wn1, lin1, fn1, wn2, lin2, fn2 = parse_bottleneck(bottleneck)
        mlp, d = [], in_dim
        for h in hidden_dims:
            mlp += [nn.Linear(d, h), nn.GELU()]
            d = h
        # An absent linear layer collapses the bottleneck: the other one maps straight to its neighbour's size.
        mid = d if lin1 == "-" else (out_dim if lin2 == "-" else bottleneck_dim)
        self.trunk = nn.Sequential(*mlp, *bottleneck_stage(wn1, lin1, fn1, d, mid))
        self.last = nn.Sequential(*bottleneck_stage(wn2, lin2, fn2, mid, out_dim))
        self.trunk_dim = mid

    def reset_parameters(self, generator: torch.Generator) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):  # trunc_normal(std 0.02) with the official code's absolute bounds
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0, generator=generator)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.last(self.trunk(x))


# ------------------------------------------------------------------------------------------ the network
def resolve_arch(model="resnet18", norm=None, image_size=32, hidden_dims=(2048, 2048), bottleneck_dim=256,
                 out_dim=65536, bottleneck="default", width=1.0) -> dict:
    """Architecture arguments with defaults and presets spelled out, so a saved config is unambiguous."""
    return dict(model=model, norm=norm or DEFAULT_NORM.get(model), image_size=image_size,
                hidden_dims=list(hidden_dims), bottleneck_dim=bottleneck_dim, out_dim=out_dim,
                bottleneck=BOTTLENECK_PRESETS.get(bottleneck, bottleneck), width=float(width))


class DistillationNetwork(nn.Module, PyTorchModelHubMixin, library_name="random-teachers",
                          tags=["random-teachers", "self-distillation", "image-feature-extraction"],
                          paper_url=PAPER_URL):
    """Encoder + DINO head. Teacher and student are two instances of this class.

    Every `__init__` argument is plain JSON, so `save_pretrained` writes a config.json from which
    `from_pretrained` rebuilds the exact network. The seeds and alpha are carried along (not used by the
    architecture) so that `build_teacher()` can recreate the random teacher a student was distilled from.
    """

    def __init__(self, model: str = "resnet18", norm: str | None = None, image_size: int = 32,
                 hidden_dims: list[int] | tuple[int, ...] = (2048, 2048), bottleneck_dim: int = 256,
                 out_dim: int = 65536, bottleneck: str = "default", width: float = 1.0,
                 teacher_seed: int | None = None, student_seed: int | None = None, alpha: float | None = None):
        super().__init__()
        self.arch = resolve_arch(model, norm, image_size, hidden_dims, bottleneck_dim, out_dim, bottleneck, width)
        self.seeds = dict(teacher_seed=teacher_seed, student_seed=student_seed, alpha=alpha)
        self.encoder = build_encoder(model, self.arch["norm"], image_size, width)
        with torch.no_grad():  # infer the embedding size instead of hard-coding it (the official VGG bug)
            self.embed_dim = self.encoder.eval()(torch.zeros(2, 3, image_size, image_size)).shape[1]
        self.encoder.train()
        self.head = DINOHead(self.embed_dim, hidden_dims, bottleneck_dim, out_dim, bottleneck)

    @classmethod
    def from_pretrained(cls, *args, strict: bool = True, **kwargs):
        """PyTorchModelHubMixin.from_pretrained, but strict by default: weights must match the config."""
        return super().from_pretrained(*args, strict=strict, **kwargs)

    def reset_parameters(self, generator: torch.Generator) -> "DistillationNetwork":
        reset_encoder(self.encoder, generator)
        self.head.reset_parameters(generator)
        return self

    def forward(self, x, return_embedding: bool = False):
        embedding = self.encoder(x)
        logits = self.head(embedding)
        return (logits, embedding) if return_embedding else logits

    def config(self) -> dict:
        return {**self.arch, **self.seeds}

    def build_teacher(self) -> "DistillationNetwork":
        """The frozen random teacher this student was distilled from, rebuilt from the stored seed."""
        if self.seeds["teacher_seed"] is None:
            raise ValueError("this network carries no teacher_seed, so its teacher cannot be rebuilt")
        return freeze(init_network(self.arch, self.seeds["teacher_seed"]))

    def build_init(self) -> "DistillationNetwork":
        """This student's initialisation theta_S, rebuilt exactly from the stored seeds and alpha."""
        if None in self.seeds.values():
            raise ValueError("this network carries no teacher/student seeds or alpha, so its initialisation "
                             "cannot be rebuilt")
        return make_teacher_student(self.arch, **self.seeds)[1]


def init_network(arch: dict, seed: int) -> DistillationNetwork:
    return DistillationNetwork(**arch).reset_parameters(torch.Generator().manual_seed(seed))


def freeze(net: nn.Module) -> nn.Module:
    """Teacher semantics (docs/method.md): no gradients and eval mode; the training loop never calls `.train()` on it,
    so its BN keeps the initial running statistics (0, 1) for the whole run."""
    return net.requires_grad_(False).eval()


@torch.no_grad()
def interpolate_parameters(teacher: nn.Module, fresh: nn.Module, target: nn.Module, alpha: float) -> None:
    """theta_S = ((1-a) theta_T + a theta_fresh) / sqrt(a^2 + (1-a)^2) over parameters only, in float64.

    Buffers of `target` are left as constructed (BN running stats at their defaults 0 / 1).
    """
    delta = math.sqrt(alpha ** 2 + (1 - alpha) ** 2)
    for p_t, p_f, p_s in zip(teacher.parameters(), fresh.parameters(), target.parameters(), strict=True):
        mixed = ((1 - alpha) * p_t.double() + alpha * p_f.double()) / delta
        p_s.copy_(mixed.to(p_s.dtype))


def make_teacher_student(arch: dict, teacher_seed: int, student_seed: int, alpha: float):
    """Return (frozen teacher, student) with the student at locality alpha from the teacher (docs/method.md)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    arch = resolve_arch(**arch)  # the student's saved config then names the exact norm and bottleneck
    teacher = init_network(arch, teacher_seed)
    fresh = init_network(arch, student_seed)
    student = DistillationNetwork(**arch, teacher_seed=teacher_seed, student_seed=student_seed, alpha=alpha)
    interpolate_parameters(teacher, fresh, student, alpha)
    return freeze(teacher), student
