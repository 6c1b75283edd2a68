
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
/* Below this many multiply-adds (~0.5 ms of one core) an OpenMP fork/join with passive waits costs
   more than it saves: measured at 2 threads, decode 58 -> 66 tok/s with only the vocab head (and
   prefill) split across threads. */
#ifndef QK_MIN_PARALLEL
#define QK_MIN_PARALLEL 4000000
#endif

typedef struct { float d; float s; int16_t q[32]; } xblock;  /* activations, 72 bytes */

/* acc + the int16 pair products of a and b summed per int32 lane: one VPDPWSSD where the build has
   AVX-VNNI or AVX512-VNNI+VL (qkernel.py adds the -m flag only where /proc/cpuinfo lists it), else
   madd + add. Both wrap modulo 2^32 in the same way, so the sums, and every result, are bitwise equal. */
#if defined(__AVXVNNI__)
#define QK_DPWSSD 1
#define DPWSSD(acc, a, b) _mm256_dpwssd_avx_epi32((acc), (a), (b))
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define QK_DPWSSD 1
#define DPWSSD(acc, a, b) _mm256_dpwssd_epi32((acc), (a), (b))
#else
#define QK_DPWSSD 0
#define DPWSSD(acc, a, b) _mm256_add_epi32((acc), _mm256_madd_epi16((a), (b)))
#endif

static inline float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

static inline float h2f(const uint8_t *p) {
    uint16_t h; memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* x [M, K] fp32 -> M*K/32 blocks of int16 with an fp32 scale (and scale * sum for Q4_1).
   With normw != NULL each row is RMS-normalised first (x * normw / sqrt(mean(x^2) + eps), as
   HF's RMSNorm): the per-row factor only multiplies the block scales, so it costs one pass. */
static void quantize_x(const float *x, int M, int K, const float *normw, float eps, xblock *out) {
    int nb = K / 32;
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * K;
        float rs = 1.0f;
        if (normw) {
            __m256 ss = _mm256_setzero_ps();
            for (int i = 0; i < K; i += 8) { __m256 v = _mm256_loadu_ps(xr + i); ss = _mm256_fmadd_ps(v, v, ss); }
            rs = 1.0f / sqrtf(hsum8(ss) / (float)K + eps);
        }
        for (int b = 0; b < nb; b++) {
            const float *v = xr + b * 32;
            xblock *o = out + (size_t)m * nb + b;
            __m256 xv[4];
            for (int i = 0; i < 4; i++) {
                xv[i] = _mm256_loadu_ps(v + 8 * i);
                if (normw) xv[i] = _mm256_mul_ps(xv[i], _mm256_loadu_ps(normw + b * 32 + 8 * i));
            }
            __m256 mx = _mm256_setzero_ps();
            const __m256 sign = _mm256_set1_ps(-0.0f);
            for (int i = 0; i < 4; i++) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, xv[i]));
            __m128 t = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            t = _mm_max_ps(t, _mm_movehl_ps(t, t));
            t = _mm_max_ss(t, _mm_movehdup_ps(t));
            float amax = _mm_cvtss_f32(t);
            float d = amax / 32767.0f, id = amax > 0 ? 32767.0f / amax : 0.0f;
            __m256 mul = _mm256_set1_ps(id);
            __m256i q[4];
            for (int i = 0; i < 4; i++)
                q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(xv[i], mul),
                                                          _MM_ROUND_NEAREST | _MM_FROUND_NO_EXC));
            __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            s4 = _mm_hadd_epi32(s4, s4); s4 = _mm_hadd_epi32(s4, s4);
            o->d = d * rs;
            o->s = d * rs * (float)_mm_cvtsi128_si32(s4);
            /* 2 x (8 int32 + 8 int32) -> 16 int16 in order (packs interleaves the 128-bit lanes) */
            _mm256_storeu_si256((__m256i *)o->q, _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8));
            _mm256_storeu_si256((__m256i *)(o->q + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8));
        }
    }
}

/* ---- several activation rows (M > 1: a speculative verify, a batched step, a prefill chunk) ----
   Each weight row is unpacked once, for all M activation rows: its blocks go to int16 (+ an fp32
   scale and min per block) in a small buffer that stays in L1, and every tile of activation rows
   reads it from there. Unpacking is ~a third of a block's work at M = 1; done per tile of 4
   activation rows (as before) it made a 9-row product cost ~6 single rows. Tiles: 2 weight rows
   x 4 activation rows (mtile24), then remainders (mtile), with the same float operations per
   (weight row, activation row, block), so results do not depend on M. The min term (Q4_1, int2,
   int4) uses the activation blocks' sums transposed: xst [nb][mpad], mpad = M rounded up to 4
   (zero padded); xdt holds their scales the same way. */
#define MR 2       /* weight rows per tile */
#define MM_MAX 4   /* activation rows per tile */

static inline int hsum_epi32(__m256i v) {  /* integer: exact in any order */
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
    return _mm_cvtsi128_si32(t);
}

/* A remainder tile (R weight rows x MM < 4 activation rows, or 1 weight row): each pair's block
   sum reduced to one int32, then the same float operations mtile24 does in its lanes (convert,
   scale dw * xd, FMA; the min term's FMA; their sum at the end), one scalar at a time, so a row's
   result does not depend on which tile it fell in: a prefill chunk or a verify gives a position
   the same logits whatever the batch's size. */
static inline __attribute__((always_inline)) void mtile(const int16_t *wq, const float *wd, const float *wm,
                                                        const int HASM, const int R, const int MM, int nb,
                                                        const xblock *xq, const float *xst, int mpad, int m, int r,
                                                        int N, float *y, int add) {
    __m128 acc[MR][MM_MAX], sacc[MR][MM_MAX];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < MM; j++) { acc[i][j] = _mm_setzero_ps(); sacc[i][j] = _mm_setzero_ps(); }
    for (int b = 0; b < nb; b++) {
        __m256i w0[MR], w1[MR];
        for (int i = 0; i < R; i++) {
            const int16_t *p = wq + ((size_t)i * nb + b) * 32;
            w0[i] = _mm256_loadu_si256((const __m256i *)p);
            w1[i] = _mm256_loadu_si256((const __m256i *)(p + 16));
        }
        for (int j = 0; j < MM; j++) {
            const xblock *xb = xq + (size_t)(m + j) * nb + b;
            __m256i x0 = _mm256_loadu_si256((const __m256i *)xb->q);
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(xb->q + 16));
            __m128 xd = _mm_set_ss(xb->d);
            for (int i = 0; i < R; i++) {
                int t = hsum_epi32(DPWSSD(_mm256_madd_epi16(w0[i], x0), w1[i], x1));
                __m128 sc = _mm_mul_ss(_mm_set_ss(wd[(size_t)i * nb + b]), xd);
                acc[i][j] = _mm_fmadd_ss(_mm_cvtsi32_ss(_mm_setzero_ps(), t), sc, acc[i][j]);
                if (HASM)
                    sacc[i][j] = _mm_fmadd_ss(_mm_set_ss(wm[(size_t)i * nb + b]),
                                              _mm_set_ss(xst[(size_t)b * mpad + m + j]), sacc[i][j]);
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < MM; j++) {
            float v = _mm_cvtss_f32(HASM ? _mm_add_ss(acc[i][j], sacc[i][j]) : acc[i][j]);
            float *o = y + (size_t)(m + j) * N + r + i;
            *o = add ? *o + v : v;
        }
}

/* The next R weight rows' bytes of block step b (R blocks of bs bytes per step) requested ahead of
   the arithmetic, as rows_m1 does: without it the several-row tiles waited on DRAM, and the
   vocab head (30 MB of Q8_0) took 4.1x a single row's time at M = 2 instead of 1.4x. */
static inline __attribute__((always_inline)) void gguf_prefetch(const uint8_t *gw, int bs, int nb, int r, int R,
                                                                int b) {
    const char *ahead = (const char *)(gw + (size_t)(r + R) * nb * bs) + (size_t)b * bs * R;
    _mm_prefetch(ahead, _MM_HINT_T0);
    if (bs * R > 64) _mm_prefetch(ahead + 64, _MM_HINT_T0);
}

/* The full tile, 2 weight rows x 4 activation rows: the 8 pairs' int32 block sums are reduced
   across lanes first (unpack + add, 3 levels), so the int -> float conversion, the scale and the
   FMA are one 8-lane op each per block for all 8 pairs instead of one per pair: the multiply
   ports then carry little more than the 2 madds per pair. Lane 4 i + j of the result is weight
   row i, activation row j. xdt: the activation blocks' scales transposed like xst. */
static inline __attribute__((always_inline)) __m256i red4(__m256i a, __m256i b, __m256i c, __m256i d) {
    /* lanes 0..3 (4..7): partial sums of a, b, c, d over their low (high) 128-bit halves */
    __m256i ab = _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
    __m256i cd = _mm256_add_epi32(_mm256_unpacklo_epi32(c, d), _mm256_unpackhi_epi32(c, d));
    return _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
}

/* One GGUF block's 32 weights as int16, in two halves of 16 (Q4_1: 20 bytes = fp16 d, fp16 m, 16 bytes of
   nibbles, byte j holding element j low and element j+16 high; Q8_0: 34 bytes = fp16 d, 32 int8). */
