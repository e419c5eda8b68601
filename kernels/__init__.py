"""Triton kernels of greg_fast (installed as ``greg_fast.kernels``); nothing here touches a GPU at
import time, so the package imports on CPU-only machines and under ``TRITON_INTERPRET=1``."""
