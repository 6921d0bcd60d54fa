"""Loss and probe landscapes on a plane through three networks (paper §5 and App. D.2).

The plane is theta(c) = origin + basis @ c for c = (x, y), over parameters only (buffers stay fixed), built in
float64. Two coordinate systems:
- affine: origin = v0, basis = [v1 - v0, v2 - v0], so the points sit at (0, 0), (1, 0), (0, 1) (Fig. 6);
- ortho: an orthonormal basis of the same plane (x along v1 - v0, y towards v2) with the origin at the plane's
  point closest to theta = 0, so coordinates are true distances and ||theta|| contours are circles (Figs. 15-18).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
from pathlib import Path

import torch
from torch import nn

from utils.distill import with_constant_weight_norm
from utils.losses import kl_and_ce_to, soft_targets
from utils.lmc import batch_norms, recompute_bn_stats
from utils.probing import probe_features
from utils.results import atomic_path, write_json

COLLINEAR_SIN2 = 1e-12  # sin^2 of the angle at v0 below which three points span no usable plane
# Two points closer than this fraction of their norm coincide as networks: float32 parameters resolve ~6e-8 of
# their size, so the plane's axis between them is round-off (e.g. the teacher and an alpha = 1e-10 student's init).
COINCIDENT_REL = 1e-6


# ------------------------------------------------------------------------------------------- the plane
def scope_parameters(net: nn.Module, scope: str) -> list[nn.Parameter]:
    """The parameters a plane moves, in `named_parameters` order: all of them, or the encoder's only."""
    prefix = "encoder." if scope == "encoder" else ""
    return [p for n, p in net.named_parameters() if n.startswith(prefix)]


def flat_parameters(net: nn.Module, scope: str) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten().cpu() for p in scope_parameters(net, scope)])


class CollinearPoints(ValueError):
    pass


class Plane:
    """The plane through three float64 vectors in `coords` ('affine' or 'ortho'); `points` are their (x, y)."""

    def __init__(self, vectors: list[torch.Tensor], coords: str = "affine"):
        v0, v1, v2 = vs = [v.double() for v in vectors]
        for i, j in ((0, 1), (0, 2), (1, 2)):
            gap, size = float((vs[i] - vs[j]).norm()), max(float(vs[i].norm()), float(vs[j].norm()))
            if gap <= COINCIDENT_REL * size:
                raise CollinearPoints(f"the three points are collinear or two coincide, so they span no plane: "
                                      f"points {i + 1} and {j + 1} are {gap:.2g} apart, under {COINCIDENT_REL:g} of "
                                      f"their norm {size:.3g} (the resolution of float32 networks)")
        basis = torch.stack([v1 - v0, v2 - v0], 1)
        gram = basis.T @ basis
        if (gram.det() / gram.diagonal().prod()).item() < COLLINEAR_SIN2:
            raise CollinearPoints("the three points are collinear (or two coincide), so they span no plane")
        self.coords = coords
        if coords == "affine":
            self.origin, self.basis = v0, basis
            self.points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        elif coords == "ortho":
            q, r = torch.linalg.qr(basis)  # Gram-Schmidt order: the first axis is along v1 - v0
            q = q * torch.sign(r.diagonal())  # and positive towards v1 and v2
            self.origin, self.basis = v0 - q @ (q.T @ v0), q
            self.points = torch.stack([q.T @ v for v in (v0, v1, v2)])  # q.T @ origin is 0
        else:
            raise ValueError(f"unknown coordinates {coords!r}; choose affine or ortho")

    def at(self, c) -> torch.Tensor:
        return self.origin + self.basis @ torch.as_tensor(c, dtype=torch.float64)

    def norm_form(self) -> dict:
        """||theta(c)||^2 = oo + 2 oE.c + c.EE.c: enough to draw exact ||theta|| contours anywhere on the plane."""
        return {"oo": float(self.origin @ self.origin), "oE": (self.origin @ self.basis).tolist(),
                "EE": (self.basis.T @ self.basis).tolist()}

    def geometry(self) -> dict:
        """The points' coordinates, norms and pairwise distances (in parameter space, exact in float64)."""
        vectors = [self.at(p) for p in self.points]
        return {"points": self.points.tolist(), "norms": [float(v.norm()) for v in vectors],
                "distances": {f"{i}-{j}": float((vectors[i] - vectors[j]).norm()) for i, j in ((0, 1), (0, 2), (1, 2))},
                "dimension": len(self.origin), "norm_form": self.norm_form()}