static inline __attribute__((always_inline)) void gguf_block16(const uint8_t *blk, const int QT, __m256i *w0, __m256i *w1) {
    if (QT == 1) {
        const __m128i lowmask = _mm_set1_epi8(0x0F);
        __m128i t = _mm_loadu_si128((const __m128i *)(blk + 4));
        *w0 = _mm256_cvtepu8_epi16(_mm_and_si128(t, lowmask));
        *w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(t, 4), lowmask));
    } else {
        *w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 2)));
        *w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 18)));
    }
}

/* Weight row r + i's block b for a tile: from the GGUF blocks at gw (QT != 0) or from the unpacked
   int16 buffer wq with its scales wd / mins wm (QT == 0); the same codes and scales either way. */
static inline __attribute__((always_inline)) void tile_wblock(const uint8_t *gw, const int QT, const int16_t *wq,
                                                              const float *wd, const float *wm, const int HASM, int nb,
                                                              int r, int i, int b, __m256i *a0, __m256i *a1,
                                                              float *dw, float *mw) {
    if (QT) {
        const uint8_t *blk = gw + ((size_t)(r + i) * nb + b) * (QT == 1 ? 20 : 34);
        *dw = h2f(blk);
        if (QT == 1) *mw = h2f(blk + 2);
        gguf_block16(blk, QT, a0, a1);
    } else {
        const int16_t *wp = wq + ((size_t)i * nb + b) * 32;
        *a0 = _mm256_loadu_si256((const __m256i *)wp);
        *a1 = _mm256_loadu_si256((const __m256i *)(wp + 16));
        *dw = wd[(size_t)i * nb + b];
        if (HASM) *mw = wm[(size_t)i * nb + b];
    }
}

static inline __attribute__((always_inline)) void mtile24(const int16_t *wq, const float *wd, const float *wm,
                                                          const int HASM, int nb, const xblock *xq, const float *xdt,
                                                          const float *xst, int mpad, int m, int valid, int r, int N,
                                                          float *y, int add, const uint8_t *gw, const int QT) {
    /* valid < 4: a remainder run as a full tile, the missing activation rows read as the last
       valid one (their lanes are computed and dropped; the valid lanes' arithmetic is the same).
       QT (1: Q4_1, 8: Q8_0): weight rows r, r + 1 unpacked from the GGUF blocks at gw here, not
       read from the buffer: with one tile (M <= 4) the buffer's store and reload cost more than
       they save (the same int16 codes and scales, so the same results). */
    const int bs = QT == 1 ? 20 : 34;
    __m256 acc = _mm256_setzero_ps(), sacc = _mm256_setzero_ps();
    const xblock *x0r = xq + (size_t)m * nb;
    const xblock *x1r = x0r + (size_t)(valid > 1 ? 1 : 0) * nb, *x2r = x0r + (size_t)(valid > 2 ? 2 : valid - 1) * nb;
    const xblock *x3r = x0r + (size_t)(valid > 3 ? 3 : valid - 1) * nb;
    for (int b = 0; b < nb; b++) {
        /* one weight row at a time (its 4 products reduced at once): few live registers, no
           spills; the activation blocks are re-read from L1 for the second row */
        __m256i g[2];
        float dws[2], mws[2];
        if (QT) gguf_prefetch(gw, bs, nb, r, 2, b);
        for (int i = 0; i < 2; i++) {
            __m256i a0, a1;
            tile_wblock(gw, QT, wq, wd, wm, HASM, nb, r, i, b, &a0, &a1, &dws[i], &mws[i]);
#define PAIR(XR) DPWSSD(_mm256_madd_epi16(a0, _mm256_loadu_si256((const __m256i *)(XR)[b].q)), \
                        a1, _mm256_loadu_si256((const __m256i *)((XR)[b].q + 16)))
            g[i] = red4(PAIR(x0r), PAIR(x1r), PAIR(x2r), PAIR(x3r));
#undef PAIR
        }
        __m256i g0 = g[0], g1 = g[1];
        __m256i t = _mm256_add_epi32(_mm256_permute2x128_si256(g0, g1, 0x20), _mm256_permute2x128_si256(g0, g1, 0x31));
        __m256 xd = _mm256_broadcast_ps((const __m128 *)(xdt + (size_t)b * mpad + m));
        __m256 dw = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(dws[0])), _mm_set1_ps(dws[1]), 1);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(dw, xd), acc);
        if (HASM) {
            __m256 mw = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(mws[0])), _mm_set1_ps(mws[1]), 1);
            sacc = _mm256_fmadd_ps(mw, _mm256_broadcast_ps((const __m128 *)(xst + (size_t)b * mpad + m)), sacc);
        }
    }
    float v[8];
    _mm256_storeu_ps(v, HASM ? _mm256_add_ps(acc, sacc) : acc);
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < valid; j++) {
            float *o = y + (size_t)(m + j) * N + r + i;
            *o = add ? *o + v[4 * i + j] : v[4 * i + j];
        }
}

/* 2 weight rows x 2 activation rows: mtile24's arithmetic on 4 pairs (lanes i, j of an xmm
   instead of 4 i + j of a ymm): a padded full tile did twice the work and ran 2.4x slower than
   the per-pair tile before it on the vocab head at M = 2 (a batched step of two sequences). */
static inline __attribute__((always_inline)) void mtile22(const int16_t *wq, const float *wd, const float *wm,
                                                          const int HASM, int nb, const xblock *xq, const float *xdt,
                                                          const float *xst, int mpad, int m, int r, int N, float *y,
                                                          int add, const uint8_t *gw, const int QT) {
    const int bs = QT == 1 ? 20 : 34;
    __m128 acc = _mm_setzero_ps(), sacc = _mm_setzero_ps();
    const xblock *x0r = xq + (size_t)m * nb, *x1r = x0r + nb;
    for (int b = 0; b < nb; b++) {
        __m256i p[4];
        float dws[2], mws[2];
        if (QT) gguf_prefetch(gw, bs, nb, r, 2, b);
        for (int i = 0; i < 2; i++) {
            __m256i a0, a1;
            tile_wblock(gw, QT, wq, wd, wm, HASM, nb, r, i, b, &a0, &a1, &dws[i], &mws[i]);
            p[2 * i] = DPWSSD(_mm256_madd_epi16(a0, _mm256_loadu_si256((const __m256i *)x0r[b].q)),
                              a1, _mm256_loadu_si256((const __m256i *)(x0r[b].q + 16)));
            p[2 * i + 1] = DPWSSD(_mm256_madd_epi16(a0, _mm256_loadu_si256((const __m256i *)x1r[b].q)),
                                  a1, _mm256_loadu_si256((const __m256i *)(x1r[b].q + 16)));
        }
        __m256i g = red4(p[0], p[1], p[2], p[3]);  /* lane 2 i + j: pair (i, j), per 128-bit half */
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(g), _mm256_extracti128_si256(g, 1));
        __m128 xd2 = _mm_castpd_ps(_mm_load1_pd((const double *)(xdt + (size_t)b * mpad + m)));  /* xd0 xd1 xd0 xd1 */
        __m128 dw = _mm_setr_ps(dws[0], dws[0], dws[1], dws[1]);
        acc = _mm_fmadd_ps(_mm_cvtepi32_ps(t), _mm_mul_ps(dw, xd2), acc);
        if (HASM) {
            __m128 xs2 = _mm_castpd_ps(_mm_load1_pd((const double *)(xst + (size_t)b * mpad + m)));
            sacc = _mm_fmadd_ps(_mm_setr_ps(mws[0], mws[0], mws[1], mws[1]), xs2, sacc);
        }
    }
    float v[4];
    _mm_storeu_ps(v, HASM ? _mm_add_ps(acc, sacc) : acc);
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) {
            float *o = y + (size_t)(m + j) * N + r + i;
            *o = add ? *o + v[2 * i + j] : v[2 * i + j];
        }
}

/* every activation row against R unpacked weight rows starting at r */
static inline __attribute__((always_inline)) void mtiles(const int16_t *wq, const float *wd, const float *wm,
                                                         const int HASM, const int R, int nb, const xblock *xq,
                                                         const float *xdt, const float *xst, int M, int mpad, int r,
                                                         int N, float *y, int add) {
    int m = 0;
    if (R == 2) {
        for (; m + 4 <= M; m += 4) mtile24(wq, wd, wm, HASM, nb, xq, xdt, xst, mpad, m, 4, r, N, y, add, NULL, 0);
        if (M - m == 3) {  /* a padded full tile is cheaper than 3 scalar rows */
            mtile24(wq, wd, wm, HASM, nb, xq, xdt, xst, mpad, m, 3, r, N, y, add, NULL, 0);
            return;
        }
        if (M - m == 2) {
            mtile22(wq, wd, wm, HASM, nb, xq, xdt, xst, mpad, m, r, N, y, add, NULL, 0);
            return;
        }
    }
    for (; m + 4 <= M; m += 4) mtile(wq, wd, wm, HASM, R, 4, nb, xq, xst, mpad, m, r, N, y, add);
    switch (M - m) {
    case 3: mtile(wq, wd, wm, HASM, R, 3, nb, xq, xst, mpad, m, r, N, y, add); break;
    case 2: mtile(wq, wd, wm, HASM, R, 2, nb, xq, xst, mpad, m, r, N, y, add); break;
    case 1: mtile(wq, wd, wm, HASM, R, 1, nb, xq, xst, mpad, m, r, N, y, add); break;
    default: break;
    }
}

/* The unpack buffer of MR rows: int16 codes [MR][nb][32], scale and min [MR][nb]; on the stack
   up to this many blocks per row (K = 8192), else malloc'd per call of the row function. */
#define UNPACK_STACK_NB 256
typedef struct { int16_t *q; float *d, *m; void *heap; } ubuf;

