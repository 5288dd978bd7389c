/* Exact row-wise top-k indices for CPU float32, built on first use by sae_kit/sae/native.py.

   Per row (n rows of d values, 0 < k <= d):
   1. view the row as (d/k, k) and take the k column maxima; the smallest of them is a lower bound of the row's
      k-th largest key, since each column holds a value that reaches it;
   2. collect the keys >= that bound (about 4k on Gaussian rows; AVX-512 compress-store where available);
   3. quickselect the k largest among them and sort their indices ascending.
   Keys are the values, or |values| for AbsTopK; equal keys go to the lower index; a NaN ranks above
   everything, as in torch.topk.
   Rows are split across OpenMP threads: torch's CPU wheels load libgomp.so.1 first, so this library shares torch's
   thread pool. Plain threads would compete with the pool's workers, which spin for a while after each matmul,
   and lose the speed-up inside a training step. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* Whether (key a, index ia) ranks before (b, ib): larger key first, ties to the lower index. */
static inline int before(float a, int32_t ia, float b, int32_t ib) { return a > b || (a == b && ia < ib); }

/* Reorder kv/ix so that kv[0..k) hold the k first in rank (Hoare quickselect; indices are distinct, so the order
   is total and the selection deterministic). */
static void select_k(float *kv, int32_t *ix, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        int64_t mid = (lo + hi) >> 1;
        float pk = kv[mid];
        int32_t pi = ix[mid];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (before(kv[i], ix[i], pk, pi)) i++;
            while (before(pk, pi, kv[j], ix[j])) j--;
            if (i <= j) {
                float tf = kv[i]; kv[i] = kv[j]; kv[j] = tf;
                int32_t ti = ix[i]; ix[i] = ix[j]; ix[j] = ti;
                i++; j--;
            }
        }
        if (want <= j) hi = j; else if (want >= i) lo = i; else break;
    }
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static inline float key_of(float v, int by_mag) {
    if (v != v) return INFINITY;
    return by_mag ? fabsf(v) : v;
}

static void row_topk(const float *row, int64_t d, int64_t k, int by_mag, float *colmax, float *kv, int32_t *ix,
                     int64_t *out) {
    int nan = 0;
    for (int64_t c = 0; c < k; c++) colmax[c] = -INFINITY;
    int64_t s = 0;
    for (; s + k <= d; s += k) {
        const float *p = row + s;
        for (int64_t c = 0; c < k; c++) {
            float a = by_mag ? fabsf(p[c]) : p[c];
            colmax[c] = a > colmax[c] ? a : colmax[c];
            nan |= p[c] != p[c];
        }
    }
    for (int64_t j = s; j < d; j++) {
        float a = by_mag ? fabsf(row[j]) : row[j];
        colmax[j - s] = a > colmax[j - s] ? a : colmax[j - s];
        nan |= row[j] != row[j];
    }
    float bound = colmax[0];
    for (int64_t c = 1; c < k; c++) bound = colmax[c] < bound ? colmax[c] : bound;
    int64_t m = 0, j = 0;
    if (nan) {
        for (; j < d; j++) { kv[m] = key_of(row[j], by_mag); ix[m] = (int32_t)j; m++; }
    } else {
#ifdef __AVX512F__
        const __m512 vbound = _mm512_set1_ps(bound);
        const __m512i step = _mm512_set1_epi32(16);
        __m512i vj = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (; j + 16 <= d; j += 16) {
            __m512 v = _mm512_loadu_ps(row + j);
            if (by_mag) v = _mm512_abs_ps(v);
            __mmask16 hit = _mm512_cmp_ps_mask(v, vbound, _CMP_GE_OQ);
            if (hit) {
                _mm512_mask_compressstoreu_ps(kv + m, hit, v);
                _mm512_mask_compressstoreu_epi32(ix + m, hit, vj);
                m += __builtin_popcount(hit);
            }
            vj = _mm512_add_epi32(vj, step);
        }
#endif
        for (; j < d; j++) {
            float a = by_mag ? fabsf(row[j]) : row[j];
            if (a >= bound) { kv[m] = a; ix[m] = (int32_t)j; m++; }
        }
    }
    select_k(kv, ix, m, k);
    for (int64_t t = 0; t < k; t++) out[t] = ix[t];
    qsort(out, (size_t)k, sizeof(int64_t), cmp_i64);
}

/* Indices (ascending) of the k largest values (or |values|) of each row of s (n, d) into out (n, k).
   Returns 0 on success, 1 if memory ran out (out is then incomplete). d < 2^31. */
int topk_rows(const float *s, int64_t n, int64_t d, int64_t k, int by_mag, int64_t *out, int nthreads) {
    int failed = 0;
    #pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1) if (n >= 64) reduction(|:failed)
    {
        float *colmax = malloc(sizeof(float) * k);
        float *kv = malloc(sizeof(float) * d);
        int32_t *ix = malloc(sizeof(int32_t) * d);
        int ok = colmax && kv && ix;
        failed |= !ok;
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            if (ok) row_topk(s + r * d, d, k, by_mag, colmax, kv, ix, out + r * k);
        }
        free(colmax); free(kv); free(ix);
    }
    return failed;
}
