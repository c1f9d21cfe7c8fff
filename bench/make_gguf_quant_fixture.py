#!/usr/bin/env python3
"""Write a small GGUF dequantization / metadata fixture and its expected values.

What it does
------------
Writes OUT_DIR/quants.gguf with `gguf.GGUFWriter` (architecture "llama", general.alignment = 64,
which is not the default 32) holding one 2-D tensor per type

    F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q4_K Q5_K Q6_K

each of 2 rows x 512 columns (ne0 = 512, ne1 = 2; two 256-element super-blocks per row for the
K-quants), named t.f32, t.f16, t.bf16, t.q8_0, ... .  Values come from numpy seed 20261201:
the float tensors hold standard normals with a few edge values in row 0 (+-0, subnormals, the
largest finite value); Q8_0..Q5_1 hold normals quantized with `gguf.quants.quantize`; gguf cannot
quantize the K-quants, so their blocks are random bytes with the f16 super-block scales
(d, and dmin for Q4_K/Q5_K) set to finite values in 0.01..0.1, laid out as gguf.quants reads them:

    Q4_K (144 B / 256): d f16 | dmin f16 | scales[12] | qs[128]
    Q5_K (176 B / 256): d f16 | dmin f16 | scales[12] | qh[32] | qs[128]
    Q6_K (210 B / 256): ql[128] | qh[64] | scales[16] (int8) | d f16

It also writes metadata keys of every GGUF value type (test.*), including arrays of ints, floats,
strings, bools, and a nested array of arrays.

Then it reads the file back and writes OUT_DIR/expected.json:
    {"file", "file_sha256", "generated_by", "alignment", "tensor_data_offset" (absolute offset of the
     tensor data section),
     "metadata": {key: {"type": GGUF value type name, "value": ..., ["element_type"]: for arrays}},
     "tensors": {name: {"type": ggml type name, "shape": [ne0, ne1], "n_bytes", "offset" (relative to the
                 data section), "values": [ne1*ne0 floats, row-major: row 0 first]}}}
The values are `gguf.quants.dequantize` of the bytes stored in the file, float32 values written
as exact float64 decimals.  Metadata is checked with a small independent GGUF parser in this
script (gguf's reader flattens nested arrays), and every tensor's values are checked bit for bit
against a direct Python port of ggml's scalar dequantize_row_* loops.

Run
---
    pip install gguf numpy
    python bench/make_gguf_quant_fixture.py tests/fixtures/gguf-quants/
"""

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import struct

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T, GGUFValueType as V
from gguf.constants import GGML_QUANT_SIZES

SEED = 20261201
NE0, NE1 = 512, 2
ALIGNMENT = 64
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]

# (key, GGUF value type, value, element type for arrays)
METADATA = [
    ("general.name", V.STRING, "gguf quant fixture", None),
    ("test.uint8", V.UINT8, 200, None),
    ("test.int8", V.INT8, -100, None),
    ("test.uint16", V.UINT16, 65000, None),
    ("test.int16", V.INT16, -32000, None),
    ("test.uint32", V.UINT32, 4000000000, None),
    ("test.int32", V.INT32, -2000000000, None),
    ("test.uint64", V.UINT64, 18000000000000000000, None),
    ("test.int64", V.INT64, -9000000000000000000, None),
    ("test.float32", V.FLOAT32, 3.25, None),
    ("test.float32_inexact", V.FLOAT32, float(np.float32(0.1)), None),
    ("test.float64", V.FLOAT64, 2.718281828459045, None),
    ("test.bool_true", V.BOOL, True, None),
    ("test.bool_false", V.BOOL, False, None),
    ("test.string", V.STRING, "h\u00e9llo w\u00f6rld \u2713 \U0001F600\ttab\nnewline", None),
    ("test.array_int32", V.ARRAY, [1, -2, 3, 2147483647, -2147483648], V.INT32),
    ("test.array_uint8", V.ARRAY, [0, 1, 254, 255], V.UINT8),
    ("test.array_int64", V.ARRAY, [-1, 0, 9007199254740993], V.INT64),
    ("test.array_float32", V.ARRAY, [0.5, -1.25, 1e-3], V.FLOAT32),
    ("test.array_bool", V.ARRAY, [True, False, True], V.BOOL),
    ("test.array_string", V.ARRAY, ["alpha", "", "\u03b3\u03ac\u03bc\u03bc\u03b1", "<|im_end|>"], V.STRING),
    ("test.array_nested", V.ARRAY, [[1, 2], [3, 4, 5], [-6]], V.ARRAY),
]

