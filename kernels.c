/*
 * kernels.c: the fast layer's compiled part, for x86 CPUs with AVX2, FMA and F16C. The kernels of a decode step
 * where torch's own are slow on such CPUs (docs/benchmarks.md has the measurements):
 *   int4_matmul16   int4 weights times 16-bit integer activations: the default int4 decode
 *   int8_matmul16   int8 weights times 16-bit integer activations: the default int8 decode (an int4 model's lm_head)
 *   int4_matmul     int4 weights times int8 activations (W4A8), for --int8-activations
 *   int8_matmul     int8 weights times int8 activations (W8A8), the same for int8 layers
 *   attend_one_row  one query row's attention over a 16-bit KV cache, without a float32 copy of the cache
 * kernels.py compiles this file on first use where a C compiler exists, checks each kernel against the readable
 * path, and calls them through ctypes; without a compiler, nothing changes. The work of each call is shared out
 * between threads by OpenMP: loaded into a process that already holds torch, the library binds to torch's own
 * OpenMP runtime, so torch.set_num_threads applies and torch's threads, not a second pool, do the work.
 *
 * Why integers: torch's int4 kernel converts every code to a float and multiplies it by a bfloat16 activation,
 * and on an AVX2 CPU that arithmetic, not the memory, sets its speed. Here the activations are rounded to
 * integers per block of 32 columns (x ~ step_b * xq, step_b = max |x| / 127 or / 32767 over the block) and the
 * codes multiply them as integers: vpmaddubsw does 32 multiplications (int8) in one instruction, vpmaddwd 16
 * (int16), where a float32 FMA does 8, and no code is converted to a float. With 16-bit activations the rounding
 * moves a product by ~1e-5 of its size, less than the bfloat16 activations of torch's kernel (~3e-3); with 8-bit
 * ones (llama.cpp's Q8_0 rule) by ~0.5%.
 *
 * The int4 kernels read nanoImp's int4 format as quant.py stores it, nothing converted:
 *   qweight [N, Kp/2] bytes: the code of column 2j in the low 4 bits of byte j, column 2j+1 in the high 4 bits
 *   scales, zeros [N, Kp/G] float16: weight = (code - 8) * scale + zero   (no zeros: symmetric, zero = 0)
 * Per block b of a group with (scale, zero), the dot product is then
 *   sum_{k in b} w_k x_k = scale * step_b * (sum_k code_k xq_k)  +  (zero - 8 scale) * step_b * (sum_k xq_k)
 * The first sum is integer arithmetic on unsigned codes (0..15); the second is the block's own, computed once per
 * row of activations (and summed per group). Each weight row is read from memory once per call (per pass, for
 * many rows), and prefetched ahead of its use.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline float horizontal_sum(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
}

/* ---- The activations, rounded to int8 once per call, for all weight rows ---------------------------------- */

/* x [M, K] float32 -> per block of 32 columns (columns past K, the padding of the int4 groups, are zeros): codes
   q = round(x / step), step = max |x| / 127 of the block (half to even, as torch.round does), with `split` each
   block's 16 even columns then its 16 odd ones; and each group's (2^group_shift blocks) sum of step * q. */
typedef struct {
    int8_t *codes;    /* [M][Kp] */
    float *steps;     /* [M][Kp/32] */
    float *sums;      /* [M][groups] */
} Activations;

static void free_activations(Activations *a) { free(a->codes), free(a->steps), free(a->sums); }

static inline float horizontal_max(__m256 v) {
    __m128 r = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_max_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_max_ss(r, _mm_movehdup_ps(r)));
}

/* Block b (32 columns; zeros past K) of one row of x rounded to integers: q = round(x / step), half to even
   as torch.round does, step = max |x| / limit (127 for int8, 32767 for int16; an all-zero block: any step, 1).
   Returns the step. */
