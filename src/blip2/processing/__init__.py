"""Inputs: the image processor, the tokenizer and the processor that combines them."""
