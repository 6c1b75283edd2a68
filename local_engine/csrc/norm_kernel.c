#include <immintrin.h>
#include <math.h>

/* RMSNorm of short fp32 rows for the MoE decode step (local_engine/norm_kernel.py). torch's
   F.rms_norm costs 12-18 us of dispatch for one 768-wide row here, ~40x its arithmetic; a decode
   token of a 24-layer Qwen3-MoE makes 72 of them (q heads, k heads, the post-attention norm). */

static inline float hsum8(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* 1 / sqrt(mean(x^2) + eps) over n values, summed in 8 lanes where n allows (qkernel's quantize_x
   computes the norm it folds into the activations the same way) */
static inline float inv_rms(const float *x, int n, float eps) {
    float ss = 0.0f;
    int i = 0;
    if (n >= 8) {
        __m256 acc = _mm256_setzero_ps();
        for (; i + 8 <= n; i += 8) {
            __m256 v = _mm256_loadu_ps(x + i);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        ss = hsum8(acc);
    }
    for (; i < n; i++) ss += x[i] * x[i];
    return 1.0f / sqrtf(ss / (float)n + eps);
}

/* y[n] = x * w / sqrt(mean(x^2) + eps) (HF's RMSNorm); y may be x */
void rms_row(const float *x, const float *w, float eps, int n, float *y) {
    float rs = inv_rms(x, n, eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * rs * w[i];
}

/* Qwen3's per-head q / k norm in place, before RoPE: r holds hq q heads then hk k heads of hd
   values (a q|k|v row); q heads take qw [hd], k heads kw [hd] */
void head_norms(float *r, int hq, int hk, int hd, const float *qw, const float *kw, float eps) {
    for (int h = 0; h < hq + hk; h++)
        rms_row(r + (size_t)h * hd, h < hq ? qw : kw, eps, hd, r + (size_t)h * hd);
}