static inline float round_block(const float *row, int in_features, int b, float limit, int32_t q[32]) {
    float padded[32];
    const float *block = row + 32 * b;
    if (32 * b + 32 > in_features) {  /* the last block, past K */
        for (int j = 0; j < 32; j++)
            padded[j] = 32 * b + j < in_features ? block[j] : 0.0f;
        block = padded;
    }
    __m256 v[4], largest = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(block + 8 * i);
        largest = _mm256_max_ps(largest, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v[i]));
    }
    float top = horizontal_max(largest), step = top > 0.0f ? top / limit : 1.0f;
    for (int i = 0; i < 4; i++)
        _mm256_storeu_si256((__m256i *)(q + 8 * i),
                            _mm256_cvtps_epi32(_mm256_round_ps(_mm256_div_ps(v[i], _mm256_set1_ps(step)),
                                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    return step;
}

static int round_activations(Activations *a, const float *x, int rows, int in_features, int blocks, int split,
                             int group_shift) {
    a->codes = malloc((size_t)rows * blocks * 32), a->steps = malloc(sizeof(float) * rows * blocks);
    a->sums = calloc((size_t)rows * (blocks >> group_shift), sizeof(float));
    if (!a->codes || !a->steps || !a->sums) {
        free_activations(a);
        return -1;
    }
    for (int m = 0; m < rows; m++)
        for (int b = 0; b < blocks; b++) {
            int32_t q[32];
            float step = round_block(x + (int64_t)m * in_features, in_features, b, 127.0f, q);
            int8_t *codes = a->codes + ((int64_t)m * blocks + b) * 32;
            int sum = 0;
            for (int j = 0; j < 32; j++) {
                codes[split ? (j & 1) * 16 + j / 2 : j] = (int8_t)q[j];
                sum += q[j];
            }
            a->steps[(int64_t)m * blocks + b] = step;
            a->sums[(int64_t)m * (blocks >> group_shift) + (b >> group_shift)] += step * (float)sum;
        }
    return 0;
}

/* The weights are read PREFETCH_AHEAD bytes ahead of the products (see int4_row) */
#define PREFETCH_AHEAD 4096

/* ---- int4 weights ------------------------------------------------------------------------------------------ */

/* the 32 int4 codes of one block's 16 bytes: low nibbles (even columns), then high nibbles (odd columns). The
   rounded activations of a block are laid out to match (its 16 even columns, then its 16 odd ones): no shuffle. */
static inline __m256i unpack_int4(const uint8_t *bytes) {
    __m128i packed = _mm_loadu_si128((const __m128i *)bytes);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
}

/* 32 unsigned codes times 32 signed int8 activations: products added in pairs (vpmaddubsw; |pair sum| <= 2 * 15 *
   127 = 3810, far from the 16-bit limit), then in fours (vpmaddwd), 8 int32 sums as float32 (exact: < 2^24) */
static inline __m256 dot_int8(__m256i unsigned_codes, const int8_t *x) {
    __m256i pairs = _mm256_maddubs_epi16(unsigned_codes, _mm256_loadu_si256((const __m256i *)x));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

/* One weight row's scales and zero - 8 scale, float16 -> float32, 8 groups at a time */
static inline void row_scales(const uint16_t *scale, const uint16_t *zero, int groups, float *scales, float *shifts) {
    int g = 0;
    for (; g + 8 <= groups; g += 8) {
        __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + g)));
        __m256 z = zero ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(zero + g))) : _mm256_setzero_ps();
        _mm256_storeu_ps(scales + g, s);
        _mm256_storeu_ps(shifts + g, _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s, z));
    }
    for (; g < groups; g++) {
        float s = _cvtsh_ss(scale[g]);
        scales[g] = s, shifts[g] = (zero ? _cvtsh_ss(zero[g]) : 0.0f) - 8.0f * s;
    }
}

/* Outputs of one weight row for `count` (1..4) rows of activations from row m0 on: the sum over blocks of
   scale * step * (codes . q), plus the offset term, the sum over groups of (zero - 8 scale) * (the group's sum
   of x). Per block the codes are unpacked once and used for each row, and each row sums in its own accumulator.
   always_inline: called with a constant count, the loops over the rows unroll. */
