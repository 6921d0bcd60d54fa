"""Landscapes (landscape.py, utils/landscape.py): the plane's coordinates in both systems, an orthonormal basis
that keeps distances, a grid that is not transposed, KL exactly 0 at the teacher, the loss at the student equal
to the training code's, a 2-process grid equal to the 1-process one, a SIGTERM-interrupted grid resumed without
recomputing finished chunks, and one-line errors for bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import landscape
from supervised_helpers import TINY_ARCH
from test_hardening import assert_one_line_error
from utils.landscape import (CollinearPoints, Plane, bn_statistics, chunk_path, grid_array, grid_axes, norm_on_mesh,
                             work_list)
from utils.models import make_teacher_student

ROOT = Path(__file__).resolve().parents[1]
# 64 train / 32 test images at batch 32: two BN batches per split, so batch statistics are exercised.
EVAL = ["--train-images", "64", "--test-images", "32", "--batch-size", "32", "--probe-epochs", "2", "--knn-k", "5"]
# x nodes -1, -0.5, 0, 0.5, 1 and y nodes 0, 0.5, 1: a non-square grid holding the three points as nodes.
GRID = ["--x-range", "-1", "1", "--y-range", "0", "1", "--resolution", "5", "3", "--chunk-size", "4"]


@pytest.fixture(scope="module")
def students(tmp_path_factory) -> dict:
    """save_pretrained students of one teacher (seed 0): alpha 0.5 and alpha 1 (another student seed)."""
    tmp = tmp_path_factory.mktemp("students")
    folders = {}
    for name, seed, alpha in (("a05", 1, 0.5), ("a1", 2, 1.0), ("a0", 1, 1e-10)):
        _, student = make_teacher_student(TINY_ARCH, teacher_seed=0, student_seed=seed, alpha=alpha)
        student.save_pretrained(tmp / name)
        folders[name] = tmp / name
    _, other = make_teacher_student({**TINY_ARCH, "model": "vgg11"}, teacher_seed=0, student_seed=1, alpha=0.5)
    other.save_pretrained(tmp / "vgg")
    folders["vgg"] = tmp / "vgg"
    return folders


def points(students, sel=("a05:teacher", "a05:student", "a1:student")):
    out = []
    for s in sel:
        name, _, selector = s.partition(":")
        out.append(f"{students[name]}:{selector}" if selector else str(students[name]))
    return out


def run(students, dataset, out, *extra, sel=("a05:teacher", "a05:student", "a1:student")):
    code = landscape.main(["--points", *points(students, sel), "--dataset", str(dataset), "--output-dir", str(out),
                           *EVAL, *extra])
    assert code == 0
    return pd.read_csv(out / "landscape.csv")


@pytest.fixture(scope="module")
def grid(students, tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "land"
    return run(students, tiny_dataset, out, *GRID), out


# ------------------------------------------------------------------------------------------- geometry
def three_vectors(d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d, generator=g, dtype=torch.float64) * s + 3.0 for s in (1.0, 2.0, 0.5)]


@pytest.mark.parametrize("coords", ["affine", "ortho"])
def test_points_land_at_their_coordinates_and_norm_contours_are_exact(coords):
    vectors = three_vectors()
    plane = Plane(vectors, coords)
    for v, c in zip(vectors, plane.points):
        torch.testing.assert_close(plane.at(c), v, rtol=1e-12, atol=1e-12)
    if coords == "affine":
        assert plane.points.tolist() == [[0, 0], [1, 0], [0, 1]]
    c = torch.tensor([[0.3, -0.7], [1.9, 0.4], [-2.0, 2.5]], dtype=torch.float64)
    mesh = norm_on_mesh(plane.norm_form(), c[:, 0], c[:, 1])  # [y, x]
    for i, x in enumerate(c[:, 0]):
        for j, y in enumerate(c[:, 1]):
            assert mesh[j, i].item() == pytest.approx(plane.at([x, y]).norm().item(), rel=1e-10)


def test_orthonormal_basis_keeps_distances_and_its_origin_is_the_point_closest_to_zero():
    vectors = three_vectors()
    plane = Plane(vectors, "ortho")
    torch.testing.assert_close(plane.basis.T @ plane.basis, torch.eye(2, dtype=torch.float64), atol=1e-12, rtol=0)
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert (plane.points[i] - plane.points[j]).norm().item() == pytest.approx(
            (vectors[i] - vectors[j]).norm().item(), rel=1e-12)
    assert (plane.basis.T @ plane.origin).abs().max().item() < 1e-10  # 0 projects to (0, 0)
    assert plane.at([0, 0]).norm() < min(v.norm() for v in vectors)
    assert plane.points[1, 0] > plane.points[0, 0] and plane.points[1, 1].item() == pytest.approx(plane.points[0, 1].item())
    assert plane.points[2, 1] > plane.points[0, 1]  # y towards the third point


def test_collinear_or_coinciding_points_span_no_plane():
    v0, v1, _ = three_vectors()
    for third in (v0, v1, v0 + 2.5 * (v1 - v0)):
        for coords in ("affine", "ortho"):
            with pytest.raises(CollinearPoints):
                Plane([v0, v1, third], coords)


def test_near_coinciding_points_span_no_plane_but_close_distinct_ones_do():
    v0, v1, v2 = three_vectors()
    step = torch.randn(len(v0), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    near = v0 + 1e-10 * v0.norm() * step / step.norm()  # an alpha = 1e-10 init next to its teacher
    for coords in ("affine", "ortho"):
        for vectors, pair in (([v0, near, v2], "1 and 2"), ([v2, v0, near], "2 and 3")):
            with pytest.raises(CollinearPoints, match=f"points {pair} are {1e-10 * v0.norm().item():.2g} apart"):
                Plane(vectors, coords)
        Plane([v0, v0 + 1e-4 * v0.norm() * step / step.norm(), v2], coords)  # alpha = 1e-4: a real plane


def test_fitted_affine_axes_hold_the_points_as_nodes_and_zoom_centres_on_a_point():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    for n in (5, 11, 21, 22):
        xs, ys = grid_axes(pts, (n, n), 0.25, affine=True)
        assert 0.0 in xs and 1.0 in xs and xs[0] < 0 and xs[-1] > 1
    xs, ys = grid_axes(pts, (11, 7), 0.25, affine=True, zoom=4, zoom_on=1)
    assert len(xs) == 11 and len(ys) == 7
    assert (xs[0] + xs[-1]) / 2 == pytest.approx(1.0) and (ys[0] + ys[-1]) / 2 == pytest.approx(0.0)
    assert xs[-1] - xs[0] == pytest.approx(1.5 / 4)
    xs, _ = grid_axes(pts, (4, 4), 0.25, affine=False, x_range=(-0.3, 0.7))
    assert xs[0] == -0.3 and xs[-1] == 0.7
    far = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.5, 40.0]], dtype=torch.float64)  # ortho: a tall, thin triangle
    xs, ys = grid_axes(far, (5, 9), 0.25, affine=False)
    assert xs[-1] - xs[0] == pytest.approx(ys[-1] - ys[0]) == pytest.approx(60.0)  # square window: true geometry
    assert (xs[0] + xs[-1]) / 2 == pytest.approx(1.5) and (ys[0] + ys[-1]) / 2 == pytest.approx(20.0)


def test_grid_array_rows_are_y_and_columns_are_x():
    xs, ys = [0.0, 1.0, 2.0], [10.0, 20.0]
    work = work_list(["a", "b", "c"], torch.zeros(3, 2), xs, ys)
    rows = [{**w, "metric": "m", "value": 100 * w["ix"] + w["iy"]} for w in work if w["kind"] == "grid"]
    z = grid_array(pd.DataFrame(rows), "m", len(xs), len(ys))
    assert z.shape == (2, 3) and z[1, 2] == 201 and z[0, 2] == 200 and z[1, 0] == 1


def test_batch_statistics_leave_the_buffers_and_modes_alone():
    _, net = make_teacher_student(TINY_ARCH, 0, 1, 0.5)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad(), bn_statistics(net, batch=True):
        batch_out = net.encoder(x)
    with torch.no_grad(), bn_statistics(net, batch=False):
        eval_out = net.encoder(x)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.training and not torch.allclose(batch_out, eval_out)


# ------------------------------------------------------------------------------------------- the script
def test_grid_is_not_transposed_and_each_points_cell_holds_its_own_metrics(grid):
    table, out = grid
    assert set(table[table.kind == "grid"].ix) == set(range(5)) and set(table[table.kind == "grid"].iy) == set(range(3))
    metrics = sorted(table.metric.unique())
    assert {"train/ce", "train/kl", "test/ce", "test/kl", "linear/test", "knn/test", "norm"} <= set(metrics)
    for k, (ix, iy) in enumerate(((2, 0), (4, 0), (2, 2))):  # (0,0), (1,0), (0,1) on x -1..1 by 0.5, y 0..1 by 0.5
        anchor = table[(table.kind == "point") & (table.point == k)].set_index("metric").value
        for metric in metrics:
            z = grid_array(table, metric, 5, 3)
            assert z[iy, ix].item() == pytest.approx(anchor[metric], rel=1e-6, abs=1e-9), (k, metric)
    z = grid_array(table, "train/kl", 5, 3)
    assert float(z[0, 4]) != pytest.approx(float(z[2, 2]), rel=1e-3)  # the two students differ, so a transpose would show
    assert (out / "landscape.png").stat().st_size > 10_000 and (out / "landscape.json").exists()


def test_kl_is_exactly_zero_at_the_teacher_and_positive_elsewhere(grid):
    table, _ = grid
    at_teacher = table[((table.kind == "point") & (table.point == 0)) | ((table.ix == 2) & (table.iy == 0))]
    kl = at_teacher[at_teacher.metric.str.endswith("/kl")]
    assert len(kl) == 4 and (kl.value == 0.0).all()
    others = table[(table.kind == "grid") & table.metric.str.endswith("/kl") & ~((table.ix == 2) & (table.iy == 0))]
    assert (others.value > 0).all()


@pytest.mark.parametrize("bn", ["eval", "recompute", "distill"])
def test_the_other_bn_modes_zero_kl_at_the_teacher_only_when_both_networks_share_the_mode(bn, students,
                                                                                          tiny_dataset, tmp_path):
    table = run(students, tiny_dataset, tmp_path / "land", "--bn", bn, "--resolution", "2", "--x-range", "0", "1",
                "--y-range", "0", "1")
    at_teacher = table[((table.kind == "point") & (table.point == 0)) | ((table.ix == 0) & (table.iy == 0))]
    kl = at_teacher[at_teacher.metric.str.endswith("/kl")].value
    assert len(kl) == 4
    if bn == "distill":  # teacher in eval mode, student with batch statistics: the training asymmetry
        assert (kl > 0).all()
    else:
        assert (kl == 0.0).all()


def test_the_encoder_only_plane_moves_the_encoder_and_compares_embeddings(students, tiny_dataset, tmp_path):
    from utils.hub import resolve_student
    from utils.landscape import flat_parameters

    table = run(students, tiny_dataset, tmp_path / "land", "--scope", "encoder", "--resolution", "2", "--x-range",
                "0", "1", "--y-range", "0", "1")
    student = resolve_student(str(students["a05"]))[0]
    norms = table[(table.kind == "point") & (table.metric == "norm")].sort_values("point").value.tolist()
    assert norms[0] == pytest.approx(flat_parameters(student.build_teacher(), "encoder").norm().item(), rel=1e-12)
    assert norms[1] == pytest.approx(flat_parameters(student, "encoder").norm().item(), rel=1e-12)
    dimension = json.loads((tmp_path / "land" / "landscape.json").read_text())["geometry"]["dimension"]
    assert dimension == sum(p.numel() for p in student.encoder.parameters()) < len(flat_parameters(student, "full"))
    kl = table[(table.point == 0) & table.metric.str.endswith("/kl")].value
    assert len(kl) == 2 and (kl == 0.0).all()
    assert (table[(table.point == 1) & table.metric.str.endswith("/kl")].value > 0).all()


def test_loss_at_the_student_equals_the_training_codes_distillation_loss(students, tiny_dataset, tmp_path):
    from accelerate import Accelerator

    from utils.data import Normalizer, load_dataset
    from utils.distill import DistillStep, TeacherTargets
    from utils.hub import resolve_student

    table = run(students, tiny_dataset, tmp_path / "land", "--bn", "distill", "--resolution", "2")
    data = load_dataset(str(tiny_dataset))
    images = data.train.images[torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:64].sort().values]
    normalize = Normalizer(data.mean, data.std, "cpu")
    student = resolve_student(str(students["a05"]))[0].train()
    teacher = student.build_teacher()

    def inputs(idx):
        return normalize(images[idx])

    step = DistillStep(student, torch.optim.SGD(student.parameters(), lr=0.0), Accelerator(cpu=True), inputs,
                       TeacherTargets(teacher, inputs), "ce")
    losses = torch.cat([step(idx, len(idx))[0] for idx in torch.arange(64).split(32)])
    at_student = table[(table.kind == "point") & (table.point == 1) & (table.metric == "train/ce")].value.item()
    assert at_student == pytest.approx(losses.double().mean().item(), rel=1e-6)


def torchrun(nproc: int, students, dataset, out, tmp):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "RANDOM_TEACHERS_CACHE": str(tmp / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "landscape.py", "--points", *points(students), "--dataset", str(dataset), "--output-dir", str(out),
           *EVAL, *GRID]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return pd.read_csv(out / "landscape.csv")


def test_a_grid_split_across_two_processes_equals_the_one_process_grid(students, tiny_dataset, tmp_path):
    one = torchrun(1, students, tiny_dataset, tmp_path / "one", tmp_path)
    two = torchrun(2, students, tiny_dataset, tmp_path / "two", tmp_path)
    pd.testing.assert_frame_equal(one, two)


def test_an_interrupted_grid_resumes_without_recomputing_finished_chunks(grid, students, tiny_dataset, tmp_path):
    args = ["--points", *points(students), "--dataset", str(tiny_dataset), *EVAL, *GRID, "--chunk-size", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "RANDOM_TEACHERS_CACHE": str(tmp_path / "c")}
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "landscape.py", *args, "--output-dir", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not chunk_path(out, 2).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, proc.stderr.read()[-3000:]
    done = {p.name: p.stat().st_mtime_ns for p in (out / "chunks").iterdir()}
    assert 3 <= len(done) < 18 and not (out / "landscape.csv").exists()
    assert landscape.main([*args, "--output-dir", str(out)]) == 0
    assert all((out / "chunks" / name).stat().st_mtime_ns == t for name, t in done.items())  # not recomputed
    assert len(list((out / "chunks").iterdir())) == 18  # 3 points + 15 nodes, one per chunk
    # equal to the uninterrupted grid of the same points (chunked by 4 there: chunking changes no number)
    pd.testing.assert_frame_equal(pd.read_csv(out / "landscape.csv"), grid[0])


# ------------------------------------------------------------------------------------------- bad input
BAD = {
    "different-architectures": (("a05:teacher", "a05:student", "vgg"), [], "--points", "different architectures"),
    "collinear": (("a05:teacher", "a05:teacher", "a1:student"), [], "--points", "collinear"),
    "near-coinciding": (("a0:teacher", "a0:init", "a1:student"), [], "--points", "points 1 and 2 are"),
    "knn-k-above-train-images": (("a05:teacher", "a05:student", "a1:student"), ["--knn-k", "65"], "--knn-k",
                                 "on 64 images"),
    "zero-resolution": (("a05:teacher", "a05:student", "a1:student"), ["--resolution", "0"], "--resolution", ">= 2"),
    "unknown-selector": (("a05:teachr", "a05:student", "a1:student"), [], "--points", "unknown selector"),
    "range": (("a05:teacher", "a05:student", "a1:student"), ["--x-range", "1", "0"], "--x-range", "below"),
    "too-many-images": (("a05:teacher", "a05:student", "a1:student"), ["--test-images", "100000"], "--test-images",
                        "asked for"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_naming_the_flag(case, students, tiny_dataset, tmp_path, capsys):
    sel, extra, flag, words = BAD[case]
    out = tmp_path / "land"
    line = assert_one_line_error(landscape.main, ["--points", *points(students, sel), "--dataset", str(tiny_dataset),
                                                  "--output-dir", str(out), *EVAL, *extra], flag, capsys)
    assert words in line
    assert not out.exists()  # nothing written


def snapshot(folder: Path) -> dict:
    """Every path under `folder`, with each file's bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("change,flag,words", [
    ("student", "--points", "was made from other points (selector:weights hash"),
    (["--bn", "eval"], "--bn", 'was made with "batch", asked "eval"'),
    (["--resolution", "4"], "--resolution", "was made with 5 3, asked 4 4"),
])
def test_another_student_or_other_settings_are_refused_and_change_nothing(change, flag, words, grid, students,
                                                                          tiny_dataset, tmp_path, monkeypatch,
                                                                          capsys):
    _, out = grid
    monkeypatch.setattr(landscape, "load_dataset", lambda *a, **k: pytest.fail("data loaded before the check"))
    before = snapshot(out)
    chosen = points(students)
    if change == "student":  # the third point: another student of the same teacher
        _, other = make_teacher_student(TINY_ARCH, teacher_seed=0, student_seed=3, alpha=1.0)
        other.save_pretrained(tmp_path / "other")
        chosen[2] = str(tmp_path / "other")
    line = assert_one_line_error(landscape.main, ["--points", *chosen, "--dataset", str(tiny_dataset), "--output-dir",
                                                  str(out), *EVAL, *GRID, *([] if change == "student" else change)],
                                 flag, capsys)
    assert line.startswith(f"error: argument {flag}: {out} was made ") and words in line and "--overwrite" in line
    assert snapshot(out) == before


