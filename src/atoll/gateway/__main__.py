"""``python -m atoll.gateway --config gateway.yaml``."""

import sys

from atoll.gateway._main import main

sys.exit(main())
