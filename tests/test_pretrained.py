"""The shared export: model.safetensors + config.yaml, read by AttentiveVAE.from_pretrained and the one reader."""

import pytest
import torch

from avi_scale.config import load_config, to_yaml
from avi_scale.engine.export import CheckpointError, load_model
from avi_scale.model import AttentiveVAE, PretrainedError
from avi_scale.model.pretrained import save_pretrained

from helpers import REPO


def _trained_like(seed: int = 0):
    cfg = load_config(REPO / "configs" / "tiny_mnist5k.yaml", ["model.num_layers=2", "model.num_filters=4",
                                                                "model.nonlocal_places=[]"])
    torch.manual_seed(seed)
    model = AttentiveVAE(cfg.model)
    with torch.no_grad():  # move every parameter and buffer away from its initial value
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.01)
    return cfg, model.eval()


def test_round_trip_gives_the_same_model(tmp_path):
    cfg, model = _trained_like()
    save_pretrained(model.state_dict(), to_yaml(cfg), tmp_path / "export", {"step": 7, "weights": "ema"})
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.yaml", "model.safetensors"]
    again = AttentiveVAE.from_pretrained(tmp_path / "export")
    assert not again.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = (torch.rand(3, 1, 28, 28) > 0.5).float()
    torch.manual_seed(1)
    expected = model(x).loss
    torch.manual_seed(1)
    assert torch.equal(again(x).loss, expected)
    loaded = load_model(tmp_path / "export")  # the same folder through the one reader (avi-eval)
    assert (loaded.kind, loaded.weights, loaded.step) == ("safetensors", "ema", 7)
    with pytest.raises(CheckpointError, match="EMA weights only"):
        load_model(tmp_path / "export", use_ema=False)


def test_bad_exports_are_named(tmp_path):
    cfg, model = _trained_like()
    with pytest.raises(PretrainedError, match="model.safetensors is missing"):
        AttentiveVAE.from_pretrained(tmp_path)
    other = load_config(REPO / "configs" / "tiny_mnist5k.yaml", ["model.num_layers=2", "model.num_filters=8",
                                                                  "model.nonlocal_places=[]"])
    save_pretrained(model.state_dict(), to_yaml(other), tmp_path / "wide")  # weights of 4 filters, config of 8
    with pytest.raises(PretrainedError, match="other shapes than the model of its config"):
        AttentiveVAE.from_pretrained(tmp_path / "wide")
    state = dict(model.state_dict())
    state.pop(next(iter(state)))
    save_pretrained(state, to_yaml(cfg), tmp_path / "short")
    with pytest.raises(PretrainedError, match="1 missing"):
        AttentiveVAE.from_pretrained(tmp_path / "short")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "junk" / "config.yaml").write_text(to_yaml(cfg))
    with pytest.raises(PretrainedError, match="not a readable safetensors file"):
        AttentiveVAE.from_pretrained(tmp_path / "junk")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(tmp_path / "junk")
