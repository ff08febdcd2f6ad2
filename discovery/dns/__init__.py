"""meshlet's DNS server: answers ``<service>.service.<domain>`` from the catalog.

``main(argv)`` runs it (``meshlet dns``, ``python -m discovery.dns``). The pure parts,
``build_zone`` and ``answer``, turn a catalog View into records; see ``_zone`` for the
names and the decisions, ``_engine`` for the pre-encoded fast path, ``_wire`` for
parsing and truncation, ``_forward`` for recursors and ``_server`` for the sockets.
"""

from __future__ import annotations

from ._cli import main
from ._records import RR, Answer
from ._zone import Settings, Zone, answer, build_zone

__all__ = ["main", "Settings", "Zone", "build_zone", "answer", "RR", "Answer"]
