"""The performance bench, ``python -m tools.bench`` (the command line: ``__main__.py``).

- ``measure``: device sync, step timing, the matmul peak, FLOP counting (shared by both benches);
- ``suite``: the suite's side, ``SuiteStep``: the trainer's own ``train_step`` on synthetic in-memory images;
- ``plain``: the plain reference, Algorithm 1 written straightforwardly and independently of the suite's code;
- ``cpu``: the CPU bench and its report (results/bench/README.md);
- ``gpu``: the GPU bench and its report (results/bench/gpu.md).
"""
