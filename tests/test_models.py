"""Networks (docs/method.md): the bottleneck grammar, encoders, seeded init, teacher/student construction, Hub I/O."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils.models import (BOTTLENECK_PRESETS, NORMS, BottleneckLinear, DINOHead, DistillationNetwork, L2Normalize,
                          build_encoder, init_network, interpolate_parameters, make_teacher_student,
                          parse_bottleneck)

# Small head dims: every grammar property is independent of size.
IN, HID, BOT, OUT = 16, (32, 24), 8, 40
MLP_PARAMS = (16 * 32 + 32) + (32 * 24 + 24)  # Linear(16, 32) + Linear(32, 24), both with bias

# A small but real network: VGG11 with BN (so there are buffers) and a head big enough for variance estimates.
ARCH = dict(model="vgg11", norm="batch", image_size=32, hidden_dims=[256], bottleneck_dim=16, out_dim=32)
# Where the property is the same for every parameter tensor: a pixel-input network (no conv), fast to build.
SMALL = dict(model="flatten", image_size=8, hidden_dims=[64, 48], bottleneck_dim=16, out_dim=32)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def head(spec: str, seed: int = 0, **dims) -> DINOHead:
    kw = dict(in_dim=IN, hidden_dims=HID, bottleneck_dim=BOT, out_dim=OUT)
    kw.update(dims)
    h = DINOHead(bottleneck=spec, **kw)
    h.reset_parameters(torch.Generator().manual_seed(seed))
    return h


def linears(module: nn.Module) -> list[BottleneckLinear]:
    return [m for m in module.modules() if isinstance(m, BottleneckLinear)]


def norm_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm,
                                                           nn.InstanceNorm2d))]


# ------------------------------------------------------------------------------------------------ grammar
@pytest.mark.parametrize("wn", ["wn", "-"])
@pytest.mark.parametrize("slot", [1, 2])
def test_wn_slot_normalises_effective_weight_rows(wn, slot):
    spec = f"{wn}/lb/-/-/l/-" if slot == 1 else f"-/lb/-/{wn}/l/-"
    h = head(spec)
    lin = linears(h)[slot - 1]
    assert lin.weight_norm == (wn == "wn")
    raw = lin.weight.detach()
    # Raw rows are trunc-normal(0.02): far from unit norm, so normalisation is visible.
    assert (raw.norm(dim=1) - 1).abs().min() > 0.5
    x = torch.randn(5, lin.in_features)
    out = lin(x)
    eff = lin.effective_weight().detach()
    if wn == "wn":
        torch.testing.assert_close(eff.norm(dim=1), torch.ones(lin.out_features))
        torch.testing.assert_close(out, F.linear(x, F.normalize(raw, dim=1), lin.bias))
        # The norm is fixed to 1, not learnable: rescaling the raw weight changes nothing, and there is no g.
        with torch.no_grad():
            lin.weight.mul_(7.0)
        torch.testing.assert_close(lin(x), out)
        assert [n for n, _ in lin.named_parameters()] == ["weight"] + (["bias"] if lin.bias is not None else [])
    else:
        assert torch.equal(eff, raw)
        torch.testing.assert_close(out, F.linear(x, raw, lin.bias))
        assert not torch.allclose(out, F.linear(x, F.normalize(raw, dim=1), lin.bias))


def test_fn_slots_normalise_features_after_their_linear():
    x = torch.randn(6, IN)
    h = head("-/lb/fn/-/l/fn")
    mid, out = h.trunk(x), h(x)
    torch.testing.assert_close(mid.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(6))
    assert isinstance(h.trunk[-1], L2Normalize) and isinstance(h.last[-1], L2Normalize)

    h = head("-/lb/-/-/l/-")
    mid, out = h.trunk(x), h(x)
    assert (mid.norm(dim=1) - 1).abs().min() > 1e-3
    assert (out.norm(dim=1) - 1).abs().min() > 1e-3
    assert not any(isinstance(m, L2Normalize) for m in h.modules())


@pytest.mark.parametrize("lin1,lin2", [("l", "l"), ("lb", "l"), ("l", "lb"), ("lb", "lb")])
def test_lin_slot_bias(lin1, lin2):
    h = head(f"-/{lin1}/fn/wn/{lin2}/-")
    first, second = linears(h)
    assert (first.bias is not None) == (lin1 == "lb")
    assert (second.bias is not None) == (lin2 == "lb")
    assert (first.in_features, first.out_features) == (HID[-1], BOT)
    assert (second.in_features, second.out_features) == (BOT, OUT)


@pytest.mark.parametrize("spec,expected", [
    # default: 24 -> 8 with bias, 8 -> 40 without
    ("-/lb/fn/wn/l/-", MLP_PARAMS + (24 * 8 + 8) + 8 * 40),
    ("official", MLP_PARAMS + (24 * 8 + 8) + 8 * 40),
    ("-/l/-/-/lb/-", MLP_PARAMS + 24 * 8 + (8 * 40 + 40)),
    ("wn/lb/fn/wn/lb/fn", MLP_PARAMS + (24 * 8 + 8) + (8 * 40 + 40)),
    # a '-' linear removes the layer: the other one maps straight from 24 to 40
    ("-/-/-/-/l/-", MLP_PARAMS + 24 * 40),
    ("-/-/fn/wn/lb/-", MLP_PARAMS + 24 * 40 + 40),
    ("-/lb/fn/-/-/-", MLP_PARAMS + 24 * 40 + 40),
    ("wn/l/-/-/-/fn", MLP_PARAMS + 24 * 40),
])
def test_parameter_counts(spec, expected):
    h = head(spec)
    assert n_params(h) == expected
    out = h(torch.randn(3, IN))
    assert out.shape == (3, OUT)
    n_linear = sum(s in ("l", "lb") for s in parse_bottleneck(spec)[1::3])
    assert len(linears(h)) == n_linear


def test_parameter_count_paper_dims():
    # The paper's head: 512 -> 2048 -> 2048 -> 256 -> 65536 (on the meta device: shapes only, no memory).
    with torch.device("meta"):
        h = DINOHead(512, (2048, 2048), 256, 65536, bottleneck="default")
        h2 = DINOHead(512, (2048, 2048), 256, 65536, bottleneck="-/-/-/-/lb/-")
    assert n_params(h) == (512 * 2048 + 2048) + (2048 * 2048 + 2048) + (2048 * 256 + 256) + 256 * 65536
    assert n_params(h2) == (512 * 2048 + 2048) + (2048 * 2048 + 2048) + (2048 * 65536 + 65536)


def test_no_hidden_layers():
    h = head("-/lb/fn/wn/l/-", hidden_dims=())
    assert n_params(h) == (IN * BOT + BOT) + BOT * OUT
    assert h(torch.randn(2, IN)).shape == (2, OUT)


@pytest.mark.parametrize("spec", [
    "", "paperz", "-/lb/fn/wn/l", "-/lb/fn/wn/l/-/-", "x/lb/fn/wn/l/-", "-/LB/fn/wn/l/-", "fn/lb/-/-/l/-",
    "-/lb/wn/-/l/-", "-/lb/fn/wn/l/wn", "-/b/fn/wn/l/-", "-/lb/fn/wn/-/-",  # wn without its linear
    "wn/-/fn/-/l/-", "-/-/fn/-/-/-",  # no linear at all
    " -/lb/fn/wn/l/-", "-//fn/wn/l/-",
])
def test_invalid_bottleneck_raises(spec):
    with pytest.raises(ValueError):
        parse_bottleneck(spec)
    with pytest.raises(ValueError):
        DINOHead(IN, HID, BOT, OUT, bottleneck=spec)


def test_official_preset_is_no_wn_and_default_is_wn():
    assert parse_bottleneck("official") == ("-", "lb", "fn", "-", "l", "-")
    assert parse_bottleneck("default") == ("-", "lb", "fn", "wn", "l", "-")
    x = torch.randn(7, IN)
    for preset, explicit in (("official", "-/lb/fn/-/l/-"), ("default", "-/lb/fn/wn/l/-"), ("paper", "-/lb/fn/wn/l/-")):
        a, b = head(preset, seed=3), head(explicit, seed=3)
        assert repr(a) == repr(b)
        assert a.state_dict().keys() == b.state_dict().keys()
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
        assert torch.equal(a(x), b(x))
    off, dflt = head("official", seed=3), head("default", seed=3)
    assert [m.weight_norm for m in linears(off)] == [False, False]
    assert [m.weight_norm for m in linears(dflt)] == [False, True]
    assert [m.bias is not None for m in linears(dflt)] == [True, False]
    assert isinstance(dflt.trunk[-1], L2Normalize) and isinstance(dflt.trunk[-2], BottleneckLinear)
    assert not torch.allclose(off(x), dflt(x))  # same raw weights, but wn changes the last layer
    assert DINOHead(IN, HID, BOT, OUT).__repr__() == DINOHead(IN, HID, BOT, OUT, bottleneck="-/lb/fn/wn/l/-").__repr__()


def test_official_preset_network_level():
    x = torch.randn(2, 3, 8, 8)
    a = init_network({**SMALL, "bottleneck": "official"}, 5).eval()
    b = init_network({**SMALL, "bottleneck": "-/lb/fn/-/l/-"}, 5).eval()
    assert a.arch == b.arch and a.arch["bottleneck"] == BOTTLENECK_PRESETS["official"]
    assert torch.equal(a(x), b(x))
    assert DistillationNetwork(**SMALL).arch["bottleneck"] == "-/lb/fn/wn/l/-"


# ----------------------------------------------------------------------------------------------- encoders
@pytest.mark.parametrize("size", [32, 64, 96])
def test_vgg11_embedding_512(size):
    enc = build_encoder("vgg11", image_size=size).eval()
    assert enc(torch.randn(2, 3, size, size)).shape == (2, 512)


@pytest.mark.parametrize("size", [32, 64, 96])
def test_resnet18_embedding_512_and_stem(size):
    enc = build_encoder("resnet18", image_size=size).eval()
    if size <= 64:
        assert enc.conv1.kernel_size == (3, 3) and enc.conv1.stride == (1, 1) and enc.conv1.padding == (1, 1)
        assert enc.conv1.bias is None
        assert isinstance(enc.maxpool, nn.Identity)
    else:
        assert enc.conv1.kernel_size == (7, 7) and enc.conv1.stride == (2, 2)
        assert isinstance(enc.maxpool, nn.MaxPool2d)
    assert isinstance(enc.fc, nn.Identity)
    with torch.no_grad():
        assert enc(torch.randn(2, 3, size, size)).shape == (2, 512)


@pytest.mark.parametrize("model", ["resnet18", "vgg11"])
@pytest.mark.parametrize("size", [32, 96])
def test_width_scales_every_conv_and_keeps_the_structure(model, size):
    """--width w: the same modules under the same names, every conv's channels x w, embedding 512 w."""
    full, half = build_encoder(model, image_size=size), build_encoder(model, image_size=size, width=0.5)
    convs = lambda enc: {n: m for n, m in enc.named_modules() if isinstance(m, nn.Conv2d)}  # noqa: E731
    assert full.state_dict().keys() == half.state_dict().keys()
    for name, conv in convs(full).items():
        small = convs(half)[name]
        assert small.out_channels == conv.out_channels // 2 and small.kernel_size == conv.kernel_size
        assert small.stride == conv.stride and small.in_channels == (3 if conv.in_channels == 3 else conv.in_channels // 2)
    with torch.no_grad():
        assert half.eval()(torch.randn(2, 3, size, size)).shape == (2, 256)
    assert build_encoder(model, width=1.0).state_dict().keys() == full.state_dict().keys()
    net = DistillationNetwork(model=model, image_size=size, width=0.25, hidden_dims=[8], bottleneck_dim=4, out_dim=8)
    assert net.embed_dim == 128 and net.config()["width"] == 0.25


def test_network_embedding_dim():
    net = DistillationNetwork(model="vgg11", image_size=64, hidden_dims=[8], bottleneck_dim=4, out_dim=8).eval()
    logits, emb = net(torch.randn(2, 3, 64, 64), return_embedding=True)
    assert net.embed_dim == 512 and emb.shape == (2, 512) and logits.shape == (2, 8)
    assert DistillationNetwork(model="flatten", hidden_dims=[8], bottleneck_dim=4, out_dim=8).embed_dim == 3 * 32 * 32


@pytest.mark.parametrize("model,n_norm", [("resnet18", 20), ("vgg11", 8)])
@pytest.mark.parametrize("norm", NORMS)
def test_norm_choices(model, n_norm, norm):
    enc = build_encoder(model, norm=norm, image_size=32)
    layers = norm_layers(enc)
    convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d)]
    if norm == "none":
        assert layers == []
        return
    assert len(layers) == n_norm
    if model == "vgg11":  # one norm right after every conv, with the conv's channel count
        seq = list(enc)
        for i, m in enumerate(seq):
            if isinstance(m, nn.Conv2d):
                nxt = seq[i + 1]
                assert nxt in layers
                assert (nxt.num_features if norm == "batch" else nxt.num_channels) == m.out_channels
    if norm == "batch":
        assert all(type(m) is nn.BatchNorm2d for m in layers)
        return
    assert all(type(m) is nn.GroupNorm for m in layers)
    for m in layers:
        c = m.num_channels
        expected = {"group": c // 8, "layer": 1, "instance": c}[norm]
        assert m.num_groups == expected and c % m.num_groups == 0
    assert sorted({m.num_channels for m in layers}) == sorted({c.out_channels for c in convs})


def test_default_norms_and_bad_names():
    assert norm_layers(build_encoder("vgg11")) == []
    assert all(type(m) is nn.BatchNorm2d for m in norm_layers(build_encoder("resnet18")))
    assert DistillationNetwork(model="vgg11", hidden_dims=[8], bottleneck_dim=4, out_dim=8).arch["norm"] == "none"
    with pytest.raises(ValueError):
        build_encoder("vgg11", norm="weird")
    with pytest.raises(ValueError):
        build_encoder("resnet50")


# --------------------------------------------------------------------------------------------------- init
@pytest.fixture(scope="module")
def resnet_arch():
    return dict(model="resnet18", image_size=32, hidden_dims=[256], bottleneck_dim=16, out_dim=32)


@pytest.fixture(scope="module")
def resnet_net(resnet_arch):
    torch.manual_seed(123)
    return init_network(resnet_arch, 7)


def test_seeded_init_is_deterministic(resnet_arch, resnet_net):
    a = resnet_net
    torch.manual_seed(999)  # the global RNG must not matter
    torch.randn(100)
    b = init_network(resnet_arch, 7)
    c = init_network(resnet_arch, 8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    random_tensors = [n for n, p in a.named_parameters() if p.dim() > 1]
    assert len(random_tensors) > 20
    assert all(not torch.equal(sa[k], sc[k]) for k in random_tensors)


def test_init_distributions(resnet_net):
    net = resnet_net
    # Convs with C_out != C_in, so fan_out and fan_in differ by 2x.
    w = net.encoder.layer4[0].conv1.weight  # 512 x 256 x 3 x 3
    assert w.shape == (512, 256, 3, 3)
    assert w.std().item() == pytest.approx(math.sqrt(2 / (512 * 3 * 3)), rel=0.02)
    assert abs(w.mean().item()) < 1e-3
    w = net.encoder.layer2[0].conv1.weight  # 128 x 64 x 3 x 3
    assert w.std().item() == pytest.approx(math.sqrt(2 / (128 * 3 * 3)), rel=0.03)
    w = net.encoder.layer2[0].downsample[0].weight  # 128 x 64 x 1 x 1
    assert w.std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.05)
    head_linears = [m for m in net.head.modules() if isinstance(m, nn.Linear)]
    assert len(head_linears) == 3
    big = head_linears[0].weight  # 512 x 256
    assert big.std().item() == pytest.approx(0.02, rel=0.02)
    for m in head_linears:
        assert m.weight.abs().max() < 0.2  # trunc normal, no default kaiming-uniform left over
        if m.bias is not None:
            assert torch.all(m.bias == 0)
    bns = norm_layers(net.encoder)
    assert len(bns) == 20
    for m in bns:
        assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)
    # VGG conv biases are zero
    vgg = init_network(dict(ARCH, norm="group"), 0)
    convs = [m for m in vgg.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert all(torch.all(m.bias == 0) for m in convs)
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norm_layers(vgg.encoder))


