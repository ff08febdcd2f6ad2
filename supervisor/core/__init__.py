"""The supervisor's decisions, as pure functions over plain data: no I/O, no asyncio,
time an input. The daemon (``supervisor.daemon``) observes, calls these, and carries out
what they return; the commands (``supervisor.commands``) use the same rules to show and
steer. Every module is tested directly with tables (tests/supervisor/test_sup_*.py,
test_rollout*.py).

    model.py            the facts decided over (Replica, Observed) and the actions the
                        daemon carries out (Start, Stop, Kill, Register, ..., Wait)
    reconcile.py        desired services vs what runs -> actions (restart, scale, replace)
    placement.py        which node runs a new replica: fit, constraints, spread / bin packing,
                        whole-config packing, explain; placement_score.py ranks a node,
                        placement_fleet.py holds one decision's working state
    backoff.py          restart policy and exponential back-off of one slot
    revisions.py        what revision a replica runs; rolling-restart tokens
    rollout.py          the rollout engine: one step of moving a service to a new revision
    rollout_types.py    its data: phases, observed replicas, strategy, state, actions
    rollout_history.py  numbered revision history, rollback targets, fenceposts
    rollout_plan.py     around the engine: when a rollout begins, what it observes, and what
                        its step means for replicas (placed) and history (revert, marks)
    apply_plan.py       what ``meshlet apply`` writes: documents and VIPs

Vocabulary: a *slot* is a replica's stable position 0..replicas-1; a *revision* is the
12-hex fingerprint of a replica template; the *target* is the revision a rollout moves to.
"""
