"""The exact solver: place as many elements as possible, then minimise the sum of their slots'
costs (CMSO's objective: the sum of slot numbers; any cost increasing with time gives the same
plan), under a per-slot limit and an optional per-(slot, attribute) limit.

Why it is exact. Call a "unit" one place in a slot (slot j has `limit` units, each costing j).
A set of units is *independent* when some assignment of elements fills exactly those units
while respecting availability and the attribute limits. Those sets form a matroid: it is the
matroid induced on the sink side of a flow network (source -> element -> (slot, attribute) bin
-> slot -> sink, with capacities 1, 1, attribute_limit, limit), i.e. a gammoid. Every basis of
a matroid has the same size, the largest number of elements that can be placed; and the
greedy algorithm that takes units in increasing cost and keeps each one that stays independent
yields a basis of least total cost (Rado-Edmonds), whatever the costs are as long as their
order is the slots' order. So: go through the slots in time order; in each, add elements while
an assignment with one more element in this slot exists, leaving every earlier slot's count as
it is. "Exists" is decided exactly by searching for an augmenting path in the residual flow
network; only when a direct placement fails. An element whose attribute is not limited (it
has none) goes through a bin of its own slot whose capacity is the slot's `limit`, which is no
limit at all: the same network, so the same proof.

Five things keep it fast. Elements with the same availability and attribute are one *class*
with a count (10,000 elements in 5 time zones are 5 classes, plus one per ticketed element).
Paths are found in phases (`_fill`): one breadth-first labelling serves many depth-first
paths, and it stops before expanding the level where the first goal appears. What a search
that found nothing reached is skipped by the next searches until a move may give it a new
edge (`hopeless`).
The augmenting-path search runs over slots and bins, not elements: it keeps, per attribute,
which slots hold placed elements that could also run in slot s (`movable`), and per bin the
classes usable there with a pointer past those with nobody left unplaced, so one search
touches at most slots x attributes nodes; and every search only meets slots up to the one
being filled, whose bins are built when the greedy reaches that slot. Which element a direct
placement takes does not change optimality, only how often a search is needed: the one whose
last usable slot comes first (then the one with the fewest slots), which makes searches rare.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field
from itertools import repeat

FREE = -1  # the attribute of elements that the attribute limit does not bind
SLOT, BIN = 0, 1
Node = tuple[int, int, int]


@dataclass
class Instance:
    """Slots are any integers, in time order (the planner uses their start in ms). Class c:
    `counts[c]` elements with attribute value `attributes[c]` (FREE, or a value >= 0 that
    `attribute_limit` binds), usable in the ascending slots `available[c]`."""

    limit: int
    available: list[list[int]]
    counts: list[int]
    attributes: list[int] = field(default_factory=list)
    attribute_limit: int | None = None

    def __post_init__(self) -> None:
        if not self.attributes or self.attribute_limit is None:
            self.attributes = [FREE] * len(self.counts)


@dataclass
class Solution:
    placed: list[dict[int, int]]  # per class: slot -> how many of its elements start there
    augmentations: int = 0
    searches: int = 0

    @property
    def scheduled(self) -> int:
        return sum(sum(p.values()) for p in self.placed)

    @property
    def cost(self) -> int:
        return sum(slot * n for p in self.placed for slot, n in p.items())


class _Solver:
    def __init__(self, inst: Instance) -> None:
        self.inst = inst
        self.unplaced = list(inst.counts)
        self.attr_cap = inst.attribute_limit or inst.limit
        self.load: dict[int, int] = {}
        self.bin_load: dict[int, dict[int, int]] = {}
        self.in_slot: dict[int, dict[int, int]] = {}  # slot -> class -> n
        # bins[s][a]: [classes of attribute a usable in slot s, in placement order], and the
        # index of the first one that may still have unplaced elements; built on reaching s
        self.bins: dict[int, dict[int, list]] = {}
        # movable[a][s][k]: elements of attribute a placed in slot k that could run in slot s
        self.movable: dict[int, dict[int, dict[int, int]]] = {}
        # direct placement order: last usable slot first, then fewest usable slots
        order = sorted(
            (c for c in range(len(inst.counts)) if inst.available[c] and inst.counts[c]),
            key=lambda c: (inst.available[c][-1], len(inst.available[c]), c),
        )
        slots: set[int] = set()
        for c in order:
            slots.update(inst.available[c])
        self.slots = sorted(slots)
        self.by_slot: dict[int, list[int]] = {s: [] for s in self.slots}
        get = self.by_slot.__getitem__
        for c in order:  # one C-level loop per class: list.append(by_slot[s], c) for each slot
            deque(map(list.append, map(get, inst.available[c]), repeat(c)), maxlen=0)
        self.total_unplaced = sum(inst.counts[c] for c in order)
        self.solution = Solution([{} for _ in inst.counts])
        # Nodes from which a search that found nothing could reach no goal: skipped by later
        # searches until a move may give one of them a new edge (`_revive`); goals only ever
        # disappear. Consecutive slots that gain nothing (a night nobody more can use) then
        # cost one search, not one each.
        self.hopeless: set[Node] = set()

    def _cap(self, a: int) -> int:
        return self.inst.limit if a == FREE else self.attr_cap

    # -- moving elements -------------------------------------------------------------------

    def _revive(self, c: int, slot: int) -> None:
        """Forget the fruitless nodes if putting an element of class c into or taking it out
        of `slot` may give one of them a new edge: bin (slot, a), slot `slot`, or a bin (s, a)
        that c could also use (it gains an edge to bin (slot, a)). The fruitless nodes are
        closed under reachability (everything a search reached), so a node outside them that
        gains an edge cannot make any of them fruitful."""
        hopeless = self.hopeless
        if not hopeless:
            return
        a = self.inst.attributes[c]
        if (
            (BIN, slot, a) in hopeless
            or (SLOT, slot, 0) in hopeless
            or any((BIN, s, a) in hopeless for s in self.inst.available[c])
        ):
            hopeless.clear()

    def _put(self, c: int, slot: int, n: int) -> None:
        self._revive(c, slot)
        a = self.inst.attributes[c]
        self.load[slot] = self.load.get(slot, 0) + n
        loads = self.bin_load.setdefault(slot, {})
        loads[a] = loads.get(a, 0) + n
        here = self.in_slot.setdefault(slot, {})
        here[c] = here.get(c, 0) + n
        placed = self.solution.placed[c]
        placed[slot] = placed.get(slot, 0) + n
        movable = self.movable.setdefault(a, {})
        for s in self.inst.available[c]:
            row = movable.get(s)
            if row is None:
                movable[s] = {slot: n}
            else:
                row[slot] = row.get(slot, 0) + n

    def _take(self, c: int, slot: int) -> None:
        self._revive(c, slot)
        a = self.inst.attributes[c]
        self.load[slot] -= 1
        self.bin_load[slot][a] -= 1
        for table, key in ((self.in_slot[slot], c), (self.solution.placed[c], slot)):
            table[key] -= 1
            if table[key] == 0:
                del table[key]
        movable = self.movable[a]
        for s in self.inst.available[c]:
            row = movable[s]
            row[slot] -= 1
            if row[slot] == 0:
                del row[slot]

    def _place_new(self, c: int, slot: int, n: int) -> None:
        self.unplaced[c] -= n
        self.total_unplaced -= n
        self._put(c, slot, n)

    def _waiting(self, slot: int, a: int) -> int | None:
        """A class of attribute a usable in `slot` with elements still unplaced, if any."""
        entry = self.bins[slot].get(a)
        if entry is None:
            return None
        classes, i = entry
        unplaced = self.unplaced
        while i < len(classes) and not unplaced[classes[i]]:
            i += 1
        entry[1] = i
        return classes[i] if i < len(classes) else None

    # -- the greedy ------------------------------------------------------------------------

    def run(self) -> Solution:
        limit, attributes = self.inst.limit, self.inst.attributes
        for slot in self.slots:
            if self.total_unplaced == 0:
                break
            bins: dict[int, list] = {}
            classes = self.by_slot.pop(slot)
            for c in classes:
                entry = bins.get(attributes[c])
                if entry is None:
                    bins[attributes[c]] = [[c], 0]
                else:
                    entry[0].append(c)
            self.bins[slot] = bins
            self.load.setdefault(slot, 0)
            loads = self.bin_load.setdefault(slot, {})
            for c in classes:  # in placement order, across the bins
                if self.unplaced[c]:
                    a = attributes[c]
                    room = min(limit - self.load[slot], self._cap(a) - loads.get(a, 0))
                    if room > 0:
                        self._place_new(c, slot, min(room, self.unplaced[c]))
                    if self.load[slot] == limit:
                        break
            self._fill(slot)
        return self.solution

    def _fill(self, target: int) -> None:
        """Elements into slot `target` while any assignment allows one more there, every
        other slot's count unchanged: augmenting paths in the residual flow network, found in
        phases (Dinic): one breadth-first search backwards from the target labels the nodes
        with their distance, then depth-first searches along labelled edges find paths, each
        applied at once, until none is left; then a new phase. Every edge is checked against
        the current assignment when a search takes it, so every path applied is valid, and
        the slot is done only when a fresh breadth-first search finds no path at all: that is
        what keeps it exact. Labels only save work (a node from which a phase found nothing
        is not tried again in that phase)."""
        limit = self.inst.limit
        while self.load[target] < limit and self.total_unplaced:
            self.solution.searches += 1
            kids = self._layers(target)
            if kids is None:
                return
            dead: set[Node] = set()
            ptr: dict[Node, int] = {}
            while self.load[target] < limit and self.total_unplaced:
                path = self._path((SLOT, target, 0), kids, dead, ptr)
                if path is None:
                    break
                self._apply(path)
                self.solution.augmentations += 1

    def _children(self, node: Node) -> list[Node]:
        """Residual edges out of a node of the backward search, as they are now. A node is
        (SLOT, k, 0): slot k takes one more unit; or (BIN, k, a): bin (k, a) takes one more
        element, from an unplaced one (the search's goal), from one of attribute a moved out
        of slot k2 (then bin (k2, a) takes one more), or by slot k taking one more through
        another bin while bin (k, a) gives one up."""
        kind, k, a = node
        loads = self.bin_load[k]
        if kind == SLOT:
            attr_cap, limit = self.attr_cap, self.inst.limit
            return [
                (BIN, k, b)
                for b in self.bins[k]
                if loads.get(b, 0) < (limit if b == FREE else attr_cap)
            ]
        out: list[Node] = [(BIN, k2, a) for k2 in self.movable.get(a, {}).get(k, ())]
        if loads.get(a, 0) > 0:
            out.append((SLOT, k, 0))
        return out

    def _valid(self, node: Node, child: Node) -> bool:
        kind, k, a = node
        if kind == SLOT:
            b = child[2]
            cap = self.inst.limit if b == FREE else self.attr_cap
            return self.bin_load[k].get(b, 0) < cap
        if child[0] == SLOT:
            return self.bin_load[k].get(a, 0) > 0
        return self.movable.get(a, {}).get(k, {}).get(child[1], 0) > 0

    def _layers(self, target: int) -> dict[Node, list[Node]] | None:
        """Breadth-first from the target up to the first distance at which a goal (a bin
        with an unplaced element waiting) appears: each node's children one step further,
        or None when no goal can be reached. Every slot it meets is at most `target`:
        elements are only ever placed in slots the greedy has reached."""
        start: Node = (SLOT, target, 0)
        dist: dict[Node, int] = dict.fromkeys(self.hopeless, -1)  # as seen: never on a path
        dist[start] = 0
        kids: dict[Node, list[Node]] = {}
        level = [start]
        while level:
            # a goal in this level: the layers so far are the phase's (expanding this level,
            # often the largest, would only label nodes beyond the shortest paths)
            if any(
                node[0] == BIN and self._waiting(node[1], node[2]) is not None for node in level
            ):
                return kids
            following: list[Node] = []
            for node in level:
                d = dist[node] + 1
                mine = kids[node] = []
                for child in self._children(node):
                    seen = dist.get(child)
                    if seen is None:
                        dist[child] = d
                        following.append(child)
                        mine.append(child)
                    elif seen == d:
                        mine.append(child)
            level = following
        self.hopeless.update(dist)  # every node it reached, and none leads to a goal
        return None

    def _path(
        self,
        start: Node,
        kids: dict[Node, list[Node]],
        dead: set[Node],
        ptr: dict[Node, int],
    ) -> list[Node] | None:
        """Depth-first along the layers to a goal, each edge checked as it is now."""
        stack = [start]
        while stack:
            node = stack[-1]
            if node[0] == BIN and self._waiting(node[1], node[2]) is not None:
                return stack
            children = kids.get(node, [])
            i = ptr.get(node, 0)
            while i < len(children):
                child = children[i]
                if child not in dead and self._valid(node, child):
                    break
                i += 1
            ptr[node] = i
            if i < len(children):
                stack.append(children[i])
                continue
            dead.add(node)
            stack.pop()
            if stack:
                ptr[stack[-1]] += 1
        return None

    def _apply(self, path: list[Node]) -> None:
        """The path's moves, from its goal back to the target: a new element into the goal's
        bin, then each element of attribute a moved from slot k2 to slot k."""
        _, k, a = path[-1]
        c = self._waiting(k, a)
        assert c is not None
        self._place_new(c, k, 1)
        for up, node in zip(reversed(path[:-1]), reversed(path[1:]), strict=True):
            if node[0] == BIN and up[0] == BIN:
                _, k2, a = node
                k = up[1]
                moved = next(
                    c
                    for c in self.in_slot[k2]
                    if self.inst.attributes[c] == a and _has(self.inst.available[c], k)
                )
                self._take(moved, k2)
                self._put(moved, k, 1)


def _has(sorted_slots: list[int], slot: int) -> bool:
    i = bisect_left(sorted_slots, slot)
    return i < len(sorted_slots) and sorted_slots[i] == slot


def solve(inst: Instance) -> Solution:
    return _Solver(inst).run()
