"""What an agent keeps of what the daemon delivered: functions and input batches."""

from __future__ import annotations

import collections
from typing import Any

FUNCTIONS_KEPT = 64
BATCH_BYTES = 512 * 1024**2  # input batches kept to hand to workers


class BlobCache:
    """Pickled functions and input batches, by key; batches within a byte budget."""

    def __init__(self, batch_bytes: int = BATCH_BYTES) -> None:
        self.functions: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.batches: collections.OrderedDict[tuple[str, int], Any] = collections.OrderedDict()
        self.batch_files: dict[tuple[str, int], str] = {}  # batches readable as files on this host
        self.batch_bytes = 0
        self.max_batch_bytes = batch_bytes

    def add_function(self, function_hash: str, blob: Any) -> None:
        self.functions[function_hash] = blob
        self.functions.move_to_end(function_hash)
        while len(self.functions) > FUNCTIONS_KEPT:
            self.functions.popitem(last=False)

    def add_batch(self, key: tuple[str, int], blob: Any) -> None:
        if key in self.batches:
            return
        self.batches[key] = blob
        self.batch_bytes += len(blob)
        while self.batch_bytes > self.max_batch_bytes and len(self.batches) > 1:
            _, old = self.batches.popitem(last=False)
            self.batch_bytes -= len(old)

    def add_batch_file(self, key: tuple[str, int], path: str) -> None:
        self.batch_files[key] = path

    def forget_job(self, job_id: str) -> None:
        for key in [k for k in self.batches if k[0] == job_id]:
            self.batch_bytes -= len(self.batches.pop(key))
        for key in [k for k in self.batch_files if k[0] == job_id]:
            del self.batch_files[key]

    def statistics(self) -> dict[str, int]:
        return {"cached_functions": len(self.functions), "cached_batches": len(self.batches)}