static inline int ubuf_init(ubuf *u, int nb, int16_t *sq, float *sd, float *sm) {
    u->heap = NULL;
    if (nb <= UNPACK_STACK_NB) { u->q = sq; u->d = sd; u->m = sm; return 0; }
    size_t nq = (size_t)MR * nb * 32 * sizeof(int16_t), nf = (size_t)MR * nb * sizeof(float);
    char *h = (char *)malloc(nq + 2 * nf);
    if (!h) return -1;
    u->heap = h; u->q = (int16_t *)h; u->d = (float *)(h + nq); u->m = (float *)(h + nq + nf);
    return 0;
}

/* Q4_1 block: 20 bytes = fp16 d, fp16 m, 16 bytes of nibbles (byte j: element j low nibble,
   element j+16 high nibble). Q8_0 block: 34 bytes = fp16 d, 32 int8. */
static inline __attribute__((always_inline)) void unpack_gguf(const uint8_t *w, const int QT, int row, int nb,
                                                              int16_t *wq, float *wd, float *wm) {
    const int bs = QT == 1 ? 20 : 34;
    const uint8_t *blk = w + (size_t)row * nb * bs;
    for (int b = 0; b < nb; b++, blk += bs) {
        __m256i w0, w1;
        wd[b] = h2f(blk);
        if (QT == 1) wm[b] = h2f(blk + 2);
        gguf_block16(blk, QT, &w0, &w1);
        _mm256_storeu_si256((__m256i *)(wq + (size_t)b * 32), w0);
        _mm256_storeu_si256((__m256i *)(wq + (size_t)b * 32 + 16), w1);
    }
}

/* 1 weight row x 8 activation rows (M >= 5: a batched decode step of 5+ sequences, a prefill
   chunk, a long verify), straight from the GGUF blocks: the row's block is unpacked once into
   registers, its 8 pairs' int32 block sums are reduced across lanes (red4 twice and one 128-bit
   swap: 8 vectors -> 1, lane j = activation row m + j; integer sums, exact in any order), then one
   convert, one scale (dw * the 8 rows' dx, from
   xdt) and one FMA for all 8 pairs: the same float operations per pair as mtile24 and mtile22,
   so a row's result does not depend on M. valid < 8: the missing rows read as the last valid
   one and their lanes are dropped. Against mtile24 over an unpacked buffer (two 4-row tiles per
   weight row): 0.49 instead of 0.59 of 8 single rows for the built-in model's matrices. */
static inline __attribute__((always_inline)) void htile8(const uint8_t *gw, const int QT, int nb, const xblock *xq,
                                                         const float *xdt, const float *xst, int mpad, int m,
                                                         int valid, int r, int N, float *y, int add) {
    const int bs = QT == 1 ? 20 : 34;
    const uint8_t *wr = gw + (size_t)r * nb * bs;
    const xblock *xr[8];
    for (int j = 0; j < 8; j++) xr[j] = xq + (size_t)(m + (j < valid ? j : valid - 1)) * nb;
    __m256 acc = _mm256_setzero_ps(), sacc = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = wr + (size_t)b * bs;
        gguf_prefetch(gw, bs, nb, r, 1, b);
        __m256i a0, a1;
        gguf_block16(blk, QT, &a0, &a1);
#define PAIR(J) DPWSSD(_mm256_madd_epi16(a0, _mm256_loadu_si256((const __m256i *)xr[J][b].q)), \
                       a1, _mm256_loadu_si256((const __m256i *)(xr[J][b].q + 16)))
        /* lanes 0..3 (4..7) of h03: rows 0..3, low (high) 128-bit halves of their sums */
        __m256i h03 = red4(PAIR(0), PAIR(1), PAIR(2), PAIR(3)), h47 = red4(PAIR(4), PAIR(5), PAIR(6), PAIR(7));
#undef PAIR
        __m256i t = _mm256_add_epi32(_mm256_permute2x128_si256(h03, h47, 0x20),
                                     _mm256_permute2x128_si256(h03, h47, 0x31));
        __m256 sc = _mm256_mul_ps(_mm256_set1_ps(h2f(blk)), _mm256_loadu_ps(xdt + (size_t)b * mpad + m));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), sc, acc);
        if (QT == 1)
            sacc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(blk + 2)), _mm256_loadu_ps(xst + (size_t)b * mpad + m), sacc);
    }
    float v[8];
    _mm256_storeu_ps(v, QT == 1 ? _mm256_add_ps(acc, sacc) : acc);
    for (int j = 0; j < valid; j++) {
        float *o = y + (size_t)(m + j) * N + r;
        *o = add ? *o + v[j] : v[j];
    }
}

/* htile8's sums with the activations transposed (xw, built by xpairs_t): lane l = j P + e of block b's
   vector k holds activation row j's int16 pair k P + e (two int16 as one int32), P = 1 for groups
   of 8 rows, 2 for 3-4 rows (so the lanes stay full). The weight block's pairs are broadcast P at a
   time from a 64-byte copy on the stack (a load, no shuffle) and multiplied into every row's lanes
   at once; after its 16 / P vectors, lane j P + e holds P partial sums of row j, folded into lane
   j P by one add (htile8 spent 14 shuffles and 15 adds a block on its cross-lane reduction,
   mtile24 9 per 4 pairs). Integer sums, exact in any order: the same int32 per pair,
   then the same convert, scale and FMA as the other tiles, lane j P scaled by row j's xd (xdt with
   lanes j P: stride floats a block). */
/* htile8t's pairs a row in its lanes for M > 1 activation rows of a GGUF matrix: 2 for 3-4 rows, 1
   from 5 rows on, 0 where the other tiles run (the AVX2 build; 2 rows, where htile8t was slower).
   xprep builds the transposed activations for it, gguf_mrows picks its path by it. */
static inline int htile8t_pairs(int M) { return !QK_DPWSSD || M <= 2 ? 0 : M <= 4 ? 2 : 1; }

static inline __attribute__((always_inline)) __m256i wpairs(const int32_t *p, const int P) {
    if (P == 1) return _mm256_set1_epi32(*p);
    return _mm256_broadcastq_epi64(_mm_loadl_epi64((const __m128i *)p));
}

static inline __attribute__((always_inline)) void htile8t(const uint8_t *gw, const int QT, const int R, const int P,
                                                          int nb, const int32_t *xw, const float *xdt,
                                                          const float *xst, int stride, int valid, int r, int N,
                                                          float *y, int add) {
    /* R weight rows (1 or 4) at once: each activation vector is loaded once for all R */
    const int bs = QT == 1 ? 20 : 34, KV = 16 / P;
    const uint8_t *wr = gw + (size_t)r * nb * bs;
    const size_t rb = (size_t)nb * bs;
    int32_t wt[4][16] __attribute__((aligned(32)));
    __m256 acc[4], sacc[4];
    for (int i = 0; i < R; i++) { acc[i] = _mm256_setzero_ps(); sacc[i] = _mm256_setzero_ps(); }
    for (int b = 0; b < nb; b++) {
        gguf_prefetch(gw, bs, nb, r, R, b);
        for (int i = 0; i < R; i++) {
            __m256i a0, a1;
            gguf_block16(wr + i * rb + (size_t)b * bs, QT, &a0, &a1);
            _mm256_store_si256((__m256i *)wt[i], a0);
            _mm256_store_si256((__m256i *)(wt[i] + 8), a1);
        }
        /* read wt back from memory (a broadcast load, on the load ports): left alone, gcc keeps a0, a1
           in registers and broadcasts each pair with two shuffles, which then bound the loop */
        __asm__ volatile("" : : "m"(wt) : "memory");
        const __m256i *xv = (const __m256i *)(xw + (size_t)b * 128);
        /* two chains a row: a VPDPWSSD's latency is ~5 cycles */
        __m256i s0[4], s1[4];
        {
            __m256i x0 = _mm256_load_si256(xv), x1 = _mm256_load_si256(xv + 1);
            for (int i = 0; i < R; i++) {
                s0[i] = _mm256_madd_epi16(wpairs(wt[i], P), x0);
                s1[i] = _mm256_madd_epi16(wpairs(wt[i] + P, P), x1);
            }
        }
        for (int k = 2; k < KV; k += 2) {
            __m256i x0 = _mm256_load_si256(xv + k), x1 = _mm256_load_si256(xv + k + 1);
            for (int i = 0; i < R; i++) {
                s0[i] = DPWSSD(s0[i], wpairs(wt[i] + k * P, P), x0);
                s1[i] = DPWSSD(s1[i], wpairs(wt[i] + (k + 1) * P, P), x1);
            }
        }
        __m256 xd = _mm256_loadu_ps(xdt + (size_t)b * stride);
        for (int i = 0; i < R; i++) {
            const uint8_t *blk = wr + i * rb + (size_t)b * bs;
            __m256i t = _mm256_add_epi32(s0[i], s1[i]);
            if (P == 2) t = _mm256_add_epi32(t, _mm256_srli_epi64(t, 32));  /* lane 2 j: its pair of lanes */
            __m256 sc = _mm256_mul_ps(_mm256_set1_ps(h2f(blk)), xd);
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), sc, acc[i]);
            if (QT == 1)
                sacc[i] = _mm256_fmadd_ps(_mm256_set1_ps(h2f(blk + 2)), _mm256_loadu_ps(xst + (size_t)b * stride),
                                          sacc[i]);
        }
    }
    for (int i = 0; i < R; i++) {
        float v[8];
        _mm256_storeu_ps(v, QT == 1 ? _mm256_add_ps(acc[i], sacc[i]) : acc[i]);
        for (int j = 0; j < valid; j++) {
            float *o = y + (size_t)j * N + r + i;
            *o = add ? *o + v[j * P] : v[j * P];
        }
    }
}

