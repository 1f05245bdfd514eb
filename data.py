"""Data for text-to-image person re-identification: the four datasets, descriptions, batches.

Read top to bottom:
1. Readers for CUHK-PEDES (Li et al., CVPR 2017), ICFG-PEDES (Ding et al., 2021, SSAN),
   RSTPReid (Zhu et al., ACM MM 2021, DSSL) and SynthPEDES (`synthetic/synthpedes.py` writes it
   in the CUHK-PEDES format) in their exact on-disk formats (docs/design.md#checking-the-files),
   joined with the identity/clothing descriptions that `describe.py` writes (paper Sec. III-A);
   the one reader of `descriptions.jsonl`, which describe.py's resume uses too.
2. Training input: transforms (the IRRA recipe, `helpers/transforms.py`), tokenisation, and the
   P x K identity sampler that the triplet loss (paper Eq. 4) needs.

Run:  python data.py --data cuhk      check (decode every image) and summarise a benchmark in data/
      python data.py --data synth     the same for SynthPEDES (made by `python -m synthetic.synthpedes`)
Test: pytest tests/test_data.py
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from helpers import lexicon
from helpers.transforms import EvalTransform, TrainTransform

SPLITS = ("train", "val", "test")


class DatasetError(Exception):
    """Bad or missing data: the message names the file, the record, the field and the fix."""


# ----------------------------------------------------------------------------------------------
# Benchmark readers (docs/design.md#checking-the-files). All four datasets are JSON lists of
# records; each is normalised to {"file_path", "captions", "id", "split"} (+ extra keys kept).

@dataclass(frozen=True)
class Source:
    folder: str
    annotation: str
    path_key: str  # the record key that holds the image path relative to imgs/
    splits: tuple
    obtain: str  # how a person gets the files


SOURCES = {
    "cuhk": Source("CUHK-PEDES", "reid_raw.json", "file_path", SPLITS,
                   "CUHK-PEDES (Li et al., CVPR 2017) is released by its authors on request: "
                   "see https://github.com/ShuangLI59/Person-Search-with-Natural-Language-Description "
                   "and fill in their request form; put reid_raw.json and imgs/ in"),
    "icfg": Source("ICFG-PEDES", "ICFG-PEDES.json", "file_path", ("train", "test"),
                   "ICFG-PEDES (Ding et al., 2021) is released by the authors of SSAN on request: "
                   "see https://github.com/zifyloo/SSAN; put ICFG-PEDES.json and imgs/ in"),
    "rstp": Source("RSTPReid", "data_captions.json", "img_path", SPLITS,
                   "RSTPReid (Zhu et al., ACM MM 2021) is released on request: see "
                   "https://github.com/NjtechCVLab/RSTPReid-Dataset; put data_captions.json and imgs/ in"),
    "synth": Source("SynthPEDES", "reid_raw.json", "file_path", SPLITS,
                    "SynthPEDES is generated here: run `python -m synthetic.synthpedes "
                    "[--root ROOT]`, which writes"),
}
DATASETS = tuple(SOURCES)  # the --data choices; synth (the default) first


@dataclass
class Annotations:
    name: str
    annotation_file: Path
    image_dir: Path
    records: list


def _source(name: str) -> Source:
    if name not in SOURCES:
        raise DatasetError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return SOURCES[name]


def annotation_file(name: str, root="data") -> Path:
    """A dataset's annotation file (reid_raw.json, ICFG-PEDES.json, data_captions.json)."""
    return Path(root) / _source(name).folder / _source(name).annotation


def descriptions_file(name: str, root="data") -> Path:
    """Where describe.py writes the identity/clothing descriptions of a dataset."""
    return Path(root) / _source(name).folder / "descriptions.jsonl"


def _check_record(record, i: int, path: Path, src: Source) -> dict:
    """Validate one record and return it normalised; a bad field is a DatasetError."""
    def bad(field, why):
        return DatasetError(f"{path}: record {i}: field {field!r} {why}. Fix or remove that record "
                            f"(expected the {src.folder} format: id, {src.path_key}, captions, split).")
    if not isinstance(record, dict):
        raise bad("(record)", f"is a {type(record).__name__}, expected a JSON object")
    for key in ("id", src.path_key, "captions", "split"):
        if key not in record:
            raise bad(key, "is missing")
    if not isinstance(record["id"], int) or isinstance(record["id"], bool):
        raise bad("id", f"must be an integer, got {record['id']!r}")
    if not isinstance(record[src.path_key], str) or not record[src.path_key]:
        raise bad(src.path_key, f"must be a non-empty string, got {record[src.path_key]!r}")
    caps = record["captions"]
    if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
        raise bad("captions", "must be a non-empty list of non-empty strings")
    if record["split"] not in src.splits:
        raise bad("split", f"is {record['split']!r}, expected one of {', '.join(src.splits)}")
    out = {k: v for k, v in record.items() if k != src.path_key}
    out["file_path"] = record[src.path_key]
    return out


