"""The long-running supervisor: the I/O shell around the pure core (``supervisor.core``).

    supervisor.py   Supervisor: watches the catalog and the runtimes, runs one sync per
                    service at a time, and carries out what the core decides (``execute``)
    replicas.py     Replicas: what happens to one replica (start, probe, register, status
                    pushes, re-weigh, kill, retire: the one way a replica is stopped)
    rollouts.py     Rollouts: each service's rollout state, history and counts, mirrored in KV
    slots.py        Slots: restart back-off per slot (mirrored in KV), start holds, refusals
    status.py       the status document (/v1/status, meshlet status, up's progress lines)
    probes.py       readiness / liveness / startup probes: a pure state machine and runners
    admin.py        the admin API (/v1/status, /v1/logs, /v1/down) on a loopback address
    up.py           ``meshlet up``: catalog, DNS and proxy as children, apply, the supervisor
    components.py   meshlet's own components as child processes (static pods)

Each part asks of the others only through a small interface: ``ReplicaHost`` (what
``Replicas`` may ask of the supervisor), ``AdminBackend`` (of the admin API); ``Rollouts``
is given the data it needs with each call. No module here imports ``proxy`` or
``discovery.dns``: they run as processes.
"""
