/*
 * kernels.c: the fast layer's compiled part, for x86 CPUs with AVX2, FMA and F16C (AVX-512 ones included). The
 * kernels where torch's own are slow on such CPUs (docs/benchmarks.md has the measurements):
 *   int4_matmul      int4 weights times 16-bit integer activations: the default int4 decode; or times int8
 *                    activations (W4A8), for --int8-activations
 *   int8_matmul      the same for int8 weights (an int4 model's lm_head; int8 models)
 *   prompt_matmul    many rows (a prompt) times int4 or int8 weights in float32, each weight decoded once, in cache
 *                    (CPUs without AVX-512)
 *   dequantize_int4  an int4 weight decoded in one pass, float32 or bfloat16, for torch's product of a prompt
 *                    (CPUs with AVX-512)
 *   attend_one_row   one query row's attention over a 16-bit KV cache, without a float32 copy of the cache
 *   bfloat16_matvec  a bfloat16 weight times one row: a bfloat16 model's decode step
 *   gelu_tanh        GELU (tanh form) in place, vectorized: torch's tanh is several times slower on AVX2
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
 * row of activations. Each weight row is read from memory once per call, and prefetched ahead of its use; a decode
 * step computes everything else a row needs (its scales times the steps, its offset term) as it streams, so that
 * the loop runs at the memory's speed.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>


static inline float horizontal_sum(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
}

static inline float horizontal_max(__m256 v) {
    __m128 r = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_max_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_max_ss(r, _mm_movehdup_ps(r)));
}

/* e^x for 8 floats, to float32 precision: x = n ln 2 + r with n an integer and |r| <= ln 2 / 2, so e^x = 2^n e^r,
   e^r by its Taylor series to r^7 (the first term left out, r^8 / 8!, is below 6e-9) and 2^n written straight
   into the exponent bits. ln 2 is subtracted in two parts, the first exact in 9 bits, so n ln 2 costs no rounding.
   x is clamped to [-87, 88], where 2^n is a normal float: e^-87 ~ 1.6e-38 stands in for anything smaller. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),  /* x / ln 2 */
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040);  /* 1/2 + r/6 + r^2/24 + ... + r^5/5040, by Horner's rule */
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    __m256 e_r = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));  /* 1 + r + r^2 p */
    __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(e_r, _mm256_castsi256_ps(two_n));
}

/* ---- The activations, rounded to integers once per call, for all weight rows ------------------------------ */

/* x [M, K] float32 -> per block of 32 columns (columns past K, the padding of the int4 groups, are zeros): codes
   q = round(x / step), step = max |x| / 127 (bits 8) or / 32767 (bits 16) of the block; each block's step; and
   each group's (2^group_shift blocks) sum of step * q. The codes of a block are laid out the way the product
   that reads them wants (position() below); a row holds its blocks rounded up to an even number. */
typedef struct {
    int bits, row_length;  /* 8 or 16; codes per row: 32 per block, the blocks rounded up to pairs */
    int8_t *codes8;        /* [M][row_length], bits 8 */
    int16_t *codes16;      /* [M][row_length], bits 16 */
    float *steps;          /* [M][row_length / 32] */
    float *sums;           /* [M][groups] */
    float *block_sums;     /* [M][row_length / 32]: each block's step * q summed (a decode step's offset term) */
} Activations;

static void free_activations(Activations *a) { free(a->codes8), free(a->codes16), free(a->steps), free(a->sums),
                                          free(a->block_sums); }

/* Block b (32 columns; zeros past K) of one row of x rounded to integers: q = round(x / step), half to even
   as torch.round does, step = max |x| / limit (an all-zero block: any step, 1). Returns the step. */
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

/* Where column j of block b goes in its row of codes. For int8 weights, in order. For int4 weights, per pair of
   blocks p: with int8 activations, the 16 even columns of block 2p, those of block 2p + 1, then the odd columns
   of both, to meet the low and the high nibbles of the pair's 32 bytes (dot_int8_pair); with 16-bit ones, per
   t = j % 4, 16 values: column 4i + t of block 2p (i = 0..7), then of block 2p + 1, to meet the 16-bit words of
   the weight (dot_int16_pair). */
static inline int position(int bits, int for_int4, int b, int j) {
    if (!for_int4)
        return 32 * b + j;
    if (bits == 8)
        return 64 * (b / 2) + (j & 1) * 32 + (b & 1) * 16 + j / 2;
    return 64 * (b / 2) + (b & 1) * 8 + (j & 3) * 16 + j / 4;
}

static int round_activations(Activations *a, const float *x, int rows, int in_features, int blocks, int group_shift,
                             int bits, int for_int4) {
    const int groups = blocks >> group_shift;
    a->bits = bits, a->row_length = 32 * (blocks + (blocks & 1));
    a->codes8 = bits == 8 ? calloc((size_t)rows * a->row_length, 1) : NULL;
    a->codes16 = bits == 16 ? calloc((size_t)rows * a->row_length, sizeof(int16_t)) : NULL;
    a->steps = calloc((size_t)rows * a->row_length / 32, sizeof(float));
    a->sums = calloc((size_t)rows * groups, sizeof(float));
    a->block_sums = calloc((size_t)rows * a->row_length / 32, sizeof(float));
    if (!(a->codes8 || a->codes16) || !a->steps || !a->sums || !a->block_sums) {
        free_activations(a);
        return -1;
    }
    for (int m = 0; m < rows; m++)
        for (int b = 0; b < blocks; b++) {
            int32_t q[32], sum = 0;
            float step = round_block(x + (int64_t)m * in_features, in_features, b, bits == 8 ? 127.0f : 32767.0f, q);
            for (int j = 0; j < 32; j++) {
                int64_t at = (int64_t)m * a->row_length + position(bits, for_int4, b, j);
                if (bits == 8)
                    a->codes8[at] = (int8_t)q[j];
                else
                    a->codes16[at] = (int16_t)q[j];
                sum += q[j];
            }
            a->steps[(int64_t)m * a->row_length / 32 + b] = step;
            a->block_sums[(int64_t)m * a->row_length / 32 + b] = step * (float)sum;
            a->sums[(int64_t)m * groups + (b >> group_shift)] += step * (float)sum;
        }
    return 0;
}

