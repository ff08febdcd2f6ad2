"""``python -m discovery.catalog --listen 127.0.0.1:8500 --data-dir DIR``"""

from __future__ import annotations

import sys

from ._cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
