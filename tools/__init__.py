"""Tools that measure the method but are not part of it, each run as `python -m tools.NAME`:
the study (Tables II-V), the training and scan benchmarks, the kernels' compile check and the
chunked scan it compares with."""