# ------------------------------------------------------------------------------------------ teacher/student
@pytest.fixture(scope="module")
def pair_half():
    return make_teacher_student(ARCH, teacher_seed=0, student_seed=1, alpha=0.5)


def params(net):
    return dict(net.named_parameters())


def test_alpha_zero_is_exact_copy():
    teacher, student = make_teacher_student(SMALL, 0, 1, 0.0)
    pt, ps = params(teacher), params(student)
    assert pt.keys() == ps.keys()
    assert all(torch.equal(pt[k], ps[k]) for k in pt)


def test_alpha_one_is_fresh_init():
    teacher, student = make_teacher_student(SMALL, 0, 1, 1.0)
    fresh = init_network(SMALL, 1)
    pt, ps, pf = params(teacher), params(student), params(fresh)
    assert all(torch.equal(pf[k], ps[k]) for k in pf)
    assert all(not torch.equal(pt[k], ps[k]) for k, p in pt.items() if p.dim() > 1)


def test_alpha_half_preserves_variance(pair_half):
    teacher, student = pair_half
    pt, ps = params(teacher), params(student)
    checked = 0
    for k, t in pt.items():
        if t.dim() > 1 and t.numel() >= 10_000:  # conv weights and head Linear weights
            s = ps[k]
            assert s.var().item() == pytest.approx(t.var().item(), rel=0.04), k
            assert not torch.allclose(s, t)
            checked += 1
    assert checked == 8  # the 7 VGG convs with >= 10k weights + the 512 x 256 head layer


