"""meshlet's control plane: the ``meshlet`` command and the supervisor.

    cli.py        the ``meshlet`` command: every subcommand, declared once (the composition root)
    core/         decisions as pure functions: reconcile, placement, back-off, rollouts,
                  revisions, what apply writes (no I/O; tested with tables)
    daemon/       the long-running supervisor: watches, syncs, replicas, rollout bookkeeping,
                  probes, the admin API, ``meshlet up``
    commands/     client commands: apply, status / logs / down, rollout / rollback / restart
    runtime/      how a node runs replicas: Docker engine or local processes

Imports point one way: ``core`` imports only ``config``; ``runtime`` imports ``config``;
``commands`` imports ``core``, ``config`` and ``discovery``; ``daemon`` imports all of those
(``up`` applies through ``commands.apply``); ``cli`` imports everything, lazily. Nothing
here imports ``proxy`` or ``discovery.dns`` (tests/supervisor/test_sup_layout.py checks it).
"""
