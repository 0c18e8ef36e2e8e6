"""MoCo v3 replication suite: specs, profiles, the shared trainer, results and the renderer."""
import os

# Idle OpenMP threads sleep instead of spin-waiting. Spinning wins a little on an idle machine but collapses
# throughput when another process wants the cores (docs/performance.md has both measurements). Set before torch
# loads its OpenMP runtime; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