def check_formula(teacher, student, fresh, alpha):
    delta = math.sqrt(alpha ** 2 + (1 - alpha) ** 2)
    for (k, t), f, s in zip(teacher.named_parameters(), fresh.parameters(), student.parameters(), strict=True):
        expected = ((1 - alpha) * t.double() + alpha * f.double()) / delta
        assert s.dtype == torch.float32
        assert torch.equal(s, expected.float()), k
    assert student.seeds == dict(teacher_seed=0, student_seed=1, alpha=alpha)


@pytest.mark.parametrize("alpha", [1e-10, 0.3, 0.9])
def test_interpolation_formula_exact(alpha):
    teacher, student = make_teacher_student(SMALL, 0, 1, alpha)
    check_formula(teacher, student, init_network(SMALL, 1), alpha)


def test_interpolation_formula_exact_vgg(pair_half):
    check_formula(*pair_half, init_network(ARCH, 1), 0.5)


def test_buffers_are_not_interpolated(pair_half):
    teacher, fresh, target = copy.deepcopy(pair_half[0]), copy.deepcopy(pair_half[1]), DistillationNetwork(**ARCH)
    for net, (m, v) in ((teacher, (3.0, 5.0)), (fresh, (-2.0, 9.0))):
        for bn in norm_layers(net):
            bn.running_mean.fill_(m)
            bn.running_var.fill_(v)
            bn.num_batches_tracked.fill_(11)
    interpolate_parameters(teacher, fresh, target, 0.5)
    bns = norm_layers(target)
    assert len(bns) == 8
    for bn in bns:
        assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
        assert bn.num_batches_tracked.item() == 0
    # the parameters were written (as the formula says)
    pt, pf = params(teacher), params(fresh)
    for k, p in target.named_parameters():
        expected = (0.5 * pt[k].double() + 0.5 * pf[k].double()) / math.sqrt(0.5)
        assert torch.equal(p, expected.float()), k


