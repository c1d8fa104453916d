"""``python -m sdxl_trt.cli``: the ``sdxl-trt`` command."""

import sys

from sdxl_trt.cli import main

sys.exit(main())
