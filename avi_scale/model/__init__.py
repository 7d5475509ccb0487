"""The attentive VAE in pure PyTorch: tensors in, tensors and per-layer statistics out.

No DeepSpeed or Ray here, and no file I/O but the shared export folder of :mod:`.pretrained`
(``AttentiveVAE.from_pretrained``); see ``docs/model.md``.
"""

from .layers import count_parameters
from .pretrained import PretrainedError
from .vae import AttentiveVAE, LayerStats, VAEOutput, image_dims, nats_to_bpd

__all__ = ["AttentiveVAE", "LayerStats", "PretrainedError", "VAEOutput", "count_parameters", "image_dims",
           "nats_to_bpd"]
