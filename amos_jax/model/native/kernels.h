// Register-blocked kernels shared by the custom calls in this directory, as macros
// that each file expands once per ISA (inside a namespace compiled for it).
#ifndef AMOS_JAX_NATIVE_KERNELS_H_
#define AMOS_JAX_NATIVE_KERNELS_H_

#include <cstdint>
#include <cstring>

// The kernel, for a vector of W floats and R rows per block. Included once per ISA.
#define AMOS_GEMM_KERNEL(W_, R_)                                                        \
  constexpr int W = W_;                                                                 \
  constexpr int R = R_;                                                                 \
  typedef float V __attribute__((vector_size(W * 4)));                                  \
                                                                                        \
  /* C[i0:i0+rows, j:j+vecs*W] of A (element (i, p) at a[i * ars + p * acs]) @ B      \
     (k x n, row stride ldb, unit columns); C row stride ldc. */                        \
  template <int ROWS, int VECS>                                                         \
  inline void Block(const float* a, int64_t ars, int64_t acs, const float* b,          \
                    int64_t ldb, float* c, int64_t ldc, int64_t i0, int64_t j,         \
                    int64_t k) {                                                        \
    V acc[ROWS][VECS];                                                                  \
    for (int r = 0; r < ROWS; ++r)                                                      \
      for (int v = 0; v < VECS; ++v) acc[r][v] = V{};                                   \
    for (int64_t p = 0; p < k; ++p) {                                                   \
      V bv[VECS];                                                                       \
      for (int v = 0; v < VECS; ++v) std::memcpy(&bv[v], b + p * ldb + j + v * W, sizeof(V)); \
      for (int r = 0; r < ROWS; ++r) {                                                  \
        /* s - 0 is s exactly, so this is one broadcast; s + 0 (not s for s = -0)  \
           cost a scalar add before it. */                                              \
        const V av = a[(i0 + r) * ars + p * acs] - V{};                                 \
        for (int v = 0; v < VECS; ++v) acc[r][v] += av * bv[v];                         \
      }                                                                                 \
    }                                                                                   \
    for (int r = 0; r < ROWS; ++r)                                                      \
      for (int v = 0; v < VECS; ++v)                                                    \
        std::memcpy(c + (i0 + r) * ldc + j + v * W, &acc[r][v], sizeof(V));             \
  }                                                                                     \
                                                                                        \
  template <int VECS>                                                                   \
  inline void Columns(const float* a, int64_t ars, int64_t acs, const float* b,        \
                      int64_t ldb, float* c, int64_t ldc, int64_t j, int64_t m,         \
                      int64_t k) {                                                      \
    int64_t i = 0;                                                                      \
    for (; i + R <= m; i += R) Block<R, VECS>(a, ars, acs, b, ldb, c, ldc, i, j, k);    \
    for (; i < m; ++i) Block<1, VECS>(a, ars, acs, b, ldb, c, ldc, i, j, k);            \
  }                                                                                     \
                                                                                        \
  void Gemm(const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,     \
            float* c, int64_t ldc, int64_t m, int64_t n, int64_t k) {                   \
    int64_t j = 0;                                                                      \
    for (; j + 2 * W <= n; j += 2 * W) Columns<2>(a, ars, acs, b, ldb, c, ldc, j, m, k); \
    for (; j + W <= n; j += W) Columns<1>(a, ars, acs, b, ldb, c, ldc, j, m, k);        \
    for (; j < n; ++j)                                                                  \
      for (int64_t i = 0; i < m; ++i) {                                                 \
        float s = 0.0f;                                                                 \
        for (int64_t p = 0; p < k; ++p) s += a[i * ars + p * acs] * b[p * ldb + j];     \
        c[i * ldc + j] = s;                                                             \
      }                                                                                 \
  }

// Dropout's keep decisions, for a vector of W (defined before) 32-bit counters: the
// threefry-2x32 hash (20 rounds) of counters `counter` under key (k1, k2) gives two
// words per counter, whose four 16-bit quarters are four decisions (kept where a
// quarter is below `threshold`). Counter c of row p holds decisions c, c + m, c + 2m
// and c + 3m of the row, m = ceil(n / 4); rows are numbered through the key.
#define AMOS_KEEP_ROWS                                                                  \
  typedef uint32_t Vec __attribute__((vector_size(4 * W)));                             \
  inline Vec Rotl(Vec x, int r) { return (x << r) | (x >> (32 - r)); }                  \
  /* The four quarters' decisions (-1 kept, 0 dropped) of W consecutive counters. */    \
  inline void Quarters(uint32_t k1, uint32_t k2, uint32_t threshold, Vec counter,      \
                       Vec keep[4]) {                                                   \
    static const int kRot[2][4] = {{13, 15, 26, 6}, {17, 29, 16, 24}};                  \
    const uint32_t ks[3] = {k1, k2, k1 ^ k2 ^ 0x1BD11BDAu};                             \
    Vec x1 = Vec{} + ks[0];                                                             \
    Vec x2 = counter + ks[1];                                                           \
    for (int i = 0; i < 5; ++i) {                                                       \
      for (int j = 0; j < 4; ++j) {                                                     \
        x1 += x2;                                                                       \
        x2 = Rotl(x2, kRot[i % 2][j]) ^ x1;                                             \
      }                                                                                 \
      x1 += ks[(i + 1) % 3];                                                            \
      x2 += ks[(i + 2) % 3] + static_cast<uint32_t>(i + 1);                             \
    }                                                                                   \
    keep[0] = (Vec)((x1 & 0xFFFFu) < threshold);                                        \
    keep[1] = (Vec)((x1 >> 16) < threshold);                                            \
    keep[2] = (Vec)((x2 & 0xFFFFu) < threshold);                                        \
    keep[3] = (Vec)((x2 >> 16) < threshold);                                            \
  }                                                                                     \
  inline Vec Lanes() {                                                                  \
    Vec lane;                                                                           \
    for (int l = 0; l < W; ++l) lane[l] = l;                                            \
    return lane;                                                                        \
  }                                                                                     \
  /* Rows p0 <= p < p1 of one key's keep mask, n decisions each (row p at              \
     out + (p - p0) * n). */                                                            \
  void Keep(uint32_t k1, uint32_t k2, uint32_t threshold, int64_t n, int64_t p0,       \
            int64_t p1, bool* out) {                                                    \
    const int64_t m = (n + 3) / 4;                                                      \
    const Vec lane = Lanes();                                                           \
    for (int64_t p = p0; p < p1; ++p) {                                                 \
      bool* row = out + (p - p0) * n;                                                   \
      for (int64_t q = 0; q < m; q += W) {                                              \
        Vec keep[4];                                                                    \
        Quarters(k1, k2, threshold, lane + static_cast<uint32_t>(p * m + q), keep);     \
        for (int h = 0; h < 4; ++h) {                                                   \
          const int64_t j0 = h * m + q;                                                 \
          if (q + W <= m && j0 + W <= n) {                                              \
            unsigned char bytes[W];                                                     \
            for (int l = 0; l < W; ++l) bytes[l] = static_cast<unsigned char>(keep[h][l] & 1); \
            std::memcpy(row + j0, bytes, W);                                            \
          } else {                                                                      \
            for (int l = 0; l < W && q + l < m && j0 + l < n; ++l) row[j0 + l] = keep[h][l] & 1; \
          }                                                                             \
        }                                                                               \
      }                                                                                 \
    }                                                                                   \
  }

#endif  // AMOS_JAX_NATIVE_KERNELS_H_
