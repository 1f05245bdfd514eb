"""SynthPEDES, the embedded dataset that knows the truth: people drawn by synthetic/render.py,
their captions in synthetic/captions.py, splits and the files in CUHK-PEDES format written by
synthetic/synthpedes.py (`python -m synthetic.synthpedes`)."""
