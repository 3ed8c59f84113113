import sys

from ddpm_rt.capi import main

sys.exit(main())
