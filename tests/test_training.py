"""train_distill.main in-process (docs/method.md): frozen eval-mode teacher, exact teacher caching, the run folder,
skipping finished runs, --val-size / --train-subset / --input-noise, and fused vs plain AdamW."""
import copy
import json
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import train_distill
from conftest import TINY_RUN
from utils.losses import distill_loss
from utils.models import init_network, make_teacher_student

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUBJECTS, PROBES = ("student", "teacher", "input"), ("linear", "knn")
TRAIN_ROWS = ("train/ce", "train/kl", "train/param_distance", "train/embedding_norm", "train/grad_norm",
              "train/adam_step_norm", "train/eps_damped")


def run(dataset, out, *extra) -> None:
    assert train_distill.main(TINY_RUN + ["--dataset", str(dataset), "--output-dir", str(out), *map(str, extra)]) == 0


def metrics(out) -> pd.DataFrame:
    return pd.read_csv(out / "metrics.csv")


def student_weights(out) -> dict:
    return load_file(str(out / "student" / "model.safetensors"))


# ------------------------------------------------------------------------------- 1. the teacher stays frozen
class TeacherSpy:
    """Wraps make_teacher_student: keeps the teacher and, through a forward hook on every one of its modules,
    records for every call the module's training flag and whether its tensor output carries autograd history.
    (Hooking every module, not just `teacher`, matters: with the cache a step calls only `teacher.head.last`.)"""

    def __init__(self, monkeypatch):
        self.real = train_distill.make_teacher_student
        self.calls = []  # (module name, training, output requires grad)
        monkeypatch.setattr(train_distill, "make_teacher_student", self)

    def __call__(self, arch, teacher_seed, student_seed, alpha):
        teacher, student = self.real(arch, teacher_seed, student_seed, alpha)
        self.teacher, self.arch, self.teacher_seed = teacher, copy.deepcopy(arch), teacher_seed
        self.student_init = {k: v.clone() for k, v in student.state_dict().items()}
        for name, module in teacher.named_modules():
            module.register_forward_hook(
                lambda mod, inp, output, name=name: self.calls.append(
                    (name, mod.training, isinstance(output, torch.Tensor) and output.requires_grad)))
        return teacher, student

    def names(self, name):
        return [c for c in self.calls if c[0] == name]


# The default path (cache filled by the teacher-probe pass, probing every epoch) on all 256 images; the other cases
# distil on a 96-image subset (the cache is then filled by its own pass) and probe only before/after, for speed.
SUBSET = ["--train-subset", "96", "--batch-size", "32", "--probe-every", "0"]


@pytest.mark.parametrize("norm,cache,extra", [("none", True, []), ("none", False, SUBSET), ("batch", True, SUBSET),
                                              ("batch", False, SUBSET)],
                         ids=["vgg-cache", "vgg-nocache", "vggbn-cache", "vggbn-nocache"])
