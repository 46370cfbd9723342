"""The frontier plots are readable: on an L0 axis within one decade (30 to 60, where matplotlib labels
every minor tick: "3x10^1 4x10^1 6x10^1") no two tick labels overlap, and the saved picture holds every
label whole."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from actcache.train.export import frontier_figure, plot_frontier  # noqa: E402


def _summary(l0s, fvus):
    return {"hook": "blocks.0.hook_resid_pre", "saes": [
        {"name": f"sae-with-a-long-name-{i}", "architecture": "batchtopk", "exported_as": "jumprelu", "l0": l0,
         "fvu": f} for i, (l0, f) in enumerate(zip(l0s, fvus))]}


def _tick_labels(fig, axis, which="both"):
    """The extents and texts of the tick labels shown (those of ticks inside the axis's view)."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    lo, hi = sorted(axis.get_view_interval())
    ticks = axis.get_minor_ticks() if which == "minor" else axis.get_major_ticks() + axis.get_minor_ticks()
    labels = [t.label1 for t in ticks if lo <= t.get_loc() <= hi and t.label1.get_visible() and t.label1.get_text()]
    return [t.get_window_extent(r) for t in labels], [t.get_text() for t in labels]


def _no_overlap(boxes):
    boxes = sorted(boxes, key=lambda b: b.x0)
    return all(a.x1 <= b.x0 or a.y1 <= b.y0 or b.y1 <= a.y0 for a, b in zip(boxes, boxes[1:]))


def test_narrow_axes_have_few_labels_that_do_not_overlap():
    for l0s, fvus in (([30, 41, 58], [0.2, 0.25, 0.31]), ([2, 40, 700], [0.01, 0.1, 0.6]),
                      ([8, 16, 53], [0.15, 0.3, 0.5])):
        fig = frontier_figure(_summary(l0s, fvus))
        ax = fig.axes[0]
        for axis in (ax.xaxis, ax.yaxis):
            boxes, texts = _tick_labels(fig, axis)
            assert 2 <= len(texts) <= 8, texts
            assert _tick_labels(fig, axis, "minor")[1] == []  # no label on a minor tick
            if axis is ax.xaxis:
                assert _no_overlap(boxes), texts
        plt.close(fig)


def test_saved_plot_keeps_labels_inside(tmp_path):
    """A point at the far right with a long name: the saved picture grows to hold its label."""
    path = tmp_path / "f.png"
    plot_frontier(_summary([30, 41, 58], [0.2, 0.25, 0.31]), path)
    fig = frontier_figure(_summary([30, 41, 58], [0.2, 0.25, 0.31]))
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text()]
    fig_box = fig.bbox
    outside = [t.get_text() for t in texts if t.get_window_extent(r).x1 > fig_box.x1 + 1]
    plt.close(fig)
    w, h = Image.open(path).size
    # the figure itself would clip those labels; the saved file is widened to hold them
    assert outside == [] or w > 6 * 120
