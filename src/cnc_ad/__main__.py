"""`python -m cnc_ad ...` (also what `torchrun -m cnc_ad` runs)."""

import sys

from cnc_ad.cli import main

sys.exit(main())
