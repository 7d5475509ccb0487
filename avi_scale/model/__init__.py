"""The attentive VAE in pure PyTorch: tensors in, tensors and per-layer statistics out.

No DeepSpeed, files or Ray here (see ``docs/model.md``).
"""

from .vae import AttentiveVAE, VAEOutput, image_dims, nats_to_bpd
from .layers import count_parameters

__all__ = ["AttentiveVAE", "VAEOutput", "count_parameters", "image_dims", "nats_to_bpd"]
