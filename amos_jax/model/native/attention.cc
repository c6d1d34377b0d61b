// Self-attention's core fused for XLA:CPU (an FFI custom call, forward and backward):
//
//   P   = softmax(where(mask, scale * Q K^T, lowest))        per (batch, head): T x S
//   ctx = (P * keep / keep_probability) V                    keep: dropout's masks
//
// where `keep` are the masks `dropout_keep.cc` draws for the (B, N, T, S) shape,
// hashed here row by row. Each (batch, head) is one work item: its T x S tile is
// computed, exponentiated, dropped and multiplied by V while it stays in the core's
// cache, so no (B, N, T, S) array is written to memory. The forward pass forms
// e = exp(s - rowmax) and the product (e * keep) V, then scales each of the T
// context rows by 1 / (rowsum(e) keep_probability): a T x Dh pass, where normalizing
// P first is a T x S one. It also writes each row's max and 1 / rowsum(e) (the
// softmax's statistics, (B, N, T, 2)), so the backward pass, which computes the
// tile again from Q and K as flash attention does, forms P = exp(s - max) / sum in
// one pass, then
//   dS = (Pd * dP - P * rowsum(Pd * dP)) * scale,  dP = dO V^T,  Pd = P * keep / keep_probability
//   dQ = dS K,  dK = dS^T Q,  dV = Pd^T dO
// (P * (dP * keep / keep_probability - rowsum) written with Pd), with masked scores'
// gradients zero. Q, K, V and the outputs are (B, T|S, N, Dh) arrays whose heads are
// read and written in place through their strides; K and V are packed transposed
// W x W block by block in registers. The products are batched_matmul.cc's
// register-blocked kernel; e^x is a degree-6 polynomial after range reduction
// (Cephes' expf). Compiled per ISA.
#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

#include "isa.h"
#include "kernels.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Two-vector shuffle with constant lane indices (GCC and clang spell it apart).
#if defined(__clang__)
#define AMOS_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define AMOS_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, Vi{__VA_ARGS__})
#endif

