"""MoCo v3 replication suite: specs, profiles, the shared trainer, results and the renderer."""