def read_annotations(name: str, root="data") -> Annotations:
    """Read and validate a dataset's annotation file (images are checked by load_dataset)."""
    src, path = _source(name), annotation_file(name, root)
    folder = path.parent
    if not path.is_file():
        raise DatasetError(f"{src.folder} not found: expected {path} and images under "
                           f"{folder / 'imgs'}/. {src.obtain} {folder}/ (or pass --root).")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e}); re-download or regenerate it.") from None
    if not isinstance(raw, list):
        raise DatasetError(f"{path}: expected a JSON list of records, got a {type(raw).__name__}.")
    records = [_check_record(r, i, path, src) for i, r in enumerate(raw)]
    return Annotations(name, path, folder / "imgs", records)


def read_descriptions(path, on_bad_line=None, text=None) -> dict[str, dict]:
    """describe.py's descriptions.jsonl: file_path -> {"identity", "clothing", ...}. Failed
    images (status "failed" and an "error") are skipped: describe.py retries them. A later line
    for the same image replaces an earlier one (a resumed run). A line that cannot be read is a
    DatasetError, or, with `on_bad_line(n, why)`, reported and skipped (describe.py's resume,
    which redoes that image). `text`: the file's text, when the caller has read it already."""
    path, out = Path(path), {}
    text = path.read_text(encoding="utf-8") if text is None else text
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = _description_entry(line, n, path)
        except DatasetError as error:
            if on_bad_line is None:
                raise
            on_bad_line(n, str(error))
            continue
        if entry is not None:
            out[entry["file_path"]] = entry
    return out


def _description_entry(line: str, n: int, path: Path) -> dict | None:
    """One line of descriptions.jsonl; None for a failed image; a DatasetError when unreadable."""
    try:
        entry = json.loads(line)
    except ValueError as e:
        raise DatasetError(f"{path}: line {n}: not valid JSON ({e}); delete that line and "
                           "rerun describe.py to redo it.") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("file_path"), str):
        raise DatasetError(f"{path}: line {n}: field 'file_path' is missing; every line must "
                           "be a JSON object with file_path, identity and clothing.")
    if "error" in entry or entry.get("status", "ok") != "ok":
        return None
    for key in ("identity", "clothing"):
        if not isinstance(entry.get(key), str):
            raise DatasetError(f"{path}: line {n}: field {key!r} must be a string; delete "
                               "that line and rerun describe.py to redo it.")
    return entry


@dataclass
class Sample:
    image_path: str  # absolute
    pid: int  # 0..num_classes-1
    caption: str
    identity: str | None = None
    clothing: str | None = None


@dataclass
class GalleryImage:
    image_path: str
    pid: int  # the dataset's own identity id
    identity: str | None = None
    clothing: str | None = None
    outfit: int | None = None  # which of the person's outfits, where the dataset knows it


@dataclass
class Query:
    caption: str
    pid: int
    outfit: int | None = None  # the outfit of the image the caption describes


@dataclass
class ReIDData:
    name: str
    image_dir: Path
    train: list
    num_classes: int
    gallery: list
    queries: list