/* Where the buffered path's weight rows come from: GGUF blocks (QT 1 = Q4_1, 8 = Q8_0) or, with
   QT 0, the pack's grouped codes (BITS 2 = int2 with mins, 4 = symmetric int4; bpg blocks a group). */
typedef struct { const uint8_t *w; int QT; const uint8_t *q; const uint16_t *sc, *mn; int BITS, bpg; } wrows;

static inline __attribute__((always_inline)) void unpack_gq(const uint8_t *q, const uint16_t *sc,
                                                            const uint16_t *mn, const int BITS, int bpg, int row,
                                                            int nb, int16_t *wq, float *wd, float *wm);

static inline __attribute__((always_inline)) void unpack_row(const wrows *s, int row, int nb, int16_t *wq, float *wd,
                                                             float *wm) {
    if (s->QT) unpack_gguf(s->w, s->QT, row, nb, wq, wd, wm);
    else unpack_gq(s->q, s->sc, s->mn, s->BITS, s->bpg, row, nb, wq, wd, wm);
}

/* Weight rows r..r1 against many activation rows: each pair of weight rows unpacked once into an
   int16 buffer that stays in L1 (on the stack up to UNPACK_STACK_NB blocks a row), multiplied from
   there by mtiles' 4-row tiles. */
static inline __attribute__((always_inline)) void buffered_rows(const wrows *s, const int HASM, int r, int r1, int nb,
                                                                const xblock *xq, const float *xdt, const float *xst,
                                                                int M, int mpad, int N, float *y, int add) {
    int16_t sq[MR * UNPACK_STACK_NB * 32] __attribute__((aligned(32)));
    float sd[MR * UNPACK_STACK_NB], sm[MR * UNPACK_STACK_NB];
    ubuf u;
    if (ubuf_init(&u, nb, sq, sd, sm)) return;
    for (; r + 2 <= r1; r += 2) {
        for (int i = 0; i < 2; i++)
            unpack_row(s, r + i, nb, u.q + (size_t)i * nb * 32, u.d + (size_t)i * nb, u.m + (size_t)i * nb);
        mtiles(u.q, u.d, u.m, HASM, 2, nb, xq, xdt, xst, M, mpad, r, N, y, add);
    }
    for (; r < r1; r++) {
        unpack_row(s, r, nb, u.q, u.d, u.m);
        mtiles(u.q, u.d, u.m, HASM, 1, nb, xq, xdt, xst, M, mpad, r, N, y, add);
    }
    free(u.heap);
}

/* Activation rows m .. m + valid - 1 (valid <= 4) against weight rows r..r1, straight from the GGUF
   blocks: one tile per pair of weight rows, each block unpacked in registers once. */
static inline __attribute__((always_inline)) void gguf_few_rows(const uint8_t *w, const int QT, int r, int r1, int nb,
                                                                const xblock *xq, const float *xdt, const float *xst,
                                                                int m, int valid, int mpad, int N, float *y, int add) {
    for (; r + 2 <= r1; r += 2) {
        if (valid == 2) mtile22(NULL, NULL, NULL, QT == 1, nb, xq, xdt, xst, mpad, m, r, N, y, add, w, QT);
        else mtile24(NULL, NULL, NULL, QT == 1, nb, xq, xdt, xst, mpad, m, valid, r, N, y, add, w, QT);
    }
    if (r < r1)  /* an odd last row: the 8-row tile's arithmetic on valid rows */
        htile8(w, QT, nb, xq, xdt, xst, mpad, m, valid, r, N, y, add);
}

/* M > 1, GGUF blocks. With VPDPWSSD: 2 rows mtile22; 3-4 rows htile8t with 2 pairs a row in the
   lanes (all the built-in model's matrices at 4 rows: 0.79 of mtile24's time); 5 rows and more (a
   batched decode step, a prefill chunk, a long verify) htile8t, four weight rows at a time over
   each group of 8 transposed activation rows (8 / 16 / 64 rows: ~0.65 of the AVX2 build's time; in
   the AVX2 build that tile's 16 madds + 16 adds a block were no faster than htile8's reduction).
   AVX2 build: up to 4 rows gguf_few_rows; 5-8 rows (a batched decode step) one 8-row tile per
   weight row; 9 rows and more each pair of weight rows unpacked once into an int16 buffer that
   stays in L1 and multiplied from there by 4-row tiles (unpacking once per 8-row group cost a
   97-token prefill 16%). Every tile does the same float operations per pair. */
static inline __attribute__((always_inline)) void gguf_mrows(const uint8_t *w, const int QT, int r0, int r1, int nb,
                                                             const xblock *xq, const float *xt, const int32_t *xw,
                                                             const float *xe, int M, int mpad, int N, float *y,
                                                             int add) {
    const float *xdt = xt, *xst = xt + (size_t)nb * mpad;
    int r = r0;
    if (M <= 4 && htile8t_pairs(M) == 0) {
        gguf_few_rows(w, QT, r, r1, nb, xq, xdt, xst, 0, M, mpad, N, y, add);
        return;
    }
#if QK_DPWSSD
    if (htile8t_pairs(M) == 2) {  /* one group, 2 pairs a row in its lanes; xe: row j's scales in lane 2 j */
        for (; r + 4 <= r1; r += 4) htile8t(w, QT, 4, 2, nb, xw, xe, xe + (size_t)nb * 8, 8, M, r, N, y, add);
        for (; r < r1; r++) htile8t(w, QT, 1, 2, nb, xw, xe, xe + (size_t)nb * 8, 8, M, r, N, y, add);
        return;
    }
    /* every 8 activation rows (xw's groups) against the chunk's weight rows, which stay in L1 / L2
       from one group to the next; a last group of 1-4 rows takes the small tiles */
    for (int m = 0; m < M; m += 8) {
        int valid = M - m < 8 ? M - m : 8;
        if (valid <= 4 && m > 0) {
            gguf_few_rows(w, QT, r0, r1, nb, xq, xdt, xst, m, valid, mpad, N, y, add);
            continue;
        }
        const int32_t *xg = xw + (size_t)(m / 8) * nb * 128;
        float *yg = y + (size_t)m * N;
        for (r = r0; r + 4 <= r1; r += 4) htile8t(w, QT, 4, 1, nb, xg, xdt + m, xst + m, mpad, valid, r, N, yg, add);
        for (; r < r1; r++) htile8t(w, QT, 1, 1, nb, xg, xdt + m, xst + m, mpad, valid, r, N, yg, add);
    }
#else
    if (M <= 8) {
        for (; r < r1; r++) htile8(w, QT, nb, xq, xdt, xst, mpad, 0, M, r, N, y, add);
        return;
    }
    const wrows src = {w, QT, NULL, NULL, NULL, 0, 0};
    buffered_rows(&src, QT == 1, r, r1, nb, xq, xdt, xst, M, mpad, N, y, add);
#endif
}

/* The activation blocks' scales and sums transposed for the tiles: [2][nb][mpad], zero padded
   (scales first: xdt = t, xst = t + nb * mpad). */
static float *xmeta_t(const xblock *xq, int M, int nb, int mpad) {
    float *t = (float *)calloc((size_t)2 * nb * mpad, sizeof(float));
    if (!t) return NULL;
    for (int m = 0; m < M; m++)
        for (int b = 0; b < nb; b++) {
            t[(size_t)b * mpad + m] = xq[(size_t)m * nb + b].d;
            t[((size_t)nb + b) * mpad + m] = xq[(size_t)m * nb + b].s;
        }
    return t;
}

/* M == 1 (a decode step): 4 rows at a time with per-row pointers and explicit accumulators, so
   the block loop is ~15 instructions per row (the generic tile() spilled and recomputed
   addresses: 2x slower here). */
#define ROW_Q4_1(P, A, MS) {                                                                      \
        const uint8_t *blk = (P) + (size_t)b * 20;                                                  \
        __m128i t = _mm_loadu_si128((const __m128i *)(blk + 4));                                    \
        __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(t, lowmask));                               \
        __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(t, 4), lowmask));            \
        __m256i pr = DPWSSD(_mm256_madd_epi16(lo, x0), hi, x1);                                     \
        A = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pr), _mm256_mul_ps(_mm256_set1_ps(h2f(blk)), xd), A); \
        MS += h2f(blk + 2) * xs; }
#define ROW_Q8_0(P, A) {                                                                          \
        const uint8_t *blk = (P) + (size_t)b * 34;                                                  \
        __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 2)));             \
        __m256i hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 18)));            \
        __m256i pr = DPWSSD(_mm256_madd_epi16(lo, x0), hi, x1);                                     \
        A = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pr), _mm256_mul_ps(_mm256_set1_ps(h2f(blk)), xd), A); }

