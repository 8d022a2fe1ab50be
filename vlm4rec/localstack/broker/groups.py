"""Consumer groups: Kafka's classic rebalance protocol (JoinGroup, SyncGroup, Heartbeat,
LeaveGroup) and committed offsets, for one broker that coordinates every group.

States as in Kafka's GroupCoordinator: Empty -> PreparingRebalance (waiting for every known
member to join again, or for the rebalance timeout) -> CompletingRebalance (the leader's
assignment awaited) -> Stable. A member that sends nothing for its session timeout is removed,
which starts a rebalance for the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from vlm4rec.localstack.broker import protocol as p

log = logging.getLogger("vlm4rec.broker.groups")

EMPTY, PREPARING, COMPLETING, STABLE = "Empty", "PreparingRebalance", "CompletingRebalance", "Stable"


@dataclass
class Member:
    member_id: str
    client_id: str
    session_timeout_s: float
    rebalance_timeout_s: float
    protocol_type: str
    protocols: list[tuple[str, bytes]]
    last_seen: float
    assignment: bytes = b""
    joining: asyncio.Future[dict[str, Any]] | None = None
    syncing: asyncio.Future[tuple[int, bytes]] | None = None

    def metadata_for(self, protocol: str) -> bytes:
        return next(meta for name, meta in self.protocols if name == protocol)


@dataclass
class Group:
    group_id: str
    state: str = EMPTY
    generation: int = 0
    protocol: str | None = None
    protocol_type: str | None = None
    leader: str | None = None
    members: dict[str, Member] = field(default_factory=dict)
    rebalance_deadline: float = 0.0
    #: (topic, partition) -> committed offset
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    last_commit: float = 0.0


class GroupCoordinator:
    """Every group's membership and offsets. Its coroutines are called from the broker's one
    event loop, so state changes need no locks; a JoinGroup or SyncGroup awaits a future that a
    later request (or `tick`) resolves."""

    def __init__(self) -> None:
        self.groups: dict[str, Group] = {}

    def group(self, group_id: str) -> Group:
        found = self.groups.get(group_id)
        if found is None:
            found = self.groups[group_id] = Group(group_id)
        return found

    async def join(self, request: dict[str, Any], client_id: str) -> dict[str, Any]:
        group = self.group(request["group"])
        member_id = request["member_id"] or ""
        session_s = request["session_timeout"] / 1000
        rebalance_s = (request.get("rebalance_timeout") or request["session_timeout"]) / 1000
        protocols = [(x["protocol_name"], x["protocol_metadata"]) for x in request["group_protocols"]]
        if not protocols or (group.protocol_type and group.members and request["protocol_type"] != group.protocol_type):
            return _join_error(p.INCONSISTENT_GROUP_PROTOCOL, member_id)
        if group.members and not any(name in self._common_protocols(group) for name, _ in protocols):
            return _join_error(p.INCONSISTENT_GROUP_PROTOCOL, member_id)
        if member_id and member_id not in group.members:
            return _join_error(p.UNKNOWN_MEMBER_ID, member_id)
        now = time.monotonic()
        if not member_id:
            member_id = f"{client_id or 'member'}-{uuid.uuid4()}"
            group.members[member_id] = Member(member_id, client_id, session_s, rebalance_s, request["protocol_type"], protocols, now)
            log.info("group %s: %s joins", group.group_id, member_id)
        member = group.members[member_id]
        member.protocols, member.last_seen = protocols, now
        member.session_timeout_s, member.rebalance_timeout_s = session_s, rebalance_s
        group.protocol_type = request["protocol_type"]
        if member.joining is not None and not member.joining.done():
            member.joining.set_result(_join_error(p.REBALANCE_IN_PROGRESS, member_id))
        joined = member.joining = asyncio.get_running_loop().create_future()
        if group.state != PREPARING:
            self._prepare_rebalance(group, f"{member_id} joined")
        self._maybe_complete_join(group)
        return await joined

    async def sync(self, request: dict[str, Any]) -> dict[str, Any]:
        group = self.groups.get(request["group"])
        member = group.members.get(request["member_id"]) if group else None
        if group is None or member is None:
            return _sync_reply(p.UNKNOWN_MEMBER_ID)
        member.last_seen = time.monotonic()
        if request["generation_id"] != group.generation:
            return _sync_reply(p.ILLEGAL_GENERATION)
        if group.state == PREPARING:
            return _sync_reply(p.REBALANCE_IN_PROGRESS)
        if group.state == STABLE:
            return _sync_reply(p.NONE, member.assignment)
        if member.member_id == group.leader:
            given = {x["member_id"]: x["member_metadata"] or b"" for x in request["group_assignment"]}
            for other in group.members.values():
                other.assignment = given.get(other.member_id, b"")
            group.state = STABLE
            log.info("group %s: generation %d stable with %d member(s)", group.group_id, group.generation, len(group.members))
            for other in group.members.values():
                if other.syncing is not None and not other.syncing.done():
                    other.syncing.set_result((p.NONE, other.assignment))
                other.syncing = None
            return _sync_reply(p.NONE, member.assignment)
        synced = member.syncing = asyncio.get_running_loop().create_future()
        error, assignment = await synced
        return _sync_reply(error, assignment)

    def heartbeat(self, request: dict[str, Any]) -> int:
        group = self.groups.get(request["group"])
        member = group.members.get(request["member_id"]) if group else None
        if group is None or member is None:
            return p.UNKNOWN_MEMBER_ID
        member.last_seen = time.monotonic()
        if request["generation_id"] != group.generation:
            return p.ILLEGAL_GENERATION
        if group.state == PREPARING:
            return p.REBALANCE_IN_PROGRESS
        return p.NONE

    def leave(self, request: dict[str, Any]) -> int:
        group = self.groups.get(request["group"])
        if group is None or request["member_id"] not in group.members:
            return p.UNKNOWN_MEMBER_ID
        self._remove(group, request["member_id"], "left")
        return p.NONE

    def commit(self, request: dict[str, Any]) -> int:
        """The error for every partition of an OffsetCommit (they share the group check)."""
        group = self.group(request["consumer_group"])
        generation, member_id = request["consumer_group_generation_id"], request["consumer_id"] or ""
        if generation >= 0 or member_id:
            member = group.members.get(member_id)
            if member is None:
                return p.UNKNOWN_MEMBER_ID
            member.last_seen = time.monotonic()
            if generation != group.generation:
                return p.ILLEGAL_GENERATION
            if group.state == PREPARING:
                return p.REBALANCE_IN_PROGRESS
        elif group.members:
            return p.UNKNOWN_MEMBER_ID  # a commit without membership into a live group
        for topic in request["topics"]:
            for part in topic["partitions"]:
                group.offsets[(topic["topic"], part["partition"])] = part["offset"]
        group.last_commit = time.monotonic()
        return p.NONE

    def committed(self, group_id: str, topic: str, partition: int) -> int:
        group = self.groups.get(group_id)
        return -1 if group is None else group.offsets.get((topic, partition), -1)

    def readers(self, now: float, idle_s: float) -> list[Group]:
        """Groups whose committed offsets hold a partition's records: those with members, and
        those that committed within `idle_s` (a reader restarting must find its place)."""
        return [g for g in self.groups.values() if g.offsets and (g.members or now - g.last_commit < idle_s)]

    def tick(self, now: float) -> None:
        """Expires silent members and rebalances that waited their full timeout."""
        for group in list(self.groups.values()):
            for member in list(group.members.values()):
                waiting = group.state == PREPARING and member.joining is not None and not member.joining.done()
                if not waiting and now - member.last_seen > member.session_timeout_s:
                    self._remove(group, member.member_id, f"sent nothing for {member.session_timeout_s:.1f} s")
            if group.state == PREPARING and now >= group.rebalance_deadline:
                for member in list(group.members.values()):
                    if member.joining is None or member.joining.done():
                        self._remove(group, member.member_id, "did not join the rebalance in time", complete=False)
                self._maybe_complete_join(group, force=True)

    def _remove(self, group: Group, member_id: str, why: str, complete: bool = True) -> None:
        member = group.members.pop(member_id)
        log.info("group %s: %s removed (%s)", group.group_id, member_id, why)
        if member.joining is not None and not member.joining.done():
            member.joining.set_result(_join_error(p.UNKNOWN_MEMBER_ID, member_id))
        if member.syncing is not None and not member.syncing.done():
            member.syncing.set_result((p.UNKNOWN_MEMBER_ID, b""))
        if not group.members:
            group.state, group.leader, group.protocol = EMPTY, None, None
            group.generation += 1
            return
        if group.state != PREPARING:
            self._prepare_rebalance(group, f"{member_id} {why}")
        if complete:
            self._maybe_complete_join(group)

    def _prepare_rebalance(self, group: Group, why: str) -> None:
        for member in group.members.values():
            if member.syncing is not None and not member.syncing.done():
                member.syncing.set_result((p.REBALANCE_IN_PROGRESS, b""))
            member.syncing = None
        group.state = PREPARING
        group.rebalance_deadline = time.monotonic() + max(m.rebalance_timeout_s for m in group.members.values())
        log.info("group %s: rebalancing (%s)", group.group_id, why)

    def _common_protocols(self, group: Group) -> list[str]:
        members = list(group.members.values())
        if not members:
            return []
        names = [name for name, _ in members[0].protocols]
        return [n for n in names if all(any(n == name for name, _ in m.protocols) for m in members[1:])]

    def _maybe_complete_join(self, group: Group, force: bool = False) -> None:
        if group.state != PREPARING or not group.members:
            return
        pending = [m for m in group.members.values() if m.joining is not None and not m.joining.done()]
        if not force and len(pending) < len(group.members):
            return
        common = self._common_protocols(group)
        group.generation += 1
        group.protocol = common[0] if common else None
        if group.leader not in group.members:
            group.leader = next(iter(group.members))
        group.state = COMPLETING
        listed = [{"member_id": m.member_id, "member_metadata": m.metadata_for(group.protocol)} for m in group.members.values()] if group.protocol else []
        for member in group.members.values():
            reply = {
                "throttle_time_ms": 0, "error_code": p.NONE if group.protocol else p.INCONSISTENT_GROUP_PROTOCOL,
                "generation_id": group.generation, "group_protocol": group.protocol or "",
                "leader_id": group.leader, "member_id": member.member_id,
                "members": listed if member.member_id == group.leader else [],
            }
            member.last_seen = time.monotonic()
            if member.joining is not None and not member.joining.done():
                member.joining.set_result(reply)
            member.joining = None


def _join_error(error: int, member_id: str) -> dict[str, Any]:
    return {
        "throttle_time_ms": 0, "error_code": error, "generation_id": -1, "group_protocol": "",
        "leader_id": "", "member_id": member_id, "members": [],
    }


def _sync_reply(error: int, assignment: bytes = b"") -> dict[str, Any]:
    return {"throttle_time_ms": 0, "error_code": error, "member_assignment": assignment}
