// Dropout's keep masks from Threefry-2x32 for XLA:CPU (an FFI custom call): the
// same bits as `amos_jax.model.rng._keep_bits` with a threefry key, bit for bit.
//
// For each row r (its key (k1, k2)) and each prefix p of the row's shape (all
// dimensions but the last, n), with m = ceil(n / 4):
//   (w1, w2) = threefry2x32(k1, k2; 0, p * m + q)        for q < m
//   halves   = (w1 & 0xFFFF, w1 >> 16, w2 & 0xFFFF, w2 >> 16)
//   keep[r, p, h * m + q] = halves[h] < threshold         where h * m + q < n
// XLA:CPU computes the 20 rounds at about 1 G decisions/s; here W counters go
// through them at once in vector registers (16 with AVX-512, whose rotate is one
// instruction), compiled per ISA like the products, on every core.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "isa.h"
#include "kernels.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using KeepFn = void (*)(uint32_t, uint32_t, uint32_t, int64_t, int64_t, int64_t, bool*);

struct Isa {
  const char* name;
  KeepFn keep;
};

#define AMOS_DROPOUT_KEEP_BUILD(W_)                                                     \
  constexpr int W = W_;                                                                 \
  AMOS_KEEP_ROWS                                                                        \
  const Isa kBuild{kName, Keep};

AMOS_NATIVE_PER_ISA(AMOS_DROPOUT_KEEP_BUILD, (4), (8), (16))

const Isa kIsas[] = AMOS_NATIVE_BUILDS;  // best first
Isa g_isa = amos_native::Best(kIsas);

// About this many decisions per work item: enough to amortize claiming it.
constexpr int64_t kItemDecisions = 1 << 15;

ffi::Error DropoutKeep(ffi::ThreadPool pool, ffi::Buffer<ffi::U32> keys,
                       ffi::ResultBuffer<ffi::PRED> keep, int64_t n, int64_t threshold) {
  const int64_t rows = keys.element_count() / 2;
  if (keys.element_count() % 2 || n < 1 || rows < 1 ||
      keep->element_count() % (rows * n) || threshold < 0 || threshold > 65536) {
    return ffi::Error::InvalidArgument(
        "amos_dropout_keep: keys must be (rows, 2) and the mask rows x prefixes x n");
  }
  const int64_t prefixes = keep->element_count() / (rows * n);
  const uint32_t* k = keys.typed_data();
  bool* out = keep->typed_data();
  const int64_t per_item = std::max<int64_t>(1, kItemDecisions / n);
  const int64_t items_per_row = (prefixes + per_item - 1) / per_item;
  const KeepFn fn = g_isa.keep;
  amos_native::ParallelFor(pool, rows * items_per_row, [=](int64_t i) {
    const int64_t r = i / items_per_row, p0 = (i % items_per_row) * per_item;
    fn(k[2 * r], k[2 * r + 1], static_cast<uint32_t>(threshold), n, p0,
       std::min(prefixes, p0 + per_item), out + (r * prefixes + p0) * n);
  });
  return ffi::Error::Success();
}

}  // namespace

AMOS_NATIVE_ISA_SWITCH(amos_dropout_keep, kIsas, g_isa)

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmosDropoutKeep, DropoutKeep,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::PRED>>()
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("threshold"));
