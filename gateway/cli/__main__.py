"""`python -m gateway.cli`: the same as the `rcg` script."""
import sys

from . import main

sys.exit(main())
