#!/usr/bin/env python
"""Benchmark (b): probe time of this project (cached features) vs a plain per-epoch encoder loop, in one run.

    python benchmarks/bench_probe.py                                   # resnet18, 1000 train / 200 test images
    python benchmarks/bench_probe.py --model vgg11 --n-train 5000 --n-test 1000
    python benchmarks/bench_probe.py --skip-images                     # only the 50k x 512 feature timing

Part 1, images -> accuracies. Both sides probe the same frozen random encoder (eval mode, the encoder of
utils.models.init_network) on the same 32x32 digit canvases with the same protocol (docs/method.md): a linear probe
(Linear(512, C), AdamW lr 1e-3 wd 0.01, batch 256, --epochs epochs) and a k-NN probe (k=20, Euclidean,
majority vote), both scored on the test images.

project   as train_distill.py / probe.py: uint8 images on the device, normalised and gathered by index; features
          extracted ONCE (utils.probing.extract_features, batch 512), then utils.probing.linear_probe and
          utils.probing.knn_predict (chunked matmul + top-k) on the cached feature matrices.
reference a plain loop: torch DataLoaders (num_workers=0) over PIL images with torchvision ToTensor + Normalize;
          every linear-probe epoch re-runs the encoder on each training batch (no_grad) before the linear
          layer's AdamW step; the linear probe is scored with another encoder pass over the test loader; the
          k-NN probe extracts the training features with a further encoder pass and then, per test batch, runs
          the encoder, torch.cdist against all training features, topk(k, largest=False) and a mode vote.
          Encoder passes: (epochs + 1) x n_train + 2 x n_test images, against n_train + n_test for the project.

Part 2, the "probes in seconds" claim: the project's linear probe (10 epochs) and k-NN on a random 50,000 x 512
training feature matrix with 10,000 test features (10 classes), timed on their own, next to a plain
per-test-batch torch.cdist + topk k-NN on the same features.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from common import PILImages, load_avg, sync  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("resnet18", "vgg11"), default="resnet18")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--epochs", type=int, default=10, help="linear-probe epochs (paper: 10)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--repeats", type=int, default=1, help="rounds per side of part 1 (interleaved)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    p.add_argument("--channels-last", action="store_true", help="project side: channels_last encoder and inputs")
    p.add_argument("--bf16", action="store_true", help="project side: bf16 autocast for feature extraction")
    p.add_argument("--feature-train", type=int, default=50_000, help="part 2: training features")
    p.add_argument("--feature-test", type=int, default=10_000, help="part 2: test features")
    p.add_argument("--feature-dim", type=int, default=512, help="part 2: feature dimension")
    p.add_argument("--skip-images", action="store_true", help="skip part 1")
    p.add_argument("--skip-features", action="store_true", help="skip part 2")
    p.add_argument("--skip-plain-knn", action="store_true", help="part 2: skip the plain cdist k-NN timing")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p.parse_args(argv)


def clock(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- the reference
def plain_knn_batch(query, train_feats, train_labels, k, num_classes):
    dist = torch.cdist(query, train_feats)
    idx = dist.topk(k, dim=1, largest=False).indices
    votes = F.one_hot(train_labels[idx], num_classes).sum(1)
    return votes.argmax(1)


def reference_probe(encoder, train, test, mean, std, num_classes, epochs, k, device):
    """The plain per-epoch loop described in the module docstring; returns (linear acc, k-NN acc)."""
    from torchvision import transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    train_ds, test_ds = PILImages(train.images, train.labels, transform), PILImages(test.images, test.labels,
                                                                                   transform)
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=256, shuffle=True)
    encoder.eval()
    probe = nn.Linear(512, num_classes).to(device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(epochs):
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                f = encoder(x)
            loss = F.cross_entropy(probe(f), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test_ds, batch_size=256):
            correct += (probe(encoder(x.to(device))).argmax(1) == y.to(device)).sum().item()
        linear_acc = correct / len(test_ds)
        feats, labels = [], []
        for x, y in torch.utils.data.DataLoader(train_ds, batch_size=256):
            feats.append(encoder(x.to(device)))
            labels.append(y.to(device))
        feats, labels = torch.cat(feats), torch.cat(labels)
        correct = 0
        for x, y in torch.utils.data.DataLoader(test_ds, batch_size=256):
            pred = plain_knn_batch(encoder(x.to(device)), feats, labels, k, num_classes)
            correct += (pred == y.to(device)).sum().item()
    return linear_acc, correct / len(test_ds)


# -------------------------------------------------------------------------------------------- the project
def project_probe(encoder, train, test, mean, std, num_classes, epochs, k, device, channels_last, bf16):
    from utils.data import Normalizer
    from utils.probing import extract_features, knn_predict, linear_probe

    normalize = Normalizer(mean, std, device, channels_last)
    encoder.eval()
    autocast = (lambda: torch.autocast(device.type, torch.bfloat16)) if bf16 else contextlib.nullcontext
    tr_x, te_x = train.images.to(device), test.images.to(device)
    tr_y, te_y = train.labels.to(device), test.labels.to(device)
    f_tr = extract_features(encoder, len(tr_x), lambda i: normalize(tr_x[i]), 512, autocast=autocast)
    f_te = extract_features(encoder, len(te_x), lambda i: normalize(te_x[i]), 512, autocast=autocast)
    linear_acc = linear_probe(f_tr, tr_y, {"test": (f_te, te_y)}, num_classes, seed=0, epochs=epochs)["test"]
    knn_acc = (knn_predict(f_tr, tr_y, f_te, num_classes, k=k) == te_y).float().mean().item()
    return linear_acc, knn_acc


# ------------------------------------------------------------------------------------------------- driver
def part_images(args, device):
    from utils.data import build_digits
    from utils.models import init_network

    train, test = build_digits(n_train=args.n_train, n_test=args.n_test)
    pixels = train.images.double().div(255).transpose(0, 1).reshape(3, -1)
    mean, std = tuple(pixels.mean(1).tolist()), tuple(pixels.std(1, unbiased=False).tolist())
    net = init_network(dict(model=args.model, image_size=32), seed=0)
    ref_encoder = net.encoder.to(device)
    proj_encoder = copy.deepcopy(ref_encoder).to(memory_format=torch.channels_last if args.channels_last
                                                 else torch.preserve_format)
    flags = [f for f in ("channels_last", "bf16") if getattr(args, f)] or ["exact only"]
    print(f"part 1: {args.model} encoder, {args.n_train} train / {args.n_test} test 32x32 digit canvases, "
          f"linear {args.epochs} epochs + k-NN (k={args.k}), device {device}, torch threads {args.threads}, "
          f"project flags: {', '.join(flags)}; load average before: {load_avg()}")
    ref_passes = (args.epochs + 1) * args.n_train + 2 * args.n_test
    print(f"encoder images per probe: reference {ref_passes}, project {args.n_train + args.n_test}")

    def run_ref():
        return reference_probe(ref_encoder, train, test, mean, std, 10, args.epochs, args.k, device)

    def run_proj():
        return project_probe(proj_encoder, train, test, mean, std, 10, args.epochs, args.k, device,
                             args.channels_last, args.bf16)

    # warm up both paths (oneDNN primitive creation, allocator) on a small slice
    small = dict(n_train=64, n_test=32)
    tr_s, te_s = build_digits(**small)
    reference_probe(ref_encoder, tr_s, te_s, mean, std, 10, 1, 5, device)
    project_probe(proj_encoder, tr_s, te_s, mean, std, 10, 1, 5, device, args.channels_last, args.bf16)

    times, accs = {"reference": [], "project": []}, {}
    for r in range(args.repeats):
        order = (("reference", run_ref), ("project", run_proj)) if r % 2 == 0 else \
            (("project", run_proj), ("reference", run_ref))
        for name, fn in order:
            accs[name], t = clock(fn, device)
            times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{'side':<11}{'median s':>10}{'min-max s':>18}{'linear acc':>12}{'k-NN acc':>10}")
    for k in ("reference", "project"):
        print(f"{k:<11}{med[k]:>10.2f}{f'{min(times[k]):.2f}-{max(times[k]):.2f}':>18}{accs[k][0]:>12.4f}"
              f"{accs[k][1]:>10.4f}")
    print(f"\nspeed-up project vs reference: {med['reference'] / med['project']:.1f}x   "
          f"(load average after: {load_avg()})")
    # In a training run the reference (like the official code) probes the student AND the frozen teacher at every
    # probing epoch; the project probes the teacher once per run, so each probing epoch costs it one student probe.
    print(f"per probing epoch of a training run (reference: student + teacher probe; project: student only, the "
          f"teacher once per run): {2 * med['reference'] / med['project']:.1f}x")
    print("(accuracies differ slightly by design: the reference reshuffles every epoch and uses its own probe init;"
          " the equivalence of cached and recomputed features is tested in tests/test_equivalence.py)")


def part_features(args, device):
    from utils.probing import knn_predict, linear_probe

    n, m, d = args.feature_train, args.feature_test, args.feature_dim
    print(f"\npart 2: project probes on cached features, {n} x {d} train, {m} x {d} test, 10 classes, "
          f"device {device}, torch threads {args.threads}; load average before: {load_avg()}")
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(10, d, generator=g) * 0.06  # overlapping classes: accuracies well below 1
    tr_y, te_y = torch.randint(0, 10, (n,), generator=g), torch.randint(0, 10, (m,), generator=g)
    tr_x = (centers[tr_y] + torch.randn(n, d, generator=g)).to(device)
    te_x = (centers[te_y] + torch.randn(m, d, generator=g)).to(device)
    tr_y, te_y = tr_y.to(device), te_y.to(device)
    linear_probe(tr_x[:512], tr_y[:512], {"test": (te_x[:64], te_y[:64])}, 10, epochs=1)  # warm up both
    knn_predict(tr_x[:512], tr_y[:512], te_x[:64], 10, k=args.k)
    plain_knn_batch(te_x[:64], tr_x[:512], tr_y[:512], args.k, 10)
    lin, t_lin = clock(lambda: linear_probe(tr_x, tr_y, {"test": (te_x, te_y)}, 10, epochs=args.epochs), device)
    pred, t_knn = clock(lambda: knn_predict(tr_x, tr_y, te_x, 10, k=args.k), device)
    rows = [("linear probe (AdamW, %d epochs, bs 256)" % args.epochs, t_lin, lin["test"]),
            ("k-NN (chunked matmul + top-k, k=%d)" % args.k, t_knn, (pred == te_y).float().mean().item())]
    if not args.skip_plain_knn:
        def plain():
            correct = 0
            for q, y in zip(te_x.split(256), te_y.split(256)):
                correct += (plain_knn_batch(q, tr_x, tr_y, args.k, 10) == y).sum().item()
            return correct / m
        acc, t_plain = clock(plain, device)
        rows.append(("plain k-NN (cdist per 256 test, top-k)", t_plain, acc))
    print(f"{'probe':<44}{'seconds':>9}{'test acc':>10}")
    for name, t, acc in rows:
        print(f"{name:<44}{t:>9.2f}{acc:>10.4f}")
    print(f"project linear + k-NN: {t_lin + t_knn:.2f} s   (load average after: {load_avg()})")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"bench_probe: torch {torch.__version__}")
    if not args.skip_images:
        part_images(args, device)
    if not args.skip_features:
        part_features(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
