"""Command line: ``python -m data_index {build,index,status,search,layers,export}``.

User errors print ``error: <message>`` on stderr and exit with status 2 (no traceback): bad
arguments are refused by the parser (:mod:`cli.args`) before any work starts, and
:class:`ExplorerError` / :class:`OSError` from the work are reported the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from demo_world.workspace import is_embedded
from explorer_core.errors import ExplorerError
from explorer_core.trust import user_code_allowed

from .args import CliParser, int_range, output_file, positive_int, workspace_arg
from .common import ProgressBar, open_workspace

_INDEX_KINDS = ["auto", "exact", "flat", "ivf-sq8", "ivf-pq"]


def _memory_size(text: str) -> str:
    """``--memory-budget 2GB``: a positive size (GB/GiB/MB/...; bytes without a unit)."""
    from data_index.vector_index import parse_bytes

    try:
        ok = parse_bytes(text) > 0
    except ExplorerError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not ok:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive size; write e.g. 2GB")
    return text


def _add_index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", choices=_INDEX_KINDS, default="auto",
                   help="search index per layer: auto (exact for small catalogs, else IVF with "
                        "8-bit or 4-bit codes under --memory-budget, re-ranked exactly), exact "
                        "(= flat), ivf-sq8, ivf-pq")
    p.add_argument("--memory-budget", type=_memory_size, default="2GB",
                   help="resident memory the search index may use (default 2GB)")


def _layer_list(text: str) -> list[str]:
    """``--layers a,b,c``: the non-empty, comma-separated layer names (each once)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give at least one layer, comma-separated")
    if len(set(items)) != len(items):
        raise argparse.ArgumentTypeError(f"'{text}' names a layer twice")
    return items


_NEW_SETTINGS = ("model", "layer", "layers", "images", "crop_size", "stride", "image_size",
                 "storage")


def _cmd_build(args: argparse.Namespace) -> int:
    from data_index.workspace import Workspace, resolve_workspace
    from explorer_core.models import shared_model

    if args.merge and (args.shards or args.ray is not None):
        raise ExplorerError("--merge combines finished shards; run it alone (without --shards, "
                            "--shard or --ray)")
    if (args.shards is None) != (args.shard is None):
        raise ExplorerError("A sharded build needs both --shards N and --shard I (0..N-1)")
    if args.shards is not None and args.shard >= args.shards:
        raise ExplorerError(f"--shard {args.shard} is outside 0..{args.shards - 1}")
    if args.shards is not None and args.ray is not None:
        raise ExplorerError("--ray schedules every chunk itself; leave out --shards/--shard")
    root = resolve_workspace(args.workspace)
    exists = (root / "workspace.toml").is_file() or is_embedded(args.workspace)
    if exists and not any(getattr(args, n) for n in _NEW_SETTINGS):
        ws = open_workspace(args.workspace, quiet=args.quiet)
        if args.mode and args.mode != ws.mode:
            raise ExplorerError(f"Workspace '{ws.name}' uses mode {ws.mode}; create another "
                                "workspace for another mode")
        return _run_build(ws, args, None)
    missing = [f"--{n}" for n in ("model", "images") if not getattr(args, n)]
    if missing:
        raise ExplorerError(f"New workspace '{args.workspace}' needs {' and '.join(missing)} "
                            "(and --layers / --layer unless the model's recommended layer "
                            "will do)")
    lm = shared_model(args.model, args.device)
    layers = list(args.layers or ([args.layer] if args.layer else []))
    if not layers and lm.recommended_layer:
        layers = [lm.recommended_layer]
    if not layers:
        raise ExplorerError("Give --layers (or --layer); see 'python -m data_index layers "
                            "--model SPEC'")
    for name in layers:
        lm.layer_info(name)  # an unknown layer: an error listing the candidates
    order = {info.name: i for i, info in enumerate(lm.candidate_layers())}
    layers.sort(key=lambda n: order.get(n, len(order)))  # model forward order
    if args.layer and args.layer not in layers:
        raise ExplorerError(f"--layer {args.layer} (the default layer) is not one of --layers "
                            f"{','.join(layers)}; add it there")
    ws = Workspace.create(root, model=lm.spec, layer=args.layer or layers[0], layers=layers,
                          images=args.images, input_size=lm.input_size,
                          mode=args.mode or "crop", device=args.device,
                          image_size=args.image_size, crop_size=args.crop_size,
                          stride=args.stride, storage=args.storage or "float16")
    return _run_build(ws, args, lm)


