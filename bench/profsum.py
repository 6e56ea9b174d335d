"""Summarise a py-spy raw (collapsed stacks) profile: top functions by self and by inclusive samples.

    python -m bench.profsum bench/profiles/s1-server1.txt [--top 25] [--filter server/,models/,handlers/]

A frame is `function (file:line)`; lines are dropped so each function is counted once per stack.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")
SITE_MARKERS = ("site-packages/", "lib/python3")


def short(frame: str) -> str:
    m = FRAME_RE.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in SITE_MARKERS:
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "lib/python3":
                path = "stdlib:" + path.split("/", 1)[-1]
    return f"{m.group('func')} ({path})"


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [short(f) for f in stack.split(";") if f.strip()]
        # py-spy puts the thread name first ("process 123:..."/"thread (0x..)"); keep code frames only
        frames = [f for f in frames if "(" in f and not f.startswith(("process ", "thread "))]
        if not frames or frames[-1].startswith("_worker (concurrent/futures/thread.py"):
            continue  # an idle thread-pool worker waiting for work (py-spy cannot always tell)
        stacks.append((frames, int(count)))
    return stacks


def summarise(path: Path, top: int, focus: list[str]) -> str:
    stacks = load(path)
    total = sum(c for _, c in stacks) or 1
    self_counts: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for frames, count in stacks:
        if frames:
            self_counts[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    lines = [f"{path.name}: {total} samples (~{total / 97:.1f} s of CPU at 97 Hz)"]
    lines.append(f"-- top {top} by self time")
    for f, c in self_counts.most_common(top):
        lines.append(f"{100 * c / total:6.1f}%  {f}")
    lines.append(f"-- top {top} by inclusive time" + (f" (frames in {', '.join(focus)})" if focus else ""))
    shown = 0
    for f, c in incl.most_common():
        if focus and not any(x in f for x in focus):
            continue
        lines.append(f"{100 * c / total:6.1f}%  {f}")
        shown += 1
        if shown >= top:
            break
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--filter", default="", help="comma-separated substrings for the inclusive list")
    args = parser.parse_args()
    focus = [x for x in args.filter.split(",") if x]
    for p in args.profiles:
        print(summarise(p, args.top, focus))
        print()


if __name__ == "__main__":
    main()