/* ---- What every weight row needs ------------------------------------------------------------------------- */

/* The weights are read PREFETCH_AHEAD bytes ahead of the products: the hardware prefetchers alone leave the loops
   waiting for memory, reading the weight at about half the speed the memory gives a plain sum. Rows are
   contiguous, so this runs on into the next row. */
#define PREFETCH_AHEAD 4096

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

/* block_scale[b] = the scale of block b's group. The entry past the last block is 0: the missing half of an odd
   last pair. */
static inline void scale_blocks(const float *scale, int blocks, int group_shift, float *block_scale) {
    for (int b = 0; b < blocks; b++)
        block_scale[b] = scale[b >> group_shift];
    block_scale[blocks] = 0.0f;
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

/* ---- int4 weights: two blocks at a time ----------------------------------------------------------------- */

/* Both products read a pair of blocks, 32 bytes of codes, at once, and leave block 2p's sums in lanes 0-3 and
   block 2p + 1's in lanes 4-7, as float32 (exact: < 2^24). With `whole` false only block 2p is read (the last
   block of an odd count; its partner's activations are zeros). */
static inline __m256i load_pair(const uint8_t *bytes, int whole) {
    return whole ? _mm256_loadu_si256((const __m256i *)bytes)
                 : _mm256_inserti128_si256(_mm256_setzero_si256(), _mm_loadu_si128((const __m128i *)bytes), 0);
}

/* int8 activations. The low nibbles of the 32 bytes are the even columns of block 2p (bytes 0-15), then of block
   2p + 1; the high nibbles the odd columns: the activations are laid out to match (position() below). vpmaddubsw
   multiplies unsigned codes by signed activations and adds neighbours (|sum| <= 2 * 15 * 127 = 3810, so the two
   halves' sums add in 16 bits), vpmaddwd adds those in pairs into 32 bits. */
static inline __m256 dot_int8_pair(const uint8_t *bytes, int whole, const int8_t *x) {
    __m256i packed = load_pair(bytes, whole), mask = _mm256_set1_epi8(0x0F);
    __m256i low = _mm256_and_si256(packed, mask), high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
    __m256i sums = _mm256_add_epi16(_mm256_maddubs_epi16(low, _mm256_loadu_si256((const __m256i *)x)),
                                    _mm256_maddubs_epi16(high, _mm256_loadu_si256((const __m256i *)(x + 32))));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(sums, _mm256_set1_epi16(1)));
}

/* 16-bit activations. vpmaddwd: 16 int16 x int16 products, added in pairs (|pair sum| <= 2 * 15 * 32767, inside
   32 bits). The codes need no widening: read as 16-bit words, each word of the weight holds 4 codes (columns
   4i .. 4i+3 of word i in its bits 0-3, 4-7, 8-11, 12-15), so one mask and three shifts give four vectors of
   16-bit codes, one per position t in the word, and the activations are laid out to match. */
static inline __m256 dot_int16_pair(const uint8_t *bytes, int whole, const int16_t *x) {
    __m256i words = load_pair(bytes, whole), mask = _mm256_set1_epi16(0x000F);
    __m256i c0 = _mm256_and_si256(words, mask), c1 = _mm256_and_si256(_mm256_srli_epi16(words, 4), mask);
    __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(words, 8), mask), c3 = _mm256_srli_epi16(words, 12);
    __m256i s01 = _mm256_add_epi32(_mm256_madd_epi16(c0, _mm256_loadu_si256((const __m256i *)x)),
                                   _mm256_madd_epi16(c1, _mm256_loadu_si256((const __m256i *)(x + 16))));
    __m256i s23 = _mm256_add_epi32(_mm256_madd_epi16(c2, _mm256_loadu_si256((const __m256i *)(x + 32))),
                                   _mm256_madd_epi16(c3, _mm256_loadu_si256((const __m256i *)(x + 48))));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(s01, s23));
}

/* Pair p's codes times the activations' 64 values from `at` on, with the activations' bits (a constant where
   the callers are inlined: no branch left in their loops) */
static inline __attribute__((always_inline)) __m256 dot_pair(const uint8_t *weight, int p, int whole,
                                                             const Activations *a, int64_t at, int bits) {
    return bits == 8 ? dot_int8_pair(weight + 32 * p, whole, a->codes8 + at)
                     : dot_int16_pair(weight + 32 * p, whole, a->codes16 + at);
}

/* [v[0] x 4, v[1] x 4]: the scales of a pair of blocks, lane for lane */
static inline __m256 two_broadcasts(const float *v) {
    return _mm256_set_m128(_mm_broadcast_ss(v + 1), _mm_broadcast_ss(v));
}

/* One weight row times `count` (1..4) rows of activations from m0 on: each pair's codes are read once and used
   for each row, and each row sums in its own accumulator. always_inline: called with a constant count and bits,
   the loops over the rows unroll. The offset term is added by the caller. */
