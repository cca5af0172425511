"""Rebuild the data shipped in ``s3prl_stimulus/data/`` from the project's ``shared/crema_d`` inputs.

Usage: ``python tools/build_packaged_data.py ../shared`` then paste the printed checksums into
``s3prl_stimulus/resources.py``. Output is byte-reproducible (gzip mtime 0, fixed row order).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import sys
from pathlib import Path

import pandas as pd

from s3prl_stimulus import CLASSES

DATA = Path(__file__).resolve().parents[1] / "s3prl_stimulus" / "data"
# CREMA-D's one-letter vote columns, in CLASSES order.
LETTERS = ("A", "S", "D", "F", "N", "H")
QUERY_TYPES = {1: "voice", 2: "face", 3: "av"}


def _write_gz_csv(frame: pd.DataFrame, name: str) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as gz:
        gz.write(frame.to_csv(index=False, lineterminator="\n").encode())
    (DATA / name).write_bytes(buf.getvalue())


def paper_votes(shared: Path) -> pd.DataFrame:
    src = pd.read_csv(shared / "crema_d" / "paper_vote_counts.csv")
    out = pd.DataFrame({"clip": src["FileName"]})
    for stim in QUERY_TYPES.values():
        for cls, letter in zip(CLASSES, LETTERS):
            out[f"{stim}_{cls}"] = src[f"{stim}_{letter}"].astype(int)
    return out.sort_values("clip").reset_index(drop=True)


def crema_d_votes(shared: Path) -> pd.DataFrame:
    src = pd.read_csv(shared / "crema_d" / "tabulatedVotes.csv")
    query_type = src.iloc[:, 0] // 100000
    parts = []
    for qt, stim in QUERY_TYPES.items():
        rows = src[query_type == qt].set_index("fileName")
        parts.append(rows[list(LETTERS)].set_axis([f"{stim}_{c}" for c in CLASSES], axis=1))
    out = pd.concat(parts, axis=1).astype(int).rename_axis("clip").reset_index()
    return out.sort_values("clip").reset_index(drop=True)


def folds(shared: Path) -> pd.DataFrame:
    src = pd.read_csv(shared / "crema_d" / "emo_superb_folds.csv")
    return src.rename(columns={"FileName": "clip"}).sort_values("clip").reset_index(drop=True)


def manifest(shared: Path) -> pd.DataFrame:
    src = pd.read_csv(shared / "crema_d" / "audiowav_manifest.csv")
    return src.rename(columns={"FileName": "clip"}).sort_values("clip").reset_index(drop=True)


def main(shared: Path) -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    _write_gz_csv(paper_votes(shared), "votes_paper.csv.gz")
    _write_gz_csv(crema_d_votes(shared), "votes_crema_d.csv.gz")
    _write_gz_csv(folds(shared), "folds.csv.gz")
    _write_gz_csv(manifest(shared), "audiowav_manifest.csv.gz")
    shutil.copyfile(shared / "crema_d" / "LICENSE-CREMA-D.txt", DATA / "LICENSE-CREMA-D.txt")
    shutil.copyfile(shared / "reference_labels" / "LICENSE-Stimulus-Modality-Matters.txt",
                    DATA / "LICENSE-Stimulus-Modality-Matters.txt")
    for path in sorted(DATA.glob("*.csv.gz")):
        print(f'    "{path.name}": "{hashlib.sha256(path.read_bytes()).hexdigest()}",')


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared"))
