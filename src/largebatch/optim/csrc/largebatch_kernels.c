/* Fast CPU kernels of largebatch's LAMB and LARS steps.
 *
 * Why: LAMB is memory-bound, but the trust ratio needs the norms of the whole tensor before the
 * tensor can be written. Per tensor we run pass 1 (LAMB: read x, g, m, v; write m, v and u into the
 * caller's reusable scratch buffer; sum ||x||^2 and ||u||^2) and, right after it while the tensor is
 * still in cache, pass 2 (write x). LARS needs no scratch: pass 2 recomputes its direction from m.
 *
 * Small tensors are processed in parallel across threads (largest first, dynamic schedule); larger
 * ones one at a time, split in chunks over all threads (see the drivers). Norms are always summed over fixed
 * CHUNK-element chunks in double and combined in order, so the result does not depend on the
 * thread count (bit-reproducible resumes). Within a chunk float32 tensors accumulate in float32 (the
 * SIMD lanes make that a pairwise-like sum over ~CHUNK/8 terms), chunks are combined in double.
 *
 * The maths is docs/algorithms.md ("LAMB", "LARS", "The trust ratio"); the tests pin this file to a
 * float64 reference and to the Python paths. Built on first use by kernel.py: cc -O3 -march=native -fopenmp -fno-math-errno -ffp-contract=off
 * (no FMA contraction: each product is rounded as in torch's own ops, so all paths agree closely).
 */
#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>
#include <tgmath.h>  /* sqrt(float) -> sqrtf */
#include <stdlib.h>
#include <omp.h>

#define CHUNK 16384

/* The benchmark's profile (bench/csrc/profile_kernels.c) includes this file with these two hooks
 * redefined, to time pass 1 and pass 2 one at a time; here both passes always run. */
#ifndef LB_RUN_PASS1
#define LB_RUN_PASS1 1
#endif
#ifndef LB_RUN_PASS2
#define LB_RUN_PASS2 1
#endif

enum { PHI_IDENTITY = 0, PHI_CLAMP_NORM = 1, PHI_CLAMP_RATIO = 2, PHI_CAP_RATIO = 3 };

/* The hyper-parameter records, each field listed once: kernel.py checks its ctypes mirror against
 * lb_struct_layout() (size, names, offsets) when the library loads. */
#define LAMB_FIELDS(D, I) D(beta1) D(beta2) D(beta3) D(eps) D(clip) D(l2) D(wd_in) D(decay_out) \
    D(phi_min) D(phi_max) I(eps_inside) I(phi) I(has_min) I(has_max)
#define LARS_FIELDS(D, I) D(momentum) D(beta3) D(weight_decay) D(clip) D(lr) D(trust_coefficient) D(eps) \
    D(phi_min) D(phi_max) I(mode_2017) I(nesterov) I(larc_clip) I(phi) I(has_min) I(has_max)
#define AS_DOUBLE(name) double name;
#define AS_INT32(name) int32_t name;
typedef struct { LAMB_FIELDS(AS_DOUBLE, AS_INT32) } LambHyper;
typedef struct { LARS_FIELDS(AS_DOUBLE, AS_INT32) } LarsHyper;

/* sizeof, then each field's offset, into out (at most cap entries); the field names, comma-separated,
 * as the return value. which: 0 = LambHyper, 1 = LarsHyper. */
#define NAME_OF(name) #name ","
const char* lb_struct_layout(int which, int64_t* out, int64_t cap) {
    int64_t k = 1;
    if (cap > 0) out[0] = which == 0 ? (int64_t)sizeof(LambHyper) : (int64_t)sizeof(LarsHyper);
#define LAMB_OFFSET(name) if (k < cap) out[k] = (int64_t)offsetof(LambHyper, name); k++;
#define LARS_OFFSET(name) if (k < cap) out[k] = (int64_t)offsetof(LarsHyper, name); k++;
    if (which == 0) { LAMB_FIELDS(LAMB_OFFSET, LAMB_OFFSET) return LAMB_FIELDS(NAME_OF, NAME_OF); }
    LARS_FIELDS(LARS_OFFSET, LARS_OFFSET)
    return LARS_FIELDS(NAME_OF, NAME_OF);
}

static double clamp_opt(double v, int has_min, double lo, int has_max, double hi) {
    if (has_min && v < lo) v = lo;
    if (has_max && v > hi) v = hi;
    return v;
}

