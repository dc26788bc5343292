"""`python -m tame_jax.compare RESULTS... --out=DIR`: the comparison of `tame_jax.report`."""

import sys

from tame_jax.report import compare, main

__all__ = ["compare", "main"]

if __name__ == "__main__":
    sys.exit(main())
