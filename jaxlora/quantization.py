"""A quantized frozen base (QLoRA): NF4 / int8 kernels as a pure pytree transform, LoRA trained on top."""

from jaxlora._src.quantization import (
    DEFAULT_BLOCK_SIZE,
    KINDS,
    chosen_leaves,
    dequantize,
    dequantize_params,
    embedding_rows,
    is_quantized,
    nbytes,
    quantize,
    quantize_array,
    quantized_attend,
    quantized_linear,
    relative_error,
    report,
    requantize,
)

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "KINDS",
    "chosen_leaves",
    "dequantize",
    "dequantize_params",
    "embedding_rows",
    "is_quantized",
    "nbytes",
    "quantize",
    "quantize_array",
    "quantized_attend",
    "quantized_linear",
    "relative_error",
    "report",
    "requantize",
]
