"""`selfsight data ...`: argument parsing for the data commands (the work is in `selfsight.data.pack`).

Kept out of the `selfsight.data` package so that building the parser imports no torch.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_data_parser(sub: Any) -> None:
    """Adds `data pack` to the subparsers `sub` of the selfsight parser."""
    d = sub.add_parser("data", help="prepare data: pack an image folder into tar shards")
    commands = d.add_subparsers(dest="data_command", required=True)
    p = commands.add_parser(
        "pack",
        help="pack an image folder into WebDataset-style tar shards for streaming (--data SHARDS_DIR)",
        description="Writes SHARDS_DIR/shard-000000.tar ... (the original image bytes, labels from "
        "first-level subfolders as .cls) and SHARDS_DIR/index.json. Unreadable images are skipped and counted.",
    )
    p.add_argument("folder", metavar="FOLDER", help="image folder (searched recursively)")
    p.add_argument("--out", required=True, metavar="SHARDS_DIR", help="folder to write the shards into")
    p.add_argument("--shard-size", type=int, metavar="N", help="most images per shard (default 10000)")
    p.add_argument("--max-shard-mb", type=float, metavar="MB", help="most megabytes per shard (default: no limit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_data_command(args: argparse.Namespace) -> int:
    """Runs `selfsight data pack` and prints one summary line."""
    from selfsight.data.pack import pack_folder

    limits = {"shard_size": args.shard_size, "max_shard_mb": args.max_shard_mb}
    result = pack_folder(args.folder, args.out, progress=not args.no_progress,
                         **{name: value for name, value in limits.items() if value is not None})
    line = (f"packed {result.num_samples} images into {result.num_shards} shards "
            f"({result.num_bytes / 1e6:.1f} MB) in {result.out}")
    if result.skipped:
        path, reason = result.skipped[0]
        line += f"; skipped {len(result.skipped)} unreadable files, e.g. {path} ({reason})"
    print(line)
    return 0
