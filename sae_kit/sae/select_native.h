/* Selection helpers shared by topk_native.c and rescore_native.c (static: each file gets its own copy). */
#ifndef SAE_KIT_SELECT_NATIVE_H
#define SAE_KIT_SELECT_NATIVE_H

#include <math.h>
#include <stdint.h>

/* Whether (key a, index ia) ranks before (b, ib): larger key first, ties to the lower index. */
static inline int ranks_before(float a, int32_t ia, float b, int32_t ib) { return a > b || (a == b && ia < ib); }

/* Reorder (v, ix) so that [0..k) hold the k first in rank, by value or (mag) by magnitude (Hoare quickselect;
   indices are distinct, so the order is total and the selection deterministic). */
static void select_first(float *v, int32_t *ix, int64_t n, int64_t k, int mag) {
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        int64_t mid = (lo + hi) >> 1;
        float pv = mag ? fabsf(v[mid]) : v[mid];
        int32_t pi = ix[mid];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (ranks_before(mag ? fabsf(v[i]) : v[i], ix[i], pv, pi)) i++;
            while (ranks_before(pv, pi, mag ? fabsf(v[j]) : v[j], ix[j])) j--;
            if (i <= j) {
                float t = v[i]; v[i] = v[j]; v[j] = t;
                int32_t u = ix[i]; ix[i] = ix[j]; ix[j] = u;
                i++; j--;
            }
        }
        if (want <= j) hi = j; else if (want >= i) lo = i; else break;
    }
}

/* The last in rank of the k first that select_first left in (v, ix)[0..k), as its key and index. */
static void last_in_rank(const float *v, const int32_t *ix, int64_t k, int mag, float *key, int32_t *index) {
    *key = mag ? fabsf(v[0]) : v[0];
    *index = ix[0];
    for (int64_t t = 1; t < k; t++) {
        float a = mag ? fabsf(v[t]) : v[t];
        if (ranks_before(*key, *index, a, ix[t])) { *key = a; *index = ix[t]; }
    }
}

/* The k-th largest of v[0..n) (reorders v); the minimum when k == n. */
static float kth_largest(float *v, int64_t n, int64_t k) {
    if (n == k) {
        float m = v[0];
        for (int64_t i = 1; i < n; i++) m = v[i] < m ? v[i] : m;
        return m;
    }
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        float pv = v[(lo + hi) >> 1];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] > pv) i++;
            while (pv > v[j]) j--;
            if (i <= j) { float t = v[i]; v[i] = v[j]; v[j] = t; i++; j--; }
        }
        if (want <= j) hi = j; else if (want >= i) lo = i; else break;
    }
    return v[want];
}

#endif