static inline __attribute__((always_inline)) void int4_tile(const uint8_t *weight, const float *scale,
                                                            const float *shift, int blocks, int group_shift,
                                                            const Activations *a, int64_t m0, int count, float *out) {
    const int groups = blocks >> group_shift;
    __m256 acc[4], offset[4];
    for (int i = 0; i < count; i++)
        acc[i] = offset[i] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        if ((b & 3) == 0)  /* each cache line of codes once */
            _mm_prefetch((const char *)(weight + 16 * b + PREFETCH_AHEAD), _MM_HINT_T0);
        __m256 s = _mm256_broadcast_ss(scale + (b >> group_shift));
        __m256i codes = unpack_int4(weight + 16 * b);
        for (int i = 0; i < count; i++) {
            int64_t block = (m0 + i) * blocks + b;  /* of the activations */
            acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(s, _mm256_broadcast_ss(a->steps + block)),
                                     dot_int8(codes, a->codes + 32 * block), acc[i]);
        }
    }
    for (int i = 0; i < count; i++) {  /* the offset term, 8 groups at a time */
        const float *sums = a->sums + (m0 + i) * groups;
        float rest = 0.0f;
        int g = 0;
        for (; g + 8 <= groups; g += 8)
            offset[i] = _mm256_fmadd_ps(_mm256_loadu_ps(shift + g), _mm256_loadu_ps(sums + g), offset[i]);
        for (; g < groups; g++)
            rest += shift[g] * sums[g];
        out[i] = horizontal_sum(_mm256_add_ps(acc[i], offset[i])) + rest;
    }
}

/* A decode step has one row of activations: each weight row's dot product then has nothing to share its
   unpacked codes with, and the loop would wait on one accumulator's latency. So four blocks go to four
   accumulators, and the weight is prefetched PREFETCH_AHEAD bytes ahead of the reading (rows are contiguous, so
   this runs on into the next row): the hardware prefetchers alone leave the loop waiting for memory, reading the
   weight at about half the speed the memory gives a plain sum. scaled_steps[b] = the scale of block b's group
   times the block's activation step. */
static inline float int4_row(const uint8_t *weight, const float *scaled_steps, int blocks, const int8_t *x) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int b = 0;
    for (; b + 4 <= blocks; b += 4) {  /* 4 blocks: 64 bytes of codes, one cache line */
        _mm_prefetch((const char *)(weight + 16 * b + PREFETCH_AHEAD), _MM_HINT_T0);
        for (int i = 0; i < 4; i++)
            acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(scaled_steps + b + i),
                                     dot_int8(unpack_int4(weight + 16 * (b + i)), x + 32 * (b + i)), acc[i]);
    }
    for (; b < blocks; b++)
        acc[0] = _mm256_fmadd_ps(_mm256_broadcast_ss(scaled_steps + b), dot_int8(unpack_int4(weight + 16 * b),
                                                                                 x + 32 * b), acc[0]);
    return horizontal_sum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}

/* scaled_steps[b] = the scale of block b's group times the block's activation step; returns scaled_steps */
static inline float *scaled_row_steps(const float *scale, const float *steps, int blocks, int group_shift,
                                      float *scaled_steps) {
    int b = 0;
    if (group_shift == 0)  /* groups of 32: a scale per block */
        for (; b + 8 <= blocks; b += 8)
            _mm256_storeu_ps(scaled_steps + b, _mm256_mul_ps(_mm256_loadu_ps(scale + b), _mm256_loadu_ps(steps + b)));
    for (; b < blocks; b++)
        scaled_steps[b] = scale[b >> group_shift] * steps[b];
    return scaled_steps;
}

/* The offset term of one weight row: the sum over groups of (zero - 8 scale) * (the group's sum of x) */
static inline float offset_term(const float *shift, const float *sums, int groups) {
    __m256 offset = _mm256_setzero_ps();
    float rest = 0.0f;
    int g = 0;
    for (; g + 8 <= groups; g += 8)
        offset = _mm256_fmadd_ps(_mm256_loadu_ps(shift + g), _mm256_loadu_ps(sums + g), offset);
    for (; g < groups; g++)
        rest += shift[g] * sums[g];
    return horizontal_sum(offset) + rest;
}

