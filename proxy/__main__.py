"""``python -m proxy``: the proxy alone (see :func:`proxy.main`)."""

import sys

from proxy import main

sys.exit(main())