def load_dataset(name: str, root="data", descriptions=True, eval_split="test") -> ReIDData:
    """Training samples (one per caption, ids remapped to 0..N-1) and the evaluation split's
    gallery (every image) and queries (every caption), joined with descriptions.jsonl if present.
    `eval_split="val"` gives the validation split instead (ICFG-PEDES has none)."""
    ann = read_annotations(name, root)
    src = _source(name)
    if eval_split not in src.splits:
        raise DatasetError(f"{src.folder} has no {eval_split!r} split (it has {', '.join(src.splits)}).")
    desc_path = descriptions_file(name, root)
    desc = read_descriptions(desc_path) if descriptions and desc_path.exists() else {}
    image_dir = ann.image_dir.resolve()
    missing = [r["file_path"] for r in ann.records if not (image_dir / r["file_path"]).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} image(s) listed in {ann.annotation_file} are missing, "
                           f"e.g. {image_dir / missing[0]}; copy the dataset's imgs/ folder there.")
    label = {pid: i for i, pid in enumerate(sorted({r["id"] for r in ann.records if r["split"] == "train"}))}
    data = ReIDData(ann.name, image_dir, [], len(label), [], [])
    for r in ann.records:
        path, d = str(image_dir / r["file_path"]), desc.get(r["file_path"], {})
        texts = d.get("identity"), d.get("clothing")  # None where describe.py has not described it
        if r["split"] == "train":
            data.train += [Sample(path, label[r["id"]], c, *texts) for c in r["captions"]]
        elif r["split"] == eval_split:
            # SynthPEDES records "outfit"; cloth-changing sets (PRCC, LTCC) carry a clothes id
            outfit = r.get("outfit", r.get("clothes_id"))
            data.gallery.append(GalleryImage(path, r["id"], *texts, outfit))
            data.queries += [Query(c, r["id"], outfit) for c in r["captions"]]
    return data


def load_validation(name: str, root="data") -> ReIDData | None:
    """The validation split (load_dataset's eval_split="val"), or None where there is none:
    ICFG-PEDES, or an annotation file with no "val" records (a researcher's conversion)."""
    if "val" not in _source(name).splits:
        return None
    val = load_dataset(name, root, eval_split="val")
    return val if val.gallery else None


def load_image(path) -> Image.Image:
    """An RGB image; a missing or unreadable file is a DatasetError naming the path."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(f"image not found: {path}; copy the dataset's imgs/ folder back.") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"image {path} is corrupt or not an image ({e}); replace the file.") from None


def check_images(ann: Annotations, workers: int = 8) -> int:
    """Decode every image of a dataset, as training will (`load_image`); the first one that is
    missing, truncated or not an image is a DatasetError naming the file. Threads overlap the
    file reads and decodes (PIL decodes outside the GIL). Returns the number of images."""
    def decode(path):
        load_image(path)   # the pixels are dropped at once: 40,000 images never sit in memory
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        for _ in pool.map(decode, [ann.image_dir / r["file_path"] for r in ann.records]):
            pass
    finally:   # after an error: the queued images are not decoded
        pool.shutdown(wait=True, cancel_futures=True)
    return len(ann.records)


# ----------------------------------------------------------------------------------------------
# Training input: transforms (helpers/transforms.py: the IRRA recipe without torchvision),
# tokenisation (the tokenizer comes from encoders.load_tokenizer), batches.

def train_transform(size, erase_p: float) -> TrainTransform:
    return TrainTransform(tuple(size), erase_p=erase_p)


def eval_transform(size) -> EvalTransform:
    return EvalTransform(tuple(size))


def tokenize(tokenizer, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    """[CLS] text [SEP], truncated to max_len, padded to the longest: input_ids, attention_mask (B, T)."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


