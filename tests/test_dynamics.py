"""utils/dynamics.py and --log-dynamics: the logged gradient and Adam step sizes are those of the step just taken,
eps damping is seen where docs/method.md says (round-off-sized first gradients near alpha = 0), BN statistics gaps."""
import copy
import math

import pandas as pd
import pytest
import torch
from accelerate import Accelerator

import train_distill
from conftest import TINY_RUN
from utils.distill import DistillStep, TeacherTargets, make_optimizer
from utils.dynamics import BatchNormStats, adam_directions, step_diagnostics, weight_names
from utils.losses import distill_loss
from utils.models import make_teacher_student

ARCH = dict(model="vgg11", width=0.125, hidden_dims=[32], bottleneck_dim=8, out_dim=64)


def _step(alpha, steps=3, model="vgg11"):
    torch.manual_seed(0)
    teacher, student = make_teacher_student(ARCH | {"model": model}, 0, 1, alpha)
    optimizer = make_optimizer(student, fused=False)
    x = torch.randn(16, 3, 32, 32)
    inputs = lambda idx: x[idx]  # noqa: E731
    step = DistillStep(student, optimizer, Accelerator(cpu=True), inputs, TeacherTargets(teacher, inputs))
    for _ in range(steps):
        before = copy.deepcopy(student)
        step(torch.arange(16), 16, record_grads=True)
    return teacher, student, before, optimizer, step, x


@pytest.mark.parametrize("alpha", [1e-10, 1.0])
def test_logged_gradient_and_step_are_those_of_the_last_step(alpha):
    teacher, student, before, optimizer, step, x = _step(alpha)
    # the recorded gradient norms equal a fresh backward pass of the batch-mean loss at the pre-step weights
    loss = distill_loss(before(x), teacher(x)).mean()
    grads = torch.autograd.grad(loss, list(before.parameters()))
    for (name, _), g in zip(before.named_parameters(), grads):
        torch.testing.assert_close(step.grad_sq[name], g.pow(2).sum(), rtol=1e-4, atol=1e-30)
    # with weight decay 0 the parameter change is exactly minus Adam's direction
    directions = adam_directions(student, optimizer)
    moved = 0.0
    for (name, p), q in zip(student.named_parameters(), before.parameters()):
        ulp = torch.finfo(torch.float32).eps * q.detach().abs().max().item()  # the subtraction's own round-off
        torch.testing.assert_close(q.detach() - p.detach(), directions[name][0], rtol=1e-4, atol=2 * ulp + 1e-12)
        moved += (q - p).detach().double().pow(2).sum().item()
    values = step_diagnostics(student, optimizer, step.grad_sq, per_layer=True)
    assert values["train/adam_step_norm"] == pytest.approx(math.sqrt(moved), rel=1e-3)
    assert values["train/grad_norm"] == pytest.approx(math.sqrt(sum(g.pow(2).sum().item() for g in grads)), rel=1e-3)
    names = weight_names(student)
    assert {f"dynamics/{n}/{k}" for n in names for k in ("grad_rms", "step_rms", "weight_rms", "eps_damped")} \
        <= values.keys()
    assert all(0 <= values[f"dynamics/{n}/eps_damped"] <= 1 for n in names)


def test_eps_damps_the_first_steps_near_alpha_zero_and_not_at_alpha_one():
    """docs/method.md: near alpha = 0 the first gradients are round-off sized, below AdamW's eps."""
    for alpha, low, high in ((1e-10, 0.99, 1.0), (1.0, 0.0, 0.6)):  # at 1, the rest are zero gradients (dead units)
        _, student, _, optimizer, step, _ = _step(alpha, steps=1)
        frac = step_diagnostics(student, optimizer, step.grad_sq, per_layer=False)["train/eps_damped"]
        assert low <= frac <= high, (alpha, frac)


def test_batchnorm_stats_compare_running_and_batch_statistics():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    stats = BatchNormStats(net)
    x = 3 + 2 * torch.randn(8, 3, 10, 10)
    net(x)  # inactive: nothing recorded
    assert stats.read() == {}
    stats.active = True
    net(x)
    values = stats.read()
    h = net[0](x)
    bn = net[1]
    expected_ratio = (bn.running_var / h.var((0, 2, 3))).mean().item()
    assert values["dynamics/1/running_var_ratio"] == pytest.approx(expected_ratio, rel=1e-4)
    shift = ((bn.running_mean - h.mean((0, 2, 3))).abs() / h.var((0, 2, 3)).sqrt()).mean().item()
    assert values["dynamics/1/mean_shift"] == pytest.approx(shift, rel=1e-4)


def test_log_dynamics_writes_per_layer_rows(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    argv = [a for a in TINY_RUN] + ["--dataset", str(tiny_dataset), "--output-dir", str(out), "--epochs", "1",
                                    "--train-subset", "128", "--probe-every", "0", "--log-dynamics"]
    argv[argv.index("vgg11")] = "resnet18"
    assert train_distill.main(argv + ["--width", "0.125"]) == 0
    df = pd.read_csv(out / "metrics.csv")
    logged = set(df.metric)
    assert "dynamics/encoder.conv1.weight/step_rms" in logged and "dynamics/head.last.0.weight/eps_damped" in logged
    assert "dynamics/encoder.bn1/running_var_ratio" in logged and "dynamics/encoder.layer4.1.bn2/mean_shift" in logged
    assert df[df.metric.str.startswith("dynamics/")].value.map(math.isfinite).all()
    assert sorted(set(df[df.metric == "dynamics/encoder.conv1.weight/grad_rms"].step)) == [2]  # log-every 2, 2 steps
