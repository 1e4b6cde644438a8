"""`nin data info | fetch | pack`: where a dataset's files are, downloading, WebDataset shards."""
from __future__ import annotations

import argparse

from .common import BIG, number


# --- datasets: info, fetch -------------------------------------------------------------------
def cmd_data_info(args: argparse.Namespace) -> int:
    from ..data.datasets import load_dataset

    if args.name.startswith("wds:"):
        return _wds_info(args.name)
    ds = load_dataset(args.name, args.data_dir, download=False, seed=args.seed)
    c, h, w = ds.image_size
    print(f"{ds.name}: {len(ds.classes)} classes, images {c} x {h} x {w} (uint8)")
    print(f"files: {ds.source}")
    print(f"mean: {', '.join(f'{m:.4f}' for m in ds.mean)}   std: {', '.join(f'{s:.4f}' for s in ds.std)}"
          "   (per channel, [0, 1] units, train split)")
    counts = {s: getattr(ds, s).labels.bincount(minlength=len(ds.classes)).tolist() for s in ("train", "test")}
    width = max(12, *(len(n) for n in ds.classes))
    print(f"{'class':<{width}} {'train':>8} {'test':>8}")
    for i, name in enumerate(ds.classes):
        print(f"{name:<{width}} {counts['train'][i]:>8,} {counts['test'][i]:>8,}")
    print(f"{'total':<{width}} {len(ds.train):>8,} {len(ds.test):>8,}")
    return 0


def _wds_info(name: str) -> int:
    from ..data.shards import open_shards

    ds = open_shards(name)
    c, h, w = ds.image_size
    print(f"{ds.name}: {len(ds.classes)} classes, images {c} x {h} x {w} most common (decoded while training)")
    print(f"shards: {len(ds.train.urls)} train, {len(ds.test.urls)} val in {ds.source}")
    print(f"mean: {', '.join(f'{m:.4f}' for m in ds.mean)}   std: {', '.join(f'{s:.4f}' for s in ds.std)}"
          "   (per channel, [0, 1] units, estimated from a sample of the train split)")
    width = max(12, *(len(n) for n in ds.classes))
    train, test = ds.train.per_class or [0] * len(ds.classes), ds.test.per_class or [0] * len(ds.classes)
    print(f"{'class':<{width}} {'train':>8} {'test':>8}")
    for i, cname in enumerate(ds.classes):
        print(f"{cname:<{width}} {train[i]:>8,} {test[i]:>8,}")
    print(f"{'total':<{width}} {len(ds.train):>8,} {len(ds.test):>8,}")
    return 0


def cmd_data_pack(args: argparse.Namespace) -> int:
    from ..data.shards import pack

    index = pack(args.name, args.out, shard_size=args.shard_size, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {len(index['splits']['train']['shards'])} train + {len(index['splits']['val']['shards'])} val "
          f"shard(s) and index.json to {args.out}; train with --dataset wds:{args.out}")
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from ..data.datasets import load_dataset

    ds = load_dataset(args.name, args.data_dir, download=True)  # raises, with how-to-get-it, when offline
    print(f"{ds.name}: {len(ds.train):,} train + {len(ds.test):,} test images in {ds.source}")
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="datasets: where the files are, counts, mean/std; download")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    names = "fashion-mnist, mnist, cifar10, cifar100, svhn or folder:PATH"

    q = data_sub.add_parser("info", help="where the files were found, counts per split and class, mean/std")
    q.add_argument("name", nargs="?", default="fashion-mnist", metavar="NAME",
                   help=f"{names.replace(' or ', ', ')} or wds:DIR (default fashion-mnist)")
    q.add_argument("--data-dir", metavar="DIR", help="look here first (then $NIN_DATA, ~/.cache/nin, system folders)")
    q.add_argument("--seed", type=number(int, 0, BIG), default=0,
                   help="seed of the train/test split of a folder without one")
    q.set_defaults(func=cmd_data_info)

    q = data_sub.add_parser("fetch", help="download a dataset (MD5-checked), or say how to get it offline")
    q.add_argument("name", nargs="?", default="fashion-mnist", metavar="NAME", help=f"{names} (default fashion-mnist)")
    q.add_argument("--data-dir", metavar="DIR", help="download here (default $NIN_DATA, else ~/.cache/nin)")
    q.set_defaults(func=cmd_data_fetch)

    q = data_sub.add_parser("pack", help="write an image folder as WebDataset tar shards (for wds:DIR)")
    q.add_argument("name", metavar="folder:PATH", help="the image folder (one subfolder per class, or train/ + val/)")
    q.add_argument("--out", required=True, metavar="DIR", help="where to write train-000000.tar ..., val-... and index.json")
    q.add_argument("--overwrite", action="store_true",
                   help="DIR may hold an earlier pack: its shards and index.json are replaced, once the new "
                        "ones are written (other files are kept); without it DIR must be new or empty")
    q.add_argument("--shard-size", type=int, default=1000, metavar="N", help="images per shard (default 1000)")
    q.add_argument("--seed", type=int, default=0,
                   help="seed of the train/test split of a folder without one, and of the training samples' order")
    q.set_defaults(func=cmd_data_pack)
