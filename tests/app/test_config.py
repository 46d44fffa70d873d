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


def test_unknown_experiment_lists_the_available_recipes():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match=r"experiment/w4a8_kdd") as err:
        compose_config(["experiment=w4a8_kdd"])
    for recipe in ("w8a8", "w4a8_kd", "w2_kd", "sparse24_kd", "structured25_kd", "structured50_kd"):
        assert f"\t{recipe}\n" in str(err.value)


RECIPES = ["w8a8", "w4a8_kd", "w2_kd", "sparse24_kd", "structured25_kd", "structured50_kd", "moe25"]
RECIPES += ["sparse24_w8a8_kd", "pdqm"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_share_the_budget_and_kd_ones_a_finetuned_teacher(recipe):
    cfg = compose_config([f"experiment={recipe}"])
    assert cfg.trainer.max_steps == 40 and cfg.model.lr == 1e-4 and cfg.report.eval_batches == 8
    if "kd" in cfg.compress:  # the recovery stage distils from the dense model fine-tuned as long
        assert cfg.compress.kd.teacher == "finetune"
        assert cfg.compress.kd.teacher_steps == cfg.trainer.max_steps
        assert cfg.compress.kd.start_from_teacher
    # the one-shot start of each technique, not the trainable-from-scratch default
    starts = {"prune": ("criterion", "sparsegpt"), "quant": ("init", "gptq"), "structured": ("init", "obs")}
    for technique, (key, value) in starts.items():
        if technique in cfg.compress:
            assert cfg.compress[technique][key] == value
    if "moe" in cfg.compress:
        assert cfg.compress.moe.split == "carve"
