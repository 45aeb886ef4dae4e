"""The disk tier's admission filter: write a block only once it has been used twice.

Rule (default `admit_after=2`): a block is admitted to disk when at least two
requests used it — computed it or hit it in any tier — while it was among the last
`window` distinct blocks seen. One-off prefixes (a single request's unique tail)
are never written, which keeps disk wear and bytes-per-token down; a multi-turn
conversation's history is used again by its next turn and so is admitted.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable


class AdmissionFilter:
    """Counts uses per block hash in a bounded LRU window."""

    def __init__(self, admit_after: int = 2, window: int = 1 << 18) -> None:
        self.admit_after = admit_after
        self.window = window
        self._uses: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, hashes: Iterable[int]) -> None:
        """One request used these blocks."""
        if self.admit_after <= 1:
            return
        with self._lock:
            uses = self._uses
            for h in hashes:
                uses[h] = uses.pop(h, 0) + 1
            while len(uses) > self.window:
                uses.popitem(last=False)

    def admits(self, seq_hash: int) -> bool:
        return self.admit_after <= 1 or self._uses.get(seq_hash, 0) >= self.admit_after