/* phi(||x||)/||u|| with the zero-norm rule; mirrors trust_ratio.py */
static double phi_ratio(double xn, double un, int phi, int has_min, double lo, int has_max, double hi) {
    if (!(xn > 0.0) || !(un > 0.0)) return 1.0;
    double r;
    if (phi == PHI_CLAMP_NORM) return clamp_opt(xn, has_min, lo, has_max, hi) / un;
    r = xn / un;
    if (phi == PHI_CLAMP_RATIO) r = clamp_opt(r, has_min, lo, has_max, hi);
    else if (phi == PHI_CAP_RATIO && r > 1.0) r = 1.0;
    return r;
}

/* LARS trust ratio: paper mode phi(||x||)/||m||; 2017 mode the local LR (norms are ||x||, ||g||) */
static double lars_ratio(double xn, double un, const LarsHyper* h) {
    if (!h->mode_2017) return phi_ratio(xn, un, h->phi, h->has_min, h->phi_min, h->has_max, h->phi_max);
    if (!(xn > 0.0) || !(un > 0.0)) return 1.0;
    double local = h->trust_coefficient * xn / (un + h->weight_decay * xn + h->eps);
    if (h->larc_clip) { local = local / h->lr; if (local > 1.0) local = 1.0; }
    return local;
}

static int cmp_desc(const void* a, const void* b, void* sizes) {
    int64_t sa = ((const int64_t*)sizes)[*(const int64_t*)a];
    int64_t sb = ((const int64_t*)sizes)[*(const int64_t*)b];
    return (sa < sb) - (sa > sb);
}

/* The per-tensor schedule shared by LAMB and LARS, in one parallel region: pass 1 over fixed chunks
 * (partial sums of ||x||^2 and ||u||^2), the norms summed in chunk order and the ratio by one thread,
 * then pass 2 backwards (the chunks pass 1 touched last are the ones still in cache).
 * Each thread owns one contiguous run of chunks [c0, c1) for BOTH passes and runs pass 2 backwards
 * over its own run, so it starts on the data its own pass 1 left in its own caches (an `omp for`
 * over the reversed range would hand each thread the OTHER thread's chunks, whose dirty lines sit in
 * the other core's caches; benchmarks/optimizer_step/README.md has the measurement).
 * PASS1 / PASS2 are statements over [lo, hi) of chunk k; RATIO an expression of out[0], out[1].
 * (With the profile's hooks, pass 2 alone reads the ratio the caller left in out[2].) */