def _run_build(ws, args: argparse.Namespace, lm) -> int:
    from data_index.catalog import build_catalog, merge_shards
    from explorer_core.models import shared_model

    if lm is None:
        lm = shared_model(ws.model, args.device if args.device != "auto" else ws.device)
    label = f"catalog {ws.name} ({ws.mode})"
    with ProgressBar(label, args.quiet) as bar:
        if args.merge:
            st = merge_shards(ws, model=lm, progress=bar, index=args.index,
                              memory_budget=args.memory_budget)
        elif args.ray is not None:
            from data_index.ray_build import build_catalog_ray

            st = build_catalog_ray(ws, address=args.ray or None, workers=args.ray_workers,
                                   batch_size=args.batch_size, device=args.device,
                                   progress=bar, limit=args.limit, model=lm,
                                   rebuild=args.rebuild, index=args.index,
                                   memory_budget=args.memory_budget)
        else:
            st = build_catalog(ws, batch_size=args.batch_size, progress=bar, limit=args.limit,
                               model=lm, rebuild=args.rebuild, shards=args.shards or 1,
                               shard=args.shard or 0, index=args.index,
                               memory_budget=args.memory_budget)
    if st.already_complete:
        print(f"catalog of '{ws.name}' already complete: {st.n_images} images, "
              f"{st.n_crops} crops, {st.n_skipped} skipped (use --rebuild to redo)")
    elif args.merge:
        print(f"merged {st.shards} shards into the catalog of '{ws.name}': {st.n_images} images, "
              f"{st.n_crops} crops, {st.n_skipped} skipped, {st.seconds:.1f} s")
    elif st.shard is not None:
        print(f"built shard {st.shard} of {st.shards} of '{ws.name}': {st.n_images} images, "
              f"{st.n_crops} crops, {st.n_skipped} skipped, {st.chunks_resumed}/{st.n_chunks} "
              f"chunks resumed, {st.seconds:.1f} s; when every shard is built: python -m "
              f"data_index build --workspace {ws.root} --merge")
    else:
        print(f"built catalog of '{ws.name}': {st.n_images} images, {st.n_crops} crops, "
              f"{st.n_skipped} skipped, {st.chunks_resumed}/{st.n_chunks} chunks resumed, "
              f"{st.seconds:.1f} s")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from data_index.catalog import Catalog

    with Catalog.open(open_workspace(args.workspace)) as cat:
        st = cat.status()
        counts = st.pop("predicted_counts")
        if args.json:
            st["predicted_counts"] = counts
            st["skipped_files"] = cat.skipped()
            print(json.dumps(st, indent=2))
            return 0
        dims, sizes, index = st.pop("dims"), st.pop("store_bytes"), st.pop("index")
        recall, ibytes = st.pop("recall_at_8"), st.pop("index_bytes")
        st.pop("dim")
        st["layers"] = ", ".join(
            f"{k} ({dims[k]} dims, {sizes[k] / 2**20:.1f} MiB, index {index[k]}"
            + (f" {ibytes[k] / 2**20:.1f} MiB" if ibytes[k] else "")
            + (f", recall@8 {recall[k]:.3f}" if recall[k] is not None else "") + ")"
            + (" [default]" if k == st["layer"] else "") for k in st["layers"])
        for k, v in st.items():
            print(f"{k:14s} {v}")
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:10]
        print(f"{'classes':14s} {len(counts)} predicted; most frequent: "
              + ", ".join(f"{c}:{n}" for c, n in top))
        for path, reason in cat.skipped()[:20]:
            print(f"skipped        {path}: {reason}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    import numpy as np

    from data_index.catalog import Catalog
    from data_index.search import CropSearch

    with Catalog.open(open_workspace(args.workspace)) as cat:
        store = cat.store(args.layer)  # an unknown layer: an error listing the catalog's
        pos = int(np.searchsorted(store.ids, args.crop_id))
        if pos >= len(store) or store.ids[pos] != args.crop_id:
            p = cat.grid.per_image
            raise ExplorerError(f"No crop {args.crop_id} in the catalog; crop ids are "
                                f"image_id * {p} + k (k in 0..{p - 1}, row-major) of indexed "
                                "images")
        search = CropSearch(cat, layer=args.layer, kind=args.kind)
        m = min(args.m, search.ntotal)  # never more results than crops
        res = search.search(store.rows([pos]), m=m, exclude_class=args.exclude_class)[0]
        print(f"{'rank':>4} {'crop':>8} {'score':>7} {'crop_pred':>9} {'img_pred':>8}  path [box]")
        for r, c in enumerate(res):
            print(f"{r:>4} {c.crop_id:>8} {c.score:7.4f} {c.crop_pred:>9} {c.image_pred:>8}  "
                  f"{_shown(c.path)} {list(c.box)}")
    return 0


def _shown(path: str) -> str:
    """A path for the terminal: bytes that are not UTF-8 as ``\\xNN`` (print would fail)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _cmd_index(args: argparse.Namespace) -> int:
    from data_index.catalog import reindex_catalog

    ws = open_workspace(args.workspace, quiet=args.quiet)
    with ProgressBar(f"search index of {ws.name}", args.quiet) as bar:
        stamps = reindex_catalog(ws, args.index, args.memory_budget,
                                 [args.layer] if args.layer else None, progress=bar)
    for key in sorted(k for k in stamps if k.startswith("index:")):
        layer = key.split(":", 1)[1]
        rec = stamps.get(f"recall_at_8:{layer}") or "?"
        size = int(stamps.get(f"index_bytes:{layer}") or 0)
        print(f"{layer}: {stamps[key]} index, {size / 2**20:.1f} MiB, recall@8 {rec} "
              f"({stamps.get(f'index_detail:{layer}')})")
    return 0


def _cmd_layers(args: argparse.Namespace) -> int:
    from explorer_core.models import shared_model

    lm = shared_model(args.model, args.device)
    for info in lm.candidate_layers():
        print(info.label())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from data_index.catalog import Catalog

    with Catalog.open(open_workspace(args.workspace)) as cat:
        print(cat.export(args.table, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m data_index",
                  description="Crop catalog: build, inspect and search.")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="create a workspace and build (or resume) its catalog")
    b.add_argument("--workspace", required=True, type=workspace_arg,
                   help="workspace name or folder")
    b.add_argument("--model", help="model spec (e.g. efficientnet_lite0, resnet50:weights.pth)")
    b.add_argument("--layers", type=_layer_list,
                   help="comma-separated hidden layers, embedded in one forward (default: the "
                        "model's recommended one)")
    b.add_argument("--layer", help="the default layer (alone: a one-layer catalog)")
    b.add_argument("--images", help="image folder (recursive; labels.csv or class folders)")
    b.add_argument("--mode", choices=["crop", "cell"], help="crop embedding mode (default crop)")
    b.add_argument("--image-size", type=positive_int, default=None,
                   help="side images are resized / center-cropped to (default: model input)")
    b.add_argument("--crop-size", type=positive_int, default=None,
                   help="crop side in pixels (default: image size // 3)")
    b.add_argument("--stride", type=positive_int, default=None,
                   help="pixels between crops (default: the crop size; smaller: overlap)")
    b.add_argument("--storage", choices=["float16", "float32"], default=None,
                   help="embedding storage (default float16)")
    b.add_argument("--shards", type=int_range(2, 100_000), default=None,
                   help="split the build into N shards (with --shard I); merge with --merge")
    b.add_argument("--shard", type=int_range(0), default=None,
                   help="the shard this process builds, 0..N-1")
    b.add_argument("--merge", action="store_true",
                   help="merge the finished shards into the catalog")
    b.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="compute the chunks on Ray (no ADDRESS: a local Ray on this machine); "
                        "needs 'pip install ray'")
    b.add_argument("--ray-workers", type=positive_int, default=None,
                   help="Ray workers, each holding one model (default: one per GPU, else one "
                        "per 2 CPUs)")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda")
    b.add_argument("--batch-size", type=positive_int, default=32,
                   help="images per forward (>= 1; at most one chunk of 256 is stacked)")
    b.add_argument("--limit", type=positive_int, default=None,
                   help="index only the first N files (N >= 1)")
    b.add_argument("--rebuild", action="store_true",
                   help="delete the catalog and build anew (refused while the workspace is in "
                        "use by another process)")
    _add_index_args(b)
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_build)
    ix = sub.add_parser("index", help="(re)build the search index of a catalog's layers under "
                                      "another kind or memory budget")
    ix.add_argument("--workspace", required=True, type=workspace_arg)
    ix.add_argument("--layer", default=None, help="one layer (default: every layer)")
    _add_index_args(ix)
    ix.add_argument("--quiet", action="store_true", help="no progress bar")
    ix.set_defaults(func=_cmd_index)
    s = sub.add_parser("status", help="counts, completeness, skipped files")
    s.add_argument("--workspace", required=True, type=workspace_arg)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_status)
    q = sub.add_parser("search", help="nearest crops to a crop's embedding")
    q.add_argument("--workspace", required=True, type=workspace_arg)
    q.add_argument("--crop-id", type=int_range(0), required=True,
                   help="image_id * crops per image + k (default grid: image_id * 9 + row * 3 "
                        "+ col) of an indexed image")
    q.add_argument("-m", type=positive_int, default=8,
                   help="number of nearest crops (>= 1; capped at the number of crops)")
    q.add_argument("--exclude-class", type=int_range(0, 2**31 - 1), default=None)
    q.add_argument("--kind", choices=["auto", "flat", "exact", "ivf", "ivf-sq8", "ivf-pq"],
                   default="auto",
                   help="auto: the index the build chose (see status); flat/exact: exact scan "
                        "over the stored embeddings; ivf-sq8/ivf-pq: that built index; ivf: "
                        "an uncompressed approximate IVF built on first use")
    q.add_argument("--layer", default=None,
                   help="one of the catalog's layers (default: its default layer)")
    q.set_defaults(func=_cmd_search)
    ly = sub.add_parser("layers", help="candidate layers of a model with their shapes")
    ly.add_argument("--model", required=True)
    ly.add_argument("--device", default="cpu")
    ly.set_defaults(func=_cmd_layers)
    e = sub.add_parser("export", help="write a catalog table to .csv or .parquet")
    e.add_argument("--workspace", required=True, type=workspace_arg)
    e.add_argument("--table", required=True, choices=["images", "image_classes", "crops",
                                                      "skipped", "chunks", "meta"])
    e.add_argument("--out", required=True, type=output_file(".csv", ".parquet", ".pq"),
                   help="a .csv or .parquet file (its folder is created)")
    e.set_defaults(func=_cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # the parser's one-line error (exit 2) or --help (exit 0)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        with user_code_allowed():  # the user typed the spec (or owns the workspace): it may run
            return args.func(args)
    except ExplorerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early (| head): stop quietly, like a SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # a file the user named or owns: unreadable, disk full, ...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same build command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
