"""The one config schema: YAML + dotlist merging, typed rejection, saving."""

import pytest

from avi_scale.config import ConfigError, from_dict, load_config, save_config, to_dict, to_yaml

from conftest import REPO


def test_yaml_and_overrides_merge():
    cfg = load_config(REPO / "configs" / "tiny_mnist5k.yaml", ["model.num_layers=8", "optim.lr=0.002"])
    assert cfg.model.num_layers == 8 and cfg.optim.lr == 0.002
    assert cfg.model.prior_attention.key_dim == 8  # from the YAML
    assert cfg.train.ema_decay == 0.999  # from the defaults


@pytest.mark.parametrize("override,key", [
    ("model.num_layer=3", "model.num_layer"),
    ("model.num_layers=many", "model.num_layers"),
    ("train.precision=fp8", "train.precision"),
    ("model.likelihood=gauss", "model.likelihood"),
    ("model.nonlocal_places=[everywhere]", "model.nonlocal_places"),
    ("deepspeed.offload_param=true", "deepspeed.offload_param"),
])
def test_bad_values_are_rejected_with_the_key_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_file_and_malformed_override():
    with pytest.raises(ConfigError, match="not found"):
        load_config(REPO / "configs" / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["model.num_layers"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "cifar10_attentive.yaml", ["train.steps=7"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert from_dict(to_dict(cfg)) == cfg
    assert "num_layers: 16" in to_yaml(cfg)
