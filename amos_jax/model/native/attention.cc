// Self-attention's core fused for XLA:CPU (an FFI custom call, forward and backward):
//
//   P   = softmax(where(mask, scale * Q K^T, lowest))        per (batch, head): T x S
//   ctx = (P * keep / keep_probability) V                    keep: dropout's masks
//
// where `keep` are the masks `dropout_keep.cc` draws for the (B, N, T, S) shape,
// hashed here row by row. Each (batch, head) is one work item: its T x S tile is
// computed, normalized, dropped and multiplied by V while it stays in the core's
// cache, so no (B, N, T, S) array is written to memory; the backward pass computes
// the tile again from Q and K (as flash attention does) and forms
//   dS = P * (dP - rowsum(dP * P)) * scale,  dP = (dO V^T) * keep / keep_probability
//   dQ = dS K,  dK = dS^T Q,  dV = (P * keep / keep_probability)^T dO
// with masked scores' gradients zero. Q, K, V and the outputs are (B, T|S, N, Dh)
// arrays whose heads are read and written in place through their strides. The
// products are batched_matmul.cc's register-blocked kernel; e^x is a degree-6
// polynomial after range reduction (Cephes' expf). Compiled per ISA.
#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <cstring>
#include <vector>

#include "isa.h"
#include "kernels.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

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

struct Scratch {
  std::vector<float> p, pd, dp, packed;
  std::vector<unsigned char> keep;
};

using ForwardFn = void (*)(const Shape&, const float*, const float*, const float*,
                           const bool*, const uint32_t*, float*, int64_t, Scratch&);
