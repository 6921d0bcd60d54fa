"""The exact speed optimisations against the plain paths they replace (same numbers within float tolerance).

(i)   uint8 images on the device + Normalizer + index gather == torchvision ToTensor + Normalize over PIL images
      through a DataLoader, batch by batch, in the same index order.
(ii)  DistillStep (fused AdamW, cached teacher trunk, device-resident data, loss summed on the device) == a plain
      loop (PIL DataLoader, full teacher forward every step, soft-CE mean, AdamW(foreach=False, fused=False),
      loss.item() every step): same per-step losses and final parameters.
(iii) probes on features extracted once == probes that re-run the encoder on every batch of every epoch
      (linear: same init and batch order, identical accuracy; k-NN: identical predictions vs cdist + stable sort).
(iv)  chunked k-NN == unchunked (chunk 1, 7, n), both metrics, with exact ties in the data.
(v)   DistillStep.__call__ never asks for a host synchronisation (no tensor -> Python scalar/list conversion, no
      data-dependent-shape op).

Not repeated here (tests/test_training.py covers them): cached vs uncached teacher through train_distill.main, and
fused vs plain AdamW on their own.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from utils.data import Normalizer, build_digits, epoch_order
from utils.distill import DistillStep, TeacherTargets, make_optimizer
from utils.losses import distill_loss, loss_diagnostics
from utils.models import make_teacher_student
from utils.probing import extract_features, knn_predict, linear_probe

TINY = dict(model="vgg11", image_size=32, hidden_dims=[32], bottleneck_dim=8, out_dim=64)


@pytest.fixture(scope="module")
def accelerator():
    """DistillStep's accelerator (autocast, backward, process count). Plain Accelerator(), as the other tests: its
    state is process-wide, and cpu=True here would pin later tests to the CPU on a GPU machine. The tensors in these
    tests stay on the CPU; with mixed precision 'no' the accelerator does not move anything."""
    from accelerate import Accelerator

    return Accelerator()


class PILImages(torch.utils.data.Dataset):
    """The plain pipeline: PIL images, a torchvision transform per item."""

    def __init__(self, images_u8, labels, mean, std):
        from PIL import Image
        from torchvision import transforms

        self.images = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images_u8]
        self.labels = labels
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def plain_loader(images, labels, mean, std, batches):
    """A DataLoader that yields exactly `batches` (a list of index tensors), in order."""
    return torch.utils.data.DataLoader(PILImages(images, labels, mean, std),
                                       batch_sampler=[b.tolist() for b in batches])


def stats(images):
    pixels = images.double().div(255).transpose(0, 1).reshape(3, -1)
    return tuple(pixels.mean(1).tolist()), tuple(pixels.std(1, unbiased=False).tolist())


# ------------------------------------------------------------------------------------------------ (i) data
@pytest.mark.parametrize("channels_last", [False, True])
def test_device_batches_equal_pil_dataloader_batches(channels_last):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8, generator=g)  # every channel differs
    images[0] = 0
    images[1] = 255  # both ends of the range
    labels = torch.randint(0, 10, (70,), generator=g)
    mean, std = stats(images)
    normalize = Normalizer(mean, std, "cpu", channels_last)
    batches = epoch_order(len(images), seed=3, epoch=1).split(16)  # last batch partial (6)
    n = 0
    for idx, (x_plain, y_plain) in zip(batches, plain_loader(images, labels, mean, std, batches), strict=True):
        x = normalize(images[idx])
        assert x.dtype == x_plain.dtype == torch.float32 and x.shape == x_plain.shape
        torch.testing.assert_close(x, x_plain, rtol=1e-6, atol=2e-6)
        assert torch.equal(labels[idx], y_plain)
        n += len(idx)
    assert n == len(images)


# ---------------------------------------------------------------------------------------- (ii) the step
# VGG11 without BN (the paper's VGG) with fused AdamW vs plain AdamW. With BN the comparison uses SGD on both sides:
# VGG11's conv biases sit right before a train-mode BN, so their exact gradient is 0 and the computed one is round-off,
# which Adam turns into lr-sized steps of random sign; the trajectory then depends on the last bit of every input
# (the plain loop against itself with inputs scaled by 1 + 1e-7 differs by ~the whole update after 6 steps), so no
# two implementations can agree in parameters. SGD keeps round-off at round-off size, so the BN path (eval-mode
# teacher from the cache, train-mode student BN and its running statistics) is compared exactly.
@pytest.mark.parametrize("norm,opt", [("none", "adamw"), ("batch", "sgd")])
def test_distill_step_equals_plain_loop(norm, opt, accelerator):
    train, _ = build_digits(n_train=72, n_test=1)
    mean, std = stats(train.images)
    arch = dict(TINY, norm=norm)
    teacher, student = make_teacher_student(arch, 0, 1, 0.5)
    plain_teacher, plain_student = copy.deepcopy(teacher), copy.deepcopy(student)
    start = copy.deepcopy(student.state_dict())

    # the project's path, as train_distill.py builds it
    normalize = Normalizer(mean, std, "cpu")
    inputs = lambda idx: normalize(train.images[idx])  # noqa: E731
    if opt == "adamw":
        optimizer = make_optimizer(student)
        assert all(g["fused"] for g in optimizer.param_groups)
        plain_opt = torch.optim.AdamW(plain_student.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=0.0, foreach=False, fused=False)
    else:
        optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
        plain_opt = torch.optim.SGD(plain_student.parameters(), lr=0.5, foreach=False)
    cache = extract_features(lambda x: teacher.head.trunk(teacher.encoder(x)), len(train), inputs, 512)
    step = DistillStep(student, optimizer, accelerator, inputs, TeacherTargets(teacher, inputs, cache))

    batches = [b for epoch in (1, 2) for b in epoch_order(len(train), 0, epoch).split(32)]  # 32, 32, 8 per epoch
    ours, theirs = [], []
    student.train()
    plain_student.train()
    for idx in batches:  # the same input tensors on both sides: (i) covers the data path; this compares the step
        x = inputs(idx).clone()
        per_sample, *_ = step(idx, len(idx))
        ours.append(per_sample.mean().item())
        with torch.no_grad():
            t = plain_teacher(x)
        loss = -(F.softmax(t, -1) * F.log_softmax(plain_student(x), -1)).sum(-1).mean()
        plain_opt.zero_grad()
        loss.backward()
        plain_opt.step()
        theirs.append(loss.item())
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-5, atol=1e-6)
    assert len(set(ours)) > 1  # the loss moved
    got, want = student.state_dict(), plain_student.state_dict()
    assert got.keys() == want.keys()
    # Adam divides each gradient element by its own running magnitude, so the rare element whose gradient is ~0
    # turns the two paths' round-off (inputs differ in the last bit) into a visible difference, bounded by lr = 1e-3
    # per step (here <= 9e-5 in 44 of 9.2 M elements after 6 steps). Hence: every element within 20% of one Adam
    # step, and all but <= 1e-5 of the elements within rtol 1e-4 / atol 1e-5 (1% of a step).
    moved = outliers = total = 0
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=2e-4, msg=lambda m: f"{k}: {m}")
        if got[k].is_floating_point():
            # A BN running mean is a batch mean of O(1) activations that cancel to ~1e-2: summed over ~10^4 float32
            # values in another order (another CPU's kernels), it differs by ~1e-5 absolute, large relative to it.
            atol = 1e-4 if k.endswith("running_mean") else 1e-5
            outliers += (~torch.isclose(got[k], want[k], rtol=1e-4, atol=atol)).sum().item()
            total += got[k].numel()
        moved += not torch.equal(got[k], start[k])
    assert outliers <= (0 if opt == "sgd" else 1e-5 * total), f"{outliers} of {total} elements differ"
    assert moved > len(got) // 2
    if norm == "batch":
        assert any(k.endswith("running_var") and not torch.equal(got[k], start[k]) for k in got)
    for k, v in teacher.state_dict().items():  # neither path touched its teacher
        assert torch.equal(v, plain_teacher.state_dict()[k])


# ------------------------------------------------------------------------------------------- (iii) probes
@pytest.fixture(scope="module")
def probe_setup():
    train, test = build_digits(n_train=160, n_test=60, seed=1)
    mean, std = stats(train.images)
    net = make_teacher_student(dict(TINY, norm="batch"), 0, 1, 0.5)[1]
    normalize = Normalizer(mean, std, "cpu")
    # a student whose BN running statistics have moved (as after training); probed in eval mode
    with torch.no_grad():
        for idx in torch.arange(len(train)).split(40):
            net.train()(normalize(train.images[idx]))
    encoder = net.encoder.eval()
    return train, test, encoder, normalize, mean, std


def test_linear_probe_on_cached_features_equals_per_epoch_encoder(probe_setup):
    train, test, encoder, normalize, *_ = probe_setup
    seed, epochs, batch = 3, 3, 64
    f_train = extract_features(encoder, len(train), lambda i: normalize(train.images[i]), 512)
    f_test = extract_features(encoder, len(test), lambda i: normalize(test.images[i]), 512)
    cached = linear_probe(f_train, train.labels, {"test": (f_test, test.labels)}, 10, seed=seed, epochs=epochs,
                          batch_size=batch)["test"]

    # plain: same protocol (init and batch order from the seed, AdamW lr 1e-3 wd 0.01), encoder re-run per batch
    g = torch.Generator().manual_seed(seed)
    probe = nn.Linear(512, 10)
    bound = 1 / math.sqrt(512)
    with torch.no_grad():
        probe.weight.uniform_(-bound, bound, generator=g)
        probe.bias.uniform_(-bound, bound, generator=g)
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=0.01)
    order = torch.randperm(len(train), generator=g)
    for _ in range(epochs):
        for idx in order.split(batch):
            with torch.no_grad():
                f = encoder(normalize(train.images[idx]))
            torch.testing.assert_close(f, f_train[idx], rtol=1e-5, atol=1e-5)  # the cache holds these features
            loss = F.cross_entropy(probe(f), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = torch.cat([probe(encoder(normalize(test.images[i]))).argmax(1)
                          for i in torch.arange(len(test)).split(batch)])
    assert round(cached * len(test)) == (pred == test.labels).sum().item()  # the same number of test images right
    assert len(pred.unique()) > 2  # not a comparison between two constant predictors


def test_knn_on_cached_features_equals_per_batch_cdist(probe_setup):
    train, test, encoder, normalize, *_ = probe_setup
    k = 20
    f_train = extract_features(encoder, len(train), lambda i: normalize(train.images[i]), 512)
    f_test = extract_features(encoder, len(test), lambda i: normalize(test.images[i]), 512)
    cached = knn_predict(f_train, train.labels, f_test, 10, k=k)

    plain = []
    with torch.no_grad():
        bank = torch.cat([encoder(normalize(train.images[i])) for i in torch.arange(len(train)).split(50)])
        for i in torch.arange(len(test)).split(25):
            q = encoder(normalize(test.images[i]))
            d = torch.cdist(q.double(), bank.double(), compute_mode="donot_use_mm_for_euclid_dist")
            nearest = torch.sort(d, dim=1, stable=True).indices[:, :k]  # ties: lower train index first
            votes = F.one_hot(train.labels[nearest], 10).sum(1)
            plain.append(votes.argmax(1))  # first maximum: ties to the smallest label
    assert torch.equal(cached, torch.cat(plain))
    assert len(cached.unique()) > 2


# ------------------------------------------------------------------------------------------ (iv) chunking
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_chunked_knn_equals_unchunked(metric):
    g = torch.Generator().manual_seed(0)
    train = torch.randint(-2, 3, (120, 6), generator=g).float()  # integer features: many exact distance ties
    labels = torch.randint(0, 5, (120,), generator=g)
    test = torch.randint(-2, 3, (45, 6), generator=g).float()
    test[:4] = train[:4]
    for k in (1, 5, 20):
        full = knn_predict(train, labels, test, 5, k=k, metric=metric, chunk=len(test))
        for chunk in (1, 7, len(test)):
            assert torch.equal(knn_predict(train, labels, test, 5, k=k, metric=metric, chunk=chunk), full), \
                (k, chunk)


# ------------------------------------------------------------------------------------------- (v) no sync
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "nonzero_static", "masked_select", "unique",
            "_unique", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave", "equal", "is_nonzero",
            "allclose"}


class OpLog(TorchDispatchMode):
    """Every aten op run under it (those that read a device value back to the host are in SYNC_OPS)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def forbid_python_conversions(monkeypatch):
    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"host synchronisation: Tensor.{name} called inside DistillStep")
        return method

    for name in ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
