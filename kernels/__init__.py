"""Paged-attention decode kernels (Pallas GPU, Pallas TPU, jnp reference) behind one API."""

from .api import available_backends, paged_attention
from .reference import paged_attention_reference

__all__ = ["available_backends", "paged_attention", "paged_attention_reference"]