static inline __attribute__((always_inline)) void rows_m1(const uint8_t *w, const int QT, int r0, int r1, int nb, const xblock *xq, float *y, int add) {
    const __m128i lowmask = _mm_set1_epi8(0x0F);
    const size_t rb = (size_t)nb * (QT == 1 ? 20 : 34);
    int r = r0;
    for (; r + 4 <= r1; r += 4) {
        const uint8_t *p0 = w + r * rb, *p1 = p0 + rb, *p2 = p1 + rb, *p3 = p2 + rb;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        float m0 = 0, m1 = 0, m2 = 0, m3 = 0;
        for (int b = 0; b < nb; b++) {
            const xblock *x = xq + b;
            /* the next 4 rows, one 64-byte line per row and block step: keeps a few DRAM
               requests in flight ahead of the arithmetic */
            const char *ahead = (const char *)(p0 + 4 * rb) + (size_t)b * (QT == 1 ? 20 : 34) * 4;
            _mm_prefetch(ahead, _MM_HINT_T0);
            _mm_prefetch(ahead + 64, _MM_HINT_T0);
            __m256i x0 = _mm256_loadu_si256((const __m256i *)x->q);
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(x->q + 16));
            __m256 xd = _mm256_set1_ps(x->d);
            if (QT == 1) {
                float xs = x->s;
                ROW_Q4_1(p0, a0, m0) ROW_Q4_1(p1, a1, m1) ROW_Q4_1(p2, a2, m2) ROW_Q4_1(p3, a3, m3)
            } else {
                ROW_Q8_0(p0, a0) ROW_Q8_0(p1, a1) ROW_Q8_0(p2, a2) ROW_Q8_0(p3, a3)
            }
        }
        float v[4] = {hsum8(a0) + m0, hsum8(a1) + m1, hsum8(a2) + m2, hsum8(a3) + m3};
        for (int i = 0; i < 4; i++) y[r + i] = add ? y[r + i] + v[i] : v[i];
    }
    for (; r < r1; r++) {
        const uint8_t *p0 = w + r * rb;
        __m256 a0 = _mm256_setzero_ps();
        float m0 = 0;
        for (int b = 0; b < nb; b++) {
            const xblock *x = xq + b;
            __m256i x0 = _mm256_loadu_si256((const __m256i *)x->q);
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(x->q + 16));
            __m256 xd = _mm256_set1_ps(x->d);
            if (QT == 1) {
                float xs = x->s;
                ROW_Q4_1(p0, a0, m0)
            } else {
                ROW_Q8_0(p0, a0)
            }
        }
        float v = hsum8(a0) + m0;
        y[r] = add ? y[r] + v : v;
    }
}

/* y[M, N] (+)= rmsnorm?(x[M, K]) @ W[N, K]^T for W in GGUF blocks (qtype 1 = Q4_1, 8 = Q8_0).
   normw: NULL or the RMSNorm weight [K] (with eps); add: accumulate into y (a residual add). */
/* A matmul's activations: quantised per block of 32 (xq, on the stack when M x nb <= 128 blocks)
   and, for M > 1, their scales transposed for the several-row tiles (xt, mpad lanes a block). */
typedef struct { xblock *xq; float *xt; int32_t *xw; float *xe; xblock stack[128]; } xprep;

/* The activation blocks' int16 pairs transposed for htile8t, P pairs a row side by side:
   [groups of 8 / P rows][nb][16 / P][8] int32, lane j P + e of vector k of a group's block b = its
   row j's pair k P + e (rows past M zero; their lanes are dropped). With P > 1 (M <= 4, one group)
   also xe: the rows' block scales and sums [2][nb][8] floats, row j in lane j P. */
static int32_t *xpairs_t(const xblock *xq, int M, int nb, const int P, float **xe) {
    const int G = 8 / P;
    size_t n = (size_t)((M + G - 1) / G) * nb * 128, bytes = n * sizeof(int32_t) + (P > 1 ? (size_t)nb * 64 : 0);
    int32_t *t = (int32_t *)aligned_alloc(32, bytes);  /* bytes: a multiple of 32 */
    if (!t) return NULL;
    memset(t, 0, bytes);
    float *e = P > 1 ? (float *)(t + n) : NULL;
    for (int m = 0; m < M; m++)
        for (int b = 0; b < nb; b++) {
            const xblock *xb = xq + (size_t)m * nb + b;
            int32_t *g = t + ((size_t)(m / G) * nb + b) * 128 + (m % G) * P;
            for (int k = 0; k < 16; k++) memcpy(g + (k / P) * 8 + k % P, xb->q + 2 * k, 4);
            if (e) {
                e[(size_t)b * 8 + m * P] = xb->d;
                e[((size_t)nb + b) * 8 + m * P] = xb->s;
            }
        }
    *xe = e;
    return t;
}

/* pairs: htile8t's pairs a row (htile8t_pairs), 0 where no transposed activations are needed */
static int xprep_init(xprep *p, const float *x, int M, int K, const float *normw, float eps, int mpad, int pairs) {
    int nb = K / 32;
    p->xt = NULL;
    p->xw = NULL;
    p->xe = NULL;
    p->xq = (size_t)M * nb <= 128 ? p->stack : (xblock *)malloc(sizeof(xblock) * (size_t)M * nb);
    if (!p->xq) return -2;
    quantize_x(x, M, K, normw, eps, p->xq);
    if ((M > 1 && !(p->xt = xmeta_t(p->xq, M, nb, mpad))) || (pairs && !(p->xw = xpairs_t(p->xq, M, nb, pairs, &p->xe)))) {
        free(p->xt);
        if (p->xq != p->stack) free(p->xq);
        return -2;
    }
    return 0;
}

static void xprep_free(xprep *p) {
    free(p->xw);
    free(p->xt);
    if (p->xq != p->stack) free(p->xq);
}

static int matmul_rows(const wrows *s, const float *x, float *y, int M, int N, int K, int nthreads,
                       const float *normw, float eps, int add, int mpad);

int qmatmul(const uint8_t *w, int qtype, const float *x, float *y, int M, int N, int K, int nthreads,
            const float *normw, float eps, int add) {
    if (K % 32 != 0) return -1;
    const wrows src = {w, qtype == 1 ? 1 : 8, NULL, NULL, NULL, 0, 0};
    return matmul_rows(&src, x, y, M, N, K, nthreads, normw, eps, add, (M + 7) & ~7);  /* htile8: 8 lanes */
}

/* attn_step (below) with the dot products and the weighted sum of V in 8-lane FMAs (head_dim a
   multiple of 8). attn_step sums each q . k in one scalar chain: ~4 cycles per multiply-add, so
   one token's attention over 33 cached tokens cost 22 us per layer for the built-in model, 5 of a
   batched 8-sequence step's 35 ms; here ~3 us. The same RoPE, cache write and softmax; the sums
   are in another order (8 lanes, then hsum8), so logits move by float rounding only. */
static inline float exp_scores(float *scores, int n, float mx) {
    /* the softmax's numerators in place (exp(score - max)); returns 1 / their sum */
    float sum = 0.0f;
    for (int t = 0; t < n; t++) { scores[t] = expf(scores[t] - mx); sum += scores[t]; }
    return 1.0f / sum;
}

static void rope_kv_write(float *r, const float *cos, const float *sin, float *kv, int p, int max_seq, int hq,
                          int hk, int hd) {
    /* RoPE on the q and k heads in place (HF rotate_half), then the k and v heads into the cache at p */
    int half = hd / 2;
    for (int h = 0; h < hq + hk; h++) {
        float *x = r + (size_t)h * hd;
        for (int i = 0; i < half; i++) {
            float a = x[i], b = x[i + half];
            x[i] = a * cos[i] - b * sin[i];
            x[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
    for (int h = 0; h < 2 * hk; h++)
        memcpy(kv + ((size_t)h * max_seq + p) * hd, r + (size_t)(hq + h) * hd, sizeof(float) * hd);
}

void attn_step_v(float *r, const float *cos, const float *sin, float *kv, int p, int max_seq, int hq, int hk,
                 int hd, float scale, float *out, float *scores) {
    rope_kv_write(r, cos, sin, kv, p, max_seq, hq, hk, hd);
    const int g = hq / hk, n = p + 1;
    for (int h = 0; h < hq; h++) {
        const float *q = r + (size_t)h * hd, *K = kv + (size_t)(h / g) * max_seq * hd;
        const float *V = K + (size_t)hk * max_seq * hd;
        float mx = -INFINITY;
        for (int t = 0; t < n; t++) {
            const float *k = K + (size_t)t * hd;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            int i = 0;
            for (; i + 16 <= hd; i += 16) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), _mm256_loadu_ps(k + i + 8), a1);
            }
            if (i < hd) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), a0);
            float dot = hsum8(_mm256_add_ps(a0, a1)) * scale;
            scores[t] = dot;
            if (dot > mx) mx = dot;
        }
        float inv = exp_scores(scores, n, mx);
        float *o = out + (size_t)h * hd;
        /* o's hd / 8 accumulators side by side (independent FMA chains), one pass over V's rows */
        for (int c = 0; c < hd; c += 8) _mm256_storeu_ps(o + c, _mm256_setzero_ps());
        for (int t = 0; t < n; t++) {
            __m256 a = _mm256_set1_ps(scores[t] * inv);
            const float *v = V + (size_t)t * hd;
            for (int c = 0; c < hd; c += 8)
                _mm256_storeu_ps(o + c, _mm256_fmadd_ps(a, _mm256_loadu_ps(v + c), _mm256_loadu_ps(o + c)));
        }
    }
}

/* attn_step_v for B sequences of one batched decode step, one call per layer: sequence b's q|k|v
   row at r + b * rstride, its position pos[b], its RoPE rows cos[b] / sin[b], its layer's K|V
   block kv[b], its output row at out + b * ostride (240 ctypes calls a step for 8 sequences of
   a 30-layer model cost more than the attention in them). */
