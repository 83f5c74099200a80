"""`blip2.demo` and `python -m blip2.demo`: the demo application (blip2/apps/demo), under its old name."""

import sys

from .apps.demo import recipe as _recipe

if __name__ == "__main__":
    sys.exit(_recipe.main())
sys.modules[__name__] = _recipe
