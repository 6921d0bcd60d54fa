"""The distillation objective and the probes (docs/method.md), each against an independent reference."""
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from utils.losses import distill_loss, loss_diagnostics
from utils.probing import extract_features, knn_predict, knn_probe, linear_probe, standardize


def logits(seed, b=6, k=50, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, generator=g) * scale


# ------------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("tt,ts", [(1.0, 1.0), (0.04, 0.1), (2.0, 0.5)])
def test_ce_minus_entropy_is_kl(tt, ts):
    s, t = logits(0), logits(1)
    log_q = F.log_softmax(s.double() / ts, -1)
    log_p = F.log_softmax(t.double() / tt, -1)
    kl_ref = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    h_ref = torch.distributions.Categorical(logits=t.double() / tt).entropy()
    ce = distill_loss(s, t, "ce", teacher_temp=tt, student_temp=ts)
    kl = distill_loss(s, t, "kl", teacher_temp=tt, student_temp=ts)
    assert ce.shape == kl.shape == (6,)
    torch.testing.assert_close(ce.double() - h_ref, kl_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), kl_ref, rtol=1e-5, atol=1e-5)
    assert torch.all(kl >= -1e-6)
    # KL vanishes when the two tempered distributions agree
    assert distill_loss(t * ts / tt, t, "kl", teacher_temp=tt, student_temp=ts).abs().max() < 1e-5


@pytest.mark.parametrize("tt,ts", [(1.0, 1.0), (0.07, 0.2)])
def test_ce_and_kl_have_the_same_gradient(tt, ts):
    t = logits(3)
    grads = []
    for kind in ("ce", "kl"):
        s = logits(2).requires_grad_(True)
        distill_loss(s, t, kind, teacher_temp=tt, student_temp=ts).mean().backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    # and it is (softmax(s/ts) - softmax(t/tt)) / (ts * B)
    expected = (F.softmax(logits(2) / ts, -1) - F.softmax(t / tt, -1)) / (ts * len(t))
    torch.testing.assert_close(grads[0], expected, rtol=1e-4, atol=1e-7)


def test_mse_is_mean_squared_difference():
    s, t = logits(4), logits(5)
    torch.testing.assert_close(distill_loss(s, t, "mse"), F.mse_loss(s, t, reduction="none").mean(-1))
    # temperatures do not apply to mse
    torch.testing.assert_close(distill_loss(s, t, "mse", teacher_temp=0.1, student_temp=3.0),
                               ((s - t) ** 2).sum(-1) / s.shape[-1])


def test_unknown_loss_raises():
    with pytest.raises(ValueError):
        distill_loss(logits(0), logits(1), "hinge")