_SCALAR = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
           V.FLOAT32: "<f", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d", V.BOOL: "<?"}


def make_tensor_bytes(rng, name):
    """numpy array to pass to GGUFWriter.add_tensor and the raw_dtype to use."""
    qt = T[name]
    if name in ("F32", "F16", "BF16"):
        x = rng.standard_normal((NE1, NE0)).astype(np.float32)
        if name == "F32":
            x[0, :6] = [0.0, -0.0, 1.0, -2.5, 1e-45, np.finfo(np.float32).max]
            return x, None
        if name == "F16":
            x[0, :6] = [0.0, -0.0, 65504.0, -6.103515625e-05, 5.960464477539063e-08, 1.0009765625]
            return x.astype(np.float16), None
        x[0, :6] = [0.0, -0.0, 1.0, 9.183549615799121e-41, -3.3895313892515355e+38, 1.00390625]
        return gguf.quants.quantize(x, qt), qt
    block, size = GGML_QUANT_SIZES[qt]
    n_blocks = NE1 * NE0 // block
    if name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        x = (rng.standard_normal((NE1, NE0)) * 0.5).astype(np.float32)
        return gguf.quants.quantize(x, qt), qt
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)

    def f16_bytes(n):
        return rng.uniform(0.01, 0.1, size=n).astype("<f2").view(np.uint8).reshape(n, 2)

    if name in ("Q4_K", "Q5_K"):
        raw[:, 0:2] = f16_bytes(n_blocks)  # d
        raw[:, 2:4] = f16_bytes(n_blocks)  # dmin
    elif name == "Q6_K":
        raw[:, size - 2:size] = f16_bytes(n_blocks)  # d (scales[16] before it are random int8)
    else:
        raise ValueError(name)
    return raw.reshape(NE1, -1), qt


# ---- a direct port of ggml's reference dequantization loops (cross-checks gguf.quants) -------

def _f16(b, o):
    return np.float32(np.frombuffer(bytes(b[o:o+2]), dtype="<f2")[0])

def _scale_min_k4(j, q):
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)

