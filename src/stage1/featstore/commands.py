"""Click commands of the feature store: extract, info, split, export-features, import-features.

Only click and the stdlib load at import time; torch, zarr and numpy load inside each command so
`stage1 --help` stays light.
"""
from __future__ import annotations

import json

import click

from stage1._core.constants import (
    DEFAULT_CHUNK_ROWS,
    DEFAULT_FEATURE_DTYPE,
    DEFAULT_FRACTIONS,
    DEFAULT_MAX_PIXELS,
    FEATURE_DTYPES,
    SPLIT_NAMES,
)
from stage1.cli.errors import command

from .limits import MAX_BYTES
from stage1.cli.options import (
    batch_size_option,
    device_option,
    image_size_option,
    seed_option,
    threads_option,
    workers_option,
)


def _int_list(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise click.BadParameter(f"{text!r}: give comma-separated integers", param_hint=name) from None


@command()
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False), help="Folder the image paths are relative to.")
@click.option("--labels", type=click.Path(dir_okay=False), default=None,
              help="CSV of path,label[,split] (header optional; label 0, 1 or empty = unlabelled). "
                   "Without it, every image under --images is extracted unlabelled.")
@click.option("--backbone", required=True, type=click.Path(exists=True, file_okay=False), help="Local Hugging Face model folder (DINOv3, DINOv2, ...).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Store folder; an existing store with the same settings is resumed.")
@batch_size_option(32, help="Images per forward pass (and per decode window).")
@image_size_option()
@click.option("--dtype", type=click.Choice(FEATURE_DTYPES), default=DEFAULT_FEATURE_DTYPE, show_default=True, help="Stored feature precision.")
@click.option("--views", default=1, show_default=True, type=int, help="Views per image: 1 clean + N-1 validator-style distorted views.")
@click.option("--view-levels", default=None,
              help="Distortion levels (0-3) of the extra views: drawn uniformly per view (validator recipes; "
                   "default 0,1,2,3 = p 0.25 each) or cycled (validator-v1; default 1,2,3). A resume keeps the store's.")
@click.option("--view-recipe", default=None,
              help="How extra views are made: validator (the subnet's distortions + JPEG q75; default for new "
                   "stores), validator-flips (same, flips firing), validator-v1 (0.1.0's). A resume keeps the store's.")
@click.option("--preprocess", "preprocess", type=click.Choice(["squash", "validator"]), default=None,
              help="View 0: squash (whole image resized; default for new stores) or validator (centre square, "
                   "224 px bilinear, JPEG q75, as a served challenge), then the --image-size resize. A resume keeps the store's.")
@click.option("--view-seed", default=0, show_default=True, type=int, help="Base seed of the views (each view's seed mixes it with the image hash).")
@device_option(help="cpu, or cuda / cuda:N (the backbone runs under bf16 autocast).")
@workers_option(2)
@threads_option(help="Torch threads for the forward pass (0 = torch's default).")
@click.option("--chunk-rows", default=DEFAULT_CHUNK_ROWS, show_default=True, type=int, help="Rows per Zarr chunk and per durable commit.")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=int, help="Larger images are quarantined as decompression bombs.")
@click.option("--max-bytes", default=MAX_BYTES, show_default=True, type=int,
              help="Larger image files are quarantined (\"too large\") without being read.")
@click.option("--draft/--no-draft", default=True, show_default=True, help="Decode large JPEGs at reduced scale (libjpeg draft mode) before resizing.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def extract(images, labels, backbone, out, batch_size, image_size, dtype, views, view_levels, view_recipe, preprocess,
            view_seed, device, workers, threads, chunk_rows, max_pixels, max_bytes, draft, quiet) -> None:
    """Run a frozen backbone over images and store CLS features in a Zarr store.

    Rows are committed in chunk-sized blocks; interrupting and re-running the same command resumes
    where the last commit stopped, and refuses if any setting (backbone weights, preprocessing,
    views, image list) differs. Unreadable images are quarantined and listed by `info`.
    """
    from .extract import ExtractConfig, run_extract

    cfg = ExtractConfig(
        images=images, labels=labels, backbone=backbone, out=out, batch_size=batch_size, image_size=image_size,
        dtype=dtype, views=views, view_seed=view_seed, view_recipe=view_recipe, preprocess=preprocess,
        view_levels=None if view_levels is None else _int_list(view_levels, "--view-levels"),
        device=device, workers=workers, threads=threads, chunk_rows=chunk_rows, max_pixels=max_pixels, max_bytes=max_bytes, draft=draft,
        progress=not quiet,
    )
    summary = run_extract(cfg)
    q = summary["quarantined"]
    click.echo(
        f"{summary['store']}: {summary['rows']} rows committed of {summary['listed']} listed, "
        f"{q} quarantined" + (" (see `info`)" if q else "") +
        (f"; {summary['processed']} images in {summary['seconds']} s ({summary['img_per_s']} img/s)" if summary["processed"] else "; already complete")
    )


