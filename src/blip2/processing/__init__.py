"""Inputs: images -> pixel_values, text -> input_ids, and the processor that combines them.

    encoding.py           BatchEncoding, the dict of model inputs all of them return
    image_load.py         load_image: files, URLs, data URLs -> RGB; the pixel budget, high bit depths
    image.py              BlipImageProcessor (resize, rescale, normalise), IMAGE_EXTS
    tokenizer_backend.py  a checkpoint's tokenizer files -> a `tokenizers.Tokenizer`
    special_tokens.py     named special tokens and their ids (a mixin of the tokenizer)
    tokenization.py       Blip2Tokenizer: the transformers-compatible tokenizer facade
    processor.py          Blip2Processor: image processor + tokenizer, [image]xQ in front of the text
"""
