"""SentencePiece model files (`tokenizer.model`) read and written on the protobuf wire format.

sentencepiece_model.proto, the parts used here: ModelProto has `pieces` (field 1, repeated: `piece` 1, `score` 2
as a float, `type` 3), `trainer_spec` (2) and `normalizer_spec` (3). Written by hand, as baichuan/tokenizer.py
does, because the generated module that sentencepiece ships accepts only the protobuf release it was made for.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# SentencePiece.Type, which GGUF's token types copy number for number.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE = 2  # TrainerSpec.ModelType


@dataclass
class Piece:
    piece: str
    score: float
    type: int = NORMAL


@dataclass
class ModelProto:
    pieces: list[Piece]
    trainer_spec: bytes = b""  # serialized TrainerSpec
    normalizer_spec: bytes = b""  # serialized NormalizerSpec (its precompiled charsmap included)
    rest: bytes = b""  # other fields (denormalizer_spec ...), kept as they were
    extra: dict = field(default_factory=dict)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def fields(data: bytes):
    """Yield (field number, wire type, value, raw bytes of the whole field) of one serialized message."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"not a SentencePiece model (protobuf wire type {wire} at byte {start})")
        yield number, wire, value, data[start:pos]


def _field(number: int, wire: int, value) -> bytes:
    key = _encode_varint(number << 3 | wire)
    if wire == 0:
        return key + _encode_varint(int(value))
    if wire == 5:
        return key + struct.pack("<f", value)
    return key + _encode_varint(len(value)) + value


def parse(data: bytes) -> ModelProto:
    model = ModelProto(pieces=[])
    rest = bytearray()
    for number, _, value, raw in fields(data):
        if number == 1:
            piece = Piece("", 0.0)
            for n, _, v, _ in fields(value):
                if n == 1:
                    piece.piece = v.decode("utf-8")
                elif n == 2:
                    piece.score = struct.unpack("<f", v)[0]
                elif n == 3:
                    piece.type = v
            model.pieces.append(piece)
        elif number == 2:
            model.trainer_spec = value
        elif number == 3:
            model.normalizer_spec = value
        else:
            rest += raw
    model.rest = bytes(rest)
    return model


def serialize(model: ModelProto) -> bytes:
    out = bytearray()
    for p in model.pieces:
        message = _field(1, 2, p.piece.encode("utf-8")) + _field(2, 5, p.score)
        if p.type != NORMAL:  # the proto's default
            message += _field(3, 0, p.type)
        out += _field(1, 2, message)
    out += _field(2, 2, model.trainer_spec) + _field(3, 2, model.normalizer_spec) + model.rest
    return bytes(out)


def spec_value(spec: bytes, number: int, default=None):
    """The last value of field `number` in a serialized spec (protobuf: the last one wins)."""
    found = default
    for n, _, value, _ in fields(spec):
        if n == number:
            found = value
    return found


def set_fields(spec: bytes, values: dict[int, int | bytes]) -> bytes:
    """`spec` with the given fields (varints or bytes) appended, so that they win over earlier values."""
    out = bytearray(spec)
    for number, value in values.items():
        out += _field(number, 2 if isinstance(value, bytes) else 0, value)
    return bytes(out)
