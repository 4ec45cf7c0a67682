"""The channel graph's records: channel groups joined by a union-find, and the layout of a tensor's channels.

:mod:`~lightning_compress.pruning.graph` fills a :class:`ChannelGraph` while it walks a traced model;
:mod:`~lightning_compress.pruning.shrink` reads it to cut every layer consistently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ChannelGraph", "ChannelLayout", "GroupInfo", "Segment"]


@dataclass
class Segment:
    """``channels`` channels of group ``group``, each spanning ``inner`` consecutive positions."""

    group: int
    channels: int
    inner: int = 1


@dataclass
class ChannelLayout:
    """Layout of a tensor's channel dimension ``dim``: the concatenation of ``segs``."""

    segs: list[Segment]
    dim: int


@dataclass
class GroupInfo:
    """One channel group: its size, the layers whose outputs are its channels, and why it may not be cut."""

    size: int
    members: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)  # silent: output head, model input
    unsupported: list[str] = field(default_factory=list)  # loud: an op we cannot cut through
    tokens: bool = False  # a Linear's channels in the last dimension of a 3-D or larger tensor (token features)


@dataclass
class ChannelGraph:
    """The result of :func:`~lightning_compress.pruning.graph.analyze`: groups (union-find) and every module that must be cut."""

    groups: list[GroupInfo]
    parent: list[int]
    members: dict[str, int]  # member module -> group id (not resolved)
    depthwise: set[str]
    consumers: list[tuple[str, str, ChannelLayout]]  # (module name, kind in {"conv", "linear", "norm", "depthwise"}, input layout)
    norms: dict[str, str]  # member -> the norm directly following it
    refused: dict[str, str] = field(default_factory=dict)  # a layer that is no member -> why its channels are not followed

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.groups[ra].size != self.groups[rb].size:
            raise RuntimeError(f"internal error: merging channel groups of sizes {self.groups[ra].size} != {self.groups[rb].size}")
        self.parent[rb] = ra
        ia, ib = self.groups[ra], self.groups[rb]
        ia.members += ib.members
        ia.fixed += ib.fixed
        ia.unsupported += ib.unsupported
        ia.tokens = ia.tokens or ib.tokens

    def new_group(self, size: int, member: str | None = None) -> int:
        self.groups.append(GroupInfo(size))
        self.parent.append(len(self.parent))
        gid = len(self.groups) - 1
        if member is not None:
            self.groups[gid].members.append(member)
            self.members[member] = gid
        return gid

    def info(self, g: int) -> GroupInfo:
        return self.groups[self.find(g)]

    def roots(self) -> list[int]:
        return sorted({self.find(g) for g in range(len(self.groups))})