@pytest.mark.parametrize("tt,ts", [(1.0, 1.0), (0.5, 0.2)])
def test_loss_diagnostics_sums(tt, ts):
    s, t = logits(6, b=9), logits(7, b=9)
    d = loss_diagnostics(s, t, teacher_temp=tt, student_temp=ts)
    torch.testing.assert_close(d["ce"], distill_loss(s, t, "ce", tt, ts).sum())
    torch.testing.assert_close(d["kl"], distill_loss(s, t, "kl", tt, ts).sum(), rtol=1e-5, atol=1e-5)
    h_t = torch.distributions.Categorical(logits=t / tt).entropy().sum()
    h_s = torch.distributions.Categorical(logits=s / ts).entropy().sum()
    torch.testing.assert_close(d["entropy_teacher"], h_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d["entropy_student"], h_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d["ce"] - d["entropy_teacher"], d["kl"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- kNN
def knn_l2_reference(train_x, train_y, test_x, num_classes, k):
    """Exact squared distances in float64, stable sort (ties -> lower train index), vote ties -> smallest label."""
    train_x, test_x = train_x.double(), test_x.double()
    k = min(k, len(train_x))
    preds = []
    for q in test_x:
        d2 = ((train_x - q) ** 2).sum(1)
        nearest = torch.sort(d2, stable=True).indices[:k]
        counts = Counter(train_y[nearest].tolist())
        best = max(counts.values())
        preds.append(min(c for c, n in counts.items() if n == best))
    return torch.tensor(preds)


def integer_data(seed, n_train=80, n_test=60, dim=3, span=2, num_classes=4):
    g = torch.Generator().manual_seed(seed)
    train = torch.randint(-span, span + 1, (n_train, dim), generator=g).float()
    train[n_train // 2:n_train // 2 + 10] = train[:10]  # exact duplicates of earlier points
    train_y = torch.randint(0, num_classes, (n_train,), generator=g)
    test = torch.randint(-span, span + 1, (n_test, dim), generator=g).float()
    test[:5] = train[:5]  # queries sitting on training points
    return train, train_y, test


@pytest.mark.parametrize("k", [1, 2, 4, 5, 7, 20, 200])
@pytest.mark.parametrize("seed", [0, 1])
def test_knn_l2_matches_brute_force_with_ties(k, seed):
    train, train_y, test = integer_data(seed)
    ref = knn_l2_reference(train, train_y, test, 4, k)
    got = knn_predict(train, train_y, test, 4, k=k, chunk=7)
    assert torch.equal(got, ref)
    if 1 < k < len(train):
        # the data really exercises both kinds of tie
        d2 = ((test[:, None, :] - train[None]) ** 2).sum(-1)
        s = d2.sort(1).values
        assert (s[:, k - 1] == s[:, k]).sum() > 5  # equidistant candidates for the last slot
    if k in (2, 4):
        vote_ties = 0
        for q in test:
            nearest = torch.sort(((train - q) ** 2).sum(1), stable=True).indices[:k]
            c = Counter(train_y[nearest].tolist()).most_common()
            vote_ties += len(c) > 1 and c[0][1] == c[1][1]
        assert vote_ties > 3


def test_knn_l2_tie_rules_by_hand():
    # 1-D: four points at distance 1 from the query 0, one at distance 2.
    train = torch.tensor([[1.0], [-1.0], [1.0], [-1.0], [2.0]])
    train_y = torch.tensor([3, 2, 1, 0, 0])
    q = torch.tensor([[0.0]])
    # k=2: train indices 0 and 1 (lower index wins among the four tied), labels 3 and 2 -> vote tie -> 2
    assert knn_predict(train, train_y, q, 4, k=2).item() == 2
    # k=3: indices 0, 1, 2 -> labels 3, 2, 1, a three-way tie -> 1
    assert knn_predict(train, train_y, q, 4, k=3).item() == 1
    # k=5: everything -> label 0 has two votes
    assert knn_predict(train, train_y, q, 4, k=5).item() == 0


def test_knn_l2_translation_invariant():
    # Euclidean neighbours do not change when every feature shares a large offset (as post-ReLU features do).
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(400, 32, generator=g), torch.randn(100, 32, generator=g)
    train_y = torch.randint(0, 5, (400,), generator=g)
    ref = knn_l2_reference(train, train_y, test, 5, 5)
    assert torch.equal(knn_predict(train, train_y, test, 5, k=5), ref)
    train, test = train + 1000.0, test + 1000.0  # rounded in float32: the reference sees the same numbers
    ref = knn_l2_reference(train, train_y, test, 5, 5)
    assert torch.equal(knn_predict(train, train_y, test, 5, k=5), ref)


def test_knn_cosine_matches_weighted_vote_reference():
    g = torch.Generator().manual_seed(1)
    num_classes, k, temp = 6, 10, 0.07
    train, test = torch.randn(300, 16, generator=g), torch.randn(50, 16, generator=g)
    train_y = torch.randint(0, num_classes, (300,), generator=g)
    tn = train / train.norm(dim=1, keepdim=True)
    ref = []
    for q in test:
        sim = (tn.double() @ (q / q.norm()).double())
        order = torch.argsort(sim, descending=True)[:k]
        votes = [0.0] * num_classes
        for i in order.tolist():
            votes[train_y[i]] += torch.exp(sim[i] / temp).item()
        ref.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    got = knn_predict(train * 5.0, train_y, test * 0.1, num_classes, k=k, metric="cosine", temperature=temp,
                      chunk=16)
    assert torch.equal(got, torch.tensor(ref))
    # weighting matters: this data has queries where the weighted and unweighted votes disagree
    unweighted = []
    for q in test:
        order = torch.argsort(tn @ (q / q.norm()), descending=True)[:k]
        counts = Counter(train_y[order].tolist())
        best = max(counts.values())
        unweighted.append(min(c for c, n in counts.items() if n == best))
    assert (torch.tensor(unweighted) != got).any()


def test_knn_unknown_metric_raises():
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    with pytest.raises(ValueError):
        knn_predict(x, y, x, 2, k=3, metric="cosinee")


def test_knn_probe_accuracy_on_training_points():
    train, train_y, _ = integer_data(2, n_train=60)
    uniq, inv = torch.unique(train, dim=0, return_inverse=True)
    # k=1 on the training points themselves: each point's nearest (lowest-index) copy decides
    first = {}
    for i, u in enumerate(inv.tolist()):
        first.setdefault(u, train_y[i].item())
    expected = sum(first[u] == train_y[i].item() for i, u in enumerate(inv.tolist())) / len(train)
    acc = knn_probe(train, train_y, {"train": (train, train_y)}, 4, k=1)["train"]
    assert acc == pytest.approx(expected)


# ----------------------------------------------------------------------------------------- linear probe
def blobs(seed, n_per_class, num_classes=5, dim=64):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(100)) * 2.0
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = means[y] + torch.randn(len(y), dim, generator=g)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def test_linear_probe_separable_and_deterministic():
    train_x, train_y = blobs(0, 300)
    test_x, test_y = blobs(1, 100)
    evals = {"test": (test_x, test_y), "train": (train_x, train_y)}
    a = linear_probe(train_x, train_y, evals, 5, seed=3)
    b = linear_probe(train_x, train_y, evals, 5, seed=3)
    assert a == b
    assert a["test"] > 0.95 and a["train"] > 0.95
    # nothing is learned from shuffled labels
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(9))]
    c = linear_probe(train_x, shuffled, {"test": (test_x, test_y)}, 5, seed=3)
    assert c["test"] < 0.6


