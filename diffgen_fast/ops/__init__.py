"""The functional API: softmax_denoise, kde_log_density, knn (one package per op, backends side by side)."""

from diffgen_fast.ops.knn import knn
from diffgen_fast.ops.softmax_denoise import kde_log_density, softmax_denoise
from diffgen_fast.ops.softmax_denoise.autograd import softmax_denoise_jvp

__all__ = ["softmax_denoise", "softmax_denoise_jvp", "kde_log_density", "knn"]
