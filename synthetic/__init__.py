"""SynthPEDES, the embedded dataset that knows the truth: people drawn by render.py, captions,
splits and the files written in CUHK-PEDES format by synthpedes.py
(`python -m synthetic.synthpedes`)."""
