/* mxconv's compiled CPU kernels: the same bytes as converter.numerics, several times faster.

   Pure functions over caller-owned buffers; no allocation that outlives a call, no global state,
   so Python threads may call them at once (ctypes releases the GIL for the call).

   Each one returns 0 on success, or MX_FALLBACK when its input holds something it does not model
   (a NaN/Inf value or NaN code, a non-finite tile scale, an amax whose scale table entry is the
   NaN/Inf sentinel): the caller then runs the reference path, which raises or warns by itself.

   The float operations below are the reference's, in its order, on IEEE binary32 with round to
   nearest even. Build with -ffp-contract=off: a fused multiply-add would skip a rounding. */

#include "mxfp8.h"

#define NONFINITE_EXP 255 /* the exponent tables' sentinel for NaN/Inf amax */

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

#ifdef HAVE_AVX512
/* e4m3_byte of 16 floats at once: the same integer and float steps, lane by lane. */
static inline __m128i e4m3_bytes16(__m512 f) {
    __m512i u = _mm512_castps_si512(f);
    __m512i sign = _mm512_and_si512(_mm512_srli_epi32(u, 24), _mm512_set1_epi32(0x80));
    u = _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF));
    __m512i sub = _mm512_sub_epi32(
        _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(u), _mm512_set1_ps(16384.0f))),
        _mm512_set1_epi32(141 << 23));
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 20), _mm512_set1_epi32(1));
    __m512i normal = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_sub_epi32(u, _mm512_set1_epi32(120 << 23)),
                         _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFFF))), 20);
    __mmask16 small = _mm512_cmplt_epu32_mask(u, _mm512_set1_epi32(121 << 23));
    __mmask16 big = _mm512_cmpge_epu32_mask(u, _mm512_set1_epi32(1087 << 20));
    __m512i r = _mm512_mask_blend_epi32(small, normal, sub);
    r = _mm512_mask_blend_epi32(big, r, _mm512_set1_epi32(0x7F));
    return _mm512_cvtepi32_epi8(_mm512_or_si512(r, sign));
}

/* The largest |x| (BF16 bits & 0x7FFF) of each of the 4 blocks of 32 values at `x`, as the 4
   halfwords of the result. */
static inline uint64_t bf16_max4(const uint16_t *restrict x) {
    __m512i low15 = _mm512_set1_epi16(0x7FFF), v[4];
    for (int j = 0; j < 4; j++) {
        v[j] = _mm512_and_si512(_mm512_loadu_si512(x + j * BLOCK), low15);
        v[j] = _mm512_max_epu16(v[j], _mm512_shuffle_i64x2(v[j], v[j], _MM_SHUFFLE(1, 0, 3, 2)));
    }
    /* each register now holds its block's two 32-byte halves folded (twice): pair them up */
    __m512i ab = _mm512_mask_blend_epi64(0xF0, v[0], v[1]); /* lanes (A, A, B, B) */
    __m512i cd = _mm512_mask_blend_epi64(0xF0, v[2], v[3]); /* lanes (C, C, D, D) */
    ab = _mm512_max_epu16(ab, _mm512_shuffle_i64x2(ab, ab, _MM_SHUFFLE(2, 3, 0, 1)));
    cd = _mm512_max_epu16(cd, _mm512_shuffle_i64x2(cd, cd, _MM_SHUFFLE(2, 3, 0, 1)));
    __m512i c = _mm512_mask_blend_epi64(0xCC, ab, cd); /* lanes (A, C, B, D) */
    c = _mm512_max_epu16(c, _mm512_bsrli_epi128(c, 8));
    c = _mm512_max_epu16(c, _mm512_bsrli_epi128(c, 4));
    c = _mm512_max_epu16(c, _mm512_bsrli_epi128(c, 2));
    /* halfword 0 of each lane, in block order: lanes 0, 2, 1, 3 */
    c = _mm512_permutexvar_epi16(_mm512_set_epi64(0, 0, 0, 0, 0, 0, 0, 0x0018000800100000LL), c);
    return (uint64_t)_mm_cvtsi128_si64(_mm512_castsi512_si128(c));
}

/* One block of 32 BF16 values times the power of two m, as e4m3 bytes. */
static inline void quantize_block16x2(const uint16_t *restrict xb, float m, int clamp, uint8_t *restrict qb) {
    __m512 mult = _mm512_set1_ps(m);
    for (int h = 0; h < 2; h++) {
        __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(xb + 16 * h))), 16);
        __m512 y = _mm512_mul_ps(_mm512_castsi512_ps(bits), mult);
        if (clamp)
            y = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-448.0f)), _mm512_set1_ps(448.0f));
        _mm_storeu_si128((__m128i *)(qb + 16 * h), e4m3_bytes16(y));
    }
}
#endif

