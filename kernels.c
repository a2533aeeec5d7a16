/*
 * kernels.c: the fast layer's compiled part, for x86 CPUs with AVX2, FMA and F16C. Three kernels for a decode
 * step where torch's own are slow on such CPUs (docs/benchmarks.md has the measurements):
 *   int4_matmul     int4 weights times int8 activations (W4A8), for --int8-activations
 *   int8_matmul     int8 weights times int8 activations (W8A8), the same for int8 layers
 *   attend_one_row  one query row's attention over a 16-bit KV cache, without a float32 copy of the cache
 * kernels.py compiles this file on first use where a C compiler exists, checks each kernel against the readable
 * path, and calls them through ctypes; without a compiler, nothing changes. The work of each call is shared out
 * between threads by OpenMP: loaded into a process that already holds torch, the library binds to torch's own
 * OpenMP runtime, so torch.set_num_threads applies and torch's threads, not a second pool, do the work.
 *
 * int4_matmul reads nanoImp's int4 format as quant.py stores it, nothing converted:
 *   qweight [N, Kp/2] bytes: the code of column 2j in the low 4 bits of byte j, column 2j+1 in the high 4 bits
 *   scales, zeros [N, Kp/G] float16: weight = (code - 8) * scale + zero   (no zeros: symmetric, zero = 0)
 * It rounds the activations to int8 per block of 32 columns, as llama.cpp's Q8_0 does: x ~ step_b * xq
 * (xq -127..127, step_b = max |x| / 127 of the block). Per block b of a group with (scale, zero), the dot product
 * is then
 *   sum_{k in b} w_k x_k = scale * step_b * (sum_k code_k xq_k)  +  (zero - 8 scale) * step_b * (sum_k xq_k)
 * The first sum is integer arithmetic: vpmaddubsw multiplies 32 unsigned codes (0..15) by 32 signed activations
 * and adds neighbouring pairs (|sum| <= 2 * 15 * 127 = 3810, far from the 16-bit limit), vpmaddwd adds those pairs
 * into 8 int32s. One instruction does 32 multiplications where a float32 FMA does 8, and no code is converted to
 * a float: that is where the speed over torch's int4 kernel (float activations) comes from. The second sum is the
 * block's own, computed once per row of activations (and summed per group). Each block of rounded activations is laid out as its 16 even
 * columns, then its 16 odd ones, so that the low nibbles of the block's 16 bytes meet the first half and the high
 * nibbles the second, with no shuffle. Each weight row is read from memory once and used for all M rows of x.
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
            float block[32], largest = 0.0f;
            for (int j = 0; j < 32; j++) {
                int k = 32 * b + j;
                block[j] = k < in_features ? x[(int64_t)m * in_features + k] : 0.0f;
                largest = fmaxf(largest, fabsf(block[j]));
            }
            float step = largest > 0.0f ? largest / 127.0f : 1.0f;  /* an all-zero block: codes 0, any step */
            int sum = 0;
            for (int j = 0; j < 32; j++) {
                int q = (int)nearbyintf(block[j] / step);
                a->codes[((int64_t)m * blocks + b) * 32 + (split ? (j & 1) * 16 + j / 2 : j)] = (int8_t)q;
                sum += q;
            }
            a->steps[(int64_t)m * blocks + b] = step;
            a->sums[(int64_t)m * (blocks >> group_shift) + (b >> group_shift)] += step * (float)sum;
        }
    return 0;
}

/* ---- int4 weights ------------------------------------------------------------------------------------------ */

/* the 32 int4 codes of one block's 16 bytes: low nibbles (even columns), then high nibbles (odd columns) */
static inline __m256i unpack_int4(const uint8_t *bytes) {
    __m128i packed = _mm_loadu_si128((const __m128i *)bytes);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
}

/* 32 unsigned codes times 32 signed int8 activations: products added in pairs (vpmaddubsw), then in fours
   (vpmaddwd), 8 int32 sums as float32 (exact: < 2^24) */
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
        float *scale = malloc(sizeof(float) * 2 * groups), *shift = scale ? scale + groups : NULL;  /* per thread */
        #pragma omp for schedule(static)
        for (int n = 0; n < n_total; n++) {
            if (!scale)
                continue;
            const uint8_t *weight = qweight + (int64_t)n * blocks * 16;
            row_scales(scales + (int64_t)n * groups, zeros ? zeros + (int64_t)n * groups : 0, groups, scale, shift);
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

/* ---- int8 weights (weight = qweight * scale, one float16 scale per row, as quant.py stores it) --------------- */

/* Signed times signed: vpmaddubsw wants its first operand unsigned, so it gets |w| and the activations take w's
   sign (vpsignb), as llama.cpp's Q8_0 x Q8_0 product does; |pair sums| <= 2 * 128 * 127, inside 16 bits. */
static inline __attribute__((always_inline)) void int8_tile(const int8_t *weight, float scale, int blocks,
                                                            const Activations *a, int64_t m0, int count, float *out) {
    __m256 acc[4];
    for (int i = 0; i < count; i++)
        acc[i] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(weight + 32 * b)), magnitude = _mm256_sign_epi8(w, w);
        for (int i = 0; i < count; i++) {
            int64_t block = (m0 + i) * blocks + b;
            __m256i x = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(a->codes + 32 * block)), w);
            __m256 product = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, x),
                                                                  _mm256_set1_epi16(1)));
            acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(a->steps + block), product, acc[i]);
        }
    }
    for (int i = 0; i < count; i++)
        out[i] = horizontal_sum(acc[i]) * scale;
}

/* y [M, N] = x [M, K] float32, rounded to int8, times the int8 weight qweight [N, K], K a multiple of 32; 0, or -1
   without memory. */
int int8_matmul(const int8_t *qweight, const uint16_t *scales, int blocks, const float *x, int rows, float *y,
                int n_total) {
    Activations a;
    if (round_activations(&a, x, rows, blocks * 32, blocks, 0, 0))
        return -1;
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
