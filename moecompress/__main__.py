"""`python -m moecompress ...` (as `torchrun -m moecompress` starts each rank): the `moecompress` command."""

import sys

from .cli import main

sys.exit(main())
