/* The error of an MXFP8 weight against the BF16 values it was made from, for `mxconv verify`:
   one pass over the data where the torch code made about twenty. Statistics, not bytes: the
   per-element arithmetic is the torch code's (float32 dequantized value minus the float32
   source value), the sums are kept in double (the torch code summed each 1M-element chunk in
   float32), so SQNR may differ from it in the last digits and is closer to the exact value. */

#include "mxfp8.h"

/* Every e4m3fn code's value, NaN for 0x7F and 0xFF (the torch code's float8 cast gives NaN). */
static void e4m3_table(float table[256]) {
    for (uint32_t c = 0; c < 256; c++) {
        uint32_t mag = c & 0x7Fu;
        float v = mag == 0x7Fu ? NAN : e4m3_value(mag);
        table[c] = (c & 0x80u) ? -v : v;
    }
}

/* For x (BF16 bits) [n, k], q (e4m3 codes) [n, k] and scales (E8M0 bytes) [n, k/32], k % 32 == 0:
   sums[0] = sum of x^2, sums[1] = sum of (v - x)^2, sums[2] = the largest |v - x| of a block,
   sums[3] = the largest block error relative to the block's largest |x| (Inf for an error in an
   all-zero block), over finite x only (a non-finite x counts as 0 with no error, as in the torch
   code); counts[0] = elements with |x| / scale >= clip, counts[1] = blocks stored as zeros,
   counts[2] = those of them whose x is not all zero, counts[3] = non-finite x. A NaN code makes
   the error sums NaN. */
void mx_error_stats_bf16(const uint16_t *restrict x, int64_t n, int64_t k, const uint8_t *restrict q,
                         const uint8_t *restrict scales, float clip, double *restrict sums,
                         int64_t *restrict counts) {
    float value[256];
    e4m3_table(value);
    double signal = 0.0, noise = 0.0;
    float max_abs = 0.0f, max_rel = 0.0f;
    int nan_error = 0;
    int64_t clipped = 0, zero_blocks = 0, lost = 0, nonfinite = 0, blocks = n * (k / BLOCK);
    for (int64_t b = 0; b < blocks; b++) {
        const uint16_t *xb = x + b * BLOCK;
        const uint8_t *qb = q + b * BLOCK;
        uint32_t e = scales[b];
        float scale = e ? float_of(e << 23) : 0x1p-127f; /* 2^(e - 127); e = 255 is never written */
        float amax = 0.0f, block_err = 0.0f;
        uint32_t codes = 0;
        double block_signal = 0.0, block_noise = 0.0;
        for (int i = 0; i < BLOCK; i++) {
            float xv = float_of((uint32_t)xb[i] << 16);
            float err = value[qb[i]] * scale - xv;
            codes |= qb[i] & 0x7Fu;
            if (!isfinite(xv)) {
                nonfinite++;
                xv = 0.0f;
                err = 0.0f;
            }
            float mag = fabsf(xv), aerr = fabsf(err);
            block_signal += (double)xv * xv;
            block_noise += (double)err * err;
            nan_error |= isnan(err);
            amax = mag > amax ? mag : amax;
            block_err = aerr > block_err ? aerr : block_err;
            clipped += mag / scale >= clip;
        }
        signal += block_signal;
        noise += block_noise;
        float rel = amax > 0.0f ? block_err / (amax < 0x1p-126f ? 0x1p-126f : amax)  /* as torch's clamp(tiny) */
                                : (block_err > 0.0f ? INFINITY : 0.0f);
        max_abs = block_err > max_abs ? block_err : max_abs;
        max_rel = rel > max_rel ? rel : max_rel;
        if (codes == 0) {
            zero_blocks++;
            lost += amax > 0.0f;
        }
    }
    sums[0] = signal;
    sums[1] = noise;
    sums[2] = nan_error ? NAN : max_abs;
    sums[3] = nan_error ? NAN : max_rel;
    counts[0] = clipped;
    counts[1] = zero_blocks;
    counts[2] = lost;
    counts[3] = nonfinite;
}
