
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define G 32

static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }
static inline uint16_t f2h(float f) { return (uint16_t)_cvtss_sh(f, 0); }

/* dt: 0 f32, 1 bf16, 2 int8 blocks (fp16 d, 32 x int8), 3 int4 blocks (fp16 d, fp16 m, 16 B) */
static void enc_row(int dt, const float *x, uint8_t *dst, int hd) {
    if (dt == 0) { memcpy(dst, x, sizeof(float) * hd); return; }
    if (dt == 1) {
        uint16_t *o = (uint16_t *)dst;
        for (int i = 0; i < hd; i++) {
            uint32_t b; memcpy(&b, &x[i], 4);
            b += 0x7FFF + ((b >> 16) & 1);  /* round to nearest even, as torch's .to(bfloat16) */
            o[i] = (uint16_t)(b >> 16);
        }
        return;
    }
    for (int blk = 0; blk < hd / G; blk++) {
        const float *b = x + blk * G;
        if (dt == 2) {
            uint8_t *o = dst + blk * (2 + G);
            float amax = 0.0f;
            for (int i = 0; i < G; i++) { float a = fabsf(b[i]); if (a > amax) amax = a; }
            uint16_t d16 = f2h(amax / 127.0f);
            float d = h2f(d16), id = d > 0.0f ? 1.0f / d : 0.0f;
            memcpy(o, &d16, 2);
            int8_t *q = (int8_t *)(o + 2);
            for (int i = 0; i < G; i++) {
                float v = nearbyintf(b[i] * id);
                q[i] = (int8_t)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v));
            }
        } else {
            uint8_t *o = dst + blk * (4 + G / 2);
            float lo = b[0], hi = b[0];
            for (int i = 1; i < G; i++) { if (b[i] < lo) lo = b[i]; if (b[i] > hi) hi = b[i]; }
            uint16_t d16 = f2h((hi - lo) / 15.0f), m16 = f2h(lo);
            float d = h2f(d16), m = h2f(m16), id = d > 0.0f ? 1.0f / d : 0.0f;
            memcpy(o, &d16, 2);
            memcpy(o + 2, &m16, 2);
            for (int i = 0; i < G / 2; i++) {
                float v0 = nearbyintf((b[i] - m) * id), v1 = nearbyintf((b[i + G / 2] - m) * id);
                int q0 = (int)(v0 < 0.0f ? 0.0f : (v0 > 15.0f ? 15.0f : v0));
                int q1 = (int)(v1 < 0.0f ? 0.0f : (v1 > 15.0f ? 15.0f : v1));
                o[4 + i] = (uint8_t)(q0 | (q1 << 4));
            }
        }
    }
}

static const float *dec_row(int dt, const uint8_t *src, float *buf, int hd) {
    if (dt == 0) return (const float *)src;
    if (dt == 1) {
        const uint16_t *s = (const uint16_t *)src;
        for (int i = 0; i < hd; i++) { uint32_t b = (uint32_t)s[i] << 16; memcpy(&buf[i], &b, 4); }
        return buf;
    }
    for (int blk = 0; blk < hd / G; blk++) {
        float *o = buf + blk * G;
        if (dt == 2) {
            const uint8_t *p = src + blk * (2 + G);
            uint16_t d16; memcpy(&d16, p, 2);
            __m256 d = _mm256_set1_ps(h2f(d16));
            __m256i q = _mm256_loadu_si256((const __m256i *)(p + 2));
            __m128i q0 = _mm256_castsi256_si128(q), q1 = _mm256_extracti128_si256(q, 1);
            _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0)), d));
            _mm256_storeu_ps(o + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8))), d));
            _mm256_storeu_ps(o + 16, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1)), d));
            _mm256_storeu_ps(o + 24, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8))), d));
        } else {
            const uint8_t *p = src + blk * (4 + G / 2);
            uint16_t d16, m16; memcpy(&d16, p, 2); memcpy(&m16, p + 2, 2);
            __m256 d = _mm256_set1_ps(h2f(d16)), m = _mm256_set1_ps(h2f(m16));
            __m128i b = _mm_loadu_si128((const __m128i *)(p + 4)), mask = _mm_set1_epi8(0xF);
            __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
            /* d q + m as a multiply then an add (no FMA), as kv_cache.decode computes it */
            _mm256_storeu_ps(o, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), d), m));
            _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), d), m));
            _mm256_storeu_ps(o + 16, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), d), m));
            _mm256_storeu_ps(o + 24, _mm256_add_ps(_mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), d), m));
        }
    }
    return buf;
}