/* y [M, N] = x [M, K] float32, rounded to int8, times the int4 weight; 0, or -1 without memory. */
int int4_matmul(const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros, int blocks, int group_shift,
                const float *x, int in_features, int rows, float *y, int n_total) {
    const int groups = blocks >> group_shift;  /* a group is 2^group_shift blocks: 32, 64 or 128 columns */
    int failed = 0;
    Activations a;
    if (round_activations(&a, x, rows, in_features, blocks, 1, group_shift))
        return -1;
    #pragma omp parallel
    {
        float *scale = malloc(sizeof(float) * (2 * groups + blocks));  /* per thread */
        float *shift = scale ? scale + groups : NULL, *scaled_steps = scale ? scale + 2 * groups : NULL;
        #pragma omp for schedule(static)
        for (int n = 0; n < n_total; n++) {
            if (!scale)
                continue;
            const uint8_t *weight = qweight + (int64_t)n * blocks * 16;
            row_scales(scales + (int64_t)n * groups, zeros ? zeros + (int64_t)n * groups : 0, groups, scale, shift);
            if (rows == 1) {  /* a decode step */
                y[n] = int4_row(weight, scaled_row_steps(scale, a.steps, blocks, group_shift, scaled_steps), blocks,
                                a.codes) + offset_term(shift, a.sums, groups);
                continue;
            }
            for (int m0 = 0; m0 < rows; m0 += 4) {  /* each weight row read from memory once, for all M rows of x */
                float out[4];
                int count = rows - m0 < 4 ? rows - m0 : 4;
                switch (count) {  /* a constant in each call */
                    case 1: int4_tile(weight, scale, shift, blocks, group_shift, &a, m0, 1, out); break;
                    case 2: int4_tile(weight, scale, shift, blocks, group_shift, &a, m0, 2, out); break;
                    case 3: int4_tile(weight, scale, shift, blocks, group_shift, &a, m0, 3, out); break;
                    default: int4_tile(weight, scale, shift, blocks, group_shift, &a, m0, 4, out); break;
                }
                for (int i = 0; i < count; i++)
                    y[(m0 + i) * (int64_t)n_total + n] = out[i];
            }
        }
        if (!scale)
            #pragma omp atomic write
            failed = 1;
        free(scale);
    }
    free_activations(&a);
    return failed ? -1 : 0;
}

/* ---- int4 weights times 16-bit activations: the default decode -------------------------------------------- */

/* The same product with the activations rounded to 16-bit integers per block of 32 (step = max |x| / 32767): an
   error of at most 1/65534 of the block's largest activation, far below the bfloat16 rounding (1/512 of each
   value) of torch's int4 kernel. Integer products again, by vpmaddwd: 16 int16 x int16 products, added in pairs
   (|pair sum| <= 2 * 15 * 32767, inside 32 bits).
   The codes need no widening: read as 16-bit words, each word of the weight holds 4 codes (columns 4i .. 4i+3 of
   word i in its bits 0-3, 4-7, 8-11, 12-15), so one mask and three shifts give four vectors of 16-bit codes, one
   per position t in the word. Two blocks' 32 bytes go at once; the activations are laid out to match, per pair
   of blocks p and per t: 16 values, column 4i + t of block 2p (i = 0..7), then of block 2p + 1. The products of
   the four vectors added, lanes 0-3 hold block 2p's sums and lanes 4-7 block 2p + 1's. */
typedef struct {
    int16_t *codes;   /* [M][pairs * 64] */
    float *steps;     /* [M][2 * pairs] */
    float *sums;      /* [M][groups] */
} Activations16;

static void free_activations16(Activations16 *a) { free(a->codes), free(a->steps), free(a->sums); }

/* paired: the int4 layout above; else (for int8 weights) each block's 32 values in column order */
static int round_activations16(Activations16 *a, const float *x, int rows, int in_features, int blocks,
                               int group_shift, int paired) {
    const int pairs = (blocks + 1) / 2;
    a->codes = calloc((size_t)rows * pairs * 64, sizeof(int16_t)), a->steps = calloc((size_t)rows * 2 * pairs, 4);
    a->sums = calloc((size_t)rows * (blocks >> group_shift), sizeof(float));
    if (!a->codes || !a->steps || !a->sums) {
        free_activations16(a);
        return -1;
    }
    for (int m = 0; m < rows; m++)
        for (int b = 0; b < blocks; b++) {
            int32_t q[32];
            float step = round_block(x + (int64_t)m * in_features, in_features, b, 32767.0f, q);
            int16_t *codes = a->codes + ((int64_t)m * pairs + b / 2) * 64 + (b & 1) * (paired ? 8 : 32);
            int sum = 0;
            for (int j = 0; j < 32; j++) {
                codes[paired ? (j & 3) * 16 + j / 4 : j] = (int16_t)q[j];
                sum += q[j];
            }
            a->steps[(int64_t)m * 2 * pairs + b] = step;
            a->sums[(int64_t)m * (blocks >> group_shift) + (b >> group_shift)] += step * (float)sum;
        }
    return 0;
}

