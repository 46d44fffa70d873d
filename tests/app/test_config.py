"""lightcook.app.config: every config option composes, no compress default, the +compress check."""

import pytest
from omegaconf import OmegaConf

from lightcook.app.config import CONFIG_DIR, check_compress_overrides, compose_config, compress_names

GROUPS = ["model", "data", "trainer", "callbacks", "logger", "paths"]


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, p.stem) for g in GROUPS for p in sorted((CONFIG_DIR / g).glob("*.yaml"))],
)
def test_every_config_option_composes(compose, group, option):
    extra = ["data.paths=[/tmp]"] if (group, option) == ("data", "text") else []
    cfg = compose(f"{group}={option}", *extra)
    node = cfg[group]
    OmegaConf.to_container(node, resolve=True)  # every interpolation resolves
    if "_target_" in node:
        assert node._target_.split(".")[0] in {"lightcook", "lightning"}


def test_no_compress_by_default_and_plus_compress_is_the_way_in(compose):
    assert "compress" not in compose()
    assert (CONFIG_DIR / "compress").is_dir()
    assert sorted(compose("+compress=[quant,prune]").compress) == ["prune", "quant"]


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("+compress=[]", r"compress: the list is empty"),
        ("+compress=[prune,prune]", r"compress: \['prune'\] given twice"),
        ("+compress=[prnue]", r"compress: unknown technique\(s\) \['prnue'\]; available: \["),
        ("+compress=[none,quant]", r"'none' \(the uncompressed baseline\) stands alone"),
        ("+compress=[quant],[quant,quant]", r"given twice"),  # every choice of a sweep is checked
    ],
)
def test_bad_compress_selection_is_refused_before_composing(override, match):
    with pytest.raises(ValueError, match=match):
        compose_config([override])


def test_good_selections_pass_and_names_are_the_files():
    check_compress_overrides(["+compress=[quant],[quant,prune]", "~compress", "model=tiny_llama"])
    assert compress_names() == sorted(p.stem for p in (CONFIG_DIR / "compress").glob("*.yaml"))
    assert CONFIG_DIR.joinpath("config.yaml").is_file()
