/* Exact fp32 top-k of x·W + b from a bf16 product, built with topk_native.c by native.py.

   On CPUs with bf16 matrix units (AMX) the encoder product x̃·W̃ of bf16-rounded operands runs several times faster
   than the fp32 one. Per row and latent j, with r_x = x − x̃ and r_j = W_j − W̃_j (exact in fp32), the value
   c_j = x·W_j + b_j that we compute in fp32 lies within e_j of the estimate p_j + b_j from the bf16 product p_j:

       |c_j − (p_j + b_j)| ≤ ‖x̃‖·‖r_j‖ + ‖r_x‖·‖W_j‖        (x·W_j − x̃·W̃_j = x̃·r_j + r_x·W_j, Cauchy–Schwarz)
                           + 2.1·γ·‖x‖·‖W_j‖                 (fp32 accumulation, there and here; γ = K·2⁻²⁴)
                           + slack for rounding p_j to bf16 and the bias additions (see error_bound).
   The caller passes A = ‖x̃‖ and B = ‖r_x‖ + 2.1γ‖x‖ per row, R = ‖r_j‖ and N = ‖W_j‖ per latent, scaled up by a
   safety factor for the rounding of the norms themselves. Per row:
   1. L0 = the k-th largest of 4k column maxima of lo_j = p_j + b_j − e_j (as in topk_native.c): k columns each
      hold a distinct element reaching L0, so L0 ≤ L, the k-th largest lo_j, and L ≤ the k-th largest c_j;
   2. collect the j with hi_j = p_j + b_j + e_j ≥ L0 (every j with lo_j ≥ L is among them), find L there and keep
      the j with hi_j ≥ L: a latent with hi_j < L has c_j < L and cannot be among the k largest c_j;
   3. compute c_j in fp32 for those (W is latent-major, so each is one contiguous row; the pairs of all rows are
      grouped by latent first, so each row of W is read once per call) and select the k largest, ties to the lower
      index. At least k are kept (all with lo_j ≥ L).
   Ranking by magnitude (AbsTopK) runs the same steps on lo_j = max(|p_j + b_j| − e_j, 0), hi_j = |p_j + b_j| + e_j,
   which bound |c_j| since ||c_j| − |p_j + b_j|| ≤ |c_j − (p_j + b_j)|.
   So the selection is the fp32 one up to the summation order of the dot products. A row holding a NaN or an
   infinity makes the call return 2, and the caller uses the fp32 path instead. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "select_native.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Slack for the rounding of the bf16 output (2⁻⁸ relative for round-to-nearest; 2⁻⁷ would cover truncation too),
   for the fp32 additions of the bias (2⁻²⁰ of |b|, generous), and for products of denormals that the bf16 units
   flush to zero (an absolute 10⁻³⁰). */
#define REL_P 0x1p-7f
#define REL_B 0x1p-20f
#define ABS_SLACK 1e-30f

static inline float error_bound(float A, float B, float R, float N, float p, float b) {
    return A * R + B * N + REL_P * fabsf(p) + REL_B * fabsf(b) + ABS_SLACK;
}

/* The latent rows are picked at random from a matrix larger than the cache: ask for the next ones early. */
#define PREFETCH_AHEAD 2

static inline void prefetch_row(const float *row, int64_t K) {
    for (int64_t i = 0; i < K; i += 16) __builtin_prefetch(row + i, 0, 3);
}

/* ⟨x, w⟩ in fp32, in a fixed order (four interleaved partial sums, then the tail). */
static inline float dot(const float *x, const float *w, int64_t K) {
    int64_t i = 0;
    float total = 0.0f;
#ifdef __AVX512F__
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; i + 64 <= K; i += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(w + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(w + i + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 32), _mm512_loadu_ps(w + i + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 48), _mm512_loadu_ps(w + i + 48), a3);
    }
    total = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#endif
    for (; i < K; i++) total += x[i] * w[i];
    return total;
}

