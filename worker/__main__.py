"""`python -m worker`: see worker/main.py."""

from __future__ import annotations

import sys

from worker.settings import apply_process_defaults

apply_process_defaults()  # before anything imports torch

from worker.main import main  # noqa: E402  (must come after the defaults above)

sys.exit(main())