def test_overwrite_replaces_a_landscape_of_other_settings(students, tiny_dataset, tmp_path):
    out = tmp_path / "land"
    small = ["--resolution", "2", "--x-range", "0", "1", "--y-range", "0", "1", "--chunk-size", "7"]
    run(students, tiny_dataset, out, *small)
    old = {p.name: p.read_bytes() for p in (out / "chunks").iterdir()}
    table = run(students, tiny_dataset, out, *small, "--bn", "eval", "--overwrite")
    assert json.loads((out / "fingerprint.json").read_text())["defines"]["--bn"] == "eval"
    assert json.loads((out / "landscape.json").read_text())["settings"]["bn"] == "eval"
    new = {p.name: p.read_bytes() for p in (out / "chunks").iterdir()}
    assert new.keys() == old.keys() and new != old  # every chunk evaluated again, under the new settings
    assert len(table[table.metric == "norm"]) == 4 + 3


def test_the_same_command_twice_evaluates_nothing(grid, students, tiny_dataset, monkeypatch):
    table, out = grid
    chunks = snapshot(out / "chunks")
    monkeypatch.setattr(landscape, "PointEvaluator", lambda *a, **k: pytest.fail("a finished chunk was recomputed"))
    run(students, tiny_dataset, out, *GRID)
    assert snapshot(out / "chunks") == chunks
    pd.testing.assert_frame_equal(pd.read_csv(out / "landscape.csv"), table)


def test_console_table_prints_probes_in_percent_and_kl_in_scientific_notation(grid, capsys):
    table, out = grid
    assert landscape.main(["--report-only", "--output-dir", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert "knn/test (%)" in header and "linear/test (%)" in header and "train/kl" in header
    points = table[table.kind == "point"]
    for line in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        own = points[points.label == cells[header[0]]].set_index("metric").value
        assert cells["knn/test (%)"] == f"{100 * own['knn/test']:.2f}"
        assert cells["train/kl"] == f"{own['train/kl']:.3e}" and "e" in cells["test/kl"]


def test_report_only_redraws_and_pushes_table_settings_and_figure_through_the_single_seam(grid, fake_hub):
    _, out = grid
    (out / "landscape.png").unlink()
    assert landscape.main(["--report-only", "--output-dir", str(out), "--push-to-hub", "me/planes"]) == 0
    assert (out / "landscape.png").exists()
    (commit,) = fake_hub.commits
    assert commit["repo_id"] == "me/planes" and all(p.startswith("landscape/") for p in commit["files"])
    assert {p.split("/", 2)[2] for p in commit["files"]} == {"landscape.csv", "landscape.parquet", "landscape.json",
                                                            "landscape.png"}
