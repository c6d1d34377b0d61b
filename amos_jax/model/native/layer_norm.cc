// LayerNorm over rows of H for XLA:CPU (two FFI custom calls), float32:
//
//   forward:  mean, rstd = 1 / sqrt(var + eps) per row (two passes over the row),
//             y = (x - mean) * rstd * scale + bias; the statistics (mean, rstd) kept
//   backward: xhat = (x - mean) * rstd, gs = g * scale,
//             dx = rstd * (gs - mean(gs) - xhat * mean(gs * xhat))      per row
//             dscale = sum over rows of g * xhat,  dbias = sum over rows of g
//
// One pass over the rows each. XLA:CPU computes a row's statistics and the two
// parameter gradients as separate reductions (the latter over the rows, the columns
// of a row-major array), which took about two thirds of a (4096, 256) LayerNorm's
// forward and backward time (BENCHMARKS.md). The rows are split into a fixed number
// of chunks shared among the caller and the intra-op thread pool's threads; in the
// backward pass each chunk adds its rows into its own partial sums, added in chunk
// order after, so the result does not depend on which thread ran which chunk.
// Compiled for AVX-512, AVX2 + FMA and the baseline ISA; the best one the CPU has
// runs (`amos_layer_norm_isa`).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "isa.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Rows per chunk: enough work per chunk to hide the pool's hand-off, few enough
// chunks that adding their partial sums is a small fraction of the pass.
constexpr int64_t kChunkRows = 128;

using ForwardFn = void (*)(const float* x, const float* scale, const float* bias,
                           int64_t rows, int64_t h, float eps, float* y, float* stats);
using BackwardFn = void (*)(const float* x, const float* stats, const float* scale,
                            const float* g, int64_t rows, int64_t h, float* dx,
                            float* dscale, float* dbias);

#define AMOS_LAYER_NORM(W_)                                                              \
  constexpr int W = W_;                                                                  \
  typedef float V __attribute__((vector_size(W * 4)));                                   \
  inline V Load(const float* p) {                                                        \
    V v;                                                                                 \
    std::memcpy(&v, p, sizeof(V));                                                       \
    return v;                                                                            \
  }                                                                                      \
  inline void Store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }                    \
  inline float Sum(V v) {                                                                \
    float s = 0.0f;                                                                      \
    for (int l = 0; l < W; ++l) s += v[l];                                               \
    return s;                                                                            \
  }                                                                                      \
                                                                                         \
  /* `rows` rows: y written, (mean, rstd) into stats (2 per row). */                     \
  void Forward(const float* x, const float* scale, const float* bias, int64_t rows,     \
               int64_t h, float eps, float* y, float* stats) {                           \
    const int64_t hv = h / W * W;                                                        \
    const float inv_h = 1.0f / static_cast<float>(h);                                    \
    for (int64_t r = 0; r < rows; ++r) {                                                 \
      const float* xr = x + r * h;                                                       \
      V acc = V{};                                                                       \
      float tail = 0.0f;                                                                 \
      int64_t j = 0;                                                                     \
      for (; j < hv; j += W) acc += Load(xr + j);                                        \
      for (; j < h; ++j) tail += xr[j];                                                  \
      const float mean = (Sum(acc) + tail) * inv_h;                                      \
      acc = V{};                                                                         \
      tail = 0.0f;                                                                       \
      for (j = 0; j < hv; j += W) {                                                      \
        const V c = Load(xr + j) - mean;                                                 \
        acc += c * c;                                                                    \
      }                                                                                  \
      for (; j < h; ++j) tail += (xr[j] - mean) * (xr[j] - mean);                        \
      const float rstd = 1.0f / std::sqrt((Sum(acc) + tail) * inv_h + eps);              \
      float* yr = y + r * h;                                                             \
      for (j = 0; j < hv; j += W)                                                        \
        Store(yr + j, (Load(xr + j) - mean) * rstd * Load(scale + j) + Load(bias + j));  \
      for (; j < h; ++j) yr[j] = (xr[j] - mean) * rstd * scale[j] + bias[j];             \
      stats[2 * r] = mean;                                                               \
      stats[2 * r + 1] = rstd;                                                           \
    }                                                                                    \
  }                                                                                      \
                                                                                         \
  /* `rows` rows: dx written, g * xhat and g added into dscale and dbias (H each). */    \
  void Backward(const float* x, const float* stats, const float* scale, const float* g, \
                int64_t rows, int64_t h, float* dx, float* dscale, float* dbias) {       \
    const int64_t hv = h / W * W;                                                        \
    const float inv_h = 1.0f / static_cast<float>(h);                                    \
    for (int64_t r = 0; r < rows; ++r) {                                                 \
      const float* xr = x + r * h;                                                       \
      const float* gr = g + r * h;                                                       \
      const float mean = stats[2 * r], rstd = stats[2 * r + 1];                          \
      V a = V{}, b = V{};                                                                \
      float as = 0.0f, bs = 0.0f;                                                        \
      int64_t j = 0;                                                                     \
      for (; j < hv; j += W) {                                                           \
        const V gv = Load(gr + j), xv = (Load(xr + j) - mean) * rstd;                    \
        const V gs = gv * Load(scale + j);                                               \
        a += gs;                                                                         \
        b += gs * xv;                                                                    \
        Store(dbias + j, Load(dbias + j) + gv);                                          \
        Store(dscale + j, Load(dscale + j) + gv * xv);                                   \
      }                                                                                  \
      for (; j < h; ++j) {                                                               \
        const float xv = (xr[j] - mean) * rstd, gs = gr[j] * scale[j];                   \
        as += gs;                                                                        \
        bs += gs * xv;                                                                   \
        dbias[j] += gr[j];                                                               \
        dscale[j] += gr[j] * xv;                                                         \
      }                                                                                  \
      const float mean_gs = (Sum(a) + as) * inv_h, mean_gsx = (Sum(b) + bs) * inv_h;     \
      float* dr = dx + r * h;                                                            \
      for (j = 0; j < hv; j += W) {                                                      \
        const V xv = (Load(xr + j) - mean) * rstd;                                       \
        const V gs = Load(gr + j) * Load(scale + j);                                     \
        Store(dr + j, rstd * (gs - mean_gs - xv * mean_gsx));                            \
      }                                                                                  \
      for (; j < h; ++j) {                                                               \
        const float xv = (xr[j] - mean) * rstd;                                          \
        dr[j] = rstd * (gr[j] * scale[j] - mean_gs - xv * mean_gsx);                     \
      }                                                                                  \
    }                                                                                    \
  }