void attn_rows(int B, float *r, int rstride, const int64_t *cos, const int64_t *sin, const int64_t *kv,
               const int *pos, int max_seq, int hq, int hk, int hd, float scale, float *out, int ostride,
               float *scores) {
    for (int b = 0; b < B; b++)
        attn_step_v(r + (size_t)b * rstride, (const float *)cos[b], (const float *)sin[b], (float *)kv[b], pos[b],
                    max_seq, hq, hk, hd, scale, out + (size_t)b * ostride, scores);
}

/* ---- 2-bit asymmetric groups (the MoE pack's int2 experts, formats/pack.py quantize_int2) ----
   W [N, K]: q [N, K/4] bytes (per block of 32 columns, byte j holds columns j, j+8, j+16, j+24 in
   bits 0-1, 2-3, 4-5, 6-7), fp16 scale and min [N, K/G] (G a multiple of 32): w = q * scale + min.
   The same sum as the Q4_1 path, block by block against the int16-quantised activations:
     y[m, r] = sum_b  s[r,g(b)] * dx[m,b] * sum_i q[r,b,i] * qx[m,b,i]  +  mn[r,g(b)] * dx[m,b] * sum_i qx[m,b,i]
   Unpacking a block: its 8 bytes broadcast to the four 64-bit lanes, lane i shifted right by 2i
   (one variable shift) and masked, which is the block's 32 codes in column order; then widened
   to two int16 vectors (half the instructions of shifting and interleaving 128-bit parts). */
static inline __attribute__((always_inline)) void q2_unpack(const uint8_t *blk, __m256i *w0, __m256i *w1) {
    int64_t v;
    memcpy(&v, blk, 8);
    __m256i c = _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x(v), _mm256_setr_epi64x(0, 2, 4, 6)),
                                 _mm256_set1_epi8(0x03));
    *w0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(c));       /* columns 0..15 */
    *w1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(c, 1));  /* columns 16..31 */
}

/* The pack's symmetric int4 (formats/pack.py quantize): byte j of a row holds column 2j in its low
   nibble and 2j+1 in its high one, w = (nibble - 8) * scale per group: the same sum with
   min = -8 * scale. A block of 32 columns is 16 bytes: low and high nibbles interleaved back
   into column order by unpacklo/hi_epi8. */
static inline __attribute__((always_inline)) void q4s_unpack(const uint8_t *blk, __m256i *w0, __m256i *w1) {
    const __m128i lowmask = _mm_set1_epi8(0x0F);
    __m128i v = _mm_loadu_si128((const __m128i *)blk);
    __m128i lo = _mm_and_si128(v, lowmask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), lowmask);
    *w0 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(lo, hi));  /* columns 0..15 */
    *w1 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(lo, hi));  /* columns 16..31 */
}

/* R weight rows x MM activation rows; BITS (2: int2 with mins, 4: the pack's symmetric int4, mn
   unused), R, MM compile-time constants at every call site. */
static inline __attribute__((always_inline)) void q2_tile(const uint8_t *q, const uint16_t *sc, const uint16_t *mn,
                                                          const int BITS, const int R, const int MM, int bpg, int r,
                                                          int m, int nb, const xblock *xq, int N, float *y) {
    const int ng = nb / bpg;
    const int bb = BITS * 4;  /* bytes per block of 32 columns */
    const size_t rb = (size_t)nb * bb;
    const uint8_t *qr[4];
    const uint16_t *sr[4], *mr[4];
    __m256 acc[4][4];
    float summs[4][4];
    for (int i = 0; i < R; i++) {
        qr[i] = q + (size_t)(r + i) * rb;
        sr[i] = sc + (size_t)(r + i) * ng;
        mr[i] = BITS == 2 ? mn + (size_t)(r + i) * ng : sr[i];
        for (int j = 0; j < MM; j++) { acc[i][j] = _mm256_setzero_ps(); summs[i][j] = 0.0f; }
    }
    for (int g = 0; g < ng; g++) {
        float dw[4], mw[4];
        for (int i = 0; i < R; i++) {
            dw[i] = _cvtsh_ss(sr[i][g]);
            mw[i] = BITS == 2 ? _cvtsh_ss(mr[i][g]) : -8.0f * dw[i];
        }
        for (int b = g * bpg; b < (g + 1) * bpg; b++) {
            __m256i w0[4], w1[4];
            for (int i = 0; i < R; i++) {
                if (BITS == 2) q2_unpack(qr[i] + (size_t)b * bb, &w0[i], &w1[i]);
                else q4s_unpack(qr[i] + (size_t)b * bb, &w0[i], &w1[i]);
            }
            if (MM == 1 && R == 4) _mm_prefetch((const char *)(qr[3] + rb) + (size_t)b * bb * 4, _MM_HINT_T0);
            for (int j = 0; j < MM; j++) {
                const xblock *xb = xq + (size_t)(m + j) * nb + b;
                __m256i x0 = _mm256_loadu_si256((const __m256i *)xb->q);
                __m256i x1 = _mm256_loadu_si256((const __m256i *)(xb->q + 16));
                __m256 xd = _mm256_set1_ps(xb->d);
                for (int i = 0; i < R; i++) {
                    __m256i pr = DPWSSD(_mm256_madd_epi16(w0[i], x0), w1[i], x1);
                    acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pr), _mm256_mul_ps(_mm256_set1_ps(dw[i]), xd),
                                                acc[i][j]);
                    summs[i][j] += mw[i] * xb->s;
                }
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < MM; j++) y[(size_t)(m + j) * N + r + i] = hsum8(acc[i][j]) + summs[i][j];
}

static inline __attribute__((always_inline)) void unpack_gq(const uint8_t *q, const uint16_t *sc,
                                                            const uint16_t *mn, const int BITS, int bpg, int row,
                                                            int nb, int16_t *wq, float *wd, float *wm) {
    const int ng = nb / bpg, bb = BITS * 4;
    const uint8_t *qr = q + (size_t)row * nb * bb;
    const uint16_t *sr = sc + (size_t)row * ng, *mr = BITS == 2 ? mn + (size_t)row * ng : sr;
    for (int g = 0; g < ng; g++) {
        float d = _cvtsh_ss(sr[g]), mv = BITS == 2 ? _cvtsh_ss(mr[g]) : -8.0f * d;
        for (int b = g * bpg; b < (g + 1) * bpg; b++) {
            __m256i w0, w1;
            if (BITS == 2) q2_unpack(qr + (size_t)b * bb, &w0, &w1);
            else q4s_unpack(qr + (size_t)b * bb, &w0, &w1);
            _mm256_storeu_si256((__m256i *)(wq + (size_t)b * 32), w0);
            _mm256_storeu_si256((__m256i *)(wq + (size_t)b * 32 + 16), w1);
            wd[b] = d;
            wm[b] = mv;
        }
    }
}

static inline __attribute__((always_inline)) void gq_rows(const uint8_t *q, const uint16_t *sc, const uint16_t *mn, const int BITS, int bpg, int r0,
                    int r1, int nb, const xblock *xq, const float *xt, int M, int mpad, int N, float *y) {
    const float *xdt = xt, *xst = xt + (size_t)nb * mpad;
    int r = r0;
    if (M == 1) {
        for (; r + 4 <= r1; r += 4) q2_tile(q, sc, mn, BITS, 4, 1, bpg, r, 0, nb, xq, N, y);
        for (; r < r1; r++) q2_tile(q, sc, mn, BITS, 1, 1, bpg, r, 0, nb, xq, N, y);
        return;
    }
    const wrows src = {NULL, 0, q, sc, mn, BITS, bpg};
    buffered_rows(&src, 1, r, r1, nb, xq, xdt, xst, M, mpad, N, y, 0);
}

/* y[M, N] (+)= x[M, K] @ W[N, K]^T for the rows of s: rows in chunks of 16 so threads split the work
   evenly and each chunk streams whole rows; each chunk takes its source's kernel for M rows. */
static int matmul_rows(const wrows *s, const float *x, float *y, int M, int N, int K, int nthreads,
                       const float *normw, float eps, int add, int mpad) {
    int nb = K / 32;
    xprep xp;
    if (xprep_init(&xp, x, M, K, normw, eps, mpad, s->QT ? htile8t_pairs(M) : 0)) return -2;
    const xblock *xq = xp.xq;
    const float *xt = xp.xt;
    int chunks = (N + 15) / 16;
    if ((size_t)M * N * K < (size_t)QK_MIN_PARALLEL) nthreads = 1;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int c = 0; c < chunks; c++) {
        int r0 = c * 16, r1 = r0 + 16 < N ? r0 + 16 : N;
        if (s->QT == 1 && M == 1) rows_m1(s->w, 1, r0, r1, nb, xq, y, add);
        else if (s->QT && M == 1) rows_m1(s->w, 8, r0, r1, nb, xq, y, add);
        else if (s->QT == 1) gguf_mrows(s->w, 1, r0, r1, nb, xq, xt, xp.xw, xp.xe, M, mpad, N, y, add);
        else if (s->QT) gguf_mrows(s->w, 8, r0, r1, nb, xq, xt, xp.xw, xp.xe, M, mpad, N, y, add);
        else if (s->BITS == 2) gq_rows(s->q, s->sc, s->mn, 2, s->bpg, r0, r1, nb, xq, xt, M, mpad, N, y);
        else gq_rows(s->q, s->sc, s->mn, 4, s->bpg, r0, r1, nb, xq, xt, M, mpad, N, y);
    }
    xprep_free(&xp);
    return 0;
}

/* y[M, N] = x[M, K] @ W[N, K]^T for a grouped matrix: bits 2 = int2 (scale and min), 4 = the pack's
   symmetric int4 (mn ignored); group G columns per scale. */
