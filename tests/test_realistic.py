"""describe.py on captions written like real annotators' (data.py `--captions realistic`): the
corpus has what real captions have, style clustering finds several styles, the rules backend
leaves no image without descriptions and keeps each text to its side, reruns reuse the clusters."""
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

import data
import describe
from helpers import lexicon
from helpers import styles
from synthetic import captions
from synthetic import synthpedes


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """A realistic SynthPEDES (60 ids, 360 images, 720 captions), described once by the rules
    backend. Returns (root, the printed output, exit status)."""
    root = tmp_path_factory.mktemp("realistic")
    synthpedes.generate_synthpedes(root, num_ids=60, image_size=(32, 16), captions="realistic", progress=False)
    return root


@pytest.fixture(scope="module")
def described(realistic):
    import io
    from contextlib import redirect_stdout
    printed = io.StringIO()
    with redirect_stdout(printed):
        status = describe.main(["--root", str(realistic), "--style-encoder", "minilm"])
    print(printed.getvalue())
    return printed.getvalue(), status


def records(root):
    return data.read_annotations("synth", root).records


def test_realistic_captions_do_what_real_captions_do(realistic):
    recs = records(realistic)
    caps = [c for r in recs for c in r["captions"]]
    assert all(c == " ".join(captions.words(c)) for c in caps)             # lower-case token streams
    vocabulary = Counter(w for c in caps for w in c.split())
    misspelt = [w for w in vocabulary if lexicon.word_category(w) in ("garment", "colour")
                and not any(w in words for _, words in lexicon._LEXICON)
                and not w.endswith("s")]                # read as attributes, only by typo folding
    assert len(misspelt) >= 10, misspelt
    no_body = [c for c in caps if not lexicon.body_words(c)]
    assert 0.05 < len(no_body) / len(caps) < 0.5                         # never mention the body
    joined = [len(" ".join(r["captions"]).split()) for r in recs]
    assert sum(n > 100 for n in joined) / len(joined) > 0.1               # run-ons past the limit
    styles = Counter(s for r in recs for s in r["caption_styles"])
    assert set(styles) == set(captions.REALISTIC_STYLES) and min(styles.values()) > 100
    # two captions of an image disagree: another word for the same garment or colour
    differences = [set(r["captions"][0].split()) ^ set(r["captions"][1].split()) for r in recs
                   if r["caption_styles"][0] == r["caption_styles"][1]]
    assert sum(bool(d & (lexicon.COLOURS | lexicon.GARMENTS)) for d in differences) > 10


def test_style_clustering_finds_several_styles(realistic, described):
    printed, status = described
    report = json.loads(data.descriptions_file("synth", realistic).with_name("style_clusters.json").read_text())
    clusters = int(re.search(r"style clusters: (\d+) from", printed).group(1))
    assert clusters == len(report["clusters"]) >= 3
    assert f"ARI {report['ari']:.3f}" in printed and report["ari"] > 0.6, report["ari"]
    assert status == 0


def test_rules_backend_describes_every_image_and_keeps_texts_to_their_side(realistic, described):
    printed, _ = described
    recs = {r["file_path"]: r for r in records(realistic)}
    written = data.read_descriptions(data.descriptions_file("synth", realistic))
    assert set(written) == set(recs)                                        # zero images left out
    # the identity text names every body trait its captions name (never gender-only then)
    for path, d in written.items():
        named = {w.lower() for c in recs[path]["captions"] for w in lexicon.body_words(c)}
        assert named <= {w.lower() for w in lexicon.WORD_RE.findall(d["identity"])}, (recs[path]["captions"], d)
    quality = lexicon.description_quality(written)
    assert quality["identity_fragment"] < 0.02
    assert quality["identity_clothing"] < 0.01
    assert quality["clothing_pronoun_or_scene"] < 0.01
    assert quality["identity_no_trait"] < 0.10        # the captions of about 3% name no trait
    assert quality["identity_fallback"] > 0           # ... and those are marked
    assert all(len(d["clothing"].split()) <= 100 and len(d["identity"].split()) <= 100
               for d in written.values())
    # stricter than the lexicon: no clothing noun the generator wrote is in an identity text
    clothing_nouns = {w for values in captions.SAY.values() for v in values for w in v.split()
                      if lexicon.word_category(w) == "garment"}
    clothing_nouns |= {w for item in captions.UNUSUAL_ITEMS for w in item.split()[1:]}
    leaks = sum(bool(clothing_nouns & set(d["identity"].lower().split())) for d in written.values())
    assert leaks / len(written) < 0.01
    assert f"identity texts naming clothing {quality['identity_clothing']:.1%}" in printed
    assert f"with a fragment {quality['identity_fragment']:.1%}" in printed


def test_rerun_reuses_the_clusters_and_starts_within_seconds(realistic, described, tmp_path, monkeypatch, capsys):
    root = tmp_path
    shutil.copytree(realistic / "SynthPEDES", root / "SynthPEDES")
    out = data.descriptions_file("synth", root)
    kept = out.read_text().splitlines()[:-40]                             # 40 images left to do
    out.write_text("".join(line + "\n" for line in kept))

    def refit(*args):
        raise AssertionError("the clusters were refitted or the encoder loaded")
    monkeypatch.setattr(styles, "cluster_styles", refit)
    monkeypatch.setattr(styles, "load_style_encoder", refit)
    # no refit, no encoder load: the rerun starts describing at once (timed in the issue note,
    # not here: speed is a benchmark's business, never a timed test's)
    assert describe.main(["--root", str(root), "--style-encoder", "minilm"]) == 0
    printed = capsys.readouterr().out
    assert "read from style_clusters.json" in printed and "described 40, failed 0" in printed
    assert len(data.read_descriptions(out)) == len(records(root))