namespace {

struct Shape {
  int64_t B, T, S, N, Dh;
  int64_t mask_batch_stride;  // 0: one (T, S) mask for every row
  bool per_row_keys;          // keys (B, 2), else one key (1, 2)
  float scale;
  bool dropout;
  uint32_t threshold;  // keep where the 16-bit quarter < threshold
  float keep_scale;    // 65536 / threshold
};

// Scratch rows start on cache lines (64 bytes): a vector load or store that
// straddles two lines costs two. Rows are Sp floats, a whole number of vectors.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
using Floats = std::vector<float, CacheLineAllocator<float>>;

struct Scratch {
  Floats s, p, pd, packed, row_scale;
  std::vector<unsigned char> keep;
};

using ForwardFn = void (*)(const Shape&, const float*, const float*, const float*,
                           const bool*, const uint32_t*, float*, float*, int64_t,
                           Scratch&);
using BackwardFn = void (*)(const Shape&, const float*, const float*, const float*,
                            const bool*, const uint32_t*, const float*, const float*,
                            float*, float*, float*, int64_t, Scratch&);

#define AMOS_ATTENTION_KERNEL                                                           \
  typedef int32_t Vi __attribute__((vector_size(4 * W)));                               \
  typedef unsigned char Vb __attribute__((vector_size(W)));                             \
                                                                                        \
  /* e^x for x <= 0 (shifted scores); 0 below -87 (Cephes' expf). */                    \
  inline V Exp(V x) {                                                                   \
    const Vi under = x < -87.0f;                                                        \
    x = under ? V{} - 87.0f : x;                                                        \
    const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;                \
    V r = x - n * 0.693359375f;                                                         \
    r = r + n * 2.12194440e-4f;                                                         \
    V y = r * 1.9875691500e-4f + 1.3981999507e-3f;                                      \
    y = y * r + 8.3334519073e-3f;                                                       \
    y = y * r + 4.1665795894e-2f;                                                       \
    y = y * r + 1.6666665459e-1f;                                                       \
    y = y * r + 5.0000001201e-1f;                                                       \
    y = y * (r * r) + r + 1.0f;                                                         \
    const Vi e = (__builtin_convertvector(n, Vi) + 127) << 23;                          \
    V two_n;                                                                            \
    std::memcpy(&two_n, &e, sizeof(V));                                                 \
    return under ? V{} : y * two_n;                                                     \
  }                                                                                     \
                                                                                        \
  /* W flags from bytes m[j..j+W) (nonzero: true); those at or past n are false. */     \
  inline Vi Flags(const unsigned char* m, int64_t j, int64_t n) {                       \
    Vb b{};                                                                             \
    if (j + W <= n) {                                                                   \
      std::memcpy(&b, m + j, W);                                                        \
    } else {                                                                            \
      for (int l = 0; l < W && j + l < n; ++l) b[l] = m[j + l];                         \
    }                                                                                   \
    return __builtin_convertvector(b, Vi) != 0;                                         \
  }                                                                                     \
                                                                                        \
  inline V Load(const float* x) {                                                       \
    V v;                                                                                \
    std::memcpy(&v, x, sizeof(V));                                                      \
    return v;                                                                           \
  }                                                                                     \
  inline void Store(float* x, V v) { std::memcpy(x, &v, sizeof(V)); }                  \
  inline float Sum(V v) {                                                               \
    float total = 0.0f;                                                                 \
    for (int l = 0; l < W; ++l) total += v[l];                                          \
    return total;                                                                       \
  }                                                                                     \
  /* v with its lanes from `valid` on set to 0 (the pad columns past S). */             \
  inline V ZeroFrom(V v, int64_t valid) {                                               \
    for (int l = 0; l < W; ++l)                                                         \
      if (l >= valid) v[l] = 0.0f;                                                      \
    return v;                                                                           \
  }                                                                                     \
                                                                                        \
  /* One stage of a W x W transpose: rows a, b (D apart) swap bit D of their row and    \
     column indices. */                                                                 \
  template <int D, int... J>                                                            \
  inline void Butterfly(V& a, V& b, std::integer_sequence<int, J...>) {                 \
    const V lo = AMOS_SHUFFLE(a, b, ((J & D) ? W + J - D : J)...);                      \
    const V hi = AMOS_SHUFFLE(a, b, ((J & D) ? W + J : J + D)...);                      \
    a = lo;                                                                             \
    b = hi;                                                                             \
  }                                                                                     \
  template <int D>                                                                      \
  inline void Transpose(V* r) {                                                         \
    if constexpr (D < W) {                                                              \
      for (int i = 0; i < W; ++i)                                                       \
        if (!(i & D)) Butterfly<D>(r[i], r[i + D], std::make_integer_sequence<int, W>()); \
      Transpose<D * 2>(r);                                                              \
    }                                                                                   \
  }                                                                                     \
                                                                                        \
  /* Packs x (rows x cols, row stride ld) transposed into cols x ld_out (pads 0),       \
     W x W blocks at a time. */                                                         \
  inline void PackT(const float* x, int64_t ld, int64_t rows, int64_t cols, float* out, \
                    int64_t ld_out) {                                                   \
    int64_t r0 = 0;                                                                     \
    for (; r0 + W <= rows; r0 += W) {                                                   \
      int64_t c0 = 0;                                                                   \
      for (; c0 + W <= cols; c0 += W) {                                                 \
        V block[W];                                                                     \
        for (int i = 0; i < W; ++i) block[i] = Load(x + (r0 + i) * ld + c0);            \
        Transpose<1>(block);                                                            \
        for (int i = 0; i < W; ++i) Store(out + (c0 + i) * ld_out + r0, block[i]);      \
      }                                                                                 \
      for (int64_t c = c0; c < cols; ++c)                                               \
        for (int i = 0; i < W; ++i) out[c * ld_out + r0 + i] = x[(r0 + i) * ld + c];   \
    }                                                                                   \
    for (int64_t c = 0; c < cols; ++c) {                                                \
      float* o = out + c * ld_out;                                                      \
      for (int64_t r = r0; r < rows; ++r) o[r] = x[r * ld + c];                         \
      for (int64_t r = rows; r < ld_out; ++r) o[r] = 0.0f;                              \
    }                                                                                   \
  }                                                                                     \
                                                                                        \
  /* Columns j..j+W of a row's scores s (unscaled), scaled, with masked and pad ones     \
     the lowest float (a fully masked row's softmax is uniform, as XLA's form gives). */ \
  inline V MaskedScores(const float* s, const unsigned char* mask, int64_t j, int64_t S, \
                        float scale) {                                                  \
    return Flags(mask, j, S) ? Load(s + j) * scale : V{} - FLT_MAX;                     \
  }                                                                                     \
                                                                                        \
  /* The item's scores Q K^T (unscaled) into sc.s, T x Sp. */                           \
  inline void Scores(const Shape& sh, const float* qb, const float* kb, int64_t Sp,    \
                     Scratch& sc) {                                                     \
    const int64_t ld = sh.N * sh.Dh;                                                    \
    sc.s.resize(sh.T * Sp);                                                             \
    sc.packed.resize(sh.Dh * Sp);                                                       \
    PackT(kb, ld, sh.S, sh.Dh, sc.packed.data(), Sp);                                   \
    Gemm(qb, ld, 1, sc.packed.data(), Sp, sc.s.data(), Sp, sh.T, Sp, sh.Dh);            \
  }                                                                                     \
                                                                                        \
  /* Row p's keep flags (-1 kept, 0 dropped), one vector per W of its Sp columns.       \
     Where W divides the row's m = ceil(S / 4) counters, a vector of counters hashes    \
     straight into four whole vectors of flags; otherwise through bytes. */             \
  inline void RowKeep(const Shape& sh, const uint32_t* key, int64_t p, int64_t Sp,      \
                      Vi* flags, Scratch& sc) {                                         \
    const int64_t S = sh.S, m = (S + 3) / 4;                                            \
    if (m % W == 0) { /* then Sp = 4m */                                                \
      const Vec lane = Lanes();                                                         \
      for (int64_t q = 0; q < m; q += W) {                                              \
        Vec keep[4];                                                                    \
        Quarters(key[0], key[1], sh.threshold, lane + static_cast<uint32_t>(p * m + q), keep); \
        for (int h = 0; h < 4; ++h) flags[(h * m + q) / W] = (Vi)keep[h];              \
      }                                                                                 \
      return;                                                                           \
    }                                                                                   \
    sc.keep.resize(S);                                                                  \
    Keep(key[0], key[1], sh.threshold, S, p, p + 1, reinterpret_cast<bool*>(sc.keep.data())); \
    for (int64_t j = 0; j < Sp; j += W) flags[j / W] = Flags(sc.keep.data(), j, S);     \
  }                                                                                     \
                                                                                        \
  /* The item's key, and the keep mask's row number of its first query. */              \
  inline const uint32_t* ItemKey(const Shape& sh, const uint32_t* keys, int64_t b) {    \
    return keys + 2 * (sh.per_row_keys ? b : 0);                                        \
  }                                                                                     \
  inline int64_t FirstRow(const Shape& sh, int64_t b, int64_t h) {                      \
    return ((sh.per_row_keys ? 0 : b) * sh.N + h) * sh.T;                               \
  }                                                                                     \
                                                                                        \
  void Forward(const Shape& sh, const float* q, const float* k, const float* v,        \
               const bool* mask, const uint32_t* keys, float* out, float* stats,       \
               int64_t item, Scratch& sc) {                                             \
    const int64_t b = item / sh.N, h = item % sh.N, ld = sh.N * sh.Dh;                  \
    const int64_t T = sh.T, S = sh.S, Sp = (S + W - 1) / W * W;                         \
    const float* vb = v + b * S * ld + h * sh.Dh;                                       \
    Scores(sh, q + b * T * ld + h * sh.Dh, k + b * S * ld + h * sh.Dh, Sp, sc);         \
    const unsigned char* m =                                                            \
        reinterpret_cast<const unsigned char*>(mask) + b * sh.mask_batch_stride;        \
    Vi flags[Sp / W];                                                                   \
    sc.row_scale.resize(T);                                                             \
    float* st = stats + item * T * 2;                                                   \
    for (int64_t i = 0; i < T; ++i) {                                                   \
      float* s = sc.s.data() + i * Sp;                                                  \
      V mx = V{} - FLT_MAX;                                                             \
      for (int64_t j = 0; j < Sp; j += W) {                                             \
        const V x = MaskedScores(s, m + i * S, j, S, sh.scale);                         \
        Store(s + j, x); /* read again by the exponentials, cheaper than the flags */   \
        mx = mx > x ? mx : x;                                                           \
      }                                                                                 \
      float row_max = -FLT_MAX;                                                         \
      for (int l = 0; l < W; ++l) row_max = std::max(row_max, mx[l]);                   \
      if (sh.dropout) RowKeep(sh, ItemKey(sh, keys, b), FirstRow(sh, b, h) + i, Sp, flags, sc); \
      V sum{};                                                                          \
      for (int64_t j = 0; j < Sp; j += W) {                                             \
        V e = Exp(Load(s + j) - row_max);                                               \
        if (j + W > S) e = ZeroFrom(e, S - j);                                          \
        sum += e;                                                                       \
        Store(s + j, sh.dropout ? (flags[j / W] ? e : V{}) : e);                        \
      }                                                                                 \
      const float inv = 1.0f / Sum(sum);                                                \
      st[2 * i] = row_max;                                                              \
      st[2 * i + 1] = inv;                                                              \
      sc.row_scale[i] = sh.dropout ? inv * sh.keep_scale : inv;                         \
    }                                                                                   \
    float* o = out + b * T * ld + h * sh.Dh;                                            \
    Gemm(sc.s.data(), Sp, 1, vb, ld, o, ld, T, sh.Dh, S);                               \
    for (int64_t i = 0; i < T; ++i)                                                     \
      for (int64_t d = 0; d < sh.Dh; ++d) o[i * ld + d] *= sc.row_scale[i];             \
  }                                                                                     \
                                                                                        \
  void Backward(const Shape& sh, const float* q, const float* k, const float* v,       \
                const bool* mask, const uint32_t* keys, const float* stats,            \
                const float* dout, float* dq, float* dk, float* dv, int64_t item,       \
                Scratch& sc) {                                                          \
    const int64_t b = item / sh.N, h = item % sh.N, ld = sh.N * sh.Dh;                  \
    const int64_t T = sh.T, S = sh.S, Sp = (S + W - 1) / W * W;                         \
    const int64_t qo = b * T * ld + h * sh.Dh, ko = b * S * ld + h * sh.Dh;             \
    Scores(sh, q + qo, k + ko, Sp, sc);                                                 \
    const unsigned char* m =                                                            \
        reinterpret_cast<const unsigned char*>(mask) + b * sh.mask_batch_stride;        \
    const float* st = stats + item * T * 2;                                             \
    sc.p.resize(T * Sp);                                                                \
    if (sh.dropout) sc.pd.resize(T * Sp);                                               \
    Vi flags[Sp / W];                                                                   \
    for (int64_t i = 0; i < T; ++i) { /* P (and Pd) from the forward's statistics */    \
      const float* s = sc.s.data() + i * Sp;                                            \
      float* p = sc.p.data() + i * Sp;                                                  \
      if (sh.dropout) RowKeep(sh, ItemKey(sh, keys, b), FirstRow(sh, b, h) + i, Sp, flags, sc); \
      for (int64_t j = 0; j < Sp; j += W) {                                             \
        V pj = Exp(MaskedScores(s, m + i * S, j, S, sh.scale) - st[2 * i]) * st[2 * i + 1]; \
        if (j + W > S) pj = ZeroFrom(pj, S - j);                                        \
        Store(p + j, pj);                                                               \
        if (sh.dropout) Store(sc.pd.data() + i * Sp + j, flags[j / W] ? pj * sh.keep_scale : V{}); \
      }                                                                                 \
    }                                                                                   \
    const float* pd = sh.dropout ? sc.pd.data() : sc.p.data();                          \
    float* ds = sc.s.data(); /* dP = dO V^T, then dS in place */                        \
    PackT(v + ko, ld, S, sh.Dh, sc.packed.data(), Sp);                                  \
    Gemm(dout + qo, ld, 1, sc.packed.data(), Sp, ds, Sp, T, Sp, sh.Dh);                 \
    for (int64_t i = 0; i < T; ++i) {                                                   \
      float* d = ds + i * Sp;                                                           \
      const float *p = sc.p.data() + i * Sp, *pdi = pd + i * Sp;                        \
      if (st[2 * i] == -FLT_MAX) { /* every score masked: none has a gradient */        \
        std::memset(d, 0, Sp * sizeof(float));                                          \
        continue;                                                                       \
      }                                                                                 \
      V acc{};                                                                          \
      for (int64_t j = 0; j < Sp; j += W) acc += Load(pdi + j) * Load(d + j);           \
      const float rs = Sum(acc);                                                        \
      /* Masked and pad columns: P = Pd = 0, so dS = 0. */                              \
      for (int64_t j = 0; j < Sp; j += W)                                               \
        Store(d + j, (Load(pdi + j) * Load(d + j) - Load(p + j) * rs) * sh.scale);      \
    }                                                                                   \
    Gemm(pd, 1, Sp, dout + qo, ld, dv + ko, ld, S, sh.Dh, T);                           \
    Gemm(ds, Sp, 1, k + ko, ld, dq + qo, ld, T, sh.Dh, S);                              \
    Gemm(ds, 1, Sp, q + qo, ld, dk + ko, ld, S, sh.Dh, T);                              \
  }

struct Isa {
  const char* name;
  ForwardFn forward;
  BackwardFn backward;
};

#define AMOS_ATTENTION_BUILD(W, R)                                                      \
  AMOS_GEMM_KERNEL(W, R)                                                                \
  AMOS_KEEP_ROWS                                                                        \
  AMOS_ATTENTION_KERNEL                                                                 \
  const Isa kBuild{kName, Forward, Backward};

AMOS_NATIVE_PER_ISA(AMOS_ATTENTION_BUILD, (4, 4), (8, 6), (16, 8))

const Isa kIsas[] = AMOS_NATIVE_BUILDS;  // best first
Isa g_isa = amos_native::Best(kIsas);

ffi::Error MakeShape(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                     const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::PRED>& mask,
                     const ffi::Buffer<ffi::U32>& keys, float scale, int64_t threshold,
                     int64_t dropout, Shape* sh) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || kd[0] != qd[0] ||
      kd[2] != qd[2] || kd[3] != qd[3] || vd[0] != kd[0] || vd[1] != kd[1] ||
      vd[2] != kd[2] || vd[3] != kd[3]) {
    return ffi::Error::InvalidArgument(
        "amos_attention: q, k, v must be (B, T|S, N, Dh) with k, v alike");
  }
  *sh = Shape{qd[0], qd[1], kd[1], qd[2], qd[3], 0, false, scale, dropout != 0,
              static_cast<uint32_t>(threshold), 65536.0f / static_cast<float>(threshold)};
  const int64_t tile = sh->T * sh->S;
  const int64_t masks = static_cast<int64_t>(mask.element_count());
  if (masks != tile && masks != sh->B * tile) {
    return ffi::Error::InvalidArgument("amos_attention: the mask must be (1|B, 1, T, S)");
  }
  sh->mask_batch_stride = masks == tile ? 0 : tile;
  const int64_t rows = static_cast<int64_t>(keys.element_count()) / 2;
  if (dropout && (rows != 1 && rows != sh->B)) {
    return ffi::Error::InvalidArgument("amos_attention: keys must be (1|B, 2)");
  }
  if (dropout && (threshold < 1 || threshold > 65535)) {
    return ffi::Error::InvalidArgument("amos_attention: threshold outside (0, 65536)");
  }
  sh->per_row_keys = rows == sh->B;
  return ffi::Error::Success();
}