static int gqmatmul(int bits, const uint8_t *q, const uint16_t *sc, const uint16_t *mn, int G, const float *x,
                    float *y, int M, int N, int K, int nthreads) {
    if (K % 32 != 0 || G % 32 != 0 || K % G != 0) return -1;
    const wrows src = {NULL, 0, q, sc, mn, bits == 2 ? 2 : 4, G / 32};
    return matmul_rows(&src, x, y, M, N, K, nthreads, NULL, 0.0f, 0, (M + 3) & ~3);
}

int q2matmul(const uint8_t *q, const uint16_t *sc, const uint16_t *mn, int G, const float *x, float *y,
             int M, int N, int K, int nthreads) {
    return gqmatmul(2, q, sc, mn, G, x, y, M, N, K, nthreads);
}

int q4smatmul(const uint8_t *q, const uint16_t *sc, int G, const float *x, float *y, int M, int N, int K,
              int nthreads) {
    return gqmatmul(4, q, sc, sc, G, x, y, M, N, K, nthreads);
}

/* ---- one token through a streamed expert (gq_expert): int8 activations, u8 x s8 dot products ----
   The decode step's expert matmuls are most of a warm token's time, so they take llama.cpp's
   Q4_0 x Q8_0 recipe instead of q2_tile's int16 one (~13 operations per 32 weights and row):
   - the activation is quantised to int8 per group of G columns (the weights' group: then one
     float convert + FMA per (row, group) is all the float work, the group's blocks summed in
     int32 first; a scale per 32 would double that work for a finer grid only in the blocks that
     hold an outlier), its columns stored in the order the weights' codes come out of their bytes
     (x8_perm), so unpacking is a shift and masks, no interleave;
   - one VPDPBUSD (u8 codes x s8 activations, 4 products summed per int32 lane) per 32 weights;
     int4's offset 8 enters each group's sum exactly as -8 x the sum of its activation codes,
     int2's min as sum_g min x scale x code sum, an FMA per group for 8 rows;
   - 8 weight rows a tile share the activation loads, and their int32 sums are reduced across
     lanes together so the convert and FMA are one op per group for all 8; the tile after next
     is prefetched (the next one only: 25 -> 20 us an int4 expert streamed from L3).
   Measured (C harness, this box): 36.8 -> 12.7 us an int4 expert of the benchmark model in
   cache. Numerics: int8 activations (a step of amax / 127 per group) where the other paths keep
   int16; only this one-token path takes them, and every row of a speculative verify or a batched
   step calls it too, so those equal a step bitwise. */

/* acc + the u8 x s8 products of u and s, 4 summed per int32 lane: VPDPBUSD where the build has it
   (as DPWSSD above), else maddubs + madd(ones) + add. maddubs saturates its int16 pair sums, but
   a pair here is at most 2 x 15 x 128 = 3840 (int4 codes; int2's 3 less), far from 32767: both
   forms are exact, so both builds give equal sums and bitwise equal results. */
#if defined(__AVXVNNI__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32((acc), (u), (s))
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32((acc), (u), (s))
#else
#define DPBUSD(acc, u, s) \
    _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), _mm256_set1_epi16(1)))
#endif

/* The weight codes of 64 columns (two 32-blocks of a group: a "pair") or of a group's last odd
   block, as u8 vectors of 32. int4 pair (32 bytes): low nibbles = the even columns of both
   blocks, high nibbles = the odd ones. int4 block (16 bytes): [even | odd]. int2 pair (16 bytes,
   block A then B, column 8i + k of a block in bits 2i of byte k): both 8-byte halves in both
   128-bit lanes, shifted by (0, 0, 2, 2) and (4, 4, 6, 6). int2 block: column order (q2_unpack). */
static inline __attribute__((always_inline)) void g8_pair(const uint8_t *p, const int BITS, __m256i *w0, __m256i *w1) {
    if (BITS == 4) {
        const __m256i m = _mm256_set1_epi8(0x0F);
        __m256i v = _mm256_loadu_si256((const __m256i *)p);
        *w0 = _mm256_and_si256(v, m);
        *w1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
    } else {
        const __m256i m = _mm256_set1_epi8(0x03);
        __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
        *w0 = _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 2, 2)), m);
        *w1 = _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(4, 4, 6, 6)), m);
    }
}

static inline __attribute__((always_inline)) __m256i g8_block(const uint8_t *p, const int BITS) {
    if (BITS == 4) {
        __m128i v = _mm_loadu_si128((const __m128i *)p);
        __m256i c = _mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1);
        return _mm256_and_si256(c, _mm256_set1_epi8(0x0F));
    }
    int64_t v;
    memcpy(&v, p, 8);
    return _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x(v), _mm256_setr_epi64x(0, 2, 4, 6)),
                            _mm256_set1_epi8(0x03));
}

/* The activation in the weights' order: x [64] (a pair) or [32] (a last odd block, n = 4) as n
   fp32 vectors whose u8 code positions g8_pair / g8_block pair them with. int4: the even columns
   then the odd ones (of each block, the pair's lo vector = [A even | B even]); int2 pair: whole
   8-column chunks reordered (chunk c of the pair's vectors = columns 8 * order[c]); int2 block:
   as it is. */
static inline __attribute__((always_inline)) void x8_perm(const float *x, const int BITS, const int n, __m256 *v) {
    if (BITS == 4) {
        for (int h = 0; h < n / 2; h++) {  /* 16 columns -> 8 even + 8 odd */
            __m256 a = _mm256_loadu_ps(x + 16 * h), b = _mm256_loadu_ps(x + 16 * h + 8);
            v[h] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
            v[n / 2 + h] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
        }
    } else if (n == 8) {
        static const int order[8] = {0, 4, 1, 5, 2, 6, 3, 7};
        for (int c = 0; c < 8; c++) v[c] = _mm256_loadu_ps(x + 8 * order[c]);
    } else {
        for (int c = 0; c < 4; c++) v[c] = _mm256_loadu_ps(x + 8 * c);
    }
}

/* 4 vectors of fp32 x * id -> 32 int8 in order (codes within +-127); the codes' sum added to *s. */
static inline __attribute__((always_inline)) void x8_store(const __m256 *v, __m256 id, int8_t *q, __m256i *s) {
    __m256i c[4];
    for (int i = 0; i < 4; i++) {
        c[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_ROUND_NEAREST | _MM_FROUND_NO_EXC));
        *s = _mm256_add_epi32(*s, c[i]);
    }
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

/* x [K] -> per group g of G columns: q[g G ..] its int8 codes in the weights' order, d[g] = its
   scale (amax / 127), s[g] = the codes' sum (int4's offset term), m[g] = d[g] * s[g] (int2's). */
typedef struct { int8_t *q; float *d; int32_t *s; float *m; } xq8;

static void quantize_x8(const float *x, int K, int G, const int BITS, const xq8 *o) {
    const int bpg = G / 32, ng = K / G;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int g = 0; g < ng; g++) {
        const float *xg = x + (size_t)g * G;
        __m256 mx = _mm256_setzero_ps();
        for (int i = 0; i < G; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(xg + i)));
        __m128 t = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        t = _mm_max_ps(t, _mm_movehl_ps(t, t));
        t = _mm_max_ss(t, _mm_movehdup_ps(t));
        float amax = _mm_cvtss_f32(t);
        __m256 id = _mm256_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
        __m256i s = _mm256_setzero_si256();
        int8_t *q = o->q + (size_t)g * G;
        int k = 0;
        for (; k + 2 <= bpg; k += 2) {
            __m256 v[8];
            x8_perm(xg + 32 * k, BITS, 8, v);
            x8_store(v, id, q + 32 * k, &s);
            x8_store(v + 4, id, q + 32 * k + 32, &s);
        }
        if (k < bpg) {
            __m256 v[4];
            x8_perm(xg + 32 * k, BITS, 4, v);
            x8_store(v, id, q + 32 * k, &s);
        }
        o->d[g] = amax / 127.0f;
        o->s[g] = hsum_epi32(s);
        o->m[g] = o->d[g] * (float)o->s[g];
    }
}

/* rows[i] (lanes: 8 columns) -> cols[j] (lanes: the 8 rows' column j) */
static inline __attribute__((always_inline)) void transpose8(const __m256 *rows, __m256 *cols) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(rows[2 * i], rows[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(rows[2 * i], rows[2 * i + 1]);
    }
    for (int h = 0; h < 2; h++)
        for (int i = 0; i < 2; i++) {
            u[4 * h + 2 * i] = _mm256_shuffle_ps(t[4 * h + i], t[4 * h + 2 + i], 0x44);
            u[4 * h + 2 * i + 1] = _mm256_shuffle_ps(t[4 * h + i], t[4 * h + 2 + i], 0xEE);
        }
    for (int j = 0; j < 4; j++) {
        cols[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
        cols[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
    }
}

/* 8 fp16 at p as fp32, of which the first n are wanted: read past them only where that stays
   inside the array (end), else from a copy (the matrix's last row). */
static inline __attribute__((always_inline)) __m256 h8(const uint16_t *p, int n, const uint16_t *end) {
    if (p + 8 <= end) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    uint16_t t[8] = {0};
    for (int k = 0; k < n; k++) t[k] = p[k];
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)t));
}

#define G8_GCHUNK 64  /* groups whose scales a tile holds converted at a time (2 KiB of stack) */