#define TWO_PASS_TENSOR(PASS1, RATIO, PASS2)                                                       \
    int64_t nch = (n + CHUNK - 1) / CHUNK;                                                         \
    double* part = LB_RUN_PASS1 ? (double*)malloc(sizeof(double) * 2 * (nch > 0 ? nch : 1)) : NULL; \
    _Pragma("omp parallel num_threads(nt) if(nt > 1 && nch > 1)")                                  \
    {                                                                                              \
        int64_t nth = omp_get_num_threads(), t = omp_get_thread_num();                             \
        int64_t c0 = nch * t / nth, c1 = nch * (t + 1) / nth;                                      \
        if (LB_RUN_PASS1) {                                                                        \
            for (int64_t k = c0; k < c1; k++) {                                                    \
                int64_t lo = k * CHUNK, hi = lo + CHUNK < n ? lo + CHUNK : n;                      \
                PASS1;                                                                             \
            }                                                                                      \
            _Pragma("omp barrier")                                                                 \
            _Pragma("omp single")                                                                  \
            {                                                                                      \
                double sx = 0.0, su = 0.0;                                                         \
                for (int64_t k = 0; k < nch; k++) { sx += part[2 * k]; su += part[2 * k + 1]; }    \
                out[0] = sqrt(sx); out[1] = sqrt(su); out[2] = (RATIO);                            \
            }                                                                                      \
        }                                                                                          \
        if (LB_RUN_PASS2) {                                                                        \
            for (int64_t k = c1 - 1; k >= c0; k--) {                                               \
                int64_t lo = k * CHUNK, hi = lo + CHUNK < n ? lo + CHUNK : n;                      \
                PASS2;                                                                             \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    free(part);

/* ------------------------------------------------------------------------------------------ LAMB */
/* Pass 1 stores u in the caller's scratch buffer: pass 2 is then x <- x*dk + s*u, with no second
 * sqrt/div (those made the step compute-bound on 2 cores). */
#define LAMB_U(T, ACC, EPS_INSIDE)                                                                     \
            T xi = x[i];                                                                           \
            T gi = g[i] * clip + l2 * xi;                                                          \
            T mi = b1 * m[i] + b3 * gi;                                                            \
            T vi = b2 * v[i] + ob2 * gi * gi;                                                      \
            m[i] = mi; v[i] = vi;                                                                  \
            T mh = am * mi + bm * gi, vh = av * vi + bv * gi * gi;                                 \
            T den = EPS_INSIDE ? (T)sqrt(vh + eps) : (T)sqrt(vh) + eps;                            \
            T u = mh / den + wd_in * xi;                                                           \
            scratch[i] = u;                                                                        \
            sx += (ACC)xi * (ACC)xi;                                                               \
            su += (ACC)u * (ACC)u;

#define DEFINE_LAMB(T, SUF, ACC)                                                                        \
static void lamb_pass1_##SUF(const T* restrict x, const T* restrict g, T* restrict m,             \
                             T* restrict v, T* restrict scratch, int64_t lo, int64_t hi,           \
                             const double* coef, const LambHyper* h, double* sums) {               \
    const T b1 = (T)h->beta1, b2 = (T)h->beta2, b3 = (T)h->beta3, ob2 = (T)(1.0 - h->beta2);       \
    const T eps = (T)h->eps, clip = (T)h->clip, l2 = (T)h->l2, wd_in = (T)h->wd_in;                \
    const T am = (T)coef[0], bm = (T)coef[1], av = (T)coef[2], bv = (T)coef[3];                    \
    ACC sx = 0, su = 0;                                                                            \
    if (h->eps_inside) {                                                                           \
        _Pragma("omp simd reduction(+:sx,su)")                                                     \
        for (int64_t i = lo; i < hi; i++) { LAMB_U(T, ACC, 1) }                                         \
    } else {                                                                                       \
        _Pragma("omp simd reduction(+:sx,su)")                                                     \
        for (int64_t i = lo; i < hi; i++) { LAMB_U(T, ACC, 0) }                                         \
    }                                                                                              \
    sums[0] = sx; sums[1] = su;                                                                    \
}                                                                                                  \
                                                                                                   \
static void lamb_pass2_##SUF(T* restrict x, const T* restrict scratch, int64_t lo, int64_t hi,    \
                             double decay_out, double scale) {                                     \
    const T s = (T)(-scale), dk = (T)decay_out;                                                    \
    _Pragma("omp simd")                                                                            \
    for (int64_t i = lo; i < hi; i++) x[i] = x[i] * dk + scratch[i] * s;                           \
}                                                                                                  \
                                                                                                   \
static void lamb_tensor_##SUF(T* x, const T* g, T* m, T* v, T* scratch, int64_t n,                 \
                              const double* coef, int trust, const LambHyper* h, double* out,       \
                              int nt) {                                                             \
    TWO_PASS_TENSOR(lamb_pass1_##SUF(x, g, m, v, scratch, lo, hi, coef, h, part + 2 * k),          \
                    trust ? phi_ratio(out[0], out[1], h->phi, h->has_min, h->phi_min, h->has_max,  \
                                      h->phi_max) : 1.0,                                           \
                    lamb_pass2_##SUF(x, scratch, lo, hi, h->decay_out, coef[4] * out[2]))          \
}

DEFINE_LAMB(float, f32, float)
DEFINE_LAMB(double, f64, double)

/* ------------------------------------------------------------------------------------------ LARS */
#define LARS_LOOP(PRAGMA, BODY)                                                                    \
    _Pragma(PRAGMA)                                                                                \
    for (int64_t i = lo; i < hi; i++) { BODY }

#define DEFINE_LARS(T, SUF, ACC)                                                                   \
static void lars_range_##SUF(T* restrict x, const T* restrict g, T* restrict m, int64_t lo,        \
                             int64_t hi, const LarsHyper* h, int pass, double ratio, double* sums) {\
    const T mom = (T)h->momentum, b3 = (T)h->beta3, wd = (T)h->weight_decay, clip = (T)h->clip;    \
    const T r = (T)ratio, neg_lr = (T)(-h->lr), s = (T)(-h->lr * ratio);                            \
    ACC sx = 0, su = 0;                                                                            \
    /* one loop per case: no branch inside a loop (they stopped the vectoriser) */                 \
    if (pass == 1 && h->mode_2017) {                                                               \
        LARS_LOOP("omp simd reduction(+:sx,su)",                                                   \
            T xi = x[i]; T gi = g[i] * clip; sx += (ACC)xi * (ACC)xi; su += (ACC)gi * (ACC)gi;)    \
    } else if (pass == 1 && h->nesterov) {                                                         \
        LARS_LOOP("omp simd reduction(+:sx,su)",                                                   \
            T xi = x[i]; T d = g[i] * clip + wd * xi; T mi = mom * m[i] + b3 * d; m[i] = mi;       \
            T u = mom * mi + b3 * d; sx += (ACC)xi * (ACC)xi; su += (ACC)u * (ACC)u;)              \
    } else if (pass == 1) {                                                                        \
        LARS_LOOP("omp simd reduction(+:sx,su)",                                                   \
            T xi = x[i]; T mi = mom * m[i] + b3 * (g[i] * clip + wd * xi); m[i] = mi;              \
            sx += (ACC)xi * (ACC)xi; su += (ACC)mi * (ACC)mi;)                                     \
    } else if (h->mode_2017 && h->nesterov) {                                                      \
        LARS_LOOP("omp simd",                                                                      \
            T xi = x[i]; T d = (g[i] * clip + wd * xi) * r; T mi = mom * m[i] + d; m[i] = mi;      \
            x[i] = xi + neg_lr * (d + mom * mi);)                                                  \
    } else if (h->mode_2017) {                                                                     \
        LARS_LOOP("omp simd",                                                                      \
            T xi = x[i]; T mi = mom * m[i] + (g[i] * clip + wd * xi) * r; m[i] = mi;               \
            x[i] = xi + neg_lr * mi;)                                                              \
    } else if (h->nesterov) {                                                                      \
        LARS_LOOP("omp simd",                                                                      \
            T xi = x[i]; x[i] = xi + (mom * m[i] + b3 * (g[i] * clip + wd * xi)) * s;)             \
    } else {                                                                                       \
        LARS_LOOP("omp simd", x[i] = x[i] + m[i] * s;)                                             \
    }                                                                                              \
    if (pass == 1) { sums[0] = (double)sx; sums[1] = (double)su; }                                 \
}                                                                                                  \
                                                                                                   \
