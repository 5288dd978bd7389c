/* Exact row-wise top-k indices for CPU float32, built on first use by sae_kit/sae/native.py.

   Per row (n rows of d values, 0 < k <= d):
   1. view the row as (d/c, c) and take the c column maxima (c = 4k on long rows, else k); the k-th largest of them
      is a lower bound of the row's k-th largest key, since k columns each hold an element that reaches it;
   2. collect the keys >= that bound (a little over k on Gaussian rows; AVX-512 compress-store where available);
   3. quickselect the k largest among them (on a copy) and keep them in the candidates' ascending index order.
   Keys are the values (plus an optional per-column bias, so the encoder matmul needs no bias pass), or their
   magnitudes for AbsTopK; equal keys go to the lower index; a NaN ranks above every number, +inf included, as in
   torch.topk (a row holding one takes the plain path of row_topk_nan).
   Rows are split across OpenMP threads: torch's CPU wheels load libgomp.so.1 first, so this library shares torch's
   thread pool. Plain threads would compete with the pool's workers, which spin for a while after each matmul,
   and lose the speed-up inside a training step. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "select_native.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* A row holding a NaN (rare, so plain code): the NaNs first, lower index first, up to k of them; the numbers fill
   the places left by key. */
static void row_topk_nan(const float *row, const float *bias, int64_t d, int64_t k, int by_mag, float *kv,
                         int32_t *ix, int64_t *out_idx, float *out_val) {
    int64_t nans = 0, m = 0;
    for (int64_t j = 0; j < d; j++) {
        float v = bias ? row[j] + bias[j] : row[j];
        if (v != v) nans++;
        else { kv[m] = by_mag ? fabsf(v) : v; ix[m] = (int32_t)j; m++; }
    }
    const int64_t rest = k > nans ? k - nans : 0;  /* places for numbers; m >= rest since k <= d */
    float tk = 0.0f;
    int32_t ti = -1;
    if (rest > 0) {
        float *kc = kv + d;
        int32_t *ic = ix + d;
        memcpy(kc, kv, sizeof(float) * m);
        memcpy(ic, ix, sizeof(int32_t) * m);
        select_first(kc, ic, m, rest, 0);
        last_in_rank(kc, ic, rest, 0, &tk, &ti);
    }
    for (int64_t j = 0, t = 0, nan_taken = 0; j < d && t < k; j++) {
        float v = bias ? row[j] + bias[j] : row[j];
        int take = v != v ? nan_taken++ < k
                          : rest > 0 && ((int32_t)j == ti || ranks_before(by_mag ? fabsf(v) : v, (int32_t)j, tk, ti));
        if (take) {
            out_idx[t] = j;
            if (out_val) out_val[t] = v;
            t++;
        }
    }
}

/* One row: the k best keys of row (+ bias) into out_idx (ascending) and, if out_val, their values (+ bias). */
static void row_topk(const float *row, const float *bias, int64_t d, int64_t k, int64_t c, int by_mag,
                     float *colmax, float *kv, int32_t *ix, int64_t *out_idx, float *out_val) {
    int nan = 0;
    for (int64_t j = 0; j < c; j++) colmax[j] = -INFINITY;
    int64_t s = 0;
    /* Column j holds the elements j, j + c, j + 2c, ...; c independent running maxima vectorise well. */
    for (; s + c <= d; s += c) {
        const float *p = row + s;
        const float *b = bias ? bias + s : NULL;
        for (int64_t j = 0; j < c; j++) {
            float v = b ? p[j] + b[j] : p[j];
            float a = by_mag ? fabsf(v) : v;
            colmax[j] = a > colmax[j] ? a : colmax[j];
            nan |= v != v;
        }
    }
    for (int64_t j = s; j < d; j++) {
        float v = bias ? row[j] + bias[j] : row[j];
        float a = by_mag ? fabsf(v) : v;
        colmax[j - s] = a > colmax[j - s] ? a : colmax[j - s];
        nan |= v != v;
    }
    if (nan) {
        row_topk_nan(row, bias, d, k, by_mag, kv, ix, out_idx, out_val);
        return;
    }
    int64_t m = 0, j = 0;
    const float bound = kth_largest(colmax, c, k);
#ifdef __AVX512F__
    const __m512 vbound = _mm512_set1_ps(bound);
    const __m512i step = _mm512_set1_epi32(16);
    __m512i vj = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; j + 16 <= d; j += 16) {
        __m512 v = _mm512_loadu_ps(row + j);
        if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j));
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
        float v = bias ? row[j] + bias[j] : row[j];
        float a = by_mag ? fabsf(v) : v;
        if (a >= bound) { kv[m] = a; ix[m] = (int32_t)j; m++; }
    }
    /* The candidates are in ascending index order. Select on a copy, find the last of the k best in rank, then
       keep, in one pass over the candidates, those ranking at or before it: the k best, ascending, no sort. */
    float *kc = kv + d;
    int32_t *ic = ix + d;
    memcpy(kc, kv, sizeof(float) * m);
    memcpy(ic, ix, sizeof(int32_t) * m);
    select_first(kc, ic, m, k, 0);
    float tk;
    int32_t ti;
    last_in_rank(kc, ic, k, 0, &tk, &ti);
    for (int64_t i = 0, t = 0; t < k; i++) {
        if (ix[i] == ti || ranks_before(kv[i], ix[i], tk, ti)) {
            out_idx[t] = ix[i];
            if (out_val) out_val[t] = bias ? row[ix[i]] + bias[ix[i]] : row[ix[i]];
            t++;
        }
    }
}

/* Columns for the bound: 4k when rows are long enough for it to pay (>= 32 elements per column), else k. The k-th
   largest of the c column maxima is a lower bound of the row's k-th largest key, since k columns each hold a
   distinct element that reaches it; c = k gives their minimum at no cost, c = 4k a bound close to the k-th
   largest for a small selection, so far fewer elements pass it. */
static int64_t bound_columns(int64_t d, int64_t k) {
    return d >= 128 * k ? 4 * k : k;
}

/* Indices (ascending) of the k largest values (or |values|) of each row of s (n, d) + bias (d; NULL: none) into
   out_idx (n, k), and the values (+ bias) there into out_val (n, k; NULL: skipped).
   Returns 0 on success, 1 if memory ran out (the outputs are then incomplete). d < 2^31. */
int topk_rows(const float *s, const float *bias, int64_t n, int64_t d, int64_t k, int by_mag, int64_t *out_idx,
              float *out_val, int nthreads) {
    int failed = 0;
    const int64_t c = bound_columns(d, k);
    #pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1) if (n >= 64) reduction(|:failed)
    {
        float *colmax = malloc(sizeof(float) * c);
        float *kv = malloc(sizeof(float) * 2 * d);  /* candidates, then a copy to select on */
        int32_t *ix = malloc(sizeof(int32_t) * 2 * d);
        int ok = colmax && kv && ix;
        failed |= !ok;
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < n; r++) {
            if (ok) row_topk(s + r * d, bias, d, k, c, by_mag, colmax, kv, ix, out_idx + r * k,
                             out_val ? out_val + r * k : NULL);
        }
        free(colmax); free(kv); free(ix);
    }
    return failed;
}