static inline __attribute__((always_inline)) void int4_tile(const uint8_t *weight, const float *block_scale,
                                                            int blocks, const Activations *a, int64_t m0,
                                                            int count, int bits, float *out) {
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
            __m256 d = dot_pair(weight, p, 2 * p + 1 < blocks, a, row * a->row_length + 64 * p, bits);
            __m256 steps = two_broadcasts(a->steps + row * a->row_length / 32 + 2 * p);
            acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(s, steps), d, acc[i]);
        }
    }
    for (int i = 0; i < count; i++)
        out[i] = horizontal_sum(acc[i]);
}

/* ---- A decode step: one row of activations ------------------------------------------------------------- */

/* The float16 values (scales or zeros) of blocks b .. b + 7 as float32, one lane per block: a group is 2^shift
   blocks, so 8 blocks span 8, 4 or 2 groups, each value repeated over its blocks */
static inline __m256 eight_blocks(const uint16_t *values, int b, int group_shift) {
    if (group_shift == 0)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(values + b)));
    if (group_shift == 1)
        return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_loadl_epi64((const __m128i *)(values + b / 2))),
                                        _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    int32_t two;
    memcpy(&two, values + b / 4, sizeof two);
    return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_cvtsi32_si128(two)), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

/* One weight row times the one row of activations. A decode step reads each weight once, so everything a row
   needs besides its codes is computed as it streams, 8 blocks (128 bytes of codes) at a time: the blocks' scales
   times the activations' steps, and the offset term, the sum over blocks of (zero - 8 scale) * (the block's sum
   of x). The four pairs go to four accumulators, so the loop does not wait on the latency of one. */
static inline __attribute__((always_inline)) float int4_decode_row(const uint8_t *weight, const uint16_t *scale,
                                                                   const uint16_t *zero, int blocks, int group_shift,
                                                                   const Activations *a, int bits) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    __m256 offset = _mm256_setzero_ps();
    int b = 0;
    for (; b + 8 <= blocks; b += 8) {
        _mm_prefetch((const char *)(weight + 16 * b + PREFETCH_AHEAD), _MM_HINT_T0);
        _mm_prefetch((const char *)(weight + 16 * b + 64 + PREFETCH_AHEAD), _MM_HINT_T0);
        __m256 s = eight_blocks(scale, b, group_shift);
        __m256 z = zero ? eight_blocks(zero, b, group_shift) : _mm256_setzero_ps();
        offset = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s, z), _mm256_loadu_ps(a->block_sums + b),
                                 offset);
        __m256 steps = _mm256_mul_ps(s, _mm256_loadu_ps(a->steps + b));  /* scale x step, per block */
        for (int i = 0; i < 4; i++) {  /* pair b/2 + i: blocks b + 2i and b + 2i + 1 */
            __m256i lanes = _mm256_setr_epi32(2 * i, 2 * i, 2 * i, 2 * i, 2 * i + 1, 2 * i + 1, 2 * i + 1, 2 * i + 1);
            acc[i] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(steps, lanes),
                                     dot_pair(weight, b / 2 + i, 1, a, 32 * (b + 2 * i), bits), acc[i]);
        }
    }
    float rest = 0.0f;
    for (; b < blocks; b += 2) {  /* the last blocks, fewer than 8, a pair at a time (b is even) */
        int whole = b + 1 < blocks;
        float pair[2] = {0.0f, 0.0f};
        for (int i = 0; i < 1 + whole; i++) {
            float s = _cvtsh_ss(scale[(b + i) >> group_shift]);
            float z = zero ? _cvtsh_ss(zero[(b + i) >> group_shift]) : 0.0f;
            rest += (z - 8.0f * s) * a->block_sums[b + i];
            pair[i] = s * a->steps[b + i];
        }
        acc[0] = _mm256_fmadd_ps(two_broadcasts(pair), dot_pair(weight, b / 2, whole, a, 32 * b, bits), acc[0]);
    }
    __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    return horizontal_sum(sum) + horizontal_sum(offset) + rest;
}

/* ---- The int4 product ------------------------------------------------------------------------------------- */

/* One weight row times rows m0 .. m0 + count - 1 (count 1..4) of the activations, with their bits */
static inline void int4_rows(const uint8_t *weight, const float *block_scale, int blocks, const Activations *a,
                             int64_t m0, int count, float *out) {
    switch (a->bits == 8 ? count : 4 + count) {  /* constants in each call: the loops unroll */
        case 1: int4_tile(weight, block_scale, blocks, a, m0, 1, 8, out); break;
        case 2: int4_tile(weight, block_scale, blocks, a, m0, 2, 8, out); break;
        case 3: int4_tile(weight, block_scale, blocks, a, m0, 3, 8, out); break;
        case 4: int4_tile(weight, block_scale, blocks, a, m0, 4, 8, out); break;
        case 5: int4_tile(weight, block_scale, blocks, a, m0, 1, 16, out); break;
        case 6: int4_tile(weight, block_scale, blocks, a, m0, 2, 16, out); break;
        case 7: int4_tile(weight, block_scale, blocks, a, m0, 3, 16, out); break;
        default: int4_tile(weight, block_scale, blocks, a, m0, 4, 16, out); break;
    }
}

/* y [M, N] = x [M, K] float32, rounded to `bits` (8 or 16) per block of 32, times the int4 weight, plus bias [N]
   (or none); 0, or -1 without memory. */
