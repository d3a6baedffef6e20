/* DeepSeek's weight_dequant, compiled: an FP8 weight with one float32 scale per 128x128 tile, as
   BF16. The rules of mxfp8.c hold here too (pure, caller-owned buffers, MX_FALLBACK for what the
   kernel does not model, the reference's float operations in its order). */

#include "mxfp8.h"

/* One tile's outputs by code (sign bit clear): BF16 bits, and the same as byte planes for AVX2. */
typedef struct {
    uint16_t words[128];
    uint8_t low[128], high[128];
} tile_table;

#ifdef HAVE_AVX512
/* 32 codes -> 32 BF16 values through the tile's words, held as four registers of 32 halfwords: a
   two-register permute covers 64 entries, bit 6 of the code picks the pair, bit 7 (the sign) is
   put back on the result. */
static inline void lookup32(const __m512i t[4], const uint8_t *restrict in, uint16_t *restrict out) {
    __m512i codes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)in));
    __m512i low = _mm512_permutex2var_epi16(t[0], codes, t[1]);
    __m512i high = _mm512_permutex2var_epi16(t[2], codes, t[3]);
    __mmask32 upper = _mm512_test_epi16_mask(codes, _mm512_set1_epi16(0x40));
    __m512i sign = _mm512_slli_epi16(_mm512_and_si512(codes, _mm512_set1_epi16(0x80)), 8);
    _mm512_storeu_si512(out, _mm512_xor_si512(_mm512_mask_blend_epi16(upper, low, high), sign));
}
#elif defined(HAVE_AVX2)
/* The same through the byte planes: two 128-entry byte lookups, the sign onto the high bytes,
   then the planes interleaved into halfwords (the unpacks work within 128-bit lanes). */
static inline void lookup32(const tile_table *restrict t, const uint8_t *restrict in, uint16_t *restrict out) {
    __m256i codes = _mm256_loadu_si256((const __m256i *)in);
    __m256i sign = _mm256_and_si256(codes, _mm256_set1_epi8((char)0x80));
    __m256i low = lookup128_avx2(t->low, codes);
    __m256i high = _mm256_xor_si256(lookup128_avx2(t->high, codes), sign);
    __m256i a = _mm256_unpacklo_epi8(low, high), b = _mm256_unpackhi_epi8(low, high);
    _mm256_storeu_si256((__m256i *)out, _mm256_permute2x128_si256(a, b, 0x20));
    _mm256_storeu_si256((__m256i *)(out + 16), _mm256_permute2x128_si256(a, b, 0x31));
}
#endif

/* Whether any of the `count` codes at `in` is a NaN code (0x7F or 0xFF). */
static inline int has_nan_code(const uint8_t *restrict in, int64_t count) {
    int64_t i = 0;
#ifdef HAVE_AVX2
    __m256i low7 = _mm256_set1_epi8(0x7F), hits = _mm256_setzero_si256();
    for (; i + 32 <= count; i += 32) {
        __m256i c = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(in + i)), low7);
        hits = _mm256_or_si256(hits, _mm256_cmpeq_epi8(c, low7));
    }
    if (!_mm256_testz_si256(hits, hits))
        return 1;
#endif
    for (; i < count; i++)
        if ((in[i] & 0x7Fu) == 0x7Fu)
            return 1;
    return 0;
}

/* dequantize_fp8_block for e4m3 codes w [n, k] (rows starting on a 128-row tile boundary) and
   float32 tile scales s [ceil(n/128), scols]: out [n, k] = the BF16 bits of fl32(value(c) * s).
   Within a tile the scale is fixed, so each output is a function of the code alone: a 128-entry
   table per tile (the product's sign is the code's XOR the scale's, for zeros too, and rounding
   is symmetric, so code c | 0x80 gives table[c] ^ 0x8000). Rows are walked in memory order with
   the tables of a whole 128-row band at hand, as in mx_requantize_fp8. k needs no particular
   multiple. Declines NaN codes and non-finite scales (the reference then gives its NaNs; rows
   before the one that declines are written by then, as the caller's buffer allows). */
int mx_dequantize_fp8(const uint8_t *restrict w, int64_t n, int64_t k, const float *restrict s, int64_t scols,
                      uint16_t *restrict out) {
    int64_t tiles = (k + TILE - 1) / TILE;
    if (n <= 0 || k <= 0)
        return 0;
    tile_table *tables = aligned_alloc(64, tiles * sizeof *tables);
    if (!tables)
        return MX_FALLBACK;
    for (int64_t r0 = 0; r0 < n; r0 += TILE) {
        for (int64_t t = 0; t < tiles; t++) {
            float scale = s[(r0 / TILE) * scols + t];
            if (!isfinite(scale)) {
                free(tables);
                return MX_FALLBACK;
            }
            tile_table *tt = &tables[t];
            for (uint32_t c = 0; c < 128; c++) { /* code 0x7F (NaN) is never looked up: declined below */
                tt->words[c] = c < 0x7F ? bf16_bits(e4m3_value(c) * scale) : 0x7FC0u;
                tt->low[c] = (uint8_t)tt->words[c];
                tt->high[c] = (uint8_t)(tt->words[c] >> 8);
            }
        }
        int64_t r1 = n - r0 < TILE ? n : r0 + TILE;
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *wr = w + r * k;
            uint16_t *orow = out + r * k;
            if (has_nan_code(wr, k)) { /* checked row by row, while the row is in the cache anyway */
                free(tables);
                return MX_FALLBACK;
            }
            for (int64_t t = 0, c = 0; t < tiles; t++) {
                const tile_table *tt = &tables[t];
                int64_t end = c + TILE < k ? c + TILE : k;
#ifdef HAVE_AVX512
                if (end - c == TILE) { /* a whole tile: 4 lookups of 32 codes */
                    __m512i tab[4];
                    for (int j = 0; j < 4; j++)
                        tab[j] = _mm512_load_si512(tt->words + 32 * j);
                    for (; c < end; c += 32)
                        lookup32(tab, wr + c, orow + c);
                }
#elif defined(HAVE_AVX2)
                for (; c + 32 <= end; c += 32)
                    lookup32(tt, wr + c, orow + c);
#endif
                for (; c < end; c++)
                    orow[c] = tt->words[wr[c] & 0x7Fu] ^ (uint16_t)((wr[c] & 0x80u) << 8);
            }
        }
    }
    free(tables);
    return 0;
}
