"""Advisory-lock keys shared by the control plane (monitor/locks.py) and the workers.

PostgreSQL advisory locks take a bigint; a lock is named by a string and its key is the first 8 bytes of
the name's SHA-256, signed — stable across processes, hosts and releases (a renamed key would let an old
and a new worker hold "the same" lock at once during a rolling deploy).
"""

from __future__ import annotations

import hashlib


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for a lock name (advisory locks take a bigint)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def area_lock_key(purpose: str, area_id: int) -> int:
    """The key of the per-area lock of ``purpose`` (e.g. ``"coregistration"``): one area's writers of that
    state serialise, other areas' do not wait."""
    return lock_key(f"unirs-monitor:{purpose}:area:{area_id}")