static void lars_tensor_##SUF(T* x, const T* g, T* m, int64_t n, int trust, const LarsHyper* h,   \
                              double* out, int nt) {                                    \
    TWO_PASS_TENSOR(lars_range_##SUF(x, g, m, lo, hi, h, 1, 0.0, part + 2 * k),                    \
                    trust ? lars_ratio(out[0], out[1], h) : 1.0,                                   \
                    lars_range_##SUF(x, g, m, lo, hi, h, 2, out[2], NULL))                         \
}

DEFINE_LARS(float, f32, float)
DEFINE_LARS(double, f64, double)

/* ------------------------------------------------------------------------------- group drivers */
/* Tensors of at least `par_threshold` elements are processed one at a time, split in chunks over all
 * threads (their scratch is scratch[0:n]); smaller ones run concurrently, one per thread, largest
 * first (thread t's scratch is scratch[t*slot : (t+1)*slot], slot = the largest small tensor). So the
 * scratch buffer needs max(largest large tensor, nthreads * slot) elements (_kernel.scratch_elements). */
#define DRIVER(NAME, T, CALL)                                                                      \
int NAME(int64_t n, void** xs, void** gs, void** ms, void** vs, const int64_t* numel,              \
         const double* coefs, const uint8_t* trust, const void* hyper, double* out,                \
         int nthreads, void* scratch_v, int64_t par_threshold) {                                    \
    (void)vs; (void)coefs; (void)scratch_v;                                                        \
    int64_t* order = (int64_t*)malloc(sizeof(int64_t) * (n > 0 ? n : 1));                          \
    if (!order) return -1;                                                                         \
    for (int64_t i = 0; i < n; i++) order[i] = i;                                                  \
    qsort_r(order, n, sizeof(int64_t), cmp_desc, (void*)numel);                                    \
    int64_t n_big = 0;                                                                             \
    while (n_big < n && numel[order[n_big]] >= par_threshold) n_big++;                             \
    int64_t slot = n_big < n ? numel[order[n_big]] : 0;  /* largest small tensor */               \
    for (int64_t k = 0; k < n_big; k++) {                                                          \
        int64_t i = order[k]; int nt = nthreads; T* scratch = (T*)scratch_v; CALL;                 \
    }                                                                                              \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nthreads)")                         \
    for (int64_t k = n_big; k < n; k++) {                                                          \
        int64_t i = order[k]; int nt = 1;                                                          \
        T* scratch = scratch_v ? (T*)scratch_v + (int64_t)omp_get_thread_num() * slot : NULL;       \
        CALL;                                                                                      \
    }                                                                                              \
    free(order);                                                                                   \
    return 0;                                                                                      \
}

DRIVER(lb_lamb_f32, float, lamb_tensor_f32((float*)xs[i], (const float*)gs[i], (float*)ms[i], (float*)vs[i], scratch, numel[i], coefs + 5 * i, trust[i], (const LambHyper*)hyper, out + 3 * i, nt))
DRIVER(lb_lamb_f64, double, lamb_tensor_f64((double*)xs[i], (const double*)gs[i], (double*)ms[i], (double*)vs[i], scratch, numel[i], coefs + 5 * i, trust[i], (const LambHyper*)hyper, out + 3 * i, nt))
DRIVER(lb_lars_f32, float, (void)scratch; lars_tensor_f32((float*)xs[i], (const float*)gs[i], (float*)ms[i], numel[i], trust[i], (const LarsHyper*)hyper, out + 3 * i, nt))
DRIVER(lb_lars_f64, double, (void)scratch; lars_tensor_f64((double*)xs[i], (const double*)gs[i], (double*)ms[i], numel[i], trust[i], (const LarsHyper*)hyper, out + 3 * i, nt))

/* ----------------------------------------------------------------------------- finiteness check */
/* Index of the first tensor holding a NaN or +-inf, or -1: the optimizers' nonfinite policy, decided
 * before anything is written. g - g is 0 for every finite g and NaN otherwise, so one sum per chunk
 * tells (no branch in the loop, it vectorises). All chunks of all tensors are one work list in ONE
 * parallel region (a region per tensor costs a wake-up of every thread per tensor). */
#define DEFINE_NONFINITE(T, SUF)                                                                   \
static int chunk_nonfinite_##SUF(const T* restrict g, int64_t lo, int64_t hi) {                   \
    T acc = 0;                                                                                     \
    _Pragma("omp simd reduction(+:acc)")                                                           \
    for (int64_t i = lo; i < hi; i++) acc += g[i] - g[i];                                          \
    return acc != acc;                                                                             \
}                                                                                                  \
                                                                                                   \