int int4_matmul(const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros, int blocks, int group_shift,
                const float *x, int in_features, int rows, float *y, int n_total, int bits, const float *bias) {
    const int groups = blocks >> group_shift;  /* a group is 2^group_shift blocks: 32, 64 or 128 columns */
    int failed = 0;
    Activations a;
    if (round_activations(&a, x, rows, in_features, blocks, group_shift, bits, 1))
        return -1;
    #pragma omp parallel
    {
        float *scale = malloc(sizeof(float) * (2 * groups + blocks + 1));  /* per thread */
        float *shift = scale ? scale + groups : NULL, *block_scale = scale ? scale + 2 * groups : NULL;
        #pragma omp for schedule(static)
        for (int n = 0; n < n_total; n++) {
            if (!scale)
                continue;
            const uint8_t *weight = qweight + (int64_t)n * blocks * 16;
            const uint16_t *scale_row = scales + (int64_t)n * groups;
            const uint16_t *zero_row = zeros ? zeros + (int64_t)n * groups : NULL;
            if (rows == 1) {  /* a decode step */
                float dot = bits == 8 ? int4_decode_row(weight, scale_row, zero_row, blocks, group_shift, &a, 8)
                                      : int4_decode_row(weight, scale_row, zero_row, blocks, group_shift, &a, 16);
                y[n] = bias ? dot + bias[n] : dot;
                continue;
            }
            row_scales(scale_row, zero_row, groups, scale, shift);
            scale_blocks(scale, blocks, group_shift, block_scale);
            for (int m0 = 0; m0 < rows; m0 += 4) {  /* each weight row read from memory once, for all M rows of x */
                float out[4];
                int count = rows - m0 < 4 ? rows - m0 : 4;
                int4_rows(weight, block_scale, blocks, &a, m0, count, out);
                for (int i = 0; i < count; i++) {
                    float dot = out[i] + offset_term(shift, a.sums + (m0 + i) * groups, groups);
                    y[(m0 + i) * (int64_t)n_total + n] = bias ? dot + bias[n] : dot;
                }
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

/* ---- int8 weights (weight = qweight * scale, one float16 scale per row, as quant.py stores it) --------------- */

/* 32 signed int8 weights times 32 int8 activations. vpmaddubsw wants its first operand unsigned, so it gets |w|
   and the activations take w's sign (vpsignb), as llama.cpp's Q8_0 x Q8_0 product does; |pair sums| <= 2 * 128 *
   127, inside 16 bits. */
static inline __m256 dot_signed_int8(const int8_t *weight, const int8_t *x) {
    __m256i w = _mm256_loadu_si256((const __m256i *)weight);
    __m256i x_signed = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)x), w);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), x_signed),
                                                _mm256_set1_epi16(1)));
}

/* ... times 32 16-bit activations: the weights sign-extended to 16 bits (vpmovsxbw), vpmaddwd as above */
static inline __m256 dot_signed_int16(const int8_t *weight, const int16_t *x) {
    __m256i low = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)weight));
    __m256i high = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(weight + 16)));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(low, _mm256_loadu_si256((const __m256i *)x)),
                                               _mm256_madd_epi16(high, _mm256_loadu_si256((const __m256i *)(x + 16)))));
}

/* One weight row times `count` rows of activations. 32 bytes of weight per block: one accumulator per row keeps up
   with the memory (the int4 rows above need more). */
static inline __attribute__((always_inline)) void int8_tile(const int8_t *weight, int blocks, const Activations *a,
                                                            int64_t m0, int count, float *out) {
    __m256 acc[4];
    for (int i = 0; i < count; i++)
        acc[i] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        if ((b & 1) == 0)  /* 2 blocks: 64 bytes, one cache line */
            _mm_prefetch((const char *)(weight + 32 * b + PREFETCH_AHEAD), _MM_HINT_T0);
        for (int i = 0; i < count; i++) {
            int64_t row = m0 + i, at = row * a->row_length + 32 * b;
            __m256 d = a->bits == 8 ? dot_signed_int8(weight + 32 * b, a->codes8 + at)
                                    : dot_signed_int16(weight + 32 * b, a->codes16 + at);
            acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(a->steps + row * a->row_length / 32 + b), d, acc[i]);
        }
    }
    for (int i = 0; i < count; i++)
        out[i] = horizontal_sum(acc[i]);
}

/* y [M, N] = x [M, K] float32, rounded to `bits` (8 or 16) per block of 32, times the int8 weight qweight [N, K], K
   a multiple of 32, plus bias [N] (or none); 0, or -1 without memory. */
int int8_matmul(const int8_t *qweight, const uint16_t *scales, int blocks, const float *x, int rows, float *y,
                int n_total, int bits, const float *bias) {
    Activations a;
    if (round_activations(&a, x, rows, blocks * 32, blocks, 0, bits, 0))
        return -1;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < n_total; n++)
        for (int m0 = 0; m0 < rows; m0 += 4) {
            const int8_t *weight = qweight + (int64_t)n * blocks * 32;
            float out[4], scale = _cvtsh_ss(scales[n]);
            int count = rows - m0 < 4 ? rows - m0 : 4;
            switch (count) {  /* a constant in each call */
                case 1: int8_tile(weight, blocks, &a, m0, 1, out); break;
                case 2: int8_tile(weight, blocks, &a, m0, 2, out); break;
                case 3: int8_tile(weight, blocks, &a, m0, 3, out); break;
                default: int8_tile(weight, blocks, &a, m0, 4, out); break;
            }
            for (int i = 0; i < count; i++) {
                float product = out[i] * scale;  /* rounded before the bias is added, as torch would */
                y[(m0 + i) * (int64_t)n_total + n] = bias ? product + bias[n] : product;
            }
        }
    free_activations(&a);
    return 0;
}