def test_student_has_default_buffers_and_teacher_is_frozen(pair_half):
    teacher, student = pair_half
    for net in (teacher, student):
        bns = norm_layers(net)
        assert len(bns) == 8
        for bn in bns:
            assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
            assert bn.num_batches_tracked.item() == 0
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules())
    assert all(p.requires_grad for p in student.parameters())
    assert all(m.training for m in student.modules())


@pytest.mark.parametrize("alpha", [-0.1, 1.0001, 2.0, float("nan"), float("inf")])
def test_alpha_out_of_range(alpha):
    with pytest.raises(ValueError):
        make_teacher_student(ARCH, 0, 1, alpha)


# ---------------------------------------------------------------------------------------------- Hub I/O
def test_save_load_round_trip_and_build_teacher(tmp_path, pair_half):
    teacher, student = pair_half[0], copy.deepcopy(pair_half[1])
    rebuilt = student.build_teacher()  # before any change to the student
    pt, pr = params(teacher), params(rebuilt)
    assert pt.keys() == pr.keys() and all(torch.equal(pt[k], pr[k]) for k in pt)
    assert not any(m.training for m in rebuilt.modules())
    assert all(not p.requires_grad for p in rebuilt.parameters())
    del rebuilt
    student.train()
    with torch.no_grad():  # a train-mode pass so the BN buffers are no longer at their defaults
        student(torch.randn(4, 3, 32, 32))
    assert not torch.all(norm_layers(student)[0].running_mean == 0)
    student.save_pretrained(tmp_path / "student")
    loaded = DistillationNetwork.from_pretrained(tmp_path / "student", strict=True)
    assert loaded.config() == student.config()
    sa, sb = student.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(3, 3, 32, 32)
    student.eval(), loaded.eval()
    with torch.no_grad():
        (la, ea), (lb, eb) = student(x, return_embedding=True), loaded(x, return_embedding=True)
    assert torch.equal(la, lb) and torch.equal(ea, eb)
    assert loaded.seeds == dict(teacher_seed=0, student_seed=1, alpha=0.5)  # so build_teacher() works after loading
    with pytest.raises(ValueError):
        init_network(SMALL, 0).build_teacher()