/* Steps 1–2 for one row: the latents that can still reach the top k into ix[0..q), returning q, or -1 if a bound
   is not finite. colmax (c floats), up (d), lo (2d) and hi (d) are scratch. */
static int64_t row_candidates(const uint16_t *p, const float *bias, const float *R, const float *N, float A,
                              float B, int64_t d, int64_t k, int64_t c, int mag, float *colmax, float *up, float *lo,
                              float *hi, int32_t *ix) {
    float finite = 0.0f;  /* stays 0 unless some upper bound is NaN or infinite (max() would drop a NaN) */
    for (int64_t j = 0; j < c; j++) colmax[j] = -INFINITY;
    /* Pass 1: upper bounds into up[], column maxima of the lower bounds. */
    int64_t s = 0;
#ifdef __AVX512F__
    if (c % 16 == 0) {
        const __m512 vA = _mm512_set1_ps(A), vB = _mm512_set1_ps(B), vrel = _mm512_set1_ps(REL_P);
        const __m512 vrel_b = _mm512_set1_ps(REL_B), vslack = _mm512_set1_ps(ABS_SLACK);
        const __m512 zero = _mm512_setzero_ps();
        __m512 vfin = _mm512_setzero_ps();
        for (; s + c <= d; s += c) {
            for (int64_t j = 0; j < c; j += 16) {
                __m256i h = _mm256_loadu_si256((const __m256i *)(p + s + j));
                __m512 pj = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
                __m512 b = _mm512_loadu_ps(bias + s + j);
                __m512 e = _mm512_fmadd_ps(vrel_b, _mm512_abs_ps(b), vslack);
                e = _mm512_fmadd_ps(vrel, _mm512_abs_ps(pj), e);
                e = _mm512_fmadd_ps(vB, _mm512_loadu_ps(N + s + j), e);
                e = _mm512_fmadd_ps(vA, _mm512_loadu_ps(R + s + j), e);
                __m512 key = _mm512_add_ps(pj, b);
                if (mag) key = _mm512_abs_ps(key);
                __m512 l = _mm512_sub_ps(key, e);
                if (mag) l = _mm512_max_ps(l, zero);  /* |c| >= max(|key| - e, 0) */
                __m512 u = _mm512_add_ps(key, e);
                _mm512_storeu_ps(up + s + j, u);
                _mm512_storeu_ps(colmax + j, _mm512_max_ps(l, _mm512_loadu_ps(colmax + j)));
                vfin = _mm512_add_ps(vfin, _mm512_sub_ps(u, u));  /* NaN or inf: u - u is NaN */
            }
        }
        finite += _mm512_reduce_add_ps(vfin);
    }
#endif
    for (; s < d; s += c) {
        const int64_t w = s + c <= d ? c : d - s;
        for (int64_t j = 0; j < w; j++) {
            float pj = bf16_to_float(p[s + j]);
            float e = error_bound(A, B, R[s + j], N[s + j], pj, bias[s + j]);
            float key = mag ? fabsf(pj + bias[s + j]) : pj + bias[s + j];
            float l = mag ? fmaxf(key - e, 0.0f) : key - e;
            up[s + j] = key + e;
            colmax[j] = l > colmax[j] ? l : colmax[j];
            finite += up[s + j] - up[s + j];
        }
    }
    if (finite != 0.0f || colmax[0] != colmax[0]) return -1;
    const float L0 = kth_largest(colmax, c, k);
    /* Pass 2: the latents whose upper bound reaches L0. */
    int64_t m = 0, j = 0;
#ifdef __AVX512F__
    const __m512 vL0 = _mm512_set1_ps(L0);
    const __m512i step = _mm512_set1_epi32(16);
    __m512i vj = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; j + 16 <= d; j += 16) {
        __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(up + j), vL0, _CMP_GE_OQ);
        if (hit) {
            _mm512_mask_compressstoreu_ps(hi + m, hit, _mm512_loadu_ps(up + j));
            _mm512_mask_compressstoreu_epi32(ix + m, hit, vj);
            m += __builtin_popcount(hit);
        }
        vj = _mm512_add_epi32(vj, step);
    }
