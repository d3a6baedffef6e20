/* mxconv's compiled CPU kernels: the same bytes as converter.numerics, several times faster.

   Pure functions over caller-owned buffers; no allocation that outlives a call, no global state,
   so Python threads may call them at once (ctypes releases the GIL for the call).

   Each one returns 0 on success, or MX_FALLBACK when its input holds something it does not model
   (a NaN/Inf value or NaN code, a non-finite tile scale, an amax whose scale table entry is the
   NaN/Inf sentinel): the caller then runs the reference path, which raises or warns by itself.

   The float operations below are the reference's, in its order, on IEEE binary32 with round to
   nearest even. Build with -ffp-contract=off: a fused multiply-add would skip a rounding. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512VBMI__) && defined(__AVX512VL__)
#include <immintrin.h>
#define HAVE_BYTE_PERMUTE 1 /* vpermi2b: 64 lookups into a 128-byte table in one instruction */
#endif

#define MX_FALLBACK 1
#define BLOCK 32
#define TILE 128
#define NONFINITE_EXP 255 /* the exponent tables' sentinel for NaN/Inf amax */

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* float32 -> bfloat16 bits, round to nearest even (torch's rule; never given NaN here). */
static inline uint16_t bf16_bits(float f) {
    uint32_t u = bits_of(f);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* float32 -> float8_e4m3fn byte exactly as c10's fp8e4m3fn_from_fp32_value: round to nearest
   even, values from 480 up become 0x7F (NaN; the callers clamp or cannot get there), subnormals
   rounded by adding 2^14 in float arithmetic. Written without branches so loops vectorize. */
static inline uint8_t e4m3_byte(float f) {
    uint32_t u = bits_of(f);
    uint32_t sign = (u >> 24) & 0x80u;
    u &= 0x7FFFFFFFu;
    uint32_t sub = bits_of(float_of(u) + 16384.0f) - (141u << 23);
    uint32_t normal = (u - (120u << 23) + 0x7FFFFu + ((u >> 20) & 1u)) >> 20;
    uint32_t r = u >= (1087u << 20) ? 0x7Fu : (u < (121u << 23) ? sub : normal);
    return (uint8_t)(r | sign);
}

/* e4m3fn code 0..126 (no sign, not NaN) -> its exact value. */
static inline float e4m3_value(uint32_t code) {
    uint32_t exp = code >> 3, man = code & 7u;
    return exp ? float_of(((exp + 120u) << 23) | (man << 20)) : (float)man * 0x1p-9f;
}

/* MXFP8 of BF16 x [n, k] (k % 32 == 0): q [n, k] e4m3 bytes, scales [n, k/32] E8M0 bytes.
   mult/exp: 32768-entry tables indexed by a block's |amax| BF16 bits (2^(127-e) and e).
   clamp: saturate scaled values to +-448 before the cast (FLOOR can scale past it). */
int mx_quantize_bf16(const uint16_t *restrict x, int64_t n, int64_t k, const float *restrict mult,
                     const uint8_t *restrict exp, int clamp, uint8_t *restrict q,
                     uint8_t *restrict scales) {
    int64_t blocks = n * (k / BLOCK);
    for (int64_t b = 0; b < blocks; b++) {
        const uint16_t *xb = x + b * BLOCK;
        uint16_t amax = 0;
        for (int i = 0; i < BLOCK; i++) {
            uint16_t a = xb[i] & 0x7FFFu;
            amax = a > amax ? a : amax;
        }
        if (amax >= 0x7F80u || exp[amax] == NONFINITE_EXP)
            return MX_FALLBACK;
        float m = mult[amax];
        scales[b] = exp[amax];
        uint8_t *qb = q + b * BLOCK;
        if (clamp) {
            for (int i = 0; i < BLOCK; i++)
                qb[i] = e4m3_byte(fminf(fmaxf(float_of((uint32_t)xb[i] << 16) * m, -448.0f), 448.0f));
        } else {
            for (int i = 0; i < BLOCK; i++)
                qb[i] = e4m3_byte(float_of((uint32_t)xb[i] << 16) * m);
        }
    }
    return 0;
}

/* The 128-entry byte table of one (tile, block exponent): code c (sign bit clear) -> MXFP8 byte
   of e4m3(bf16(fl32(value(c) * s)) * m), from p[c] = bf16 bits of fl32(value(c) * |s|). Every
   rounding step is symmetric, so code c | 0x80 maps to table[c] ^ 0x80. */
static void build_table(const uint16_t *restrict p, float m, uint8_t sign_of_s, int clamp,
                        uint8_t *restrict table) {
    for (uint32_t c = 0; c < 128; c++) {
        float y = float_of((uint32_t)p[c] << 16) * m;
        if (clamp)
            y = fminf(y, 448.0f);
        table[c] = e4m3_byte(y) | sign_of_s;
    }
}

/* out[i] = table[in[i] & 0x7F] ^ (in[i] & 0x80) for one block of 32 codes. */
static inline void lookup_block(const uint8_t *restrict table, const uint8_t *restrict in,
                                uint8_t *restrict out) {
#ifdef HAVE_BYTE_PERMUTE
    __m512i lo = _mm512_loadu_si512(table), hi = _mm512_loadu_si512(table + 64);
    __m256i codes = _mm256_loadu_si256((const __m256i *)in);
    __m512i bytes = _mm512_permutex2var_epi8(lo, _mm512_castsi256_si512(codes), hi);
    __m256i sign = _mm256_and_si256(codes, _mm256_set1_epi8((char)0x80));
    _mm256_storeu_si256((__m256i *)out, _mm256_xor_si256(_mm512_castsi512_si256(bytes), sign));
#else
    for (int i = 0; i < BLOCK; i++)
        out[i] = table[in[i] & 0x7Fu] ^ (in[i] & 0x80u);
#endif
}

/* quantize_mxfp8(dequantize_fp8_block(w, s)) for e4m3 codes w [n, k] (k % 32 == 0, rows starting
   on a 128-row tile boundary) and float32 tile scales s [ceil(n/128), scols]: DeepSeek's value
   bf16(fl32(v * s)), then MXFP8, without the BF16 tensor.
   Within a 128x128 tile the scale is fixed, so a block's amax is bf16(fl32(max|v| * |s|))
   (rounding is monotonic) and every output byte is a function of the input code alone: one
   128-entry table per (tile, block exponent), built when that exponent first appears. */
int mx_requantize_fp8(const uint8_t *restrict w, int64_t n, int64_t k, const float *restrict s,
                      int64_t scols, const float *restrict mult, const uint8_t *restrict exp,
                      int clamp, uint8_t *restrict q, uint8_t *restrict scales) {
    int64_t nb = k / BLOCK;
    uint8_t (*tables)[128] = malloc(256 * 128);
    if (!tables)
        return MX_FALLBACK;
    int16_t slot[256];
    uint16_t p[128] = {0};
    int status = 0;
    for (int64_t r0 = 0; r0 < n && !status; r0 += TILE) {
        int64_t rows = n - r0 < TILE ? n - r0 : TILE;
        for (int64_t c0 = 0; c0 < k && !status; c0 += TILE) {
            int64_t cols = k - c0 < TILE ? k - c0 : TILE;
            float scale = s[(r0 / TILE) * scols + c0 / TILE];
            if (!isfinite(scale)) {
                status = MX_FALLBACK;
                break;
            }
            float abs_scale = fabsf(scale);
            uint8_t sign_of_s = signbit(scale) ? 0x80u : 0u;
            for (uint32_t c = 0; c < 0x7F; c++)
                p[c] = bf16_bits(e4m3_value(c) * abs_scale);
            memset(slot, 0xFF, sizeof slot);
            int16_t built = 0;
            for (int64_t r = r0; r < r0 + rows && !status; r++) {
                for (int64_t j = 0; j < cols; j += BLOCK) {
                    const uint8_t *wb = w + r * k + c0 + j;
                    uint8_t code = 0;
                    for (int i = 0; i < BLOCK; i++) {
                        uint8_t a = wb[i] & 0x7Fu;
                        code = a > code ? a : code;
                    }
                    if (code == 0x7F) { /* a NaN code */
                        status = MX_FALLBACK;
                        break;
                    }
                    uint16_t amax = p[code];
                    uint8_t e = exp[amax & 0x7FFFu];
                    if (amax >= 0x7F80u || e == NONFINITE_EXP) {
                        status = MX_FALLBACK;
                        break;
                    }
                    scales[r * nb + (c0 + j) / BLOCK] = e;
                    if (slot[e] < 0) {
                        build_table(p, mult[amax], sign_of_s, clamp, tables[built]);
                        slot[e] = built++;
                    }
                    lookup_block(tables[slot[e]], wb, q + r * k + c0 + j);
                }
            }
        }
    }
    free(tables);
    return status;
}
