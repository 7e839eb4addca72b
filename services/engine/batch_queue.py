"""BatchQueue: the bounded hand-off of knowledge batches from teacher replicas to one student rank.

Plain, thread-safe class; placed as an actor with a thread pool (``max_concurrency``) so blocking ``put``
and ``get`` calls from many replicas and one rank wait side by side. The bound is what keeps
teachers from running arbitrarily far ahead of the student (memory and staleness).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any


class BatchQueue:
    def __init__(self, *, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("queue size must be at least 1")
        self.maxsize = maxsize
        self.items: collections.deque[Any] = collections.deque()
        self.cond = threading.Condition()
        self.closed = False
        self.put_count = 0
        self.get_count = 0

    def put(self, item: Any, timeout: float) -> bool:
        """Append ``item``, waiting up to ``timeout`` s for room; False if it never came or the queue closed."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.items) >= self.maxsize and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            if self.closed:
                return False
            self.items.append(item)
            self.put_count += 1
            self.cond.notify_all()
            return True

    def get(self, timeout: float) -> Any | None:
        """The oldest item, waiting up to ``timeout`` s; None if none came."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not self.items:
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    return None
                self.cond.wait(left)
            item = self.items.popleft()
            self.get_count += 1
            self.cond.notify_all()
            return item

    def close(self) -> int:
        """Refuse further puts, wake every waiter; returns how many items were left unconsumed."""
        with self.cond:
            self.closed = True
            left = len(self.items)
            self.cond.notify_all()
            return left

    def depth(self) -> int:
        with self.cond:
            return len(self.items)

    def stats(self) -> dict[str, int]:
        with self.cond:
            return {"depth": len(self.items), "puts": self.put_count, "gets": self.get_count}