def ggml_dequant_block(name, b):
    """One block, written after ggml's scalar dequantize_row_* loops (independent of gguf.quants)."""
    b = [int(x) for x in b]
    y = np.zeros(256 if name.endswith("_K") else 32, dtype=np.float32)
    F = np.float32
    if name == "Q8_0":
        d = _f16(b, 0)
        for i in range(32): y[i] = F(np.int8(np.uint8(b[2+i]))) * d
    elif name == "Q4_0":
        d = _f16(b, 0); qs = b[2:18]
        for i in range(16):
            y[i] = F((qs[i] & 0xF) - 8) * d; y[i+16] = F((qs[i] >> 4) - 8) * d
    elif name == "Q4_1":
        d = _f16(b, 0); m = _f16(b, 2); qs = b[4:20]
        for i in range(16):
            y[i] = F(qs[i] & 0xF) * d + m; y[i+16] = F(qs[i] >> 4) * d + m
    elif name in ("Q5_0", "Q5_1"):
        d = _f16(b, 0); o = 2
        if name == "Q5_1": m = _f16(b, 2); o = 4
        qh = struct.unpack_from("<I", bytes(b), o)[0]; qs = b[o+4:o+20]
        for j in range(16):
            xh0 = ((qh >> j) << 4) & 0x10; xh1 = (qh >> (j + 12)) & 0x10
            x0 = (qs[j] & 0xF) | xh0; x1 = (qs[j] >> 4) | xh1
            if name == "Q5_0": y[j] = F(x0 - 16) * d; y[j+16] = F(x1 - 16) * d
            else: y[j] = F(x0) * d + m; y[j+16] = F(x1) * d + m
    elif name in ("Q4_K", "Q5_K"):
        d = _f16(b, 0); mn = _f16(b, 2); sc = b[4:16]
        if name == "Q4_K": qs = b[16:144]
        else: qh = b[16:48]; qs = b[48:176]
        is_ = 0; qo = 0; u1, u2 = 1, 2; yo = 0
        for j in range(0, 256, 64):
            s, m = _scale_min_k4(is_, sc); d1 = d * F(s); m1 = mn * F(m)
            s, m = _scale_min_k4(is_ + 1, sc); d2 = d * F(s); m2 = mn * F(m)
            for l in range(32):
                h1 = (16 if qh[l] & u1 else 0) if name == "Q5_K" else 0
                h2 = (16 if qh[l] & u2 else 0) if name == "Q5_K" else 0
                y[yo + l] = d1 * F((qs[qo + l] & 0xF) + h1) - m1
                y[yo + 32 + l] = d2 * F((qs[qo + l] >> 4) + h2) - m2
            qo += 32; is_ += 2; yo += 64; u1 <<= 2; u2 <<= 2
    elif name == "Q6_K":
        ql = b[0:128]; qh = b[128:192]; sc = [int(np.int8(np.uint8(v))) for v in b[192:208]]; d = _f16(b, 208)
        lo = ho = so = yo = 0
        for n in range(0, 256, 128):
            for l in range(32):
                is_ = l // 16
                q1 = ((ql[lo+l] & 0xF) | (((qh[ho+l] >> 0) & 3) << 4)) - 32
                q2 = ((ql[lo+l+32] & 0xF) | (((qh[ho+l] >> 2) & 3) << 4)) - 32
                q3 = ((ql[lo+l] >> 4) | (((qh[ho+l] >> 4) & 3) << 4)) - 32
                q4 = ((ql[lo+l+32] >> 4) | (((qh[ho+l] >> 6) & 3) << 4)) - 32
                y[yo+l] = d * F(sc[so+is_]) * F(q1)
                y[yo+l+32] = d * F(sc[so+is_+2]) * F(q2)
                y[yo+l+64] = d * F(sc[so+is_+4]) * F(q3)
                y[yo+l+96] = d * F(sc[so+is_+6]) * F(q4)
            yo += 128; lo += 64; ho += 32; so += 8
    return y


def ggml_dequant(name, raw):
    raw = np.asarray(raw).reshape(-1).view(np.uint8)
    if name == "F32":
        return raw.view("<f4").astype(np.float32)
    if name == "F16":
        return raw.view("<f2").astype(np.float32)
    if name == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    ts = GGML_QUANT_SIZES[T[name]][1]
    return np.concatenate([ggml_dequant_block(name, raw[i:i + ts]) for i in range(0, len(raw), ts)])


# ---- a tiny independent GGUF metadata parser (checks what the writer produced) ----------------

def _read_str(buf, pos):
    (n,) = struct.unpack_from("<Q", buf, pos)
    pos += 8
    return buf[pos:pos + n].decode("utf-8"), pos + n


def _read_val(buf, pos, vt):
    vt = V(vt)
    if vt in _SCALAR:
        fmt = _SCALAR[vt]
        (v,) = struct.unpack_from(fmt, buf, pos)
        return v, pos + struct.calcsize(fmt)
    if vt == V.STRING:
        return _read_str(buf, pos)
    if vt == V.ARRAY:
        et, n = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        out = []
        for _ in range(n):
            v, pos = _read_val(buf, pos, et)
            out.append(v)
        return out, pos
    raise ValueError(vt)