def _format_info(info: dict) -> str:
    prov = info["provenance"]
    bb = prov.get("backbone") if isinstance(prov.get("backbone"), dict) else {}  # hand-edited: shown as absent
    pre = prov.get("preprocessing") if isinstance(prov.get("preprocessing"), dict) else {}
    lines = [
        f"store        {info['path']}",
        f"rows         {info['rows']} committed of {info['listed']} listed" + ("" if info["complete"] else "  (incomplete: re-run extract to resume)"),
        f"features     [{info['rows']}, {info['views']}, {info['dim']}] {info['dtype']}, {info['chunk_rows']} rows per chunk",
        f"labels       0: {info['labels']['0']}  1: {info['labels']['1']}  unlabelled: {info['labels']['unlabelled']}",
        f"kind         {prov.get('kind', '?')}",
    ]
    if bb:
        lines.append(f"backbone     {bb.get('class')} hidden {bb.get('hidden_size')} patch {bb.get('patch_size')} "
                     f"({bb.get('precision')}) sha256 {str(bb.get('weights_sha256', ''))[:16]}...  {bb.get('path')}")
    if pre:
        v = pre.get("views") if isinstance(pre.get("views"), dict) else {}
        lines.append(f"preprocess   {pre.get('size')} px {pre.get('resize')}, draft {pre.get('draft')}, "
                     f"views {v.get('n')} (levels {v.get('levels')}, seed {v.get('seed')}, {v.get('recipe')}), "
                     f"view 0 {pre.get('clean', 'squash')}")
    if info.get("view_levels"):
        lines.append("view levels  " + "  ".join(f"{'clean' if k == '-1' else k}: {n}" for k, n in sorted(info["view_levels"].items())))
    if prov.get("kind") == "imported":
        lines.append(f"source       {prov.get('source_path')} ({prov.get('source_format')}) sha256 {str(prov.get('source_sha256'))[:16]}...")
    if info.get("splits"):
        lines.append("splits       " + "  ".join(f"{k}: {v}" for k, v in info["splits"].items()))
    lines.append(f"updated      {info.get('updated')}  (created {info.get('created')}, tool {info.get('tool_version')})")
    q = info["quarantined"]
    lines.append(f"quarantined  {len(q)}")
    for item in q:
        lines.append(f"  {item['path']}: {item['reason']}" + (f" ({item['detail']})" if item.get("detail") else ""))
    return "\n".join(lines)


@command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (keys: rows, committed, dim, views, dtype, provenance, quarantined, ...).")
@click.option("--verify", is_flag=True, help="Also re-hash every committed chunk file against its recorded sha256.")
def info(store, as_json, verify) -> None:
    """Describe a feature store: rows, dimensions, provenance, quarantined images, splits."""
    from .store import Store

    opened = Store.open(store)
    data = opened.info()
    if verify:
        checked = opened.verify()  # raises StoreError naming the first damaged chunk file
        data["verified"] = checked
        click.echo(f"verified {checked['files']} chunk files against their sha256" if checked["hashed"] else
                   "no chunk checksums recorded (store written before they were); presence and size of the "
                   "features chunks checked", err=as_json)
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        click.echo(_format_info(data))


@command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@seed_option(help="Mixed with each image's content hash to order it within its label.")
@click.option("--fractions", default=",".join(f"{DEFAULT_FRACTIONS[s]:.2f}" for s in SPLIT_NAMES), show_default=True,
              help="train,val_select,val_calib,test fractions (normalised to sum 1).")
def split(store, seed, fractions) -> None:
    """Write STORE/splits.json: train / val_select / val_calib / test, stratified and leakage-free.

    Identical images (same content hash) always share a split; a `split` column in the labels CSV
    is honoured. val_calib is for calibration and guarantees only; test only for reporting.
    """
    from .splits import write_splits

    payload = write_splits(store, seed=seed, fractions=fractions)
    click.echo(f"wrote {store}/splits.json (seed {seed})")
    for name, c in payload["counts"].items():
        click.echo(f"  {name:<11} {c['n']:>7} rows  (0: {c['0']}, 1: {c['1']}, unlabelled: {c['unlabelled']})")


@command("export-features")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["h5", "npy"]), required=True, help="h5: one HDF5 file; npy: a folder of .npy files + provenance.json.")
@click.option("--out", type=click.Path(), default=None, help="Output path (default: STORE.h5 or STORE.npy/).")
@click.option("--force", is_flag=True, help="Replace an existing export of the same format at --out.")
def export_features(store, fmt, out, force) -> None:
    """Export committed features, labels, ids and sha256 for other tools (never over an existing
    export unless --force)."""
    from .interop import export_features as run

    path = run(store, fmt, out, force=force)
    click.echo(f"wrote {path}")


@command("import-features")
@click.argument("file", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New store folder.")
@click.option("--dtype", type=click.Choice(FEATURE_DTYPES), default=None, help="Stored precision (default: the file's, float32 otherwise).")
@click.option("--chunk-rows", default=DEFAULT_CHUNK_ROWS, show_default=True, type=click.IntRange(min=1), help="Rows per Zarr chunk.")
def import_features(file, out, dtype, chunk_rows) -> None:
    """Make a store from features cached elsewhere: HDF5 or .npz with features, labels, optional ids.

    `features` is [N, D] or [N, V, D]; `labels` 0/1 (-1 or NaN = unlabelled). Provenance records
    kind "imported" with the source path and sha256.
    """
    from .interop import import_features as run

    st = run(file, out, dtype=dtype, chunk_rows=chunk_rows)
    click.echo(f"{out}: imported {st.rows} rows, {st.views} view(s), dim {st.dim}, {st.dtype}")