def norm_on_mesh(norm_form: dict, xs, ys) -> torch.Tensor:
    """||theta(x, y)|| on a mesh, as [len(ys), len(xs)] (rows are y: the layout of imshow(origin='lower'))."""
    x, y = torch.meshgrid(torch.as_tensor(xs, dtype=torch.float64), torch.as_tensor(ys, dtype=torch.float64),
                          indexing="xy")
    oe, ee = norm_form["oE"], norm_form["EE"]
    sq = (norm_form["oo"] + 2 * (oe[0] * x + oe[1] * y) + ee[0][0] * x * x + 2 * ee[0][1] * x * y
          + ee[1][1] * y * y)
    return sq.clamp_min(0).sqrt()


# -------------------------------------------------------------------------------------------- the grid
def axis(low: float, high: float, n: int) -> list[float]:
    """n evenly spaced nodes with both ends exact."""
    return [low * (1 - k / (n - 1)) + high * (k / (n - 1)) for k in range(n)]


def unit_axis(n: int, margin: float) -> list[float] | None:
    """n nodes with 0 and 1 among them exactly and about `margin` of the unit on each side; None if n is too
    small to hold both with a margin."""
    side = round(margin * (n - 1) / (1 + 2 * margin))
    inner = n - 1 - 2 * side
    return [(k - side) / inner for k in range(n)] if inner >= 1 else None


def grid_axes(points: torch.Tensor, resolution: tuple[int, int], margin: float, affine: bool,
              x_range=None, y_range=None, zoom: float = 1.0, zoom_on: int = 0) -> tuple[list[float], list[float]]:
    """The x and y nodes: an explicit range, or fitted around the three points with `margin` (a fraction of their
    extent on each side). Affine unzoomed grids put 0 and 1 on nodes, so the three points are grid nodes; fitted
    ortho windows are square, so true distances look true. `zoom` > 1 shrinks the fitted window by that factor
    around point `zoom_on` (Figs. 16, 18)."""
    windows = []
    for dim in range(2):
        values = points[:, dim].tolist()
        low, high = min(values), max(values)
        pad = margin * (high - low)
        windows.append([low - pad, high + pad])
    if not affine:
        half = max(high - low for low, high in windows) / 2
        windows = [[(low + high) / 2 - half, (low + high) / 2 + half] for low, high in windows]
    axes = []
    for dim, (given, n, (low, high)) in enumerate(zip((x_range, y_range), resolution, windows)):
        if given is not None:
            axes.append(axis(given[0], given[1], n))
        elif affine and zoom == 1.0 and (nodes := unit_axis(n, margin)) is not None:
            axes.append(nodes)
        else:
            if zoom != 1.0:
                half, centre = (high - low) / (2 * zoom), points[zoom_on, dim].item()
                low, high = centre - half, centre + half
            axes.append(axis(low, high, n))
    return axes[0], axes[1]


def work_list(labels: list[str], points: torch.Tensor, xs: list[float], ys: list[float]) -> list[dict]:
    """What to evaluate: the three points themselves (exactly, from their own vectors), then every grid node."""
    anchors = [{"kind": "point", "label": label, "ix": -1, "iy": -1, "x": float(p[0]), "y": float(p[1]), "point": k}
               for k, (label, p) in enumerate(zip(labels, points))]
    nodes = [{"kind": "grid", "label": "", "ix": ix, "iy": iy, "x": x, "y": y, "point": -1}
             for ix, x in enumerate(xs) for iy, y in enumerate(ys)]
    return anchors + nodes


def grid_array(table, metric: str, nx: int, ny: int) -> torch.Tensor:
    """The grid values of `metric` from the tidy table as [ny, nx] (row iy, column ix), NaN where missing."""
    z = torch.full((ny, nx), math.nan, dtype=torch.float64)
    rows = table[(table.kind == "grid") & (table.metric == metric)]
    z[torch.tensor(rows.iy.tolist()), torch.tensor(rows.ix.tolist())] = torch.tensor(rows.value.tolist(),
                                                                                   dtype=torch.float64)
    return z


# ------------------------------------------------------------------------------------- chunks on disk
def chunk_path(folder: Path, index: int) -> Path:
    return Path(folder) / "chunks" / f"chunk-{index:05d}.json"


