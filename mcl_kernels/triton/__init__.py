"""Triton kernels, one module per op (`embed_tokens.py`, ...).

Importing this package does not import Triton: the backend registry imports a kernel module on first
use, so ``TRITON_INTERPRET=1`` (Triton on CPU tensors) still takes effect when it is set after
``import mcl_kernels`` but before the first Triton call.
"""
