"""``python -m ddpm_rt.cli``: the ``ddpm-rt`` command."""

import sys

from ddpm_rt.cli import main

sys.exit(main())
