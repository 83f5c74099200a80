"""The demo world: synthetic scenes (scenes.py) and how people describe them (phrasing.py), the
recipe that trains the shipped demo model (recipe.py: the Recipe, build and the `python -m
blip2.demo` command; text.py: its text and tokenizers; pretraining.py: the image encoder's and the
language model's pre-training), its evaluation (evaluation.py), the fine-tuning proof (teach.py),
and where the shipped model lives (shipped.py)."""