/* Blocks 2p and 2p + 1 of a weight row (with `whole` false only 2p: the last block of an odd count) times one
   row of laid-out activations: lanes 0-3 sum block 2p, lanes 4-7 block 2p + 1, as float32 (exact: < 2^24) */
static inline __m256 dot_int16_pair(const uint8_t *bytes, int whole, const int16_t *x) {
    __m256i words = whole ? _mm256_loadu_si256((const __m256i *)bytes)
                          : _mm256_inserti128_si256(_mm256_setzero_si256(), _mm_loadu_si128((const __m128i *)bytes), 0);
    __m256i mask = _mm256_set1_epi16(0x000F);
    __m256i c0 = _mm256_and_si256(words, mask), c1 = _mm256_and_si256(_mm256_srli_epi16(words, 4), mask);
    __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(words, 8), mask), c3 = _mm256_srli_epi16(words, 12);
    __m256i s01 = _mm256_add_epi32(_mm256_madd_epi16(c0, _mm256_loadu_si256((const __m256i *)x)),
                                   _mm256_madd_epi16(c1, _mm256_loadu_si256((const __m256i *)(x + 16))));
    __m256i s23 = _mm256_add_epi32(_mm256_madd_epi16(c2, _mm256_loadu_si256((const __m256i *)(x + 32))),
                                   _mm256_madd_epi16(c3, _mm256_loadu_si256((const __m256i *)(x + 48))));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(s01, s23));
}

/* [v[0] x 4, v[1] x 4] */
static inline __m256 two_broadcasts(const float *v) {
    return _mm256_set_m128(_mm_broadcast_ss(v + 1), _mm_broadcast_ss(v));
}

/* Outputs of one weight row for `count` (1..4) rows of activations from m0 on, two blocks at a time, the weight
   prefetched ahead. scale: per block (scaled_row_steps with steps of 1: see int4_matmul16). */
static inline __attribute__((always_inline)) void int4_tile16(const uint8_t *weight, const float *block_scale,
                                                              const float *shift, int blocks, int groups,
                                                              const Activations16 *a, int64_t m0, int count,
                                                              float *out) {
    const int pairs = (blocks + 1) / 2;
    __m256 acc[4];
    for (int i = 0; i < count; i++)
        acc[i] = _mm256_setzero_ps();
    for (int p = 0; p < pairs; p++) {
        if ((p & 1) == 0)  /* 2 pairs: 64 bytes, one cache line */
            _mm_prefetch((const char *)(weight + 32 * p + PREFETCH_AHEAD), _MM_HINT_T0);
        __m256 s = two_broadcasts(block_scale + 2 * p);
        for (int i = 0; i < count; i++) {
            int64_t row = m0 + i;
            __m256 d = dot_int16_pair(weight + 32 * p, 2 * p + 1 < blocks, a->codes + (row * pairs + p) * 64);
            acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(s, two_broadcasts(a->steps + row * 2 * pairs + 2 * p)), d, acc[i]);
        }
    }
    for (int i = 0; i < count; i++)
        out[i] = horizontal_sum(acc[i]) + offset_term(shift, a->sums + (m0 + i) * groups, groups);
}

/* One row of activations: the scale of each block already times its step, two accumulators */
static inline float int4_row16(const uint8_t *weight, const float *scaled_steps, int blocks, const int16_t *x) {
    const int pairs = (blocks + 1) / 2;
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    int p = 0;
    for (; p + 2 <= blocks / 2; p += 2) {
        _mm_prefetch((const char *)(weight + 32 * p + PREFETCH_AHEAD), _MM_HINT_T0);
        for (int i = 0; i < 2; i++)
            acc[i] = _mm256_fmadd_ps(two_broadcasts(scaled_steps + 2 * (p + i)),
                                     dot_int16_pair(weight + 32 * (p + i), 1, x + 64 * (p + i)), acc[i]);
    }
    for (; p < pairs; p++)
        acc[0] = _mm256_fmadd_ps(two_broadcasts(scaled_steps + 2 * p),
                                 dot_int16_pair(weight + 32 * p, 2 * p + 1 < blocks, x + 64 * p), acc[0]);
    return horizontal_sum(_mm256_add_ps(acc[0], acc[1]));
}

