"""Moved to the `baichuan.quant` package; this module goes once every import site has moved."""

from baichuan.quant.int4 import (  # noqa: F401
    INT4_WIDEN_MIN_ROWS,
    KERNEL_GROUP_SIZES,
    Int4Linear,
    int4pack_mm_safe,
    pack_int4,
    quantize_int4,
    unpack_int4,
)
from baichuan.quant.int8 import INT8_WIDEN_MIN_ROWS, Int8Linear, int8pack_mm_safe, quantize_int8  # noqa: F401
from baichuan.quant.kernels import KERNEL_DTYPE  # noqa: F401
from baichuan.quant.nf4 import (  # noqa: F401
    NF4_LEVELS,
    dequantize_bnb_4bit,
    dequantize_bnb_stream,
    dequantize_nf4,
    unpack_bnb_quant_state,
)
from baichuan.quant.spec import (  # noqa: F401
    DEFAULT_GROUP_SIZE,
    DEFAULT_INT4_OVERRIDES,
    FORMAT_VERSION,
    QUANT_METHOD,
    SUPPORTED_BITS,
    QuantizationError,
    check_bits,
    check_group_size,
    check_record,
    read_quantization,
)
from baichuan.quant.swap import (  # noqa: F401
    QUANTIZED_TYPES,
    QuantizingLoader,
    load_quantized_state_dict,
    prepare_quantized,
    quantize_model,
    quantized_linear,
    quantized_state_dict,
    release_freed_memory,
)