#if defined(HAVE_AVX2) && !defined(HAVE_AVX512)
/* e4m3_byte of 8 floats at once, as 8 int32 lanes (0..255): the same integer and float steps. */
static inline __m256i e4m3_lanes8(__m256 f) {
    __m256i u = _mm256_castps_si256(f);
    __m256i sign = _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80));
    u = _mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)); /* now < 2^31: signed compares order it */
    __m256i sub = _mm256_sub_epi32(
        _mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(u), _mm256_set1_ps(16384.0f))),
        _mm256_set1_epi32(141 << 23));
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 20), _mm256_set1_epi32(1));
    __m256i normal = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_sub_epi32(u, _mm256_set1_epi32(120 << 23)),
                         _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFFF))), 20);
    __m256i small = _mm256_cmpgt_epi32(_mm256_set1_epi32(121 << 23), u);
    __m256i big = _mm256_cmpgt_epi32(u, _mm256_set1_epi32((1087 << 20) - 1));
    __m256i r = _mm256_blendv_epi8(normal, sub, small);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7F), big);
    return _mm256_or_si256(r, sign);
}

/* The largest |x| (BF16 bits & 0x7FFF) of the block of 32 values at `x`. */
static inline uint16_t bf16_max_avx2(const uint16_t *restrict x) {
    __m256i low15 = _mm256_set1_epi16(0x7FFF);
    __m256i a = _mm256_max_epu16(_mm256_and_si256(_mm256_loadu_si256((const __m256i *)x), low15),
                                 _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + 16)), low15));
    __m128i m = _mm_max_epu16(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    /* the maximum of 8 halfwords is 0xFFFF minus the minimum of their complements (phminposuw) */
    m = _mm_minpos_epu16(_mm_xor_si128(m, _mm_set1_epi16(-1)));
    return (uint16_t)(0xFFFFu - (uint32_t)_mm_extract_epi16(m, 0));
}

/* One block of 32 BF16 values times the power of two m, as e4m3 bytes. */
static inline void quantize_block8x4(const uint16_t *restrict xb, float m, int clamp, uint8_t *restrict qb) {
    __m256 mult = _mm256_set1_ps(m);
    for (int h = 0; h < 2; h++) { /* 16 values: two registers of 8 */
        __m256i lanes[2];
        for (int j = 0; j < 2; j++) {
            __m128i half = _mm_loadu_si128((const __m128i *)(xb + 16 * h + 8 * j));
            __m256 y = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16)), mult);
            if (clamp)
                y = _mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(-448.0f)), _mm256_set1_ps(448.0f));
            lanes[j] = e4m3_lanes8(y);
        }
        /* 2 x 8 int32 (0..255) -> 16 bytes in order: the packs work within 128-bit lanes */
        __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(lanes[0], lanes[1]), 0xD8);
        __m256i b = _mm256_permute4x64_epi64(_mm256_packus_epi16(w, w), 0x08);
        _mm_storeu_si128((__m128i *)(qb + 16 * h), _mm256_castsi256_si128(b));
    }
}
#endif

/* MXFP8 of BF16 x [n, k] (k % 32 == 0): q [n, k] e4m3 bytes, scales [n, k/32] E8M0 bytes.
   mult/exp: 32768-entry tables indexed by a block's |amax| BF16 bits (2^(127-e) and e).
   clamp: saturate scaled values to +-448 before the cast (FLOOR can scale past it). */
