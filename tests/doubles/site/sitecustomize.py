"""Put the GPU doubles in place in every Python process started with this folder on
PYTHONPATH and DDPM_RT_DOUBLES set (to the TensorRT version they play), so that a script
(scripts/gpu_check.sh) and the processes it starts run through them. Tests only."""

import os
import sys

if os.environ.get("DDPM_RT_DOUBLES"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    import doubles

    doubles.install(None, tensorrt=os.environ["DDPM_RT_DOUBLES"])
