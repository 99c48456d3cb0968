"""`python -m pipelines.cli ...` is `lesionlab ...` (also under `accelerate launch -m` and `torchrun -m`)."""

import sys

from pipelines.cli import main

sys.exit(main())
