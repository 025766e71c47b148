"""``python -m ahcq.deploy info <file> [--rebuild]``: check a packed quantized SAM (format, version, checksum)
and print what it holds; ``--rebuild`` also rebuilds the fake-quant model from it.
``python -m ahcq.deploy onnx <file> --out <dir>``: rebuild it and export its mask decoder (and image encoder,
when quantized) to ONNX (``ahcq.deploy.onnx_export``) for ONNX Runtime (its fused integer linear); with
``--standard-ops``, standard ONNX only (QDQ and MatMulInteger), for any runtime.

``test_quant.py --pack`` writes the file (``quantized.npz`` in the run's ``--out``)."""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from ahcq.deploy.onnx_export import OnnxExportError, export_onnx
from ahcq.deploy.packed import PackedFormatError, read_packed, unpack_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ahcq.deploy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="check a packed file and print what it holds")
    info.add_argument("file", type=Path)
    info.add_argument("--rebuild", action="store_true", help="also rebuild the fake-quant model")
    onnx = sub.add_parser("onnx", help="export a packed file's quantized model to ONNX")
    onnx.add_argument("file", type=Path)
    onnx.add_argument("--out", type=Path, required=True,
                      help="folder for image_encoder.onnx and mask_decoder.onnx")
    onnx.add_argument("--standard-ops", action="store_true",
                      help="standard ONNX operators only (no com.microsoft MatMulIntegerToFloat)")
    args = p.parse_args(argv)
    try:
        manifest, blobs = read_packed(args.file)
        if args.command == "onnx":
            sam, _, quant_encoder = unpack_model(args.file)
            for part, path in export_onnx(sam, args.out, quant_encoder,
                                          runtime_ops=not args.standard_ops).items():
                print(f"{part}: {path} ({path.stat().st_size} bytes)")
            return 0
        if args.rebuild:
            unpack_model(args.file)
    except (PackedFormatError, OnnxExportError) as err:
        print(f"python -m ahcq.deploy: error: {err}", file=sys.stderr)
        return 1
    bits = Counter(w["bits"] for w in manifest["weights"])
    print(f"{args.file}: {manifest['format']} v{manifest['version']}, checksum ok, "
          f"{args.file.stat().st_size} bytes")
    print(f"recipe: {manifest['qconfig'].get('method') or 'unnamed'}, encoder "
          f"{'quantized' if manifest['quant_encoder'] else 'float'}; architecture {manifest['spec']}")
    print("weights: " + ", ".join(f"{n} layers at {b} bits" for b, n in sorted(bits.items())))
    print("arrays: " + ", ".join(f"{name} {blob.nbytes} bytes" for name, blob in blobs.items()))
    if args.rebuild:
        print("rebuilt the fake-quant model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