/* ---- Prompt products: many rows of float32 activations times int4 or int8 weights ---------------------------- */

/* At a prompt (hundreds of rows) a product does 2 * rows operations per weight it reads: the arithmetic, not the
   memory, sets its speed, so these stay in float32 and give the readable path's numbers (the same products,
   summed in another order: ~1e-7 apart). The readable path writes the whole weight out in float32, then calls
   torch's matrix product. Here each weight is decoded straight into the layout the multiplication reads, a panel
   at a time, in cache, the way BLIS-style matrix products pack their operands (Goto and van de Geijn, "Anatomy of
   high-performance matrix multiplication", 2008):
     for each block of PROMPT_KC columns (k):
       pack the activations' block: strips of TILE_ROWS rows, column by column (all threads share it)
       for each panel of PROMPT_NC weight rows (outputs; the panels are shared out between the threads):
         decode the panel's block to float32: strips of TILE_COLUMNS rows, column by column
         for each strip of activation rows, for each strip of the panel: one tile of outputs
   A tile is 6 rows x 16 outputs, summed over the block in 12 AVX registers: each column k adds one broadcast
   activation times two vectors of 8 weights per row. */
#define TILE_ROWS 6       /* 6 x 2 accumulators + 2 weight vectors + 1 broadcast activation: 15 of 16 AVX registers */
#define TILE_COLUMNS 16   /* outputs per tile: two vectors of 8 floats */
#define PROMPT_KC 512     /* columns per block, a multiple of every group size (128 at most): fewer blocks, fewer
                             passes over the outputs; a strip of activations (12 KB) stays in L1 across a panel */
#define PROMPT_NC 128     /* outputs per panel: 256 KB of decoded weights, inside a 512 KB L2 */

/* In-register transpose of 8 vectors of 8 floats: r[i][j] -> r[j][i] */
static inline void transpose8(__m256 r[8]) {
    __m256 t[8], s[8];
    for (int i = 0; i < 8; i += 2)
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    for (int i = 0; i < 8; i += 4)
        for (int j = 0; j < 2; j++) {
            s[i + 2 * j] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], 0x44);
            s[i + 2 * j + 1] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], 0xEE);
        }
    for (int i = 0; i < 4; i++)
        r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20), r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
}

/* One block (32 columns) of an int4 weight row as floats, in column order: (code - 8) * scale + zero, computed as
   code * scale + shift with shift = zero - 8 scale (row_scales) */
/* The 32 codes (0..15) of one block of int4 bytes as floats, in column order: 4 vectors of 8 */
static inline void int4_codes(const uint8_t *bytes, __m256 codes[4]) {
    __m128i packed = _mm_loadu_si128((const __m128i *)bytes), mask = _mm_set1_epi8(0x0F);
    __m128i low = _mm_and_si128(packed, mask), high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    __m128i sixteen[2] = {_mm_unpacklo_epi8(low, high), _mm_unpackhi_epi8(low, high)};  /* columns 0-15, 16-31 */
    for (int i = 0; i < 4; i++) {
        __m128i eight = i & 1 ? _mm_srli_si128(sixteen[i / 2], 8) : sixteen[i / 2];
        codes[i] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(eight));
    }
}

static inline void decode_int4_block(const uint8_t *bytes, float scale, float shift, __m256 out[4]) {
    int4_codes(bytes, out);
    for (int i = 0; i < 4; i++)
        out[i] = _mm256_fmadd_ps(out[i], _mm256_set1_ps(scale), _mm256_set1_ps(shift));
}

/* One block of an int8 weight row as floats: code * scale */
static inline void decode_int8_block(const int8_t *codes, float scale, __m256 out[4]) {
    for (int i = 0; i < 4; i++) {
        __m128i eight = _mm_loadl_epi64((const __m128i *)(codes + 8 * i));
        out[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight)), _mm256_set1_ps(scale));
    }
}

typedef struct {     /* a weight as quant.py stores it */
    int bits;        /* 4: qweight [N, blocks * 16] bytes, scales (zeros) [N, groups] float16, a group 2^group_shift
                        blocks; 8: qweight [N, blocks * 32] int8, scales [N] float16 */
    const void *qweight;
    const uint16_t *scales, *zeros;
    int blocks, group_shift, rows;
} Weight;

/* Weight rows n0 .. n0 + 15 (zeros past the last), blocks b0 .. b0 + count - 1, decoded into
   strip[32 * count][TILE_COLUMNS]: column k of the block, then the 16 rows. Eight rows at a time, a block at a
   time: each row's 32 floats, then 8 x 8 transposes. */