def parse_metadata(buf):
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    assert magic == b"GGUF" and version == 3, (magic, version)
    pos = 24
    kv = {}
    for _ in range(n_kv):
        key, pos = _read_str(buf, pos)
        (vt,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        start = pos
        val, pos = _read_val(buf, pos, vt)
        et = struct.unpack_from("<I", buf, start)[0] if V(vt) == V.ARRAY else None
        inner = None
        if et is not None and V(et) == V.ARRAY and val:
            inner = V(struct.unpack_from("<I", buf, start + 12)[0])  # first inner array's element type
        kv[key] = (V(vt), val, et, inner)
    return kv


def as_json_value(vt, val):
    if vt == V.FLOAT32:
        return float(np.float32(val))
    return val


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "quants.gguf")

    rng = np.random.default_rng(SEED)
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(ALIGNMENT)
    for key, vt, val, et in METADATA:
        w.add_key_value(key, val, vt, sub_type=et)
    for name in TYPES:
        arr, raw = make_tensor_bytes(rng, name)
        w.add_tensor(f"t.{name.lower()}", arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    with open(path, "rb") as fh:
        buf = fh.read()
    kv = parse_metadata(buf)
    written = {k: (vt, val, et) for k, vt, val, et in METADATA}
    metadata = {}
    for key, (vt, val, et, inner) in kv.items():
        if key in written:
            wvt, wval, wet = written[key]
            assert vt == wvt, (key, vt, wvt)
            if vt == V.ARRAY and wet == V.FLOAT32:
                assert val == [float(np.float32(x)) for x in wval], (key, val)
            elif vt == V.FLOAT32:
                assert val == float(np.float32(wval)), (key, val)
            else:
                assert val == wval, (key, val, wval)
        entry = {"type": vt.name}
        if vt == V.ARRAY:
            entry["element_type"] = V(et).name
            if V(et) == V.ARRAY:
                entry["inner_element_type"] = inner.name
            entry["value"] = [as_json_value(V(et), x) for x in val]
        else:
            entry["value"] = as_json_value(vt, val)
        metadata[key] = entry

    r = gguf.GGUFReader(path)
    assert r.alignment == ALIGNMENT
    tensors = {}
    for t in r.tensors:
        deq = gguf.quants.dequantize(t.data, t.tensor_type)
        ne = [int(s) for s in t.shape]
        deq = np.asarray(deq, dtype=np.float32).reshape(list(reversed(ne)))
        assert ne == [NE0, NE1], (t.name, ne)
        assert np.all(np.isfinite(deq)), t.name
        mine = ggml_dequant(t.tensor_type.name, t.data)
        assert np.array_equal(mine.view(np.uint32), deq.reshape(-1).view(np.uint32)), t.name
        rel = int(t.data_offset - r.data_offset)
        assert rel % ALIGNMENT == 0
        tensors[t.name] = {
            "type": t.tensor_type.name,
            "shape": ne,
            "n_bytes": int(t.n_bytes),
            "offset": rel,
            "values": [float(v) for v in deq.reshape(-1)],
        }

    vers = {"script": "bench/make_gguf_quant_fixture.py", "python": platform.python_version()}
    for pkg in ("numpy", "gguf"):
        vers[pkg] = importlib.metadata.version(pkg)
    expected = {
        "file": "quants.gguf",
        "file_sha256": hashlib.sha256(buf).hexdigest(),
        "generated_by": vers,
        "seed": SEED,
        "alignment": ALIGNMENT,
        "tensor_data_offset": int(r.data_offset),
        "metadata": metadata,
        "tensors": tensors,
    }
    out = os.path.join(args.out_dir, "expected.json")
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(expected, fh, ensure_ascii=False, separators=(",", ":"))
        fh.write("\n")
    print(f"wrote {path} ({len(buf)} bytes) and {out} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    main()