class TrainSet(torch.utils.data.Dataset):
    """One item per training caption: the transformed image, its identity label and two texts,
    the identity and clothing descriptions (paper Sec. III-B). An image that describe.py could not
    describe falls back to its caption split by the lexicon, as a test query is."""

    def __init__(self, samples: list[Sample], transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        return {"image": self.transform(load_image(s.image_path)), "pid": s.pid, **self.texts_of(s)}

    @staticmethod
    def texts_of(s: Sample) -> dict[str, str]:
        if s.identity and s.clothing:
            return {"identity": s.identity, "clothing": s.clothing}
        identity, clothing, _ = lexicon.rules_describe([s.caption])
        return {"identity": s.identity or identity, "clothing": s.clothing or clothing}

    def texts(self) -> list[str]:
        """Every distinct text the items carry, sorted."""
        return sorted({text for s in self.samples for text in self.texts_of(s).values()})


def collate(batch: list[dict], tokenizer, max_len: int) -> dict:
    """Stack a list of TrainSet items: images (B, 3, H, W), pids (B,), two tokenised texts."""
    out = {"images": torch.stack([b["image"] for b in batch]),  # (B, 3, H, W)
           "pids": torch.tensor([b["pid"] for b in batch], dtype=torch.long)}  # (B,)
    for key in ("identity", "clothing"):
        out[key] = tokenize(tokenizer, [b[key] for b in batch], max_len)  # (B, T) each
    return out


class IdentitySampler(torch.utils.data.Sampler):
    """Batches of P identities x K samples, for the batch-hard triplet loss (Hermans et al.
    2017). Each identity's samples are shuffled and cut into groups of K (the last group topped
    up from the same identity, with replacement if it has fewer than K). All groups are shuffled
    together and dealt into batches in that order; a group whose identity is already in the batch
    waits for the next batch. So every sample appears in every epoch. When fewer than P
    identities are left, the batch is completed with fresh groups of other identities.

    With `world` processes (torchrun), process `rank` gets identities rank * P/N .. (rank + 1) *
    P/N - 1 of each batch, whole, with their K samples: the N slices, in rank order, are the
    batch a single process gets, and every process sees every image of its identities (the
    triplet's positives, the fusion's own-identity candidates)."""

    def __init__(self, pids: list[int], p: int, k: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.by_pid = defaultdict(list)
        for i, pid in enumerate(pids):
            self.by_pid[pid].append(i)
        if len(self.by_pid) < p:
            raise ValueError(f"IdentitySampler needs at least P={p} identities, got {len(self.by_pid)}")
        if p % world:
            raise ValueError(f"P={p} identities per batch cannot be split over {world} processes: "
                             f"choose --p as a multiple of {world}")
        self.p, self.k, self.seed, self.rank, self.world = p, k, seed, rank, world
        self.set_epoch(0)

    def set_epoch(self, epoch: int):
        """Plan the epoch's batches: every process plans the same ones (from seed and epoch alone)."""
        self.epoch, self.batches = epoch, self._plan(epoch)

    def _plan(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}/{epoch}")
        groups = []  # (pid, K indices)
        for pid, idx in self.by_pid.items():
            idx = rng.sample(idx, len(idx))
            groups += [(pid, idx[i:i + self.k] + rng.choices(idx, k=max(0, i + self.k - len(idx))))
                       for i in range(0, len(idx), self.k)]
        rng.shuffle(groups)
        batches = []
        while groups:
            batch, chosen, waiting = [], set(), []
            for n, (pid, group) in enumerate(groups):
                if len(chosen) == self.p:
                    waiting += groups[n:]
                    break
                if pid in chosen:
                    waiting.append((pid, group))
                else:
                    chosen.add(pid)
                    batch += group
            others = sorted(set(self.by_pid) - chosen)
            for pid in rng.sample(others, self.p - len(chosen)):  # fill a short batch at the end
                batch += rng.choices(self.by_pid[pid], k=self.k)
            batches.append(batch)
            groups = waiting
        return batches

    def __iter__(self):
        share = self.p // self.world * self.k  # samples of this process: P/N whole identities
        return iter(batch[self.rank * share:(self.rank + 1) * share] for batch in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# ----------------------------------------------------------------------------------------------
# Command line: check a dataset (decode every image) and summarise it.

def report(name: str, root, workers: int = 8) -> Annotations:
    """Decode every image of a dataset and print its identities, images and captions per split
    (training takes one sample per train caption; evaluation's gallery is every test image, its
    queries every test caption) and how many images describe.py has described."""
    ann = read_annotations(name, root)
    start = time.perf_counter()
    count = check_images(ann, workers)
    print(f"decoded all {count} images in {time.perf_counter() - start:.1f} s ({workers} threads)")
    print(f"{ann.name}: {ann.annotation_file}\n{'split':6} {'ids':>6} {'images':>7} {'captions':>9}")
    for split in SPLITS:
        recs = [r for r in ann.records if r["split"] == split]
        if recs:
            print(f"{split:6} {len({r['id'] for r in recs}):6d} {len(recs):7d} "
                  f"{sum(len(r['captions']) for r in recs):9d}")
    path = descriptions_file(name, root)  # read as training reads it: a bad line is a DatasetError
    described = read_descriptions(path) if path.exists() else {}
    print(f"described by describe.py: {sum(r['file_path'] in described for r in ann.records)} of {count} images")
    return ann


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=DATASETS, default="synth", help="dataset (default: synth)")
    parser.add_argument("--root", default="data", help="folder that holds the dataset folders (default: data)")
    parser.add_argument("--workers", type=int, default=8, help="threads that decode the images (default: 8)")
    args = parser.parse_args(argv)
    report(args.data, args.root, args.workers)


def run_command(main) -> None:
    """Run a command line's main(): a DatasetError is one line on stderr and exit status 2."""
    try:
        main()
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_command(main)
