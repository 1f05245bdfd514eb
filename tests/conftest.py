"""Shared test set-up.

The Triton kernels run on the CPU in interpreter mode, which must be switched on before
`triton.jit` decorates anything, i.e. before `mamba_triton` is first imported. No test may reach
a model hub: everything is built from configs or loaded from the offline MiniLM package.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    """A tiny SynthPEDES (24 ids: 14 train / 2 val / 8 test, cloth-changing, 2 outfits x 2
    images each, 64x32 images, 2 captions per image), generated once per test session.
    Returns the data root: `data.load_dataset("synth", root)` / `read_annotations("synth", root)`."""
    from synthetic import synthpedes

    root = tmp_path_factory.mktemp("data")
    synthpedes.generate_synthpedes(root, num_ids=24, outfits_per_id=2, images_per_outfit=2,
                             image_size=(64, 32), regime="cloth-changing", seed=0, progress=False)
    return root