/* y[r .. r+8) for the 8 weight rows from r. Each (row, group)'s int32 sum is reduced across lanes
   with the other 7 rows' (red4 twice, then the two halves added), so the int -> float convert and
   the FMA with the (row, group) scales are one 8-lane op per group for all 8 rows, not 8. Those
   scales (the weights' fp16 scale x the activation group's) are converted 8 groups at a time and
   transposed to [group][row]; int2's min term, sum_g min[r, g] d[g] s[g], likewise (lane = row). */
static inline __attribute__((always_inline)) void g8_tile(const uint8_t *q, const uint16_t *sc, const uint16_t *mn,
                                                          const int BITS, int bpg, int ng, int N, int r,
                                                          const xq8 *x, float *y) {
    const int bb = BITS * 4, G = 32 * bpg;  /* bytes per 32-block; columns per group */
    const size_t rb = (size_t)ng * bpg * bb;
    const uint8_t *q0 = q + (size_t)r * rb, *pf = q0 + 16 * rb;  /* pf: the tile after next, walked 8x as fast */
    const uint16_t *send = sc + (size_t)N * ng, *mend = BITS == 2 ? mn + (size_t)N * ng : NULL;
    __m256 acc = _mm256_setzero_ps();
    __m256 sdx[G8_GCHUNK];
    for (int c0 = 0; c0 < ng; c0 += G8_GCHUNK) {
        const int c1 = c0 + G8_GCHUNK < ng ? c0 + G8_GCHUNK : ng;
        for (int g0 = c0; g0 < c1; g0 += 8) {
            const int n = c1 - g0 < 8 ? c1 - g0 : 8;
            __m256 v[8], t[8];
            for (int i = 0; i < 8; i++) v[i] = h8(sc + (size_t)(r + i) * ng + g0, n, send);
            transpose8(v, t);
            for (int j = 0; j < n; j++) sdx[g0 - c0 + j] = _mm256_mul_ps(t[j], _mm256_set1_ps(x->d[g0 + j]));
            if (BITS == 2) {
                for (int i = 0; i < 8; i++) v[i] = h8(mn + (size_t)(r + i) * ng + g0, n, mend);
                transpose8(v, t);
                for (int j = 0; j < n; j++) acc = _mm256_fmadd_ps(t[j], _mm256_set1_ps(x->m[g0 + j]), acc);
            }
        }
        for (int g = c0; g < c1; g++) {
            const int8_t *xg = x->q + (size_t)g * G;
            const size_t go = (size_t)g * bpg * bb;
            __m256i ai[8];
            for (int i = 0; i < 8; i++) ai[i] = _mm256_setzero_si256();
            int k = 0;
            for (; k + 2 <= bpg; k += 2) {
                const size_t o = go + (size_t)k * bb;
                __m256i x0 = _mm256_loadu_si256((const __m256i *)(xg + 32 * k));
                __m256i x1 = _mm256_loadu_si256((const __m256i *)(xg + 32 * k + 32));
                for (int i = 0; i < 8; i++) {
                    __m256i w0, w1;
                    g8_pair(q0 + i * rb + o, BITS, &w0, &w1);
                    ai[i] = DPBUSD(DPBUSD(ai[i], w0, x0), w1, x1);
                }
                for (int l = 0; l < 16 * bb; l += 64) _mm_prefetch((const char *)pf + 8 * o + l, _MM_HINT_T0);
            }
            if (k < bpg) {
                const size_t o = go + (size_t)k * bb;
                __m256i x0 = _mm256_loadu_si256((const __m256i *)(xg + 32 * k));
                for (int i = 0; i < 8; i++) ai[i] = DPBUSD(ai[i], g8_block(q0 + i * rb + o, BITS), x0);
                for (int l = 0; l < 8 * bb; l += 64) _mm_prefetch((const char *)pf + 8 * o + l, _MM_HINT_T0);
            }
            __m256i lo = red4(ai[0], ai[1], ai[2], ai[3]), hi = red4(ai[4], ai[5], ai[6], ai[7]);
            __m256i t = _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
            /* int4: sum (c - 8) x = sum c x - 8 sum x, exact in int32 */
            if (BITS == 4) t = _mm256_sub_epi32(t, _mm256_set1_epi32(8 * x->s[g]));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), sdx[g - c0], acc);
        }
    }
    _mm256_storeu_ps(y + r, acc);
}

/* y[N] = the rows of a grouped matrix against the int8 activation; N a multiple of 8 (gq_expert's
   checks: every dimension a multiple of the group, itself of 32). */
static inline __attribute__((always_inline)) void g8_rows(const uint8_t *q, const uint16_t *sc, const uint16_t *mn,
                                                          const int BITS, int G, int N, int K, const xq8 *x, float *y) {
    for (int r = 0; r < N; r += 8) g8_tile(q, sc, mn, BITS, G / 32, K / G, N, r, x, y);
}

/* y[N] = W[N, K] x[K] for a grouped matrix (bits 2 or 4), one token, int8 activations. */
static void g8_matvec(int bits, const uint8_t *q, const uint16_t *sc, const uint16_t *mn, int G, const float *x,
                      int N, int K, const xq8 *xb, float *y) {
    if (bits == 2) {
        quantize_x8(x, K, G, 2, xb);
        g8_rows(q, sc, mn, 2, G, N, K, xb, y);
    } else {
        quantize_x8(x, K, G, 4, xb);
        g8_rows(q, sc, mn, 4, G, N, K, xb, y);
    }
}

/* One streamed expert for one token, in one call: y[H] = w * down(silu(g) * u), [g; u] = gate_up x.
   The decode step ran this as ~12 PyTorch dispatches per expert (views, two matmuls, slicing, silu,
   products), each releasing and re-taking the GIL that 8 reader threads contend for: at the 5%
   budget that overhead, not the kernel, was most of an expert's time. The bundle's parts (int2:
   codes, scale, min per matrix; int4: codes and scale, mn unused) are pointers into its read
   buffer. One thread: an expert is ~0.7 M multiply-adds, far below QK_MIN_PARALLEL. */
#define GQE_STACK 4096  /* H and I up to this take no heap */
int gq_expert(int bits, const uint8_t *gq, const uint16_t *gs, const uint16_t *gm, const uint8_t *dq,
              const uint16_t *ds, const uint16_t *dm, int G, const float *x, int H, int I, float w, float *y) {
    if (G <= 0 || G % 32 != 0 || H % G != 0 || I % G != 0) return -1;
    const int K = H > I ? H : I, ng = K / 32;  /* ng: enough groups for any G */
    float gu_s[2 * GQE_STACK], d_s[GQE_STACK / 32], m_s[GQE_STACK / 32];
    int32_t s_s[GQE_STACK / 32];
    int8_t q_s[GQE_STACK] __attribute__((aligned(32)));
    void *heap = NULL;
    float *gu = gu_s;
    xq8 xb = {q_s, d_s, s_s, m_s};
    if (K > GQE_STACK) {
        heap = malloc(sizeof(float) * 2 * (size_t)I + (size_t)K + (sizeof(float) * 2 + sizeof(int32_t)) * (size_t)ng);
        if (!heap) return -2;
        gu = (float *)heap;
        xb.d = gu + 2 * (size_t)I;
        xb.m = xb.d + ng;
        xb.s = (int32_t *)(xb.m + ng);
        xb.q = (int8_t *)(xb.s + ng);
    }
    g8_matvec(bits, gq, gs, gm, G, x, 2 * I, H, &xb, gu);
    for (int i = 0; i < I; i++) {
        float g = gu[i];
        gu[i] = g / (1.0f + expf(-g)) * gu[I + i];
    }
    g8_matvec(bits, dq, ds, dm, G, gu, H, I, &xb, y);
    if (w != 1.0f)
        for (int j = 0; j < H; j++) y[j] *= w;
    free(heap);
    return 0;
}

/* One decode step of attention for one layer, after the q|k|v matmul:
   r [hq + 2 hk, hd]: q heads, k heads, v heads (fp32, rotated here in place);
   cos/sin [hd]: the RoPE row of position p (HF rotate_half layout: cos[i] == cos[i + hd/2]);
   kv [2 hk, max_seq, hd]: this layer's cache (K heads then V heads); k and v are written at p;
   out [hq, hd]: softmax(q K^T * scale) V over positions 0..p, q head h reading kv head h / (hq / hk). */
void attn_step(float *r, const float *cos, const float *sin, float *kv, int p, int max_seq, int hq, int hk,
               int hd, float scale, float *out, float *scores) {
    rope_kv_write(r, cos, sin, kv, p, max_seq, hq, hk, hd);
    int g = hq / hk, n = p + 1;
    for (int h = 0; h < hq; h++) {
        const float *q = r + (size_t)h * hd;
        const float *K = kv + (size_t)(h / g) * max_seq * hd;
        const float *V = kv + (size_t)(hk + h / g) * max_seq * hd;
        float mx = -INFINITY;
        for (int t = 0; t < n; t++) {
            const float *k = K + (size_t)t * hd;
            float dot = 0.0f;
            for (int i = 0; i < hd; i++) dot += q[i] * k[i];
            dot *= scale;
            scores[t] = dot;
            if (dot > mx) mx = dot;
        }
        float inv = exp_scores(scores, n, mx);
        float *o = out + (size_t)h * hd;
        for (int i = 0; i < hd; i++) o[i] = 0.0f;
        for (int t = 0; t < n; t++) {
            const float *v = V + (size_t)t * hd;
            float a = scores[t] * inv;
            for (int i = 0; i < hd; i++) o[i] += a * v[i];
        }
    }
}
