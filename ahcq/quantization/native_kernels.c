/* Fused CPU fake-quant kernels, loaded through ctypes by ahcq/quantization/native.py.
 *
 * One pass over memory per call instead of the dozen elementwise passes of the torch-op encoders. Plain
 * IEEE float32 arithmetic only (built without -ffast-math), so the uniform kernels round exactly as torch's
 * fake-quant ops (multiply by the float32 reciprocal, round half to even, clamp, scale), and the table
 * kernel reproduces a monotone encoder exactly from its code thresholds.
 *
 * keep (QDrop) may be NULL; where keep[i] != 0 the input passes through unchanged.
 */
#include <math.h>
#include <stdint.h>

#define BLOCK 64

/* y = s * (clamp(round(x * inv), lo, hi) + 0), one grid for the whole tensor. */
void ahcq_uniform(const float *restrict x, const uint8_t *restrict keep, float *restrict y, int64_t n,
                  float inv, float lo, float hi, float s) {
    for (int64_t i = 0; i < n; ++i) {
        float c = nearbyintf(x[i] * inv);
        c = c < lo ? lo : c;
        c = c > hi ? hi : c;
        y[i] = (c + 0.0f) * s;
    }
    if (keep)
        for (int64_t i = 0; i < n; ++i)
            y[i] = keep[i] ? x[i] : y[i];
}

/* The same on rows of `row_len` contiguous elements starting at x + offsets[r] (a strided view, e.g. q
 * out of a fused qkv projection), into the contiguous y. */
void ahcq_uniform_strided(const float *restrict x, const int64_t *restrict offsets, float *restrict y,
                          int64_t rows, int64_t row_len, float inv, float lo, float hi, float s) {
    for (int64_t r = 0; r < rows; ++r)
        ahcq_uniform(x + offsets[r], 0, y + r * row_len, row_len, inv, lo, hi, s);
}

/* The same per channel of the last axis: rows of `channels` elements, one grid per channel. */
void ahcq_uniform_rows(const float *restrict x, const uint8_t *restrict keep, float *restrict y,
                       int64_t rows, int64_t channels, const float *restrict inv, const float *restrict lo,
                       const float *restrict hi, const float *restrict s) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * channels;
        float *yr = y + r * channels;
        for (int64_t c = 0; c < channels; ++c) {
            float q = nearbyintf(xr[c] * inv[c]);
            q = q < lo[c] ? lo[c] : q;
            q = q > hi[c] ? hi[c] : q;
            yr[c] = (q + 0.0f) * s[c];
        }
        if (keep)
            for (int64_t c = 0; c < channels; ++c)
                yr[c] = keep[r * channels + c] ? xr[c] : yr[c];
    }
}

/* y = levels[code], code = #{j : x >= thresholds[j]} for ascending thresholds (NaN = never reached): the
 * code of any monotone encoder whose thresholds are the least inputs reaching each code. Elements are
 * counted in blocks so that the threshold loop runs across a block in vector registers. */
void ahcq_table(const float *restrict x, const uint8_t *restrict keep, float *restrict y, int64_t n,
                const float *restrict thresholds, int32_t count, const float *restrict levels) {
    int32_t code[BLOCK];
    for (int64_t start = 0; start < n; start += BLOCK) {
        const int64_t len = n - start < BLOCK ? n - start : BLOCK;
        const float *xb = x + start;
        for (int64_t k = 0; k < BLOCK; ++k)
            code[k] = 0;
        if (len == BLOCK) {
            for (int32_t j = 0; j < count; ++j) {
                const float t = thresholds[j];
                for (int64_t k = 0; k < BLOCK; ++k)
                    code[k] += xb[k] >= t ? 1 : 0;
            }
        } else {
            for (int32_t j = 0; j < count; ++j)
                for (int64_t k = 0; k < len; ++k)
                    code[k] += xb[k] >= thresholds[j] ? 1 : 0;
        }
        for (int64_t k = 0; k < len; ++k)
            y[start + k] = keep && keep[start + k] ? xb[k] : levels[code[k]];
    }
}

