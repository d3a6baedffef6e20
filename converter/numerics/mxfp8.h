/* What mxconv's compiled kernels (mxfp8.c, fp8_block.c) share: the instruction sets they may
   use, their status codes and block sizes, and exact conversions between float32, bfloat16 and
   e4m3 codes. See mxfp8.c for the rules every kernel follows. */

#ifndef MXCONV_MXFP8_H
#define MXCONV_MXFP8_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#define HAVE_AVX2 1 /* FP8 block maxima and 16-entry lookups; BF16 blocks where AVX-512 is missing */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HAVE_AVX512 1 /* 16 floats or 32 halfwords a register: the BF16 path's blocks */
#if defined(__AVX512VBMI__)
#define HAVE_BYTE_PERMUTE 1 /* vpermi2b: 64 lookups into a 128-byte table in one instruction */
#endif
#endif
#endif

#define MX_FALLBACK 1
#define BLOCK 32
#define TILE 128

/* Where a kernel's e4m3 bytes go when they are written to a file as they are made (stream.c):
   q is then a band of `rows` rows (the caller's buffer, small enough to stay in the core's
   cache), written with pwrite(2) at `offset` + (first row) * k each time it is full, and at the
   end. fd < 0: q holds every row, nothing is written. */
typedef struct {
    int fd;
    int64_t offset, rows;
    void *lock; /* a pthread mutex held around each write (NULL: none): the file's writers take
                   turns asleep, where the kernel's own lock has a second writer spin */
} mx_sink;

/* Write rows [r0, r1) of a band to the sink: 0, or -errno of the write that failed. */
int mx_sink_write(const mx_sink *sink, const uint8_t *q, int64_t r0, int64_t r1, int64_t k);
int mx_quantize_bf16(const uint16_t *restrict x, int64_t n, int64_t k, const float *restrict mult,
                     const uint8_t *restrict exp, int clamp, uint8_t *restrict q, uint8_t *restrict scales);
int mx_requantize_fp8_into(const uint8_t *restrict w, int64_t n, int64_t k, const float *restrict s,
                           int64_t scols, const float *restrict mult, const uint8_t *restrict exp,
                           int clamp, uint8_t *restrict q, uint8_t *restrict scales, const mx_sink *sink);

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* float32 -> bfloat16 bits, round to nearest even (torch's rule; never given NaN here). */
static inline uint16_t bf16_bits(float f) {
    uint32_t u = bits_of(f);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* e4m3fn code 0..126 (no sign, not NaN) -> its exact value. */
static inline float e4m3_value(uint32_t code) {
    uint32_t exp = code >> 3, man = code & 7u;
    return exp ? float_of(((exp + 120u) << 23) | (man << 20)) : (float)man * 0x1p-9f;
}

#ifdef HAVE_AVX2
/* table[code & 0x7F] for 32 codes: vpshufb looks up 16 entries, so the 128-byte table goes as 8
   sixteenths, picked by bits 4..6 of each code. */
static inline __m256i lookup128_avx2(const uint8_t *restrict table, __m256i codes) {
    __m256i low = _mm256_and_si256(codes, _mm256_set1_epi8(0x0F));
    __m256i high = _mm256_and_si256(_mm256_srli_epi16(codes, 4), _mm256_set1_epi8(0x07));
    __m256i bytes = _mm256_setzero_si256();
    for (int t = 0; t < 8; t++) {
        __m256i part = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(table + 16 * t)));
        __m256i hit = _mm256_cmpeq_epi8(high, _mm256_set1_epi8((char)t));
        bytes = _mm256_blendv_epi8(bytes, _mm256_shuffle_epi8(part, low), hit);
    }
    return bytes;
}
#endif

#endif
