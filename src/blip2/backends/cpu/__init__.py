"""The CPU backend: the C kernels and their block layout, the quantized linears, the fused q/k/v
and the decode-step attention. It applies itself by swapping modules (convert.py): from_pretrained
on CPU does so while loading, through the load hooks registered here; `convert` does so for a model
built another way. Models never import it.

    build.py      compile, bind and check kernels.c        layout.py   block layout, int4pack format
    kernels.py    the C kernels as torch functions         bf16.py     CPUs that emulate bf16
    linear.py     Blocked layers, nn.Linear's fast paths    quant.py    Int8Linear, Int4Linear, quantize_
    attention.py  decode-step attention, fused q/k/v        convert.py  module swaps, the block plan
    loading.py    the load hooks (quantize, block layout)
"""

from ...checkpoint.loading import register_load_hook
from .convert import convert
from .loading import blocks_on_load, quantize_on_load
from .quant import Int4Linear, Int8Linear, quantize_

__all__ = ["Int4Linear", "Int8Linear", "convert", "quantize_"]

# quantizing first: the block plan depends on which layers are quantized
register_load_hook(quantize_on_load)
register_load_hook(blocks_on_load)
