"""Q4_K and Q6_K quantizers (the two types of a q4_k_m GGUF), which the `gguf` package can read but
not yet write. Each packs blocks of 256 values into the byte layout that gguf's own dequantizers
(`gguf.quants.Q4_K` / `Q6_K`) unpack; tests/test_export_gguf.py checks every packing against them.

    python -c "import numpy as np; from sqltune.export import kquants; print(kquants.error_report(np.random.randn(64, 512)))"

Scales come from each sub-block's range (min/max), then are themselves quantized to 6 bits (Q4_K)
or 8 bits (Q6_K) under one fp16 super-scale, and the values are rounded with the scales as stored,
so the rounding error is what the file holds. llama.cpp searches for better scales; this is the
plain min/max choice, within a few percent of its error.
"""

from __future__ import annotations

from typing import Any

import numpy as np

QK_K = 256


def _blocks(array: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    data = np.asarray(array, dtype=np.float32)
    if data.shape[-1] % QK_K:
        raise ValueError(f"rows of {data.shape[-1]} values are not a multiple of {QK_K}")
    return data.reshape(-1, QK_K), data.shape


def _byte_shape(shape: tuple[int, ...], type_size: int) -> tuple[int, ...]:
    return (*shape[:-1], shape[-1] // QK_K * type_size)


def _f16(values: np.ndarray) -> np.ndarray:
    """The fp16 the file stores, and its exact value back in fp32 for rounding against."""
    return values.astype(np.float16)


def quantize_q4_k(array: Any) -> np.ndarray:
    """8 sub-blocks of 32 per block: x ~ d*sc[j]*q - dmin*m[j], q in 0..15, sc / m 6-bit."""
    x, shape = _blocks(array)
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0.0)  # the offset is subtracted, so it only ever lowers values
    hi = sub.max(axis=-1)
    scale = (hi - lo) / 15.0
    offset = -lo
    d = _f16(scale.max(axis=-1) / 63.0)
    dmin = _f16(offset.max(axis=-1) / 63.0)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.rint(scale / d32), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dmin32 > 0, np.rint(offset / dmin32), 0).clip(0, 63).astype(np.uint8)
        step = (d32 * sc)[..., None]
        q = np.where(step > 0, np.rint((sub + (dmin32 * m)[..., None]) / step), 0).clip(0, 15).astype(np.uint8)
    # scales: bytes 0-3 hold sc[0..3] and the top 2 bits of sc[4..7]; 4-7 the same for m; 8-11 the low nibbles
    packed = np.empty((n, 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    # values: sub-blocks 2i and 2i+1 share 32 bytes, low and high nibble
    q = q.reshape(n, 4, 2, 32)
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(n, 128)
    out = np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), packed, qs], axis=1)
    return out.reshape(_byte_shape(shape, out.shape[1]))


def quantize_q6_k(array: Any) -> np.ndarray:
    """16 sub-blocks of 16 per block: x ~ d*scale[s]*(q-32), q in 0..63, scale int8."""
    x, shape = _blocks(array)
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)
    scale = np.abs(sub).max(axis=-1) / 31.0
    d = _f16(scale.max(axis=-1) / 127.0)
    d32 = d.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.rint(scale / d32), 0).clip(-128, 127).astype(np.int8)
        step = (d32 * sc)[..., None]
        q = (np.where(step != 0, np.rint(sub / step), 0).clip(-32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)
    # low 4 bits: per half of 128, values l and 64+l share byte l; high 2 bits: values k*32+l in byte l, bits 2k
    ql = (q[:, :, :64] & 0x0F) | ((q[:, :, 64:] & 0x0F) << 4)
    high = (q >> 4).reshape(n, 2, 4, 32)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    out = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d.view(np.uint8).reshape(n, 2)],
                         axis=1)
    return out.reshape(_byte_shape(shape, out.shape[1]))


def quantize(array: Any, qtype: Any) -> np.ndarray:
    """Bytes for `array` in GGML type `qtype` (a gguf.GGMLQuantizationType: Q4_K or Q6_K)."""
    name = getattr(qtype, "name", str(qtype))
    if name == "Q4_K":
        return quantize_q4_k(array)
    if name == "Q6_K":
        return quantize_q6_k(array)
    raise ValueError(f"kquants writes Q4_K and Q6_K, not {name}")


def error_report(array: Any) -> dict[str, float]:
    """Relative RMS error of each type after a round trip through gguf's dequantizer."""
    import gguf

    data = np.asarray(array, dtype=np.float32)
    rms = float(np.sqrt((data**2).mean())) or 1.0
    report = {}
    for qtype in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K, gguf.GGMLQuantizationType.Q8_0):
        packed = quantize(data, qtype) if qtype.name != "Q8_0" else gguf.quants.quantize(data, qtype)
        back = gguf.quants.dequantize(packed, qtype)
        report[qtype.name] = round(float(np.sqrt(((back - data) ** 2).mean())) / rms, 5)
    return report
