"""Weight-only int8/int4 quantization, swapped in from outside the model (as gpt-fast does), and the reader of
bitsandbytes NF4 checkpoints. This package knows only `nn.Linear` and tensor names:

- `spec`: the config.json record of a quantized checkpoint and the checks of what a user asks for;
- `int8`: per-output-channel int8 (`Int8Linear`);
- `int4`: group-wise int4 (`Int4Linear`) and its nibble packing;
- `kernels`: what the layers need of torch's CPU kernels (compute dtype, the int4 kernel's tiling); our own AVX2
  kernels are `baichuan.cpu_gemv`;
- `nf4`: official bitsandbytes NF4 checkpoints, dequantised as they stream in;
- `swap`: swapping a model's linears for quantized ones, in place or while loading (`QuantizingLoader`, the
  transform hook of `checkpoint.load_weights`).
"""
