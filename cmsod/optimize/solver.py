"""The exact solver: place as many elements as possible, then minimise the sum of their slot
indices (CMSO's objective), under a per-slot limit and an optional per-(slot, attribute) limit.

Why it is exact. Call a "unit" one place in a slot (slot j has `limit` units, each costing j).
A set of units is *independent* when some assignment of elements fills exactly those units
while respecting availability and the attribute limits. Those sets form a matroid: it is the
matroid induced on the sink side of a flow network (source -> element -> (slot, attribute) bin
-> slot -> sink, with capacities 1, 1, attribute_limit, limit), i.e. a gammoid. Every basis of
a matroid has the same size, the largest number of elements that can be placed; and the
greedy algorithm that takes units in increasing cost and keeps each one that stays independent
yields a basis of least total cost (Rado-Edmonds). So: go through the slots in time order; in
each, add elements while an assignment with one more element in this slot exists, leaving
every earlier slot's count as it is. "Exists" is decided exactly by searching for an
augmenting path in the residual flow network; only when a direct placement fails.

Two things keep it fast. Elements with the same availability and attribute are one *class*
with a count (10,000 elements in 5 time zones are 5 classes, plus one per ticketed element).
And the augmenting-path search runs over slots and bins, not elements: it keeps, per
attribute, how many elements placed in slot k could also run in slot s (`movable`), and per
slot how many unplaced elements could run there (`unplaced_at`), so one search touches at most
slots x attributes nodes. Which element a direct placement takes does not change optimality,
only how often a search is needed: the one whose last usable slot comes first (then the one
with the fewest slots), which makes searches rare.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field

SLOT, BIN = 0, 1
Node = tuple[int, int, int]


@dataclass
class Instance:
    """Slots are 0..slots-1 in time order. Class c: `counts[c]` elements with attribute value
    `attributes[c]` (0 when no attribute limit), usable in the sorted slots `available[c]`."""

    slots: int
    limit: int
    available: list[list[int]]
    counts: list[int]
    attributes: list[int] = field(default_factory=list)
    attribute_limit: int | None = None

    def __post_init__(self) -> None:
        if not self.attributes:
            self.attributes = [0] * len(self.counts)


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
        n_attr = max(inst.attributes, default=0) + 1
        self.bin_limit = inst.attribute_limit or inst.limit
        self.unplaced = list(inst.counts)
        self.load = [0] * inst.slots
        self.bin_load: list[dict[int, int]] = [{} for _ in range(inst.slots)]
        self.in_slot: list[dict[int, int]] = [{} for _ in range(inst.slots)]  # slot -> class -> n
        # unplaced_at[a][s]: unplaced elements of attribute a usable in slot s
        self.unplaced_at = [[0] * inst.slots for _ in range(n_attr)]
        # movable[a][s][k]: elements of attribute a placed in slot k that could run in slot s
        self.movable: list[list[dict[int, int]]] = [
            [{} for _ in range(inst.slots)] for _ in range(n_attr)
        ]
        # direct placement order: last usable slot first, then fewest usable slots
        order = sorted(
            (c for c in range(len(inst.counts)) if inst.available[c] and inst.counts[c]),
            key=lambda c: (inst.available[c][-1], len(inst.available[c]), c),
        )
        self.by_slot: list[list[int]] = [[] for _ in range(inst.slots)]
        self.attrs_at: list[set[int]] = [set() for _ in range(inst.slots)]
        for c in order:
            a = inst.attributes[c]
            for s in inst.available[c]:
                self.by_slot[s].append(c)
                self.attrs_at[s].add(a)
                self.unplaced_at[a][s] += inst.counts[c]
        self.total_unplaced = sum(inst.counts[c] for c in order)
        self.solution = Solution([{} for _ in inst.counts])

    # -- moving elements -------------------------------------------------------------------

    def _put(self, c: int, slot: int, n: int) -> None:
        a = self.inst.attributes[c]
        self.load[slot] += n
        self.bin_load[slot][a] = self.bin_load[slot].get(a, 0) + n
        self.in_slot[slot][c] = self.in_slot[slot].get(c, 0) + n
        placed = self.solution.placed[c]
        placed[slot] = placed.get(slot, 0) + n
        movable = self.movable[a]
        for s in self.inst.available[c]:
            row = movable[s]
            row[slot] = row.get(slot, 0) + n

    def _take(self, c: int, slot: int) -> None:
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
        a = self.inst.attributes[c]
        self.unplaced[c] -= n
        self.total_unplaced -= n
        counts = self.unplaced_at[a]
        for s in self.inst.available[c]:
            counts[s] -= n
        self._put(c, slot, n)

    # -- the greedy ------------------------------------------------------------------------

    def run(self) -> Solution:
        limit, bin_limit = self.inst.limit, self.bin_limit
        for slot in range(self.inst.slots):
            if self.total_unplaced == 0:
                break
            for c in self.by_slot[slot]:
                room = limit - self.load[slot]
                if room == 0:
                    break
                if self.unplaced[c]:
                    a = self.inst.attributes[c]
                    n = min(room, bin_limit - self.bin_load[slot].get(a, 0), self.unplaced[c])
                    if n > 0:
                        self._place_new(c, slot, n)
            while self.load[slot] < limit and self.total_unplaced and self.attrs_at[slot]:
                self.solution.searches += 1
                if not self._augment(slot):
                    break
                self.solution.augmentations += 1
        return self.solution

    def _augment(self, target: int) -> bool:
        """One more element into slot `target`, every other slot's count unchanged, if any
        assignment allows it. Breadth-first search backwards along residual edges from the
        target slot; a node is (SLOT, k, 0) or (BIN, k, a)."""
        bin_limit = self.bin_limit
        start: Node = (SLOT, target, 0)
        parent: dict[Node, Node | None] = {start: None}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            kind, k, a = node
            if kind == SLOT:
                for b in self.attrs_at[k]:  # a unit can enter slot k through a bin with room
                    child = (BIN, k, b)
                    if child not in parent and self.bin_load[k].get(b, 0) < bin_limit:
                        parent[child] = node
                        queue.append(child)
                continue
            if self.unplaced_at[a][k] > 0:
                self._apply(node, parent)
                return True
            for k2 in self.movable[a][k]:  # an element of attribute a in slot k2 could move to k
                child = (BIN, k2, a)
                if child not in parent:
                    parent[child] = node
                    queue.append(child)
            slot_node = (SLOT, k, 0)  # bin (k, a) may give up an element, slot k refilled
            if slot_node not in parent and self.bin_load[k].get(a, 0) > 0:
                parent[slot_node] = node
                queue.append(slot_node)
        return False

    def _apply(self, end: Node, parent: dict[Node, Node | None]) -> None:
        _, k, a = end
        c = next(c for c in self.by_slot[k] if self.unplaced[c] and self.inst.attributes[c] == a)
        self._place_new(c, k, 1)
        node = end
        while (up := parent[node]) is not None:
            if node[0] == BIN and up[0] == BIN:  # an element of attribute a moves k2 -> k
                _, k2, a = node
                k = up[1]
                c = next(
                    c
                    for c in self.in_slot[k2]
                    if self.inst.attributes[c] == a and _has(self.inst.available[c], k)
                )
                self._take(c, k2)
                self._put(c, k, 1)
            node = up


def _has(sorted_slots: list[int], slot: int) -> bool:
    i = bisect_left(sorted_slots, slot)
    return i < len(sorted_slots) and sorted_slots[i] == slot


def solve(inst: Instance) -> Solution:
    return _Solver(inst).run()
