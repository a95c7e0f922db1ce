"""``python -m leanfm`` (also what ``torchrun -m leanfm`` runs)."""

import sys

from leanfm.cli import main

sys.exit(main())