/* ahcq_table on rows of `row_len` contiguous elements starting at x + offsets[r], into the contiguous y. */
void ahcq_table_strided(const float *restrict x, const int64_t *restrict offsets, float *restrict y,
                        int64_t rows, int64_t row_len, const float *restrict thresholds, int32_t count,
                        const float *restrict levels) {
    for (int64_t r = 0; r < rows; ++r)
        ahcq_table(x + offsets[r], 0, y + r * row_len, row_len, thresholds, count, levels);
}

/* Backward kernels: the straight-through derivatives of the forward above, with the same float32 operations
 * as the torch-op backward in primitives.py, in one pass. grad_x receives grad * dy/dx; sums[p] receives
 * sum(grad * dy/dparam_p), in float32 over runs of SUM_RUN elements (vector lanes) added up in double. A
 * kept element (QDrop, keep may be NULL) has dy/dx = 1 and no parameter gradient:
 * slope * (1 - kept) + kept and dparam * (1 - kept), as the torch-op backward computes them. */
#define SUM_RUN 512
#define ALWAYS_INLINE static inline __attribute__((always_inline))

ALWAYS_INLINE float kept_at(const uint8_t *keep, int64_t i, int has_keep) {
    return has_keep ? (float)keep[i] : 0.0f;
}

/* Uniform per tensor: dy/dx = 1 inside the grid; s * dy/ds = y - x * inside. */
ALWAYS_INLINE void uniform_backward(const float *restrict x, const float *restrict y,
                                    const uint8_t *restrict keep, const float *restrict grad,
                                    float *restrict grad_x, int64_t n, float inv, float lo, float hi,
                                    double *restrict sums, int has_keep) {
    double ds = 0.0;
    for (int64_t start = 0; start < n; start += SUM_RUN) {
        const int64_t stop = n - start < SUM_RUN ? n : start + SUM_RUN;
        float run = 0.0f;
#pragma omp simd reduction(+ : run)
        for (int64_t i = start; i < stop; ++i) {
            const float c = nearbyintf(x[i] * inv);
            const float inside = c >= lo && c <= hi ? 1.0f : 0.0f;
            const float kept = kept_at(keep, i, has_keep);
            grad_x[i] = grad[i] * (inside * (1.0f - kept) + kept);
            run += grad[i] * ((y[i] - x[i] * inside) * (1.0f - kept));
        }
        ds += run;
    }
    sums[0] = ds;
}

void ahcq_uniform_backward(const float *x, const float *y, const uint8_t *keep, const float *grad,
                           float *grad_x, int64_t n, float inv, float lo, float hi, double *sums) {
    if (keep)
        uniform_backward(x, y, keep, grad, grad_x, n, inv, lo, hi, sums, 1);
    else
        uniform_backward(x, y, keep, grad, grad_x, n, inv, lo, hi, sums, 0);
}

/* HLUQ, u = x - x_min: uniform region (u > switch) on the grid: dy/dx = 1, dy/ds2 = round(v) - v; clipped:
 * dy/ds1 = 1, dy/ds2 = j; log region below log_clip (k >= 0): dy/dx = (y - x_min)/u; log region clipped
 * (u >= log_clip): dy/ds1 = 1. log_clip: the least u whose log code exceeds the top (NaN: none).
 * sums: [ds1, ds2, dx_min], dy/dx_min = 1 - dy/dx summed as grad - grad_x. */
