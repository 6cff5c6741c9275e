"""Attention for dit-accel: methods (planning), the dense backend, the routing and the diffusers backend."""

from dit_accel.attention.base import AttentionMethod, SparsePlan
from dit_accel.attention.dense import dense_attention, dense_backend_name
from dit_accel.attention.registry import available_methods, get_method, register_method

__all__ = ["AttentionMethod", "SparsePlan", "available_methods", "dense_attention", "dense_backend_name", "get_method", "register_method"]