// The softmax statistics are (B, N, T, 2): each row's max and 1 / sum.
ffi::Error CheckStats(const Shape& sh, size_t elements) {
  if (static_cast<int64_t>(elements) != sh.B * sh.N * sh.T * 2) {
    return ffi::Error::InvalidArgument("amos_attention: the statistics must be (B, N, T, 2)");
  }
  return ffi::Error::Success();
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::U32> keys,
                            ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> stats, float scale,
                            int64_t threshold, int64_t dropout) {
  Shape sh;
  if (auto e = MakeShape(q, k, v, mask, keys, scale, threshold, dropout, &sh); e.failure()) {
    return e;
  }
  if (auto e = CheckStats(sh, stats->element_count()); e.failure()) return e;
  const ForwardFn fn = g_isa.forward;
  const float *pq = q.typed_data(), *pk = k.typed_data(), *pv = v.typed_data();
  const bool* pm = mask.typed_data();
  const uint32_t* pkeys = keys.typed_data();
  float *po = out->typed_data(), *pst = stats->typed_data();
  amos_native::ParallelFor(pool, sh.B * sh.N, [=](int64_t i) {
    thread_local Scratch scratch;
    fn(sh, pq, pk, pv, pm, pkeys, po, pst, i, scratch);
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                             ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                             ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::U32> keys,
                             ffi::Buffer<ffi::F32> stats, ffi::Buffer<ffi::F32> dout,
                             ffi::ResultBuffer<ffi::F32> dq,
                             ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                             float scale, int64_t threshold, int64_t dropout) {
  Shape sh;
  if (auto e = MakeShape(q, k, v, mask, keys, scale, threshold, dropout, &sh); e.failure()) {
    return e;
  }
  if (auto e = CheckStats(sh, stats.element_count()); e.failure()) return e;
  const BackwardFn fn = g_isa.backward;
  const float *pq = q.typed_data(), *pk = k.typed_data(), *pv = v.typed_data();
  const float *pst = stats.typed_data(), *pg = dout.typed_data();
  const bool* pm = mask.typed_data();
  const uint32_t* pkeys = keys.typed_data();
  float *pdq = dq->typed_data(), *pdk = dk->typed_data(), *pdv = dv->typed_data();
  amos_native::ParallelFor(pool, sh.B * sh.N, [=](int64_t i) {
    thread_local Scratch scratch;
    fn(sh, pq, pk, pv, pm, pkeys, pst, pg, pdq, pdk, pdv, i, scratch);
  });
  return ffi::Error::Success();
}

}  // namespace

AMOS_NATIVE_ISA_SWITCH(amos_attention, kIsas, g_isa)

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmosAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("threshold")
                                  .Attr<int64_t>("dropout"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmosAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("threshold")
                                  .Attr<int64_t>("dropout"));
