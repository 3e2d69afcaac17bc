#!/usr/bin/env python3
"""One rank of test_runtime.py under `muster run -np 2`: progress, the notice check and the
agreed stop step through the muster package."""

import os
import signal

import muster

rank = muster.env().rank
muster.install_sigterm_handler()
muster.progress(3, 10, loss=1.5, tokens_per_s=100.0)
first = muster.agree_to_stop()
assert not muster.notice_seen()
if rank == 1:
    os.kill(os.getpid(), signal.SIGTERM)  # a notice that only rank 1 sees
seen = muster.notice_seen()
agreed = muster.agree_to_stop()
reason = muster._core.notice_reason()
print(f"rank {rank}: first={first} seen={seen} agreed={agreed} reason={reason!r}", flush=True)