/* y [M, N] = x [M, K] float32, rounded to 16 bits per block of 32, times the int4 weight; 0, or -1 without
   memory. */
int int4_matmul16(const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros, int blocks,
                  int group_shift, const float *x, int in_features, int rows, float *y, int n_total) {
    const int groups = blocks >> group_shift;
    int failed = 0;
    Activations16 a;
    if (round_activations16(&a, x, rows, in_features, blocks, group_shift, 1))
        return -1;
    #pragma omp parallel
    {
        float *scale = malloc(sizeof(float) * (2 * groups + 2 * blocks + 2));  /* per thread */
        float *shift = scale ? scale + groups : NULL, *block_scale = scale ? scale + 2 * groups : NULL;
        #pragma omp for schedule(static)
        for (int n = 0; n < n_total; n++) {
            if (!scale)
                continue;
            const uint8_t *weight = qweight + (int64_t)n * blocks * 16;
            row_scales(scales + (int64_t)n * groups, zeros ? zeros + (int64_t)n * groups : 0, groups, scale, shift);
            block_scale[blocks] = 0.0f;  /* the missing half of an odd last pair */
            if (rows == 1) {
                y[n] = int4_row16(weight, scaled_row_steps(scale, a.steps, blocks, group_shift, block_scale), blocks,
                                  a.codes) + offset_term(shift, a.sums, groups);
                continue;
            }
            for (int b = 0; b < blocks; b++)  /* the scale of each block */
                block_scale[b] = scale[b >> group_shift];
            for (int m0 = 0; m0 < rows; m0 += 4) {
                float out[4];
                int count = rows - m0 < 4 ? rows - m0 : 4;
                switch (count) {
                    case 1: int4_tile16(weight, block_scale, shift, blocks, groups, &a, m0, 1, out); break;
                    case 2: int4_tile16(weight, block_scale, shift, blocks, groups, &a, m0, 2, out); break;
                    case 3: int4_tile16(weight, block_scale, shift, blocks, groups, &a, m0, 3, out); break;
                    default: int4_tile16(weight, block_scale, shift, blocks, groups, &a, m0, 4, out); break;
                }
                for (int i = 0; i < count; i++)
                    y[(m0 + i) * (int64_t)n_total + n] = out[i];
            }
        }
        if (!scale)
            #pragma omp atomic write
            failed = 1;
        free(scale);
    }
    free_activations16(&a);
    return failed ? -1 : 0;
}

/* ---- int8 weights (weight = qweight * scale, one float16 scale per row, as quant.py stores it) --------------- */

/* Signed times signed: vpmaddubsw wants its first operand unsigned, so it gets |w| and the activations take w's
   sign (vpsignb), as llama.cpp's Q8_0 x Q8_0 product does; |pair sums| <= 2 * 128 * 127, inside 16 bits. */
static inline __m256 dot_signed_int8(const int8_t *weight, const int8_t *x) {
    __m256i w = _mm256_loadu_si256((const __m256i *)weight);
    __m256i x_signed = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)x), w);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), x_signed),
                                                _mm256_set1_epi16(1)));
}

static inline __attribute__((always_inline)) void int8_tile(const int8_t *weight, float scale, int blocks,
                                                            const Activations *a, int64_t m0, int count, float *out) {
    __m256 acc[4];
    for (int i = 0; i < count; i++)
        acc[i] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++)
        for (int i = 0; i < count; i++) {
            int64_t block = (m0 + i) * blocks + b;
            acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(a->steps + block),
                                     dot_signed_int8(weight + 32 * b, a->codes + 32 * block), acc[i]);
        }
    for (int i = 0; i < count; i++)
        out[i] = horizontal_sum(acc[i]) * scale;
}

