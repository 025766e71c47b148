"""Model-agnostic quantization core: primitives, observers, quantizers, layers, transforms and the API."""
