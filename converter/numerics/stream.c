/* The kernels with their e4m3 bytes written to a file as they are made, a band of rows at a
   time, from a band buffer small enough to stay in the core's cache (the caller's; see mx_sink
   in mxfp8.h). Made into a buffer of the whole piece and written from there by another thread,
   each output byte went to memory and was read back for write(2): on a 16-core VM whose memory
   gave about 35-40 GB/s, 16 processes converting FP8 and writing to tmpfs ran at 10.4 GB/s of
   input that way and at 12.3 GB/s in 128-row bands (scripts/band_probe.py;
   docs/performance-log.md, "ninth session").

   Returns as the kernels do (0, MX_FALLBACK: nothing usable was made, the caller recomputes the
   piece its usual way and writes over whatever bands went out), or the -errno of a write that
   failed. The scales (a 32nd of the bytes) go to the caller's buffer, as the kernels' do. */

#include <errno.h>
#include <pthread.h>
#include <unistd.h>

#include "mxfp8.h"

int mx_sink_write(const mx_sink *sink, const uint8_t *q, int64_t r0, int64_t r1, int64_t k) {
    int64_t total = (r1 - r0) * k, done = 0;
    int status = 0;
    if (sink->lock)
        pthread_mutex_lock((pthread_mutex_t *)sink->lock);
    while (done < total) {
        ssize_t got = pwrite(sink->fd, q + done, (size_t)(total - done), (off_t)(sink->offset + r0 * k + done));
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0) {
            status = got < 0 ? -errno : -EIO;
            break;
        }
        done += got;
    }
    if (sink->lock)
        pthread_mutex_unlock((pthread_mutex_t *)sink->lock);
    return status;
}

/* mx_requantize_fp8 with q written to fd at offset (row 0 of w there), `rows` rows at a time
   from `band` (rows a multiple of TILE, band rows * k bytes), holding `lock` (or NULL) to write. */
int mx_requantize_fp8_to_fd(const uint8_t *restrict w, int64_t n, int64_t k, const float *restrict s,
                            int64_t scols, const float *restrict mult, const uint8_t *restrict exp,
                            int clamp, uint8_t *restrict band, int64_t rows, int fd, int64_t offset,
                            void *lock, uint8_t *restrict scales) {
    if (fd < 0 || rows <= 0 || rows % TILE)
        return MX_FALLBACK;
    mx_sink sink = {fd, offset, rows, lock};
    return mx_requantize_fp8_into(w, n, k, s, scols, mult, exp, clamp, band, scales, &sink);
}

/* mx_quantize_bf16 with q written to fd at offset, `rows` rows at a time from `band`. */
int mx_quantize_bf16_to_fd(const uint16_t *restrict x, int64_t n, int64_t k, const float *restrict mult,
                           const uint8_t *restrict exp, int clamp, uint8_t *restrict band, int64_t rows,
                           int fd, int64_t offset, void *lock, uint8_t *restrict scales) {
    if (fd < 0 || rows <= 0)
        return MX_FALLBACK;
    mx_sink sink = {fd, offset, rows, lock};
    for (int64_t r0 = 0; r0 < n; r0 += rows) {
        int64_t r1 = n - r0 < rows ? n : r0 + rows;
        int status = mx_quantize_bf16(x + r0 * k, r1 - r0, k, mult, exp, clamp, band, scales + r0 * (k / BLOCK));
        if (!status)
            status = mx_sink_write(&sink, band, r0, r1, k);
        if (status)
            return status;
    }
    return 0;
}
