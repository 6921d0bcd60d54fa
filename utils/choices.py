"""The names and specs a user can pass on the command line (models, norms, losses, bottlenecks, built-in data).

Torch-free on purpose: the scripts check their flags against these before importing torch, so a bad flag is
reported in well under a second instead of after the several seconds torch takes to import.
"""
from __future__ import annotations

ENCODERS = ("resnet18", "vgg11", "flatten")
NORMS = ("batch", "group", "layer", "instance", "none")
DEFAULT_NORM = {"resnet18": "batch", "vgg11": "none", "flatten": "none"}
# Smallest input side each encoder handles: VGG11 halves the map five times; ResNet18 (CIFAR stem) three.
MIN_IMAGE_SIZE = {"resnet18": 8, "vgg11": 32, "flatten": 1}
LOSSES = ("ce", "kl", "mse")


def uses_channels_last(setting, model: str) -> bool:
    """--channels-last on/off/auto (or the bool a run's config.json stores) -> whether the convolutions run in the
    channels_last layout; auto: on for resnet18 (faster on CPU), off otherwise. The layout changes the kernels'
    summation order, so probing a run's networks in its own layout reproduces its probes exactly."""
    if isinstance(setting, bool):
        return setting
    return setting == "on" or (setting in ("auto", None) and model == "resnet18")
BUILT_IN = ("digits", "photos")  # offline datasets, generated at a fixed 32 x 32
BOTTLENECK_PRESETS = {"default": "-/lb/fn/wn/l/-", "paper": "-/lb/fn/wn/l/-", "official": "-/lb/fn/-/l/-"}


def parse_bottleneck(spec: str) -> tuple[str, ...]:
    """Validate a six-slot `wn1/lin1/fn1/wn2/lin2/fn2` string (or a preset name) and return its slots."""
    spec = BOTTLENECK_PRESETS.get(spec, spec)
    slots = tuple(spec.split("/"))
    allowed = ({"wn", "-"}, {"l", "lb", "-"}, {"fn", "-"}) * 2
    if len(slots) != 6 or any(s not in ok for s, ok in zip(slots, allowed)):
        raise ValueError(
            f"bad bottleneck {spec!r}: expected six slots wn/lin/fn/wn/lin/fn with wn in (wn,-), lin in "
            f"(l,lb,-), fn in (fn,-), or a preset ({', '.join(BOTTLENECK_PRESETS)})")
    for wn, lin in (slots[0:2], slots[3:5]):
        if wn == "wn" and lin == "-":
            raise ValueError(f"bad bottleneck {spec!r}: a 'wn' slot needs its linear layer")
    if slots[1] == "-" and slots[4] == "-":
        raise ValueError(f"bad bottleneck {spec!r}: at least one linear layer is needed")
    return slots