#endif
    for (; j < d; j++) {
        if (up[j] >= L0) { hi[m] = up[j]; ix[m] = (int32_t)j; m++; }
    }
    for (int64_t t = 0; t < m; t++) {
        const int32_t i = ix[t];
        float pj = bf16_to_float(p[i]);
        float key = mag ? fabsf(pj + bias[i]) : pj + bias[i], l = key - error_bound(A, B, R[i], N[i], pj, bias[i]);
        lo[t] = mag ? fmaxf(l, 0.0f) : l;
    }
    /* L: the k-th largest lower bound (every one >= L0 was collected), selected on a copy in lo's spare half. */
    float *tmp = lo + m;
    memcpy(tmp, lo, sizeof(float) * m);
    const float L = kth_largest(tmp, m, k);
    int64_t q = 0;
    for (int64_t t = 0; t < m; t++) {
        if (hi[t] >= L) ix[q++] = ix[t];
    }
    return q;
}

/* Step 3's end for one row: the k best of the q candidates (ix ascending, fp32 values v) into the outputs, in the
   same ascending order. Selects on copies (vc, icp), finds the last of the k best in rank, and keeps the
   candidates ranking at or before it: no sort. */
static void finish_row(const float *v, const int32_t *ix, int64_t q, int64_t k, int mag, float *vc, int32_t *icp,
                       int64_t *out_idx, float *out_val) {
    memcpy(vc, v, sizeof(float) * q);
    memcpy(icp, ix, sizeof(int32_t) * q);
    select_first(vc, icp, q, k, mag);
    float tk;
    int32_t ti;
    last_in_rank(vc, icp, k, mag, &tk, &ti);
    for (int64_t i = 0, t = 0; t < k; i++) {
        float a = mag ? fabsf(v[i]) : v[i];
        if (ix[i] == ti || ranks_before(a, ix[i], tk, ti)) { out_idx[t] = ix[i]; out_val[t] = v[i]; t++; }
    }
}

/* p (n, d) bf16 products x̃·W̃; bias, R, N (d,); A, B (n,); x (n, K) and W (d, K) fp32, both row-major.
   Writes the k best latents of each row (ascending) into out_idx (n, k) and their fp32 values into out_val; mag
   ranks by magnitude (AbsTopK), the values keeping their sign.
   Returns 0, 1 if memory ran out, 2 if a row was not finite (see the top of the file). */
