"""Stage demo: generate the built-in demo set (params section ``demo``) into --out."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from audiocnn import config, stage
from audiocnn.demo import DemoParams, generate_demo


def main(argv: Sequence[str] | None = None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--out", type=Path, required=True, help="output folder (dataset/demo)")
    args = p.parse_args(argv)
    generate_demo(config.load(args.params, "demo", DemoParams), args.out)


if __name__ == "__main__":
    stage.run(main)
