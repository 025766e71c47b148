"""Deployment: the quantized SAM as one packed integer file (``packed``), its bit packing (``codes``)."""
from ahcq.deploy.packed import PackedFormatError, pack_model, read_packed, unpack_model

__all__ = ["PackedFormatError", "pack_model", "read_packed", "unpack_model"]
