"""Tests for data.py: SynthPEDES (traits visible in pixels, determinism, splits, captions), the
three benchmark readers and their errors, transforms, tokenizer and the P x K sampler."""
import hashlib
import json

import data


def test_tiny_synth_reads_back_through_the_cuhk_reader(tiny_synth):
    ann = data.read_annotations("synth", tiny_synth)
    assert len(ann.records) == 24 * 2 * 2
    d = data.load_dataset("synth", tiny_synth)
    assert d.num_classes == 14 and len(d.train) == 14 * 4 * 2
    assert {s.pid for s in d.train} == set(range(14))
    assert len(d.gallery) == 8 * 4 and len(d.queries) == 8 * 4 * 2
