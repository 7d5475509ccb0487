"""The one config schema: YAML + dotlist merging, typed rejection, saving."""

import pytest

from avi_scale.config import ConfigError, from_dict, load_config, save_config, to_dict, to_yaml

from helpers import REPO


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


def test_base_chain_inherits_and_is_checked(tmp_path):
    parent = tmp_path / "parent.yaml"
    parent.write_text("name: parent\nmodel:\n  num_layers: 3\n  num_filters: 8\noptim:\n  lr: 0.005\n")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("base: ../parent.yaml\nname: child\nmodel:\n  num_layers: 5\n")
    cfg = load_config(child, ["optim.lr=0.001"])
    assert (cfg.name, cfg.model.num_layers, cfg.model.num_filters, cfg.optim.lr) == ("child", 5, 8, 0.001)
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(ConfigError, match="comes back to this file"):
        load_config(loop)
    orphan = tmp_path / "orphan.yaml"
    orphan.write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="base config 'missing.yaml' not found"):
        load_config(orphan)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {parent}\nmodel:\n  num_layerz: 2\n")
    with pytest.raises(ConfigError, match="allowed keys of model"):
        load_config(bad)


def test_one_override_applier_for_dotlists_and_mappings():
    from avi_scale.config import apply_overrides

    cfg = load_config(REPO / "configs" / "tiny_mnist5k.yaml")
    assert apply_overrides(cfg, ["optim.lr=0.5"]).optim.lr == 0.5
    assert apply_overrides(to_dict(cfg), {"optim.lr": 0.25, "model.num_layers": 2}).model.num_layers == 2
    with pytest.raises(ConfigError, match="model.num_layers: must be >= 1"):
        apply_overrides(cfg, {"model.num_layers": 0})
    with pytest.raises(ConfigError, match=r"override 'model.num_layers=2': frozen here; model\.\* cannot"):
        apply_overrides(cfg, ["model.num_layers=2"], fixed={"model": "frozen here"})


def test_each_section_checks_its_own_keys_and_retired_keys_are_dropped():
    from avi_scale.config import EvalConfig, TrainConfig

    with pytest.raises(ConfigError, match="train.steps: must be >= 1"):
        TrainConfig(steps=0).check()
    with pytest.raises(ConfigError, match=r"eval.attention_layer: must be in \[-2, 1\]"):
        EvalConfig(attention_layer=2).check(num_layers=2)
    saved = to_dict(load_config(None))
    saved["deepspeed"]["fp16_initial_scale_power"] = 16  # written by earlier versions, read by nothing
    assert from_dict(saved) == load_config(None)
    with pytest.raises(ConfigError, match="fp16_initial_scale_power"):
        load_config(None, ["deepspeed.fp16_initial_scale_power=16"])
