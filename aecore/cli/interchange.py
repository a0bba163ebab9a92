"""``aecore import``: an SAE from a SAELens or sparsify folder into an aecore model
folder; and ``aecore export --format saelens|sparsify`` (the other way), which
``aecore.cli.inference``'s export command hands over here."""

from __future__ import annotations

import os
from pathlib import Path

from aecore.errors import ConfigError

FORMATS = ("saelens", "sparsify")


def add_commands(sub) -> None:
    s = sub.add_parser(
        "import",
        help="import an SAE from a SAELens or sparsify folder",
        description="Read a sparse autoencoder saved by SAELens (cfg.json + "
        "sae_weights.safetensors) or EleutherAI sparsify (cfg.json + sae.safetensors) and "
        "write it as an aecore model folder computing the same function. Export the other "
        "way with `aecore export MODEL --format saelens|sparsify --out DIR`.",
    )
    s.add_argument("src", help="the SAE folder to import")
    s.add_argument("--out", required=True, help="aecore model folder to write")
    s.add_argument(
        "--format",
        choices=["auto", *FORMATS],
        default="auto",
        help="the folder's format (default: auto, from the files in it)",
    )
    s.add_argument("--overwrite", action="store_true", help="replace a saved model in --out")
    s.set_defaults(func=cmd_import)


def cmd_import(args) -> int:
    from aecore.io.model_folder import save
    from aecore.registry import name_of
    from aecore.sae.formats import detect_format, load_sae

    fmt = detect_format(args.src) if args.format == "auto" else args.format
    model = load_sae(args.src, fmt)
    source = {"format": fmt, "path": str(Path(args.src).resolve())}
    if fmt == "saelens":  # a later export names the same hook point
        from aecore.sae.saelens_format import hook_of_folder

        hook = hook_of_folder(args.src)
        if hook is not None:
            source["hook_name"] = hook
    from aecore.io.lock import FolderLock

    with FolderLock(args.out, "import into"):  # never into a folder a run is writing
        save(model, args.out, overwrite=args.overwrite, data={"imported_from": source})
    print(
        f"imported {args.src} ({fmt}) as {name_of(model)}: d={model.input_size}, "
        f"{model.latent_dim} latents -> {args.out}"
    )
    return 0


def cmd_export_folder(args) -> int:
    """``aecore export MODEL --format saelens|sparsify --out DIR``."""
    from aecore.io.model_folder import load
    from aecore.sae.formats import save_sae

    if args.all or args.part != "full" or getattr(args, "opset", None) is not None:
        raise ConfigError(
            f"--part, --all and --opset apply to --format onnx only; got --format {args.format}"
        )
    hook_name = getattr(args, "hook_name", None)
    if hook_name is not None and args.format != "saelens":
        raise ConfigError(
            f"--hook-name applies to --format saelens only; got --format {args.format}"
        )
    model = load(args.model_dir)
    path = save_sae(model, args.out, args.format, overwrite=args.overwrite, hook_name=hook_name)
    for p in sorted(path.iterdir()):
        print(f"wrote {p} ({os.path.getsize(p) / 1024:.1f} KiB)")
    return 0