using BackwardFn = void (*)(const Shape&, const float*, const float*, const float*,
                            const bool*, const uint32_t*, const float*, float*, float*,
                            float*, int64_t, Scratch&);

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
                                                                                        \
  /* Row of scores s (Sp = S rounded up to W floats) -> its softmax in place, masked    \
     scores replaced by the lowest float first (a fully masked row is uniform, as       \
     XLA's form gives); the pad columns end 0. */                                       \
  inline void SoftmaxRow(float* s, const unsigned char* mask, int64_t S, int64_t Sp,    \
                         float scale) {                                                 \
    V mx = V{} - FLT_MAX;                                                               \
    for (int64_t j = 0; j < Sp; j += W) {                                               \
      const V v = Flags(mask, j, S) ? Load(s + j) * scale : V{} - FLT_MAX;              \
      Store(s + j, v);                                                                  \
      mx = mx > v ? mx : v;                                                             \
    }                                                                                   \
    float m = -FLT_MAX;                                                                 \
    for (int l = 0; l < W; ++l) m = std::max(m, mx[l]);                                 \
    V sum{};                                                                            \
    for (int64_t j = 0; j < Sp; j += W) {                                               \
      V e = Exp(Load(s + j) - m);                                                       \
      if (j + W > S) {                                                                  \
        for (int l = 0; l < W; ++l)                                                     \
          if (j + l >= S) e[l] = 0.0f;                                                  \
      }                                                                                 \
      Store(s + j, e);                                                                  \
      sum += e;                                                                         \
    }                                                                                   \
    float total = 0.0f;                                                                 \
    for (int l = 0; l < W; ++l) total += sum[l];                                        \
    const float inv = 1.0f / total;                                                     \
    for (int64_t j = 0; j < Sp; j += W) Store(s + j, Load(s + j) * inv);                \
  }                                                                                     \
                                                                                        \
  /* Packs x (rows x cols, row stride ld) transposed into cols x ld_out (pads 0). */    \
  inline void PackT(const float* x, int64_t ld, int64_t rows, int64_t cols, float* out, \
                    int64_t ld_out) {                                                   \
    for (int64_t c = 0; c < cols; ++c) {                                                \
      float* o = out + c * ld_out;                                                      \
      for (int64_t r = 0; r < rows; ++r) o[r] = x[r * ld + c];                          \
      for (int64_t r = rows; r < ld_out; ++r) o[r] = 0.0f;                              \
    }                                                                                   \
  }                                                                                     \
                                                                                        \
  /* The probabilities of item (b, h) into sc.p (T x Sp), and with dropout its keep     \
     bytes into sc.keep and the dropped probabilities into pd (T x Sp). */              \
  inline void Probabilities(const Shape& sh, const float* qb, const float* kb,         \
                            const bool* mask, const uint32_t* keys, int64_t b,          \
                            int64_t h, int64_t Sp, float* pd, Scratch& sc) {            \
    const int64_t ld = sh.N * sh.Dh, T = sh.T, S = sh.S;                                \
    sc.p.resize(T * Sp);                                                                \
    sc.packed.resize(sh.Dh * Sp);                                                       \
    PackT(kb, ld, S, sh.Dh, sc.packed.data(), Sp);                                      \
    Gemm(qb, ld, 1, sc.packed.data(), Sp, sc.p.data(), Sp, T, Sp, sh.Dh);               \
    const unsigned char* m =                                                            \
        reinterpret_cast<const unsigned char*>(mask) + b * sh.mask_batch_stride;        \
    for (int64_t i = 0; i < T; ++i) SoftmaxRow(sc.p.data() + i * Sp, m + i * S, S, Sp, sh.scale); \
    if (!sh.dropout) return;                                                            \
    sc.keep.assign(T * S, 0);                                                           \
    const uint32_t* key = keys + 2 * (sh.per_row_keys ? b : 0);                         \
    const int64_t p0 = ((sh.per_row_keys ? 0 : b) * sh.N + h) * T;                      \
    Keep(key[0], key[1], sh.threshold, S, p0, p0 + T,                                   \
         reinterpret_cast<bool*>(sc.keep.data()));                                      \
    for (int64_t i = 0; i < T; ++i)                                                     \
      for (int64_t j = 0; j < Sp; j += W) {                                             \
        const Vi kept = Flags(sc.keep.data() + i * S, j, S);                            \
        Store(pd + i * Sp + j, kept ? Load(sc.p.data() + i * Sp + j) * sh.keep_scale : V{}); \
      }                                                                                 \
  }                                                                                     \
                                                                                        \
  void Forward(const Shape& sh, const float* q, const float* k, const float* v,        \
               const bool* mask, const uint32_t* keys, float* out, int64_t item,       \
               Scratch& sc) {                                                           \
    const int64_t b = item / sh.N, h = item % sh.N, ld = sh.N * sh.Dh;                  \
    const int64_t Sp = (sh.S + W - 1) / W * W;                                          \
    const float* qb = q + b * sh.T * ld + h * sh.Dh;                                    \
    const float* kb = k + b * sh.S * ld + h * sh.Dh;                                    \
    const float* vb = v + b * sh.S * ld + h * sh.Dh;                                    \
    sc.pd.resize(sh.T * Sp);                                                            \
    Probabilities(sh, qb, kb, mask, keys, b, h, Sp, sc.pd.data(), sc);                  \
    const float* pd = sh.dropout ? sc.pd.data() : sc.p.data();                          \
    Gemm(pd, Sp, 1, vb, ld, out + b * sh.T * ld + h * sh.Dh, ld, sh.T, sh.Dh, sh.S);    \
  }                                                                                     \
                                                                                        \
  void Backward(const Shape& sh, const float* q, const float* k, const float* v,       \
                const bool* mask, const uint32_t* keys, const float* dout, float* dq,   \
                float* dk, float* dv, int64_t item, Scratch& sc) {                      \
    const int64_t b = item / sh.N, h = item % sh.N, ld = sh.N * sh.Dh;                  \
    const int64_t T = sh.T, S = sh.S, Sp = (S + W - 1) / W * W;                         \
    const int64_t qo = b * T * ld + h * sh.Dh, ko = b * S * ld + h * sh.Dh;             \
    sc.pd.resize(T * Sp);                                                               \
    sc.dp.resize(T * Sp);                                                               \
    Probabilities(sh, q + qo, k + ko, mask, keys, b, h, Sp, sc.pd.data(), sc);          \
    const float* p = sc.p.data();                                                       \
    const float* pd = sh.dropout ? sc.pd.data() : p;                                    \
    float* ds = sc.dp.data();                                                           \
    PackT(v + ko, ld, S, sh.Dh, sc.packed.data(), Sp);                                  \
    Gemm(dout + qo, ld, 1, sc.packed.data(), Sp, ds, Sp, T, Sp, sh.Dh);                 \
    const unsigned char* m =                                                            \
        reinterpret_cast<const unsigned char*>(mask) + b * sh.mask_batch_stride;        \
    for (int64_t i = 0; i < T; ++i) {                                                   \
      float* d = ds + i * Sp;                                                           \
      const float* pi = p + i * Sp;                                                     \
      V acc{};                                                                          \
      for (int64_t j = 0; j < Sp; j += W) {                                             \
        V dpj = Load(d + j);                                                            \
        if (sh.dropout) {                                                               \
          dpj = Flags(sc.keep.data() + i * S, j, S) ? dpj * sh.keep_scale : V{};         \
          Store(d + j, dpj);                                                            \
        }                                                                               \
        acc += dpj * Load(pi + j);                                                      \
      }                                                                                 \
      float rs = 0.0f;                                                                  \
      for (int l = 0; l < W; ++l) rs += acc[l];                                         \
      for (int64_t j = 0; j < Sp; j += W) {                                             \
        const V g = Load(pi + j) * (Load(d + j) - rs) * sh.scale;                       \
        Store(d + j, Flags(m + i * S, j, S) ? g : V{});                                 \
      }                                                                                 \
    }                                                                                   \
    Gemm(pd, 1, Sp, dout + qo, ld, dv + ko, ld, S, sh.Dh, T);                           \
    Gemm(ds, Sp, 1, k + ko, ld, dq + qo, ld, T, sh.Dh, S);                              \
    Gemm(ds, 1, Sp, q + qo, ld, dk + ko, ld, S, sh.Dh, T);                              \
  }