int mx_quantize_bf16(const uint16_t *restrict x, int64_t n, int64_t k, const float *restrict mult,
                     const uint8_t *restrict exp, int clamp, uint8_t *restrict q,
                     uint8_t *restrict scales) {
    int64_t blocks = n * (k / BLOCK), b = 0;
#ifdef HAVE_AVX512
    for (; b + 4 <= blocks; b += 4) { /* blocks are contiguous: rows need not be told apart */
        uint64_t amaxes = bf16_max4(x + b * BLOCK);
        for (int j = 0; j < 4; j++) {
            uint16_t amax = (uint16_t)(amaxes >> (16 * j));
            if (amax >= 0x7F80u || exp[amax] == NONFINITE_EXP)
                return MX_FALLBACK;
            scales[b + j] = exp[amax];
            quantize_block16x2(x + (b + j) * BLOCK, mult[amax], clamp, q + (b + j) * BLOCK);
        }
    }
#elif defined(HAVE_AVX2)
    for (; b < blocks; b++) {
        uint16_t amax = bf16_max_avx2(x + b * BLOCK);
        if (amax >= 0x7F80u || exp[amax] == NONFINITE_EXP)
            return MX_FALLBACK;
        scales[b] = exp[amax];
        quantize_block8x4(x + b * BLOCK, mult[amax], clamp, q + b * BLOCK);
    }
#endif
    for (; b < blocks; b++) {
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
#elif defined(HAVE_AVX2)
    __m256i codes = _mm256_loadu_si256((const __m256i *)in);
    __m256i sign = _mm256_and_si256(codes, _mm256_set1_epi8((char)0x80));
    _mm256_storeu_si256((__m256i *)out, _mm256_xor_si256(lookup128_avx2(table, codes), sign));
#else
    for (int i = 0; i < BLOCK; i++)
        out[i] = table[in[i] & 0x7Fu] ^ (in[i] & 0x80u);
#endif
}

/* The largest |code| (code & 0x7F) of the block of 32 codes at `in`. */
static inline uint8_t block_max(const uint8_t *restrict in) {
#ifdef HAVE_AVX2
    __m256i a = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)in), _mm256_set1_epi8(0x7F));
    __m128i m = _mm_max_epu8(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    m = _mm_max_epu8(m, _mm_srli_si128(m, 8));
    m = _mm_max_epu8(m, _mm_srli_si128(m, 4));
    m = _mm_max_epu8(m, _mm_srli_si128(m, 2));
    m = _mm_max_epu8(m, _mm_srli_si128(m, 1));
    return (uint8_t)_mm_cvtsi128_si32(m);
#else
    uint8_t code = 0;
    for (int i = 0; i < BLOCK; i++) {
        uint8_t a = in[i] & 0x7Fu;
        code = a > code ? a : code;
    }
    return code;
#endif
}

/* The largest |code| of each of the 4 blocks of 32 codes at `in`, as bytes 0..3. */
static inline uint32_t block_max4(const uint8_t *restrict in) {
#ifdef HAVE_BYTE_PERMUTE
    __m512i low7 = _mm512_set1_epi8(0x7F);
    __m512i a = _mm512_and_si512(_mm512_loadu_si512(in), low7);      /* blocks 0, 1 */
    __m512i b = _mm512_and_si512(_mm512_loadu_si512(in + 64), low7); /* blocks 2, 3 */
    /* fold the two 16-byte lanes of each block: lanes become (B0, B0, B1, B1) and (B2, B2, B3, B3) */
    a = _mm512_max_epu8(a, _mm512_shuffle_i64x2(a, a, _MM_SHUFFLE(2, 3, 0, 1)));
    b = _mm512_max_epu8(b, _mm512_shuffle_i64x2(b, b, _MM_SHUFFLE(2, 3, 0, 1)));
    __m512i c = _mm512_mask_blend_epi64(0xCC, a, b); /* lanes (B0, B2, B1, B3) */
    c = _mm512_max_epu8(c, _mm512_bsrli_epi128(c, 8));
    c = _mm512_max_epu8(c, _mm512_bsrli_epi128(c, 4));
    c = _mm512_max_epu8(c, _mm512_bsrli_epi128(c, 2));
    c = _mm512_max_epu8(c, _mm512_bsrli_epi128(c, 1));
    /* byte 0 of each lane, in block order: lanes 0, 2, 1, 3 */
    c = _mm512_permutexvar_epi8(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x30102000), c);
    return (uint32_t)_mm_cvtsi128_si32(_mm512_castsi512_si128(c));
#else
    uint32_t packed = 0;
    for (int j = 0; j < 4; j++)
        packed |= (uint32_t)block_max(in + j * BLOCK) << (8 * j);
    return packed;
#endif
}

/* What one 128x128 tile of the band being converted needs: p[c] = bf16 bits of
   fl32(value(c) * |s|), the sign of s, for each block exponent seen so far the index of its byte
   table (0xFF: not built yet; at most 127 tables, one per distinct p value), and for each largest
   code seen so far its table's index and its block exponent (by_code[c] 0xFF: not seen yet).
   A block's table is then one load away from its largest code, not three (p, exp, slot), which
   kept the block loop waiting on that chain of loads. */
typedef struct {
    uint16_t p[128];
    uint8_t slot[256];
    uint8_t by_code[128], exp_of_code[128];
    uint8_t sign;
    uint8_t built;
} tile_state;

/* quantize_mxfp8(dequantize_fp8_block(w, s)) for e4m3 codes w [n, k] (k % 32 == 0, rows starting
   on a 128-row tile boundary) and float32 tile scales s [ceil(n/128), scols]: DeepSeek's value
   bf16(fl32(v * s)), then MXFP8, without the BF16 tensor.
   Within a 128x128 tile the scale is fixed, so a block's amax is bf16(fl32(max|v| * |s|))
   (rounding is monotonic) and every output byte is a function of the input code alone: one
   128-entry table per (tile, block exponent), built when that exponent first appears.
   Rows are walked in memory order, a band of 128 rows at a time with the state of every tile of
   the band at hand: walking tile by tile instead (128 rows of 128 bytes, rows k bytes apart)
   mapped the rows onto a few cache sets and ran at a third of the speed. */
