"""Worker of test_distributed.test_shutdown_waits_for_every_rank: rank 1 takes 3 s longer to destroy its process
group; every rank prints how long ``fat5.distributed.shutdown`` held it."""

import os
import time

import torch.distributed as dist

from fat5 import distributed as D

info = D.init_distributed("cpu")
destroy = dist.destroy_process_group


def slow_destroy():
    destroy()
    if info.rank == 1:
        time.sleep(3)


dist.destroy_process_group = slow_destroy
t0 = time.perf_counter()
D.shutdown()
# one write of the whole line: the two ranks share torchrun's stdout, and a print's text and newline may go out
# as two writes (unbuffered stdout), which lets the other rank's line land between them
os.write(1, f"rank {info.rank} held {time.perf_counter() - t0:.2f}\n".encode())