/* One row of activations: as int4_row, four accumulators, and the weight prefetched ahead */
static inline float int8_row(const int8_t *weight, const Activations *a, int blocks) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int b = 0;
    for (; b + 4 <= blocks; b += 4) {  /* 4 blocks: 128 bytes, two cache lines */
        _mm_prefetch((const char *)(weight + 32 * b + PREFETCH_AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(weight + 32 * b + PREFETCH_AHEAD + 64), _MM_HINT_T0);
        for (int i = 0; i < 4; i++)
            acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(a->steps + b + i),
                                     dot_signed_int8(weight + 32 * (b + i), a->codes + 32 * (b + i)), acc[i]);
    }
    for (; b < blocks; b++)
        acc[0] = _mm256_fmadd_ps(_mm256_broadcast_ss(a->steps + b), dot_signed_int8(weight + 32 * b,
                                                                                    a->codes + 32 * b), acc[0]);
    return horizontal_sum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}

/* y [M, N] = x [M, K] float32, rounded to int8, times the int8 weight qweight [N, K], K a multiple of 32; 0, or -1
   without memory. */
int int8_matmul(const int8_t *qweight, const uint16_t *scales, int blocks, const float *x, int rows, float *y,
                int n_total) {
    Activations a;
    if (round_activations(&a, x, rows, blocks * 32, blocks, 0, 0))
        return -1;
    if (rows == 1) {
        #pragma omp parallel for schedule(static)
        for (int n = 0; n < n_total; n++)
            y[n] = int8_row(qweight + (int64_t)n * blocks * 32, &a, blocks) * _cvtsh_ss(scales[n]);
        free_activations(&a);
        return 0;
    }
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < n_total; n++)
        for (int m0 = 0; m0 < rows; m0 += 4) {
            const int8_t *weight = qweight + (int64_t)n * blocks * 32;
            float out[4], scale = _cvtsh_ss(scales[n]);
            int count = rows - m0 < 4 ? rows - m0 : 4;
            switch (count) {
                case 1: int8_tile(weight, scale, blocks, &a, m0, 1, out); break;
                case 2: int8_tile(weight, scale, blocks, &a, m0, 2, out); break;
                case 3: int8_tile(weight, scale, blocks, &a, m0, 3, out); break;
                default: int8_tile(weight, scale, blocks, &a, m0, 4, out); break;
            }
            for (int i = 0; i < count; i++)
                y[(m0 + i) * (int64_t)n_total + n] = out[i];
        }
    free_activations(&a);
    return 0;
}

/* int8 weights times 16-bit activations, the default decode of the int8 layers (the lm_head of an int4 model):
   the weights sign-extended to 16 bits (vpmovsxbw), vpmaddwd as above (|pair sum| <= 2 * 128 * 32767). 32 bytes
   of weight per block: one accumulator keeps up with the memory, and the tile needs no pairing of blocks. */
static inline __attribute__((always_inline)) void int8_tile16(const int8_t *weight, float scale, int blocks,
                                                              const Activations16 *a, int64_t m0, int count,
                                                              float *out) {
    const int pairs = (blocks + 1) / 2;
    __m256 acc[4];
    for (int i = 0; i < count; i++)
        acc[i] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        if ((b & 1) == 0)  /* 2 blocks: 64 bytes, one cache line */
            _mm_prefetch((const char *)(weight + 32 * b + PREFETCH_AHEAD), _MM_HINT_T0);
        __m256i low = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(weight + 32 * b)));
        __m256i high = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(weight + 32 * b + 16)));
        for (int i = 0; i < count; i++) {
            const int16_t *x = a->codes + (m0 + i) * pairs * 64 + 32 * b;
            __m256i sums = _mm256_add_epi32(_mm256_madd_epi16(low, _mm256_loadu_si256((const __m256i *)x)),
                                            _mm256_madd_epi16(high, _mm256_loadu_si256((const __m256i *)(x + 16))));
            acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(a->steps + (m0 + i) * 2 * pairs + b),
                                     _mm256_cvtepi32_ps(sums), acc[i]);
        }
    }
    for (int i = 0; i < count; i++)
        out[i] = horizontal_sum(acc[i]) * scale;
}

/* y [M, N] = x [M, K] float32, rounded to 16 bits per block of 32, times the int8 weight qweight [N, K], K a
   multiple of 32; 0, or -1 without memory. */