int mx_requantize_fp8(const uint8_t *restrict w, int64_t n, int64_t k, const float *restrict s,
                      int64_t scols, const float *restrict mult, const uint8_t *restrict exp,
                      int clamp, uint8_t *restrict q, uint8_t *restrict scales) {
    mx_sink none = {-1, 0, 0, NULL};
    return mx_requantize_fp8_into(w, n, k, s, scols, mult, exp, clamp, q, scales, &none);
}

/* The same, with q a sink's band where sink->fd >= 0 (sink->rows a multiple of TILE): a negative
   return is the -errno of a write that failed. */
int mx_requantize_fp8_into(const uint8_t *restrict w, int64_t n, int64_t k, const float *restrict s,
                           int64_t scols, const float *restrict mult, const uint8_t *restrict exp,
                           int clamp, uint8_t *restrict q, uint8_t *restrict scales, const mx_sink *sink) {
    int64_t nb = k / BLOCK, tiles = (k + TILE - 1) / TILE, band = 0; /* band: its first row */
    if (n <= 0 || k <= 0)
        return 0;
    tile_state *state = malloc(tiles * sizeof(tile_state));
    uint8_t(*tables)[128][128] = malloc(tiles * sizeof *tables);
    if (!state || !tables) {
        free(state);
        free(tables);
        return MX_FALLBACK;
    }
    int status = 0;
    for (int64_t r0 = 0; r0 < n && !status; r0 += TILE) {
        for (int64_t t = 0; t < tiles; t++) {
            float scale = s[(r0 / TILE) * scols + t];
            if (!isfinite(scale)) {
                status = MX_FALLBACK;
                break;
            }
            float abs_scale = fabsf(scale);
            for (uint32_t c = 0; c < 0x7F; c++)
                state[t].p[c] = bf16_bits(e4m3_value(c) * abs_scale);
            state[t].p[0x7F] = 0x7F80u; /* never looked up: a NaN code stops the call first */
            memset(state[t].slot, 0xFF, sizeof state[t].slot);
            memset(state[t].by_code, 0xFF, sizeof state[t].by_code);
            state[t].sign = signbit(scale) ? 0x80u : 0u;
            state[t].built = 0;
        }
        int64_t r1 = n - r0 < TILE ? n : r0 + TILE;
        for (int64_t r = r0; r < r1 && !status; r++) {
            const uint8_t *wr = w + r * k;
            uint8_t *qr = q + (r - band) * k, *sr = scales + r * nb;
            for (int64_t b = 0; b < nb && !status; b += 4) {
                uint32_t codes;
                int count = nb - b < 4 ? (int)(nb - b) : 4;
                if (count == 4) {
                    codes = block_max4(wr + b * BLOCK);
                } else { /* the last blocks of a row whose length is not a multiple of 128 */
                    codes = 0;
                    for (int j = 0; j < count; j++)
                        codes |= (uint32_t)block_max(wr + (b + j) * BLOCK) << (8 * j);
                }
                tile_state *ts = &state[b * BLOCK / TILE]; /* b % 4 == 0: the group lies in one tile */
                uint8_t(*tile_tables)[128] = tables[b * BLOCK / TILE];
                for (int j = 0; j < count; j++) {
                    int64_t blk = b + j;
                    uint8_t code = (uint8_t)(codes >> (8 * j));
                    if (code == 0x7F) { /* a NaN code */
                        status = MX_FALLBACK;
                        break;
                    }
                    uint8_t slot = ts->by_code[code];
                    if (slot == 0xFF) { /* the first block of this tile and band with this largest code */
                        uint16_t amax = ts->p[code];
                        uint8_t e = exp[amax & 0x7FFFu];
                        if (amax >= 0x7F80u || e == NONFINITE_EXP) {
                            status = MX_FALLBACK;
                            break;
                        }
                        if (ts->slot[e] == 0xFF) {
                            ts->slot[e] = ts->built++;
                            build_table(ts->p, mult[amax], ts->sign, clamp, tile_tables[ts->slot[e]]);
                        }
                        slot = ts->by_code[code] = ts->slot[e];
                        ts->exp_of_code[code] = e;
                    }
                    sr[blk] = ts->exp_of_code[code];
                    lookup_block(tile_tables[slot], wr + blk * BLOCK, qr + blk * BLOCK);
                }
            }
        }
        if (sink->fd >= 0 && !status && (r1 - band == sink->rows || r1 == n)) {
            status = mx_sink_write(sink, q, band, r1, k);
            band = r1;
        }
    }
    free(state);
    free(tables);
    return status;
}