static void decode_strip(const Weight *w, int n0, int b0, int count, float *strip) {
    const int groups = w->blocks >> w->group_shift, g0 = b0 >> w->group_shift;
    for (int half = 0; half < 2; half++) {
        float scale[8][PROMPT_KC / 32], shift[8][PROMPT_KC / 32];  /* per row, per group of the block */
        for (int i = 0; i < 8; i++) {
            int64_t n = n0 + 8 * half + i;
            if (n < w->rows && w->bits == 4)
                row_scales(w->scales + n * groups + g0, w->zeros ? w->zeros + n * groups + g0 : NULL,
                           count >> w->group_shift, scale[i], shift[i]);
            else if (n < w->rows)
                scale[i][0] = _cvtsh_ss(w->scales[n]);
        }
        for (int b = 0; b < count; b++) {
            __m256 v[8][4];
            for (int i = 0; i < 8; i++) {
                int64_t n = n0 + 8 * half + i;
                if (n >= w->rows)
                    v[i][0] = v[i][1] = v[i][2] = v[i][3] = _mm256_setzero_ps();
                else if (w->bits == 4)
                    decode_int4_block((const uint8_t *)w->qweight + (n * w->blocks + b0 + b) * 16,
                                      scale[i][b >> w->group_shift], shift[i][b >> w->group_shift], v[i]);
                else
                    decode_int8_block((const int8_t *)w->qweight + (n * w->blocks + b0 + b) * 32, scale[i][0], v[i]);
            }
            for (int q = 0; q < 4; q++) {  /* columns 8q .. 8q + 7 of the block */
                __m256 t[8];
                for (int i = 0; i < 8; i++)
                    t[i] = v[i][q];
                transpose8(t);
                for (int j = 0; j < 8; j++)
                    _mm256_store_ps(strip + (32 * b + 8 * q + j) * TILE_COLUMNS + 8 * half, t[j]);
            }
        }
    }
}

/* Columns k0 .. k0 + width - 1 of x [M, K] into strips[M / 6 rounded up][width][TILE_ROWS]: column k of the strip,
   then its 6 rows (zeros past K and past M). Shared out between the threads of the caller's parallel region. */
static void pack_activations(const float *x, int rows, int in_features, int k0, int width, float *strips) {
    #pragma omp for schedule(static)
    for (int s = 0; s < (rows + TILE_ROWS - 1) / TILE_ROWS; s++)
        for (int i = 0; i < TILE_ROWS; i++) {
            int m = s * TILE_ROWS + i, valid = m < rows ? in_features - k0 : 0, k = 0;
            const float *row = x + (int64_t)m * in_features + k0;
            float *out = strips + (int64_t)s * width * TILE_ROWS + i;
            for (; k < width && k < valid; k++)
                out[k * TILE_ROWS] = row[k];
            for (; k < width; k++)
                out[k * TILE_ROWS] = 0.0f;
        }
}

/* One tile: y[0 .. rows-1][0 .. columns-1] (row stride ldy) = (first block: bias or 0; else y) + the sum over
   k < width of a[k][i] * b[k][j]. always_inline into one caller: the 12 accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile(const float *a, const float *b, int width, float *y,
                                                       int64_t ldy, int rows, int columns, int first,
                                                       const float *bias) {
    __m256 acc[TILE_ROWS][2];
    if (!first)  /* the outputs are read back at the end: fetched while the products run */
        for (int i = 0; i < rows; i++)
            _mm_prefetch((const char *)(y + i * ldy), _MM_HINT_T0);
    for (int i = 0; i < TILE_ROWS; i++)
        acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int k = 0; k < width; k++) {
        __m256 b0 = _mm256_load_ps(b + TILE_COLUMNS * k), b1 = _mm256_load_ps(b + TILE_COLUMNS * k + 8);
        for (int i = 0; i < TILE_ROWS; i++) {
            __m256 ai = _mm256_broadcast_ss(a + TILE_ROWS * k + i);
            acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
        }
    }
    float sums[TILE_ROWS][TILE_COLUMNS];  /* (a constant loop: a loop over `rows` would keep acc in memory) */
    for (int i = 0; i < TILE_ROWS; i++)
        _mm256_storeu_ps(sums[i], acc[i][0]), _mm256_storeu_ps(sums[i] + 8, acc[i][1]);
    for (int i = 0; i < rows; i++) {
        float *out = y + i * ldy;
        if (columns < TILE_COLUMNS)  /* the last tile of a weight whose rows are not a multiple of 16 */
            for (int j = 0; j < columns; j++)
                out[j] = (first ? (bias ? bias[j] : 0.0f) : out[j]) + sums[i][j];
        else
            for (int j = 0; j < TILE_COLUMNS; j += 8) {
                __m256 before = !first ? _mm256_loadu_ps(out + j)
                                       : bias ? _mm256_loadu_ps(bias + j) : _mm256_setzero_ps();
                _mm256_storeu_ps(out + j, _mm256_add_ps(before, _mm256_loadu_ps(sums[i] + j)));
            }
    }
}

/* y [M, N] = x [M, K] float32 times the weight's transpose (+ bias [N], if given), all float32; K <= 32 * blocks
   (the int4 groups' padding columns multiply zeros). Returns 0, or -1 without memory. */