def test_linear_probe_seed_matters():
    # a hard problem (overlapping blobs, 1 epoch): the probe's init and batch order change its errors
    train_x, train_y = blobs(0, 100)
    train_x = train_x * 0.05 + torch.randn_like(train_x)
    test_x, test_y = blobs(1, 200)
    test_x = test_x * 0.05 + torch.randn_like(test_x)
    res = {linear_probe(train_x, train_y, {"t": (test_x, test_y)}, 5, seed=s, epochs=1)["t"] for s in range(4)}
    assert len(res) > 1


# ------------------------------------------------------------------------------------------ standardize
def test_standardize():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(500, 6, generator=g) * torch.tensor([1.0, 5.0, 0.01, 100.0, 1.0, 1.0]) + 3.0
    train[:, 4] = 7.77  # a constant feature
    train[:, 5] = 1000.3  # another, large
    val, test = torch.randn(40, 6, generator=g), torch.randn(30, 6, generator=g) * 4
    s_train, s_val, s_test = standardize(train, val, test)
    torch.testing.assert_close(s_train[:, :4].mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(s_train[:, :4].std(0, unbiased=True), torch.ones(4), atol=1e-5, rtol=0)
    assert torch.all(s_train[:, 4:] == 0)  # constant -> exactly 0
    mean, std = train.double().mean(0), train.double().std(0)
    std[4:] = 1.0  # the constant features keep their scale
    for raw, out in ((val, s_val), (test, s_test)):
        torch.testing.assert_close(out.double(), (raw.double() - mean) / std, rtol=1e-4, atol=1e-3)
    assert s_test.shape == test.shape and s_val.shape == val.shape


# --------------------------------------------------------------------------------------- extract_features
@pytest.mark.parametrize("n,batch", [(10, 3), (7, 7), (5, 8), (13, 4)])
def test_extract_features_in_order(n, batch):
    data = torch.randn(20, 4, dtype=torch.float64)
    seen = []

    def inputs(idx):
        seen.append(idx.clone())
        return data[idx]

    def fn(x):
        return torch.cat([x.sin(), x.sum(1, keepdim=True)], 1)  # float64 in, float64 out

    feats = extract_features(fn, n, inputs, batch_size=batch)
    assert feats.dtype == torch.float32 and feats.shape == (n, 5)
    torch.testing.assert_close(feats, fn(data[:n]).float())
    assert torch.equal(torch.cat(seen), torch.arange(n))
    assert max(len(i) for i in seen) <= batch and len(seen) == -(-n // batch)


def test_landscape_kl_is_precise_near_zero_where_the_direct_float32_form_is_not():
    import torch.nn.functional as F

    from utils.losses import distill_loss, kl_and_ce

    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(64, 4096, generator=g)
    for scale in (1e-4, 1e-2, 1.0):
        student = teacher + scale * torch.randn(64, 4096, generator=g)
        log_q, log_p = F.log_softmax(student.double(), -1), F.log_softmax(teacher.double(), -1)
        exact_kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        kl, ce = kl_and_ce(student, teacher)
        torch.testing.assert_close(kl, exact_kl, rtol=2e-2, atol=1e-10)
        torch.testing.assert_close(ce, distill_loss(student, teacher, "ce").double(), rtol=1e-5, atol=1e-5)
        if scale == 1e-4:  # KL ~ 5e-9: below the direct float32 form's round-off floor (~1e-6 for this K)
            assert (distill_loss(student, teacher, "kl").double() - exact_kl).abs().max() > 20 * exact_kl.max()
    assert kl_and_ce(teacher, teacher)[0].abs().max() == 0  # exactly 0 at the teacher
    big = kl_and_ce(teacher * 200, teacher)[0]  # far from the teacher: no overflow
    assert torch.isfinite(big).all() and (big > 0).all()
