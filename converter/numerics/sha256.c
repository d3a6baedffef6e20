/* The sha256 compression function over two messages at once, for the source hashes of the
   provenance file (sources/sha256_pairs.py; not numerics, but built into the same library).

   Why: hashing the source costs about as much CPU as converting it. OpenSSL's sha256 runs at
   1.4-1.9 GB/s on one core with the x86 SHA extensions (SHA-NI), so a 15.3 GB FP8 source takes
   8-9 CPU-seconds to hash, about what converting it takes. A message's 64 rounds a block are a
   chain of dependent SHA256RNDS2 instructions, each waiting for the one before; two messages'
   chains, interleaved, run side by side on one core: 3.3 GB/s of the two together on a 2-core
   AMD EPYC VM against 1.8 for one, 2.3 against 1.9 on an Intel Xeon (Emerald Rapids) VM.

   mx_sha256_blocks runs the compression over `nblocks` 64-byte blocks of one message (b == NULL)
   or of two (a and b, as many blocks of each), updating each state in place: the eight words
   H0..H7 of FIPS 180-4, host order. Padding and the digest are the caller's. It returns 0, or -1
   where this build has no SHA-NI (the caller hashes with hashlib then). */

#include <stddef.h>
#include <stdint.h>

#if defined(__SHA__) && defined(__SSE4_1__) && defined(__SSSE3__)
#include <immintrin.h>

static const uint32_t K[64] __attribute__((aligned(16))) = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

/* SHA256RNDS2 keeps the state as two registers, (A, B, E, F) and (C, D, G, H) from the highest
   lane down; H0..H7 in memory load as (H3, H2, H1, H0) and (H7, H6, H5, H4). */
static inline void to_rounds(const uint32_t *h, __m128i *abef, __m128i *cdgh) {
    __m128i cdab = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)h), 0xB1);
    __m128i efgh = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)(h + 4)), 0x1B);
    *abef = _mm_alignr_epi8(cdab, efgh, 8);
    *cdgh = _mm_blend_epi16(efgh, cdab, 0xF0);
}

static inline void from_rounds(uint32_t *h, __m128i abef, __m128i cdgh) {
    __m128i feba = _mm_shuffle_epi32(abef, 0x1B);
    __m128i dchg = _mm_shuffle_epi32(cdgh, 0xB1);
    _mm_storeu_si128((__m128i *)h, _mm_blend_epi16(feba, dchg, 0xF0));
    _mm_storeu_si128((__m128i *)(h + 4), _mm_alignr_epi8(dchg, feba, 8));
}

/* A lane's message words: the block's big-endian 32-bit words, then the schedule
   W[t] = s1(W[t-2]) + W[t-7] + s0(W[t-15]) + W[t-16], four words at a time. */
#define LOAD(m, p, i) m = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p) + (i)), bswap)
#define NEXT(m0, m1, m2, m3) \
    m0 = _mm_sha256msg2_epu32(_mm_add_epi32(_mm_sha256msg1_epu32(m0, m1), _mm_alignr_epi8(m3, m2, 4)), m3)
/* Four rounds with message words m and constants K[4g..4g+3]. */
#define ROUNDS(abef, cdgh, m, g)                                                 \
    do {                                                                         \
        __m128i t_ = _mm_add_epi32(m, _mm_load_si128((const __m128i *)K + (g))); \
        cdgh = _mm_sha256rnds2_epu32(cdgh, abef, t_);                            \
        abef = _mm_sha256rnds2_epu32(abef, cdgh, _mm_shuffle_epi32(t_, 0x0E));   \
    } while (0)

/* Each step for lane a, then for lane b: two independent chains the core overlaps. */
#define FIRST(i, m)                                     \
    LOAD(m##a, pa, i);                                  \
    ROUNDS(abef_a, cdgh_a, m##a, i);                    \
    if (two) {                                          \
        LOAD(m##b, pb, i);                              \
        ROUNDS(abef_b, cdgh_b, m##b, i);                \
    }
#define GROUP(g, m0, m1, m2, m3)                        \
    NEXT(m0##a, m1##a, m2##a, m3##a);                   \
    ROUNDS(abef_a, cdgh_a, m0##a, g);                   \
    if (two) {                                          \
        NEXT(m0##b, m1##b, m2##b, m3##b);               \
        ROUNDS(abef_b, cdgh_b, m0##b, g);               \
    }

static inline __attribute__((always_inline)) void compress(uint32_t *ha, const uint8_t *pa, uint32_t *hb,
                                                           const uint8_t *pb, int64_t nblocks, const int two) {
    const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i abef_a, cdgh_a, abef_b = _mm_setzero_si128(), cdgh_b = _mm_setzero_si128();
    __m128i m0a, m1a, m2a, m3a, m0b = abef_b, m1b = abef_b, m2b = abef_b, m3b = abef_b;
    to_rounds(ha, &abef_a, &cdgh_a);
    if (two)
        to_rounds(hb, &abef_b, &cdgh_b);
    for (int64_t n = 0; n < nblocks; n++, pa += 64, pb += two ? 64 : 0) {
        const __m128i sa0 = abef_a, sa1 = cdgh_a, sb0 = abef_b, sb1 = cdgh_b;
        FIRST(0, m0) FIRST(1, m1) FIRST(2, m2) FIRST(3, m3)
        GROUP(4, m0, m1, m2, m3) GROUP(5, m1, m2, m3, m0) GROUP(6, m2, m3, m0, m1) GROUP(7, m3, m0, m1, m2)
        GROUP(8, m0, m1, m2, m3) GROUP(9, m1, m2, m3, m0) GROUP(10, m2, m3, m0, m1) GROUP(11, m3, m0, m1, m2)
        GROUP(12, m0, m1, m2, m3) GROUP(13, m1, m2, m3, m0) GROUP(14, m2, m3, m0, m1) GROUP(15, m3, m0, m1, m2)
        abef_a = _mm_add_epi32(abef_a, sa0);
        cdgh_a = _mm_add_epi32(cdgh_a, sa1);
        if (two) {
            abef_b = _mm_add_epi32(abef_b, sb0);
            cdgh_b = _mm_add_epi32(cdgh_b, sb1);
        }
    }
    from_rounds(ha, abef_a, cdgh_a);
    if (two)
        from_rounds(hb, abef_b, cdgh_b);
}

int mx_sha256_blocks(uint32_t *ha, const uint8_t *a, uint32_t *hb, const uint8_t *b, int64_t nblocks) {
    if (b != NULL)
        compress(ha, a, hb, b, nblocks, 1);
    else
        compress(ha, a, NULL, NULL, nblocks, 0);
    return 0;
}

#else

int mx_sha256_blocks(uint32_t *ha, const uint8_t *a, uint32_t *hb, const uint8_t *b, int64_t nblocks) {
    (void)ha, (void)a, (void)hb, (void)b, (void)nblocks;
    return -1;
}

#endif