def test_teacher_is_frozen_in_eval_mode_and_never_changes(norm, cache, extra, tiny_dataset, tmp_path, monkeypatch):
    spy = TeacherSpy(monkeypatch)
    out = tmp_path / "run"
    epochs = 3
    run(tiny_dataset, out, "--epochs", epochs, "--norm", norm, *extra, *([] if cache else ["--no-teacher-cache"]))
    config = json.loads((out / "config.json").read_text())
    steps = config["steps"]
    assert steps == epochs * math.ceil(config["train_images"] / config["batch_size"]) >= 9

    # Every step asks the teacher for targets: with the cache only its last layer runs, without it the whole net.
    assert len(spy.names("head.last")) >= steps
    whole = spy.names("")
    assert len(whole) >= steps if not cache else len(whole) < steps  # with the cache: never per step
    bad = [c for c in spy.calls if c[1]]
    assert not bad, f"teacher modules ran in train mode: {sorted({c[0] for c in bad})}"
    assert not [c for c in spy.calls if c[2]], "a teacher output carried autograd history"
    assert not spy.teacher.training

    params = list(spy.teacher.parameters())
    assert params and all(p.grad is None and not p.requires_grad for p in params)
    # Bit-identical to a fresh teacher from its seed: parameters AND buffers (BN running stats and counters).
    fresh = init_network(spy.arch, spy.teacher_seed).state_dict()
    got = spy.teacher.state_dict()
    assert got.keys() == fresh.keys()
    for k in fresh:
        assert torch.equal(got[k].cpu(), fresh[k]), f"teacher tensor {k} changed"
    bns = [m for m in spy.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bool(bns) == (norm == "batch")
    for bn in bns:
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        assert int(bn.num_batches_tracked) == 0

    # ... while the student did train (and, with BN, its running statistics moved).
    final = student_weights(out)
    changed = [k for k, v in final.items() if not torch.equal(v, spy.student_init[k])]
    assert any(k.endswith("weight") and k.startswith("encoder") for k in changed)
    assert any(k.startswith("head.") for k in changed)
    if norm == "batch":
        assert any(k.endswith("running_mean") for k in changed)


# --------------------------------------------------------------------------------- 2. teacher caching is exact
@pytest.mark.parametrize("extra", [[], ["--train-subset", "64", "--batch-size", "32", "--input-noise"]],
                         ids=["shared-teacher-pass", "subset-noise"])
def test_teacher_cache_is_exact(extra, tiny_dataset, tmp_path):
    # alpha = 0.5, not the default 1e-10: near alpha = 0 the student is the teacher up to round-off, so the first
    # gradients are round-off sized and Adam (which normalises by their magnitude) turns round-off differences
    # between the cached and uncached targets into full-size steps of random sign. At alpha = 0.5 the gradients
    # are genuine and any difference left is plain float round-off.
    args = ["--alpha", "0.5", "--epochs", "2", "--log-every", "1", "--probe-every", "0", *extra]
    run(tiny_dataset, tmp_path / "cache", *args)
    run(tiny_dataset, tmp_path / "nocache", *args, "--no-teacher-cache")
    a, b = metrics(tmp_path / "cache"), metrics(tmp_path / "nocache")
    assert json.loads((tmp_path / "cache" / "config.json").read_text())["teacher_cache"] is True
    assert json.loads((tmp_path / "nocache" / "config.json").read_text())["teacher_cache"] is False
    train = lambda df: df[df.metric.str.startswith("train/")].set_index(["epoch", "step", "metric"]).value.sort_index()  # noqa: E731
    ta, tb = train(a), train(b)
    assert list(ta.index) == list(tb.index)
    steps = json.loads((tmp_path / "cache" / "config.json").read_text())["steps"]
    assert (ta.xs("train/ce", level="metric").index.get_level_values("step") == range(1, steps + 1)).all()
    torch.testing.assert_close(torch.tensor(ta.values), torch.tensor(tb.values), rtol=1e-5, atol=1e-6)
    wa, wb = student_weights(tmp_path / "cache"), student_weights(tmp_path / "nocache")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


# ------------------------------------------------------------------------------------------ 3. the run folder
@pytest.fixture(scope="module")
def default_run(tiny_dataset, tmp_path_factory):
    """One TINY_RUN (2 epochs x 4 steps, probing every epoch) shared by the run-folder tests below."""
    tmp = tmp_path_factory.mktemp("default_run")
    with pytest.MonkeyPatch.context() as mp:  # module scope: conftest's per-test cache isolation is not active yet
        mp.setenv("RANDOM_TEACHERS_CACHE", str(tmp / "cache"))
        run(tiny_dataset, tmp / "run")
    return tmp / "run"


def test_run_folder_contents(default_run):
    out = default_run
    for f in ("config.json", "metrics.csv", "summary.json", "probe_table.csv", "probe_accuracy.png",
              "student/model.safetensors", "student/config.json"):
        assert (out / f).is_file(), f
    assert not list(out.glob("**/.*.tmp")), "temporary files left behind"
    assert (out / "probe_accuracy.png").read_bytes()[:8] == PNG_MAGIC

    config = json.loads((out / "config.json").read_text())
    assert config["train_images"] == 256 and config["steps_per_epoch"] == 4 and config["steps"] == 8
    assert config["world_size"] == 1 and config["teacher_cache"] is True and config["epochs"] == 2

    df = metrics(out)
    assert list(df.columns) == ["epoch", "step", "metric", "value"]
    names = set(df.metric)
    for subject in SUBJECTS:
        for probe in PROBES:
            assert f"{subject}/{probe}/test" in names
    assert not any(m.endswith("/val") for m in names)
    for m in TRAIN_ROWS:
        rows = df[df.metric == m]
        assert list(rows.step) == [2, 4, 6, 8], m  # --log-every 2, and the last step of every epoch
        assert list(rows.epoch) == [1, 1, 2, 2], m
        assert rows.value.map(math.isfinite).all(), m
    # student probed before training and after every epoch (at the epoch's last step); teacher/input once, at 0
    student = df[df.metric == "student/linear/test"]
    assert list(zip(student.epoch, student.step)) == [(0, 0), (1, 4), (2, 8)]
    for subject in ("teacher", "input"):
        assert list(df[df.metric == f"{subject}/knn/test"].epoch) == [0]
    assert df[df.metric.str.contains("/test")].value.between(0, 1).all()
    # alpha = 1e-10: before training the student is the teacher, so its probes match the teacher's
    for probe in PROBES:
        at0 = df[df.epoch == 0].set_index("metric").value
        assert at0[f"student/{probe}/test"] == pytest.approx(at0[f"teacher/{probe}/test"], abs=1e-6)

    # the saved student has exactly the architecture's tensors, and its config rebuilds it
    weights = student_weights(out)
    student_cfg = json.loads((out / "student" / "config.json").read_text())
    arch = {k: student_cfg[k] for k in ("model", "width", "norm", "image_size", "hidden_dims", "bottleneck_dim",
                                        "out_dim", "bottleneck")}
    ref = init_network(arch, 0).state_dict()
    assert weights.keys() == ref.keys()
    assert all(weights[k].shape == ref[k].shape for k in ref)
    assert student_cfg["teacher_seed"] == 0 and student_cfg["alpha"] == pytest.approx(1e-10)
    assert config["architecture"]["out_dim"] == student_cfg["out_dim"] == 64


def test_summary_best_and_final_match_metrics(default_run):
    df = metrics(default_run)
    summary = json.loads((default_run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["epochs"] == 2
    probes = summary["probes"]
    for subject in SUBJECTS:
        for probe in PROBES:
            rows = df[df.metric == f"{subject}/{probe}/test"].sort_values("epoch")
            entry = probes[subject][probe]
            assert entry["final"] == pytest.approx(rows.value.iloc[-1])
            if subject == "student":
                after = rows[rows.epoch > 0]  # best = max over epochs after init (the paper's number)
                assert entry["best"] == pytest.approx(after.value.max())
                assert entry["init"] == pytest.approx(rows.value.iloc[0])
                assert entry["best_epoch"] > 0
                assert after[after.epoch == entry["best_epoch"]].value.iloc[0] == pytest.approx(entry["best"])
            else:
                assert len(rows) == 1 and entry["best"] == pytest.approx(rows.value.iloc[0])
            assert "test_at_best_val" not in entry

    table = pd.read_csv(default_run / "probe_table.csv").set_index("subject")
    assert set(table.index) == set(SUBJECTS)
    for subject in SUBJECTS:
        for probe in PROBES:
            for kind in ("best", "final"):
                assert table.loc[subject, f"{probe} {kind}"] == pytest.approx(100 * probes[subject][probe][kind])


def test_finished_run_is_skipped_without_overwrite(default_run, tiny_dataset, capsys):
    files = [p for p in default_run.rglob("*") if p.is_file()]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    run(tiny_dataset, default_run)  # same arguments, no --overwrite
    assert "already holds a finished run" in capsys.readouterr().out
    assert sorted(p for p in default_run.rglob("*") if p.is_file()) == sorted(files)
    for p, (mtime, content) in before.items():
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == content, f"{p.name} was rewritten"


def test_val_size_and_train_subset(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    # 64 held out (192 left for probe training), then a class-balanced 64 of those distilled on, batch 48: two
    # steps per epoch, the second one a partial batch of 16.
    run(tiny_dataset, out, "--val-size", "64", "--train-subset", "64", "--batch-size", "48", "--epochs", "3")
    config = json.loads((out / "config.json").read_text())
    assert config["train_images"] == 64
    assert config["steps_per_epoch"] == 2 and config["steps"] == 3 * math.ceil(64 / 48)
    df = metrics(out)
    assert df[df.metric == "train/ce"].step.max() == config["steps"]
    for subject in SUBJECTS:
        for probe in PROBES:
            assert f"{subject}/{probe}/val" in set(df.metric)
    summary = json.loads((out / "summary.json").read_text())["probes"]
    for probe in PROBES:
        entry = summary["student"][probe]
        val = df[(df.metric == f"student/{probe}/val") & (df.epoch > 0)]
        test = df[df.metric == f"student/{probe}/test"].set_index("epoch").value
        assert entry["val_selected_epoch"] > 0
        assert val[val.epoch == entry["val_selected_epoch"]].value.iloc[0] == pytest.approx(val.value.max())
        assert entry["test_at_best_val"] == pytest.approx(test[entry["val_selected_epoch"]])
        assert "test_at_best_val" in summary["teacher"][probe]
    table = pd.read_csv(out / "probe_table.csv")
    assert "linear @val" in table.columns


def test_input_noise_runs(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    run(tiny_dataset, out, "--input-noise", "--train-subset", "64", "--batch-size", "32", "--epochs", "1",
        "--log-every", "1")
    config = json.loads((out / "config.json").read_text())
    assert config["input_noise"] is True and config["train_images"] == 64 and config["steps"] == 2
    df = metrics(out)
    assert df[df.metric.str.startswith("train/")].value.map(math.isfinite).all()
    assert (out / "summary.json").is_file()
    # probing still uses the clean images: teacher rows equal those of a clean run (same data, same teacher)
    clean = tmp_path / "clean"
    run(tiny_dataset, clean, "--train-subset", "64", "--batch-size", "32", "--epochs", "1", "--log-every", "1")
    cdf = metrics(clean)
    for probe in PROBES:
        m = f"teacher/{probe}/test"
        assert df[df.metric == m].value.iloc[0] == pytest.approx(cdf[cdf.metric == m].value.iloc[0])
    # ... while the distillation targets differ: the teacher's entropy on N(0,1) images is not that on digits
    ent = lambda d: d[d.metric == "train/entropy_teacher"].value.to_numpy()  # noqa: E731
    assert not torch.allclose(torch.tensor(ent(df)), torch.tensor(ent(cdf)), rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------- 4. fused AdamW = plain AdamW
def test_fused_adamw_matches_plain_adamw():
    arch = dict(model="flatten", image_size=8, hidden_dims=[32], bottleneck_dim=8, out_dim=16)
    teacher, student = make_teacher_student(arch, 0, 1, 0.5)
    reference = copy.deepcopy(student)
    # non-zero decay in both groups so the grouping (>= 2-dim tensors vs biases) is exercised too
    fused = train_distill.make_optimizer(student, lr=1e-3, weight_decay=0.05, bias_weight_decay=0.01)
    assert all(g["fused"] for g in fused.param_groups), "make_optimizer should build the fused CPU kernel here"
    assert [g["weight_decay"] for g in fused.param_groups] == [0.05, 0.01]
    assert all(p.ndim >= 2 for p in fused.param_groups[0]["params"])
    assert all(p.ndim < 2 for p in fused.param_groups[1]["params"])
    ref_params = list(reference.parameters())
    index = {id(p): i for i, p in enumerate(student.parameters())}
    groups = [{"params": [ref_params[index[id(p)]] for p in g["params"]], "weight_decay": g["weight_decay"]}
              for g in fused.param_groups]
    plain = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, foreach=False, fused=False)
    for g in fused.param_groups:
        assert g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 and g["lr"] == 1e-3

    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        x = torch.randn(32, 3, 8, 8, generator=gen)
        with torch.no_grad():
            target = teacher(x)
        for net, opt in ((student, fused), (reference, plain)):
            distill_loss(net(x), target).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    start = dict(make_teacher_student(arch, 0, 1, 0.5)[1].named_parameters())
    for (name, a), b in zip(student.named_parameters(), reference.parameters()):
        assert not torch.equal(a, start[name])  # both really moved
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
