"""`blip2.scenes`: the demo world's scenes (blip2/apps/demo/scenes.py), under its old name."""

import sys

from .apps.demo import scenes as _scenes

sys.modules[__name__] = _scenes