struct Isa {
  const char* name;
  ForwardFn forward;
  BackwardFn backward;
};

#define AMOS_LAYER_NORM_BUILD(W)                                                        \
  AMOS_LAYER_NORM(W)                                                                    \
  const Isa kBuild{kName, Forward, Backward};

AMOS_NATIVE_PER_ISA(AMOS_LAYER_NORM_BUILD, (4), (8), (16))

const Isa kIsas[] = AMOS_NATIVE_BUILDS;  // best first
Isa g_isa = amos_native::Best(kIsas);

bool IsRows(ffi::Span<const int64_t> dims, int64_t rows, int64_t h) {
  return dims.size() == 2 && dims[0] == rows && dims[1] == h;
}

ffi::Error LayerNormForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                            ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> stats,
                            float eps) {
  const auto dims = x.dimensions();
  if (dims.size() != 2 || scale.element_count() != static_cast<size_t>(dims[1]) ||
      bias.element_count() != static_cast<size_t>(dims[1]) ||
      !IsRows(y->dimensions(), dims[0], dims[1]) ||
      !IsRows(stats->dimensions(), dims[0], 2)) {
    return ffi::Error::InvalidArgument(
        "amos_layer_norm_fwd: needs x (R, H), scale and bias (H,) -> y (R, H) and "
        "stats (R, 2) (a caller bug)");
  }
  const int64_t rows = dims[0], h = dims[1];
  if (rows == 0) return ffi::Error::Success();
  const ForwardFn kernel = g_isa.forward;
  const float* px = x.typed_data();
  const float* ps = scale.typed_data();
  const float* pb = bias.typed_data();
  float* py = y->typed_data();
  float* pst = stats->typed_data();
  amos_native::ParallelFor(pool, (rows + kChunkRows - 1) / kChunkRows, [=](int64_t c) {
    const int64_t r0 = c * kChunkRows, n = std::min(kChunkRows, rows - r0);
    kernel(px + r0 * h, ps, pb, n, h, eps, py + r0 * h, pst + 2 * r0);
  });
  return ffi::Error::Success();
}

ffi::Error LayerNormBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> stats, ffi::Buffer<ffi::F32> scale,
                             ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dx,
                             ffi::ResultBuffer<ffi::F32> dscale,
                             ffi::ResultBuffer<ffi::F32> dbias) {
  const auto dims = x.dimensions();
  if (dims.size() != 2 || !IsRows(g.dimensions(), dims[0], dims[1]) ||
      !IsRows(stats.dimensions(), dims[0], 2) ||
      scale.element_count() != static_cast<size_t>(dims[1]) ||
      !IsRows(dx->dimensions(), dims[0], dims[1]) ||
      dscale->element_count() != static_cast<size_t>(dims[1]) ||
      dbias->element_count() != static_cast<size_t>(dims[1])) {
    return ffi::Error::InvalidArgument(
        "amos_layer_norm_bwd: needs x and g (R, H), stats (R, 2), scale (H,) -> dx (R, H),"
        " dscale and dbias (H,) (a caller bug)");
  }
  const int64_t rows = dims[0], h = dims[1];
  float* pds = dscale->typed_data();
  float* pdb = dbias->typed_data();
  std::fill(pds, pds + h, 0.0f);
  std::fill(pdb, pdb + h, 0.0f);
  if (rows == 0 || h == 0) return ffi::Error::Success();
  const int64_t chunks = (rows + kChunkRows - 1) / kChunkRows;
  // Each chunk's partial (dscale, dbias), added in chunk order below.
  std::vector<float> partial(chunks * 2 * h, 0.0f);
  const BackwardFn kernel = g_isa.backward;
  const float* px = x.typed_data();
  const float* pst = stats.typed_data();
  const float* ps = scale.typed_data();
  const float* pg = g.typed_data();
  float* pdx = dx->typed_data();
  float* pp = partial.data();
  amos_native::ParallelFor(pool, chunks, [=](int64_t c) {
    const int64_t r0 = c * kChunkRows, n = std::min(kChunkRows, rows - r0);
    kernel(px + r0 * h, pst + 2 * r0, ps, pg + r0 * h, n, h, pdx + r0 * h, pp + c * 2 * h,
           pp + c * 2 * h + h);
  });
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t j = 0; j < h; ++j) {
      pds[j] += pp[c * 2 * h + j];
      pdb[j] += pp[c * 2 * h + h + j];
    }
  return ffi::Error::Success();
}

}  // namespace

AMOS_NATIVE_ISA_SWITCH(amos_layer_norm, kIsas, g_isa)

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmosLayerNormForward, LayerNormForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmosLayerNormBackward, LayerNormBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