def test_distill_step_requests_no_host_sync(cache, accelerator, monkeypatch):
    train, _ = build_digits(n_train=48, n_test=1)
    mean, std = stats(train.images)
    teacher, student = make_teacher_student(dict(TINY, norm="batch"), 0, 1, 0.5)
    normalize = Normalizer(mean, std, "cpu")
    inputs = lambda idx: normalize(train.images[idx])  # noqa: E731
    optimizer = make_optimizer(student)
    features = extract_features(lambda x: teacher.head.trunk(teacher.encoder(x)), len(train), inputs, 512) \
        if cache else None
    step = DistillStep(student, optimizer, accelerator, inputs, TeacherTargets(teacher, inputs, features))
    batches = epoch_order(len(train), 0, 1).split(16)
    student.train()
    step(batches[0], 16)  # first step outside the checks: the optimiser creates its state here

    # positive controls: both detectors do see a sync
    with OpLog() as log:
        torch.ones(2).sum().item()
    assert "_local_scalar_dense" in log.ops
    with monkeypatch.context() as m:
        forbid_python_conversions(m)
        with pytest.raises(AssertionError, match="host synchronisation"):
            float(torch.ones(()))

    for idx in batches[1:]:
        with monkeypatch.context() as m:
            forbid_python_conversions(m)
            with OpLog() as log:
                per_sample, s_logits, t_logits, embedding = step(idx, len(idx))
        assert log.ops, "the dispatch log saw no ops"
        assert not SYNC_OPS & set(log.ops), sorted(SYNC_OPS & set(log.ops))
        # the logging path afterwards may synchronise (it is only run on logging steps)
        diag = loss_diagnostics(s_logits, t_logits)
        assert math.isfinite(diag["ce"].item())
        torch.testing.assert_close(per_sample.sum(), distill_loss(s_logits, t_logits).sum())