/* 8 lanes of FMA then one horizontal sum: the scalar loop's float reduction cannot be vectorised
   without -ffast-math, and it was most of a step at 2,048 tokens */
static inline float dot(const float *a, const float *b, int n) {
    if (n % 8) {
        float s = 0.0f;
        for (int i = 0; i < n; i++) s += a[i] * b[i];
        return s;
    }
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    v = _mm_hadd_ps(v, v);
    v = _mm_hadd_ps(v, v);
    return _mm_cvtss_f32(v);
}

static void rotate(float *x, const float *cos, const float *sin, int hd) {
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* r: unrotated q|k|v rows [hq + 2 hk][hd]; kv: this layer's rows [2 hk][cap][rb] (K heads, then V);
   ranges: nr x (first slot, count, sink flag). Sink slots are scored with q rotated by (cs, ss),
   the others with q rotated by (cw, sw). scratch: g * cap scores, hq * hd, 2 * hd floats. */
void kv_step(float *r, const float *cw, const float *sw, const float *cs, const float *ss, uint8_t *kv,
             int dt, int cap, int rb, int slot, const int *ranges, int nr, int hq, int hk, int hd,
             float scale, float *out, float *scratch) {
    int g = hq / hk, n = 0;
    for (int i = 0; i < nr; i++) n += ranges[3 * i + 1];
    float *sc = scratch;
    float *qs = scratch + (size_t)g * cap;
    float *row = qs + (size_t)hq * hd;
    int two = cs != cw;
    if (two) {
        memcpy(qs, r, sizeof(float) * hq * hd);
        for (int h = 0; h < hq; h++) rotate(qs + (size_t)h * hd, cs, ss, hd);
    }
    for (int h = 0; h < hq + hk; h++) rotate(r + (size_t)h * hd, cw, sw, hd);
    if (!two) qs = r;
    for (int h = 0; h < 2 * hk; h++)
        enc_row(dt, r + (size_t)(hq + h) * hd, kv + ((size_t)h * cap + slot) * rb, hd);
    for (int kh = 0; kh < hk; kh++) {
        const uint8_t *K = kv + (size_t)kh * cap * rb, *V = kv + (size_t)(hk + kh) * cap * rb;
        int idx = 0;
        for (int ri = 0; ri < nr; ri++) {
            int s0 = ranges[3 * ri], cnt = ranges[3 * ri + 1], sink = ranges[3 * ri + 2];
            const float *qb = (sink ? qs : r) + (size_t)kh * g * hd;
            for (int t = s0; t < s0 + cnt; t++, idx++) {
                const float *k = dec_row(dt, K + (size_t)t * rb, row, hd);
                for (int j = 0; j < g; j++) sc[(size_t)j * n + idx] = dot(qb + (size_t)j * hd, k, hd) * scale;
            }
        }
        for (int j = 0; j < g; j++) {
            float *s = sc + (size_t)j * n, mx = -INFINITY, sum = 0.0f;
            for (int t = 0; t < n; t++) if (s[t] > mx) mx = s[t];
            for (int t = 0; t < n; t++) { s[t] = expf(s[t] - mx); sum += s[t]; }
            float inv = 1.0f / sum;
            for (int t = 0; t < n; t++) s[t] *= inv;
            memset(out + (size_t)(kh * g + j) * hd, 0, sizeof(float) * hd);
        }
        idx = 0;
        for (int ri = 0; ri < nr; ri++) {
            int s0 = ranges[3 * ri], cnt = ranges[3 * ri + 1];
            for (int t = s0; t < s0 + cnt; t++, idx++) {
                const float *v = dec_row(dt, V + (size_t)t * rb, row, hd);
                for (int j = 0; j < g; j++) {
                    float a = sc[(size_t)j * n + idx], *o = out + (size_t)(kh * g + j) * hd;
                    for (int i = 0; i < hd; i++) o[i] += a * v[i];
                }
            }
        }
    }
}