def pending_chunks(folder: Path, n_chunks: int) -> list[int]:
    return [i for i in range(n_chunks) if not chunk_path(folder, i).exists()]


def write_chunk(folder: Path, index: int, rows: list[dict]) -> None:
    write_json(chunk_path(folder, index), rows)  # atomic: a chunk file is whole or absent


def read_chunks(folder: Path, n_chunks: int) -> list[dict]:
    rows = []
    for i in range(n_chunks):
        rows += json.loads(chunk_path(folder, i).read_text())
    return rows


# ----------------------------------------------------------------------------------------- evaluation
@contextlib.contextmanager
def bn_statistics(model: nn.Module, batch: bool):
    """BatchNorm with the batch's own statistics (`batch`, running buffers untouched) or with its buffers;
    every other layer in eval mode. Restores the modes afterwards."""
    layers, was_training = batch_norms(model), model.training
    saved = [(m.training, m.track_running_stats) for m in layers]
    model.eval()
    for m in layers:
        m.train(batch)
        m.track_running_stats = not batch  # in train mode this also stops the buffer updates
    try:
        yield
    finally:
        model.train(was_training)
        for m, (training, track) in zip(layers, saved):
            m.train(training)
            m.track_running_stats = track


class PointEvaluator:
    """Every metric of one parameter vector: CE and KL to the teacher on the train and test subsets, the linear
    and k-NN probes of the embeddings (trained on the train subset, scored on the test subset) and ||theta||.

    BN modes (docs/method.md): `batch` - teacher and student both normalise with batch statistics, so theta_T is exactly
    the global minimum (KL 0); `eval` - both use the teacher's buffers (BN at its initial (0, 1): an affine
    identity); `recompute` - both use statistics recomputed at each point on the train subset (utils.lmc), then
    eval mode, so embeddings do not depend on the batch (closest to how a run probes its student); `distill` -
    as in training: teacher in eval mode, student with batch statistics (not 0 at theta_T). Batches are fixed
    and unshuffled, so batch statistics are deterministic. The teacher's outputs are computed once; each point
    takes one encoder pass for its losses and its probes. With scope `encoder` the losses compare embeddings.
    KL is computed in a form exact near 0 (utils.losses.kl_and_ce_to) and summed in float64. The teacher's side
    is cached as logits and probabilities: 2 x images x outputs x 4 bytes (1.6 GB for 3,000 images x 65,536)."""

    def __init__(self, model, teacher, scope: str, splits: dict, normalize, batch_size: int, bn: str,
                 temps: tuple[float, float], num_classes: int, probe_args, autocast=contextlib.nullcontext):
        self.model, self.scope, self.splits, self.normalize = model, scope, splits, normalize
        self.batch_size, self.temps, self.num_classes, self.probe_args = batch_size, temps, num_classes, probe_args
        self.autocast = autocast
        self.params = scope_parameters(model, scope)
        self.student_batch_stats, self.recompute = bn in ("batch", "distill"), bn == "recompute"
        if self.recompute:  # the teacher's statistics from the same images, so at theta_T both are identical
            teacher = copy.deepcopy(teacher)
            self._recompute_bn(teacher)
        head = with_constant_weight_norm(teacher.head)
        self.targets = {name: soft_targets(self._pass(teacher, head, images, bn == "batch")[0], temps[0])
                        for name, (images, _) in splits.items()}

    def _recompute_bn(self, net) -> None:
        recompute_bn_stats(net.encoder, self.splits["train"][0], self.normalize, self.batch_size)

    @torch.no_grad()
    def _pass(self, net, head, images, batch_stats: bool, targets=None):
        """Outputs (no targets) or per-split (CE sum, KL sum) in float64 against `targets`, and the embeddings."""
        outputs, embeddings = [], []
        ce = kl = torch.zeros((), dtype=torch.float64, device=images.device)
        with bn_statistics(net, batch_stats), self.autocast():
            for start in range(0, len(images), self.batch_size):
                idx = slice(start, start + self.batch_size)  # views, not gathers: fixed, unshuffled batches
                embedding = net.encoder(self.normalize(images[idx]))
                out = embedding if self.scope == "encoder" else head(embedding)
                embeddings.append(embedding.float())
                if targets is None:
                    outputs.append(out.float())
                    continue
                kl_batch, ce_batch = kl_and_ce_to(out, [part[idx] for part in targets], self.temps[1])
                ce, kl = ce + ce_batch.sum(), kl + kl_batch.sum()
        return (torch.cat(outputs) if targets is None else (ce, kl)), torch.cat(embeddings)

    @torch.no_grad()
    def load(self, theta: torch.Tensor) -> None:
        flat = theta.to(device=self.params[0].device, dtype=self.params[0].dtype)
        for p, part in zip(self.params, flat.split([p.numel() for p in self.params])):
            p.copy_(part.view_as(p))

    def __call__(self, theta: torch.Tensor) -> dict:
        """The metrics at the float64 vector `theta`."""
        self.load(theta)
        if self.recompute:
            self._recompute_bn(self.model)
        metrics, embeddings = {"norm": float(theta.norm())}, {}
        head = with_constant_weight_norm(self.model.head)  # the 65,536 x 256 rows normalised once per point
        for name, (images, _) in self.splits.items():
            (ce, kl), embeddings[name] = self._pass(self.model, head, images, self.student_batch_stats,
                                                    self.targets[name])
            metrics[f"{name}/ce"], metrics[f"{name}/kl"] = (ce / len(images)).item(), (kl / len(images)).item()
        labels = {name: y for name, (_, y) in self.splits.items()}
        probes = probe_features((embeddings["train"], labels["train"]), {"test": (embeddings["test"], labels["test"])},
                                self.num_classes, self.probe_args, "probe")
        return metrics | {key.removeprefix("probe/"): value for key, value in probes.items()}