namespace generic {
AMOS_GEMM_KERNEL(4, 4)
AMOS_KEEP_ROWS
AMOS_ATTENTION_KERNEL
}  // namespace generic

#if AMOS_NATIVE_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
AMOS_GEMM_KERNEL(8, 6)
AMOS_KEEP_ROWS
AMOS_ATTENTION_KERNEL
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
namespace avx512 {
AMOS_GEMM_KERNEL(16, 8)
AMOS_KEEP_ROWS
AMOS_ATTENTION_KERNEL
}  // namespace avx512
#pragma GCC pop_options
#endif

struct Isa {
  const char* name;
  ForwardFn forward;
  BackwardFn backward;
};

// Best first.
const Isa kIsas[] = {
#if AMOS_NATIVE_X86
    {"avx512", avx512::Forward, avx512::Backward},
    {"avx2", avx2::Forward, avx2::Backward},
#endif
    {"generic", generic::Forward, generic::Backward}};

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

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::U32> keys,
                            ffi::ResultBuffer<ffi::F32> out, float scale,
                            int64_t threshold, int64_t dropout) {
  Shape sh;
  if (auto e = MakeShape(q, k, v, mask, keys, scale, threshold, dropout, &sh); e.failure()) {
    return e;
  }
  const ForwardFn fn = g_isa.forward;
  const float *pq = q.typed_data(), *pk = k.typed_data(), *pv = v.typed_data();
  const bool* pm = mask.typed_data();
  const uint32_t* pkeys = keys.typed_data();
  float* po = out->typed_data();
  amos_native::ParallelFor(pool, sh.B * sh.N, [=](int64_t i) {
    thread_local Scratch scratch;
    fn(sh, pq, pk, pv, pm, pkeys, po, i, scratch);
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                             ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                             ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::U32> keys,
                             ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                             ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                             float scale, int64_t threshold, int64_t dropout) {
  Shape sh;
  if (auto e = MakeShape(q, k, v, mask, keys, scale, threshold, dropout, &sh); e.failure()) {
    return e;
  }
  const BackwardFn fn = g_isa.backward;
  const float *pq = q.typed_data(), *pk = k.typed_data(), *pv = v.typed_data();
  const float* pg = dout.typed_data();
  const bool* pm = mask.typed_data();
  const uint32_t* pkeys = keys.typed_data();
  float *pdq = dq->typed_data(), *pdk = dk->typed_data(), *pdv = dv->typed_data();
  amos_native::ParallelFor(pool, sh.B * sh.N, [=](int64_t i) {
    thread_local Scratch scratch;
    fn(sh, pq, pk, pv, pm, pkeys, pg, pdq, pdk, pdv, i, scratch);
  });
  return ffi::Error::Success();
}

}  // namespace

// The kernel this CPU runs: "avx512", "avx2" or "generic".
extern "C" const char* amos_attention_isa() { return g_isa.name; }

// Runs another compiled kernel (tests). Returns 0 when `name` is not compiled in or
// the CPU lacks it.
extern "C" int amos_attention_use_isa(const char* name) {
  return amos_native::Use(kIsas, name, &g_isa);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmosAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
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
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("threshold")
                                  .Attr<int64_t>("dropout"));
