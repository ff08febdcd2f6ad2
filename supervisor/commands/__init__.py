"""The user-facing client commands: they talk to the catalog or to the running
supervisor's admin API, and never run the supervisor themselves.

    apply.py          ``meshlet apply``: plan (``core.apply_plan``) and write in one transaction
    plan.py           ``meshlet plan``: where apply would place every replica (``core.placement``)
    admin_client.py   ``meshlet status``, ``logs``, ``down``: the admin API
    rollout.py        ``meshlet rollout status|history|pause|resume``, ``rollback``, ``restart``

The ``meshlet`` parser that wires them is ``supervisor/cli.py``.
"""
