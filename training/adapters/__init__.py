"""Building blocks of identity adapters: conditioners (inputs -> tokens) and injections (how the
tokens enter the diffusion model). Methods (`training.methods`) compose them."""
from training.adapters.attention import cross_attention_layers, set_scale
from training.adapters.base import Injection, TokenState, zero_inputs
from training.adapters.decoupled_attention import DecoupledAttention
from training.adapters.residual_attention import ResidualAttention
from training.adapters.wproj import WProj

__all__ = ["DecoupledAttention", "Injection", "ResidualAttention", "TokenState", "WProj", "cross_attention_layers",
           "set_scale", "zero_inputs"]
