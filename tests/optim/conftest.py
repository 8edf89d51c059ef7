"""One intra-op thread for the optimizer tests.

Their kernels are tiny (a few (n, p) frames), so threads add only synchronisation; on a shared
2-core machine an OpenMP barrier waiting for a descheduled thread made a 576 x 32 step 70x
slower (158 ms instead of 2.3 ms).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
