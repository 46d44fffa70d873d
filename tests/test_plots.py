"""The shared figures: expert-load heatmap contents and labels, atomic PNG output, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from lightcook.plots import expert_load_figure, save_figure, short_name


def test_expert_load_heatmap_shows_load_over_layer_mean_with_labels(tmp_path):
    fig = expert_load_figure(
        [[3, 1, 0, 0], [1, 1, 1, 1]], ["model.layers.0.mlp", "model.layers.1.mlp"], "val"
    )
    ax = fig.axes[0]
    shares = np.asarray(ax.images[0].get_array())
    assert np.allclose(shares, [[3, 1, 0, 0], [1, 1, 1, 1]])  # the layer means are 1 here
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("expert", "FFN layer")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0.mlp", "1.mlp"]
    assert "val" in ax.get_title() and fig.axes[1].get_ylabel() == "tokens / layer mean"  # colour bar
    (tmp_path / "sub").mkdir()
    path = save_figure(fig, tmp_path / "sub" / "load.png")
    image = imread(path)
    assert image.shape[:2] == (300, 600) and image.std() > 0.05  # drawn, not blank
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["load.png"]  # no temp file left


@pytest.mark.parametrize(
    ("tokens", "names", "match"),
    [
        ([], [], "non-empty rows of equal length"),
        ([[1.0, 2.0], [3.0]], ["a", "b"], "non-empty rows of equal length"),
        ([[1.0, 2.0]], ["a", "b"], "2 layer names for 1 rows"),
    ],
)
def test_expert_load_figure_rejects_bad_input(tokens, names, match):
    with pytest.raises(ValueError, match=match):
        expert_load_figure(tokens, names, "x")


def test_short_name_abbreviates_block_modules():
    assert short_name("decoder.block.1.layer.0.SelfAttention.q") == "dec.1.l.0.attn.q"
    assert short_name("lm_head") == "lm_head"
