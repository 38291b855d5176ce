"""Stage ingest: decode and check every recording under --source; write the manifest, the rejects and metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from audiocnn import config, ingest, stage


def main(argv: Sequence[str] | None = None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--source", required=True, help="folder with the recordings (read-only)")
    p.add_argument("--manifest", required=True, help="output: manifest csv")
    p.add_argument("--rejected", required=True, help="output: rejected files csv (path, reason)")
    p.add_argument("--metrics", required=True, help="output: metrics json")
    args = p.parse_args(argv)
    params = config.load(args.params, "ingest", ingest.IngestParams)
    ingest.run(Path(args.source), params, Path(args.manifest), Path(args.rejected), Path(args.metrics))


if __name__ == "__main__":
    stage.run(main)
