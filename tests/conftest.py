"""Shared test set-up.

The Triton kernels run on the CPU in interpreter mode, which must be switched on before
`triton.jit` decorates anything, i.e. before `mamba_triton` is first imported. No test may reach
a model hub: everything is built from configs or loaded from the offline MiniLM package.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
