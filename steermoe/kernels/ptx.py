"""Global memory traffic of a kernel's loops, read off its PTX.

A loop is a backward branch: the lines from a label down to a ``bra`` that jumps back to it. For each innermost
loop (one that holds no other) :func:`loops` counts the global loads issued synchronously (``ld.global``, the
thread waits for the value before a barrier or use can proceed) and asynchronously (``cp.async`` into shared
memory, ``cp.async.bulk`` / TMA), the global stores and atomics, and the barriers. The steady state of a
kernel is where its rows stream through: the innermost loops.
"""
import re
from dataclasses import dataclass
from typing import List

_LABEL = re.compile(r"^\s*(\$?[\w$]+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$?[\w$]+);")


@dataclass(frozen=True)
class Loop:
    """One loop of a PTX listing: its label, line span and what it issues per iteration."""
    label: str
    first: int
    last: int
    sync_loads: int      # ld.global (incl. ld.global.nc)
    async_loads: int     # cp.async to shared memory, cp.async.bulk (TMA)
    stores: int          # st.global
    atomics: int         # atom.global / red.global
    barriers: int        # bar.sync / barrier.sync

    def contains(self, other: "Loop") -> bool:
        return self is not other and self.first <= other.first and other.last <= self.last


def _count(lines: List[str]) -> dict:
    text = [l.split("//")[0] for l in lines]
    return dict(
        sync_loads=sum(bool(re.search(r"\bld\.global", l)) for l in text),
        async_loads=sum(bool(re.search(r"\bcp\.async\.(?:ca|cg|bulk)", l)) for l in text),
        stores=sum(bool(re.search(r"\bst\.global", l)) for l in text),
        atomics=sum(bool(re.search(r"\b(?:atom|red)\.global", l)) for l in text),
        barriers=sum(bool(re.search(r"\b(?:bar|barrier)\.sync", l)) for l in text))


def loops(ptx: str) -> List[Loop]:
    """Every loop of ``ptx`` (one kernel), outermost first by position."""
    lines = ptx.splitlines()
    labels, back_edge = {}, {}
    for i, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = i
        b = _BRANCH.search(line.split("//")[0])
        if b and b.group(1) in labels:  # a label already seen: a backward branch; the last one closes the loop
            back_edge[b.group(1)] = i
    found = [Loop(label, labels[label], last, **_count(lines[labels[label]:last + 1]))
             for label, last in back_edge.items()]
    return sorted(found, key=lambda l: (l.first, -l.last))


def innermost(ptx: str) -> List[Loop]:
    """The loops of ``ptx`` that contain no other loop."""
    found = loops(ptx)
    return [l for l in found if not any(l.contains(o) for o in found)]