int topk_rescored(const uint16_t *p, const float *bias, const float *R, const float *N, const float *A,
                  const float *B, const float *x, const float *W, int64_t n, int64_t d, int64_t K, int64_t k,
                  int mag, int64_t *out_idx, float *out_val, int nthreads) {
    const int64_t c = d >= 128 * k ? 4 * k : k;
    /* Candidates parked per row; a row with more (many near-ties) is finished on its own, reading W row by row. */
    const int64_t cap = d < 8 * k + 64 ? d : 8 * k + 64;
    int32_t *cand = malloc(sizeof(int32_t) * n * cap);
    float *val = malloc(sizeof(float) * n * cap);
    int64_t *count = malloc(sizeof(int64_t) * n);
    int64_t *lat_ptr = calloc((size_t)d + 1, sizeof(int64_t));
    int64_t *cursor = malloc(sizeof(int64_t) * d);
    int64_t *slot = malloc(sizeof(int64_t) * n * cap);
    int status = 0;
    if (!(cand && val && count && lat_ptr && cursor && slot)) {
        free(cand); free(val); free(count); free(lat_ptr); free(cursor); free(slot);
        return 1;
    }
    #pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1) if (n >= 64) reduction(|:status)
    {
        float *colmax = malloc(sizeof(float) * c);
        float *up = malloc(sizeof(float) * d);
        float *lo = malloc(sizeof(float) * 2 * d);
        float *hi = malloc(sizeof(float) * d);
        int32_t *ix = malloc(sizeof(int32_t) * d);
        int32_t *icp = malloc(sizeof(int32_t) * d);
        int ok = colmax && up && lo && hi && ix && icp;
        status |= ok ? 0 : 1;  /* this thread's rows stay unset; every thread still meets the barriers below */
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            count[r] = 0;
            if (!ok) continue;
            int64_t q = row_candidates(p + r * d, bias, R, N, A[r], B[r], d, k, c, mag, colmax, up, lo, hi, ix);
            if (q < 0) {
                status |= 2;
            } else if (q > cap) {
                for (int64_t t = 0; t < q; t++) {
                    if (t + PREFETCH_AHEAD < q) prefetch_row(W + (int64_t)ix[t + PREFETCH_AHEAD] * K, K);
                    hi[t] = dot(x + r * K, W + (int64_t)ix[t] * K, K) + bias[ix[t]];
                }
                finish_row(hi, ix, q, k, mag, lo, icp, out_idx + r * k, out_val + r * k);
                count[r] = -1;
            } else {
                memcpy(cand + r * cap, ix, sizeof(int32_t) * q);
                count[r] = q;
            }
        }
        /* Group the parked (row, candidate) pairs by latent (a counting sort), so that each row of W is read once
           and the rows of x, a few MB per call, are the ones revisited: far less memory traffic than gathering
           W's rows per token. */
        #pragma omp single
        {
            for (int64_t r = 0; r < n; r++)
                for (int64_t t = 0; t < count[r]; t++) lat_ptr[cand[r * cap + t] + 1]++;
            for (int64_t l = 0; l < d; l++) { lat_ptr[l + 1] += lat_ptr[l]; cursor[l] = lat_ptr[l]; }
            for (int64_t r = 0; r < n; r++)
                for (int64_t t = 0; t < count[r]; t++) slot[cursor[cand[r * cap + t]]++] = r * cap + t;
        }
        #pragma omp for schedule(dynamic, 64)
        for (int64_t l = 0; l < d; l++) {
            const float *w = W + l * K;
            for (int64_t e = lat_ptr[l]; e < lat_ptr[l + 1]; e++) {
                const int64_t f = slot[e];
                val[f] = dot(x + (f / cap) * K, w, K) + bias[l];
            }
        }
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            if (count[r] <= 0) continue;
            finish_row(val + r * cap, cand + r * cap, count[r], k, mag, lo, icp, out_idx + r * k, out_val + r * k);
        }
        free(colmax); free(up); free(lo); free(hi); free(ix); free(icp);
    }
    free(cand); free(val); free(count); free(lat_ptr); free(cursor); free(slot);
    return status;
}

/* Round each row of src (rows, K) to bf16 (to nearest, ties to even) into dst, and write the row norms of src, of
   the rounded row and of the rounding residual into norm, bf_norm and res_norm. */
void to_bf16_with_norms(const float *src, int64_t rows, int64_t K, uint16_t *dst, float *norm, float *bf_norm,
                        float *res_norm, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1) if (rows >= 64)
    for (int64_t r = 0; r < rows; r++) {
        const float *a = src + r * K;
        uint16_t *h = dst + r * K;
        float sq = 0.0f, sq_bf = 0.0f, sq_res = 0.0f;
        #pragma omp simd reduction(+:sq, sq_bf, sq_res)
        for (int64_t i = 0; i < K; i++) {
            uint32_t u;
            memcpy(&u, a + i, sizeof u);
            uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
            if ((u & 0x7FFFFFFFu) > 0x7F800000u) rounded = 0x7FC00000u;  /* NaN stays NaN */
            float b;
            memcpy(&b, &rounded, sizeof b);
            h[i] = (uint16_t)(rounded >> 16);
            float d = a[i] - b;
            sq += a[i] * a[i];
            sq_bf += b * b;
            sq_res += d * d;
        }
        norm[r] = sqrtf(sq);
        bf_norm[r] = sqrtf(sq_bf);
        res_norm[r] = sqrtf(sq_res);
    }
}
