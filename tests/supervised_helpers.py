"""Tiny networks and data shared by test_imp.py and test_lmc.py (the supervised SGD recipe, IMP and LMC)."""
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from utils.data import ImageDataset, Normalizer, Split
from utils.models import make_teacher_student
from utils.supervised import Classifier, Recipe, SupervisedTrainer

# A student small enough for end-to-end runs in seconds: ResNet18 at 1/8 width (64-d embedding), tiny head.
TINY_ARCH = dict(model="resnet18", width=0.125, hidden_dims=[16], bottleneck_dim=8, out_dim=16)
# 256 train images at batch 64: 4 steps per epoch; lr milestone after epoch 1.
TINY_RECIPE = ["--epochs", "2", "--lr-milestones", "1", "--batch-size", "64", "--eval-batch-size", "128"]


def save_tiny_student(folder: Path, alpha: float = 0.5) -> Path:
    """A save_pretrained student folder (the --student loader's second form), as train_distill.py writes it."""
    _, student = make_teacher_student(TINY_ARCH, teacher_seed=0, student_seed=1, alpha=alpha)
    student.save_pretrained(folder)
    return folder


def tiny_encoder(seed: int = 0) -> nn.Module:
    """conv (bias) -> BN -> ReLU -> conv (no bias) -> BN -> pool: every kind of tensor a scope can hold."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def tiny_classifier(seed: int = 0) -> Classifier:
    net = Classifier(tiny_encoder(seed), 6, 3, head_seed=seed)
    with torch.no_grad():  # BN affine parameters off their 1 / 0 init, so 'unchanged' is a real check
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net


def tiny_data(n_train: int = 48, n_test: int = 24, size: int = 8) -> ImageDataset:
    """Random uint8 images whose label is the brightest channel, so training has a signal."""
    g = torch.Generator().manual_seed(0)

    def split(n):
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        return Split(images, images.float().mean((2, 3)).argmax(1))

    return ImageDataset("tiny", split(n_train), split(n_test), 3, (0.5,) * 3, (0.25,) * 3)


def tiny_trainer(epochs: int = 2, **recipe) -> SupervisedTrainer:
    data = tiny_data()
    accelerator = Accelerator(cpu=True)
    recipe = Recipe(epochs=epochs, lr_milestones=(1,), batch_size=16, **recipe)
    return SupervisedTrainer(accelerator, tiny_classifier(), recipe, data, Normalizer(data.mean, data.std, "cpu"),
                             eval_batch_size=24, checkpoint_every=0)


class NoSignal:
    received = None
