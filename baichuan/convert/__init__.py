"""Conversions between checkpoint formats, one module per format: `formats` (safetensors, .bin, dtype, shards),
`migrate` (Baichuan2 -> Baichuan head), `gguf` (llama.cpp's GGUF, both ways). Every conversion streams tensor
by tensor and writes atomically."""
