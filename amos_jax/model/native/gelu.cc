// The exact (erf) GELU's backward pass for XLA:CPU (an FFI custom call), float32:
//
//   dx = g * (Phi(x) + x * phi(x)),   Phi(x) = (1 + erf(x / sqrt 2)) / 2,
//                                     phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//
// in one pass over x and g. XLA:CPU evaluates erf and exp here at about half the
// speed its memory allows, and in the train step writes erf's values out for a
// second pass (BENCHMARKS.md). erf is the rational approximation XLA:CPU uses for
// float32 (x clamped to +-3.744, where erf is 1 to float32; within 3.1e-7 of erf),
// exp a Cephes-style polynomial after a power-of-two range reduction (the argument
// here is never positive). Compiled for AVX-512, AVX2 + FMA and the baseline ISA;
// the best one the CPU has runs (`amos_gelu_isa`).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "isa.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Elements per work item shared among the threads.
constexpr int64_t kChunk = 1 << 16;

using BackwardFn = void (*)(const float* x, const float* g, int64_t n, float* dx);

#define AMOS_GELU_BACKWARD(W_)                                                           \
  constexpr int W = W_;                                                                  \
  typedef float V __attribute__((vector_size(W * 4)));                                   \
  typedef int32_t VI __attribute__((vector_size(W * 4)));                                \
                                                                                         \
  inline V Min(V a, V b) { return a < b ? a : b; }                                       \
  inline V Max(V a, V b) { return a > b ? a : b; }                                       \
                                                                                         \
  inline V Erf(V x) {                                                                    \
    const float c = 3.7439211627767994f;                                                 \
    x = Min(Max(x, V{} - c), V{} + c);                                                   \
    const V x2 = x * x;                                                                  \
    V p = V{} + 0.00022905065861350646f;                                                 \
    p = p * x2 + 0.0034082910107109506f;                                                 \
    p = p * x2 + 0.050955695062380861f;                                                  \
    p = p * x2 + 0.18520832239976145f;                                                   \
    p = p * x2 + 1.128379143519084f;                                                     \
    V q = V{} - 1.1791602954361697e-7f;                                                  \
    q = q * x2 + 0.000023547966471313185f;                                               \
    q = q * x2 + 0.0010179625278914885f;                                                 \
    q = q * x2 + 0.014070470171167667f;                                                  \
    q = q * x2 + 0.11098505178285362f;                                                   \
    q = q * x2 + 0.49746925110067538f;                                                   \
    q = q * x2 + 1.0f;                                                                   \
    return x * p / q;                                                                    \
  }                                                                                      \
                                                                                         \
  /* exp(t) for t <= 0 (below -87, where it underflows, the value is exp(-87)). */       \
  inline V ExpNonPositive(V t) {                                                         \
    t = Max(t, V{} - 87.0f);                                                             \
    /* n = round(t / ln 2), toward zero after subtracting a half (t <= 0). */            \
    const VI n = __builtin_convertvector(t * 1.44269504088896341f - 0.5f, VI);           \
    const V nf = __builtin_convertvector(n, V);                                          \
    const V r = (t - nf * 0.693359375f) + nf * 2.12194440e-4f;                           \
    V y = V{} + 1.9875691500e-4f;                                                        \
    y = y * r + 1.3981999507e-3f;                                                        \
    y = y * r + 8.3334519073e-3f;                                                        \
    y = y * r + 4.1665795894e-2f;                                                        \
    y = y * r + 1.6666665459e-1f;                                                        \
    y = y * r + 5.0000001201e-1f;                                                        \
    y = y * (r * r) + r + 1.0f;                                                          \
    const VI bits = (n + 127) << 23;                                                     \
    V scale;                                                                             \
    std::memcpy(&scale, &bits, sizeof(V));                                               \
    return y * scale;                                                                    \
  }                                                                                      \
                                                                                         \
  inline V Backward(V x, V g) {                                                          \
    const V cdf = 0.5f + 0.5f * Erf(x * 0.70710678118654752f);                           \
    const V pdf = ExpNonPositive(-0.5f * x * x) * 0.39894228040143268f;                  \
    return g * (cdf + x * pdf);                                                          \
  }                                                                                      \
                                                                                         \
  void GeluBackward(const float* x, const float* g, int64_t n, float* dx) {             \
    int64_t i = 0;                                                                       \
    for (; i + W <= n; i += W) {                                                         \
      V xv, gv;                                                                          \
      std::memcpy(&xv, x + i, sizeof(V));                                                \
      std::memcpy(&gv, g + i, sizeof(V));                                                \
      const V out = Backward(xv, gv);                                                    \
      std::memcpy(dx + i, &out, sizeof(V));                                              \
    }                                                                                    \
    if (i < n) { /* the tail, through a zero-padded vector */                            \
      V xv = V{}, gv = V{};                                                              \
      std::memcpy(&xv, x + i, (n - i) * sizeof(float));                                  \
      std::memcpy(&gv, g + i, (n - i) * sizeof(float));                                  \
      const V out = Backward(xv, gv);                                                    \
      std::memcpy(dx + i, &out, (n - i) * sizeof(float));                                \
    }                                                                                    \
  }

struct Isa {
  const char* name;
  BackwardFn backward;
};

#define AMOS_GELU_BUILD(W)                                                              \
  AMOS_GELU_BACKWARD(W)                                                                 \
  const Isa kBuild{kName, GeluBackward};

AMOS_NATIVE_PER_ISA(AMOS_GELU_BUILD, (4), (8), (16))

const Isa kIsas[] = AMOS_NATIVE_BUILDS;  // best first
Isa g_isa = amos_native::Best(kIsas);

ffi::Error GeluBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dx) {
  const int64_t n = static_cast<int64_t>(x.element_count());
  if (g.element_count() != x.element_count() || dx->element_count() != x.element_count()) {
    return ffi::Error::InvalidArgument(
        "amos_gelu_bwd: needs x, g and dx of one size (a caller bug)");
  }
  const BackwardFn kernel = g_isa.backward;
  const float* px = x.typed_data();
  const float* pg = g.typed_data();
  float* pdx = dx->typed_data();
  amos_native::ParallelFor(pool, (n + kChunk - 1) / kChunk, [=](int64_t c) {
    const int64_t i0 = c * kChunk;
    kernel(px + i0, pg + i0, std::min(kChunk, n - i0), pdx + i0);
  });
  return ffi::Error::Success();
}

}  // namespace

AMOS_NATIVE_ISA_SWITCH(amos_gelu, kIsas, g_isa)

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmosGeluBackward, GeluBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