int prompt_matmul(const void *qweight, const uint16_t *scales, const uint16_t *zeros, int bits, int blocks,
                  int group_shift, const float *x, int in_features, int rows, float *y, int n_total,
                  const float *bias) {
    const Weight w = {bits, qweight, scales, zeros, blocks, group_shift, n_total};
    const int padded = 32 * blocks, strips = (rows + TILE_ROWS - 1) / TILE_ROWS;
    float *activations = aligned_alloc(64, sizeof(float) * strips * PROMPT_KC * TILE_ROWS);
    int failed = 0;
    if (!activations)
        return -1;
    #pragma omp parallel
    {
        float *panel = aligned_alloc(64, sizeof(float) * PROMPT_KC * PROMPT_NC);  /* per thread */
        if (!panel)
            #pragma omp atomic write
            failed = 1;
        for (int k0 = 0; k0 < padded; k0 += PROMPT_KC) {
            int width = padded - k0 < PROMPT_KC ? padded - k0 : PROMPT_KC;
            pack_activations(x, rows, in_features, k0, width, activations);  /* ends with a barrier */
            #pragma omp for schedule(static)  /* the same panels to the same thread in every block */
            for (int n0 = 0; n0 < n_total; n0 += PROMPT_NC) {
                if (!panel)
                    continue;
                int outputs = n_total - n0 < PROMPT_NC ? n_total - n0 : PROMPT_NC;
                for (int j = 0; j < outputs; j += TILE_COLUMNS)
                    decode_strip(&w, n0 + j, k0 / 32, width / 32, panel + (int64_t)j * width);
                for (int s = 0; s < strips; s++)
                    for (int j = 0; j < outputs; j += TILE_COLUMNS)
                        tile(activations + (int64_t)s * width * TILE_ROWS, panel + (int64_t)j * width, width,
                             y + (int64_t)s * TILE_ROWS * n_total + n0 + j, n_total,
                             rows - s * TILE_ROWS < TILE_ROWS ? rows - s * TILE_ROWS : TILE_ROWS,
                             outputs - j < TILE_COLUMNS ? outputs - j : TILE_COLUMNS, k0 == 0,
                             bias ? bias + n0 + j : NULL);
            }
        }
        free(panel);
    }
    free(activations);
    return failed ? -1 : 0;
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
        int t = 0;
        for (; t + 4 <= length; t += 4) {  /* four keys at once: four independent chains of FMAs */
            const uint16_t *key = keys + (int64_t)t * head_dim;
            for (int byte = 0; byte < 8 * head_dim; byte += 64)  /* the four keys PREFETCH_AHEAD bytes on */
                _mm_prefetch((const char *)key + PREFETCH_AHEAD + byte, _MM_HINT_T0);
            __m256 dot[4];
            for (int i = 0; i < 4; i++)
                dot[i] = _mm256_mul_ps(qv[0], load8(key + i * head_dim, bfloat16));
            for (int c = 1; c < chunks; c++)
                for (int i = 0; i < 4; i++)
                    dot[i] = _mm256_fmadd_ps(qv[c], load8(key + i * head_dim + 8 * c, bfloat16), dot[i]);
            for (int i = 0; i < 4; i++) {
                scores[t + i] = horizontal_sum(dot[i]) * scale;
                largest = fmaxf(largest, scores[t + i]);
            }
        }
        for (; t < length; t++) {
            __m256 dot = _mm256_mul_ps(qv[0], load8(keys + (int64_t)t * head_dim, bfloat16));
            for (int c = 1; c < chunks; c++)
                dot = _mm256_fmadd_ps(qv[c], load8(keys + (int64_t)t * head_dim + 8 * c, bfloat16), dot);
            scores[t] = horizontal_sum(dot) * scale;
            largest = fmaxf(largest, scores[t]);
        }
        __m256 top = _mm256_set1_ps(largest), sum = _mm256_setzero_ps();  /* softmax: exp(s - max), summed */
        for (t = 0; t + 8 <= length; t += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t), top));
            _mm256_storeu_ps(scores + t, e);
            sum = _mm256_add_ps(sum, e);
        }
        total = horizontal_sum(sum);
        for (; t < length; t++) {
            scores[t] = expf(scores[t] - largest);
            total += scores[t];
        }
        __m256 acc[32];
        for (int c = 0; c < chunks; c++)
            acc[c] = _mm256_setzero_ps();
        for (int t = 0; t < length; t++) {
            if ((t & 3) == 0)
                for (int byte = 0; byte < 8 * head_dim; byte += 64)
                    _mm_prefetch((const char *)(values + (int64_t)t * head_dim) + PREFETCH_AHEAD + byte, _MM_HINT_T0);
            __m256 p = _mm256_set1_ps(scores[t]);
            for (int c = 0; c < chunks; c++)
                acc[c] = _mm256_fmadd_ps(p, load8(values + (int64_t)t * head_dim + 8 * c, bfloat16), acc[c]);
        }
        __m256 inverse = _mm256_set1_ps(1.0f / total);  /* divided once, at the end */
        for (int c = 0; c < chunks; c++)
            _mm256_storeu_ps(out + (int64_t)bh * head_dim + 8 * c, _mm256_mul_ps(acc[c], inverse));
        free(scores);
    }
    return failed ? -1 : 0;
}

/* ---- Dequantizing an int4 weight for torch's product ----------------------------------------------------- */

/* float32 -> bfloat16, rounded to nearest, ties to even, as torch's .to(torch.bfloat16) (no NaN in a weight) */
static inline __m128i to_bfloat16(__m256 v) {
    __m256i bits = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}

/* out [rows, K] = rows row0 .. row0 + rows - 1 of the int4 weight, (code - 8) * scale + zero in float32, as
   quant.dequantize_int4 computes it (the product is exact: one rounding, at the sum), stored as float32, or
   rounded to bfloat16 (bfloat16 != 0). The padding columns past K are dropped. Where torch's own product takes a
   prompt, the weight is decoded in one pass, in the dtype that product reads, instead of several over float32. */
void dequantize_int4(const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros, int blocks,
                     int group_shift, int row0, int rows, int in_features, void *out, int bfloat16) {
    const int groups = blocks >> group_shift, size = bfloat16 ? 2 : 4;  /* bytes per output element */
    #pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        int64_t n = row0 + r;
        for (int b = 0; b < blocks && 32 * b < in_features; b++) {
            int g = b >> group_shift, width = in_features - 32 * b < 32 ? in_features - 32 * b : 32;
            __m256 scale = _mm256_set1_ps(_cvtsh_ss(scales[n * groups + g]));
            __m256 zero = _mm256_set1_ps(zeros ? _cvtsh_ss(zeros[n * groups + g]) : 0.0f);
            char *target = (char *)out + ((int64_t)r * in_features + 32 * b) * size, partial[32 * 4];
            char *block = width == 32 ? target : partial;  /* the last block, cut at K, goes through `partial` */
            __m256 codes[4];
            int4_codes(qweight + (n * blocks + b) * 16, codes);
            for (int i = 0; i < 4; i++) {
                __m256 w = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(codes[i], _mm256_set1_ps(8.0f)), scale), zero);
                if (bfloat16)
                    _mm_storeu_si128((__m128i *)(block + 16 * i), to_bfloat16(w));
                else
                    _mm256_storeu_ps((float *)(block + 32 * i), w);
            }
            if (width < 32)
                memcpy(target, partial, (size_t)width * size);
        }
    }
}

