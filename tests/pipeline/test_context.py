"""RunContext.save_figure: the file on disk, and in a notebook the saved PNG shown instead of a second draw."""
import matplotlib.pyplot as plt
import pandas as pd

from nrfm.config import Config
from nrfm.pipeline import context


def _ctx(tmp_path) -> context.RunContext:
    return context.RunContext(config=Config(), run_dir=tmp_path / "run", manifest=pd.DataFrame(),
                              cohort_dir=tmp_path)


def _figure():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    return fig


def test_save_figure_outside_a_notebook_writes_the_png_and_leaves_the_figure_open(tmp_path):
    fig = _figure()
    path = _ctx(tmp_path).save_figure(fig, "curve")
    assert path.name == "curve.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.number in plt.get_fignums()  # not in a kernel: nothing shown, the caller's figure stays usable
    plt.close(fig)


def test_save_figure_in_a_notebook_shows_the_saved_file_once_and_closes_the_figure(tmp_path, monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(context, "_in_kernel", lambda: True)
    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    fig = _figure()
    path = _ctx(tmp_path).save_figure(fig, "curve")
    assert len(shown) == 1 and shown[0].data == path.read_bytes()  # the same pixels as the report's file
    assert fig.number not in plt.get_fignums()  # the inline backend will not draw it again
    fig2 = _figure()
    _ctx(tmp_path).save_figure(fig2, "svg_only", formats=("svg",))  # no PNG saved: nothing to show
    assert len(shown) == 1 and fig2.number in plt.get_fignums()
    plt.close(fig2)


def test_not_in_a_kernel_under_pytest():
    assert context._in_kernel() is False
