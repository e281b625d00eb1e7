"""Fault injection at named migration steps, for the tests: real process deaths and real hangs.

    SLLM_MIGRATION_FAULT=destination.commit:exit      the process dies at once there (as if SIGKILLed)
    SLLM_MIGRATION_FAULT=destination.round:hang       the process stops itself (SIGSTOP): its peers time out

Steps: destination.tokens (first round), destination.round (a later round), destination.commit (the
handover, while the source is paused), destination.relay (after the first relayed tokens),
source.paused (the source, once it has paused the request), controller.pending / controller.started /
controller.transferring (right after the coordinator has persisted that state). Several faults can be
given, separated by commas. Unset, `inject` does nothing.
"""

from __future__ import annotations

import functools
import os
import signal

EXIT_CODE = 86  # what a process killed by an injected fault exits with


class FaultPlanError(ValueError):
    """SLLM_MIGRATION_FAULT names an action other than exit or hang."""


def _plan(raw: str) -> dict[str, str]:
    plan = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        step, _, action = item.partition(":")
        if action not in ("exit", "hang"):
            raise FaultPlanError(f"SLLM_MIGRATION_FAULT={raw!r}: {item!r} must be STEP:exit or STEP:hang")
        plan[step] = action
    return plan


@functools.cache
def plan() -> dict[str, str]:
    """The process's fault plan, read from its environment at the first step (not at import)."""
    return _plan(os.environ.get("SLLM_MIGRATION_FAULT", ""))


def inject(step: str) -> None:
    action = plan().get(step)
    if action == "exit":
        os._exit(EXIT_CODE)
    if action == "hang":
        os.kill(os.getpid(), signal.SIGSTOP)