int int8_matmul16(const int8_t *qweight, const uint16_t *scales, int blocks, const float *x, int rows, float *y,
                  int n_total) {
    Activations16 a;
    if (round_activations16(&a, x, rows, blocks * 32, blocks, 0, 0))
        return -1;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < n_total; n++)
        for (int m0 = 0; m0 < rows; m0 += 4) {
            const int8_t *weight = qweight + (int64_t)n * blocks * 32;
            float out[4], scale = _cvtsh_ss(scales[n]);
            int count = rows - m0 < 4 ? rows - m0 : 4;
            switch (count) {
                case 1: int8_tile16(weight, scale, blocks, &a, m0, 1, out); break;
                case 2: int8_tile16(weight, scale, blocks, &a, m0, 2, out); break;
                case 3: int8_tile16(weight, scale, blocks, &a, m0, 3, out); break;
                default: int8_tile16(weight, scale, blocks, &a, m0, 4, out); break;
            }
            for (int i = 0; i < count; i++)
                y[(m0 + i) * (int64_t)n_total + n] = out[i];
        }
    free_activations16(&a);
    return 0;
}

/* 8 keys' or values' elements, 16-bit (float16, or bfloat16 whose 16 bits are the top of a float32), as float32 */
static inline __m256 load8(const uint16_t *p, int bfloat16) {
    __m128i bits = _mm_loadu_si128((const __m128i *)p);
    if (bfloat16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
    return _mm256_cvtph_ps(bits);
}

/* Decode attention, one query row per head, over a 16-bit KV cache, in float32, without converting the cache:
   out[b, h] = softmax(q[b, h] . k[b, j, t] * scale over t < T) . v[b, j, t],  j = h / (heads / kv_heads)
   q, out: [B, heads, D] float32; k, v: rows of D 16-bit numbers, row t of kv head j of batch b at
   b * batch_stride + j * head_stride + t * D (a cache preallocated longer than T). D a multiple of 8, <= 256.
   Returns 0, or -1 when the memory for the scores cannot be had. */
int attend_one_row(const float *q, const uint16_t *k, const uint16_t *v, float *out, int batch, int heads,
                   int kv_heads, int length, int head_dim, int64_t batch_stride, int64_t head_stride, int bfloat16,
                   float scale) {
    int failed = 0;
    #pragma omp parallel for schedule(static) reduction(|: failed)
    for (int bh = 0; bh < batch * heads; bh++) {
        int b = bh / heads, h = bh % heads, j = h / (heads / kv_heads), chunks = head_dim / 8;
        const float *query = q + (int64_t)bh * head_dim;
        const uint16_t *keys = k + b * batch_stride + j * head_stride, *values = v + b * batch_stride + j * head_stride;
        float *scores = malloc(sizeof(float) * length), largest = -INFINITY, total = 0.0f;
        if (!scores) {
            failed = 1;
            continue;
        }
        __m256 qv[32];  /* the query row, in registers / L1 for all T keys */
        for (int c = 0; c < chunks; c++)
            qv[c] = _mm256_loadu_ps(query + 8 * c);
        for (int t = 0; t < length; t++) {
            __m256 dot = _mm256_mul_ps(qv[0], load8(keys + (int64_t)t * head_dim, bfloat16));
            for (int c = 1; c < chunks; c++)
                dot = _mm256_fmadd_ps(qv[c], load8(keys + (int64_t)t * head_dim + 8 * c, bfloat16), dot);
            scores[t] = horizontal_sum(dot) * scale;
            largest = fmaxf(largest, scores[t]);
        }
        for (int t = 0; t < length; t++) {  /* softmax: exp(s - max), summed; divided once at the end */
            scores[t] = expf(scores[t] - largest);
            total += scores[t];
        }
        __m256 acc[32];
        for (int c = 0; c < chunks; c++)
            acc[c] = _mm256_setzero_ps();
        for (int t = 0; t < length; t++) {
            __m256 p = _mm256_set1_ps(scores[t]);
            for (int c = 0; c < chunks; c++)
                acc[c] = _mm256_fmadd_ps(p, load8(values + (int64_t)t * head_dim + 8 * c, bfloat16), acc[c]);
        }
        __m256 inverse = _mm256_set1_ps(1.0f / total);
        for (int c = 0; c < chunks; c++)
            _mm256_storeu_ps(out + (int64_t)bh * head_dim + 8 * c, _mm256_mul_ps(acc[c], inverse));
        free(scores);
    }
    return failed ? -1 : 0;
}