int64_t lb_first_nonfinite_##SUF(int64_t n, void** gs, const int64_t* numel, int nthreads) {      \
    int64_t* start = (int64_t*)malloc(sizeof(int64_t) * (n + 1));  /* first chunk of each tensor */ \
    if (!start) return -2;                                                                         \
    int64_t total = 0, first = n;                                                                  \
    for (int64_t i = 0; i < n; i++) { start[i] = total; total += (numel[i] + CHUNK - 1) / CHUNK; } \
    start[n] = total;                                                                              \
    _Pragma("omp parallel for schedule(dynamic, 4) reduction(min:first) num_threads(nthreads) if(total > 4)") \
    for (int64_t k = 0; k < total; k++) {                                                          \
        int64_t a = 0, b = n - 1;  /* the last tensor whose first chunk is <= k (skips empty ones) */ \
        while (a < b) { int64_t mid = (a + b + 1) / 2; if (start[mid] <= k) a = mid; else b = mid - 1; } \
        int64_t lo = (k - start[a]) * CHUNK, hi = lo + CHUNK < numel[a] ? lo + CHUNK : numel[a];   \
        if (a < first && chunk_nonfinite_##SUF((const T*)gs[a], lo, hi)) first = a;               \
    }                                                                                              \
    free(start);                                                                                   \
    return first < n ? first : -1;                                                                 \
}

DEFINE_NONFINITE(float, f32)
DEFINE_NONFINITE(double, f64)