ALWAYS_INLINE void hluq_backward(const float *restrict x, const float *restrict y, const uint8_t *restrict keep,
                                 const float *restrict grad, float *restrict grad_x, int64_t n, float x_min,
                                 float s1, float s2, float uniform_switch, float steps, float log_clip,
                                 double *restrict sums, int has_keep) {
    const float tiny = 1.17549435e-38f;
    double ds1 = 0.0, ds2 = 0.0, dx_min = 0.0;
    for (int64_t start = 0; start < n; start += SUM_RUN) {
        const int64_t stop = n - start < SUM_RUN ? n : start + SUM_RUN;
        float run1 = 0.0f, run2 = 0.0f, run3 = 0.0f;
#pragma omp simd reduction(+ : run1, run2, run3)
        for (int64_t i = start; i < stop; ++i) {
            const float u = x[i] - x_min;
            const float uniform = u > uniform_switch ? 1.0f : 0.0f;
            const float v = (u - s1) / s2;
            const float rounded = nearbyintf(v);
            const float step = rounded < 1.0f ? 1.0f : rounded > steps ? steps : rounded;
            const float uniform_in = step == rounded ? uniform : 0.0f;
            const float clipped = uniform - uniform_in;
            const float log_clipped = u >= log_clip ? 1.0f : 0.0f;
            const float log_in = (1.0f - log_clipped) * (1.0f - uniform);
            const float ratio = (y[i] - x_min) / (u < tiny ? tiny : u);
            const float kept = kept_at(keep, i, has_keep);
            const float gx = grad[i] * ((uniform_in + log_in * ratio) * (1.0f - kept) + kept);
            grad_x[i] = gx;
            run3 += grad[i] - gx;
            run1 += grad[i] * ((clipped + log_clipped * (1.0f - uniform)) * (1.0f - kept));
            run2 += grad[i] * ((clipped * step + uniform_in * (rounded - v)) * (1.0f - kept));
        }
        ds1 += run1;
        ds2 += run2;
        dx_min += run3;
    }
    sums[0] = ds1;
    sums[1] = ds2;
    sums[2] = dx_min;
}

void ahcq_hluq_backward(const float *x, const float *y, const uint8_t *keep, const float *grad, float *grad_x,
                        int64_t n, float x_min, float s1, float s2, float uniform_switch, float steps,
                        float log_clip, double *sums) {
    if (keep)
        hluq_backward(x, y, keep, grad, grad_x, n, x_min, s1, s2, uniform_switch, steps, log_clip, sums, 1);
    else
        hluq_backward(x, y, keep, grad, grad_x, n, x_min, s1, s2, uniform_switch, steps, log_clip, sums, 0);
}

/* AGQ: below clip (k >= 0) dy/dx = y/x; clipped to the scale (x >= clip): dy/ds = 1. clip: the least x
 * whose code exceeds the top (NaN: none). */
ALWAYS_INLINE void agq_backward(const float *restrict x, const float *restrict y, const uint8_t *restrict keep,
                                const float *restrict grad, float *restrict grad_x, int64_t n, float clip,
                                double *restrict sums, int has_keep) {
    const float tiny = 1.17549435e-38f;
    double ds = 0.0;
    for (int64_t start = 0; start < n; start += SUM_RUN) {
        const int64_t stop = n - start < SUM_RUN ? n : start + SUM_RUN;
        float run = 0.0f;
#pragma omp simd reduction(+ : run)
        for (int64_t i = start; i < stop; ++i) {
            const float clipped = x[i] >= clip ? 1.0f : 0.0f;
            const float slope = y[i] / (x[i] < tiny ? tiny : x[i]) * (1.0f - clipped);
            const float kept = kept_at(keep, i, has_keep);
            grad_x[i] = grad[i] * (slope * (1.0f - kept) + kept);
            run += grad[i] * (clipped * (1.0f - kept));
        }
        ds += run;
    }
    sums[0] = ds;
}

void ahcq_agq_backward(const float *x, const float *y, const uint8_t *keep, const float *grad, float *grad_x,
                       int64_t n, float clip, double *sums) {
    if (keep)
        agq_backward(x, y, keep, grad, grad_x, n, clip, sums, 1);
    else
        agq_backward(x, y, keep, grad, grad_x, n, clip, sums, 0);
}