/* ---- bfloat16 weights times one row --------------------------------------------------------------------- */

/* y [N] = W [N, K] bfloat16 times x [K] float32, plus bias [N] (or none), summed in float32: a decode step of a
   bfloat16 model. The sixteen bits of a bfloat16 are the top half of a float32, so a weight becomes a float by
   sitting above sixteen zero bits, and its product with a bfloat16 activation is exact: only the order of the
   sums differs from torch's product. vpunpcklwd / vpunpckhwd against zeros turn 16 weights into two vectors of 8
   floats, columns 0-3 and 8-11, then 4-7 and 12-15 (they work within each 128-bit half); x is laid out once per
   call in that order. Four accumulators, 32 weights (one cache line) per step, read PREFETCH_AHEAD bytes ahead. */
static void interleave_like_unpack(const float *x, int whole, float *out) {  /* whole: a multiple of 16 */
    for (int k0 = 0; k0 < whole; k0 += 16)
        for (int i = 0; i < 16; i++) {  /* lane i % 8 of the low (i < 8) or the high vector */
            int lane = i % 8, high = i / 8;
            out[k0 + i] = x[k0 + 8 * (lane / 4) + 4 * high + lane % 4];
        }
}

static inline void bfloat16_dot16(const uint16_t *w, const float *x, __m256 *acc_low, __m256 *acc_high) {
    __m256i bits = _mm256_loadu_si256((const __m256i *)w), zero = _mm256_setzero_si256();
    *acc_low = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, bits)), _mm256_loadu_ps(x), *acc_low);
    *acc_high = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, bits)), _mm256_loadu_ps(x + 8),
                                *acc_high);
}

int bfloat16_matvec(const uint16_t *weight, const float *x, int in_features, float *y, int n_total,
                    const float *bias) {
    const int whole = in_features / 16 * 16;
    float *xs = aligned_alloc(64, sizeof(float) * (whole + 64));
    if (!xs)
        return -1;
    interleave_like_unpack(x, whole, xs);
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < n_total; n++) {
        const uint16_t *w = weight + (int64_t)n * in_features;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        int k = 0;
        for (; k + 32 <= whole; k += 32) {
            _mm_prefetch((const char *)(w + k) + PREFETCH_AHEAD, _MM_HINT_T0);
            bfloat16_dot16(w + k, xs + k, &acc[0], &acc[1]);
            bfloat16_dot16(w + k + 16, xs + k + 16, &acc[2], &acc[3]);
        }
        if (k < whole)
            bfloat16_dot16(w + k, xs + k, &acc[0], &acc[1]);
        float rest = 0.0f;
        for (k = whole; k < in_features; k++) {  /* the last K % 16 columns */
            uint32_t bits = (uint32_t)w[k] << 16;
            float value;
            memcpy(&value, &bits, sizeof value);
            rest += value * x[k];
        }
        float dot = horizontal_sum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]))) + rest;
        y[n] = bias ? dot + bias[n] : dot;
    }
    free(xs);
    return 0;
}

/* ---- GELU ------------------------------------------------------------------------------------------------ */

/* x <- GELU(x), tanh form (Phi-2's "gelu_new", SigLIP's "gelu_pytorch_tanh"), n floats in place:
   0.5 x (1 + tanh u), u = sqrt(2 / pi) (x + 0.044715 x^3), computed as x / (1 + e^(-2u)), the same function
   (0.5 (1 + tanh u) = 1 / (1 + e^(-2u))) without tanh's cancellation where tanh u is near -1. */
static inline __m256 gelu8(__m256 x) {
    __m256 cube_term = _mm256_mul_ps(_mm256_mul_ps(x, x), _mm256_set1_ps(0.044715f));
    __m256 u = _mm256_mul_ps(_mm256_fmadd_ps(cube_term, x, x), _mm256_set1_ps(0.7978845608028654f));  /* sqrt(2/pi) */
    __m256 e = exp8(_mm256_mul_ps(u, _mm256_set1_ps(-2.0f)));
    return _mm256_div_ps(x, _mm256_add_ps(e, _mm256_set1_ps(1.0f)));
}

void gelu_tanh(float *x, int64_t n) {
    const int64_t chunk = 2048, chunks = (n + chunk - 1) / chunk;  /* 8 KB per piece of work */
    #pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < chunks; c++) {
        int64_t i = c * chunk, end = i + chunk < n ? i + chunk : n;
        for (; i + 8 <= end; i += 8)
            _mm256_storeu_ps(x + i, gelu8(_mm256_loadu_ps(x + i)));
        if (i < end) {  /* the last 1..7, through a zero-padded vector */
            float rest[8] = {0};
            memcpy(rest, x + i, sizeof(float) * (end - i));
            _mm256_storeu_ps(rest, gelu8(_mm256_loadu_ps(rest)));
            memcpy(x + i, rest, sizeof(float) * (end - i));
        }
    }
}
