#!/opt/venv/bin/python
"""The image's `lesionlab` command: `pipelines.cli:main`, with `docker stop` (SIGTERM) handled like Ctrl-C."""

import signal
import sys

# In a container this process is PID 1, and the kernel gives PID 1 no default action for SIGTERM: without a handler
# `docker stop` would wait out its timeout and SIGKILL. As KeyboardInterrupt, Gradio closes its server and exits.
signal.signal(signal.SIGTERM, signal.default_int_handler)

from pipelines.cli import main  # noqa: E402

sys.exit(main())
