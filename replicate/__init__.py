"""MoCo v3 replication suite: specs, profiles, the shared trainer, results and the renderer."""
import os

# OpenMP threads that spin while waiting turn a busy 2-core machine into a crawl (measured by the bench:
# one BatchNorm 96 ms spinning vs 0.3 ms passive when other processes share the cores). Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
