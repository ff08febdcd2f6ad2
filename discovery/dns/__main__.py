from __future__ import annotations

from discovery.dns import main

raise SystemExit(main())
