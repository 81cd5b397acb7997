"""``python -m fst_jax.train``: the ``fst-jax train`` command."""

import sys

from fst_jax.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
