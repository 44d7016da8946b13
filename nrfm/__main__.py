"""``python -m nrfm`` (also what ``torchrun -m nrfm`` launches)."""
import sys

from nrfm.cli import main

sys.exit(main())