# -------------------------------------------------------------------------------------------- figure
PANEL_TITLES = {"train/kl": "KL to the teacher, train", "test/kl": "KL to the teacher, test",
                "linear/test": "linear probe, test acc. (%)", "knn/test": "k-NN probe, test acc. (%)",
                "linear_std/test": "linear probe (std), test acc. (%)", "knn_std/test": "k-NN probe (std), test acc. (%)"}


def plot_landscape(table, meta: dict, path: Path, title: str) -> None:
    """Fig. 6 style: KL heatmaps on a log colour scale and probe-accuracy heatmaps, white ||theta|| contours,
    the three points marked (and named in one legend). Rows of the image are y, columns x (imshow origin='lower')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    xs, ys = meta["xs"], meta["ys"]
    metrics = [m for m in PANEL_TITLES if (table.metric == m).any()]
    cols = min(len(metrics), 3)
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.9 * rows), squeeze=False)
    dx = (xs[-1] - xs[0]) / max(len(xs) - 1, 1)
    dy = (ys[-1] - ys[0]) / max(len(ys) - 1, 1)
    extent = [xs[0] - dx / 2, xs[-1] + dx / 2, ys[0] - dy / 2, ys[-1] + dy / 2]
    fine_x = torch.linspace(extent[0], extent[1], 200, dtype=torch.float64)
    fine_y = torch.linspace(extent[2], extent[3], 200, dtype=torch.float64)
    norms = norm_on_mesh(meta["geometry"]["norm_form"], fine_x, fine_y)
    points = table[table.kind == "point"].drop_duplicates("point").sort_values("point")
    for ax, metric in zip(axes.flat, metrics):
        z = grid_array(table, metric, len(xs), len(ys)).numpy()
        if metric.endswith("/kl"):
            positive = z[z > 0]
            floor = max(positive.min(), positive.max() * 1e-8) if positive.size else 1e-12
            image = ax.imshow(z.clip(floor), origin="lower", extent=extent, cmap="viridis", aspect="auto",
                              norm=LogNorm(vmin=floor, vmax=max(positive.max() if positive.size else 1.0, floor * 10)))
        else:
            image = ax.imshow(100 * z, origin="lower", extent=extent, cmap="magma", aspect="auto")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        lines = ax.contour(fine_x.numpy(), fine_y.numpy(), norms.numpy(), levels=6, colors="white", linewidths=0.7,
                           alpha=0.8)
        ax.clabel(lines, fontsize=6, fmt="%.3g")
        for marker, (_, p) in zip("o^s", points.iterrows()):
            ax.plot(p.x, p.y, marker, color="red", markeredgecolor="white", markersize=7, label=p.label)
        ax.set(title=PANEL_TITLES[metric], xlim=extent[:2], ylim=extent[2:], xlabel=f"x ({meta['coords']})",
               ylabel=f"y ({meta['coords']})")
        if meta["coords"] == "ortho":
            ax.set_aspect("equal")
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="upper center", ncol=3, fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, 0.965))  # one legend for the three points: labels never hide the map
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
